"""Tests for lesson 10 (quantization) and its shared code (common/quant.py, common/speculative.py,
KVCache.truncate): the hand-written GGUF block formats against the gguf package's reference bit for bit,
the grid quantizers' invariants, speculative decoding == plain greedy decoding (several prompts, k values and
drafts, including a draft that is wrong at the first token), the acceptance bookkeeping, the lesson's shape,
flags and doc, and its --quick run (slow). No test asserts a timing.
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import quant as Q
from common.errors import UserError
from common.generate import generate
from common.llama import Llama, LlamaConfig
from common.speculative import ModelDraft, PromptLookupDraft, prepack_for_cpu, speculative_generate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "10_quantize.py"
lesson = importlib.import_module("10_quantize")


def _with_outliers(seed: int, n_blocks: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(32 * n_blocks) * 0.02).astype(np.float32)
    x[rng.integers(0, x.size, 25)] *= rng.uniform(20, 200)          # outliers of both signs
    x[:32] = 0                                                      # an all-zero block (scale 0)
    x[32:64] = np.float32(0.49999997) * np.arange(32, dtype=np.float32) / 100   # values near rounding ties
    x[64:96] = 3.0                                                  # a constant block
    return x


# ---------------------------------------------------------------------------- GGUF block formats
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gguf_formats_equal_the_reference_bit_for_bit(fmt, seed):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    x = _with_outliers(seed)
    ref = np.asarray(gguf.quants.quantize(x.reshape(16, -1), qtype)).reshape(-1, Q.BLOCK_BYTES[fmt])
    mine = Q.gguf_quantize(x, fmt)
    assert mine.dtype == np.uint8 and mine.shape == (x.size // 32, Q.BLOCK_BYTES[fmt])
    assert np.array_equal(mine, ref)
    np.testing.assert_array_equal(Q.gguf_dequantize(mine, fmt), np.asarray(gguf.quants.dequantize(ref, qtype)).reshape(-1))
    # the dequantized values are close to the input (a broken format that writes zeros would fail here)
    err = np.abs(Q.gguf_dequantize(mine, fmt) - x).reshape(-1, 32).max(1)
    step = np.abs(x).reshape(-1, 32).max(1) / (127 if fmt == "Q8_0" else 7)
    assert (err <= step + 1e-6).all()


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1"])
def test_requantizing_dequantized_blocks_gives_the_same_blocks(fmt):
    blocks = Q.gguf_quantize(_with_outliers(5), fmt)
    assert np.array_equal(Q.gguf_quantize(Q.gguf_dequantize(blocks, fmt), fmt), blocks)


def test_gguf_bits_per_weight():
    assert (Q.gguf_bits_per_weight("Q8_0"), Q.gguf_bits_per_weight("Q4_0"), Q.gguf_bits_per_weight("Q4_1")) == (8.5, 4.5, 5.0)
    assert Q.bits_per_weight(4, 32) == 4.5 and Q.bits_per_weight(4, 32, symmetric=False) == 5.0
    assert Q.bits_per_weight(8, Q.CHANNEL, cols=512) == 8 + 16 / 512 and Q.bits_per_weight(8, Q.TENSOR) == 8


def test_shipped_q4_1_blocks_are_reproduced(gguf_path):
    r = Q.requantize_shipped(gguf_path, limit=1)          # one whole tensor of each format: the embedding is Q8_0
    assert set(r["requantized"]) == {"Q4_1", "Q8_0"}
    for c in r["requantized"].values():
        assert c["blocks"] > 0 and c["blocks_equal"] == c["blocks"]
    assert r["tensor_types"]["Q4_1"]["tensors"] > 100 and 4.5 < r["file_bits_per_weight"] < 8


# ---------------------------------------------------------------------------- grid quantization
GROUPINGS = [Q.TENSOR, Q.CHANNEL, 32, 128, 48]      # 48 does not divide 200: rows are padded


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", GROUPINGS)
def test_quantize_dequantize_is_idempotent_on_the_grid(bits, symmetric, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 200, generator=g)
    w[5, 17] = 30.0
    q1 = Q.quantize(w, bits, symmetric, group)
    w1 = q1.dequantize()
    assert w1.shape == w.shape
    levels = 2 ** bits
    assert int(q1.codes.max()) - int(q1.codes.min()) < levels
    q2 = Q.quantize(w1, bits, symmetric, group)
    assert torch.equal(q2.codes, q1.codes)                       # the grid points map to themselves
    torch.testing.assert_close(q2.dequantize(), w1, rtol=1e-5, atol=1e-6)


def test_group_wise_error_is_at_most_per_tensor_error_with_an_outlier():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[7, 3] = 1.5                                                 # one outlier
    for bits in (8, 4):
        for sym in (True, False):
            e_tensor = Q.relative_error(w, Q.fake_quant(w, bits, sym, Q.TENSOR))
            e_channel = Q.relative_error(w, Q.fake_quant(w, bits, sym, Q.CHANNEL))
            e_group = Q.relative_error(w, Q.fake_quant(w, bits, sym, 32))
            assert e_group <= e_channel <= e_tensor and e_group < e_tensor / 2, (bits, sym, e_tensor, e_channel, e_group)
    # per-tensor int4: the outlier's scale rounds most small weights to zero
    assert float((Q.quantize(w, 4, True, Q.TENSOR).codes == 0).float().mean()) > 0.9


def test_gguf_quantize_in_chunks_equals_one_piece():
    """gguf_quantize works on 2^16-block pieces of a big array; the blocks are the ones of a single call."""
    x = _with_outliers(9, n_blocks=(1 << 16) + 37)
    for fmt, (quantize_blocks, _) in Q.GGUF_FORMATS.items():
        assert np.array_equal(Q.gguf_quantize(x, fmt), quantize_blocks(x)), fmt


@pytest.mark.parametrize("group", GROUPINGS)
def test_fake_quant_equals_quantize_then_dequantize(group):
    """fake_quant's short cut (codes kept in float32, dequantized in place) gives the same bits."""
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(3))
    w[5, 17], w[0] = -30.0, 0.0                                   # an outlier and an all-zero row
    for bits in (8, 4):
        for sym in (True, False):
            assert torch.equal(Q.fake_quant(w, bits, sym, group), Q.quantize(w, bits, sym, group).dequantize())


def test_quantize_weights_quantizes_a_shared_tensor_once():
    emb = torch.randn(16, 32)
    state = {"embed.weight": emb, "lm_head.weight": emb, "mlp.weight": emb.clone()}   # tied, and an equal copy
    out = Q.quantize_weights(state, lambda name, t: (4, True, 32))
    assert out["embed.weight"] is out["lm_head.weight"] and out["mlp.weight"] is not out["embed.weight"]
    assert torch.equal(out["embed.weight"], Q.fake_quant(emb, 4, True, 32))


def test_copy_sharing_weights_shares_them_and_leaves_the_original_alone():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 10))
    int4 = Q.to_int4(Q.copy_sharing_weights(model))
    assert all(type(m) is torch.nn.Linear for m in (model[0], model[2])) and isinstance(int4[0], Q.Int4Linear)
    assert int4[1].weight is model[1].weight                      # not copied
    target = _tiny(2)
    packed = prepack_for_cpu(target)                              # its own oneDNN linears, the rest shared
    assert packed.embed.weight is target.embed.weight and type(target.layers[0].mlp.down_proj) is torch.nn.Linear


def test_quantize_weights_only_touches_matrices():
    state = {"a.weight": torch.randn(8, 32), "norm.weight": torch.randn(32), "b.weight": torch.randn(4, 32)}
    out = Q.quantize_weights(state, lambda name, t: (4, True, 32) if name.startswith("a") else None)
    assert not torch.equal(out["a.weight"], state["a.weight"])
    assert out["norm.weight"] is state["norm.weight"] and out["b.weight"] is state["b.weight"]


def test_int4_linear_matches_its_fake_quantized_weights():
    lin = torch.nn.Linear(64, 48, bias=True)
    m = Q.Int4Linear(lin, 32)
    assert m.nbytes() == 48 * 64 // 2 + 2 * 2 * 48 * 64 // 32
    x = torch.randn(3, 64)
    ref = torch.nn.functional.linear(x, Q.fake_quant(lin.weight.detach(), 4, False, 32), lin.bias)
    torch.testing.assert_close(m(x), ref, rtol=2e-3, atol=2e-3)      # scale/min stored in fp16
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    Q.to_int4(model, skip=lambda name: name == "1")
    assert isinstance(model[0], Q.Int4Linear) and isinstance(model[1], torch.nn.Linear)


# ---------------------------------------------------------------------------- KV cache truncation
def _tiny(seed: int, vocab: int = 61) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256)
    return Llama(cfg).eval()


@torch.inference_mode()
def test_kv_cache_truncate_then_continue_equals_a_fresh_forward():
    model = _tiny(0)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.new_cache(1, 32)
    model(ids[:, :8], cache=cache)
    model(torch.tensor([[3, 4, 5]]), cache=cache)                 # a wrong guess of 3 tokens
    assert cache.length == 11
    cache.truncate(8)
    assert cache.length == 8
    out = model(ids[:, 8:], cache=cache)
    torch.testing.assert_close(out, full[:, 8:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        cache.truncate(13)
    cache.reset_rows([0])                                          # ragged caches are not supported
    with pytest.raises(ValueError):
        cache.truncate(0)


# ---------------------------------------------------------------------------- speculative decoding
class WrongFirst:
    """A draft that always proposes the target's own greedy continuation, except that its first token is wrong."""

    def __init__(self, target, vocab: int):
        self.target, self.vocab = target, vocab

    def propose(self, context, k):
        right = list(generate(self.target, context, k, stop_ids=()))
        return [(right[0] + 1) % self.vocab] + right[1:]


def _check_stats(st, out, n):
    assert st.emitted == 1 + st.accepted + st.rounds
    assert st.target_calls == st.rounds + 1
    assert 0 <= st.accepted <= st.proposed <= st.k * st.rounds
    assert sum(p for p, _ in st.per_round) == st.proposed and sum(a for _, a in st.per_round) == st.accepted
    assert len(out) <= st.emitted <= n


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_speculative_greedy_equals_target_greedy(k):
    target, other = _tiny(0), _tiny(7)
    V, n = 61, 20
    for p, prompt in enumerate(([1, 2, 3], [5, 9, 9, 9, 2, 40, 7], list(range(10, 30)))):
        ref = list(generate(target, prompt, n, stop_ids=()))
        drafts = {"self": ModelDraft(target, 64), "other": ModelDraft(other, 64), "wrong_first": WrongFirst(target, V),
                  "lookup": PromptLookupDraft()}
        for name, draft in drafts.items():
            out, st = speculative_generate(target, draft, prompt, n, k)
            assert out == ref, (name, k, p)
            assert len(out) == n and st.emitted == n
            _check_stats(st, out, n)
            if name == "self":
                assert st.acceptance == 1.0 and st.rounds == -(-(n - 1) // (k + 1))
            if name == "wrong_first":
                assert st.accepted == 0 and st.rounds == n - 1 and st.acceptance == 0.0


def test_speculative_stops_at_a_stop_token_like_generate():
    target = _tiny(3)
    prompt = [4, 8, 15, 16, 23, 42]
    free = list(generate(target, prompt, 30, stop_ids=()))
    stop = {free[6]}
    ref = list(generate(target, prompt, 30, stop_ids=stop))
    assert len(ref) < 30
    for k in (1, 4):
        out, st = speculative_generate(target, ModelDraft(_tiny(4), 64), prompt, 30, k, stop_ids=stop)
        assert out == ref
        _check_stats(st, out, 30)


def test_prepacked_target_gives_the_same_greedy_tokens():
    target = _tiny(5)
    packed = prepack_for_cpu(target)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = list(generate(packed, prompt, 16, stop_ids=()))
    out, _ = speculative_generate(packed, ModelDraft(target, 64), prompt, 16, 3)
    assert out == ref
    torch.testing.assert_close(packed(torch.tensor([prompt])), target(torch.tensor([prompt])), rtol=1e-4, atol=1e-4)
    assert all(type(m) is not torch.nn.Linear for m in packed.modules()) or not torch.backends.mkldnn.is_available()
    assert any(type(m) is torch.nn.Linear for m in target.modules())     # the original is untouched


def test_prompt_lookup_copies_what_followed_the_last_ngram():
    d = PromptLookupDraft(max_ngram=3)
    assert d.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 2) == [4, 5]
    assert d.propose([7, 1, 2, 8, 8, 1, 2], 3) == [8, 8, 1]          # the most recent occurrence, longest n-gram
    assert d.propose([1, 2, 3], 4) == []
    assert d.propose([5, 6, 5], 4) == [6, 5]


# ---------------------------------------------------------------------------- the lesson
def test_lesson_reference_check_and_self_checks():
    r = lesson.check_formats_against_gguf(0)
    assert all(v["bytes_equal"] and v["dequantize_equal"] for v in r.values()) and set(r) == {"Q8_0", "Q4_0", "Q4_1"}
    target = _tiny(0)
    ids = [1, 2, 3]
    ref = list(generate(target, ids, 8, stop_ids=()))
    ok = lesson.compare(target, PromptLookupDraft(), ids, 8, 3, ref, 1.0, set())
    assert ok["identical"] and ok["tokens"] == 8
    with pytest.raises(UserError, match="自检失败"):
        lesson.compare(target, PromptLookupDraft(), ids, 8, 3, ref[:-1] + [(ref[-1] + 1) % 61], 1.0, set())


def test_checkpoint_is_found_or_trained_in_the_background(tmp_path, monkeypatch, capsys):
    """start_checkpoint: a given or found checkpoint is used as it is; otherwise lesson 04's script runs in the
    background (here a stand-in that writes the checkpoint, or fails) and wait() returns its path or one
    Chinese UserError line with the end of its log."""
    from common import quant_report as R

    monkeypatch.setenv("LLM_COURSE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setattr(R, "REPO", tmp_path)
    given = tmp_path / "mine.pt"
    assert R.start_checkpoint(given, tmp_path / "a", 5, 0)() == given
    found = tmp_path / "outputs" / "04_tiny_gpt" / "small" / "ckpt_best.pt"
    found.parent.mkdir(parents=True)
    found.touch()
    assert R.start_checkpoint(None, tmp_path / "a", 5, 0)() == found
    found.unlink()
    fake = tmp_path / "04_tiny_gpt.py"
    fake.write_text("import sys, pathlib\nargs = sys.argv[1:]\nassert '--overwrite' in args and args[args.index('--max-iters') + 1] == '5'\n"
                    "ck = pathlib.Path(args[args.index('--out-dir') + 1]) / 'quick' / 'ckpt_best.pt'\n"
                    "ck.parent.mkdir(parents=True, exist_ok=True)\nck.write_bytes(b'x')\n", encoding="utf-8")
    wait = R.start_checkpoint(None, tmp_path / "a", 5, 0)
    assert "后台训练" in capsys.readouterr().out
    assert wait() == tmp_path / "a" / "tiny_gpt" / "quick" / "ckpt_best.pt"
    assert R.start_checkpoint(None, tmp_path / "a", 5, 0)() == wait()          # the next run reuses it
    fake.write_text("print('boom: no data')\nraise SystemExit(3)\n", encoding="utf-8")
    with pytest.raises(UserError, match="退出码 3.*boom: no data"):
        R.start_checkpoint(None, tmp_path / "b", 5, 0)()


def test_lesson_has_the_one_shape():
    sys.path.insert(0, str(REPO / "tests"))
    from test_cli import _lesson_shape_problems

    assert _lesson_shape_problems(REPO / SCRIPT) == []


@pytest.mark.parametrize("args", [["--k", "0"], ["--part", "nope"], ["--quick", "--seed", "x"],
                                  ["--checkpoint", "/no/such/ckpt.pt"]])
def test_bad_flag_is_one_chinese_line(args, monkeypatch, capsys, tmp_path):
    from common.errors import run_cli

    monkeypatch.setenv("LLM_COURSE_OUTPUTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    with pytest.raises(SystemExit) as e:
        run_cli(lesson.main)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and re.search(r"[\u4e00-\u9fff]", err[0]), err


def test_doc_commands_use_real_flags_and_doc_has_exercises():
    """tests/test_docs.py finds lesson commands with 0N_ names; lesson 10's are checked here the same way."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_docs import script_options, section_items, split_args, split_markdown

    opts = script_options(SCRIPT)
    doc = (REPO / "docs" / "10_quantize.md").read_text(encoding="utf-8")
    found = 0
    for text in (doc, (REPO / "README.md").read_text(encoding="utf-8"), (REPO / SCRIPT).read_text(encoding="utf-8")):
        code, _ = split_markdown(text)
        for _, line in code + [(0, ln) for ln in text.splitlines() if SCRIPT in ln]:
            for m in re.finditer(rf"{SCRIPT}\b(.*)$", line):
                for a in split_args(m.group(1)):
                    if a.startswith("--"):
                        found += 1
                        assert a.partition("=")[0] in opts.options, f"{a} in: {line}"
    assert found >= 5
    for word in ("练习", "自测"):
        has, items = section_items(doc, word)
        assert has and items >= 1, word


@pytest.mark.slow
def test_quick_run_writes_results(lesson_runs):
    r = lesson_runs.run(SCRIPT, "--quick", timeout=300)
    assert r.returncode == 0, r.explain()
    res = r.results("10_quantize")
    assert res["bits_per_weight"]["Q4_1"] == 5.0
    assert {"tiny_gpt", "smollm2"} <= set(res["ppl"]) and "fp32" in res["ppl"]["smollm2"]
    for k, s in res["speculative"]["smollm2"]["by_k"].items():
        assert s["identical"] is True and 0 <= s["acceptance"] <= 1 and s["speedup"] > 0, k
    assert all(c["blocks_equal"] == c["blocks"] for c in res["gguf"]["shipped"]["requantized"].values())
