"""The model API (common/llama.py) and the one generation loop (common/generate.py).

References, independent of the code under test:
  * a prompt run ALONE through the model (no padding, no mask, no cache: the plain causal path) is the
    reference for every padded / masked / ragged-cache call;
  * `reference_decode` below: a naive loop that recomputes the whole sequence each step and samples with
    common/sampling.py, the reference for generate / generate_batch.
Exhaustive checks use a tiny random Llama (fast); a few run on the real SmolLM2 (fixture local_fp32).
The same padded batch against transformers' LlamaForCausalLM is in tests/test_llama_reference.py (slow).
"""
from __future__ import annotations

import pytest
import torch

from common.generate import generate, generate_batch
from common.llama import Llama, LlamaConfig
from common.sampling import sample_next_token

ATOL = 1e-4  # fp32, same weights; only the attention kernel's summation order differs


@pytest.fixture(scope="module")
def tiny() -> Llama:
    """A 2-layer Llama with GQA (4 query heads, 2 K/V heads), randomly initialised the ordinary way, except
    that its LM head is untied: with a tied random embedding "repeat the last token" wins every step,
    which would make the generation checks below weak."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = Llama(cfg).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 32) * 0.25)   # logits ~ +-5: varied tokens
    return model


def _prompts(lengths, vocab=64, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(model, ids) -> torch.Tensor:
    """Logits [T, vocab] of one unpadded sequence: the reference."""
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device))[0]


def padded(prompts, side: str, pad_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded on `side`, padding filled with arbitrary tokens (they must not matter)."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        s = T - len(p) if side == "left" else 0
        ids[i] = torch.tensor(pad_ids[:T])
        ids[i, s:s + len(p)] = torch.tensor(p)
        mask[i, s:s + len(p)] = 1
    return ids, mask


def real_slice(side: str, T: int, n: int) -> slice:
    return slice(T - n, T) if side == "left" else slice(0, n)


def reference_decode(model, prompt, n, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=()) -> list[int]:
    """Naive decoding: the whole sequence through the model every step, no cache."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seq, out = list(prompt), []
    for _ in range(n):
        logits = alone(model, seq)[-1]
        tok = sample_next_token(logits, temperature, top_k, top_p, generator=gen)
        if tok in stop:
            break
        seq.append(tok)
        out.append(tok)
    return out


# ----------------------------------------------------------------------------- (a) padded batches

@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(tiny, side):
    prompts = _prompts([5, 11, 2])
    ids, mask = padded(prompts, side, pad_ids=list(range(40, 63)))
    with torch.inference_mode():
        batch = tiny(ids, attention_mask=mask)
        other_pad = tiny(padded(prompts, side, pad_ids=[1] * 30)[0], attention_mask=mask)
    T = ids.shape[1]
    for i, p in enumerate(prompts):
        rows = batch[i, real_slice(side, T, len(p))]
        torch.testing.assert_close(rows, alone(tiny, p), atol=ATOL, rtol=0)
        torch.testing.assert_close(other_pad[i, real_slice(side, T, len(p))], rows, atol=ATOL, rtol=0)
    if side == "left":  # the check can fail: without the mask a left-padded row sees its padding
        with torch.inference_mode():
            unmasked = tiny(ids)
        assert (unmasked[2, T - len(prompts[2]):] - alone(tiny, prompts[2])).abs().max() > 1e-2


def test_real_model_left_padded_batch_equals_alone(local_fp32):
    tok = local_fp32.tokenizer
    prompts = [tok.encode(t) for t in ("Hi!", "The capital of France is", "Three prime numbers greater than ten are")]
    ids, mask = padded(prompts, "left", pad_ids=[0] * 64)
    with torch.inference_mode():
        batch = local_fp32.model(ids, attention_mask=mask)
    T = ids.shape[1]
    for i, p in enumerate(prompts):
        ref = alone(local_fp32.model, p)
        got = batch[i, T - len(p):]
        # logits are ~10-40 in size here; fp32 with a different attention kernel differs by ~1e-5 relative
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-4)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


# ----------------------------------------------------------------------------- (b) last_only, return_hidden

@pytest.mark.parametrize("side", ["left", "right"])
def test_last_only_and_hidden_states(tiny, side):
    prompts = _prompts([7, 3, 10], seed=2)
    ids, mask = padded(prompts, side, pad_ids=[5] * 30)
    T = ids.shape[1]
    with torch.inference_mode():
        full = tiny(ids, attention_mask=mask)
        last = tiny(ids, attention_mask=mask, last_only=True)
        hidden = tiny(ids, attention_mask=mask, return_hidden=True)
        last_hidden = tiny(ids, attention_mask=mask, last_only=True, return_hidden=True)
        from_hidden = tiny.lm_head(hidden).float()
    assert last.shape == (3, 64) and hidden.shape == (3, T, 32) and last_hidden.shape == (3, 32)
    for i, p in enumerate(prompts):
        j = T - 1 if side == "left" else len(p) - 1        # the row's last real token
        torch.testing.assert_close(last[i], full[i, j], atol=ATOL, rtol=0)
        torch.testing.assert_close(last[i], alone(tiny, p)[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(last_hidden[i], hidden[i, j], atol=ATOL, rtol=0)
    torch.testing.assert_close(from_hidden, full, atol=ATOL, rtol=0)


def test_packed_batch_sends_only_real_tokens_through_the_matmuls(tiny):
    """With an attention_mask the linear layers see only the real tokens (N rows, not B x T): padding costs
    no matmul work (what lets a serving step mix one long prefill with many 1-token decodes). The outputs
    at real positions are checked against each prompt alone above; here: the row count, and zeros at padding."""
    prompts = _prompts([7, 1, 1, 1], seed=4)
    ids, mask = padded(prompts, "right", pad_ids=[5] * 30)
    seen = []
    hook = tiny.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        with torch.inference_mode():
            hidden = tiny(ids, attention_mask=mask, return_hidden=True)
            tiny(ids)                                            # no mask: every position is computed
    finally:
        hook.remove()
    assert seen[0][:-1] == (10,) and seen[1][:-1] == (4, 7)
    assert hidden.shape == (4, 7, 32) and torch.all(hidden[~mask.bool()] == 0)


# ----------------------------------------------------------------------------- (c) generate_batch

def test_generate_batch_greedy_equals_generate_and_reference(tiny):
    prompts = _prompts([4, 9, 1, 6], seed=3)
    batch = generate_batch(tiny, prompts, 12)
    for p, row in zip(prompts, batch):
        assert row == list(generate(tiny, p, 12)) == reference_decode(tiny, p, 12)
        assert len(row) == 12


def test_generate_batch_seeded_sampling_row_i_uses_seed_plus_i(tiny):
    prompts = _prompts([3, 8, 5], seed=4)
    kw = dict(temperature=1.3, top_k=20, top_p=0.9)
    batch = generate_batch(tiny, prompts, 10, seed=100, **kw)
    for i, (p, row) in enumerate(zip(prompts, batch)):
        assert row == list(generate(tiny, p, 10, seed=100 + i, **kw)) == reference_decode(tiny, p, 10, seed=100 + i, **kw)
    assert batch != generate_batch(tiny, prompts, 10, seed=200, **kw)   # the seed matters


def test_generate_batch_stops_each_row_at_its_stop_token(tiny):
    prompts = _prompts([4, 9, 6], seed=3)
    free = generate_batch(tiny, prompts, 12)
    stop = {free[1][5]}                                    # a token row 1 produces mid-way
    batch = generate_batch(tiny, prompts, 12, stop_ids=stop)
    for p, row in zip(prompts, batch):
        assert row == list(generate(tiny, p, 12, stop_ids=stop)) == reference_decode(tiny, p, 12, stop=stop)
    assert len(batch[1]) <= 5 and not stop & set(batch[1])


def test_real_model_generate_batch_equals_generate(local_fp32):
    tok = local_fp32.tokenizer
    prompts = [tok.encode(t) for t in ("My favourite fruit is", "Two plus two equals four, and three plus three")]
    batch = generate_batch(local_fp32.model, prompts, 6, stop_ids=tok.eos_ids)
    assert batch == [list(local_fp32.generate(p, 6)) for p in prompts]
    assert all(batch)


# ----------------------------------------------------------------------------- (d) ragged cache

def _ragged_scenario(model, a, b, c):
    """Rows 0/1 prefill a/b (right-padded), decode 2 steps; row 0 is reset and prefills c while row 1
    decodes one token in the same call; then one more decode step. Returns the logits of the last two
    calls and the sequences each row holds, for comparison with each sequence run alone."""
    cache = model.new_cache(2, 48)
    with torch.inference_mode():
        ids, mask = padded([a, b], "right", pad_ids=[3] * 48)
        logits = model(ids.to(model.device), cache=cache, attention_mask=mask.to(model.device), last_only=True)
        seqs = [list(a), list(b)]
        for _ in range(2):
            toks = logits.argmax(-1).tolist()
            seqs[0].append(toks[0])
            seqs[1].append(toks[1])
            logits = model(torch.tensor(toks, device=model.device)[:, None], cache=cache, last_only=True)
        cache.reset_rows([0])
        t1 = int(logits[1].argmax())
        seqs = [list(c), seqs[1] + [t1]]
        ids = torch.tensor([c, [t1] + [7] * (len(c) - 1)])
        mask = torch.tensor([[1] * len(c), [1] + [0] * (len(c) - 1)])
        mixed = model(ids.to(model.device), cache=cache, attention_mask=mask.to(model.device), last_only=True)
        nxt = mixed.argmax(-1).tolist()
        seqs = [seqs[0] + [nxt[0]], seqs[1] + [nxt[1]]]
        step = model(torch.tensor(nxt, device=model.device)[:, None], cache=cache, last_only=True)
    return mixed, step, seqs, cache


def test_ragged_cache_mixed_prefill_and_decode(tiny):
    a, b, c = _prompts([6, 3, 5], seed=5)
    mixed, step, seqs, cache = _ragged_scenario(tiny, a, b, c)
    torch.testing.assert_close(mixed[0], alone(tiny, seqs[0][:-1])[-1], atol=ATOL, rtol=0)   # prefilled c
    torch.testing.assert_close(mixed[1], alone(tiny, seqs[1][:-1])[-1], atol=ATOL, rtol=0)   # decoded 1
    for row in (0, 1):
        torch.testing.assert_close(step[row], alone(tiny, seqs[row])[-1], atol=ATOL, rtol=0)
    assert cache.pos.tolist() == [len(seqs[0]), len(seqs[1])]   # true positions, padding not counted
    per_token = 2 * 2 * 2 * 8 * 4                                # K+V x layers x kv heads x head_dim x fp32
    assert cache.nbytes_used() == per_token * (len(seqs[0]) + len(seqs[1]))


def test_real_model_ragged_cache(local_fp32):
    tok = local_fp32.tokenizer
    a, b, c = (tok.encode(t) for t in ("The capital of France is", "One, two,", "My favourite colour is"))
    mixed, step, seqs, _ = _ragged_scenario(local_fp32.model, a, b, c)
    for row in (0, 1):
        ref_mixed, ref_step = alone(local_fp32.model, seqs[row])[-2:]
        torch.testing.assert_close(mixed[row], ref_mixed, atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(step[row], ref_step, atol=2e-3, rtol=1e-4)


# ----------------------------------------------------------------------------- (e) with / without cache

@pytest.mark.parametrize("kw", [{}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}])
def test_use_cache_false_equals_true(tiny, kw):
    for p in _prompts([1, 5, 12], seed=6):
        cached = list(generate(tiny, p, 20, use_cache=True, **kw))
        assert cached == list(generate(tiny, p, 20, use_cache=False, **kw)) == reference_decode(tiny, p, 20, **kw)


def test_real_model_use_cache_false_equals_true(local_fp32):
    ids = local_fp32.tokenizer.encode("Once upon a time, a fox")
    with_cache = list(local_fp32.generate(ids, 8, use_cache=True, stop_ids=set()))
    assert len(with_cache) == 8
    assert with_cache == list(local_fp32.generate(ids, 8, use_cache=False, stop_ids=set()))


# ----------------------------------------------------------------------------- (f) on_step, logits_processor

def test_on_step_once_per_step_with_the_yielded_token(tiny):
    p = _prompts([5], seed=7)[0]
    steps = []
    out = list(generate(tiny, p, 9, on_step=steps.append))
    assert [s.token for s in steps] == out and [s.index for s in steps] == list(range(9))
    assert all(not s.stop and s.seconds >= 0 and s.logits.shape == (64,) for s in steps)
    assert all(int(s.logits.argmax()) == s.token for s in steps)          # greedy: the step's own logits
    torch.testing.assert_close(steps[0].logits, alone(tiny, p)[-1], atol=ATOL, rtol=0)
    # a stop token: reported once with stop=True, not yielded, and generation ends there
    steps2 = []
    out2 = list(generate(tiny, p, 9, stop_ids={out[4]}, on_step=steps2.append))
    first = out.index(out[4])
    assert out2 == out[:first] and len(steps2) == first + 1 and steps2[-1].stop and steps2[-1].token == out[4]


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_logits_processor_can_force_a_token(tiny, temperature):
    p = _prompts([4], seed=8)[0]
    seen = []

    def only_token_9(generated, logits):
        seen.append(list(generated))
        masked = torch.full_like(logits, float("-inf"))
        masked[9] = logits[9]
        return masked

    out = list(generate(tiny, p, 6, temperature=temperature, seed=0, logits_processor=only_token_9))
    assert out == [9] * 6
    assert seen == [[9] * i for i in range(6)]                            # it sees the tokens so far
    assert list(generate(tiny, p, 6, temperature=temperature, seed=0)) != out   # not 9s on its own


def test_zero_new_tokens_and_empty_batch(tiny):
    assert list(generate(tiny, [1, 2, 3], 0)) == []
    assert generate_batch(tiny, [], 5) == []


# ------------------------------------------------------------------ inference-time levers (issue 40)
def _copy(model):
    import copy

    return copy.deepcopy(model)


def _quantized(model):
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(_copy(model), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                                      dtype=torch.qint8)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_fused_projections_equal_separate_ones(tiny, kind):
    """fuse_projections() is an inference-only transform of a copy: same logits (alone, padded batch, cached
    decode), one qkv_proj / gate_up_proj per layer, and the model it was copied from is untouched."""
    base = tiny if kind == "fp32" else _quantized(tiny)
    fused = _copy(base).fuse_projections()
    names = {n for n, _ in fused.named_modules()}
    assert "layers.0.attn.qkv_proj" in names and "layers.1.mlp.gate_up_proj" in names
    assert not {n.rsplit(".", 1)[-1] for n in names} & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert hasattr(base.layers[0].attn, "q_proj") and base.layers[0].attn.qkv_proj is None
    if kind == "int8":   # per-output-channel int8: the fused weight holds exactly the same int8 values and scales
        w = fused.layers[0].attn.qkv_proj.weight()
        parts = [getattr(base.layers[0].attn, n).weight() for n in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(w.int_repr(), torch.cat([p.int_repr() for p in parts]))
        assert torch.equal(w.q_per_channel_scales(), torch.cat([p.q_per_channel_scales() for p in parts]))
    atol = ATOL if kind == "fp32" else 1e-3
    for p in _prompts([5, 11, 1]):
        a, b = alone(base, p), alone(fused, p)
        assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()
    prompts = _prompts([3, 9, 6], seed=4)
    ids, mask = padded(prompts, "left", list(range(1, 64)))
    with torch.inference_mode():
        a = base(ids, attention_mask=mask)
        b = fused(ids, attention_mask=mask)
    assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()
    p = _prompts([7], seed=9)[0]
    assert list(generate(fused, p, 12)) == list(generate(base, p, 12))


def test_fast_rope_and_norm_equal_the_formulas(tiny):
    """The complex-multiply RoPE and F.rms_norm compute the same numbers as the step-by-step formulas."""
    from common.llama import RMSNorm, apply_rope, apply_rope_complex, rope_tables

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 16, generator=g)
    cos, sin = rope_tables(16, 32, 10000.0)
    cos, sin = cos[5:12], sin[5:12]
    assert torch.allclose(apply_rope_complex(x, torch.complex(cos, sin)), apply_rope(x, cos, sin, True),
                          atol=1e-6, rtol=0)
    norm = RMSNorm(16, 1e-5)
    norm.weight.data = torch.randn(16, generator=g)
    with torch.no_grad():
        norm.fused = True
        fast = norm(x)
        norm.fused = False
        slow = norm(x)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=0)
    slow_model = _copy(tiny).set_fast_paths(rope=False, norm=False)
    assert not slow_model.rope_complex and not any(m.fused for m in slow_model.modules() if isinstance(m, RMSNorm))
    for p in _prompts([9, 2], seed=5):
        assert torch.allclose(alone(slow_model, p), alone(tiny, p), atol=ATOL, rtol=0)
