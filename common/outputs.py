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


def save_results(name: str | Path, data: dict, merge: bool = False, *, run_args=None, files=(), may_write=(),
                 partial: bool = False) -> Path:
    """Write <output dir>/results.json atomically and return its path.

    merge=True keeps the keys of an existing results.json that `data` does not replace, so a
    rerun of one part of a lesson (e.g. --part 3) does not erase the other parts' results.
    run_args: this run's arguments (an argparse Namespace or a dict). With merge, every part this run writes
        (each dict value of `data`) records them under "run_args", so a results.json put together from several
        `--part` runs says which prompt and settings each part came from; without merge they are stored once.
    files: the artefacts (plots, ...) this run wrote into the output dir, recorded under "files" (names).
    may_write: names of every artefact the lesson can write there. Without merge, any of them that this run
        did not write is removed, as is any file the previous results.json listed under "files" that this run
        did not write: it came from an earlier run that these results no longer describe. One folder, one run.
        A finished run also removes the <stem>.partial<suffix> copies of may_write left by a partial run.
    partial: the run did not finish (Ctrl-C, a time cap). A finished results.json already there is never
        replaced by a partial one: the partial results go beside it as results.partial.json (see partial_path).
        A finished run removes a results.partial.json left by an earlier partial run.
    """
    out = output_dir(name)
    path = out / "results.json"
    old = _read_json(path)
    data = dict(data)
    if run_args is not None:
        args = _plain(run_args)
        if merge:
            data = {k: ({**v, "run_args": args} if isinstance(v, dict) else v) for k, v in data.items()}
        else:
            data["run_args"] = args
    names = sorted({Path(f).name for f in files})
    if merge:
        data = {**old, **data}
        if isinstance(old.get("files"), list):
            names = sorted(set(old["files"]) | set(names))
    elif not partial:
        earlier = old.get("files") if isinstance(old.get("files"), list) else []
        for stale in (set(may_write) | set(earlier)) - set(names):
            _remove_stale(out / Path(stale).name)
        for name in may_write:                              # a finished run supersedes an earlier partial one
            _remove_stale(out / f"{Path(name).stem}.partial{Path(name).suffix}")
    if names:
        data["files"] = names
    data.pop("partial", None)
    if partial:
        data["partial"] = True
        path = partial_path(path)
    elif (out / "results.partial.json").is_file():
        (out / "results.partial.json").unlink()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=_to_jsonable), encoding="utf-8")
    os.replace(tmp, path)
    return path


def partial_path(path: str | Path) -> Path:
    """Where an artefact of a run that did not finish goes: `path` itself when nothing finished is there yet,
    else <stem>.partial<suffix> beside it (a finished results.json / adapter / plot is never replaced by a
    partial one). A results.json counts as finished unless it says "partial": true."""
    path = Path(path)
    if not path.is_file() or (path.suffix == ".json" and _read_json(path).get("partial") is True):
        return path
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _read_json(path: Path) -> dict:
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def _remove_stale(path: Path) -> None:
    if path.is_file():
        path.unlink()
        print(f"（已删除上一次运行留下的 {path.name}：这次没有生成它，留着会和这次的 results.json 对不上。）")


def _plain(args) -> dict:
    """An argparse Namespace or dict as JSON-friendly values (Paths and other objects as strings)."""
    items = vars(args).items() if not isinstance(args, dict) else args.items()
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else
            [x if isinstance(x, (str, int, float, bool)) else str(x) for x in v] if isinstance(v, (list, tuple)) else
            str(v) for k, v in items}


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
