"""Benchmark: the approximate index (HammingIndex backend="faiss_ivf") against the exact scan.

For each database size and kind of codes, the same queries are answered by the
exact faiss scan (backend="faiss", the fastest exact backend) and by the IVF
index at several nprobe; reported are tie-aware recall@k (the share of the k
results within the exact k-th distance) and query time, both measured in this
run, and the speed-up over the exact scan.

Kinds of codes:
  random  uniform random bits (no structure: the hardest case for clustering)
  model   the database codes of a trained run (--run, on its --features), each
          copied with every bit flipped with probability --flip until the size
          is reached; queries are the codes of the test features

  python -m bench.approximate_index --run runs/cifar10_tbhvae_32b \
      --features ../shared/data/cifar10_effnetlite0.npz --sizes 1000000 10000000 --json OUT.json
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import machine_description, write_json
from bench.index_speed import timed
from tbhvae.codes import num_bytes
from tbhvae.index import HammingIndex, IVFSettings


def model_codes(run_dir: str, features_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(database codes 0/1 [N, M], query codes [Q, M]) of a trained run on a feature file."""
    from tbhvae.data import load_features
    from tbhvae.encoders import KerasEncoder
    from tbhvae.export import load_run

    encoder = KerasEncoder(load_run(run_dir))
    features = load_features(features_path)
    return (encoder.encode(features.train_features)["bits"], encoder.encode(features.test_features)["bits"])


def packed_database(kind: str, n: int, bits: int, seed: int, base: np.ndarray | None, flip: float) -> np.ndarray:
    """Packed codes uint8 [n, ceil(bits / 8)], made in chunks (10^7 unpacked codes would not fit)."""
    rng = np.random.default_rng(seed)
    chunks, made = [], 0
    while made < n:
        size = min(1_000_000, n - made)
        if kind == "random":
            codes = rng.integers(0, 2, (size, bits), dtype=np.uint8)
        else:
            codes = base[rng.integers(0, len(base), size)] ^ (rng.random((size, bits)) < flip).astype(np.uint8)
        chunks.append(np.packbits(codes, axis=1))
        made += size
    return np.concatenate(chunks)


def bench(kind: str, packed: np.ndarray, bits: int, queries: np.ndarray, k: int, nprobes: list[int],
          repeats: int) -> list[dict]:
    n = len(packed)
    exact = HammingIndex.from_packed(packed, bits, backend="faiss")
    exact.search(queries[:1], 1)  # builds the faiss copy outside the timing
    timing = {}  # best / median wall clock and CPU seconds of each search, by bench.index_speed.timed
    exact_distances, _ = timed(lambda: exact.search(queries, k), repeats, timing, "exact")
    exact_s = timing["exact_best_s"]
    rows = []
    nlist, default_nprobe = IVFSettings().resolved(n)
    index = HammingIndex.from_packed(packed, bits, backend="faiss_ivf")
    start = time.perf_counter()
    index.search(queries[:1], 1)  # trains and fills the IVF
    build_s = time.perf_counter() - start
    for nprobe in sorted(set(nprobes) | {default_nprobe}):
        index.ivf = IVFSettings(nlist, nprobe)
        distances, _ = timed(lambda: index.search(queries, k), repeats, timing, "ivf")
        ivf_s = timing["ivf_best_s"]
        recall = float(np.mean((distances <= exact_distances[:, -1:]).mean(axis=1)))
        row = {"kind": kind, "n": n, "bits": bits, "queries": len(queries), "k": k, "nlist": nlist,
               "nprobe": nprobe, "default": nprobe == default_nprobe, "recall": recall,
               "exact_s": exact_s, "ivf_s": ivf_s, "speedup": exact_s / ivf_s, "build_s": build_s}
        rows.append(row)
        print(f"{kind:>6} n={n:>9,} nlist={nlist:>5} nprobe={nprobe:>4}{'*' if row['default'] else ' '} "
              f"recall@{k} {recall:.3f}  exact {exact_s * 1e3 / len(queries):8.3f} ms/query  "
              f"ivf {ivf_s * 1e3 / len(queries):7.3f} ms/query  x{row['speedup']:.1f}  (build {build_s:.0f} s)",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--kinds", nargs="+", default=["random", "model"], choices=["random", "model"])
    parser.add_argument("--run", help="trained run directory (for --kinds model)")
    parser.add_argument("--features", help="feature file of the run (for --kinds model)")
    parser.add_argument("--bits", type=int, default=64, help="bits of the random codes (model: the run's)")
    parser.add_argument("--flip", type=float, default=0.05, help="model codes: per-bit flip probability")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="approximate_index.json")
    args = parser.parse_args()
    if "model" in args.kinds and not (args.run and args.features):
        parser.error("--kinds model needs --run and --features")

    rng = np.random.default_rng(args.seed)
    rows = []
    base = None
    for kind in args.kinds:
        if kind == "model":
            base, test = model_codes(args.run, args.features)
            bits = base.shape[1]
            queries = test[rng.permutation(len(test))[:args.queries]]
        else:
            bits = args.bits
            queries = rng.integers(0, 2, (args.queries, bits), dtype=np.uint8)
        for n in args.sizes:
            packed = packed_database(kind, n, bits, args.seed, base, args.flip)
            assert packed.shape[1] == num_bytes(bits)
            rows += bench(kind, packed, bits, queries, args.k, args.nprobe, args.repeats)
            del packed
    write_json(args.json, {**machine_description(), "settings": vars(args), "results": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
