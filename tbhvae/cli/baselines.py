"""Fit and evaluate the classic hashing baselines (`tbhvae.baselines`) on a feature file.

Database = train features, queries = test features::

    python -m tbhvae.cli.baselines --features F.npz --bits 16,32,64 --json OUT.json [--methods lsh,itq] [--queries q1k]

Every entry of OUT.json also records the feature file, the query set and the
package version that produced it. Exit codes: 0 done, 2 bad input (one
`error: ...` line on stderr; checked before any fitting where possible).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from tbhvae.baselines import BASELINES, markdown_table, run_baselines
from tbhvae.checks import atomic_write, check_writable
from tbhvae.cli import expect_no_arguments, fail, run_main
from tbhvae.data import DataError, load_features
from tbhvae.protocol import QUERY_SETS

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags (called by `run`, so that importing this module defines none)."""
    flags.DEFINE_string("features", None,
                        "Feature .npz (train_features, train_labels, test_features, test_labels).", required=True)
    flags.DEFINE_list("bits", ["16", "32", "64"], "Comma-separated code lengths.")
    flags.DEFINE_string("json", None, "Output JSON path: "
                        "{method: {bits: {map@1000 (tie-aware), map, precision@r2, "
                        "map@1000_index_ties, bit_balance, distinct_codes, fit_seconds}}}.", required=True)
    flags.DEFINE_list("methods", list(BASELINES), f"Comma-separated subset of {','.join(BASELINES)}.")
    flags.DEFINE_integer("seed", 0, "Random seed of every method.")
    flags.DEFINE_enum("queries", "q10k", list(QUERY_SETS),
                      "q10k: all test rows as queries; q1k: the first 100 test rows of each class.")


def _parse_bits(values) -> list[int]:
    try:
        bits_list = [int(v) for v in values]
    except ValueError:
        bits_list = []
    if not bits_list or min(bits_list) <= 0:
        fail(f"--bits: expected comma-separated positive integers, got {','.join(values)!r}")
    return bits_list


def _print_progress(method: str, bits: int, metrics: dict) -> None:
    print(f"{method} {bits} bits: mAP@1000 {metrics['map@1000']:.4f}, mAP {metrics['map']:.4f}, "
          f"P@r2 {metrics['precision@r2']:.4f}, fit {metrics['fit_seconds']:.1f} s",
          file=sys.stderr, flush=True)


def main(argv) -> None:
    expect_no_arguments(argv)
    bits_list = _parse_bits(FLAGS.bits)
    try:  # before the work: an unwritable --json must not cost an hour of fitting
        out = check_writable(FLAGS.json, "--json")
    except ValueError as err:
        fail(str(err))
    try:
        feature_set = load_features(FLAGS.features)
        results = run_baselines(feature_set, bits_list, FLAGS.methods, seed=FLAGS.seed,
                                queries=FLAGS.queries, progress=_print_progress)
    except (DataError, ValueError) as err:
        fail(str(err))
    print(markdown_table(results))
    from tbhvae import __version__
    provenance = {"features": str(Path(FLAGS.features).resolve()), "queries": FLAGS.queries,
                  "tbhvae_version": __version__}
    for per_bits in results.values():
        for metrics in per_bits.values():
            metrics.update(provenance)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def run() -> None:
    """Console-script entry point (`tbhvae-baselines`)."""
    define_flags()
    run_main(main, __name__)


if __name__ == "__main__":
    run()
