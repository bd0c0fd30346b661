"""Plots for the lessons: matplotlib, headless (Agg), PNG. One place for the boilerplate.

    fig, ax = new_figure()
    ax.plot(...)
    path = save_figure(fig, out_dir / "loss.png")     # returns the path; the lesson prints it

Rules every lesson's figure keeps: one colour means one thing in every panel of a figure (a shared legend,
legend_outside on the last panel); every axis labelled; legends outside the data.
"""
from __future__ import annotations

from pathlib import Path


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] | None = None):
    """A figure and its axes (an array of axes when ncols * nrows > 1)."""
    import matplotlib

    matplotlib.use("Agg")  # no window: works on servers, in CI and over SSH
    import matplotlib.pyplot as plt

    size = size or (6.4 * ncols, 4.2 * nrows)
    return plt.subplots(nrows, ncols, figsize=size)


def legend_outside(ax, **kw):
    """The legend to the right of the axes, never over the data (tight_layout in save_figure makes room).
    With several panels that share colours, call it once, on the last panel: one legend for the figure."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, **kw)


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save as PNG (folder created), close the figure, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
