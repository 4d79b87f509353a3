"""Benchmark: training throughput against the matmul roofline, evaluation, encoders, index.

Sections (--sections, all by default):
  training    examples/s of TBH and TBH-VAE (32 bits, batch 400) in float32 and
              mixed_bfloat16, with XLA on/off, on 1 replica and on 2 replicas
              (MirroredStrategy over 2 logical CPU devices), each as a fraction of
              the roofline bound matmul FLOP/s / model FLOP per example, and bf16
              against float32 of the same model and setting. The matmul is a
              [400, 1280] x [1280, 1024] product in the run's dtype, timed right
              before each run (and at the start and end of the benchmark); the
              model cost is counted from the model's layers
              (TwinBottleneckHashing.training_flops_per_example).
  evaluation  seconds of the q10k protocol (10,000 queries x 50,000 codes, 10
              classes) on random codes at 16/32/64 bits, in the same run: the old
              index-ties mAP@1000 (mean_average_precision_index_ties), the tie-aware
              mean_average_precision (top 1000) and evaluate_codes (full ranking,
              curves); best of --eval_repeats interleaved repetitions, with the
              ratio tie-aware / index-ties per code length.
  encoders    latency (batch 1, median ms) and throughput (rows/s) of a trained
              TBH encoder as Keras, SavedModel and TFLite (float32, float16,
              dynamic-range, int8) via tbhvae.export and tbhvae.encoders.
  index       exact top-k search time vs database size (bench.index_speed).

  python -m bench.speed --json speed.json             # full run (~20 min on 2 cores)
  python -m bench.speed --quick --json speed_quick.json

The CPU is split into 2 logical devices before TensorFlow starts; 1-replica
runs use the first. Absolute figures move with machine load; the ratios to the
matmul measured in the same run are the comparable ones.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from bench.common import (
    DEEP_CONFIGS,
    DEFAULT_FEATURES,
    PRECISIONS,
    REPO_ROOT,
    BenchError,
    command_line,
    machine_description,
    progress,
    quiet_keras,
    random_features,
    write_json,
)
from bench.encoder_speed import encoder_rows
from bench.eval_speed import EVAL_CLASSES, EVAL_DATABASE, EVAL_QUERIES, MAP_RATIO_TARGET, evaluation_rows

SECTIONS = ("training", "evaluation", "encoders", "index")
MODELS = {model: DEEP_CONFIGS[model] for model in ("tbh", "tbhvae")}
MATMUL_SHAPE = (400, 1280, 1024)  # [m, k] x [k, n]
TRAIN_BITS, TRAIN_BATCH = 32, 400
SYNTHETIC_ROWS = (50_000, 10_000, 1280)  # train rows, test rows, dim when no feature file is found


def split_cpu(count: int = 2) -> None:
    """Makes `count` logical CPU devices; must run before any TensorFlow op."""
    try:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as err:
        raise BenchError(f"cannot split the CPU into {count} logical devices ({err}); "
                         f"run bench.speed as its own process") from None


# ------------------------------------------------------------------ roofline
def matmul_flops_per_second(rounds: int = 5, repeats: int = 30, dtype: str = "float32") -> dict:
    """[400, 1280] x [1280, 1024] in `dtype` on the first CPU device: best and median GFLOP/s over rounds."""
    m, k, n = MATMUL_SHAPE
    with tf.device("/cpu:0"):
        a = tf.cast(tf.random.stateless_normal([m, k], seed=[1, 2]), dtype)
        b = tf.cast(tf.random.stateless_normal([k, n], seed=[3, 4]), dtype)
        product = tf.function(tf.matmul)
        product(a, b).numpy()  # trace and warm up
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                out = product(a, b)
            out.numpy()
            seconds.append((time.perf_counter() - start) / repeats)
    flops = 2.0 * m * k * n
    return {"best_gflops": flops / min(seconds) / 1e9, "median_gflops": flops / statistics.median(seconds) / 1e9}


def training_flops_per_example(config, input_dim: int, replica_batch: int) -> float:
    """The model's own count (TwinBottleneckHashing.training_flops_per_example) for `config`."""
    from tbhvae.models import TwinBottleneckHashing

    model = TwinBottleneckHashing(config, input_dim, dataset_size=config.batch_size)
    model.build_all()
    return model.training_flops_per_example(replica_batch)


# ------------------------------------------------------------------ training
def load_feature_set(path: str | None):
    """The feature file, or (no --features and no shared file) random non-negative features."""
    from tbhvae.data import load_features

    if path is not None or DEFAULT_FEATURES.is_file():
        return load_features(path or DEFAULT_FEATURES), str(path or DEFAULT_FEATURES)
    return random_features(*SYNTHETIC_ROWS, classes=EVAL_CLASSES), "synthetic"


def _small_test_split(feature_set):
    """The same features with 10 test rows per class, so the final evaluation after each run is short."""
    from tbhvae.data import FeatureSet
    from tbhvae.protocol import per_class_queries

    rows = per_class_queries(feature_set.test_labels, 10)
    return FeatureSet(feature_set.train_features, feature_set.train_labels, feature_set.test_features[rows],
                      feature_set.test_labels[rows], feature_set.class_names)


def training_rows(feature_set, steps: int, workdir: Path, mirrored) -> tuple[list[dict], dict[str, Path]]:
    """Throughput of each model x replicas x XLA x precision; returns (rows, {model: 1-replica f32 run dir})."""
    import keras

    from tbhvae import train
    from tbhvae.config import load_config

    features = _small_test_split(feature_set)
    strategies = {1: tf.distribute.get_strategy(), 2: mirrored}
    rows, run_dirs = [], {}
    for model, config_file in MODELS.items():
        for replicas in (1, 2):
            for jit in ("true", "false"):
                float32_speed = None
                for precision, matmul_dtype in PRECISIONS.items():
                    config = load_config(REPO_ROOT / "configs" / config_file).replace(
                        bits=TRAIN_BITS, batch_size=TRAIN_BATCH, steps=steps, eval_every=0,
                        checkpoint_every=steps, jit_compile=jit, mixed_precision=precision,
                        final_eval_queries="q10k")
                    strategy = strategies[replicas]
                    row = {"model": model, "replicas": replicas, "xla": jit == "true", "precision": precision,
                           "xla_effective": train.use_xla(config, strategy), "steps": steps,
                           "batch": TRAIN_BATCH, "flops_per_example": training_flops_per_example(
                               config, feature_set.dim, TRAIN_BATCH // replicas)}
                    if row["xla"] and not row["xla_effective"]:
                        row["note"] = ("skipped: train.use_xla turns XLA off for several CPU replicas "
                                       "(the replicas share one XLA host); same as xla off")
                        rows.append(row)
                        continue
                    matmul = matmul_flops_per_second(dtype=matmul_dtype)
                    run_dir = workdir / f"{model}_r{replicas}_{'xla' if row['xla'] else 'noxla'}_{precision}"
                    with quiet_keras():
                        metrics = train.train(config, run_dir, strategy=strategy, fresh=True, feature_set=features)
                    bound = matmul["best_gflops"] * 1e9 / row["flops_per_example"]
                    speed = metrics["examples_per_second"]
                    row.update(examples_per_second=speed, steps_per_second=speed / TRAIN_BATCH,
                               matmul_dtype=matmul_dtype, matmul_best_gflops=matmul["best_gflops"],
                               roofline_examples_per_second=bound, roofline_fraction=speed / bound,
                               train_seconds=metrics["train_seconds"])
                    if float32_speed is None:
                        float32_speed = speed
                    else:
                        row["speedup_over_float32"] = speed / float32_speed
                    rows.append(row)
                    if replicas == 1 and not row["xla"] and precision == "float32":
                        run_dirs[model] = run_dir
                    progress(f"training {model}, {replicas} replica(s), XLA {row['xla']}, {precision}: "
                             f"{speed:.0f} examples/s = {row['roofline_fraction']:.0%} of the {matmul_dtype} "
                             f"roofline ({bound:.0f}/s at {matmul['best_gflops']:.0f} GFLOP/s)")
                    keras.backend.clear_session()
                    gc.collect()
    return rows, run_dirs


# ------------------------------------------------------------------ report
def _markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [("" if key not in row else fmt.format(row[key])) for key, fmt in columns]
        if "note" in row:
            cells[-1] = row["note"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(report: dict) -> None:
    print(f"float32 matmul {MATMUL_SHAPE}: {report['matmul_before']['best_gflops']:.0f} GFLOP/s before, "
          f"{report['matmul_after']['best_gflops']:.0f} after (best of rounds); bfloat16 "
          f"{report['matmul_bfloat16_before']['best_gflops']:.0f} before\n")
    if report.get("training"):
        print(_markdown(report["training"], [
            ("model", "{}"), ("replicas", "{}"), ("xla", "{}"), ("precision", "{}"),
            ("examples_per_second", "{:.0f}"), ("steps_per_second", "{:.2f}"), ("flops_per_example", "{:.3g}"),
            ("matmul_best_gflops", "{:.0f}"), ("roofline_examples_per_second", "{:.0f}"),
            ("roofline_fraction", "{:.1%}"), ("speedup_over_float32", "{:.2f}"), ("note", "{}")]) + "\n")
    if report.get("evaluation"):
        print(_markdown(report["evaluation"], [
            ("bits", "{}"), ("queries", "{}"), ("database", "{}"), ("map@1000_index_ties_seconds", "{:.2f}"),
            ("map@1000_seconds", "{:.2f}"), ("map@1000_ratio", "{:.2f}"), ("evaluate_codes_seconds", "{:.2f}"),
            ("evaluate_codes_seconds_before", "{:.2f}")]))
        print(f"seconds: best of {report['evaluation'][0]['repeats']} interleaved repetitions; "
              f"map@1000_ratio = tie-aware / index ties (target <= {MAP_RATIO_TARGET} at 64 bits); "
              f"evaluate_codes_seconds_before: the full-sort evaluate_codes, "
              f"bench/results/speed_deploy.json (another run, Intel host: compare on one machine only)\n")
    if report.get("encoders"):
        print(_markdown(report["encoders"], [
            ("encoder", "{}"), ("latency_ms", "{:.3f}"), ("rows_per_second", "{:.0f}"), ("note", "{}")]) + "\n")
    if report.get("index"):
        from bench.index_speed import print_table
        print_table(report["index"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default=None,
                        help=f"feature .npz for training and encoders (default {DEFAULT_FEATURES}, "
                             f"random features when absent)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of %(default)s")
    parser.add_argument("--steps", type=int, default=None, help="training steps per throughput run "
                        "(default 400; --quick: 100); the first, compiling execution is not timed")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 training steps, q1k-sized evaluation at 32 bits, float32 TFLite "
                             "only, index up to 10^5 codes")
    parser.add_argument("--eval_repeats", type=int, default=None,
                        help="interleaved repetitions per evaluation path, best kept (default 3; --quick: 2)")
    parser.add_argument("--json", default="bench_speed.json", help="output JSON (default: %(default)s)")
    parser.add_argument("--plots", default=None, help="directory for the index PNG (default: next to --json)")
    parser.add_argument("--workdir", default=None, help="run/export directory (default: a temporary one)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        raise BenchError(f"--sections: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(SECTIONS)}")
    args.steps = args.steps or (100 if args.quick else 400)
    if args.eval_repeats is None:
        args.eval_repeats = 2 if args.quick else 3
    if args.eval_repeats < 1:
        raise BenchError(f"--eval_repeats: need at least 1, got {args.eval_repeats}")
    if args.steps < 2:
        raise BenchError(f"--steps: need at least 2 (the first execution compiles), got {args.steps}")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict:
    report = {"machine": machine_description(), "quick": args.quick, "matmul_before": matmul_flops_per_second(),
              "matmul_bfloat16_before": matmul_flops_per_second(dtype="bfloat16")}
    progress(f"matmul {MATMUL_SHAPE}: {report['matmul_before']['best_gflops']:.0f} GFLOP/s")
    feature_set = source = None
    if {"training", "encoders"} & set(args.sections):
        feature_set, source = load_feature_set(args.features)
        report["features"] = source
    run_dirs = {}
    if "training" in args.sections:
        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        report["training"], run_dirs = training_rows(feature_set, args.steps, workdir / "training", mirrored)
    if "evaluation" in args.sections:
        queries = EVAL_QUERIES // 10 if args.quick else EVAL_QUERIES
        report["evaluation"] = evaluation_rows([32] if args.quick else [16, 32, 64], queries, EVAL_DATABASE,
                                               repeats=args.eval_repeats)
    if "encoders" in args.sections:
        run_dir = run_dirs.get("tbh")
        if run_dir is None:  # no training section: a short TBH run to export
            from tbhvae import train
            from tbhvae.config import load_config
            run_dir = workdir / "encoder_run"
            config = load_config(REPO_ROOT / "configs" / MODELS["tbh"]).replace(
                bits=TRAIN_BITS, steps=20, eval_every=0, checkpoint_every=20, log_every=10, steps_per_execution=10)
            with quiet_keras():
                train.train(config, run_dir, strategy=tf.distribute.get_strategy(), fresh=True,
                            feature_set=_small_test_split(feature_set))
        variants = ("float32",) if args.quick else ("float32", "float16", "dynamic", "int8")
        report["encoders"] = encoder_rows(run_dir, feature_set.test_features, workdir / "export", variants,
                                          latency_repeats=50 if args.quick else 500,
                                          throughput_rows=4096 if args.quick else 10_000)
    if "index" in args.sections:
        from bench.index_speed import bench_size
        sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
        report["index"] = []
        for n in sizes:
            report["index"].append(bench_size(n, bits=64, num_queries=1000, k=100,
                                              repeats=1 if args.quick else 3, seed=0))
            progress(f"index {n} codes: {report['index'][-1]['numpy_best_s']:.3f} s for 1000 queries")
    report["matmul_after"] = matmul_flops_per_second()
    return report


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    try:
        args = parse_args(argv)
        split_cpu(2)  # before anything (tbhvae imports included) can initialise TensorFlow
    except BenchError as err:
        raise SystemExit(f"bench.speed: {err}") from None
    from tbhvae.data import DataError
    from tbhvae.train import TrainingError

    try:
        if args.workdir:
            report = run(args, Path(args.workdir))
        else:
            with tempfile.TemporaryDirectory(prefix="tbhvae-speed-") as tmp:
                report = run(args, Path(tmp))
    except (DataError, TrainingError) as err:
        raise SystemExit(f"bench.speed: {err}") from None
    report["wall_seconds"] = time.perf_counter() - started
    report["command"] = command_line("speed", argv)
    print_report(report)
    out = write_json(args.json, report)
    written = [out]
    if report.get("index"):
        from bench.plots import plot_index_scaling
        written.append(plot_index_scaling(report["index"], Path(args.plots or out.parent) / f"{out.stem}_index.png"))
    progress(f"wrote {', '.join(map(str, written))} ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
