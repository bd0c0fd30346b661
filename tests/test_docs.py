"""The documentation is part of the product, so it is tested.

What is checked (README.md and every docs/*.md):
  * every command line ``python NN_x.py ...`` (also ``.venv/bin/python``, ``.venv\\Scripts\\python``,
    ``python3``), in fenced code blocks or inline code, names a script that exists and uses only
    flags (and choice values) that the script's own ``--help`` lists;
  * the distinct commands that contain ``--quick`` are run (repo root as cwd, outputs in a temp dir,
    no OPENAI_* variables, local backend) and must exit 0 within 180 s (env LLM_COURSE_DOC_TIMEOUT);
  * every relative link ``[text](path)`` resolves to a file in the repository; links to Python code
    with a line range (``common/llama.py#L43-L54``) point inside the file, and every identifier
    written in backticks in the link text occurs in those lines;
  * the README's test command is byte-for-byte the command that .ci/run executes;
  * every lesson doc docs/NN_*.md (not 00) has an exercises ("练习") and a self-check ("自测") section;
  * the model-config table in docs/00_llm_fundamentals.md matches the real model (config read from
    the GGUF file, parameter count and KV-cache bytes computed from the loaded model);
  * ``python -m common.check`` exits 0.
A lesson script that the docs mention but that does not exist makes a test fail with its name.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS_DIR = REPO_ROOT / "docs"
# per quick command; a slow or heavily shared machine may raise it (the commands are meant to take well under a minute)
QUICK_TIMEOUT_S = int(os.environ.get("LLM_COURSE_DOC_TIMEOUT", "180"))


def doc_files() -> list[Path]:
    return [README] + sorted(DOCS_DIR.glob("*.md"))


def rel(p: Path) -> str:
    return p.relative_to(REPO_ROOT).as_posix()


# --------------------------------------------------------------------------- markdown scanning
FENCE_RE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE_RE = re.compile(r"(`+)(.+?)\1")


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Return (code lines, prose lines) as (line number, text). Code = fenced blocks + inline spans."""
    code, prose = [], []
    in_fence = False
    pending = ""  # a fenced line continued with a trailing backslash
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE_RE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            if line.rstrip().endswith("\\") and not line.rstrip().endswith("\\\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            code.append((no, pending + line))
            pending = ""
            continue
        for m in INLINE_CODE_RE.finditer(line):
            code.append((no, m.group(2)))
        prose.append((no, INLINE_CODE_RE.sub(lambda m: " " * len(m.group(0)), line)))
    return code, prose


# --------------------------------------------------------------------------- commands in the docs
# any python launcher, optionally with a path in front: python, python3, py, .venv/bin/python, .venv\Scripts\python.exe
CMD_RE = re.compile(r"(?:^|[\s;&|(])(?:[^\s`'\"]*[/\\])?(?:python3?|py)(?:\.exe)?\s+(\d\d_[A-Za-z0-9_]+\.py)\b(.*)$")
SCRIPT_NAME_RE = re.compile(r"\b\d\d_[A-Za-z0-9_]+\.py\b")
# inline code that is just "<script> --flags" (e.g. `04_tiny_gpt.py --grad-clip`) is checked like a command too
BARE_CMD_RE = re.compile(r"^\s*(\d\d_[A-Za-z0-9_]+\.py)\s+(-.*)$")


@dataclasses.dataclass(frozen=True)
class DocCommand:
    script: str
    args: tuple[str, ...]
    where: str  # "docs/x.md:12" (first occurrence)

    @property
    def text(self) -> str:
        return " ".join(["python", self.script, *self.args])


def split_args(rest: str) -> tuple[str, ...]:
    rest = re.split(r"\s(?:&&|\|\||\||;|>|2>|#)\s?", " " + rest, maxsplit=1)[0]
    try:
        return tuple(shlex.split(rest, comments=True))
    except ValueError:  # unbalanced quotes in prose-like code: fall back to whitespace
        return tuple(rest.split())


def find_commands() -> list[DocCommand]:
    seen: dict[tuple, DocCommand] = {}
    for f in doc_files():
        code, _ = split_markdown(f.read_text(encoding="utf-8"))
        for no, line in code:
            m = CMD_RE.search(line) or BARE_CMD_RE.match(line)
            while m:
                cmd = DocCommand(m.group(1), split_args(m.group(2)), f"{rel(f)}:{no}")
                seen.setdefault((cmd.script, cmd.args), cmd)
                m = CMD_RE.search(m.group(2))  # a second command later on the same line
    return list(seen.values())


COMMANDS = find_commands()
QUICK_COMMANDS = [c for c in COMMANDS if "--quick" in c.args]
# Each script's first --quick command (the README's, which the lesson's own test shares) is run; variants elsewhere
# in docs/ (an extra --threads or --time-budget) differ only in flags, which test_command_flags_exist checks.
QUICK_RUNS = [c for i, c in enumerate(QUICK_COMMANDS) if c.script not in {d.script for d in QUICK_COMMANDS[:i]}]


def clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.pop("LLM_BACKEND", None)
    env["LLM_BACKEND"] = "local"  # a developer's .env must not turn the doc checks into paid API calls
    env["LLM_COURSE_OUTPUTS"] = str(tmp_path / "outputs")
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


@dataclasses.dataclass
class ScriptOptions:
    options: set[str]
    choices: dict[str, set[str]]


HELP_OPTION_LINE = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")


def help_env() -> dict:
    # argparse wraps the help at the terminal width: fixed, so a real and an in-process run print the same
    return dict(clean_env(Path(os.environ.get("TMPDIR", "/tmp"))), COLUMNS="80")


def help_in_process(script: str) -> tuple[int, str, str]:
    """``python <script> --help`` inside this process: the script file runs as ``__main__`` (runpy) with the
    argv, cwd and environment a real run gets, and argparse prints the help and exits. This skips the
    seconds a new process spends importing torch; test_help_in_process_equals_a_real_process checks that
    one real process prints the same. Returns (exit code, stdout, stderr)."""
    import contextlib
    import io
    import runpy
    from unittest import mock

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, help_env(), clear=True), mock.patch.object(sys, "argv", [script, "--help"]), \
            contextlib.chdir(REPO_ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@functools.lru_cache(maxsize=None)
def script_options(script: str) -> ScriptOptions:
    """Run ``<script> --help`` once per script (in this process) and parse its option strings and choices."""
    path = REPO_ROOT / script
    if not path.is_file():
        pytest.fail(f"文档引用的脚本 {script} 不存在（还没写，或者文件名写错了）")
    code, stdout, stderr = help_in_process(script)
    assert code == 0, f"python {script} --help exited {code}:\n{stderr[-2000:]}"
    options, choices = set(), {}
    for line in stdout.splitlines():
        m = HELP_OPTION_LINE.match(line)
        if not m:
            continue
        for part in m.group(1).split(", "):
            words = part.split()
            if not words or not words[0].startswith("-"):
                continue
            options.add(words[0])
            if len(words) > 1 and words[1].startswith("{") and words[1].endswith("}"):
                choices[words[0]] = set(words[1][1:-1].split(","))
    assert "--help" in options, f"could not parse the --help output of {script}"
    return ScriptOptions(options, choices)


def test_help_in_process_equals_a_real_process():
    """script_options() runs ``--help`` in this process; one real ``python <script> --help`` prints the same."""
    script = "01_hello_llm.py"
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, env=help_env(), capture_output=True,
                       text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 0, f"python {script} --help exited {r.returncode}:\n{r.stderr[-2000:]}"
    code, stdout, _ = help_in_process(script)
    assert code == 0 and stdout == r.stdout and "--quick" in stdout


def test_docs_contain_commands():
    """The extractor must find the README's lesson commands, otherwise the checks below check nothing."""
    scripts = {c.script for c in COMMANDS}
    assert {"01_hello_llm.py"} <= scripts, scripts
    assert any(c.script == "01_hello_llm.py" and c.args == ("--quick",) for c in QUICK_COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.text[:90] for c in COMMANDS])
def test_command_flags_exist(cmd: DocCommand):
    opts = script_options(cmd.script)
    bad = []
    args = list(cmd.args)
    for i, a in enumerate(args):
        if not a.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?(,-?\d+(\.\d+)?)*", a) or a in ("-", "--"):
            continue
        flag, _, inline_value = a.partition("=")
        if flag not in opts.options:
            bad.append(f"unknown flag {flag}")
            continue
        if flag in opts.choices:
            value = inline_value or (args[i + 1] if i + 1 < len(args) else "")
            if value and value not in opts.choices[flag]:
                bad.append(f"{flag} {value}: not one of {sorted(opts.choices[flag])}")
    assert not bad, f"{cmd.where}: `{cmd.text}`: " + "; ".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", QUICK_RUNS, ids=[c.text[:90] for c in QUICK_RUNS])
def test_quick_command_runs(cmd: DocCommand, lesson_runs):
    """Shares its run with the lesson's own tests (conftest.LessonRuns): each command runs once a session."""
    if not (REPO_ROOT / cmd.script).is_file():
        pytest.fail(f"{cmd.where}: 文档里的命令 `{cmd.text}` 引用的脚本 {cmd.script} 不存在")
    r = lesson_runs.run(cmd.script, *cmd.args, timeout=QUICK_TIMEOUT_S)
    print(f"{cmd.text}: exit {r.returncode} in {r.seconds:.1f} s")
    assert r.returncode == 0, f"{cmd.where}: `{cmd.text}` {r.explain()}"


def mentioned_scripts() -> list[str]:
    names = set()
    for f in doc_files():
        names |= set(SCRIPT_NAME_RE.findall(f.read_text(encoding="utf-8")))
    return sorted(names)


@pytest.mark.parametrize("script", mentioned_scripts())
def test_mentioned_script_exists(script):
    where = [rel(f) for f in doc_files() if script in f.read_text(encoding="utf-8")]
    assert (REPO_ROOT / script).is_file(), f"脚本 {script} 不存在，但这些文档提到了它：{', '.join(where)}"


LESSON_SCRIPT_RE = re.compile(r"\b\d\d_[A-Za-z0-9_]+\.py\b")   # 01_hello_llm.py ... also 10_x.py and later


def lesson_scripts() -> list[str]:
    return sorted(p.name for p in REPO_ROOT.glob("[0-9][0-9]_*.py"))


def readme_lesson_table() -> list[str]:
    return [ln for ln in README.read_text(encoding="utf-8").splitlines() if re.match(r"\|\s*`\d\d_", ln)]


def test_readme_lists_every_lesson():
    table = readme_lesson_table()
    scripts = [LESSON_SCRIPT_RE.search(ln).group(0) for ln in table]
    lessons = [name[:2] for name in lesson_scripts()]   # every lesson script present
    assert [s[:2] for s in scripts] == lessons, scripts
    for ln in table:  # every lesson runs without an API key
        assert "| 否 |" in ln, ln


def test_readme_learning_path_covers_every_lesson_with_its_time():
    """The learning path walks through every lesson script, each with the time the lesson table gives it."""
    text = README.read_text(encoding="utf-8")
    path = text.split("## 学习路径", 1)[1].split("\n## ", 1)[0]
    times = {}
    for ln in readme_lesson_table():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        times[LESSON_SCRIPT_RE.search(cells[0]).group(0)] = next(c for c in cells if re.fullmatch(r"约 .+", c))
    assert sorted(times) == lesson_scripts()
    for script, took in times.items():
        assert script in path, f"README 的学习路径没有提到 {script}"
        assert f"第 {script[:2]} 课（{took}）" in path, f"学习路径里第 {script[:2]} 课缺少“（{took}）”（课程表里的时间）"


# --------------------------------------------------------------------------- links
LINK_RE = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINE_ANCHOR_RE = re.compile(r"^L(\d+)(?:-L(\d+))?$")


def doc_links():
    for f in doc_files():
        text = f.read_text(encoding="utf-8")
        in_fence = False
        for no, line in enumerate(text.splitlines(), 1):
            if FENCE_RE.match(line):
                in_fence = not in_fence
                continue
            if in_fence:
                continue
            # a "link" that starts inside an inline code span (e.g. `a[0](x)`) is code, not a link
            spans = [m.span() for m in INLINE_CODE_RE.finditer(line)]
            for m in LINK_RE.finditer(line):
                if not any(a < m.start() < b for a, b in spans):
                    yield f, no, m.group(1), m.group(2)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target))  # http:, https:, mailto:, ...


def test_relative_links_resolve():
    bad, n = [], 0
    for f, no, _text, target in doc_links():
        if is_external(target) or target.startswith("#"):
            continue
        n += 1
        path = target.split("#", 1)[0].split("?", 1)[0]
        dest = (f.parent / path).resolve()
        if REPO_ROOT not in dest.parents and dest != REPO_ROOT:
            bad.append(f"{rel(f)}:{no}: {target} points outside the repository")
        elif not dest.exists():
            bad.append(f"{rel(f)}:{no}: {target} does not exist")
    assert n > 0, "no relative links found: the link extractor is broken"
    assert not bad, "dead links:\n" + "\n".join(bad)


def test_code_line_links_point_at_what_they_name():
    """[`RMSNorm`](../common/llama.py#L43-L54): lines 43..54 must exist and mention RMSNorm."""
    bad, n = [], 0
    for f, no, text, target in doc_links():
        if is_external(target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        m = LINE_ANCHOR_RE.match(anchor)
        if not m or not path.endswith(".py"):
            continue
        n += 1
        dest = (f.parent / path).resolve()
        if not dest.is_file():
            continue  # reported by test_relative_links_resolve
        lines = dest.read_text(encoding="utf-8").splitlines()
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 1 <= a <= b <= len(lines):
            bad.append(f"{rel(f)}:{no}: {target}: lines {a}-{b} outside 1-{len(lines)}")
            continue
        chunk = "\n".join(lines[a - 1:b])
        for span in re.findall(r"`([^`]+)`", text):
            idents = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)
            if idents and not re.search(rf"\b{re.escape(idents[-1])}\b", chunk):
                bad.append(f"{rel(f)}:{no}: {target}: `{span}` does not occur in lines {a}-{b} of {path}")
    assert not bad, "code links point at the wrong lines (the code moved? update the line numbers):\n" + "\n".join(bad)
    if DOCS_DIR.joinpath("00_llm_fundamentals.md").is_file():
        assert n >= 10, f"expected the fundamentals doc to link to code lines, found {n}"


# --------------------------------------------------------------------------- README <-> CI
def readme_setup_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## 两条命令", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)
    return [b.strip("\n") for b in blocks]


def test_readme_test_command_matches_ci():
    blocks = readme_setup_commands()
    assert len(blocks) == 2, f"the '两条命令' section must hold exactly two command blocks, found {len(blocks)}"
    install_and_run, install_and_test = blocks
    assert "\n" not in install_and_test, "the README test command must be one line"
    assert install_and_run.endswith(".venv/bin/python 01_hello_llm.py"), install_and_run
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marker = [i for i, ln in enumerate(ci) if ln.strip() == "# README test command:"]
    assert len(marker) == 1, ".ci/run must contain exactly one '# README test command:' line"
    assert ci[marker[0] + 1] == install_and_test, "README test command and .ci/run differ"


# --------------------------------------------------------------------------- lesson docs
def section_items(text: str, word: str) -> tuple[bool, int]:
    """(is there a heading containing word, how many list items are in that section)."""
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        hm = re.match(r"^(#{1,6})\s+(.*)", ln)
        if hm and word in hm.group(2):
            level, items = len(hm.group(1)), 0
            for nxt in lines[i + 1:]:
                h2 = re.match(r"^(#{1,6})\s", nxt)
                if h2 and len(h2.group(1)) <= level:
                    break
                items += bool(re.match(r"^\s*(?:[-*+]|\d+[.)])\s+\S", nxt))
            return True, items
    return False, 0


@pytest.mark.parametrize("n", sorted(int(p.name[:2]) for p in DOCS_DIR.glob("[0-9][0-9]_*.md") if p.name[:2] != "00"))
def test_lesson_doc_has_exercises_and_self_check(n):
    found = sorted(DOCS_DIR.glob(f"{n:02d}_*.md"))
    assert found, f"第 {n} 课的讲解 docs/0{n}_*.md 不存在"
    for doc in found:
        text = doc.read_text(encoding="utf-8")
        for word in ("练习", "自测"):
            has, items = section_items(text, word)
            assert has, f"{rel(doc)} has no heading containing '{word}'"
            assert items >= 1, f"{rel(doc)}: the '{word}' section has no list items"


# --------------------------------------------------------------------------- facts in the fundamentals doc
def config_table() -> dict[str, str]:
    """First column -> second column of the table under '## 课程用到的模型' in the fundamentals doc."""
    text = (DOCS_DIR / "00_llm_fundamentals.md").read_text(encoding="utf-8")
    section = text.split("## 课程用到的模型", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for ln in section.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = cells[1]
    return rows


def test_fundamentals_config_table_matches_model(local_fp32):
    """Numbers in the fundamentals doc are facts of the model (config read from the GGUF) or computed."""
    import torch

    from common.llama import KVCache

    cfg = local_fp32.config
    rows = config_table()
    field_rows = {}
    for name, value in rows.items():
        m = re.search(r"\b(n_layers|dim|n_heads|n_kv_heads|head_dim|ffn_dim|vocab_size|max_seq_len|rope_base)\b", name)
        if m:
            field_rows[m.group(1)] = value
    expected_fields = {"n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                       "max_seq_len", "rope_base"}
    assert set(field_rows) == expected_fields, f"config rows found: {sorted(field_rows)}"
    for field, value in field_rows.items():
        assert float(value) == float(getattr(cfg, field)), f"{field}: doc says {value}, model has {getattr(cfg, field)}"

    def row(prefix: str) -> int:
        hits = [v for k, v in rows.items() if k.startswith(prefix)]
        assert len(hits) == 1, f"expected one row starting with {prefix!r}, found {len(hits)}"
        return int(hits[0])

    # parameters: tied lm_head/embedding counted once (nn.Module.parameters() de-duplicates shared tensors)
    assert row("参数总数") == sum(p.numel() for p in local_fp32.model.parameters())

    def kv_bytes_per_token(c) -> int:  # measured with the course's own KVCache accounting
        cache = KVCache(c, batch=1, max_len=2, dtype=torch.float32, device="cpu")
        cache.length = 1
        return cache.nbytes_used()

    assert row("每个 token 的 KV cache 字节数") == kv_bytes_per_token(cfg)
    assert row("同上，假如不用 GQA") == kv_bytes_per_token(dataclasses.replace(cfg, n_kv_heads=cfg.n_heads))


# --------------------------------------------------------------------------- environment check
def test_common_check_runs(tmp_path, monkeypatch, capsys):
    """`python -m common.check`, run as __main__ in this process (runpy) with the environment, cwd and argv of a
    real run: a new process would spend seconds importing every dependency again."""
    import runpy

    env = clean_env(tmp_path)
    for k in set(os.environ) - set(env):
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "common" / "check.py")])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("common.check", run_name="__main__", alter_sys=True)
    r = capsys.readouterr()
    assert e.value.code == 0, f"python -m common.check exited {e.value.code}:\n{r.out[-3000:]}\n{r.err[-2000:]}"
    assert "[FAIL]" not in r.out and "全部正常" in r.out
