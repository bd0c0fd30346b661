"""Benchmark: KV-cache speedup of greedy generation with the local SmolLM2-135M, fp32 and int8.

For each dtype it generates max(lengths) tokens once with the KV cache and once without, timing
every step; the time to generate the first L tokens is the sum of the first L steps (greedy decoding
of L tokens is a prefix of the longer run). Ratios are measured side by side in the same (lesson) process.
It also profiles one cached and one uncached step with torch.profiler (top ops by self CPU time).

Runs the lesson's own command for every (dtype, prompt) pair, `02_understand_kv_cache.py --part real`
(its greedy_timed, model_macs, profile_step and linear_weight_bytes), as a subprocess, and reads its
results.json, so the benchmark measures exactly what the lesson teaches; the lesson's own runs stay in
outputs/benchmarks/kv_cache_speedup_runs/. This process loads the same model only to build the long
prompt and to time the linear layers alone (the ceiling), while the lesson is not running.

    python benchmarks/kv_cache_speedup.py                       # lengths 64,128,256,512, fp32 + int8
    python benchmarks/kv_cache_speedup.py --lengths 64,128 --dtypes int8 --threads 2
    python benchmarks/kv_cache_speedup.py --prompt-tokens 0,512 --lengths 64,128,256
        # also with a ~512-token prompt (a shipped handbook page + "Summarize..."): the uncached
        # side recomputes the whole prompt every step, so the speedup grows with the context length

Writes outputs/benchmarks/kv_cache_speedup.json. Slow: the uncached 512-token run recomputes
~280 tokens per step on average (minutes per dtype on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.cli import int_list, positive_int  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import output_dir  # noqa: E402


def long_prompt(lm, n_tokens: int, default: str | None) -> str | None:
    """About n_tokens tokens of the shipped handbook (English) followed by an instruction (0: the default prompt)."""
    if n_tokens == 0:
        return default
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in sorted((REPO / "data" / "rag" / "en").glob("*.md")))
    ids = lm.tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise UserError(f"--prompt-tokens 最大 {len(ids)}（data/rag/en 一共只有这么多 token）")
    return lm.tokenizer.decode(ids[:n_tokens]) + "\n\nSummarize the text above."


def linears_only_seconds(model, repeats: int = 15) -> float:
    """Median time to push ONE token through every linear layer (incl. the LM head).

    This is the part of a cached step that no implementation can skip: every weight is read once per
    token. (uncached time) / (L x this) is therefore an upper bound on the speedup on this machine.
    """
    import torch

    lins = [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    xs = {n: torch.randn(1, 1, n) for n in {m.in_features for m in lins}}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            t = time.perf_counter()
            for m in lins:
                m(xs[m.in_features])
            times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    return times[len(times) // 2]


def run_lesson(dtype: str, prompt: str | None, n: int, lengths: list[int], threads: int | None, out: Path) -> dict:
    """`02_understand_kv_cache.py --part real` for one dtype and prompt (its printout is not shown, its progress
    bars are); returns the "real" part of its results.json."""
    cmd = [sys.executable, str(REPO / "02_understand_kv_cache.py"), "--part", "real", "--dtype", dtype,
           "--device", "cpu", "--max-new-tokens", str(n), "--lengths", ",".join(map(str, sorted(lengths))),
           "--out-dir", str(out)]
    cmd += (["--prompt", prompt] if prompt else []) + (["--threads", str(threads)] if threads else [])
    rc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL).returncode
    if rc:
        raise UserError(f"02_understand_kv_cache.py --part real --dtype {dtype} 以退出码 {rc} 结束（见上面的输出）。")
    return json.loads((out / "results.json").read_text(encoding="utf-8"))["real"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="KV cache speedup benchmark (local SmolLM2-135M)")
    p.add_argument("--lengths", type=int_list, default=[64, 128, 256, 512])
    p.add_argument("--dtypes", default="fp32,int8", help="comma list of fp32,int8")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--prompt", default=None, help="English prompt (default: the lesson's own)")
    p.add_argument("--prompt-tokens", default="0",
                   help="comma list; 0 = --prompt as is, N = about N tokens of data/rag/en text + 'Summarize the text above.'")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in ("fp32", "int8") for d in args.dtypes):
        raise UserError(f"--dtypes 只能是 fp32 / int8 的逗号组合（收到 {','.join(args.dtypes)!r}）。")
    try:
        args.prompt_sizes = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]
        assert args.prompt_sizes and all(x >= 0 for x in args.prompt_sizes)
    except (ValueError, AssertionError):
        raise UserError(f"--prompt-tokens 应是逗号分隔的非负整数，例如 0,512（收到 {args.prompt_tokens!r}）") from None
    return args


def measure(lm, dtype: str, size: int, args, out: Path) -> dict:
    """One (dtype, prompt) pair: the lesson's run, plus this process's linears-only time for the ceiling."""
    prompt = long_prompt(lm, size, args.prompt) if size else args.prompt
    lin_s = linears_only_seconds(lm.model)
    t0 = time.perf_counter()
    real = run_lesson(dtype, prompt, max(args.lengths), args.lengths, args.threads, out)
    rows = [{**{k: r[k] for k in ("new_tokens", "no_cache_s", "cached_s", "no_cache_tok_s", "cached_tok_s", "speedup",
                                  "mac_ratio")}, "speedup_ceiling": r["no_cache_s"] / (r["new_tokens"] * lin_s)}
            for r in real["table"] if r["new_tokens"] in args.lengths]
    lin_bytes = real["weight_bytes"]
    return {"prompt_tokens": real["prompt_tokens"], "identical_tokens": real["identical_tokens"],
            "first_diff": real["first_diff"], "weight_bytes_per_token": lin_bytes, "linears_only_step_s": lin_s,
            "linears_only_gb_s": lin_bytes / lin_s / 1e9, "median_cached_step_s": real["cached_step_median_ms"] / 1e3,
            "table": rows, "step_seconds_cached": real["step_seconds_cached"],
            "step_seconds_no_cache": real["step_seconds_no_cache"], "profile": real["profile"],
            "wall_s": time.perf_counter() - t0}


def print_run(dtype: str, run: dict) -> None:
    first_diff = run["first_diff"]
    print(f"\n[{dtype}] prompt {run['prompt_tokens']} tokens, identical cached/uncached tokens: {first_diff is None}"
          + ("" if first_diff is None else f" (first difference at token {first_diff})"))
    print(f"{'new tokens':>10} | {'no cache s':>10} | {'cached s':>8} | {'no cache tok/s':>14} |"
          f" {'cached tok/s':>12} | {'speedup':>7} | ceiling | MAC ratio")
    for r in run["table"]:
        print(f"{r['new_tokens']:>10} | {r['no_cache_s']:10.2f} | {r['cached_s']:8.2f} | {r['no_cache_tok_s']:14.2f} |"
              f" {r['cached_tok_s']:12.2f} | {r['speedup']:6.1f}x | {r['speedup_ceiling']:6.1f}x | {r['mac_ratio']:6.1f}x")
    print(f"  cached step (median) {run['median_cached_step_s'] * 1e3:.1f} ms; the linear layers alone, one token:"
          f" {run['linears_only_step_s'] * 1e3:.1f} ms for {run['weight_bytes_per_token'] / 2**20:.0f} MiB of weights"
          f" = {run['linears_only_gb_s']:.1f} GB/s."
          f" 'ceiling' = no-cache time / (tokens x that): the speedup if everything but reading the weights took 0 s.")
    for key in ("cached_step", "no_cache_step"):
        print(f"  profile {key}: " + ", ".join(f"{r['op']} {r['share'] * 100:.0f}%" for r in run["profile"][key][:5]))


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from common.device import setup_threads
    from common.local_model import load_local_model

    threads = setup_threads(args.threads)
    out = {"lengths": sorted(args.lengths), "threads": threads, "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "platform": platform.platform(), "runs": {}}
    out["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs_dir = output_dir("benchmarks") / "kv_cache_speedup_runs"
    for dtype in args.dtypes:
        lm = load_local_model(dtype=dtype, device=torch.device("cpu"), verbose=True)
        for size in args.prompt_sizes:
            name = dtype if size == 0 else f"{dtype}-prompt{size}"
            out["runs"][name] = run = measure(lm, dtype, size, args, runs_dir / name)
            print_run(dtype, run)
    out["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = output_dir("benchmarks") / "kv_cache_speedup.json"
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {path}  (loadavg start {out['loadavg_start']}, end {out['loadavg_end']}; the lesson's own runs: {runs_dir})")


if __name__ == "__main__":
    run_cli(main)
