"""Benchmark: where a training step's time goes, from the TensorFlow profiler.

One model is built as the trainer builds it (tbhvae.train.loop.build_model), its
train step runs --warmup times, is timed over --steps, and then traced over
--profile_steps with tf.profiler; the trace (XSpace) is converted by xprof (the
TensorBoard profile plugin, extra `tbhvae[profile]`) into per-op self times, here
grouped by kind:
  matmul     MatMul (oneDNN _Mkl* kernels) forward and backward, Dense layers and batch graph
  optimizer  Adam updates (ResourceApplyAdam and every op under the optimisers' scopes)
  cast       dtype casts (mixed precision)
  bias_grad  BiasAddGrad
  random     stateless random draws (thresholds, Gaussian samples, priors)
  other      element-wise and reduction ops of the losses, the graph, the activations
The trace itself is kept in --logdir (open it with `tensorboard --logdir`, Profile tab).

  python -m bench.step_profile --models tbh,tbhvae --precisions float32,mixed_bfloat16 --json OUT.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from bench.common import (
    DEEP_CONFIGS,
    PRECISIONS,
    REPO_ROOT,
    BenchError,
    command_line,
    progress,
    random_features,
    write_json,
)

MODELS = ("tbh", "tbhvae")
KINDS = ("matmul", "optimizer", "cast", "bias_grad", "random", "other")


def op_kind(op_type: str, op_name: str) -> str:
    """The KINDS entry of one profiled op (its type, and its name scope for the optimisers)."""
    if "MatMul" in op_type:
        return "matmul"
    if op_type.startswith("ResourceApply") or op_name.split("/")[0] in ("actor_adam", "critic_adam"):
        return "optimizer"
    if op_type == "Cast":
        return "cast"
    if op_type == "BiasAddGrad":
        return "bias_grad"
    if op_type.startswith("StatelessRandom"):
        return "random"
    return "other"


def op_self_times(xspace_path: str) -> list[dict]:
    """Per-op rows {type, name, self_us} of a profiler trace (idle time dropped)."""
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        raise BenchError("the step profile needs the TensorBoard profile plugin: "
                         "pip install 'tbhvae[profile]' (tensorboard-plugin-profile)") from None
    data, _ = raw_to_tool_data.xspace_to_tool_data([xspace_path], "framework_op_stats", {})
    table = json.loads(data)[0]
    columns = [column["id"] for column in table["cols"]]
    rows = [dict(zip(columns, (cell.get("v") for cell in row["c"]))) for row in table["rows"]]
    return [{"type": r["type"], "name": r["operation"], "self_us": r["total_self_time"]}
            for r in rows if r["type"] != "IDLE"]


def breakdown(ops: list[dict], top: int = 8) -> dict:
    """Fractions of the summed op self time by kind and the `top` op types."""
    total = sum(op["self_us"] for op in ops) or 1.0
    kinds, types = collections.Counter(), collections.Counter()
    for op in ops:
        kinds[op_kind(op["type"], op["name"])] += op["self_us"]
        types[op["type"]] += op["self_us"]
    return {"kinds": {kind: kinds[kind] / total for kind in KINDS},
            "top_op_types": {name: value / total for name, value in types.most_common(top)}}


@contextlib.contextmanager
def train_step_of(model: str, precision: str, feature_set, bits: int, batch: int):
    """(compiled train step, one batch) of `model` as the trainer builds it, under its precision policy."""
    import keras

    from tbhvae.config import load_config
    from tbhvae.train import distribute
    from tbhvae.train.loop import build_model

    config = load_config(REPO_ROOT / "configs" / DEEP_CONFIGS[model]).replace(
        bits=bits, batch_size=batch, mixed_precision=precision)
    with distribute.precision_policy(precision):
        net, _, _ = build_model(config, feature_set, tf.distribute.get_strategy())
        try:
            yield net, tf.function(net.train_step), tf.constant(feature_set.train_features[:batch])
        finally:
            keras.backend.clear_session()


def seconds_per_step(step, batch_features, warmup: int, steps: int) -> float:
    """Mean wall seconds of `step` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        float(step(batch_features)["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        out = step(batch_features)
    float(out["loss"])  # waits for the last step
    return (time.perf_counter() - start) / steps


def profile_step(model: str, precision: str, feature_set, logdir: Path, bits: int = 32, batch: int = 400,
                 warmup: int = 20, steps: int = 50, profile_steps: int = 20) -> dict:
    """Steps/s of one model's train step (outside fit) and its profiled time breakdown."""
    trace_dir = logdir / f"{model}_{precision}"
    with train_step_of(model, precision, feature_set, bits, batch) as (_, step, batch_features):
        seconds = seconds_per_step(step, batch_features, warmup, steps)
        tf.profiler.experimental.start(str(trace_dir))
        seconds_per_step(step, batch_features, 0, profile_steps)
        tf.profiler.experimental.stop()
    xspace = sorted(trace_dir.rglob("*.xplane.pb"))[-1]
    return {"model": model, "precision": precision, "bits": bits, "batch": batch,
            "step_ms": seconds * 1e3, "examples_per_second": batch / seconds, "trace": str(xspace),
            **breakdown(op_self_times(str(xspace)))}


def print_table(rows: list[dict]) -> None:
    print("| model | precision | step (ms) | " + " | ".join(KINDS) + " | largest op types |")
    print("|" + " --- |" * (4 + len(KINDS)))
    for row in rows:
        top = ", ".join(f"{name} {share:.0%}" for name, share in list(row["top_op_types"].items())[:4])
        print(f"| {row['model']} | {row['precision']} | {row['step_ms']:.1f} | "
              + " | ".join(f"{row['kinds'][kind]:.0%}" for kind in KINDS) + f" | {top} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--features", default=None, help="feature .npz (default: random 20,000 x 1280)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (default %(default)s)")
    parser.add_argument("--profile_steps", type=int, default=20, help="traced steps (default %(default)s)")
    parser.add_argument("--logdir", default=None, help="where the traces stay (default: a temporary directory)")
    parser.add_argument("--json", default="step_profile.json")
    args = parser.parse_args(argv)
    models, precisions = args.models.split(","), args.precisions.split(",")
    bad = [m for m in models if m not in MODELS] + [p for p in precisions if p not in PRECISIONS]
    if bad or args.steps < 1 or args.profile_steps < 1:
        raise SystemExit(f"bench.step_profile: unknown {', '.join(bad)}" if bad
                         else "bench.step_profile: --steps and --profile_steps must be >= 1")
    if args.features:
        from tbhvae.data import load_features
        feature_set = load_features(args.features)
    else:
        feature_set = random_features(20_000, 100, 1280)
    with tempfile.TemporaryDirectory(prefix="tbhvae-profile-") as tmp:
        logdir = Path(args.logdir or tmp)
        rows = []
        for model in models:
            for precision in precisions:
                try:
                    rows.append(profile_step(model, precision, feature_set, logdir, steps=args.steps,
                                             profile_steps=args.profile_steps))
                except BenchError as err:
                    raise SystemExit(f"bench.step_profile: {err}") from None
                if not args.logdir:  # the traces go with the temporary directory
                    rows[-1].pop("trace")
                progress(f"{model} {precision}: {rows[-1]['step_ms']:.1f} ms/step")
    print_table(rows)
    write_json(args.json, {"rows": rows, "command": command_line("step_profile", argv)})
    return rows


if __name__ == "__main__":
    main()
