"""Speculative decoding on the local models, side by side in one run: an int8 draft proposes k tokens, the
fp32 target verifies them in one forward pass (common/speculative.py). For each model (SmolLM2-135M and
Qwen2.5-Coder-0.5B) and each k: acceptance rate, tokens per target forward, the share of time spent in the
draft, and the speedup over the same fp32 target decoding alone — plus the speedup over the course's
default fp32 layout and over prompt lookup on a RAG-style prompt. Every speculative output is compared
token for token with the target's own greedy output (a mismatch is reported, and the exit code is 1).

    python benchmarks/speculative_speed.py                    # both models, ~6-10 minutes on 2 CPU cores
    python benchmarks/speculative_speed.py --models qwen0.5b --k 4,6,8
    python benchmarks/speculative_speed.py --quick

It also times one forward pass with 1, 2, 4 and 7 new tokens (the cost of a verification) for the default
fp32 layout and the oneDNN-prepacked one, which is where the speedup's ceiling comes from.
Configurations run one after another in this process (two torch processes on 2 cores slow each other
down). Results: outputs/benchmarks/speculative_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a bicycle works, step by step.",
           "List five tips for learning a new language, with one sentence on each."]


def forward_ms(model, n_new: int, reps: int = 5) -> float:
    import torch

    cache = model.new_cache(1, 256)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, 60)), cache=cache)
        times = []
        for _ in range(reps):
            cache.truncate(60)
            t0 = time.perf_counter()
            model(torch.randint(0, 1000, (1, n_new)), cache=cache)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_model(key: str, ks: list[int], n: int, prompts: list[str], lookup_k: int) -> dict:
    from common.generate import generate
    from common.local_model import load_local_model
    from common.speculative import ModelDraft, PromptLookupDraft, prepack_for_cpu, rag_prompt, speculative_generate

    target_lm = load_local_model(dtype="fp32", device="cpu", verbose=False, model=key)
    draft = load_local_model(dtype="int8", device="cpu", verbose=False, model=key).model
    plain, target, tok = target_lm.model, prepack_for_cpu(target_lm.model), target_lm.tokenizer
    stop = set(tok.eos_ids)
    for m in (plain, target, draft):
        list(generate(m, tok.encode("Hi"), 2, stop_ids=()))
    verify = {name: {t: forward_ms(m, t) for t in (1, 2, 4, 7)} for name, m in (("default", plain), ("prepacked", target))}
    print(f"\n[{key}] one forward pass with T new tokens (ms, 60 cached): " +
          "; ".join(f"{name}: " + ", ".join(f"T={t} {v:.0f}" for t, v in d.items()) for name, d in verify.items()))
    rows = {f"k={k}": [] for k in ks} | {"lookup": [], "lookup_rag": []}
    for p in prompts + [rag_prompt()]:
        ids = tok.apply_chat_template([{"role": "user", "content": p}])
        ref, t_ref = timed(lambda: list(generate(target, ids, n, stop_ids=stop)))
        plain_out, t_plain = timed(lambda: list(generate(plain, ids, n, stop_ids=stop)))
        drafts = [("lookup_rag" if p not in prompts else "lookup", PromptLookupDraft(), lookup_k)]
        if p in prompts:
            drafts += [(f"k={k}", ModelDraft(draft, len(ids) + n + k + 1), k) for k in ks]
        for name, d, k in drafts:
            (out, st), t = timed(lambda: speculative_generate(target, d, ids, n, k, stop))
            rows[name].append({"identical": out == ref, "plain_identical": plain_out == ref, "tokens": len(out),
                               "seconds": t, "target_alone_s": t_ref, "plain_fp32_s": t_plain, **st.as_dict()})
    summary = {}
    for name, rs in rows.items():
        total, prop = sum(r["seconds"] for r in rs), sum(r["proposed"] for r in rs)
        summary[name] = {"acceptance": sum(r["accepted"] for r in rs) / prop if prop else 0.0,
                         "speedup": sum(r["target_alone_s"] for r in rs) / total,
                         "speedup_vs_plain_fp32": sum(r["plain_fp32_s"] for r in rs) / total,
                         "identical": all(r["identical"] for r in rs),
                         "tokens_per_target_call": sum(r["tokens"] for r in rs) / sum(r["target_calls"] for r in rs),
                         "draft_share": sum(r["draft_seconds"] for r in rs) / total,
                         "target_alone_tok_s": sum(r["tokens"] for r in rs) / sum(r["target_alone_s"] for r in rs),
                         "plain_fp32_tok_s": sum(r["tokens"] for r in rs) / sum(r["plain_fp32_s"] for r in rs),
                         "tok_s": sum(r["tokens"] for r in rs) / total}
    print(f"{'draft':<12} | accept | tok/target call | draft time | tok/s | vs target alone | vs default fp32 | identical")
    for name, s in summary.items():
        print(f"{name:<12} | {s['acceptance']:5.0%} | {s['tokens_per_target_call']:15.2f} | {s['draft_share']:9.0%} | "
              f"{s['tok_s']:5.1f} | {s['speedup']:14.2f}x | {s['speedup_vs_plain_fp32']:14.2f}x | {s['identical']}")
    print(f"target alone (prepacked fp32) {summary['lookup']['target_alone_tok_s']:.1f} tok/s, "
          f"default fp32 {summary['lookup']['plain_fp32_tok_s']:.1f} tok/s; default fp32 gave the same tokens as the "
          f"prepacked target on {sum(r['plain_identical'] for r in rows['lookup'] + rows['lookup_rag'])}/"
          f"{len(rows['lookup'] + rows['lookup_rag'])} prompts")
    return {"verify_forward_ms": verify, "summary": summary, "runs": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,qwen0.5b")
    p.add_argument("--k", default="2,4,6,8")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--lookup-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="k 4,6; 32 tokens; one prompt")
    a = p.parse_args()
    ks = [4, 6] if a.quick else [int(x) for x in a.k.split(",")]
    n, prompts = (32, PROMPTS[:1]) if a.quick else (a.max_new_tokens, PROMPTS[:a.prompts])
    from common.device import setup_threads

    threads = setup_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"{platform.machine()} {os.cpu_count()} cores, {threads} torch threads, load at start {load}; "
          f"{n} new tokens per prompt, {len(prompts)} prompts + 1 RAG prompt, k = {ks}")
    out = {"threads": threads, "loadavg_start": load, "k": ks, "new_tokens": n, "prompts": prompts, "models": {}}
    for key in a.models.split(","):
        out["models"][key] = run_model(key, ks, n, prompts, a.lookup_k)
    out["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    path = ROOT / "outputs" / "benchmarks" / "speculative_speed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nload at end {out['loadavg_end']}; results: {path}")
    ok = all(s["identical"] for m in out["models"].values() for s in m["summary"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
