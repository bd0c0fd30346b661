"""Lesson 11 (mixture of experts): the MoE layer against its definitions, the balancing methods, the published
configs, the lesson's shape and docs, and (slow) the --quick run end to end."""
from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

from common.moe import PUBLISHED, char_class, char_class_matrix, param_counts
from common.tiny_gpt import MLP, Block, build_optimizer

REPO = Path(__file__).resolve().parents[1]
moe_lesson = importlib.import_module("11_moe")
MoE = moe_lesson.MoE


@pytest.fixture(autouse=True)
def _restore(restore_torch_globals):
    yield


def naive(m, x):
    """Every token walks to its k experts one by one (the definition the vectorised dispatch must equal)."""
    probs, idx, w = m.route(x)
    rows = []
    for n in range(x.shape[0]):
        y = sum(w[n, j] * m.experts[int(idx[n, j])](x[n]) for j in range(m.k))
        rows.append(y + (m.shared(x[n]) if m.shared is not None else 0))
    return torch.stack(rows)


def test_one_expert_top1_equals_the_dense_mlp_it_wraps():
    torch.manual_seed(0)
    mlp = MLP(16, kind="relu2", hidden=32)
    m = MoE(16, n_experts=1, top_k=1, hidden=32)
    m.experts[0].load_state_dict(mlp.state_dict())
    x = torch.randn(3, 7, 16)
    assert torch.allclose(m(x), mlp(x), atol=1e-6)


@pytest.mark.parametrize("E,k,shared", [(8, 2, 0), (4, 1, 0), (6, 3, 1), (8, 2, 2)])
def test_dispatch_and_combine_equal_a_per_token_loop(E, k, shared):
    torch.manual_seed(1)
    m = MoE(16, E, k, hidden=8, shared=shared)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        fast = m(x).reshape(-1, 16)
        slow = naive(m, x.reshape(-1, 16))
    assert torch.allclose(fast, slow, atol=1e-5)
    assert int(m.stats["counts"].sum()) == k * 18 and m.stats["dropped"] == 0


def test_balancing_loss_is_one_when_uniform_and_larger_when_routing_collapses():
    E = 8
    uniform = torch.full((E,), 1 / E)
    assert moe_lesson.balancing_loss(uniform, uniform).item() == pytest.approx(1.0)
    onehot = torch.zeros(E)
    onehot[0] = 1.0
    assert moe_lesson.balancing_loss(onehot, onehot).item() == pytest.approx(E)
    half = torch.tensor([0.5, 0.5] + [0.0] * (E - 2))               # top-2 collapsed onto two experts
    assert moe_lesson.balancing_loss(half, half).item() > 1.0
    # the layer's own aux_loss: a router that sends every token the same way gives more than 1
    m = MoE(16, E, 2, hidden=8)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 5.0
        m.router.weight[1] = 4.0
    m(torch.rand(2, 8, 16) + 0.5)
    assert m.aux_loss.item() > 2.0


def test_bias_update_changes_the_choice_but_never_the_combine_weights():
    torch.manual_seed(2)
    m = MoE(16, 8, 2, hidden=8)
    x = torch.randn(40, 16)
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    m(x[None])
    probs0, idx0, w0 = m.route(x)
    for _ in range(50):
        moe_lesson.update_bias(m, 0.05)
    assert m.bias.abs().sum() > 0
    assert all(torch.equal(params[n], p) for n, p in m.named_parameters())   # no weight touched
    probs1, idx1, w1 = m.route(x)
    assert torch.equal(probs0, probs1)                                      # scores are bias-free
    assert not torch.equal(idx0, idx1)                                      # ...but the choice moved
    expected = probs1.gather(1, idx1)
    assert torch.allclose(w1, expected / expected.sum(-1, keepdim=True))    # weights = unbiased probabilities
    # same (token, expert) pair chosen before and after -> same weight whenever the pair of experts is the same
    same = (idx0 == idx1).all(-1)
    assert same.any() and torch.allclose(w0[same], w1[same])


def test_bias_moves_load_toward_uniform():
    torch.manual_seed(3)
    m = MoE(16, 4, 1, hidden=8)
    with torch.no_grad():
        m.router.weight[0] += 0.5                                           # expert 0 is favoured
    x = torch.randn(512, 16)
    m(x[None])
    before = m.stats["counts"].max().item()
    for _ in range(300):
        m(x[None])
        moe_lesson.update_bias(m, 0.01)
    m(x[None])
    assert m.stats["counts"].max().item() < before
    assert m.stats["counts"].max().item() <= 2 * 512 / 4


def test_router_gets_gradients_from_the_loss_and_the_balancing_loss():
    torch.manual_seed(4)
    m = MoE(16, 8, 2, hidden=8)
    m(torch.randn(2, 6, 16)).square().sum().backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    m.zero_grad()
    m(torch.randn(2, 6, 16))
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0


def test_dropped_tokens_are_counted_and_pass_through_the_residual():
    torch.manual_seed(5)
    blk = Block(16, 2, norm="rms", rope=True, qk_norm=True, mlp="relu2")
    m = MoE(16, 2, 1, hidden=8, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0                                            # every token prefers expert 0
    blk.mlp = m
    x = torch.rand(1, 10, 16) + 0.5                                         # positive: x·w0 > x·w1 = 0
    with torch.no_grad():
        y = blk(x)
        h = x + blk.attn(blk.ln1(x))                                        # the block without its MLP
    assert m.capacity(10) == 5 and m.stats["dropped"] == 5                 # 10 tokens, cap 5 on expert 0
    assert m.stats["counts"].tolist() == [10, 0]                           # the routing decision is counted
    dropped = (y - h).abs().sum(-1)[0] < 1e-7
    assert dropped.sum().item() == 5 and dropped[5:].all()                  # the later tokens overflow
    assert torch.allclose(y[0, dropped], h[0, dropped])


def test_moe_model_has_the_dense_models_active_params_and_router_stays_on_adamw():
    a = moe_lesson.parse_args([])
    dense = moe_lesson.build_model("dense", None, 84, a)
    moe = moe_lesson.build_model("moe", "bias", 84, a)
    big = moe_lesson.build_model("dense_big", None, 84, a)
    L, C, E = 4, 128, a.experts
    assert moe_lesson.count_active(moe) == moe_lesson.count_params(dense) + L * E * C   # + the routers
    assert moe_lesson.count_params(big) == moe_lesson.count_params(moe) - L * E * C
    opt = build_optimizer(moe, moe_lesson.SimpleNamespace(**moe_lesson.TRAIN))
    muon = {id(p) for p in opt.opts[0].param_groups[0]["params"]}
    assert all(id(blk.mlp.router.weight) not in muon for blk in moe.blocks)
    assert all(id(blk.mlp.experts[0].fc.weight) in muon for blk in moe.blocks)


def test_published_configs_give_the_reported_totals():
    for name, c in PUBLISHED.items():
        p = param_counts(c)
        assert p["total"] == pytest.approx(c["reported_total"], rel=0.02), name
        assert p["active"] == pytest.approx(c["reported_active"], rel=0.04), name
    assert PUBLISHED["DeepSeek-V2"]["reported_active"] == 21e9          # the paper's number, not "28B"


def test_char_classes():
    assert [char_class(c) for c in " \naxQ,7"] == [0, 1, 2, 3, 4, 5, 6]
    m = char_class_matrix("aab ", torch.tensor([1, 1, 0, 2]), 3)
    assert m[2] == [0.0, 1.0, 0.0] and m[3] == [1.0, 0.0, 0.0] and m[0] == [0.0, 0.0, 1.0]


def test_lesson_shape_and_bad_flags(run_script):
    from test_cli import _lesson_shape_problems

    assert _lesson_shape_problems(REPO / "11_moe.py") == []
    for args in (["--top-k", "9"], ["--experts", "0"], ["--quick", "--seed", "x"]):
        r = run_script("11_moe.py", *args)
        err = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(err) == 1 and re.search(r"[\u4e00-\u9fff]", err[0]), r.stderr


def test_doc_has_exercises_self_check_and_real_flags():
    text = (REPO / "docs" / "11_moe.md").read_text(encoding="utf-8")
    assert re.search(r"^#+ .*练习", text, re.M) and re.search(r"^#+ .*自测", text, re.M)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        moe_lesson.parse_args(["--help"])
    flags = set()
    flags |= set(re.findall(r"(--[a-z][a-z0-9-]*)", buf.getvalue()))
    for cmd in re.findall(r"python 11_moe\.py([^\n`]*)", text):
        for flag in re.findall(r"(--[a-z][a-z0-9-]*)", cmd):
            assert flag in flags, f"docs/11_moe.md uses {flag}, which 11_moe.py does not have"
    assert "docs/11_moe.md" in (REPO / "README.md").read_text(encoding="utf-8")
    assert "11_moe.md" in (REPO / "docs" / "00_llm_fundamentals.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_quick_run_writes_results(lesson_runs):
    r = lesson_runs.run("11_moe.py", "--quick", timeout=600)
    res = json.loads((r.out_root / "11_moe" / "results.json").read_text(encoding="utf-8"))
    for part in ("equal_time", "equal_steps"):
        for name, v in res[part].items():
            for key in ("val_loss", "params_total", "params_active", "tokens_per_s", "steps", "tokens_seen"):
                assert key in v, (part, name, key)
            assert math.isfinite(v["val_loss"]) and v["val_loss"] < math.log(84) + 0.5
    assert set(res["equal_steps"]) == {"dense", "moe", "dense_big", "moe_aux", "moe_none"}
    assert all(res["equal_steps"][n]["steps"] == 6 for n in res["equal_steps"])      # --quick: --steps 6
    load = res["equal_steps"]["moe"]["load"]
    assert {"final_ratio", "max_ratio", "min_ratio", "history"} <= set(load)
    assert res["equal_time"]["moe"]["params_active"] < res["equal_time"]["moe"]["params_total"]
    for png in ("moe_curves.png", "moe_load.png", "moe_experts.png"):
        assert (r.out_root / "11_moe" / png).is_file()
