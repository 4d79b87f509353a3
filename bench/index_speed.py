"""Benchmark: exact top-k Hamming search, tbhvae.index.HammingIndex vs faiss.

For each database size, random codes are indexed and the same queries are
answered by
  numpy       HammingIndex(backend="numpy")   (backend="auto" below 32 bits or without faiss)
  ours_faiss  HammingIndex(backend="faiss")   (faiss + exact re-ranking)
  faiss_raw   faiss.IndexBinaryFlat.search    (faiss alone, its own tie order)
The faiss columns are skipped when faiss is not installed (pip install faiss-cpu).
Times are seconds for the whole query batch: wall clock (best and median of
--repeats runs) and process CPU time summed over threads (best run; less
sensitive to other load on the machine). Memory is in MiB.

  python -m bench.index_speed --output index_speed.json
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import tracemalloc

import numpy as np

from bench.common import machine_description, write_json
from tbhvae.codes import num_bytes
from tbhvae.index import HammingIndex

MIB = 2**20


def timed(function, repeats: int, row: dict, name: str):
    """Runs function() `repeats` times; records wall-clock best / median and the
    best process CPU time (all threads) in row[name + "_best_s" / "_median_s" /
    "_cpu_s"]. Returns the last result."""
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = function()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    row[name + "_best_s"] = min(seconds)
    row[name + "_median_s"] = statistics.median(seconds)
    row[name + "_cpu_s"] = min(cpu_seconds)
    return result


def bench_size(n: int, bits: int, num_queries: int, k: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    nbytes = num_bytes(bits)
    db_codes = np.unpackbits(rng.integers(0, 256, (n, nbytes), dtype=np.uint8), axis=1, count=bits)
    queries = np.unpackbits(rng.integers(0, 256, (num_queries, nbytes), dtype=np.uint8),
                            axis=1, count=bits)
    row = {"n": n, "bits": bits, "queries": num_queries, "k": k}

    start = time.perf_counter()
    index = HammingIndex(db_codes, backend="numpy")
    row["build_s"] = time.perf_counter() - start
    packed = index.packed
    start = time.perf_counter()
    HammingIndex.from_packed(packed, bits, backend="numpy")
    row["build_from_packed_s"] = time.perf_counter() - start
    row["index_mib"] = index.nbytes / MIB

    tracemalloc.start()
    distances, ids = timed(lambda: index.search(queries, k), repeats, row, "numpy")
    row["numpy_search_peak_mib"] = tracemalloc.get_traced_memory()[1] / MIB
    tracemalloc.stop()

    if importlib.util.find_spec("faiss") is None:
        return row
    import faiss

    start = time.perf_counter()
    raw = faiss.IndexBinaryFlat(8 * nbytes)
    raw.add(packed)
    row["faiss_build_s"] = time.perf_counter() - start
    row["faiss_index_mib"] = n * raw.code_size / MIB
    packed_queries = np.packbits(queries, axis=1)
    raw_distances, raw_ids = timed(lambda: raw.search(packed_queries, k), repeats, row,
                                   "faiss_raw")
    row["faiss_raw_same_results"] = bool(
        np.array_equal(raw_distances, distances) and np.array_equal(raw_ids, ids))

    index_faiss = HammingIndex.from_packed(packed, bits, backend="faiss")
    index_faiss.search(queries[:1], k)  # builds the faiss copy outside the timing
    faiss_distances, faiss_ids = timed(lambda: index_faiss.search(queries, k), repeats, row,
                                       "ours_faiss")
    if not (np.array_equal(faiss_distances, distances) and np.array_equal(faiss_ids, ids)):
        raise AssertionError(f"n={n}: backend='faiss' results differ from backend='numpy'")
    return row


def print_table(rows: list[dict]) -> None:
    columns = [("n", "{:>9}"), ("build_s", "{:>8.3f}"), ("build_from_packed_s", "{:>8.3f}"),
               ("faiss_build_s", "{:>8.3f}"), ("index_mib", "{:>9.1f}"),
               ("faiss_index_mib", "{:>9.1f}"),
               ("numpy_search_peak_mib", "{:>9.1f}"), ("numpy_best_s", "{:>9.3f}"),
               ("numpy_median_s", "{:>9.3f}"), ("numpy_cpu_s", "{:>9.3f}"),
               ("ours_faiss_best_s", "{:>9.3f}"), ("faiss_raw_best_s", "{:>9.3f}"),
               ("faiss_raw_median_s", "{:>9.3f}"), ("faiss_raw_cpu_s", "{:>9.3f}"),
               ("faiss_raw_same_results", "{!s:>6}")]
    columns = [(name, fmt) for name, fmt in columns if name in rows[0]]
    print("  ".join(name for name, _ in columns))
    for row in rows:
        print("  ".join(fmt.format(row[name]).rjust(len(name)) for name, fmt in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="database sizes (number of codes)")
    parser.add_argument("--bits", type=int, default=64, help="bits per code")
    parser.add_argument("--queries", type=int, default=1000, help="number of queries")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the codes")
    parser.add_argument("--output", default="index_speed.json", help="JSON file to write")
    args = parser.parse_args()

    rows = [bench_size(n, args.bits, args.queries, args.k, args.repeats, args.seed)
            for n in args.sizes]
    print_table(rows)
    report = {**machine_description(), "results": rows}
    if importlib.util.find_spec("faiss") is not None:
        import faiss
        report["faiss"] = faiss.__version__
    write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
