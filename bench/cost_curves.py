"""Benchmark: training cost against batch size, code length and input dimension; evaluation cost
against database size.

Training: examples/s of one train step (outside fit, as bench.step_profile times
it) and the process's peak resident memory, for TBH and TBH-VAE (the recommended
configs) in float32 and mixed_bfloat16, sweeping one of
  batch B   (bits 32, D 1280)      --batches
  bits M    (B 400, D 1280)        --bits
  dim D     (B 400, bits 32)       --dims
with the others fixed. Each point runs in its own process so that its peak
memory (ru_maxrss) is its own; `model_mb` is the peak less the process's
memory before the model was built. `batch_flop_share` is the share of the
model's counted FLOP (TwinBottleneckHashing.training_flops_per_example) in the
terms that grow with B per example (the batch graph and the similarity term,
B^2 per step): where it passes 1/2 those terms dominate.
Evaluation: seconds of the tie-aware mAP@1000 (10,000 queries, 32 bits, random
codes of 10 classes) against database size (--databases).

  python -m bench.cost_curves --json bench/results/cost_curves.json   # ~20 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import (
    PRECISIONS,
    BenchError,
    command_line,
    int_list,
    machine_description,
    progress,
    random_features,
    write_json,
)
from bench.step_profile import MODELS

FIXED = {"batch": 400, "bits": 32, "dim": 1280}
SWEEPS = {"batch": [100, 400, 1600, 3200], "bits": [16, 64, 256], "dim": [512, 2048, 4096]}
TRAIN_ROWS = 8000  # training rows of the synthetic features (>= the largest batch)


def _resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure_point(model: str, precision: str, batch: int, bits: int, dim: int, steps: int) -> dict:
    """One training point, in this process: examples/s, peak and model memory (MB), FLOP shares."""
    import tensorflow as tf  # noqa: F401  (imported before the baseline memory reading)

    from bench.step_profile import seconds_per_step, train_step_of

    feature_set = random_features(max(TRAIN_ROWS, batch), 100, dim)
    before = _resident_mb()
    with train_step_of(model, precision, feature_set, bits, batch) as (net, step, batch_features):
        seconds = seconds_per_step(step, batch_features, warmup=3, steps=steps)
        flops = net.training_flops_per_example(batch)
        per_example_at_two = net.training_flops_per_example(2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model, "precision": precision, "batch": batch, "bits": bits, "dim": dim,
            "steps": steps, "examples_per_second": batch / seconds, "step_ms": seconds * 1e3,
            "flops_per_example": flops, "gflops_per_second": flops * batch / seconds / 1e9,
            # the part of the per-example count that grows with B (linear in B per example)
            "batch_flop_share": (flops - per_example_at_two) / flops,
            "peak_mb": peak, "model_mb": peak - before}


def training_rows(args) -> list[dict]:
    """Every sweep point of every model and precision, each in a fresh process."""
    rows = []
    points = [(name, value) for name in ("batch", "bits", "dim") for value in getattr(args, name)]
    total = len(points) * len(args.models) * len(args.precisions)
    for name, value in points:
        shape = {**FIXED, name: value}
        for model in args.models:
            for precision in args.precisions:
                command = [sys.executable, "-m", "bench.cost_curves", "--point",
                           f"{model},{precision},{shape['batch']},{shape['bits']},{shape['dim']}",
                           "--steps", str(args.steps)]
                done = subprocess.run(command, capture_output=True, text=True,
                                      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
                if done.returncode:
                    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                    raise BenchError(f"point {command[-3]} failed: {tail}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"sweep": name, **row})
                progress(f"[{len(rows)}/{total}] {name}={value} {model} {precision}: "
                         f"{row['examples_per_second']:.0f} examples/s, peak {row['peak_mb']:.0f} MB")
    return rows


def evaluation_rows(databases: list[int], queries: int = 10_000, bits: int = 32) -> list[dict]:
    """Seconds of the tie-aware mAP@1000 for `queries` random queries against each database size."""
    from tbhvae.evaluation import mean_average_precision

    rng = np.random.default_rng(0)
    query_codes = rng.integers(0, 2, (queries, bits), dtype=np.uint8)
    query_labels = rng.integers(0, 10, queries)
    rows = []
    for size in databases:
        db_codes = rng.integers(0, 2, (size, bits), dtype=np.uint8)
        start = time.perf_counter()
        mean_average_precision(query_codes, db_codes, query_labels, rng.integers(0, 10, size), top_k=1000)
        rows.append({"database": size, "queries": queries, "bits": bits,
                     "seconds": time.perf_counter() - start})
        progress(f"evaluation {queries} queries x {size} codes: {rows[-1]['seconds']:.1f} s")
    return rows


def print_tables(report: dict) -> None:
    for name in ("batch", "bits", "dim"):
        rows = [r for r in report["training"] if r["sweep"] == name]
        if not rows:
            continue
        print(f"\n| {name} | model | precision | examples/s | GFLOP/s | B-term FLOP share | peak MB | model MB |")
        print("|" + " --- |" * 8)
        for r in rows:
            print(f"| {r[name]} | {r['model']} | {r['precision']} | {r['examples_per_second']:.0f} | "
                  f"{r['gflops_per_second']:.0f} | {r['batch_flop_share']:.1%} | {r['peak_mb']:.0f} | "
                  f"{r['model_mb']:.0f} |")
    if report.get("evaluation"):
        print("\n| database | queries | bits | mAP@1000 seconds |\n| --- | --- | --- | --- |")
        for r in report["evaluation"]:
            print(f"| {r['database']} | {r['queries']} | {r['bits']} | {r['seconds']:.1f} |")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--batches", default=",".join(map(str, SWEEPS["batch"])))
    parser.add_argument("--bits", default=",".join(map(str, SWEEPS["bits"])))
    parser.add_argument("--dims", default=",".join(map(str, SWEEPS["dim"])))
    parser.add_argument("--databases", default="10000,100000,1000000",
                        help="database sizes of the evaluation cost (empty: skip)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per point (default %(default)s)")
    parser.add_argument("--json", default="cost_curves.json")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # model,precision,batch,bits,dim
    args = parser.parse_args(argv)
    args.models, args.precisions = args.models.split(","), args.precisions.split(",")
    bad = [m for m in args.models if m not in MODELS] + [p for p in args.precisions if p not in PRECISIONS]
    if bad:
        raise BenchError(f"unknown model or precision {', '.join(bad)}")
    if args.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {args.steps}")
    args.batch = int_list(args.batches, "--batches", 2)
    args.bits = int_list(args.bits, "--bits", 1)
    args.dim = int_list(args.dims, "--dims", 1)
    args.databases = int_list(args.databases, "--databases", 1) if args.databases else []
    return args


def main(argv: list[str] | None = None) -> dict:
    try:
        args = parse_args(argv)
        if args.point:
            model, precision, batch, bits, dim = args.point.split(",")
            print(json.dumps(measure_point(model, precision, int(batch), int(bits), int(dim), args.steps)))
            return {}
        started = time.perf_counter()
        report = {"machine": machine_description(), "training": training_rows(args),
                  "evaluation": evaluation_rows(args.databases)}
    except BenchError as err:
        raise SystemExit(f"bench.cost_curves: {err}") from None
    report["wall_seconds"] = time.perf_counter() - started
    report["command"] = command_line("cost_curves", argv)
    print_tables(report)
    out = write_json(args.json, report)
    from bench.plots import plot_cost_curves
    plot = plot_cost_curves(report, out.with_suffix(".png"))
    progress(f"wrote {out}, {plot} ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
