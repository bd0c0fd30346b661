"""The Makefile (a second way in, beside the README's two commands): every target `make help` lists exists,
and `make -n <target>` prints exactly the commands the README says it runs. Fast: `make -n` runs nothing."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = ["setup", "test", "test-fast", "check", "lesson", "serve", "bench", "clean"]
ARGS = {"lesson": ["N=03", "ARGS=--quick"]}          # the README's example

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def help_targets() -> list[str]:
    out = make("help")
    assert out.returncode == 0, out.stderr
    return [m.group(1) for line in out.stdout.splitlines() if (m := re.match(r"\s+([a-z-]+)\t", line))]


def readme_line(target: str) -> str:
    lines = [ln for ln in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
             if re.match(rf"\| `make {re.escape(target)}[` ]", ln)]
    assert len(lines) == 1, f"README should show `make {target}` once, found {lines}"
    return lines[0]


def test_help_lists_every_target_and_each_exists():
    targets = help_targets()
    assert targets == EXPECTED
    for t in targets:
        out = make("-n", t, *ARGS.get(t, []))
        assert out.returncode == 0, f"make -n {t}: {out.stderr}"
        assert "No rule to make target" not in out.stderr


@pytest.mark.parametrize("target", EXPECTED)
def test_dry_run_is_what_the_readme_says(target):
    line = readme_line(target)
    if target in ARGS:
        assert line.startswith("| `" + " ".join(["make", target, *ARGS[target]]) + "` |")
    commands = [c.strip() for c in make("-n", target, *ARGS.get(target, [])).stdout.splitlines() if c.strip()]
    assert commands
    for c in commands:
        if c.startswith("echo "):                      # what it prints first (a URL, what clean deletes)
            continue
        assert c in line, f"`make -n {target}` runs {c!r}, which README's line does not say: {line!r}"


def test_setup_and_test_match_the_readmes_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = make("-n", "setup").stdout.strip()
    test = make("-n", "test").stdout.strip()
    assert f"{setup} && {test}" in readme              # the two together are the README's command 2


def test_serve_prints_the_chat_page_url_and_clean_says_what_it_deletes():
    serve = make("-n", "serve", "PORT=8123").stdout
    assert "http://127.0.0.1:8123/ " in serve and "--port 8123" in serve
    clean = make("-n", "clean").stdout.splitlines()
    assert clean[0].startswith("echo ") and "outputs/" in clean[0] and "__pycache__" in clean[0]
    assert all(".venv" not in c or "-prune" in c for c in clean[1:])     # never deletes the environment


def test_unknown_lesson_is_one_clear_error():
    out = make("-n", "lesson", "N=99")
    assert out.returncode != 0 and "没有第 99 课" in out.stderr
