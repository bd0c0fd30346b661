"""A model file the user points at is identified by its own contents.

- which model a GGUF holds comes from its metadata (architecture, block count, width, vocabulary,
  pre-tokenizer), never from its file name or --local-model; when the file contradicts --local-model the
  file wins, one line says so, and the client's announcement names the model that actually runs;
- every bad model file (not GGUF, empty, truncated, unknown architecture, an unknown model, missing
  metadata) is one Chinese line and exit 2, never a traceback;
- the derived caches (fp32 safetensors, int8 state dict) are keyed by content (SHA-256 + size): the same
  file under another name shares one cache, a different file under the same name and size does not, and
  a file is hashed once per version (the official file's known hash is used without hashing).

Fast tests build small fake GGUF files with gguf.GGUFWriter; one slow test uses the real SmolLM2 file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common import local_model, model_files, wheels
from common.errors import UserError, run_cli
from common.model_files import LOCAL_MODELS, ModelFile

SMOL, QWEN = LOCAL_MODELS["smollm2"], LOCAL_MODELS["qwen0.5b"]
REAL_CACHE = __import__("common.outputs", fromlist=["cache_root"]).cache_root()   # before the fixture moves it


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test writes its derived caches and hash memos into its own empty cache folder."""
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path / "cache"))
    for var in ("LLM_LOCAL_MODEL", "SMOLLM_GGUF", "QWEN_GGUF", "LLM_COURSE_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(wheels, "_HASHED", {})
    monkeypatch.setattr(model_files, "_SAID", set())


def write_gguf(path: Path, arch: str = "llama", blocks: int = 1, dim: int = 8, vocab: int = 16, pre: str = "smollm",
               skip: tuple[str, ...] = (), seed: int = 0) -> Path:
    """A small but complete GGUF: the metadata read_gguf / read_gguf_vocab read, and the tensors of a tiny
    model (dim 8, 2 heads, 1 KV head, FFN 16, `blocks` layers). Metadata may claim another shape than the
    tensors (identification reads metadata only); `skip` leaves keys out."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: w.add_block_count(blocks), "embedding_length": lambda: w.add_embedding_length(dim),
        "head_count": lambda: w.add_head_count(2), "head_count_kv": lambda: w.add_head_count_kv(1),
        "feed_forward_length": lambda: w.add_feed_forward_length(16), "context_length": lambda: w.add_context_length(64),
        "tokens": lambda: w.add_token_list([f"t{i}" for i in range(vocab)]),
        "token_type": lambda: w.add_token_types([1] * vocab),
        "bos": lambda: w.add_bos_token_id(0), "eos": lambda: w.add_eos_token_id(1),
        "pre": lambda: w.add_tokenizer_pre(pre),
    }
    w.add_name(f"fake {arch}")
    w.add_tokenizer_model("gpt2")
    for key, add in meta.items():
        if key not in skip:
            add()
    t = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", t(16, 8))
    w.add_tensor("output_norm.weight", t(8))
    for i in range(min(blocks, 2)):
        for name, shape in (("attn_norm", (8,)), ("ffn_norm", (8,)), ("attn_q", (8, 8)), ("attn_k", (4, 8)),
                            ("attn_v", (4, 8)), ("attn_output", (8, 8)), ("ffn_gate", (16, 8)),
                            ("ffn_up", (16, 8)), ("ffn_down", (8, 16))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def like(info, path: Path, **kw) -> Path:
    """A fake whose metadata says it is `info`'s model (its real block count, width, vocabulary size)."""
    return write_gguf(path, arch=info.architecture, blocks=info.block_count, dim=info.dim, vocab=info.vocab_size,
                      pre=info.pre, **kw)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, Path]:
    """Fake SmolLM2 and Qwen files, each under the OTHER model's official file name."""
    d = tmp_path_factory.mktemp("fakes")
    return {"smollm2": like(SMOL, d / model_files.QWEN.file_name),
            "qwen0.5b": like(QWEN, d / model_files.GGUF_NAME)}


# ----------------------------------------------------------------------------- identification
@pytest.mark.parametrize("key", ["smollm2", "qwen0.5b"])
def test_architecture_and_model_come_from_the_metadata_not_the_name(fakes, key):
    h = model_files.read_gguf_header(fakes[key])
    assert h.fields["general.architecture"] == LOCAL_MODELS[key].architecture
    assert model_files.identify_model_file(fakes[key]) == key          # named like the other model


def test_a_file_that_contradicts_local_model_wins_and_says_so_in_one_line(fakes, capsys):
    assert model_files.model_of_file(fakes["qwen0.5b"], "smollm2") == "qwen0.5b"
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Qwen2.5-Coder-0.5B-Instruct" in err and "中文和英文" in err
    assert model_files.model_of_file(fakes["smollm2"], "smollm2") == "smollm2"
    assert capsys.readouterr().err == ""                                # agreeing: nothing to say
    assert model_files.model_of_file(fakes["qwen0.5b"], "smollm2") == "qwen0.5b"
    assert capsys.readouterr().err == ""                                # said once per process


def test_select_model_file_follows_the_file(fakes, monkeypatch, capsys):
    mf = model_files.select_model_file(fakes["smollm2"], "qwen0.5b", download=False)
    assert (mf.key, mf.path, mf.info.languages) == ("smollm2", fakes["smollm2"], "只懂英文")
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().err
    # The same through the environment variable of the chosen model.
    monkeypatch.setenv("SMOLLM_GGUF", str(fakes["smollm2"]))
    assert model_files.select_model_file(None, "smollm2", download=False).key == "smollm2"
    # A Qwen file is still held to the official SHA-256 (the fake is not Qwen's release).
    with pytest.raises(UserError, match="不是官方的"):
        model_files.select_model_file(fakes["qwen0.5b"], "smollm2", download=False)


@pytest.mark.parametrize("backend_model", ["smollm2", "qwen0.5b"])
def test_client_announces_the_model_in_the_file(fakes, backend_model, capsys):
    from common.client import LLMClient

    other = "qwen0.5b" if backend_model == "smollm2" else "smollm2"
    c = LLMClient(backend="local", local_model=backend_model, model_file=str(fakes[other]), verbose=True)
    assert c.local_key == other and c.local_info is LOCAL_MODELS[other]
    assert c.model_name == f"{LOCAL_MODELS[other].name} (local)"
    assert LOCAL_MODELS[other].name in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad files: one line, exit 2
def _bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    d.mkdir(parents=True, exist_ok=True)
    text = d / "notes.gguf"
    text.write_text("这不是模型，只是一个文本文件。\n" * 20, encoding="utf-8")
    empty = d / "empty.gguf"
    empty.write_bytes(b"")
    good = like(SMOL, d / "good.gguf")
    data = good.read_bytes()
    head_cut, data_cut = d / "head-cut.gguf", d / "data-cut.gguf"
    head_cut.write_bytes(data[:4000])                    # inside the token list
    data_cut.write_bytes(data[:-100])                    # the tensor data is short
    return {
        "text": (text, "不是 GGUF 模型文件"),
        "empty": (empty, "空文件"),
        "header truncated": (head_cut, "不完整"),
        "data truncated": (data_cut, "不完整（被截断"),
        "unknown architecture": (write_gguf(d / "gpt2.gguf", arch="gpt2"), "架构是 'gpt2'"),
        "unknown llama model": (write_gguf(d / "tinyllama.gguf", blocks=22, dim=2048, vocab=320), "不是本课程认识的模型"),
        "unknown qwen2 model": (write_gguf(d / "qwen7b.gguf", arch="qwen2", blocks=28, dim=3584, vocab=320, pre="qwen2"),
                                "应为 Qwen2.5-Coder-0.5B-Instruct"),
        "missing metadata": (like(SMOL, d / "no-tokens.gguf", skip=("tokens",)), "缺少元数据 tokenizer.ggml.tokens"),
        "a folder": (d, "不存在（或不是文件）"),
    }


BAD_KINDS = ["text", "empty", "header truncated", "data truncated", "unknown architecture", "unknown llama model",
             "unknown qwen2 model", "missing metadata", "a folder"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_bad_model_file_is_one_line_and_exit_2(kind, tmp_path, capsys):
    path, expected = _bad_files(tmp_path / "bad")[kind]
    with pytest.raises(UserError) as e:
        model_files.identify_model_file(path)
    msg = str(e.value)
    assert expected in msg and str(path) in msg and "\n" not in msg
    # The same through load_local_model under run_cli, as a lesson runs it: one line on stderr, exit 2.
    with pytest.raises(SystemExit) as ex:
        run_cli(lambda: local_model.load_local_model(path, dtype="fp32", device="cpu", verbose=False))
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("错误：") and "\n" not in err and "Traceback" not in err and expected in err


def test_a_lesson_given_a_text_file_prints_one_line_and_exits_2(tmp_path, run_script):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello, I am not a model\n", encoding="utf-8")
    r = run_script("01_hello_llm.py", "--quick", "--backend", "local", "--model-file", str(bad))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0 and "不是 GGUF 模型文件" in err and str(bad) in err


def test_read_gguf_errors_are_one_line(tmp_path):
    # read_gguf on its own (no identification first): a file it cannot use is still one UserError line.
    path = like(SMOL, tmp_path / "x.gguf", skip=("feed_forward_length",))
    with pytest.raises(UserError) as e:
        local_model.read_gguf(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ----------------------------------------------------------------------------- caches keyed by content
def _derived(kind: str) -> list[Path]:
    from common.outputs import cache_root

    return sorted((cache_root() / "derived").glob(f"*-{kind}.*"))


def test_fp32_cache_is_keyed_by_content_not_name(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    a = write_gguf(tmp_path / "a" / "model.gguf", seed=1)
    renamed = tmp_path / "renamed-copy.gguf"
    shutil.copy(a, renamed)
    cfg, w = local_model._cached_weights(ModelFile(a, "smollm2", None), verbose=False)
    assert len(_derived("fp32")) == 2                   # .safetensors + .json

    def no_read(path):
        raise AssertionError(f"cache miss for {path}")

    read = local_model.read_gguf
    monkeypatch.setattr(local_model, "read_gguf", no_read)
    cfg2, w2 = local_model._cached_weights(ModelFile(renamed, "smollm2", None), verbose=False)   # same bytes
    assert cfg2 == cfg and all(np.array_equal(w[k], w2[k]) for k in w)
    assert len(_derived("fp32")) == 2                   # no second cache for the same content
    monkeypatch.setattr(local_model, "read_gguf", read)

    # Same file name and size, different weights: the old "<stem>-<size>" key would have served a's cache.
    (tmp_path / "b").mkdir()
    b = write_gguf(tmp_path / "b" / "model.gguf", seed=2)
    assert b.name == a.name and b.stat().st_size == a.stat().st_size
    _, wb = local_model._cached_weights(ModelFile(b, "smollm2", None), verbose=False)
    assert not np.array_equal(wb["embed.weight"], w["embed.weight"])
    assert len(_derived("fp32")) == 4


def test_a_file_is_hashed_once_and_the_known_hash_is_not_recomputed(tmp_path, monkeypatch):
    f = write_gguf(tmp_path / "m.gguf")
    calls = []
    real = wheels.sha256_of
    monkeypatch.setattr(wheels, "sha256_of", lambda p: calls.append(p) or real(p))
    k1 = local_model.content_key(ModelFile(f, "smollm2", None))
    k2 = local_model.content_key(ModelFile(f, "smollm2", None))
    wheels._HASHED.clear()                               # a new process: the digest is remembered on disk
    k3 = local_model.content_key(ModelFile(f, "smollm2", None))
    assert k1 == k2 == k3 and len(calls) == 1
    assert k1 == f"smollm2-{real(f)[:16]}-{f.stat().st_size}"
    f.write_bytes(f.read_bytes()[:-1] + b"\x01")         # a changed file is hashed again
    assert local_model.content_key(ModelFile(f, "smollm2", None)) != k1 and len(calls) == 2
    pinned = local_model.content_key(ModelFile(f, "smollm2", SMOL.sha256))   # the official file: known hash
    assert pinned.startswith(f"smollm2-{SMOL.sha256[:16]}-") and len(calls) == 2


def test_old_name_keyed_cache_of_the_official_file_is_adopted(tmp_path, monkeypatch):
    """Caches written before this change ('<official stem>-<size>-fp32.*') are renamed, not rebuilt."""
    f = write_gguf(tmp_path / "m.gguf")
    cfg, w = local_model.read_gguf(f)
    from common.outputs import cache_dir
    from safetensors.torch import save_file
    import json

    stem = Path(model_files.GGUF_NAME).stem
    legacy = cache_dir("derived") / f"{stem}-{SMOL.size}-fp32"
    save_file(w, str(legacy) + ".safetensors")
    Path(str(legacy) + ".json").write_text(json.dumps(cfg.__dict__))
    monkeypatch.setattr(local_model, "read_gguf", lambda p: (_ for _ in ()).throw(AssertionError("rebuilt")))
    cfg2, _ = local_model._cached_weights(ModelFile(f, "smollm2", SMOL.sha256), verbose=False)
    assert cfg2 == cfg
    assert not Path(str(legacy) + ".safetensors").exists()
    assert [p.name for p in _derived("fp32")] == [f"smollm2-{SMOL.sha256[:16]}-{f.stat().st_size}-fp32.json",
                                                  f"smollm2-{SMOL.sha256[:16]}-{f.stat().st_size}-fp32.safetensors"]


# ----------------------------------------------------------------------------- the real file (slow)
@pytest.mark.slow
def test_real_smollm2_under_another_name_is_recognised_and_shares_the_cache(tmp_path, capsys):
    from common.outputs import cache_dir

    real = model_files.find_model_file(download=False, quiet=True, model="smollm2")
    key = local_model.content_key(ModelFile(real, "smollm2", SMOL.sha256))
    # This test's own cache, holding (links to) the official file's fp32 cache from the real user cache
    # when it is there, so nothing is rebuilt and nothing is left in the real cache.
    for f in (REAL_CACHE / "derived").glob(f"{key}-fp32.*"):
        (cache_dir("derived") / f.name).symlink_to(f)
    official = local_model.load_local_model(real, dtype="fp32", device="cpu", verbose=False, model="smollm2")
    official_cache = local_model._cached_weights(ModelFile(real, "smollm2", SMOL.sha256), verbose=False)
    before = sorted(p.name for p in cache_dir("derived").glob("*-fp32.safetensors"))
    copy = tmp_path / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"   # Qwen's name, SmolLM2's bytes
    shutil.copy(real, copy)
    capsys.readouterr()
    from common.client import LLMClient

    client = LLMClient(backend="local", local_model="qwen0.5b", model_file=str(copy), local_dtype="fp32",
                       device="cpu")
    assert client.model_name == "SmolLM2-135M-Instruct (local)"
    # A lesson then loads it itself with its own --local-model: same model, and the note is not repeated.
    lm = local_model.load_local_model(copy, dtype="fp32", device="cpu", verbose=True, model="qwen0.5b")
    assert client.local() is lm
    err = capsys.readouterr().err
    assert lm.key == "smollm2" and lm.info.name == "SmolLM2-135M-Instruct" and lm.info.languages == "只懂英文"
    assert err.count("按文件运行 SmolLM2-135M-Instruct") == 1
    assert local_model.content_key(ModelFile(copy, "smollm2", None)) == key        # hashed: the official content
    assert sorted(p.name for p in cache_dir("derived").glob("*-fp32.safetensors")) == before == [f"{key}-fp32.safetensors"]
    assert official_cache[0] == lm.config
    ids = official.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert list(lm.generate(ids, 8)) == list(official.generate(ids, 8))
