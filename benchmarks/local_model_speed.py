"""Benchmark the local models: load time, time-to-first-token, decode speed with and without the
KV cache, and peak memory — for the fp32 reference and the int8 fast path, side by side, for
SmolLM2-135M (smollm2) and Qwen2.5-Coder-0.5B (qwen0.5b).

    python benchmarks/local_model_speed.py                        # both models, ~5-8 minutes on 2 CPU cores
    python benchmarks/local_model_speed.py --models smollm2       # one model
    python benchmarks/local_model_speed.py --quick                # fewer tokens

Each configuration runs in its own process (so peak memory is its own), the same prompt and the
same number of tokens. Results: outputs/benchmarks/local_model_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short story about a robot who learns to paint."


def worker(model: str, dtype: str, new_tokens: int, nocache_tokens: int) -> dict:
    import torch

    from common.device import setup_threads
    from common.local_model import load_local_model

    threads = setup_threads()
    t0 = time.perf_counter()
    lm = load_local_model(dtype=dtype, device="cpu", verbose=False, model=model)
    load_s = time.perf_counter() - t0
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    # warm-up (first calls allocate and pick kernels)
    list(lm.generate(ids, 4, stop_ids=set()))

    def timed(n, use_cache):
        stamps, out = [], []
        t = time.perf_counter()
        for tok in lm.generate(ids, n, use_cache=use_cache, stop_ids=set()):
            stamps.append(time.perf_counter() - t)
            out.append(tok)
        return stamps, out

    stamps, cached_tokens = timed(new_tokens, True)
    ttft = stamps[0]
    decode_tps = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    n2 = min(nocache_tokens, new_tokens)
    stamps2, nocache_tokens_out = timed(n2, False)
    nocache_tps = (len(stamps2) - 1) / (stamps2[-1] - stamps2[0])
    cached_tps_same_n = (n2 - 1) / (stamps[n2 - 1] - stamps[0])
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # quality vs the fp32 reference on the same prompt: mean KL(fp32 || this) over positions, top-1 agreement
    kl = top1 = None
    if dtype != "fp32":
        ref = load_local_model(dtype="fp32", device="cpu", verbose=False, model=model)
        x = torch.tensor([ids + cached_tokens])
        with torch.no_grad():
            a, b = ref.model(x)[0], lm.model(x)[0]
        kl = round(torch.sum(a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1)), -1).mean().item(), 4)
        top1 = round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 3)
    return {
        "model": model, "dtype": dtype, "threads": threads, "torch": torch.__version__,
        "load_s": round(load_s, 3), "prompt_tokens": len(ids), "ttft_s": round(ttft, 4),
        "decode_tokens_per_s": round(decode_tps, 2), "new_tokens": new_tokens,
        "nocache_tokens": n2, "nocache_tokens_per_s": round(nocache_tps, 2),
        "cache_speedup_same_length": round(cached_tps_same_n / nocache_tps, 2),
        "tokens_identical_with_without_cache": cached_tokens[:n2] == nocache_tokens_out,
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "kl_vs_fp32": kl, "top1_agree_vs_fp32": top1,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen0.5b")
    ap.add_argument("--dtypes", default="fp32,int8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--nocache-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.nocache_tokens = 48, 24
    if args.worker:
        model, dtype = args.worker.split(":")
        print(json.dumps(worker(model, dtype, args.new_tokens, args.nocache_tokens)))
        return 0

    configs = [(m, d) for m in args.models.split(",") for d in args.dtypes.split(",")]
    for m in args.models.split(","):  # make sure the weight caches exist, so that load time means "load once cached"
        subprocess.run([sys.executable, __file__, "--worker", f"{m}:int8", "--new-tokens", "4", "--nocache-tokens", "2"],
                       check=True, capture_output=True)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    rows = []
    for m, dtype in configs:
        p = subprocess.run([sys.executable, __file__, "--worker", f"{m}:{dtype}", "--new-tokens", str(args.new_tokens),
                            "--nocache-tokens", str(args.nocache_tokens)], capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    cols = ["model", "dtype", "load_s", "ttft_s", "decode_tokens_per_s", "nocache_tokens_per_s", "cache_speedup_same_length",
            "tokens_identical_with_without_cache", "peak_rss_mb", "kl_vs_fp32", "top1_agree_vs_fp32"]
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch threads {rows[0]['threads']}, "
          f"load average at start {load}")
    print(f"prompt {rows[0]['prompt_tokens']} tokens; decode measured over {args.new_tokens} new tokens, "
          f"no-cache over {rows[0]['nocache_tokens']}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    by = {(r["model"], r["dtype"]): r for r in rows}
    for m in args.models.split(","):
        if (m, "fp32") in by and (m, "int8") in by:
            ratio = by[(m, "int8")]["decode_tokens_per_s"] / by[(m, "fp32")]["decode_tokens_per_s"]
            print(f"{m}: int8 / fp32 decode speed {ratio:.2f}x")
    out = ROOT / "outputs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "local_model_speed.json").write_text(json.dumps({"load_average": load, "rows": rows}, indent=2))
    print(f"saved {out / 'local_model_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
