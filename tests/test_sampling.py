"""Sampling rules: temperature -> 0 is greedy, top-k / top-p never leave their allowed set, seeds repeat.
(Seeded generation with the model, batched and not: tests/test_generate.py.)"""
from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from common.sampling import check_sampling_args, sample_next_token, sampling_probs


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(1)
    return torch.randn(500, generator=g) * 3


def test_low_temperature_approaches_greedy(logits):
    assert sample_next_token(logits, temperature=0) == int(logits.argmax())
    # the two largest logits differ by only ~0.003 here, so "close to 0" must be well below that gap
    p = sampling_probs(logits, temperature=1e-4)
    assert p[logits.argmax()] > 0.999
    g = torch.Generator().manual_seed(0)
    assert all(sample_next_token(logits, 1e-4, generator=g) == int(logits.argmax()) for _ in range(50))


def test_temperature_flattens(logits):
    ent = []
    for t in (0.5, 1.0, 2.0):
        p = sampling_probs(logits, t)
        assert torch.isclose(p.sum(), torch.tensor(1.0))
        ent.append(-(p[p > 0] * p[p > 0].log()).sum().item())
    assert ent[0] < ent[1] < ent[2]


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_never_outside(logits, k):
    allowed = set(torch.topk(logits, k).indices.tolist())
    g = torch.Generator().manual_seed(0)
    picks = {sample_next_token(logits, 1.5, top_k=k, generator=g) for _ in range(300)}
    assert picks <= allowed
    assert (sampling_probs(logits, 1.5, top_k=k) > 0).sum() == k


@pytest.mark.parametrize("p_cut", [0.1, 0.5, 0.9])
def test_top_p_never_outside(logits, p_cut):
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    # smallest prefix of the sorted tokens whose mass reaches p (computed independently, in numpy-like loop)
    total, allowed = 0.0, set()
    for i in order.tolist():
        allowed.add(i)
        total += probs[i].item()
        if total >= p_cut:
            break
    g = torch.Generator().manual_seed(0)
    picks = {sample_next_token(logits, 1.0, top_p=p_cut, generator=g) for _ in range(300)}
    assert picks <= allowed
    kept = set(torch.nonzero(sampling_probs(logits, 1.0, top_p=p_cut)).flatten().tolist())
    assert kept == allowed


def test_seeded_runs_repeat(logits):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_next_token(logits, 1.0, top_k=50, top_p=0.95, generator=g) for _ in range(30)]
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("args", [(-0.1, 0, 1.0), (1.0, -1, 1.0), (1.0, 0, 0.0), (1.0, 0, 1.5)])
def test_bad_sampling_args_rejected(args):
    with pytest.raises(UserError):
        check_sampling_args(*args)
