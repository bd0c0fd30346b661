"""The rules every lesson figure keeps (common/plots.py): one colour means one thing in every panel of a figure,
every axis labelled, legends outside the data. Checked on the figures themselves (captured before saving) for the
plots the new-user issue named: lesson 05's loss curves, lesson 07's bars, lesson 06's load-test plot."""
from __future__ import annotations

import importlib
import re

import pytest

import common.plots
from common import loadtest
from tests.test_loadtest import synthetic

L5 = importlib.import_module("05_lora")
L7 = importlib.import_module("07_structured_output")


@pytest.fixture()
def captured(monkeypatch, tmp_path):
    """Figures handed to save_figure (common.plots and lesson 05's own import), still open for inspection."""
    figs = []
    real = common.plots.save_figure

    def keep(fig, path, dpi=120):
        fig.canvas.draw()
        figs.append(fig)
        fig.savefig(path)
        return path
    monkeypatch.setattr(common.plots, "save_figure", keep)
    monkeypatch.setattr(L5, "save_figure", keep)
    yield figs
    import matplotlib.pyplot as plt
    for f in figs:
        plt.close(f)
    assert real is not None


def check_rules(fig) -> None:
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    colours: dict[str, set] = {}
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axis in {ax.get_title()!r}"
        for artist in [*ax.lines, *ax.containers]:
            label = artist.get_label()
            if label.startswith("_"):
                continue
            patch = artist.patches[0] if hasattr(artist, "patches") else artist
            colour = patch.get_facecolor() if hasattr(artist, "patches") else artist.get_color()
            key = re.sub(r": p\d+$", "", label)                 # p50 / p95 of one mode share its colour
            colours.setdefault(key, set()).add(tuple(__import__("matplotlib.colors").colors.to_rgba(colour)))
    assert all(len(c) == 1 for c in colours.values()), colours
    for ax in axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        for other in axes:
            assert not box.overlaps(other.get_window_extent(renderer)), "a legend sits on the data"


def test_load_test_plot(captured, tmp_path, capsys):
    loadtest.plot(synthetic([10.0, 19.0, 36.0, 40.0]), tmp_path / "serve_load.png")
    fig = captured[0]
    check_rules(fig)
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["1", "2", "4", "8"], labels         # the client counts, not 2×10⁰


def test_structured_output_plot(captured, tmp_path, capsys):
    res = {m: {"parse_rate": 1.0, "schema_valid_rate": 1.0, "field_accuracy": 0.4} for m in ("prompt_only", "constrained")}
    res["prompt_only"]["tasks"] = 1
    L7.plot({"support": res, "review": res}, tmp_path / "structured_output.png")
    fig = captured[0]
    check_rules(fig)
    assert [ax.get_title() for ax in fig.axes] == ["support (1 task)", "review (1 task)"]


def test_lora_loss_plot(captured, tmp_path):
    main_run = {"losses": [3.0, 2.5, 2.0, 1.8, 1.7, 1.6], "warmup_steps": 1}
    side = {k: {"losses": [3.0, 2.9, 2.8, 2.7, 2.6], "warmup_steps": 1} for k in ("lora", "full")}
    L5.plot_losses(main_run, side, tmp_path / "loss_curve.png")
    check_rules(captured[0])


def test_legend_outside_is_outside(captured, tmp_path):
    fig, ax = common.plots.new_figure()
    ax.plot([1, 2, 3], [3, 2, 1], label="a line that fills the whole plot")
    ax.set(xlabel="x", ylabel="y")
    common.plots.legend_outside(ax)
    common.plots.save_figure(fig, tmp_path / "x.png")
    check_rules(captured[0])
