"""Benchmark lesson 06's server: continuous batching vs one-request-at-a-time, side by side in one run.

Runs the lesson's own demo, `06_serve.py --demo`, as a subprocess with this benchmark's load settings and
reads its results.json. The demo starts the lesson's server in its process (127.0.0.1, a free port, a
random API key; the model is loaded by the server's loader thread, so the main thread never runs a torch
op: see Engine.start) and drives it with N concurrent streaming `openai` clients for each N in --clients
(the load test is common/loadtest.py). For every N it measures, one right after the other on the same
server and the same engine code, (a) one request at a time (the engine uses 1 KV-cache row) and (b)
continuous batching (all rows): aggregate decode throughput, TTFT p50/p95 and per-token latency p50/p95.
Every request generates a fixed number of tokens (ignore_eos), drawn per request from
[load_tokens/2, load_tokens] with a seeded RNG (the same plan for both modes). The goal in the issue:
at 8 clients, batching >= 5x one-at-a-time.

    flock /tmp/llm-timing.lock python benchmarks/serve_load.py                  # 1,2,4,8,16 clients
    python benchmarks/serve_load.py --clients 1,8 --requests-per-client 2 --load-tokens 32 --threads 2

Each client sends --requests-per-client requests one after another (default 8 here; the lesson's demo
uses fewer). At the end of a round the last clients finish alone and the batch shrinks, so the report
gives two figures: over the whole round, and over the steady part while every client is still
connected (until the first client has received its last token). Any other flag goes to the lesson
unchanged (e.g. --dtype int8, --threads 2, --max-batch 8, --seed 1, --no-prefix-cache).

Results: outputs/benchmarks/serve_load.json and serve_load.png, with the load average before and after
(the machine may be shared: compare only ratios from one run); the demo's own results.json is kept in
outputs/benchmarks/serve_load_demo/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.cli import int_list, positive_int  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import output_root  # noqa: E402


FORWARDED = {"--dtype": dict(choices=("fp32", "int8")), "--threads": dict(type=positive_int),
             "--max-batch": dict(type=positive_int), "--seed": dict(type=int)}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description="Lesson 06 load test: continuous batching vs one request at a time",
                                allow_abbrev=False,
                                epilog="Any other flag goes to 06_serve.py --demo unchanged (e.g. --no-prefix-cache --prefill-chunk 32).")
    p.add_argument("--clients", type=int_list, default=[1, 2, 4, 8, 16], help="concurrent streaming clients")
    p.add_argument("--requests-per-client", type=positive_int, default=8, help="requests each client sends in turn")
    p.add_argument("--load-tokens", type=positive_int, default=32, help="tokens per request at most (half to all)")
    p.add_argument("--out-dir", type=Path, default=None, help="where serve_load.json/.png go (outputs/benchmarks)")
    lesson = p.add_argument_group("passed to the lesson (its defaults when left out)")
    for flag, kw in FORWARDED.items():
        lesson.add_argument(flag, default=None, **kw)
    args, rest = p.parse_known_args(argv)
    forwarded = [x for flag in FORWARDED for x in (flag, str(getattr(args, flag[2:].replace("-", "_"))))
                 if getattr(args, flag[2:].replace("-", "_")) is not None]
    return args, forwarded + rest


def run_demo(args, passthrough: list[str], run_dir: Path) -> dict:
    """`06_serve.py --demo` with this benchmark's settings (its output goes straight to ours); its results.json."""
    cmd = [sys.executable, str(REPO / "06_serve.py"), "--demo", "--clients", ",".join(map(str, args.clients)),
           "--requests-per-client", str(args.requests_per_client), "--load-tokens", str(args.load_tokens),
           "--out-dir", str(run_dir), *passthrough]
    print("running: " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc:
        raise UserError(f"06_serve.py --demo 以退出码 {rc} 结束（见上面的输出）。")
    return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))


def goal_line(res: dict) -> str | None:
    """The issue's goal at 8 clients, over the whole round and while all 8 were connected (None without 8)."""
    at8, steady8 = res["speedup"].get("8"), res["speedup_steady"].get("8")
    if at8 is None:
        return None
    ttft = {mode: next(r["ttft_p95_ms"] for r in res["load"][mode] if r["clients"] == 8)
            for mode in ("batching", "one_at_a_time")}
    return (f"goal: at 8 clients batching >= 5x one-at-a-time -> measured {at8:.2f}x over the whole round "
            f"({'met' if at8 >= 5 else 'NOT met'}), {steady8:.2f}x while all 8 clients were connected "
            f"({'met' if steady8 >= 5 else 'NOT met'}); TTFT p95 at 8 clients: {ttft['batching']:.0f} ms batching "
            f"vs {ttft['one_at_a_time']:.0f} ms one at a time")


def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    out_dir = args.out_dir or output_root() / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"load average before: {load_before}")
    t0 = time.perf_counter()
    run_dir = out_dir / "serve_load_demo"          # the lesson's own results.json (with the tour) stays here
    res = run_demo(args, passthrough, run_dir)
    shutil.copyfile(run_dir / "serve_load.png", out_dir / "serve_load.png")
    load_after = os.getloadavg()
    settings = res["settings"]
    print(f"\nthreads {settings['threads']}; dtype {settings['dtype']}; max batch {settings['max_batch']}")
    goal = goal_line(res)
    if goal:
        print(goal)
    print(f"load average after: {load_after} (the machine may be shared with other work)")
    out = out_dir / "serve_load.json"
    out.write_text(json.dumps({
        "load": res["load"], **{k: res[k] for k in ("speedup", "speedup_steady", "flattens_at", "ceiling")},
        "speedup_at_8": res["speedup"].get("8"), "speedup_steady_at_8": res["speedup_steady"].get("8"),
        "loadavg_before": load_before, "loadavg_after": load_after, "settings": settings, "lesson_args": passthrough,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - t0, 1)}, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"results: {out} and {out_dir / 'serve_load.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
