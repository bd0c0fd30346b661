"""User-facing errors: one clear Chinese line and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix. The message is one line of Chinese saying what to do."""

    exit_code = 2


class SelfCheckFailed(UserError):
    """A lesson's self-check (an invariant such as cached == uncached) did not hold: a bug in the code,
    not the user's input. Exit code 1, so scripts can tell it from a user mistake (exit 2)."""

    exit_code = 1


def require(ok: bool, message: str) -> None:
    """The one self-check helper every lesson uses: `require(cached == uncached, "有缓存和无缓存的输出不同")`.
    When ok is false it stops the lesson with one Chinese line "自检失败：<message>" and exit code 1."""
    if not ok:
        raise SelfCheckFailed(f"自检失败：{message}")


def fail(message: str) -> None:
    """Raise a UserError (handy inside expressions / argparse type functions)."""
    raise UserError(message)


def read_json(path, what: str, hint: str = ""):
    """A JSON file the user points at -> its value. Missing file or invalid UTF-8 JSON -> a UserError (one line):
    "找不到<what> <path>" / "<path> 不是合法的 UTF-8 JSON", each followed by hint (what to do, or the expected shape)."""
    import json
    from pathlib import Path

    path = Path(path)
    tail = f"；{hint}" if hint else "。"
    if not path.is_file():
        raise UserError(f"找不到{what} {path}{tail}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} 不是合法的 UTF-8 JSON（{str(e)[:60]}）{tail}") from None


def run_cli(main: Callable[[], object]) -> None:
    """Run a lesson's main() and turn user errors and Ctrl-C into clean exits.

    Set LLM_COURSE_DEBUG=1 to see the full traceback of a UserError.
    """
    try:
        rc = main()
    except UserError as e:
        if os.environ.get("LLM_COURSE_DEBUG"):
            raise
        sys.stdout.flush()
        print(f"\n错误：{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\n已中断（Ctrl-C）。", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python 01_hello_llm.py | head`
        sys.exit(0)
    sys.exit(rc if isinstance(rc, int) else 0)
