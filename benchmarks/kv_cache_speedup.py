"""Benchmark: KV-cache speedup of greedy generation with the local SmolLM2-135M, fp32 and int8.

For each dtype it generates max(lengths) tokens once with the KV cache and once without, timing
every step; the time to generate the first L tokens is the sum of the first L steps (greedy decoding
of L tokens is a prefix of the longer run). Ratios are measured side by side in the same process.
It also profiles one cached and one uncached step with torch.profiler (top ops by self CPU time).

Uses the lesson's own code (02_understand_kv_cache.py: greedy_timed, model_macs, profile_step,
linear_weight_bytes), so the benchmark measures exactly what the lesson teaches.

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
import importlib
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.cli import int_list, positive_int  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402

lesson = importlib.import_module("02_understand_kv_cache")


def long_prompt(lm, n_tokens: int, default: str) -> str:
    """About n_tokens tokens of the shipped handbook (English) followed by an instruction."""
    if n_tokens == 0:
        return default
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in sorted((REPO / "data" / "rag" / "en").glob("*.md")))
    ids = lm.tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise UserError(f"--prompt-tokens 最大 {len(ids)}（data/rag/en 一共只有这么多 token）")
    return lm.tokenizer.decode(ids[:n_tokens]) + "\n\nSummarize the text above."


def linears_only_seconds(model, repeats: int = 15) -> tuple[float, int]:
    """Median time to push ONE token through every linear layer (incl. the LM head) and their weight bytes.

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
    return times[len(times) // 2], lesson.linear_weight_bytes(model)


def main() -> None:
    p = argparse.ArgumentParser(description="KV cache speedup benchmark (local SmolLM2-135M)")
    p.add_argument("--lengths", type=int_list, default=[64, 128, 256, 512])
    p.add_argument("--dtypes", default="fp32,int8", help="comma list of fp32,int8")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--prompt", default=lesson.DEFAULT_PROMPT)
    p.add_argument("--prompt-tokens", default="0",
                   help="comma list; 0 = --prompt as is, N = about N tokens of data/rag/en text + 'Summarize the text above.'")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("fp32", "int8") for d in dtypes):
        raise UserError(f"--dtypes 只能是 fp32 / int8 的逗号组合（收到 {args.dtypes!r}）。")

    import torch

    from common.device import setup_threads
    from common.local_model import load_local_model
    from common.outputs import output_dir

    try:
        prompt_sizes = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]
        assert prompt_sizes and all(x >= 0 for x in prompt_sizes)
    except (ValueError, AssertionError):
        raise UserError(f"--prompt-tokens 应是逗号分隔的非负整数，例如 0,512（收到 {args.prompt_tokens!r}）")
    threads = setup_threads(args.threads)
    n = max(args.lengths)
    out = {"lengths": sorted(args.lengths), "threads": threads, "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "platform": platform.platform(), "runs": {}}
    out["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs = [(dtype, size) for dtype in dtypes for size in prompt_sizes]
    for dtype, size in runs:
        lm = load_local_model(dtype=dtype, device=torch.device("cpu"), verbose=True)
        prompt_ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": long_prompt(lm, size, args.prompt)}])
        P = len(prompt_ids)
        t0 = time.perf_counter()
        tok_c, t_c = lesson.greedy_timed(lm, prompt_ids, n, True, f"{dtype} cached")
        tok_n, t_n = lesson.greedy_timed(lm, prompt_ids, n, False, f"{dtype} no cache")
        first_diff = next((i for i, (a, b) in enumerate(zip(tok_c, tok_n)) if a != b), None)
        lin_s, lin_bytes = linears_only_seconds(lm.model)
        rows = []
        for L in sorted(args.lengths):
            s_n, s_c = sum(t_n[:L]), sum(t_c[:L])
            m_n, m_c = lesson.model_macs(lm.config, P, L)
            rows.append({"new_tokens": L, "no_cache_s": s_n, "cached_s": s_c, "no_cache_tok_s": L / s_n,
                         "cached_tok_s": L / s_c, "speedup": s_n / s_c, "mac_ratio": m_n / m_c,
                         "speedup_ceiling": s_n / (L * lin_s)})
        run = {"prompt_tokens": P, "identical_tokens": first_diff is None, "first_diff": first_diff,
               "weight_bytes_per_token": lin_bytes, "linears_only_step_s": lin_s,
               "linears_only_gb_s": lin_bytes / lin_s / 1e9, "median_cached_step_s": sorted(t_c[1:])[len(t_c) // 2],
               "table": rows,
               "step_seconds_cached": t_c, "step_seconds_no_cache": t_n, "wall_s": time.perf_counter() - t0}
        if not args.no_profile:
            run["profile"] = {"cached_step": lesson.profile_step(lm, P + n, True, top=8),
                              "no_cache_step": lesson.profile_step(lm, P + n, False, top=8)}
        out["runs"][dtype if size == 0 else f"{dtype}-prompt{size}"] = run
        print(f"\n[{dtype}] prompt {P} tokens, identical cached/uncached tokens: {first_diff is None}"
              + ("" if first_diff is None else f" (first difference at token {first_diff})"))
        print(f"{'new tokens':>10} | {'no cache s':>10} | {'cached s':>8} | {'no cache tok/s':>14} |"
              f" {'cached tok/s':>12} | {'speedup':>7} | ceiling | MAC ratio")
        for r in rows:
            print(f"{r['new_tokens']:>10} | {r['no_cache_s']:10.2f} | {r['cached_s']:8.2f} | {r['no_cache_tok_s']:14.2f} |"
                  f" {r['cached_tok_s']:12.2f} | {r['speedup']:6.1f}x | {r['speedup_ceiling']:6.1f}x | {r['mac_ratio']:6.1f}x")
        print(f"  cached step (median) {run['median_cached_step_s'] * 1e3:.1f} ms; the linear layers alone, one token:"
              f" {lin_s * 1e3:.1f} ms for {lin_bytes / 2**20:.0f} MiB of weights = {run['linears_only_gb_s']:.1f} GB/s."
              f" 'ceiling' = no-cache time / (tokens x that): the speedup if everything but reading the weights took 0 s.")
        for key in ("cached_step", "no_cache_step"):
            if "profile" in run:
                print(f"  profile {key}: " + ", ".join(f"{r['op']} {r['share'] * 100:.0f}%" for r in run["profile"][key][:5]))
    out["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = output_dir("benchmarks") / "kv_cache_speedup.json"
    import json
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {path}  (loadavg start {out['loadavg_start']}, end {out['loadavg_end']})")


if __name__ == "__main__":
    run_cli(main)
