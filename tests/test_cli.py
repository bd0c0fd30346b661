"""Every lesson turns a bad flag into one Chinese line and exit code 2: no traceback, no English usage.

Also checks common/cli.py itself: argparse's messages are translated, defaults resolve flag > env > default.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u4e00-\u9fff]")

# (lesson, bad arguments): a non-number, a negative count, a missing file or folder, an unknown value
BAD_FLAGS = [
    ("01_hello_llm.py", ["--quick", "--seed", "x"]),
    ("01_hello_llm.py", ["--max-new-tokens", "-1"]),
    ("01_hello_llm.py", ["--part", "9"]),
    ("01_hello_llm.py", ["--top-p", "1.5"]),
    ("02_understand_kv_cache.py", ["--quick", "--seed", "x"]),
    ("02_understand_kv_cache.py", ["--max-new-tokens", "-3"]),
    ("02_understand_kv_cache.py", ["--part", "nope"]),
    ("03_hands_on_rag.py", ["--quick", "--seed", "x"]),
    ("03_hands_on_rag.py", ["--docs", "/no/such/folder"]),
    ("03_hands_on_rag.py", ["--retrieve-k", "0"]),
    ("04_tiny_gpt.py", ["--quick", "--seed", "x"]),
    ("04_tiny_gpt.py", ["--max-iters", "-1"]),
    ("04_tiny_gpt.py", ["--data", "/no/such/file.txt"]),
    ("05_lora.py", ["--quick", "--seed", "x"]),
    ("05_lora.py", ["--steps", "-1"]),
    ("05_lora.py", ["--data", "/no/such/file.json"]),
    ("06_serve.py", ["--quick", "--seed", "x"]),
    ("06_serve.py", ["--port", "0"]),
    ("06_serve.py", ["--port", "-5"]),
    ("06_serve.py", ["--port", "70000"]),
    ("06_serve.py", ["--max-batch", "0"]),
    ("06_serve.py", ["--rate-limit-rpm", "-1"]),
    ("06_serve.py", ["--demo", "--clients", "0,4"]),
    ("07_structured_output.py", ["--quick", "--seed", "x"]),
    ("07_structured_output.py", ["--max-new-tokens", "0"]),
    ("07_structured_output.py", ["--schema", "/no/such/schema.json", "--prompt", "hi"]),
    ("07_structured_output.py", ["--schema", "data/structured/support.schema.json"]),
    ("07_structured_output.py", ["--top-p", "1.5"]),
    ("08_dpo.py", ["--quick", "--seed", "x"]),
    ("08_dpo.py", ["--beta", "0"]),
    ("08_dpo.py", ["--sft-steps", "-1"]),
    ("08_dpo.py", ["--heldout", "/no/such/file.json"]),
    ("09_grpo.py", ["--quick", "--seed", "x"]),
    ("09_grpo.py", ["--group", "0"]),
    ("10_quantize.py", ["--quick", "--seed", "x"]),
    ("11_moe.py", ["--quick", "--seed", "x"]),
    ("11_moe.py", ["--experts", "0"]),
]


def _lessons_present():
    return [(s, a) for s, a in BAD_FLAGS if (REPO / s).is_file()]


def _check_one_chinese_line(code, stdout: str, stderr: str) -> None:
    err = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{stdout[-1500:]}\n{stderr[-1500:]}"
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr
    assert len(err) == 1 and CJK.search(err[0]), stderr


# One case runs as a user runs it: a new Python process (the real exit code and stderr of `python <script>`).
# The first case of every other lesson runs the script file as __main__ inside this process (runpy), which
# goes through the same `if __name__ == "__main__"` entry point; the other cases call common.errors.run_cli(main)
# with sys.argv set. Both skip the seconds each new process spends importing torch.
REAL_PROCESS = ("01_hello_llm.py", ["--quick", "--seed", "x"])
FIRST = {}
for _script, _args in _lessons_present():
    FIRST.setdefault(_script, _args)


@pytest.mark.parametrize("script,args", _lessons_present(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_flag_is_one_chinese_line(script, args, tmp_path, monkeypatch, capsys):
    env = dict(os.environ, LLM_COURSE_OUTPUTS=str(tmp_path), OPENAI_API_KEY="", OPENAI_BASE_URL="", PYTHONUNBUFFERED="1")
    if (script, args) == REAL_PROCESS:
        r = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        _check_one_chinese_line(r.returncode, r.stdout, r.stderr)
        return
    import importlib
    import runpy

    from common.errors import run_cli

    for k in ("LLM_COURSE_OUTPUTS", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as e:
        if FIRST[script] == args:
            runpy.run_path(str(REPO / script), run_name="__main__")   # the script's own __main__ block
        else:
            run_cli(importlib.import_module(script.removesuffix(".py")).main)
    out = capsys.readouterr()
    _check_one_chinese_line(e.value.code, out.out, out.err)


def test_one_bad_flag_case_runs_as_a_real_process():
    """The real-process case above is one of the parametrized cases (so it is not silently dropped)."""
    assert REAL_PROCESS in _lessons_present()


def test_argparse_messages_are_translated():
    from common.cli import translate_error

    assert translate_error("argument --seed: invalid int value: 'x'") == "参数 --seed 的值 'x' 无效：需要整数。"
    assert "不认识的参数" in translate_error("unrecognized arguments: --foo")
    assert "可选" in translate_error("argument --backend: invalid choice: 'foo' (choose from 'auto', 'openai', 'local')")


def test_defaults_resolve_flag_then_env_then_builtin(monkeypatch, tmp_path):
    from common.cli import course_parser

    p = course_parser("99_demo", "demo", groups=("backend", "local"))
    monkeypatch.delenv("LLM_COURSE_DTYPE", raising=False)
    monkeypatch.setenv("LLM_COURSE_OUTPUTS", str(tmp_path))
    a = p.parse_args([])
    assert (a.dtype, a.backend, a.device, a.seed) == ("fp32", "auto", "auto", 0)
    assert a.out_dir == tmp_path / "99_demo"
    monkeypatch.setenv("LLM_COURSE_DTYPE", "int8")
    assert p.parse_args([]).dtype == "int8"
    assert p.parse_args(["--dtype", "fp32"]).dtype == "fp32"
    monkeypatch.setenv("LLM_COURSE_DTYPE", "fp64")
    with pytest.raises(SystemExit) as e:
        p.parse_args([])
    assert e.value.code == 2


def _lesson_shape_problems(path: Path) -> list[str]:
    """What breaks the one lesson shape in a lesson file (read with ast, nothing imported)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    problems = [f"no {name}(argv)" for name in ("parse_args", "main")
                if name not in top or [a.arg for a in top[name].args.args][:1] != ["argv"]]
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60:
            problems.append(f"{node.name}() is {node.end_lineno - node.lineno + 1} lines (> 60)")
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
            problems.append(f"line {node.lineno}: sys.path (the script's folder is already on it)")
        if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Attribute) and node.test.attr == "quick":
            problems.append(f"line {node.lineno}: `x if args.quick else y` (declare the knob with add_knob)")
        if isinstance(node, ast.ClassDef) and node.name == "SelfCheckFailed":
            problems.append(f"line {node.lineno}: its own SelfCheckFailed (use common.errors.require)")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("自检失败"):
            problems.append(f"line {node.lineno}: a hand-made '自检失败' error (use common.errors.require)")
    return problems


@pytest.mark.parametrize("script", sorted(p.name for p in REPO.glob("[0-9][0-9]_*.py")))
def test_every_lesson_has_the_one_shape(script):
    """parse_args(argv) and main(argv); no sys.path hack; knobs via add_knob, self-checks via require;
    no function over 60 lines."""
    assert _lesson_shape_problems(REPO / script) == []
