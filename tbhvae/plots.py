"""Retrieval-curve figures: precision-recall by Hamming radius and precision of the top N.

The one home for drawing them: the trainer renders one run's curves for
TensorBoard (`curves_image`), bench.plots draws many methods into PNGs with the
same `draw_*` functions. Figures are built on matplotlib's Agg canvas directly,
so importing this module changes no global matplotlib state.
"""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(columns: int = 1, size=(6, 4.5), dpi: int = 100):
    """(figure, axes) on an Agg canvas; `axes` is one axis for columns=1, else a list."""
    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns)
    return figure, axes


def draw_pr_curves(axis, curves: dict, styles: dict | None = None, title: str = "PR by Hamming radius") -> None:
    """Precision against recall of retrieving everything within radius r = 0..M.

    curves: {label: {"precision": [M + 1], "recall": [M + 1]}}; styles: {label: plot kwargs}.
    """
    for label, curve in curves.items():
        axis.plot(curve["recall"], curve["precision"], label=label, **(styles or {}).get(label, {"marker": "."}))
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1), title=title)


def draw_precision_at_n(axis, curves: dict, styles: dict | None = None,
                        title: str = "precision of the top N") -> None:
    """Precision of the top N of the Hamming ranking against N (log axis).

    curves: {label: {N: precision}} (N as int or str); styles: {label: plot kwargs}.
    """
    for label, at_n in curves.items():
        points = sorted((int(n), p) for n, p in at_n.items())
        axis.plot([n for n, _ in points], [p for _, p in points], label=label,
                  **(styles or {}).get(label, {"marker": "."}))
    axis.set(xlabel="N (retrieved items)", ylabel="precision@N", xscale="log", ylim=(0, 1), title=title)


def curves_image(metrics: dict, title: str) -> np.ndarray:
    """One run's PR-by-radius and precision@N curves side by side: RGBA uint8 [1, H, W, 4]."""
    figure, (left, right) = new_figure(2, size=(9, 3.6))
    draw_pr_curves(left, {"": metrics["pr_curve"]})
    draw_precision_at_n(right, {"": metrics["precision_at_n"]})
    figure.suptitle(title)
    figure.tight_layout()
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[None].copy()
