"""Benchmark for lesson 04, "from GPT-2 to today": what each modern change buys in a fixed CPU time budget.

Runs each variant of 04_tiny_gpt.py ONE AFTER THE OTHER (never in parallel: they would share the cores),
with the same data split, the same training-time budget and the same final evaluation (mean loss over the
WHOLE validation set, non-overlapping windows of the model's context length). Every variant starts from the
lesson's `medium` preset (GPT-2 block: LayerNorm, learned positions, GELU, tied head, AdamW; 4 layers,
4 heads, 128 dims, context 128, batch 16) and changes only the flags shown; `babygpt` is nanoGPT's
baby-GPT recipe (context 64, batch 12, lr 1e-3) as the outside reference.

  single      each change alone on top of the GPT-2 block
  cumulative  the changes added one after another (the last one is --preset speedrun's recipe)

Usage:
  python benchmarks/tiny_gpt_ablation.py --minutes 3                 # everything (14 variants x 3 min)
  python benchmarks/tiny_gpt_ablation.py --minutes 1 --set cumulative
  python benchmarks/tiny_gpt_ablation.py --minutes 3 --only babygpt,gpt2,speedrun --repeat 2
Writes outputs/04_tiny_gpt/ablation/ablation.json, ablation.md (the table) and loss_vs_time.png.
Timings are wall-clock: close other programs; the script prints the load average before and after.
On a busy machine also look at "CPU ms per 1k tokens" (process CPU time, evaluations excluded): with --threads 1
it barely depends on what else runs, so it compares the cost of the variants fairly even when tokens/s cannot.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.cli import course_parser, positive_float, positive_int  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import output_dir  # noqa: E402
from common.plots import new_figure, save_figure  # noqa: E402

SCRIPT = REPO / "04_tiny_gpt.py"
BABY = ["--preset", "small", "--block-size", "64", "--batch-size", "12", "--lr", "1e-3", "--warmup-iters", "100"]
MEDIUM = ["--preset", "medium"]
RMS, ROPE, QK, RELU2, SWIGLU, UNTIED = (["--norm", "rms"], ["--pos", "rope"], ["--qk-norm", "on"],
                                        ["--mlp", "relu2"], ["--mlp", "swiglu"], ["--head", "untied"])
MUON = ["--optimizer", "muon"]
SPEEDRUN = ["--preset", "speedrun"]
# name -> (group, description, flags)
VARIANTS = {
    "babygpt": ("ref", "nanoGPT baby GPT 配方（T=64, B=12, lr 1e-3）", BABY),
    "gpt2": ("ref", "GPT-2 块（--preset medium）", MEDIUM),
    "+rms": ("single", "只换 RMSNorm", MEDIUM + RMS),
    "+rope": ("single", "只换 RoPE", MEDIUM + ROPE),
    "+qknorm": ("single", "只加 QK-norm", MEDIUM + QK),
    "+relu2": ("single", "只换 ReLU²", MEDIUM + RELU2),
    "+swiglu": ("single", "只换 SwiGLU", MEDIUM + SWIGLU),
    "+untied": ("single", "只解开输出层", MEDIUM + UNTIED),
    "+muon": ("single", "只换 Muon", MEDIUM + MUON),
    "c1 rms": ("cumulative", "RMSNorm", MEDIUM + RMS),
    "c2 +rope": ("cumulative", "+ RoPE", MEDIUM + RMS + ROPE),
    "c3 +qknorm": ("cumulative", "+ QK-norm", MEDIUM + RMS + ROPE + QK),
    "c4 +relu2": ("cumulative", "+ ReLU²", MEDIUM + RMS + ROPE + QK + RELU2),
    "speedrun": ("cumulative", "+ Muon（= --preset speedrun，输出层共享）", SPEEDRUN),
}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_variant(name: str, flags: list[str], a, out: Path, rep: int) -> dict:
    d = out / f"{name.replace(' ', '_').replace('+', 'plus_')}-{rep}"
    cmd = [sys.executable, str(SCRIPT), *flags, "--time-budget", str(a.minutes), "--final-eval", "full",
           "--evals", str(a.evals), "--out-dir", str(d), "--overwrite", "--seed", str(a.seed + rep), *a.extra]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    print(f"=== {name} (run {rep + 1}): {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    log = d.with_suffix(".log")
    d.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise UserError(f"{name} 运行失败（退出码 {rc}）；看 {log}")
    res = json.loads(next(d.glob("*/results.json")).read_text(encoding="utf-8"))
    full = res["final_val_loss_full"][str(res["model_config"]["block_size"])]
    print(f"    {res['iters']} 步，{res['tokens_per_s']:,.0f} token/s，val（整个验证集）{full:.4f}，"
          f"进程 {time.time() - t0:.0f} s", flush=True)
    return {"name": name, "rep": rep, "flags": flags, "params": res["n_params"], "iters": res["iters"],
            "tokens": res["tokens_seen"], "tokens_per_s": res["tokens_per_s"], "train_time_s": res["train_time_s"],
            "cpu_ms_per_token": 1000 * res["train_cpu_s"] / max(res["tokens_seen"], 1),
            "val_full": full, "val_fixed": res["final_val_loss"], "curve_time": res["evals"]["time"],
            "curve_val": res["evals"]["val"], "model_config": res["model_config"]}


def table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    mean = {n: sum(r["val_full"] for r in rs) / len(rs) for n, rs in by.items()}
    tok_s = {n: sum(r["tokens_per_s"] for r in rs) / len(rs) for n, rs in by.items()}
    cpu = {n: sum(r["cpu_ms_per_token"] for r in rs) / len(rs) for n, rs in by.items()}
    lines = ["| 变体 | 改动 | 参数 | 步数 | token/s（相对 gpt2） | CPU 毫秒/千 token | val（整个验证集） | 比 gpt2 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        vals = [r["val_full"] for r in rs]
        val = f"{mean[name]:.4f}" + (f"（{', '.join(f'{v:.4f}' for v in vals)}）" if len(vals) > 1 else "")
        rel = f"（{tok_s[name] / tok_s['gpt2']:.2f}×）" if "gpt2" in tok_s else ""
        delta = f"{mean[name] - mean['gpt2']:+.4f}" if "gpt2" in mean else ""
        lines.append(f"| {name} | {VARIANTS[name][1]} | {rs[0]['params']:,} | {sum(r['iters'] for r in rs) // len(rs):,} "
                     f"| {tok_s[name]:,.0f}{rel} | {1000 * cpu[name]:.1f} | {val} | {delta} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, minutes: float) -> Path:
    import matplotlib

    fig, ax = new_figure(size=(9, 5.5))
    colors = matplotlib.colormaps["tab20"].colors            # 14 variants: 10 default colours would repeat
    firsts = [r for r in rows if r["rep"] == 0]
    for i, r in enumerate(firsts):
        key = r["name"] in ("babygpt", "gpt2", "speedrun")
        style = "o-" if key else (".-" if VARIANTS[r["name"]][0] != "cumulative" else "s--")
        ax.plot(r["curve_time"][1:], r["curve_val"][1:], style, color=colors[i % len(colors)],
                lw=2.2 if key else 1, ms=4 if not key else 6, label=r["name"])
    ax.set_xlabel("training time (s)"); ax.set_ylabel("val loss (fixed batches)")
    ax.set_title(f"lesson 04 ablation, {minutes:g} min per variant, one after the other")
    ax.grid(alpha=0.3); ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def main(argv=None):
    p = course_parser("04_tiny_gpt", __doc__, groups=())
    p.prog = "benchmarks/tiny_gpt_ablation.py"
    p.add_argument("--minutes", type=positive_float, default=3.0, help="每个变体的训练时间预算（分钟）")
    p.add_argument("--set", choices=["all", "single", "cumulative"], default="all", help="跑哪一组（参照组总会跑）")
    p.add_argument("--only", default=None, help="逗号分隔的变体名，例如 babygpt,gpt2,speedrun")
    p.add_argument("--repeat", type=positive_int, default=1, help="每个变体跑几次（种子依次 +1），看波动")
    p.add_argument("--threads", type=positive_int, default=None, help="每个变体的 CPU 线程数（默认全部核心）")
    p.add_argument("--evals", type=positive_int, default=8, help="训练中评估几次（loss-时间曲线上的点）")
    p.add_argument("--data", default=None, help="默认：莎士比亚全集（与第 04 课相同的划分）")
    a = p.parse_args(argv)
    a.extra = ["--data", a.data] if a.data else []
    names = [n for n, (g, _, _) in VARIANTS.items() if g == "ref" or a.set in ("all", g)]
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise UserError(f"没有变体 {', '.join(unknown)}；可选：{', '.join(VARIANTS)}")
    out = a.out_dir / "ablation" if a.out_dir.name == "04_tiny_gpt" else a.out_dir
    output_dir(out)
    print(f"开始前负载（1/5/15 分钟）：{loadavg()}；CPU 核心 {os.cpu_count()}；{len(names)} 个变体 × {a.repeat} 次 × "
          f"{a.minutes:g} 分钟，依次运行", flush=True)
    rows = [run_variant(n, VARIANTS[n][2], a, out, rep) for rep in range(a.repeat) for n in names]
    md = table(rows)
    print(f"\n{md}\n\n结束后负载：{loadavg()}")
    (out / "ablation.md").write_text(md + "\n", encoding="utf-8")
    summary = {"minutes": a.minutes, "threads": a.threads, "repeat": a.repeat, "rows": rows,
               "loadavg_end": loadavg(), "cpu_count": os.cpu_count()}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"表格：{out / 'ablation.md'}\n结果：{out / 'ablation.json'}\nloss-时间曲线：{plot(rows, out / 'loss_vs_time.png', a.minutes)}")


if __name__ == "__main__":
    run_cli(main)
