"""Where a decode step's time goes, and what each inference-time lever buys: SmolLM2, fp32 and int8, B = 1 and 8,
every lever off and on side by side in one process (issue 40).

Levers (all switchable on one model; none changes what the model computes beyond float rounding):
  fuse     Llama.fuse_projections(): q/k/v -> one qkv_proj, gate/up -> one gate_up_proj (load_local_model(fused=True))
  rope     RoPE as one complex multiply (Llama.set_fast_paths(rope=...)) instead of ~10 small ops per call
  norm     RMSNorm through F.rms_norm (set_fast_paths(norm=...)) instead of 6 small ops
  lm head  int8: the LM head is already an int8 dynamic Linear; "lm head fp32 (undo)" shows what that buys
           fp32: the LM head as an MKL-prepacked matmul (torch.ops.mkl._mkl_linear) vs the column-major F.linear

Each configuration runs one-token decode steps on a ragged cache with an attention mask of ones, exactly like
lesson 06's engine (rows prefilled with --prefix tokens). Configurations take turns (--rounds rounds of --steps
steps each), so that a change of load on the machine hits them alike; the median step time is reported.

    python benchmarks/decode_levers.py                       # fp32 + int8, B = 1 and 8 (~2-3 minutes on 2 cores)
    python benchmarks/decode_levers.py --dtypes int8 --batches 1 --profile

--profile prints torch.profiler's per-operator table for one B = 1 step with every lever on (per dtype).
Run it on a quiet machine; results: outputs/benchmarks/decode_levers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def mkl_packed(linear, batch_hint: int = 1):
    """The same weights behind MKL's prepacked sgemm (what inductor's freezing uses for fp32 CPU matmuls)."""
    import torch

    class MklLinear(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.in_features, self.out_features = w.shape[1], w.shape[0]
            self.w = w.contiguous()
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.w, batch_hint)

        def forward(self, x):
            shape = x.shape
            y = torch.ops.mkl._mkl_linear(x.reshape(-1, shape[-1]).contiguous(), self.packed, self.w, None, batch_hint)
            return y.reshape(*shape[:-1], self.out_features)

    return MklLinear(linear.weight.detach())


def fp32_of(qlinear):
    """An fp32 Linear with the dequantized weights of an int8 dynamic Linear (the 'before' of lever lmhead8)."""
    import torch

    w = qlinear.weight().dequantize()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=False)   # column-major, as fp32 does
    return lin


def configurations(dtype: str) -> dict:
    """name -> (fused model?, rope, norm, lm-head variant). "before" = the path as shipped before issue 40; each
    lever row changes one thing from it; "all on" = every lever that is on by default after issue 40."""
    head = "int8" if dtype == "int8" else "colmajor"
    cfgs = {
        "before": (False, False, False, head),
        "fuse": (True, False, False, head),
        "rope": (False, True, False, head),
        "norm": (False, False, True, head),
    }
    if dtype == "int8":
        cfgs["lm head fp32 (undo)"] = (False, False, False, "fp32")     # what the int8 LM head already buys
    else:
        cfgs["mkl lm head"] = (False, False, False, "mkl")
    cfgs["all on"] = (True, True, True, head)
    return cfgs


class Variant:
    """One model object whose LM head and fast paths are swapped per configuration (weights shared)."""

    def __init__(self, model, dtype: str):
        self.model, self.dtype = model, dtype
        self.heads = {"int8" if dtype == "int8" else "colmajor": model.lm_head}
        if dtype == "int8":
            self.heads["fp32"] = fp32_of(model.lm_head)
        else:
            self.heads["mkl"] = mkl_packed(model.lm_head)

    def use(self, rope: bool, norm: bool, head: str):
        self.model.set_fast_paths(rope=rope, norm=norm)
        self.model.lm_head = self.heads[head]
        return self.model


def decode_ms(model, batch: int, prefix: int, steps: int, warmup: int = 3) -> float:
    """Median ms of one decode step for `batch` rows, the way lesson 06's engine calls the model."""
    import torch

    with torch.inference_mode():
        cache = model.new_cache(batch, prefix + steps + warmup + 4)
        cache.reset_rows(list(range(batch)))
        g = torch.Generator().manual_seed(0)
        model(torch.randint(17, 1000, (batch, prefix), generator=g), cache=cache,
              attention_mask=torch.ones(batch, prefix, dtype=torch.long), last_only=True)
        tok, mask = torch.full((batch, 1), 28), torch.ones(batch, 1, dtype=torch.long)
        times = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            logits = model(tok, cache=cache, attention_mask=mask, last_only=True)
            tok = logits.argmax(-1, keepdim=True)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def ops_per_step(model) -> int:
    """How many torch operators one B = 1 decode step calls from Python (top-level ops only)."""
    import torch
    from torch.profiler import profile

    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        cache.reset_rows([0])
        one = torch.ones(1, 1, dtype=torch.long)
        model(torch.full((1, 1), 28), cache=cache, attention_mask=one, last_only=True)
        with profile() as prof:
            model(torch.full((1, 1), 28), cache=cache, attention_mask=one, last_only=True)
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith(("aten::", "quantized::")))


def profile_step(model, top: int = 15) -> str:
    import torch
    from torch.profiler import profile

    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        cache.reset_rows([0])
        model(torch.randint(17, 1000, (1, 32)), cache=cache, attention_mask=torch.ones(1, 32, dtype=torch.long))
        tok, mask = torch.full((1, 1), 28), torch.ones(1, 1, dtype=torch.long)
        for _ in range(3):
            model(tok, cache=cache, attention_mask=mask, last_only=True)
        with profile() as prof:
            for _ in range(10):
                model(tok, cache=cache, attention_mask=mask, last_only=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/decode_levers.py", description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="fp32,int8")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prefix", type=int, default=40, help="tokens already in each row's cache")
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "decode_levers.json")
    args = p.parse_args(argv)

    import torch

    from common.local_model import load_local_model

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {tuple(round(x, 2) for x in load0)}", flush=True)
    results = {}
    for dtype in args.dtypes.split(","):
        plain = Variant(load_local_model(dtype=dtype, device="cpu", verbose=False).model, dtype)
        fused = Variant(load_local_model(dtype=dtype, device="cpu", verbose=False, fused=True).model, dtype)
        cfgs = configurations(dtype)
        samples = {(name, b): [] for name in cfgs for b in batches}
        for _ in range(args.rounds):
            for name, (use_fused, rope, norm, head) in cfgs.items():
                model = (fused if use_fused else plain).use(rope, norm, head)
                for b in batches:
                    samples[(name, b)].append(decode_ms(model, b, args.prefix, args.steps))
        rows = []         # ratios: "before" time / this configuration's time (> 1 = faster)
        for name, (use_fused, rope, norm, head) in cfgs.items():
            row = {"config": name, "ops_per_step": ops_per_step((fused if use_fused else plain).use(rope, norm, head))}
            for b in batches:
                ms = sorted(samples[(name, b)])[len(samples[(name, b)]) // 2]
                row[f"B{b}_ms"], row[f"B{b}_tok_s"] = round(ms, 2), round(1000 * b / ms, 1)
            rows.append(row)
        results[dtype] = rows
        base = rows[0]
        print(f"\n{dtype}: median ms per decode step (tokens/s in aggregate), {args.rounds} rounds x {args.steps} steps")
        print(f"{'config':<22}{'ops/step':>9}" + "".join(f"{'B=' + str(b):>34}" for b in batches))
        for r in rows:
            cells = "".join(f"{r[f'B{b}_ms']:>16.2f} ms ({r[f'B{b}_tok_s']:>6.1f}/s, {base[f'B{b}_ms'] / r[f'B{b}_ms']:.2f}x)"
                            for b in batches)
            print(f"{r['config']:<22}{r['ops_per_step']:>9}{cells}")
        if args.profile:
            print(f"\n{dtype}, B = 1, every lever on: torch.profiler over 10 decode steps")
            print(profile_step(fused.use(True, True, "int8" if dtype == "int8" else "colmajor")))
        del plain, fused
    load1 = os.getloadavg()
    print(f"\nload average at start {tuple(round(x, 2) for x in load0)}, at end {tuple(round(x, 2) for x in load1)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "loadavg": [load0, load1], "prefix": args.prefix,
                                    "steps": args.steps, "rounds": args.rounds, "results": results}, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
