"""Lesson 10's plumbing (10_quantize.py): its two plots, the speculative-decoding table, finding or training
the lesson-04 checkpoint that step 3 quantizes, the evaluation data (lesson 04's validation windows, lesson 03's
English documents) and merging results.json across local models. The measurements themselves and what they
mean stay in the lesson; the quantizers are in common/quant.py, speculative decoding in common/speculative.py.
"""
from __future__ import annotations

import atexit
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.errors import UserError
from common.outputs import output_root
from common.plots import new_figure, save_figure

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- plots and tables
def plot_outliers(row: dict, act: dict, out_dir: Path) -> Path:
    """Left: one weight row with its outlier over the per-tensor int4 grid; right: max |x| per input channel."""
    fig, (a, b) = new_figure(ncols=2, size=(12, 4))
    v = np.array(row["row_values"])
    a.plot(v, ".", ms=3, label=f"row {row['row']} of the down_proj weight")
    step = row["tensor_step"]
    for lvl in range(-7, 8):
        a.axhline(lvl * step, color="r", lw=0.4, alpha=0.6)
    a.set(title="one weight row with its outlier; red lines = per-tensor int4 grid", xlabel="input channel", ylabel="w")
    a.legend(loc="lower right")
    amax = np.asarray(act["channel_amax"])
    b.stairs(amax, np.arange(len(amax) + 1) - 0.5, fill=True)     # = a bar per channel, drawn as one shape (fast)
    b.set(yscale="log", title=f"layer {act['layer']} down_proj input: max |x| per channel",
          xlabel="channel", ylabel="max |activation|")
    return save_figure(fig, out_dir / "outliers.png")


def plot_speculative(table: dict, ks: list[int], name: str, out_dir: Path) -> Path:
    fig, ax = new_figure(size=(7, 4))
    ax.plot(ks, [table[f"k={k}"]["speedup"] for k in ks], "o-", label="speedup vs fp32 alone")
    ax.plot(ks, [table[f"k={k}"]["acceptance"] for k in ks], "s--", label="acceptance rate")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set(xlabel="k (draft tokens per round)", title=f"{name}: int8 draft, fp32 target (greedy)")
    ax.legend()
    return save_figure(fig, out_dir / f"speculative_{name}.png")


def print_spec_table(rows: dict) -> None:
    """rows: draft name -> common.speculative.summarize_runs(...)."""
    print(f"{'草稿':<22} | 接受率 | 每次目标前向产出 | 草稿耗时占比 | 加速比 | 比课程默认 fp32 | 和目标单独生成相同")
    for name, s in rows.items():
        print(f"{name:<22} | {s['acceptance']:5.0%} | {s['tokens_per_target_call']:13.2f} 个 | {s['draft_share']:11.0%} | "
              f"{s['speedup']:5.2f}× | {s['speedup_vs_plain_fp32']:13.2f}× | {s['identical']}")


# ---------------------------------------------------------------------------- lesson 04's model and data
def start_checkpoint(checkpoint: Path | None, out_dir: Path, iters: int, seed: int) -> Callable[[], Path]:
    """The lesson-04 checkpoint: `checkpoint`, else the best one under outputs/04_tiny_gpt/, else one trained by
    lesson 04's own script for `iters` steps (kept in out_dir/tiny_gpt/ for the next run). Returns wait() -> Path.
    Training starts now, in a background process, so that its start (imports, data: one core) overlaps the
    lesson loading its models; the lesson waits before step 1, so no step shares the CPU with it. A lesson that
    stops before waiting kills it."""
    if checkpoint:
        return lambda: checkpoint
    for found in [output_root() / "04_tiny_gpt" / p / "ckpt_best.pt" for p in ("speedrun", "medium", "small", "quick")]:
        if found.is_file():
            return lambda: found
    own = out_dir / "tiny_gpt" / "quick" / "ckpt_best.pt"
    if own.is_file():
        return lambda: own
    cmd = [sys.executable, str(REPO / "04_tiny_gpt.py"), "--quick", "--max-iters", str(iters),
           "--seed", str(seed), "--out-dir", str(own.parent.parent), "--threads", str(torch.get_num_threads()),
           "--overwrite"]                                # our own folder: a run killed half-way left no ckpt_best.pt
    print(f"没有找到第 04 课的检查点：第 3 步要用的小 GPT 先用第 04 课的脚本在后台训练（{iters} 步，约十几秒）：\n  "
          f"python 04_tiny_gpt.py {' '.join(cmd[2:])}")
    own.parent.mkdir(parents=True, exist_ok=True)
    log = own.parent.parent / "train.log"
    with open(log, "w", encoding="utf-8") as fh:         # a file, not a pipe: nobody reads it while it trains
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    atexit.register(lambda: proc.poll() is None and proc.kill())

    def wait() -> Path:
        if proc.wait() != 0 or not own.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace").strip()[-200:]
            raise UserError(f"训练第 04 课的小 GPT 失败（退出码 {proc.returncode}）：{tail}；"
                            "可以先运行 python 04_tiny_gpt.py --quick，再用 --checkpoint 指定检查点")
        return own
    return wait


def gpt_windows(ck: dict, n: int) -> torch.Tensor:
    """Lesson 04's validation set (the last 10% of the same text), n evenly spaced non-overlapping windows:
    [n, block_size + 1]."""
    from common.training import load_text, text_fingerprint, tokenizer_from_state
    data = ck["train_args"].get("data")
    text, _ = load_text(Path(data) if data else None)
    if text_fingerprint(text) != ck["data_sha1"]:
        raise UserError(f"检查点是在另一份数据上训练的（{data or '莎士比亚'} 已经变了），算不出它的验证 loss")
    ids = tokenizer_from_state(ck["tokenizer"]).encode_corpus(text)
    val = ids[-(len(ids) // 10):]
    T = ck["model_config"]["block_size"] + 1
    starts = torch.linspace(0, len(val) - T, min(n, len(val) // T)).long()
    return torch.stack([val[s:s + T] for s in starts])


def held_out_ids(tokenizer, n: int) -> list[int]:
    """Held-out text for the local model: lesson 03's English documents (not its training data, not its chat
    format), the first n tokens."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "data" / "rag" / "en").glob("*.md")))
    return tokenizer.encode(text)[:n]


# ---------------------------------------------------------------------------- results.json
def merged(path: Path, results: dict, key: str) -> dict:
    """results.json keeps ppl / speculative per model: a rerun with another --local-model does not wipe the
    other model's numbers."""
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get(key, {})
    except (OSError, ValueError, AttributeError):
        old = {}
    return {**old, **results.get(key, {})}
