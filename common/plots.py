"""Plots for the lessons: matplotlib, headless (Agg), PNG. One place for the boilerplate.

    fig, ax = new_figure()
    ax.plot(...)
    path = save_figure(fig, out_dir / "loss.png")     # returns the path; the lesson prints it
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


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save as PNG (folder created), close the figure, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
