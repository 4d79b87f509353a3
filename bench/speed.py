"""Benchmark: training throughput against the matmul roofline, evaluation, encoders, index.

Sections (--sections, all by default):
  training    examples/s of TBH and TBH-VAE (32 bits, batch 400) with XLA on/off,
              on 1 replica and on 2 replicas (MirroredStrategy over 2 logical CPU
              devices), each as a fraction of the roofline bound
              matmul FLOP/s / model FLOP per example. The matmul is a float32
              [400, 1280] x [1280, 1024] product timed right before each run (and
              at the start and end of the benchmark); the model cost is counted
              analytically from the config (training_flops_per_example).
  evaluation  seconds of the q10k protocol (10,000 queries x 50,000 codes, 10
              classes) on random codes at 16/32/64 bits, in the same run: the old
              index-ties mAP@1000 (mean_average_precision_index_ties), the tie-aware
              mean_average_precision (top 1000) and evaluate_codes (full ranking,
              curves); best of --eval_repeats interleaved repetitions, with the
              ratio tie-aware / index-ties per code length.
  encoders    latency (batch 1, median ms) and throughput (rows/s) of a trained
              TBH encoder as Keras, SavedModel and TFLite (float32, float16,
              dynamic-range, int8) via tbhvae.serving.
  index       exact top-k search time vs database size (bench/index_speed.py).

  python bench/speed.py --json speed.json             # full run (~20 min on 2 cores)
  python bench/speed.py --quick --json speed_quick.json

The CPU is split into 2 logical devices before TensorFlow starts; 1-replica
runs use the first. Absolute figures move with machine load; the ratios to the
matmul measured in the same run are the comparable ones.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FEATURES = REPO_ROOT.parent / "shared" / "data" / "cifar10_effnetlite0.npz"
SECTIONS = ("training", "evaluation", "encoders", "index")
MODELS = {"tbh": "cifar10_tbh.py", "tbhvae": "cifar10_tbhvae.py"}
MATMUL_SHAPE = (400, 1280, 1024)  # [m, k] x [k, n]
TRAIN_BITS, TRAIN_BATCH = 32, 400
EVAL_QUERIES, EVAL_DATABASE, EVAL_CLASSES = 10_000, 50_000, 10
EVAL_TOP_K = 1000
# evaluate_codes (q10k, curves=True) before the tie-aware metric, when it sorted the whole
# database per query: bench/results/speed_deploy.json, recorded before commit 686e408.
EVALUATE_CODES_SECONDS_BEFORE = {16: 12.69, 32: 12.05, 64: 11.65}
MAP_RATIO_TARGET = 1.5  # issue 11: tie-aware mAP@1000 at 64 bits within 1.5x of the index-ties path
SYNTHETIC_ROWS = (50_000, 10_000, 1280)  # train, test, dim when no feature file is found


class BenchError(ValueError):
    """Bad flags or inputs; the message names the flag and the fix."""


def split_cpu(count: int = 2) -> None:
    """Makes `count` logical CPU devices; must run before any TensorFlow op."""
    try:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as err:
        raise BenchError(f"cannot split the CPU into {count} logical devices ({err}); "
                         f"run bench/speed.py as its own process") from None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ roofline
def matmul_flops_per_second(rounds: int = 5, repeats: int = 30) -> dict:
    """float32 [400, 1280] x [1280, 1024] on the first CPU device: best and median GFLOP/s over rounds."""
    m, k, n = MATMUL_SHAPE
    with tf.device("/cpu:0"):
        a = tf.random.stateless_normal([m, k], seed=[1, 2])
        b = tf.random.stateless_normal([k, n], seed=[3, 4])
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
    """FLOP of one training step per example: 3 (forward + backward ~ 2 x forward) x 2 x MACs.

    MACs per example: the dense layers (encoder, binary and continuous heads,
    graph-convolution projection, decoder, critics) plus the two batch-graph
    products, codes codes^T ([B, M] x [M, B]) and A z ([B, B] x [B, C]), which
    cost B (M + C) per example for a per-replica batch B.
    """
    d, h, m, c = input_dim, config.hidden_dim, config.bits, config.continuous_dim
    continuous_out = 2 * c if config.continuous_bottleneck == "geco_vae" else c
    dense = d * h + h * m + h * continuous_out + c * c + c * h + h * d
    critic = 0
    for width, present in ((m, config.binary_bottleneck == "adversarial"),
                           (c, config.continuous_bottleneck == "adversarial")):
        if present:  # applied to a real and a fake batch
            critic += 2 * ((width * config.discriminator_hidden + config.discriminator_hidden)
                           if config.discriminator == "mlp" else width)
    graph = replica_batch * (m + c)
    return 6.0 * (dense + critic + graph)


# ------------------------------------------------------------------ training
def load_feature_set(path: str | None):
    """The feature file, or (no --features and no shared file) random non-negative features."""
    from tbhvae.data import FeatureSet, load_features

    if path is not None or DEFAULT_FEATURES.is_file():
        return load_features(path or DEFAULT_FEATURES), str(path or DEFAULT_FEATURES)
    rng = np.random.default_rng(0)
    train, test, dim = SYNTHETIC_ROWS
    return FeatureSet(rng.random((train, dim), np.float32), rng.integers(0, EVAL_CLASSES, train),
                      rng.random((test, dim), np.float32), rng.integers(0, EVAL_CLASSES, test)), "synthetic"


def _small_test_split(feature_set):
    """The same features with 10 test rows per class, so the final evaluation after each run is short."""
    from tbhvae.data import FeatureSet, per_class_queries

    rows = per_class_queries(feature_set.test_labels, 10)
    return FeatureSet(feature_set.train_features, feature_set.train_labels, feature_set.test_features[rows],
                      feature_set.test_labels[rows], feature_set.class_names)


def training_rows(feature_set, steps: int, workdir: Path, mirrored) -> tuple[list[dict], dict[str, Path]]:
    """Throughput of each model x XLA x replicas; returns (rows, {model: 1-replica XLA run dir})."""
    import keras

    from table import quiet_keras  # bench/table.py (the script's directory)
    from tbhvae import training
    from tbhvae.config import load_config

    features = _small_test_split(feature_set)
    strategies = {1: tf.distribute.get_strategy(), 2: mirrored}
    rows, run_dirs = [], {}
    for model, config_file in MODELS.items():
        for replicas in (1, 2):
            for jit in (True, False):
                config = load_config(REPO_ROOT / "configs" / config_file).replace(
                    bits=TRAIN_BITS, batch_size=TRAIN_BATCH, steps=steps, eval_every=0, checkpoint_every=steps,
                    jit_compile=jit, final_eval_queries="q10k")
                strategy = strategies[replicas]
                row = {"model": model, "replicas": replicas, "xla": jit,
                       "xla_effective": training.use_xla(config, strategy), "steps": steps,
                       "batch": TRAIN_BATCH, "flops_per_example": training_flops_per_example(
                           config, feature_set.dim, TRAIN_BATCH // replicas)}
                if jit and not row["xla_effective"]:
                    row["note"] = ("skipped: training.use_xla turns XLA off for several CPU replicas "
                                   "(the replicas share one XLA host); same as xla off")
                    rows.append(row)
                    continue
                matmul = matmul_flops_per_second()
                run_dir = workdir / f"{model}_r{replicas}_{'xla' if jit else 'noxla'}"
                with quiet_keras():
                    metrics = training.train(config, run_dir, strategy=strategy, fresh=True, feature_set=features)
                bound = matmul["best_gflops"] * 1e9 / row["flops_per_example"]
                row.update(examples_per_second=metrics["examples_per_second"],
                           steps_per_second=metrics["examples_per_second"] / TRAIN_BATCH,
                           matmul_best_gflops=matmul["best_gflops"], roofline_examples_per_second=bound,
                           roofline_fraction=metrics["examples_per_second"] / bound,
                           train_seconds=metrics["train_seconds"])
                rows.append(row)
                if replicas == 1 and jit:
                    run_dirs[model] = run_dir
                _progress(f"training {model}, {replicas} replica(s), XLA {jit}: "
                          f"{row['examples_per_second']:.0f} examples/s = {row['roofline_fraction']:.0%} of "
                          f"the roofline ({bound:.0f}/s at {matmul['best_gflops']:.0f} GFLOP/s)")
                keras.backend.clear_session()
                gc.collect()
    return rows, run_dirs


# ------------------------------------------------------------------ evaluation
def evaluation_rows(bits_list: list[int], queries: int, database: int, repeats: int = 3) -> list[dict]:
    """Wall seconds of the old and new mAP@1000 and of evaluate_codes on random codes.

    Per code length, each repetition times, in this order, the index-ties
    protocol (`mean_average_precision_index_ties`), the tie-aware
    `mean_average_precision` and `evaluate_codes(curves=True)`, so machine load
    hits all three alike; a row holds the best of `repeats` and every sample.
    """
    from tbhvae.evaluation import evaluate_codes, mean_average_precision, mean_average_precision_index_ties

    paths = {
        "map@1000_index_ties": lambda *a: mean_average_precision_index_ties(*a, top_k=EVAL_TOP_K),
        "map@1000": lambda *a: mean_average_precision(*a, top_k=EVAL_TOP_K),
        "evaluate_codes": lambda *a: evaluate_codes(*a, top_k=EVAL_TOP_K, curves=True),
    }
    rng = np.random.default_rng(0)
    query_labels = rng.integers(0, EVAL_CLASSES, queries)
    db_labels = rng.integers(0, EVAL_CLASSES, database)
    rows = []
    for bits in bits_list:
        query_codes = rng.integers(0, 2, (queries, bits), dtype=np.uint8)
        db_codes = rng.integers(0, 2, (database, bits), dtype=np.uint8)
        args = (query_codes, db_codes, query_labels, db_labels)
        samples = {name: [] for name in paths}
        values = {}
        for _ in range(repeats):
            for name, path in paths.items():
                gc.collect()
                start = time.perf_counter()
                value = path(*args)
                samples[name].append(time.perf_counter() - start)
                values[name] = value if name != "evaluate_codes" else value[f"map@{EVAL_TOP_K}"]
        best = {name: min(times) for name, times in samples.items()}
        row = {"bits": bits, "queries": queries, "database": database, "classes": EVAL_CLASSES,
               "repeats": repeats,
               "map@1000_index_ties_seconds": best["map@1000_index_ties"],
               "map@1000_seconds": best["map@1000"],
               "map@1000_ratio": best["map@1000"] / best["map@1000_index_ties"],
               "evaluate_codes_seconds": best["evaluate_codes"],
               "samples_seconds": samples,
               "map@1000_index_ties": values["map@1000_index_ties"], "map@1000": values["map@1000"]}
        if queries == EVAL_QUERIES and database == EVAL_DATABASE and bits in EVALUATE_CODES_SECONDS_BEFORE:
            before = EVALUATE_CODES_SECONDS_BEFORE[bits]
            row["evaluate_codes_seconds_before"] = before
            row["evaluate_codes_ratio_to_before"] = best["evaluate_codes"] / before
        rows.append(row)
        _progress(f"evaluation {bits} bits, {queries} x {database}: mAP@1000 index ties "
                  f"{row['map@1000_index_ties_seconds']:.2f} s, tie-aware {row['map@1000_seconds']:.2f} s "
                  f"(x{row['map@1000_ratio']:.2f}), evaluate_codes {row['evaluate_codes_seconds']:.2f} s "
                  f"(best of {repeats})")
    return rows


# ------------------------------------------------------------------ encoders
def encoder_rows(run_dir: Path, features: np.ndarray, workdir: Path, variants: tuple[str, ...],
                 latency_repeats: int, throughput_rows: int) -> list[dict]:
    """Latency (batch 1) and throughput (batches of 4096) of each encoder form of a trained run."""
    try:
        from tbhvae import serving
    except ImportError as err:
        return [{"encoder": "all", "note": f"skipped: tbhvae.serving is not importable ({err})"}]

    run = serving.load_run(run_dir)
    encoders = {"keras": lambda: serving.KerasEncoder(run)}
    saved_dir = workdir / "saved_model"
    tflite_dir = workdir / "tflite"

    def saved_model():
        return serving.SavedModelEncoder(serving.export_saved_model(run, saved_dir, "encoder"))

    encoders["saved_model"] = saved_model
    for variant in variants:
        def lite(variant=variant):
            exported = serving.resolve_saved_model(saved_dir / "encoder")
            paths = serving.write_tflite_variants(exported, tflite_dir, serving.representative_rows(features, 200),
                                                  variants=(variant,))
            return serving.LiteEncoder(paths[variant])
        encoders[f"tflite_{variant}"] = lite

    rows = []
    sample = np.ascontiguousarray(features[:throughput_rows], dtype=np.float32)
    for name, make in encoders.items():
        try:
            encoder = make()
        except Exception as err:  # noqa: BLE001 - one failing export must not hide the others
            rows.append({"encoder": name, "note": f"skipped: {type(err).__name__}: {str(err).splitlines()[0]}"})
            _progress(f"encoder {name}: {rows[-1]['note']}")
            continue
        latency = serving.latency_ms(encoder, sample, batch_size=1, repeats=latency_repeats)
        encoder.encode(sample[:4096])  # warm-up at the throughput batch size
        start = time.perf_counter()
        encoder.encode(sample, batch_size=4096)
        rows.append({"encoder": name, "latency_ms": latency,
                     "rows_per_second": len(sample) / (time.perf_counter() - start), "rows": len(sample)})
        _progress(f"encoder {name}: {latency:.3f} ms at batch 1, {rows[-1]['rows_per_second']:.0f} rows/s")
    return rows


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
    print(f"matmul {MATMUL_SHAPE}: {report['matmul_before']['best_gflops']:.0f} GFLOP/s before, "
          f"{report['matmul_after']['best_gflops']:.0f} after (best of rounds)\n")
    if report.get("training"):
        print(_markdown(report["training"], [
            ("model", "{}"), ("replicas", "{}"), ("xla", "{}"), ("examples_per_second", "{:.0f}"),
            ("steps_per_second", "{:.2f}"), ("flops_per_example", "{:.3g}"), ("matmul_best_gflops", "{:.0f}"),
            ("roofline_examples_per_second", "{:.0f}"), ("roofline_fraction", "{:.1%}"), ("note", "{}")]) + "\n")
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
        from index_speed import print_table  # bench/index_speed.py (the script's directory)
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
    from table import machine_description  # bench/table.py (the script's directory)

    report = {"machine": machine_description(), "quick": args.quick, "matmul_before": matmul_flops_per_second()}
    _progress(f"matmul {MATMUL_SHAPE}: {report['matmul_before']['best_gflops']:.0f} GFLOP/s")
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
            from table import quiet_keras
            from tbhvae import training
            from tbhvae.config import load_config
            run_dir = workdir / "encoder_run"
            config = load_config(REPO_ROOT / "configs" / MODELS["tbh"]).replace(
                bits=TRAIN_BITS, steps=20, eval_every=0, checkpoint_every=20, log_every=10, steps_per_execution=10)
            with quiet_keras():
                training.train(config, run_dir, strategy=tf.distribute.get_strategy(), fresh=True,
                               feature_set=_small_test_split(feature_set))
        variants = ("float32",) if args.quick else ("float32", "float16", "dynamic", "int8")
        report["encoders"] = encoder_rows(run_dir, feature_set.test_features, workdir / "export", variants,
                                          latency_repeats=50 if args.quick else 500,
                                          throughput_rows=4096 if args.quick else 10_000)
    if "index" in args.sections:
        from index_speed import bench_size  # bench/index_speed.py
        sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
        report["index"] = []
        for n in sizes:
            report["index"].append(bench_size(n, bits=64, num_queries=1000, k=100,
                                              repeats=1 if args.quick else 3, seed=0))
            _progress(f"index {n} codes: {report['index'][-1]['numpy_best_s']:.3f} s for 1000 queries")
    report["matmul_after"] = matmul_flops_per_second()
    return report


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    try:
        args = parse_args(argv)
        split_cpu(2)  # before anything (tbhvae imports included) can initialise TensorFlow
    except BenchError as err:
        raise SystemExit(f"bench/speed.py: {err}") from None
    from tbhvae.data import DataError
    from tbhvae.training import TrainingError

    try:
        if args.workdir:
            report = run(args, Path(args.workdir))
        else:
            with tempfile.TemporaryDirectory(prefix="tbhvae-speed-") as tmp:
                report = run(args, Path(tmp))
    except (DataError, TrainingError) as err:
        raise SystemExit(f"bench/speed.py: {err}") from None
    report["wall_seconds"] = time.perf_counter() - started
    report["command"] = " ".join(["speed.py", *(argv if argv is not None else sys.argv[1:])])
    print_report(report)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    written = [out]
    if report.get("index"):
        from plots import plot_index_scaling  # bench/plots.py
        written.append(plot_index_scaling(report["index"], Path(args.plots or out.parent) / f"{out.stem}_index.png"))
    _progress(f"wrote {', '.join(map(str, written))} ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
