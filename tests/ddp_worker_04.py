"""Run by tests/test_04_ddp.py under torchrun (2 CPU processes, gloo): a few data-parallel training steps of
lesson 04's own train_step; rank 0 writes the per-step losses (averaged over ranks), the largest weight
difference between the ranks after each step, and the final weights, as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker_04.py OUT.json OPTIMIZER
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
tg = importlib.import_module("04_tiny_gpt")
from common.training import Distributed  # noqa: E402

# shared with the single-process reference in tests/test_04_ddp.py
ARGS = ["--preset", "quick", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--seed", "3"]
VOCAB, STEPS = 20, 4


def corpus() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))


def main(out: str, optimizer: str) -> None:
    torch.set_num_threads(1)
    dist = Distributed("cpu")                      # reads WORLD_SIZE/RANK/MASTER_* set by torchrun
    a = tg.parse_args([*ARGS, "--optimizer", optimizer])
    torch.manual_seed(a.seed)                      # same initial weights on every rank (DDP also broadcasts them)
    raw = tg.GPT(**tg.model_config(a, VOCAB))
    model = dist.wrap(raw)
    opt = tg.build_optimizer(raw, a)
    gen = torch.Generator().manual_seed(a.seed + dist.rank)  # each rank its own batches, as in the lesson
    data, losses, rank_diffs = corpus(), [], []
    for _ in range(STEPS):
        loss = tg.train_step(model, opt, gen, data, a, 1.0, dist)
        flat = torch.cat([p.detach().flatten() for p in raw.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.world)]
        tdist.all_gather(gathered, flat)
        rank_diffs.append(max((g - gathered[0]).abs().max().item() for g in gathered))
        total = torch.tensor([loss], dtype=torch.float64)
        tdist.all_reduce(total)
        losses.append(total.item() / dist.world)
    if dist.master:
        Path(out).write_text(json.dumps({"world": dist.world, "losses": losses, "rank_diffs": rank_diffs,
                                         "weights": flat.tolist()}), encoding="utf-8")
    del model                                      # the DDP wrapper holds the process group: drop it first
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
