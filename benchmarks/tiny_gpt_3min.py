"""Benchmark for lesson 04: best validation loss reachable in a fixed training-time budget on CPU.

Runs, one after the other (never in parallel, they would share the cores), with the same data split,
the same time budget and the same final evaluation (mean loss over the WHOLE validation set, cut into
non-overlapping windows of each model's own context length):

  speedrun  04_tiny_gpt.py --preset speedrun              (today's recipe: RMSNorm, RoPE, QK-norm, ReLU², Muon)
  ours      04_tiny_gpt.py --preset medium                (the lesson's GPT-2-block 3-minute recipe)
  baseline  nanoGPT "baby GPT" recipe: 4 layers, 4 heads, 128 dims, block 64, batch 12, lr 1e-3,
            warmup 100, cosine to 1e-4, AdamW(beta2=0.99, wd=0.1), grad clip 1, no dropout

Both go through 04_tiny_gpt.py (subprocess + results.json), so the difference shown is the recipe;
all get the implementation choices of the script (fused SDPA attention, tensor-indexed batches,
flush-denormal). The learning-rate schedule of each decays over the time budget.
Training time excludes the periodic evaluations/samples (same rule for all).

Usage:  python benchmarks/tiny_gpt_3min.py [--minutes 3] [--threads 2] [--only speedrun|ours|baseline] [--parallel]
The per-change breakdown (each modern change alone and cumulatively) is benchmarks/tiny_gpt_ablation.py.
Timings are wall-clock: close other programs; repeat to see the noise. On a machine that is busy with
other work, --parallel runs the recipes at the same time with 1 thread each, so both see the same load.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import output_dir  # noqa: E402

SCRIPT = REPO / "04_tiny_gpt.py"
RECIPES = {
    "speedrun": ["--preset", "speedrun"],
    "ours": ["--preset", "medium"],
    "baseline": ["--preset", "small", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64",
                 "--batch-size", "12", "--lr", "1e-3", "--warmup-iters", "100", "--min-lr-ratio", "0.1",
                 "--beta2", "0.99", "--weight-decay", "0.1", "--dropout", "0", "--grad-accum", "1",
                 "--autocast", "off"],
}


def start_recipe(name: str, minutes: float, threads: int | None, out: Path, extra: list[str]):
    d = out / name / RECIPES[name][1]       # the lesson writes each preset to <out-dir>/<preset>/
    cmd = [sys.executable, str(SCRIPT), *RECIPES[name], "--time-budget", str(minutes), "--final-eval", "full",
           "--out-dir", str(out / name), "--overwrite", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
    log = open(out / f"{name}.log", "w", encoding="utf-8")
    return name, d, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log, time.time()


def finish_recipe(job) -> dict:
    name, d, proc, log, t0 = job
    rc = proc.wait()
    wall = time.time() - t0
    log.close()
    log_path = d.parent.parent / f"{name}.log"
    text = log_path.read_text(encoding="utf-8").replace("\r", "\n")
    print(f"--- {name} (last lines of {log_path})")
    print("\n".join([line for line in text.strip().splitlines() if "it/s" not in line][-8:]))
    if rc != 0:
        raise UserError(f"{name} 运行失败（退出码 {rc}）；看 {log_path}")
    res = json.loads((d / "results.json").read_text(encoding="utf-8"))
    res["process_wall_s"] = round(wall, 1)
    return res


def main():
    p = argparse.ArgumentParser(description="第 04 课基准：固定训练时间内能达到的最低验证 loss")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=list(RECIPES), default=None)
    p.add_argument("--data", type=str, default=None, help="默认：莎士比亚全集（与第 04 课相同的划分）")
    p.add_argument("--parallel", action="store_true", help="所有配方同时跑、各 1 个线程（机器很忙时更公平）")
    a = p.parse_args()
    if a.minutes <= 0:
        p.error("--minutes 必须 > 0")
    out = output_dir("04_tiny_gpt") / "benchmark"
    extra = ["--data", a.data] if a.data else []
    names = [a.only] if a.only else list(RECIPES)
    out.mkdir(parents=True, exist_ok=True)
    if a.parallel:
        jobs = [start_recipe(n, a.minutes, 1, out, extra) for n in names]
        results = {job[0]: finish_recipe(job) for job in jobs}
    else:
        results = {n: finish_recipe(start_recipe(n, a.minutes, a.threads, out, extra)) for n in names}

    def row(n, r):
        cfg = r["model_config"]
        full = r["final_val_loss_full"] or {}
        own = full.get(str(cfg["block_size"]), float("nan"))
        return (f"{n:<9s} {cfg['n_layer']}L/{cfg['n_head']}H/{cfg['n_embd']:<4d} T={cfg['block_size']:<4d} "
                f"B={r['train_args']['batch_size']:<3d} {r['n_params']:>9,d} {r['iters']:>6d} {r['tokens_seen']:>11,d} "
                f"{r['tokens_per_s']:>9,.0f} {r['train_time_s']:>7.1f} {r['final_val_loss']:>9.4f} {own:>9.4f}")
    print(f"\n训练时间预算 {a.minutes} 分钟，线程 {results[names[0]]['threads']}{'，所有配方同时跑' if a.parallel else ''}；"
          "val_fixed = 固定的几个验证 batch，val_full = 整个验证集的平均交叉熵")
    print(f"{'recipe':<9s} {'model':<26s} {'params':>9s} {'iters':>6s} {'tokens':>11s} {'tok/s':>9s} "
          f"{'train_s':>7s} {'val_fixed':>9s} {'val_full':>9s}")
    for n, r in results.items():
        print(row(n, r))
    summary = {n: {k: r[k] for k in ["model_config", "n_params", "iters", "tokens_seen", "tokens_per_s", "train_time_s",
                                      "process_wall_s", "final_val_loss", "final_val_loss_full", "threads"]}
               | {"args": RECIPES[n]} for n, r in results.items()}
    summary["minutes"] = a.minutes
    summary["parallel"] = a.parallel
    path = out / "benchmark_3min.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"结果：{path}")


if __name__ == "__main__":
    run_cli(main)
