"""Benchmark: the comparison table, every method x code length on one feature file.

Methods: the classic baselines of `tbhvae.baselines` (lsh, pcah, itq, sh,
spherh, agh, kmh, dgh, dgh_r) and the deep models of `configs/` (tbh, tbhvae and
the two mixed ablations tbh_betatcvae, tbh_geco; tbh_reference and
tbhvae_paper, the faithful settings; greedyhash, sgh, pseudolabel and
distillhash, the other deep methods of the paper's table), each trained for
`--budget` steps per seed.
Database = the train split, queries = the test split ("q10k": all test rows,
"q1k": the first 100 of each class). Per method and code length it reports
mAP@1000, mAP over the whole ranking, precision within Hamming radius 2 and the
training (fit) time and the bit balance of the database codes, as the mean
and sample standard deviation over seeds. Deep methods run every --seeds seed;
baselines run the --baseline_seeds (default: the first seed; pcah and sh are
deterministic and always run once). PR-by-radius and precision@N curves of
every method at 32 bits (else the middle code length) go to two PNGs.

Every mAP is tie-aware (`tbhvae.evaluation`), so collapsed codes are not
inflated; the old index-ties figure is recorded beside it. The progress lines
flag codes that are collapsed or retrieve at chance (`health_warnings`).

Finished deep runs are reused: each lives in <workdir>/<method>_<bits>_s<seed>
and is kept when its config.json and metrics.json match the requested run, so
an interrupted table resumes where it stopped.

  python -m bench.table --json table.json                  # full table (~15 min per deep run on 2 cores)
  python bench/table.py --methods sgh,greedyhash --bits 32 --json deep.json   # also runs as a script
  python -m bench.table --quick --json table_quick.json    # smoke run (minutes)

Writes OUT.json = {method: {bits: {"map@1000", "map@1000_std", "map", "map_std",
"precision@r2", "precision@r2_std", "train_seconds", "bit_balance", "seeds",
"seed_ids", "pr_curve", "precision_at_n", ...}}},
OUT_settings.json (flags, machine, versions, wall time) and the PNGs.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

if not __package__:  # run as `python bench/table.py`: the repository root holds the package `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    DEEP_CONFIGS,
    DEFAULT_FEATURES,
    DEFAULT_WORKDIR,
    BenchError,
    command_line,
    deep_config,
    int_list,
    jsonable,
    machine_description,
    overrides_tag,
    progress,
    quiet_keras,
    write_json,
)
from tbhvae.baselines import BASELINES, run_baselines
from tbhvae.data import DataError, FeatureSet, load_features
from tbhvae.evaluation import health_warnings
from tbhvae.protocol import QUERY_SETS

DEFAULT_BUDGET = 10000  # training steps per deep run (batch 400), the budget of the model comparison
QUICK_BUDGET = 200
METHODS = (*BASELINES, *DEEP_CONFIGS)
SEED_FREE_BASELINES = ("pcah", "sh", "kmh")  # their fit ignores the seed
# Config keys the table sets itself; --set may not change them.
TABLE_KEYS = ("bits", "steps", "seed", "eval_every", "checkpoint_every", "final_eval_queries", "features")
SCALARS = ("map@1000", "map@1000_index_ties", "map", "precision@r2", "train_seconds", "bit_balance",
           "min_bit_balance", "distinct_codes")


# ------------------------------------------------------------------ flags
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default=str(DEFAULT_FEATURES), help="feature .npz (default: %(default)s)")
    parser.add_argument("--bits", default="16,32,64", help="comma-separated code lengths")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds of the deep methods (default 0,1; --quick: 0)")
    parser.add_argument("--baseline_seeds", default=None,
                        help="comma-separated seeds of the baselines (default: the first of --seeds)")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"training steps per deep run (default {DEFAULT_BUDGET}; --quick: {QUICK_BUDGET})")
    parser.add_argument("--queries", choices=QUERY_SETS, default=None,
                        help="q10k: all test rows; q1k: first 100 per class (default q10k; --quick: q1k)")
    parser.add_argument("--quick", action="store_true", help="smoke run: q1k queries, short budget, seed 0")
    parser.add_argument("--json", default="bench_table.json", help="output JSON (default: %(default)s)")
    parser.add_argument("--plots", default=None, help="directory for the PNGs (default: next to --json)")
    parser.add_argument("--workdir", default=None,
                        help=f"deep run directories (default: {DEFAULT_WORKDIR}/<features>-<queries>-<budget>steps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every deep method (repeatable), e.g. input_scaling=standardize")
    args = parser.parse_args(argv)

    args.bits = int_list(args.bits, "--bits", 1)
    args.seeds = int_list(args.seeds or ("0" if args.quick else "0,1"), "--seeds", 0)
    args.baseline_seeds = (int_list(args.baseline_seeds, "--baseline_seeds", 0) if args.baseline_seeds
                           else args.seeds[:1])
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise BenchError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(METHODS)}")
    if args.budget is None:
        args.budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    if args.budget <= 0:
        raise BenchError(f"--budget: must be a positive number of steps, got {args.budget}")
    args.queries = args.queries or ("q1k" if args.quick else "q10k")
    for item in args.set:
        key = item.partition("=")[0].strip()
        if key in TABLE_KEYS:
            raise BenchError(f"--set {item}: '{key}' is set by the table; use the matching flag "
                             f"(--bits, --budget, --seeds, --queries, --features) instead")
    return args


def default_workdir(features: Path, queries: str, budget: int, overrides: list[str]) -> Path:
    return DEFAULT_WORKDIR.expanduser() / f"{features.stem}-{queries}-{budget}steps{overrides_tag(overrides)}"


# ------------------------------------------------------------------ single runs
def run_baseline(feature_set: FeatureSet, method: str, bits: int, seed: int, queries: str) -> dict:
    """Fits one baseline on the train split (`run_baselines`); its metrics with curves, "train_seconds" = fit."""
    metrics = run_baselines(feature_set, [bits], [method], seed=seed, queries=queries, curves=True)[method][str(bits)]
    metrics["train_seconds"] = metrics.pop("fit_seconds")
    return jsonable(metrics)


def run_deep(config, run_dir: Path, feature_set: FeatureSet) -> tuple[dict, bool]:
    """Trains one deep run, or reuses its finished metrics. Returns (metrics, reused).

    A run directory holding another config is started afresh; one holding the
    same config without metrics (interrupted) resumes from its checkpoint.
    """
    import keras
    import tensorflow as tf

    from tbhvae import train

    run = train.RunDirectory(run_dir)
    saved = run.saved_config()
    metrics = run.saved_metrics() if saved == config else None
    # metrics without the index-ties key predate the tie-aware metric: re-evaluate by retraining
    if metrics is not None and metrics.get("steps") == config.steps and "map@1000_index_ties" in metrics:
        return metrics, True
    with quiet_keras():
        metrics = train.train(config, run_dir, strategy=tf.distribute.get_strategy(),
                              fresh=saved is not None and saved != config, feature_set=feature_set)
    keras.backend.clear_session()  # drop the finished model's graphs before the next run
    gc.collect()
    return jsonable(metrics), False


# ------------------------------------------------------------------ aggregation
def summarise(per_seed: list[dict], seed_ids: list[int]) -> dict:
    """Mean and sample std (0 for one seed) of each scalar, per-seed mAP@1000 and mean curves."""
    summary = {}
    for key in SCALARS:
        values = np.array([m[key] for m in per_seed], dtype=np.float64)
        summary[key] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    summary["seeds"] = [float(m["map@1000"]) for m in per_seed]
    summary["seed_ids"] = list(seed_ids)
    if all("examples_per_second" in m for m in per_seed):
        summary["examples_per_second"] = float(np.mean([m["examples_per_second"] for m in per_seed]))
    summary["pr_curve"] = {
        "radius": per_seed[0]["pr_curve"]["radius"],
        "precision": np.mean([m["pr_curve"]["precision"] for m in per_seed], axis=0).tolist(),
        "recall": np.mean([m["pr_curve"]["recall"] for m in per_seed], axis=0).tolist(),
    }
    summary["precision_at_n"] = {n: float(np.mean([m["precision_at_n"][n] for m in per_seed]))
                                 for n in per_seed[0]["precision_at_n"]}
    return summary


def markdown_tables(results: dict) -> str:
    """One method x bits table per scalar metric: mean ± std over seeds."""
    bits_list = sorted({int(b) for per_bits in results.values() for b in per_bits})
    blocks = []
    for key, digits in (("map@1000", 3), ("map", 3), ("precision@r2", 3), ("train_seconds", 1),
                        ("bit_balance", 2)):
        lines = [f"| {key} | " + " | ".join(f"{b} bits" for b in bits_list) + " |",
                 "| --- |" + " --- |" * len(bits_list)]
        for method, per_bits in results.items():
            cells = []
            for b in bits_list:
                entry = per_bits.get(str(b))
                cells.append("" if entry is None else
                             f"{entry[key]:.{digits}f} ± {entry[key + '_std']:.{digits}f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_plots(results: dict, bits_list: list[int], directory: Path, prefix: str) -> list[Path]:
    """PR-by-radius and precision@N PNGs of every method at 32 bits (else the middle length)."""
    from bench.plots import plot_pr_curves, plot_precision_at_n

    bits = 32 if 32 in bits_list else sorted(bits_list)[len(bits_list) // 2]
    at_bits = {m: per_bits[str(bits)] for m, per_bits in results.items() if str(bits) in per_bits}
    deep = tuple(DEEP_CONFIGS)
    return [
        plot_pr_curves({m: r["pr_curve"] for m, r in at_bits.items()}, bits,
                       directory / f"{prefix}_pr_curves_{bits}bits.png", deep),
        plot_precision_at_n({m: r["precision_at_n"] for m, r in at_bits.items()}, bits,
                            directory / f"{prefix}_precision_at_n_{bits}bits.png", deep),
    ]


# ------------------------------------------------------------------ main
def build_table(args: argparse.Namespace, feature_set: FeatureSet, features: Path, workdir: Path) -> dict:
    """Runs (or reuses) every method x bits x seed; returns {method: {str(bits): summary}}."""
    seeds_of = {m: (args.seeds if m in DEEP_CONFIGS else
                    args.baseline_seeds[:1] if m in SEED_FREE_BASELINES else args.baseline_seeds)
                for m in args.methods}
    jobs = [(m, b, s) for m in args.methods for b in args.bits for s in seeds_of[m]]
    per_seed: dict[tuple[str, int], list[dict]] = {}
    for number, (method, bits, seed) in enumerate(jobs, 1):
        started = time.perf_counter()
        if method in BASELINES:
            metrics, how = run_baseline(feature_set, method, bits, seed, args.queries), "fit"
        else:
            config = deep_config(method, bits, seed, args.budget, args.queries, features, args.set)
            metrics, reused = run_deep(config, workdir / f"{method}_{bits}_s{seed}", feature_set)
            how = "reused" if reused else f"trained {args.budget} steps"
        per_seed.setdefault((method, bits), []).append(metrics)
        warnings = health_warnings(metrics, metrics["chance_map@1000"], len(feature_set.train_labels))
        warning = "".join(f" WARNING: {w}" for w in warnings)
        progress(f"[{number}/{len(jobs)}] {method} {bits} bits seed {seed}: mAP@1000 {metrics['map@1000']:.4f}, "
                 f"mAP {metrics['map']:.4f}, P@r2 {metrics['precision@r2']:.4f} ({how}, "
                 f"train {metrics['train_seconds']:.1f} s, wall {time.perf_counter() - started:.1f} s){warning}")
    return {m: {str(b): summarise(per_seed[(m, b)], seeds_of[m]) for b in args.bits} for m in args.methods}


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    errors = (BenchError, DataError, ValueError)  # ConfigError is a ValueError too
    try:
        args = parse_args(argv)
        if any(m in DEEP_CONFIGS for m in args.methods):
            from tbhvae.train import TrainingError
            errors += (TrainingError,)
        features = Path(args.features).resolve()
        feature_set = load_features(features)
        workdir = Path(args.workdir) if args.workdir else default_workdir(features, args.queries, args.budget,
                                                                          args.set)
        progress(f"{len(args.methods)} methods x bits {args.bits} x seeds {args.seeds} on {features} "
                 f"({args.queries}), deep budget {args.budget} steps, run directories in {workdir}")
        results = build_table(args, feature_set, features, workdir)
    except errors as err:
        raise SystemExit(f"bench.table: {err}") from None

    print(markdown_tables(results))
    out = write_json(args.json, results)
    settings = {"command": command_line("table", argv),
                "features": str(features), "bits": args.bits, "methods": args.methods, "seeds": args.seeds,
                "baseline_seeds": args.baseline_seeds,
                "budget": args.budget, "queries": args.queries, "overrides": args.set, "workdir": str(workdir),
                "wall_seconds": time.perf_counter() - started, "machine": machine_description()}
    settings_path = write_json(out.with_name(out.stem + "_settings.json"), settings)
    pngs = write_plots(results, args.bits, Path(args.plots) if args.plots else out.parent, out.stem)
    progress(f"wrote {out}, {settings_path}, {', '.join(map(str, pngs))} "
             f"({time.perf_counter() - started:.0f} s)")
    return results


if __name__ == "__main__":
    main()
