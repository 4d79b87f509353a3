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
