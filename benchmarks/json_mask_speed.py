"""Benchmark: per-token cost of the hand-written JSON mask (common/json_schema.py, used by lesson 07) vs llguidance,
and vs one decoding step.

Runs the lesson's own command, `07_structured_output.py --tasks N` (local model, greedy), as a subprocess and
reads its results.json: for each schema, the mean and median time its mask took per generated token inside
the generation loop (advance the state by the last token + look up / build the allowed set + masked_fill;
the mask starts from empty caches and builds its per-state masks as it meets new states), and the mean
unconstrained decoding step of the same run. Then the documents the lesson generated under the mask are
replayed token by token through llguidance on the same tokenizer, timing what a generation loop pays:
consume_token + fill the bitmask + apply it to the logits. Pass 1 starts llguidance from empty caches
(it builds its own lexer caches); pass 2 replays the same documents again (warm).

    flock /tmp/llm-timing.lock python benchmarks/json_mask_speed.py [--threads 2] [--docs 20] [--part all]

The lesson's own run (results.json, plot) stays in outputs/benchmarks/json_mask_speed_run/.

--part server (also part of --part all): the same mask on lesson 06's decode path. Runs `06_serve.py` as a
subprocess (the lesson's own command), sends --server-requests requests one at a time without a constraint
(ignore_eos, --server-tokens tokens each), then the same number with response_format json_schema (the
support schema) and reads the server's /metrics before and after each phase: the mask's seconds per
constrained token (llm_constraint_mask_seconds_total / llm_constrained_tokens_total: the per-row mask and
the state advance inside Engine.step) divided by the mean unconstrained time per output token
(llm_time_per_output_token_seconds: one decode step at batch size 1), and the constrained time per token.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.cli import positive_int  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import output_dir  # noqa: E402

LL_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
              "json_allowed_escapes": '"\\bfnrt'}
SCHEMAS = {"support": "support.schema.json", "review": "review.schema.json"}


def run_lesson(docs: int, threads: int | None, out: Path) -> dict:
    """`07_structured_output.py` on the local model with `docs` tasks per schema (one short agent task, BM25,
    so that the extraction part dominates); its results.json."""
    cmd = [sys.executable, str(REPO / "07_structured_output.py"), "--backend", "local", "--tasks", str(docs),
           "--agent-tasks", "1", "--max-steps", "1", "--retriever", "bm25", "--out-dir", str(out)]
    cmd += ["--threads", str(threads)] if threads else []
    print("running: " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL).returncode
    if rc:
        raise UserError(f"07_structured_output.py 以退出码 {rc} 结束（见上面的输出）。")
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def replay_llg(llguidance, ll_tok, grammar, docs, n_vocab: int) -> list[float]:
    """llguidance.torch's apply helper is torch.compile'd (compiles on first use); we unpack the bits
    with numpy instead and use the same masked_fill as the lesson, so only the mask computation differs.
    A document llguidance refuses (it should not happen) is replayed up to that token."""
    import llguidance.numpy as lln
    import numpy as np
    import torch

    times = []
    bitmask = lln.allocate_token_bitmask(1, ll_tok.vocab_size)
    logits = torch.randn(n_vocab)
    for ids in docs:
        m = llguidance.LLMatcher(ll_tok, grammar)
        for i in range(len(ids) + 1):
            t = time.perf_counter()
            if i and not m.consume_token(ids[i - 1]):
                break
            lln.fill_next_token_bitmask(m, bitmask)
            allowed = torch.from_numpy(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n_vocab].astype(bool))
            logits.masked_fill(~allowed, float("-inf"))
            times.append(time.perf_counter() - t)
    return times


def metrics(base: str) -> dict[str, float]:
    """The server's Prometheus counters and histogram sums/counts (unlabelled series only)."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return {ln.split()[0]: float(ln.split()[-1]) for ln in lines if ln and not ln.startswith("#") and "{" not in ln}


def post(base: str, key: str, body: dict) -> dict:
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def start_server(args, key: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "06_serve.py"), "--port", str(port), "--max-batch", "2",
           "--out-dir", str(output_dir("benchmarks") / "json_mask_speed_server")]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    print("running: " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "LLM_API_KEYS": key}, stdout=subprocess.DEVNULL)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=5):
                return proc, base
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise UserError("06_serve.py 没能启动（见上面的输出）。")


def server_part(args) -> dict:
    """Mask cost per token on lesson 06's decode path vs its unconstrained time per output token."""
    key = "bench-" + os.urandom(8).hex()
    schema = json.loads((REPO / "data" / "structured" / "support.schema.json").read_text(encoding="utf-8"))
    tasks = [json.loads(x) for x in (REPO / "data" / "structured" / "support_tasks.jsonl").read_text().splitlines()]
    fmt = {"type": "json_schema", "json_schema": {"name": "support", "schema": schema, "strict": True}}
    proc, base = start_server(args, key)
    try:
        model = json.loads(urllib.request.urlopen(urllib.request.Request(
            base + "/v1/models", headers={"Authorization": f"Bearer {key}"}), timeout=30).read())["data"][0]["id"]
        phases = {}
        for phase, extra in (("free", {"ignore_eos": True}), ("constrained", {"response_format": fmt})):
            before = metrics(base)
            for t in tasks[:args.server_requests]:
                msg = [{"role": "user", "content": "Extract intent, order_id, urgent and items as JSON: " + t["message"]}]
                post(base, key, {"model": model, "messages": msg, "max_tokens": args.server_tokens, "temperature": 0,
                                 **extra})
            after = metrics(base)
            phases[phase] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tpot = "llm_time_per_output_token_seconds"
    free_ms = 1000 * phases["free"][tpot + "_sum"] / max(1.0, phases["free"][tpot + "_count"])
    con = phases["constrained"]
    mask_ms = 1000 * con["llm_constraint_mask_seconds_total"] / max(1.0, con["llm_constrained_tokens_total"])
    con_ms = 1000 * con[tpot + "_sum"] / max(1.0, con[tpot + "_count"])
    out = {"requests": args.server_requests, "max_tokens": args.server_tokens,
           "constrained_tokens": con["llm_constrained_tokens_total"], "mask_ms_per_token": mask_ms,
           "unconstrained_ms_per_token": free_ms, "constrained_ms_per_token": con_ms, "overhead_ratio": mask_ms / free_ms}
    print(f"\nserver (06_serve.py, one request at a time): mask {mask_ms:.3f} ms per constrained token "
          f"({out['constrained_tokens']:.0f} tokens), unconstrained time per output token {free_ms:.1f} ms "
          f"-> {mask_ms / free_ms:.2%} of a decode step; constrained time per output token {con_ms:.1f} ms")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="JSON mask per-token cost: lesson 07 vs llguidance vs a decoding step, "
                                            "and on lesson 06's server")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--docs", type=positive_int, default=20, help="documents (tasks) per schema")
    p.add_argument("--part", choices=("all", "lesson", "server"), default="all",
                   help="lesson = lesson 07's run + llguidance replay; server = the mask inside 06_serve.py's engine")
    p.add_argument("--server-requests", type=positive_int, default=8, help="requests per phase (free, constrained)")
    p.add_argument("--server-tokens", type=positive_int, default=48, help="max_tokens of each server request")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.part in ("all", "server"):
        server = server_part(args)
        path = output_dir("benchmarks") / "json_mask_speed_server.json"
        path.write_text(json.dumps(server, indent=2), encoding="utf-8")
        if args.part == "server":
            return
    res = run_lesson(args.docs, args.threads, output_dir("benchmarks") / "json_mask_speed_run")
    import llguidance
    import llguidance.tiktoken

    from common.tokenizer import load_tokenizer

    tok = load_tokenizer()
    t0 = time.perf_counter()
    ll_tok = llguidance.tiktoken.lltokenizer_from_encoding(tok.enc, n_vocab=tok.n_vocab, eos_token=tok.im_end)
    step = res["mask_overhead"]["unconstrained_step_ms"]
    print(f"threads {args.threads or 'all'}   load average {open('/proc/loadavg').read().split()[:3]}")
    print(f"setup: llguidance tokenizer {time.perf_counter() - t0:.2f} s")
    print(f"unconstrained decoding step (mean, lesson run): {step:.1f} ms\n")
    print(f"{'schema':10} {'who':14} {'tokens':>6}  {'mean':>8} {'median':>8}  {'/step':>7}")
    results = {"unconstrained_step_ms": step}
    for name, schema_file in SCHEMAS.items():
        c = res["tasks"][name]["constrained"]
        docs = [tok.encode(o["output"]) for o in c["outputs"]]
        print(f"{name:10} {'ours (lesson)':14} {'':>6}  {c['mask_ms_mean']:6.3f}ms {c['mask_ms_median']:6.3f}ms"
              f"  {c['mask_ms_mean'] / step:7.2%}")
        results[f"{name}_ours"] = {"ours_ms": c["mask_ms_mean"], "ours_median_ms": c["mask_ms_median"],
                                   "states": res["tasks"][name].get("mask_states")}
        schema = json.loads((REPO / "data" / "structured" / schema_file).read_text(encoding="utf-8"))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=LL_OPTIONS)
        for pass_ in (1, 2):
            llg = replay_llg(llguidance, ll_tok, grammar, docs, tok.n_vocab)
            mean, median = 1000 * statistics.mean(llg), 1000 * statistics.median(llg)
            print(f"{name:10} {f'llguidance p{pass_}':14} {len(llg):6}  {mean:6.3f}ms {median:6.3f}ms  {mean / step:7.2%}")
            results[f"{name}_llguidance_pass{pass_}"] = {"llguidance_ms": mean, "llguidance_median_ms": median,
                                                         "tokens": len(llg)}
    (output_dir("benchmarks") / "json_mask_speed.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("\n(ours: the lesson's mask inside its generation loop, cold caches filled as states are met; llguidance:"
          " the same documents replayed, pass 1 cold, pass 2 warm; /step = mean time per token divided by the mean"
          " unconstrained decoding step of the lesson's run)")


if __name__ == "__main__":
    run_cli(main)
