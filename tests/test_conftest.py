"""tests/conftest.py's scheduler for `pytest -n 2` (pytest-xdist): whole test files per worker, and the docs' run of a
lesson's quick command on the worker of the lesson's own test file, so the shared run (conftest.LessonRuns) is made
once. Fast: no worker is started."""
from __future__ import annotations

import types

import pytest

xdist = pytest.importorskip("xdist")
import conftest  # noqa: E402  (tests/conftest.py, as pytest imported it: tests/ is on sys.path)


class FakeConfig:
    def __init__(self, dist: str):
        self.option = types.SimpleNamespace(loadscopereorder=True)
        self.values = {"dist": dist, "tx": ["popen", "popen"]}

    def getvalue(self, name):
        return self.values[name]


def test_docs_quick_run_goes_with_the_lessons_test_file():
    config = FakeConfig("load")                                   # what `-n 2` alone gives
    scope = conftest.pytest_xdist_make_scheduler(config, None)._split_scope
    assert scope("tests/test_docs.py::test_quick_command_runs[python 08_dpo.py --quick]") == "tests/test_08_dpo.py"
    assert scope("tests/test_08_dpo.py::test_quick_run") == "tests/test_08_dpo.py"
    assert scope("tests/test_08_dpo.py::test_bad_flags[--k 0]") == "tests/test_08_dpo.py"
    assert scope("tests/test_docs.py::test_command_flags_exist[python 08_dpo.py --quick]") == "tests/test_docs.py"
    assert scope("tests/test_cli.py::test_help[01_hello_llm.py]") == "tests/test_cli.py"
    assert config.option.loadscopereorder is False                # file order: lessons' long runs first


def test_every_lesson_run_by_the_docs_has_a_test_file_that_shares_it():
    from test_docs import QUICK_RUNS

    scope = conftest.pytest_xdist_make_scheduler(FakeConfig("load"), None)._split_scope
    for cmd in QUICK_RUNS:
        where = scope(f"tests/test_docs.py::test_quick_command_runs[{cmd.text}]")
        assert where.startswith(f"tests/test_{cmd.script[:2]}_"), (cmd.text, where)
        assert "lesson_runs.run(" in (conftest.REPO_ROOT / where).read_text(encoding="utf-8"), where


def test_another_dist_mode_is_left_to_xdist():
    assert conftest.pytest_xdist_make_scheduler(FakeConfig("loadfile"), None) is None
