"""Lesson 04's data-parallel path, actually run: 2 CPU processes (gloo) under torchrun.

* tests/ddp_worker_04.py trains a tiny model a few steps with the lesson's own train_step wrapped in DDP;
  after every step the two ranks hold identical weights (all-gathered, compared exactly);
* the loss and the weights match ONE process that trains on the same global batch (both ranks' batches
  concatenated), within 1e-5: DDP averages the ranks' gradients with an all-reduce, which sums in a
  different order than one big batch does, so float32 results agree to rounding, not bit for bit;
* the lesson script itself runs under torchrun end to end.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
worker = importlib.import_module("ddp_worker_04")
tg = importlib.import_module("04_tiny_gpt")
from common.training import Distributed  # noqa: E402

TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg", **env)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def single_process_reference(optimizer: str):
    """One process, global batch = rank 0's batch + rank 1's batch for every micro-step."""
    a = tg.parse_args([*worker.ARGS, "--optimizer", optimizer])
    torch.manual_seed(a.seed)
    model = tg.GPT(**tg.model_config(a, worker.VOCAB))
    opt = tg.build_optimizer(model, a)
    gens = [torch.Generator().manual_seed(a.seed + r) for r in range(2)]
    data, losses = worker.corpus(), []
    for _ in range(worker.STEPS):
        loss_sum = 0.0
        for _ in range(a.grad_accum):
            offs = torch.cat([torch.randint(len(data) - a.block_size - 1, (a.batch_size,), generator=g) for g in gens])
            x, y = tg.get_batch(data, offs, a.block_size)
            _, loss = model(x, y)
            (loss / a.grad_accum).backward()
            loss_sum += loss.item() / a.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum)
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_ranks_stay_identical_and_match_one_process(tmp_path, optimizer):
    out = tmp_path / "ddp.json"
    r = torchrun(str(REPO / "tests" / "ddp_worker_04.py"), str(out), optimizer)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["world"] == 2
    assert res["rank_diffs"] == [0.0] * worker.STEPS            # identical weights on both ranks after each step
    ref_losses, ref_weights = single_process_reference(optimizer)
    assert max(abs(x - y) for x, y in zip(res["losses"], ref_losses)) < TOL, (res["losses"], ref_losses)
    assert (torch.tensor(res["weights"]) - ref_weights).abs().max().item() < TOL


@pytest.mark.slow
def test_lesson_runs_under_torchrun(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("ROMEO: But soft, what light?\nJULIET: O Romeo, Romeo!\n" * 300, encoding="utf-8")
    r = torchrun("04_tiny_gpt.py", "--data", str(text), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                 "--block-size", "16", "--batch-size", "4", "--max-iters", "6", "--eval-iters", "2", "--evals", "2",
                 "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "small" / "results.json").read_text(encoding="utf-8"))
    assert res["world_size"] == 2 and res["iters"] == 6 and res["resume_check_steps"] == 3
    assert res["tokens_seen"] == 6 * 4 * 16 * 2                  # both ranks' batches count


def test_single_process_distributed_is_a_no_op():
    d = Distributed("cpu")
    model = torch.nn.Linear(2, 2)
    assert (d.world, d.rank, d.master, d.enabled) == (1, 0, True, False)
    assert d.wrap(model) is model and d.any_rank(True) and not d.any_rank(False)
