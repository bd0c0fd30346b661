"""Benchmark: per-token cost of lesson 07's hand-written JSON mask vs llguidance, and vs one decoding step.

For each schema, the expected answers of the shipped tasks (compact JSON) are replayed token by token
through both maskers on the same tokenizer; per token we time what a generation loop pays:
  ours        advance the state by the last token + look up / build the allowed set + masked_fill
  llguidance  consume_token + fill the bitmask + apply it to the logits (llguidance.torch helpers)
Pass 1 starts from empty caches (ours builds its per-state masks as it meets new states; llguidance
builds its own lexer caches); pass 2 replays the same documents again (warm). The unconstrained
decoding step of the local model (KV cache, fp32) is timed in the same run for the ratio.

    flock /tmp/llm-timing.lock python benchmarks/json_mask_speed.py [--threads 2] [--docs 20]
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.errors import run_cli  # noqa: E402

LL_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
              "json_allowed_escapes": '"\\bfnrt'}


def replay_ours(L, mask, docs, logits) -> list[float]:
    times = []
    for ids in docs:
        proc = mask.processor()
        for i in range(len(ids) + 1):
            t = time.perf_counter()
            proc(ids[:i], logits)
            times.append(time.perf_counter() - t)
    return times


def replay_llg(llguidance, ll_tok, grammar, docs, logits) -> list[float]:
    """llguidance.torch's apply helper is torch.compile'd (compiles on first use); we unpack the bits
    with numpy instead and use the same masked_fill as ours, so only the mask computation differs."""
    import llguidance.numpy as lln
    import numpy as np
    import torch

    times = []
    bitmask = lln.allocate_token_bitmask(1, ll_tok.vocab_size)
    n = logits.shape[0]
    for ids in docs:
        m = llguidance.LLMatcher(ll_tok, grammar)
        for i in range(len(ids) + 1):
            t = time.perf_counter()
            if i:
                m.consume_token(ids[i - 1])
            lln.fill_next_token_bitmask(m, bitmask)
            allowed = torch.from_numpy(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n].astype(bool))
            logits.masked_fill(~allowed, float("-inf"))
            times.append(time.perf_counter() - t)
    return times


def decode_step_ms(lm, n: int = 32) -> float:
    from common.generate import generate

    steps = []
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a robot."}])
    for _ in generate(lm.model, ids, n, on_step=lambda s: steps.append(s.seconds) if s.index > 0 else None):
        pass
    return 1000 * statistics.median(steps)


def main() -> None:
    p = argparse.ArgumentParser(description="JSON mask per-token cost: lesson 07 vs llguidance vs a decoding step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--docs", type=int, default=20, help="documents per schema")
    args = p.parse_args()
    import llguidance
    import llguidance.tiktoken
    import torch

    from common.device import setup_threads
    from common.local_model import load_local_model

    setup_threads(args.threads)
    L = importlib.import_module("07_structured_output")
    lm = load_local_model(verbose=False)
    tok = lm.tokenizer
    t0 = time.perf_counter()
    vocab = L.Vocab(tok)
    trie_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ll_tok = llguidance.tiktoken.lltokenizer_from_encoding(tok.enc, n_vocab=tok.n_vocab, eos_token=tok.im_end)
    ll_s = time.perf_counter() - t0
    step = decode_step_ms(lm)
    logits = torch.randn(tok.n_vocab)
    print(f"threads {torch.get_num_threads()}   load average {open('/proc/loadavg').read().split()[:3]}")
    print(f"setup: our vocabulary trie {trie_s:.2f} s, llguidance tokenizer {ll_s:.2f} s")
    print(f"unconstrained decoding step (median of 31): {step:.1f} ms\n")
    print(f"{'schema':10} {'pass':5} {'tokens':>6}  {'ours mean':>9} {'median':>7}  {'llg mean':>8} {'median':>7}"
          f"  {'ours/step':>9} {'llg/step':>8}")
    results = {}
    for name, task_file in (("support", "support_tasks.jsonl"), ("review", "review_tasks.jsonl")):
        schema = json.loads((L.DATA / f"{name}.schema.json").read_text())
        docs = [tok.encode(json.dumps(t["expected"], separators=(",", ":")))
                for t in L.read_jsonl(L.DATA / task_file)[:args.docs]]
        mask = L.JsonMask(L.Grammar(schema), vocab, tok)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=LL_OPTIONS)
        for pass_ in (1, 2):
            ours = replay_ours(L, mask, docs, logits)
            llg = replay_llg(llguidance, ll_tok, grammar, docs, logits)
            om, lm_ = 1000 * statistics.mean(ours), 1000 * statistics.mean(llg)
            print(f"{name:10} {pass_:5} {len(ours):6}  {om:7.3f}ms {1000 * statistics.median(ours):5.3f}ms"
                  f"  {lm_:6.3f}ms {1000 * statistics.median(llg):5.3f}ms  {om / step:9.2%} {lm_ / step:8.2%}")
            results[f"{name}_pass{pass_}"] = {"ours_ms": om, "llguidance_ms": lm_}
    print("\n(ratios are the mask's mean time per token divided by the median unconstrained decoding step, same run)")


if __name__ == "__main__":
    run_cli(main)
