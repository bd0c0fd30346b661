"""Lesson 04, "from GPT-2 to today": each modern component against an independent reference, and a
bit-exact resume for every variant. (Data parallel: tests/test_04_ddp.py.)"""
from __future__ import annotations

import importlib
import json
import math
import random

import pytest
import torch

tg = importlib.import_module("04_tiny_gpt")


@pytest.fixture(autouse=True, scope="module")
def _restore(restore_torch_globals, no_torch_export):   # no real torch.export: no test here loads model.pt2
    yield


def rope_reference(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE as complex multiplication: pair i = x[i] + j·x[i+D/2], rotated by e^{j·t·θi}, θi = base^(-2i/D)."""
    T, D = x.shape[-2], x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta[None, :]
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_rope_matches_complex_rotation_and_preserves_norms():
    x = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = tg.rope_tables(10, 16, x.device)
    y = tg.apply_rope(x, cos, sin)
    assert torch.allclose(y, rope_reference(x), atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)      # a rotation keeps lengths
    assert torch.equal(y[..., 0, :], x[..., 0, :])                          # position 0: angle 0
    assert not torch.allclose(y[..., 1:, :], x[..., 1:, :], atol=1e-3)     # later positions do move


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    T, D = 12, 16
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    cos, sin = tg.rope_tables(T, D, q.device)
    Q = tg.apply_rope(q.expand(1, 1, T, D), cos, sin)[0, 0]  # the same query content at every position
    K = tg.apply_rope(k.expand(1, 1, T, D), cos, sin)[0, 0]
    S = Q @ K.T                                              # S[m, n] = score of query at m with key at n
    for m in range(T):
        for n in range(T):
            s = min(T - 1 - m, T - 1 - n)
            assert abs(S[m, n] - S[m + s, n + s]) < 1e-4       # shift both positions: same score
    assert abs(S[5, 2] - S[5, 4]) > 1e-3                     # a different distance gives a different score


def test_newton_schulz_is_close_to_the_svd_polar_factor():
    for shape in [(64, 32), (32, 96)]:                       # tall and wide
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh                                       # the orthogonal factor of G = (U Vh)(V S Vh)
        # The classic cubic iteration (1.5, -0.5, 0) converges to the polar factor itself.
        exact = tg.newton_schulz(G, steps=60, coeffs=(1.5, -0.5, 0.0))
        assert (exact - polar).abs().max() < 1e-6
        # Muon's fast quintic coefficients, 5 steps: singular values only roughly 1 (by design), same direction.
        fast = tg.newton_schulz(G.float()).double()
        sv = torch.linalg.svdvals(fast)
        assert sv.min() > 0.5 and sv.max() < 1.3, sv
        cos = (fast * polar).sum() / (fast.norm() * polar.norm())
        assert cos > 0.97, cos


def test_qk_norm_and_rope_attention_equals_a_direct_computation():
    torch.manual_seed(3)
    C, H, T = 32, 4, 9
    D = C // H
    attn = tg.CausalSelfAttention(C, H, rope=True, qk_norm=True).eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, T, C)
    with torch.no_grad():
        q, k, v = (x @ attn.qkv.weight.T).split(C, dim=-1)
        heads = lambda t: t.view(2, T, H, D).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        rms = lambda t, w: t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
        q, k = rope_reference(rms(q, attn.q_norm.weight)), rope_reference(rms(k, attn.k_norm.weight))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, C) @ attn.proj.weight.T
        assert torch.allclose(attn(x), y, atol=1e-5)
        attn.use_sdpa = False
        assert torch.allclose(attn(x), y, atol=1e-5)


def test_rmsnorm_and_swiglu_shapes_and_sizes():
    norm = tg.RMSNorm(8)
    x = torch.randn(3, 8) * 5
    y = norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-4)   # unit root-mean-square
    gelu, swiglu = tg.MLP(128, kind="gelu"), tg.MLP(128, kind="swiglu")
    n_gelu, n_swiglu = tg.count_params(gelu), tg.count_params(swiglu)
    assert abs(n_swiglu - n_gelu) / n_gelu < 0.02                          # same budget, three matrices
    assert swiglu(torch.randn(2, 5, 128)).shape == (2, 5, 128)


def test_muon_only_gets_the_block_matrices():
    a = tg.parse_args(["--preset", "speedrun"])
    model = tg.GPT(**tg.model_config(a, vocab_size=50))
    opt = tg.build_optimizer(model, a)
    muon_params = {id(p) for p in opt.opts[0].param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_params}
    assert names and all(n.startswith("blocks.") and "norm" not in n and "ln" not in n for n in names)
    assert "wte.weight" not in names and "lm_head.weight" not in names
    assert len(muon_params) + sum(len(g["params"]) for g in opt.opts[1].param_groups) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    lines = ["ROMEO: But soft, what light?", "JULIET: O Romeo, Romeo!", "To be, or not to be.", "春眠不觉晓，处处闻啼鸟。"]
    p = tmp_path_factory.mktemp("data") / "tiny.txt"
    p.write_text("\n".join(rng.choice(lines) for _ in range(1200)), encoding="utf-8")
    return p


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--evals", "2", "--device", "cpu", "--lr", "1e-2", "--warmup-iters", "3"]
VARIANTS = {
    "rms": ["--norm", "rms"], "rope": ["--pos", "rope"], "qknorm": ["--qk-norm", "on"], "relu2": ["--mlp", "relu2"],
    "swiglu": ["--mlp", "swiglu"], "untied": ["--head", "untied"], "muon": ["--optimizer", "muon"],
    "speedrun": ["--preset", "speedrun"],
}


def _resume_matches_uninterrupted(tmp_path, text_file, flags):
    base = ["--data", str(text_file), *flags, *TINY, "--max-iters", "10"]
    full, part = tmp_path / "full", tmp_path / "part"
    tg.main([*base, "--out-dir", str(full)])
    tg.main([*base, "--out-dir", str(part), "--stop-after", "4"])
    preset = "speedrun" if "speedrun" in flags else "small"
    tg.main(["--resume", "--out-dir", str(part), "--preset", preset])
    read = lambda d: json.loads((d / preset / "results.json").read_text(encoding="utf-8"))  # noqa: E731
    r_full, r_res = read(full), read(part)
    assert r_res["iters"] == 10 and r_res["resume_check_steps"] == 3
    assert r_res["train_loss_per_iter"] == r_full["train_loss_per_iter"]
    tg.main(["--sample-only", "--out-dir", str(part), "--preset", preset, "--prompt", "ROMEO:",
             "--max-new-tokens", "8"])


def test_resume_is_bit_exact_for_the_speedrun_recipe(tmp_path, text_file):
    _resume_matches_uninterrupted(tmp_path, text_file, VARIANTS["speedrun"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "speedrun"])
def test_resume_is_bit_exact_for_each_variant(tmp_path, text_file, variant):
    _resume_matches_uninterrupted(tmp_path, text_file, VARIANTS[variant])
