"""Why lesson 06 loads its model off the main thread: one decode step, timed in three threads, side by side.

torch runs its CPU kernels on OpenMP. OpenMP (GNU libgomp, what the torch wheels use) gives every thread
that starts a parallel region its own team of worker threads and keeps that team until the thread exits.
When the teams together hold more threads than there are CPUs, libgomp stops spin-waiting for the next
parallel region and puts its workers to sleep instead, so every parallel operator waits for a wake-up.
The main thread never exits: once it has run one parallel torch op, any other thread that runs the
model (the serving engine's thread) is in that situation for the rest of the process.

This script measures it on the local model, in one process, in this order:
  1. the model is loaded in a short-lived thread (so the main thread has run no torch op yet),
  2. decode steps in a worker thread        -> the engine thread's situation in `python 06_serve.py`,
  3. the same decode steps in the main thread,
  4. the same decode steps in a new worker thread, now that the main thread holds a team
     -> what --demo and this benchmark's server measured before the fix.
For each it prints the median step time and the CPU the process used per second of wall time
(about 2.0 = both cores computing; about 1.0 = one core, the other asleep between operators).

    python benchmarks/omp_threads.py                 # int8, batch 1 and 8
    python benchmarks/omp_threads.py --dtype fp32

Results: outputs/benchmarks/omp_threads.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.errors import run_cli  # noqa: E402


def decode_steps(model, batch: int, steps: int) -> dict:
    """Prefill `batch` rows of 60 tokens, then time `steps` one-token decode steps."""
    import torch

    with torch.inference_mode():
        cache = model.new_cache(batch, 64 + steps)
        cache.reset_rows(list(range(batch)))
        model(torch.randint(0, 1000, (batch, 60)), cache=cache,
              attention_mask=torch.ones(batch, 60, dtype=torch.long), last_only=True)
        tok, mask = torch.full((batch, 1), 5), torch.ones(batch, 1, dtype=torch.long)
        times, cpu0, wall0 = [], time.process_time(), time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            model(tok, cache=cache, attention_mask=mask, last_only=True)
            times.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    times.sort()
    return {"median_ms": round(1000 * times[len(times) // 2], 2), "cpu_per_wall": round(cpu, 2)}


def in_thread(fn, *args):
    box = {}
    worker = threading.Thread(target=lambda: box.update(value=fn(*args)))
    worker.start()
    worker.join()
    return box["value"]


def main() -> int:
    import torch

    from common.local_model import DTYPES, load_local_model
    from common.outputs import output_root

    parser = argparse.ArgumentParser(prog="benchmarks/omp_threads.py", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="int8")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    model = in_thread(lambda: load_local_model(dtype=args.dtype, device=torch.device("cpu")).model)
    rows = {}
    for b in batches:       # first the worker threads: the main thread must not run torch before step 3
        rows[b] = {"worker_clean": in_thread(decode_steps, model, b, args.steps)}
    for b in batches:
        rows[b]["main"] = decode_steps(model, b, args.steps)
    for b in batches:
        rows[b]["worker_after_main"] = in_thread(decode_steps, model, b, args.steps)
    print(f"dtype {args.dtype}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    print(f"{'batch':>5} | {'worker (main idle)':>22} | {'main thread':>18} | {'worker after main ran torch':>28}")
    for b, r in rows.items():
        cells = [f"{r[k]['median_ms']:.1f} ms cpu {r[k]['cpu_per_wall']:.2f}"
                 for k in ("worker_clean", "main", "worker_after_main")]
        print(f"{b:>5} | {cells[0]:>22} | {cells[1]:>18} | {cells[2]:>28}   "
              f"slowdown {r['worker_after_main']['median_ms'] / r['worker_clean']['median_ms']:.2f}x")
    out = output_root() / "benchmarks" / "omp_threads.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dtype": args.dtype, "threads": torch.get_num_threads(), "steps": args.steps,
                               "rows": rows, "loadavg": os.getloadavg()}, indent=2), encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
