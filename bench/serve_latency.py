"""Benchmark: the search service end to end over HTTP (tbhvae.serve), one request at a time.

Uploads test JPEGs of --images to POST /search (multipart) and asks POST
/search_test for the same rows; prints the median and 95th-percentile latency
of each (client-side wall clock, connection kept open) and the mean
precision@k of the test-image queries. With --screenshot, the page is opened
in headless Chromium (Playwright), a test image picked, and the page saved.

  python -m tbhvae.serve --encoder E --index I --images ../shared/data/cifar10_jpeg.npz --port 8000 &
  python -m bench.serve_latency --url http://127.0.0.1:8000 --images ../shared/data/cifar10_jpeg.npz \
      --requests 200 --json OUT.json --screenshot page.png
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import time
import urllib.parse
import uuid

import numpy as np

from bench.common import machine_description, write_json
from tbhvae.retrieval import image_count, jpeg_rows


def post(connection, path: str, body: bytes = b"", content_type: str = "") -> tuple[float, dict]:
    """(seconds, JSON answer) of one POST on a kept-open connection."""
    start = time.perf_counter()
    connection.request("POST", path, body=body, headers={"Content-Type": content_type} if content_type else {})
    response = connection.getresponse()
    answer = json.loads(response.read())
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise SystemExit(f"POST {path}: {response.status} {answer}")
    return seconds, answer


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def screenshot(url: str, path: str, pick: int) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url + "/")
        page.wait_for_selector("#picker button")
        page.query_selector_all("#picker button")[pick].click()
        page.wait_for_selector('#results[data-state="done"]')
        page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete)")
        page.screenshot(path=path, full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", required=True, help="the service's --images (test rows are uploaded)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", default="serve_latency.json")
    parser.add_argument("--screenshot", help="PNG path for a picture of the page (needs Chromium)")
    parser.add_argument("--pick", type=int, default=6, help="which listed test image the screenshot picks")
    args = parser.parse_args()

    rows = np.random.default_rng(0).permutation(image_count(args.images, "test"))[:args.requests]
    files = jpeg_rows(args.images, "test", rows)
    address = urllib.parse.urlsplit(args.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    post(connection, f"/search_test?row={rows[0]}&k={args.k}")  # warm-up
    upload_s, test_s, precision = [], [], []
    for row, data in zip(rows, files):
        seconds, _ = post(connection, f"/search?k={args.k}", *multipart(data))
        upload_s.append(seconds)
        seconds, answer = post(connection, f"/search_test?row={row}&k={args.k}")
        test_s.append(seconds)
        precision.append(answer.get("precision", np.nan))
    result = {"requests": len(rows), "k": args.k,
              "upload_median_ms": 1e3 * float(np.median(upload_s)),
              "upload_p95_ms": 1e3 * float(np.percentile(upload_s, 95)),
              "test_image_median_ms": 1e3 * float(np.median(test_s)),
              "test_image_p95_ms": 1e3 * float(np.percentile(test_s, 95)),
              f"precision@{args.k}": float(np.nanmean(precision))}
    print(json.dumps(result, indent=2))
    if args.screenshot:
        screenshot(args.url, args.screenshot, args.pick)
        print(f"page saved to {args.screenshot}")
    write_json(args.json, {**machine_description(), "settings": vars(args), "results": result})


if __name__ == "__main__":
    main()
