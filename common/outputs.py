"""Where lessons write their plots and results.json (outputs/<script name>/, git-ignored)."""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def output_root() -> Path:
    """outputs/ in the project, or $LLM_COURSE_OUTPUTS (tests use it). Not created here."""
    return Path(os.environ.get("LLM_COURSE_OUTPUTS") or REPO_ROOT / "outputs")


def output_dir(name: str | Path) -> Path:
    """Return outputs/<name>/ (created); a Path (e.g. a lesson's --out-dir) is used as it is."""
    d = name if isinstance(name, Path) else output_root() / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_results(name: str | Path, data: dict, merge: bool = False) -> Path:
    """Write <output dir>/results.json atomically and return its path.

    merge=True keeps the keys of an existing results.json that `data` does not replace, so a
    rerun of one part of a lesson (e.g. --part 3) does not erase the other parts' results.
    """
    path = output_dir(name) / "results.json"
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict):
            data = {**old, **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=_to_jsonable), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _to_jsonable(obj):
    # numpy / torch scalars and arrays, Paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def cache_root() -> Path:
    """The user cache root: $LLM_COURSE_CACHE, else ~/.cache/llm-course (%LOCALAPPDATA%\\llm-course on
    Windows). Not created here."""
    base = os.environ.get("LLM_COURSE_CACHE")
    if base:
        return Path(base).expanduser()
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "llm-course"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-course"


def cache_dir(*parts: str) -> Path:
    """A folder under cache_root() for downloaded/derived files, created if missing."""
    d = cache_root().joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d
