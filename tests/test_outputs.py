"""common/outputs.save_results: one folder holds one run's results and plots; a partial run never replaces a
finished one; a results.json merged from several --part runs records each part's arguments."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.outputs import partial_path, save_results


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_run_without_the_plot_removes_the_stale_plot(tmp_path, capsys):
    png = tmp_path / "retrieval.png"
    png.write_bytes(b"old plot")
    save_results(tmp_path, {"a": 1}, files=[png], may_write=["retrieval.png"])
    assert png.is_file() and read(tmp_path / "results.json")["files"] == ["retrieval.png"]
    save_results(tmp_path, {"a": 2}, may_write=["retrieval.png"])   # this run made no plot
    assert not png.exists()
    assert "files" not in read(tmp_path / "results.json")
    assert "retrieval.png" in capsys.readouterr().out


def test_files_listed_by_the_previous_run_are_removed_when_not_written_again(tmp_path):
    old = tmp_path / "time_per_token_int8.png"
    old.write_bytes(b"x")
    save_results(tmp_path, {"a": 1}, files=[old])
    new = tmp_path / "time_per_token_fp32.png"
    new.write_bytes(b"y")
    save_results(tmp_path, {"a": 2}, files=[new])
    assert not old.exists() and new.is_file()
    assert read(tmp_path / "results.json")["files"] == ["time_per_token_fp32.png"]


def test_a_partial_run_never_replaces_a_finished_one(tmp_path):
    png = tmp_path / "loss_curve.png"
    png.write_bytes(b"finished plot")
    save_results(tmp_path, {"steps": 80}, files=[png], may_write=["loss_curve.png"])
    path = save_results(tmp_path, {"steps": 3}, partial=True, may_write=["loss_curve.png"])
    assert path.name == "results.partial.json" and read(path) == {"steps": 3, "partial": True}
    assert read(tmp_path / "results.json")["steps"] == 80 and png.read_bytes() == b"finished plot"
    assert partial_path(png).name == "loss_curve.partial.png"
    # the next finished run replaces results.json and clears the partial file
    partial_path(png).write_bytes(b"partial plot")
    save_results(tmp_path, {"steps": 80}, files=[png], may_write=["loss_curve.png"])
    assert not (tmp_path / "results.partial.json").exists() and "partial" not in read(tmp_path / "results.json")
    assert not (tmp_path / "loss_curve.partial.png").exists() and png.is_file()


def test_a_partial_run_in_an_empty_folder_says_so(tmp_path):
    path = save_results(tmp_path, {"steps": 3}, partial=True)
    assert path.name == "results.json" and read(path)["partial"] is True
    assert partial_path(path) == path          # a partial results.json may be replaced by the next run
    assert partial_path(tmp_path / "none.png") == tmp_path / "none.png"


def test_merged_parts_each_record_their_own_arguments(tmp_path):
    save_results(tmp_path, {"streaming": {"n": 1}}, merge=True,
                 run_args=argparse.Namespace(prompt="Hi", out_dir=tmp_path, parts=["stream"]))
    save_results(tmp_path, {"tokens": {"n": 2}}, merge=True, run_args={"prompt": "你好", "parts": ["tokens"]})
    r = read(tmp_path / "results.json")
    assert r["streaming"]["run_args"] == {"prompt": "Hi", "out_dir": str(tmp_path), "parts": ["stream"]}
    assert r["tokens"]["run_args"] == {"prompt": "你好", "parts": ["tokens"]}
    assert r["streaming"]["n"] == 1 and r["tokens"]["n"] == 2


def test_merge_keeps_the_other_parts_files(tmp_path):
    (tmp_path / "attention.png").write_bytes(b"x")
    save_results(tmp_path, {"attention": {}}, merge=True, files=["attention.png"])
    save_results(tmp_path, {"tokens": {}}, merge=True)
    assert (tmp_path / "attention.png").is_file()
    assert read(tmp_path / "results.json")["files"] == ["attention.png"]
