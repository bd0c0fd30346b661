"""Benchmark: why common/local_model.py stores the fp32 LM head column-major.

For one new token the LM head is a matrix-vector product with the tied 49152 x 576 embedding matrix
(113 MB in fp32), read from memory once per token. The values and shape are the same either way; only
the memory layout differs. This times F.linear(x, W) with W stored row-major (as loaded) and
column-major (W.t().contiguous().t()), side by side, and checks the results agree.

    python benchmarks/lm_head_layout.py [--threads N] [--repeats 30]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.errors import run_cli  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description="LM head: row-major vs column-major matrix-vector product")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dim", type=int, default=576)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from common.device import setup_threads

    threads = setup_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w_row = torch.randn(args.vocab, args.dim, generator=g)
    w_col = w_row.t().contiguous().t()              # same values and shape, column-major storage
    x = torch.randn(1, 1, args.dim, generator=g)
    assert torch.allclose(F.linear(x, w_row), F.linear(x, w_col), atol=1e-4)
    mb = w_row.nbytes / 1e6
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"{args.vocab} x {args.dim} fp32 = {mb:.1f} MB, {threads} threads, {os.cpu_count()} CPUs{load}")
    results = {}
    for name, w in (("row-major", w_row), ("column-major", w_col)):
        s = median_seconds(lambda: F.linear(x, w), args.repeats)
        results[name] = s
        print(f"  {name:<13} {s * 1e3:7.2f} ms  ({w_row.nbytes / s / 1e9:5.1f} GB/s)")
    print(f"  column-major is {results['row-major'] / results['column-major']:.2f}x faster")


if __name__ == "__main__":
    run_cli(main)
