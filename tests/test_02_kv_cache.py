"""Tests for lesson 02 (KV cache): toy cached == uncached, real-model greedy tokens identical with and
without the cache (fp32), KV byte formula == measured cache size, the quick run's results.json, bad flags."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

SCRIPT = "02_understand_kv_cache.py"


@pytest.fixture(scope="module")
def lesson():
    return importlib.import_module("02_understand_kv_cache")


def _toy_reference(w, n):
    """Independent reference: recompute every step with an explicit per-position loop (no matrix tricks)."""
    d = w["x0"].shape[0]
    xs, outs = [w["x0"]], []
    for _ in range(n):
        t = len(xs) - 1
        q = xs[t] @ w["q"]
        ks = [x @ w["k"] for x in xs]
        vs = [x @ w["v"] for x in xs]
        s = np.array([q @ k for k in ks]) / np.sqrt(d)
        p = np.exp(s - s.max())
        p /= p.sum()
        y = sum(pi * vi for pi, vi in zip(p, vs)) @ w["o"]
        outs.append(y)
        xs.append(np.tanh(y))
    return np.stack(outs)


def test_toy_cached_equals_uncached_and_reference(lesson):
    w = lesson.toy_weights(16, seed=3)
    a = lesson.toy_generate_no_cache(w, 20)
    b = lesson.toy_generate_cached(w, 20)
    ref = _toy_reference(w, 20)
    assert a.shape == b.shape == (20, 16)
    np.testing.assert_allclose(a, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b, ref, rtol=1e-10, atol=1e-12)
    # the outputs really depend on the weights (a broken loop returning constants would fail here)
    assert not np.allclose(b, lesson.toy_generate_cached(lesson.toy_weights(16, seed=4), 20))


def test_toy_mac_counts(lesson):
    # closed forms of the sums over L = 1..n (independent of the lesson's loop)
    for n, d in ((1, 8), (37, 16), (128, 32)):
        no_cache = 4 * d * d * n * (n + 1) // 2 + 2 * d * n * (n + 1) * (2 * n + 1) // 6
        cached = 4 * d * d * n + d * n * (n + 1)
        assert lesson.toy_macs(n, d) == (no_cache, cached)


def test_next_token_logits_matches_model_forward(lesson, local_fp32):
    """The lesson's last-position-only forward must equal the full model's last row, with and without cache."""
    model = local_fp32.model
    ids = torch.tensor([local_fp32.tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        full = model(ids)[0, -1]
        mine = lesson.next_token_logits(model, ids)
        cache = model.new_cache(1, 16)
        lesson.next_token_logits(model, ids[:, :-1], cache)
        step = lesson.next_token_logits(model, ids[:, -1:], cache)
    torch.testing.assert_close(mine, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-3)


def test_real_model_cached_tokens_equal_uncached_fp32(lesson, local_fp32):
    prompt = local_fp32.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}])
    tok_c, t_c, cache = lesson.greedy_timed(local_fp32, prompt, 12, True, "cached")
    tok_n, t_n, _ = lesson.greedy_timed(local_fp32, prompt, 12, False, "no cache")
    assert tok_c == tok_n
    assert len(t_c) == len(t_n) == 12
    assert cache.length == len(prompt) + 11
    # independent check against the library's own generate() (full-logit model forward, no cache)
    ref = list(local_fp32.generate(prompt, 12, use_cache=False, stop_ids=set()))
    assert tok_c == ref


def test_kv_bytes_formula_equals_measured(lesson, local_fp32):
    cfg, model = local_fp32.config, local_fp32.model
    cache = model.new_cache(1, 32)
    with torch.inference_mode():
        model(torch.tensor([list(range(100, 117))]), cache=cache)
    assert cache.length == 17
    # count the bytes of the filled slices directly from the tensors (not through nbytes_used)
    direct = sum(t[:, :, :cache.length].numel() * t.element_size() for t in cache.k + cache.v)
    formula = lesson.kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 4)
    assert formula == 2 * 30 * 3 * 64 * 4   # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32
    assert cache.nbytes_used() == direct == formula * 17


def test_quick_run_writes_results(repo_root, script_env, tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--seq-len", "64", "--d-model", "32",
                        "--new-tokens", "12", "--lengths", "6,12"],
                       cwd=repo_root, env=script_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "outputs" / "02_understand_kv_cache" / "results.json").read_text("utf-8"))
    toy = res["toy"]
    assert toy["allclose"] is True and len(toy["table"]) >= 2
    assert all(row["speedup"] > 0 and row["mac_ratio"] > 1 for row in toy["table"])
    real = res["real"]
    assert real["identical_tokens"] is True and real["dtype"] == "fp32"
    assert [row["new_tokens"] for row in real["table"]] == [6, 12]
    assert all(row["speedup"] > 0 for row in real["table"])
    assert real["profile"]["cached_step"] and real["profile"]["no_cache_step"]
    assert (tmp_path / "outputs" / "02_understand_kv_cache" / "time_per_token_fp32.png").stat().st_size > 1000
    mem = res["memory"]
    assert mem["bytes_per_token_formula"] == mem["bytes_per_token_measured"] == 46080
    assert {m["model"] for m in mem["published_models_fp16"]} >= {"Llama-2-7B (MHA)", "Llama-3-8B (GQA)"}


@pytest.mark.parametrize("flags", [
    ["--new-tokens", "0"],
    ["--lengths", "a,b"],
    ["--new-tokens", "8", "--lengths", "16"],
    ["--dtype", "fp16"],
    ["--part", "nope"],
    ["--seq-len", "-3"],
])
def test_bad_flags_exit_nonzero(repo_root, script_env, flags):
    r = subprocess.run([sys.executable, SCRIPT, "--quick", *flags], cwd=repo_root, env=script_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
