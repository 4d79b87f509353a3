"""Benchmark figures (matplotlib, Agg backend): retrieval curves of many methods (drawn by tbhvae.plots) and
index scaling.

Every function writes one PNG and returns its path; none needs a display.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tbhvae.plots import draw_pr_curves, draw_precision_at_n  # noqa: E402

DPI = 120


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _line_style(method: str, deep_methods: tuple[str, ...]) -> dict:
    """Solid lines with markers for the deep methods, dashed for the classic baselines."""
    return {"linestyle": "-", "marker": "o", "markersize": 3} if method in deep_methods \
        else {"linestyle": "--", "marker": None}


def plot_pr_curves(curves: dict, bits: int, path: str | Path, deep_methods: tuple[str, ...] = ()) -> Path:
    """Precision vs recall by Hamming radius of every method (tbhvae.plots.draw_pr_curves) as a PNG."""
    fig, axis = plt.subplots(figsize=(6, 4.5))
    draw_pr_curves(axis, curves, {m: _line_style(m, deep_methods) for m in curves},
                   title=f"Precision-recall by Hamming radius, {bits} bits")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_precision_at_n(curves: dict, bits: int, path: str | Path, deep_methods: tuple[str, ...] = ()) -> Path:
    """Precision of the top N against N of every method (tbhvae.plots.draw_precision_at_n) as a PNG."""
    fig, axis = plt.subplots(figsize=(6, 4.5))
    draw_precision_at_n(axis, curves, {m: _line_style(m, deep_methods) for m in curves},
                        title=f"Precision of the top N, {bits} bits")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_index_scaling(rows: list[dict], path: str | Path) -> Path:
    """Query-batch time (best of repeats, s) against database size, per backend.

    rows: dicts from bench.index_speed.bench_size ("n", "numpy_best_s", and
    "ours_faiss_best_s" / "faiss_raw_best_s" when faiss ran).
    """
    fig, axis = plt.subplots(figsize=(6, 4.5))
    sizes = [row["n"] for row in rows]
    for key, label in (("numpy_best_s", "HammingIndex numpy"), ("ours_faiss_best_s", "HammingIndex faiss"),
                       ("faiss_raw_best_s", "faiss IndexBinaryFlat")):
        if all(key in row for row in rows):
            axis.plot(sizes, [row[key] for row in rows], marker="o", label=label)
    first = rows[0]
    axis.set(xlabel="database size (codes)", ylabel="seconds per query batch", xscale="log", yscale="log",
             title=f"Exact top-{first['k']} search, {first['queries']} queries, {first['bits']} bits")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    return _save(fig, path)


def plot_steps_curve(result: dict, path: str | Path) -> Path:
    """mAP@1000 against training steps (log axis), one line per code length, ITQ dashed in its colour.

    result: bench.curve's output, {"method", "queries", "itq": {bits: map},
    "runs": {bits: [{"steps", "map@1000", ...}, ...]}}.
    """
    fig, axis = plt.subplots(figsize=(6, 4.5))
    for index, (bits, points) in enumerate(result["runs"].items()):
        colour = f"C{index}"
        axis.plot([p["steps"] for p in points], [p["map@1000"] for p in points], marker="o", color=colour,
                  label=f"{result['method']} {bits} bits")
        if bits in result["itq"]:
            axis.axhline(result["itq"][bits], color=colour, linestyle="--", linewidth=1, label=f"ITQ {bits} bits")
    axis.set(xlabel="training steps (batch 400)", ylabel="mAP@1000", xscale="log",
             title=f"{result['method']}: mAP@1000 ({result['queries']}) against training steps")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_cost_curves(report: dict, path: str | Path) -> Path:
    """Examples/s (top) and peak memory (bottom) against batch, bits and input dimension, one line per
    model x precision; and mAP@1000 seconds against database size (bench.cost_curves)."""
    sweeps = ("batch", "bits", "dim")
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    training = report["training"]
    lines = sorted({(r["model"], r["precision"]) for r in training})
    for column, sweep in enumerate(sweeps):
        for model, precision in lines:
            rows = sorted((r for r in training if r["sweep"] == sweep and r["model"] == model
                           and r["precision"] == precision), key=lambda r: r[sweep])
            style = {"linestyle": "-" if precision == "float32" else "--", "marker": "o", "markersize": 3}
            label = f"{model} {precision.replace('mixed_', '')}"
            axes[0, column].plot([r[sweep] for r in rows], [r["examples_per_second"] for r in rows],
                                 label=label, **style)
            axes[1, column].plot([r[sweep] for r in rows], [r["peak_mb"] for r in rows], label=label, **style)
        for row, ylabel in ((0, "examples/s"), (1, "peak memory (MB)")):
            axes[row, column].set_xscale("log", base=2)
            axes[row, column].set_xlabel(sweep)
            axes[row, column].set_ylabel(ylabel)
            axes[row, column].grid(alpha=0.3, which="both")
        axes[0, column].set_title(f"training vs {sweep}")
    axes[0, 0].legend(fontsize=8)
    evaluation = report.get("evaluation") or []
    if evaluation:
        axes[0, 3].loglog([r["database"] for r in evaluation], [r["seconds"] for r in evaluation], marker="o")
        axes[0, 3].set_xlabel("database codes")
        axes[0, 3].set_ylabel("seconds")
        axes[0, 3].set_title(f"mAP@1000, {evaluation[0]['queries']} queries")
        axes[0, 3].grid(alpha=0.3, which="both")
    else:
        axes[0, 3].axis("off")
    axes[1, 3].axis("off")
    return _save(fig, path)
