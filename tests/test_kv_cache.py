"""Model-level KV-cache invariants: the cache is an optimisation only and must not change the model's
output; attention weights are causal and normalised; the cache's byte count follows the formula.
(Generation with vs without the cache, and ragged/padded caches: tests/test_generate.py. Lesson 02's
own functions: tests/test_02_kv_cache.py.)"""
from __future__ import annotations

import torch


def test_cached_forward_equals_full_forward(local_fp32):
    model = local_fp32.model
    torch.manual_seed(0)
    ids = torch.randint(17, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 64)
        # prefill 25 tokens in one go, then 1 token at a time, then a chunk of 5
        parts = [model(ids[:, :25], cache=cache)]
        for t in range(25, 35):
            parts.append(model(ids[:, t:t + 1], cache=cache))
        parts.append(model(ids[:, 35:40], cache=cache))
    cached = torch.cat(parts, dim=1)
    assert cache.length == 40
    assert torch.allclose(cached, full, atol=1e-3, rtol=0), (cached - full).abs().max()
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_attention_weights_causal_and_normalised(local_fp32):
    ids = torch.tensor([local_fp32.tokenizer.encode("The cat sat on the mat because it was warm.")])
    with torch.no_grad():
        logits, attns = local_fp32.model(ids, return_attn=True)
        plain = local_fp32.model(ids)
    cfg = local_fp32.config
    assert len(attns) == cfg.n_layers
    T = ids.shape[1]
    for a in attns:
        assert a.shape == (1, cfg.n_heads, T, T)
        assert torch.allclose(a.sum(-1), torch.ones(1, cfg.n_heads, T), atol=1e-5)
        assert torch.all(a.triu(diagonal=1) == 0)
    # the explicit attention path gives the same logits as the fused one
    assert torch.allclose(logits, plain, atol=1e-3)


def test_kv_bytes_formula(local_fp32):
    cfg = local_fp32.config
    cache = local_fp32.model.new_cache(1, 32)
    with torch.no_grad():
        local_fp32.model(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # K and V, fp32
    assert cache.nbytes_used() == 5 * per_token


def test_fused_model_is_a_separate_copy_with_the_same_outputs(local_fp32):
    """load_local_model(fused=True): q/k/v and gate/up as one Linear each, cached == full still, logits equal
    to the unfused reference within fp32 tolerance; the unfused model (LoRA, lesson 10) keeps its projections."""
    from common.local_model import load_local_model

    fused = load_local_model(dtype="fp32", device=torch.device("cpu"), verbose=False, fused=True)
    assert fused is not local_fp32 and fused.model.layers[0].attn.qkv_proj is not None
    assert hasattr(local_fp32.model.layers[0].attn, "q_proj") and local_fp32.model.layers[0].attn.qkv_proj is None
    torch.manual_seed(1)
    ids = torch.randint(17, fused.config.vocab_size, (1, 24))
    with torch.no_grad():
        ref, full = local_fp32.model(ids), fused.model(ids)
        cache = fused.model.new_cache(1, 32)
        cached = torch.cat([fused.model(ids[:, :16], cache=cache)] +
                           [fused.model(ids[:, t:t + 1], cache=cache) for t in range(16, 24)], dim=1)
    assert torch.allclose(full, ref, atol=1e-3, rtol=0), (full - ref).abs().max()
    assert torch.equal(full.argmax(-1), ref.argmax(-1))
    assert torch.allclose(cached, full, atol=1e-3, rtol=0), (cached - full).abs().max()
