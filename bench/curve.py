"""Benchmark: retrieval quality against training steps, next to ITQ.

Trains one deep method per code length through a list of step milestones in a
single run directory: the run goes to the first milestone, is evaluated on the
whole query set (q10k by default), then resumes from its checkpoint to the
next milestone, and so on. Resuming continues the same deterministic input
order and optimiser state, so the milestones are points of one uninterrupted
training run. ITQ (fitted once per code length, same queries) is the reference
line. Finished milestones are kept in the run directory (metrics_<steps>.json)
and reused, so an interrupted curve continues where it stopped.

  python -m bench.curve --json bench/results/curve_tbh.json               # TBH, 16/32/64 bits, 1k..20k steps
  python -m bench.curve --method tbhvae --steps 1000,5000 --bits 32 --json curve_tbhvae.json

Writes OUT.json = {"method", "queries", "itq": {bits: map@1000},
"runs": {bits: [{"steps", "map@1000", "map", "precision@r2", "bit_balance",
"distinct_codes", "train_seconds"}, ...]}}, OUT_settings.json and OUT.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import (
    DEEP_CONFIGS,
    DEFAULT_FEATURES,
    DEFAULT_WORKDIR,
    BenchError,
    command_line,
    deep_config,
    int_list,
    machine_description,
    overrides_tag,
    progress,
    quiet_keras,
    write_json,
)
from bench.plots import plot_steps_curve
from tbhvae.baselines import run_baselines
from tbhvae.data import DataError, FeatureSet, load_features
from tbhvae.protocol import QUERY_SETS

DEFAULT_STEPS = "1000,2000,5000,10000,20000"
POINT_KEYS = ("map@1000", "map@1000_index_ties", "map", "precision@r2", "bit_balance", "min_bit_balance",
              "distinct_codes", "train_seconds", "examples_per_second")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default=str(DEFAULT_FEATURES), help="feature .npz (default: %(default)s)")
    parser.add_argument("--method", default="tbh", choices=sorted(DEEP_CONFIGS), help="deep method (configs/)")
    parser.add_argument("--bits", default="16,32,64", help="comma-separated code lengths")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="comma-separated, increasing step milestones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deep runs and of ITQ")
    parser.add_argument("--queries", choices=QUERY_SETS, default="q10k", help="query set (default: %(default)s)")
    parser.add_argument("--json", default="bench_curve.json", help="output JSON (default: %(default)s)")
    parser.add_argument("--workdir", default=None,
                        help=f"run directories (default: {DEFAULT_WORKDIR.parent}/bench_curve/<features>-<method>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable), e.g. jit_compile=false")
    args = parser.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", 1)
    args.steps = int_list(args.steps, "--steps", 1)
    if args.steps != sorted(set(args.steps)):
        raise BenchError(f"--steps: milestones must be strictly increasing, got {args.steps}")
    return args


def default_workdir(features: Path, method: str, overrides: list[str]) -> Path:
    """~/.cache/tbhvae/bench_curve/<features>-<method>[-<hash of the overrides>]."""
    name = f"{features.stem}-{method}{overrides_tag(overrides)}"
    return DEFAULT_WORKDIR.expanduser().parent / "bench_curve" / name


def run_milestones(args: argparse.Namespace, feature_set: FeatureSet, features: Path, workdir: Path,
                   bits: int) -> list[dict]:
    """Trains one run through every milestone; returns one point per milestone."""
    from tbhvae import train

    run_dir = workdir / f"{args.method}_{bits}_s{args.seed}"
    points = []
    for steps in args.steps:
        saved = run_dir / f"metrics_{steps}.json"
        started = time.perf_counter()
        config = deep_config(args.method, bits, args.seed, steps, args.queries, features, args.set)
        config = config.replace(checkpoint_every=min(1000, steps))
        previous = train.RunDirectory(run_dir).saved_config()
        if previous is not None and previous.replace(steps=steps, checkpoint_every=config.checkpoint_every) != config:
            raise BenchError(f"{run_dir} holds a run with another config (other --set, --queries or features); "
                             f"pass another --workdir or remove it")
        metrics = json.loads(saved.read_text()) if saved.is_file() else {}
        if "map@1000_index_ties" in metrics:  # metrics without it predate the tie-aware metric
            how = "reused"
        else:
            with quiet_keras():
                metrics = train.train(config, run_dir, feature_set=feature_set)
            write_json(saved, metrics)
            how = "trained"
        point = {"steps": steps, **{key: metrics[key] for key in POINT_KEYS if key in metrics}}
        points.append(point)
        progress(f"{args.method} {bits} bits, {steps} steps: mAP@1000 {point['map@1000']:.4f}, "
                 f"mAP {point['map']:.4f}, bit balance {point['bit_balance']:.2f} "
                 f"({how}, wall {time.perf_counter() - started:.0f} s)")
    return points


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    from tbhvae.train import TrainingError

    try:
        args = parse_args(argv)
        features = Path(args.features).resolve()
        feature_set = load_features(features)
        workdir = Path(args.workdir) if args.workdir else default_workdir(features, args.method, args.set)
        result = {"method": args.method, "queries": args.queries, "itq": {}, "runs": {}}
        for bits in args.bits:
            itq = run_baselines(feature_set, [bits], ["itq"], seed=args.seed, queries=args.queries)["itq"][str(bits)]
            result["itq"][str(bits)] = itq["map@1000"]
            progress(f"itq {bits} bits: mAP@1000 {itq['map@1000']:.4f}")
            result["runs"][str(bits)] = run_milestones(args, feature_set, features, workdir, bits)
    except (BenchError, DataError, ValueError, TrainingError) as err:
        raise SystemExit(f"bench.curve: {err}") from None

    header = "| steps | " + " | ".join(f"{b} bits" for b in result["runs"]) + " |"
    lines = [header, "| --- |" + " --- |" * len(result["runs"])]
    for index, steps in enumerate(args.steps):
        lines.append(f"| {steps} | " + " | ".join(f"{points[index]['map@1000']:.3f}"
                                                 for points in result["runs"].values()) + " |")
    lines.append("| ITQ | " + " | ".join(f"{result['itq'][b]:.3f}" for b in result["runs"]) + " |")
    print("\n".join(lines))
    out = write_json(args.json, result)
    settings = {"command": command_line("curve", argv),
                "features": str(features), "workdir": str(workdir), "overrides": args.set,
                "wall_seconds": time.perf_counter() - started, "machine": machine_description()}
    write_json(out.with_name(out.stem + "_settings.json"), settings)
    png = plot_steps_curve(result, out.with_suffix(".png"))
    progress(f"wrote {out} and {png} ({time.perf_counter() - started:.0f} s)")
    return result


if __name__ == "__main__":
    main()
