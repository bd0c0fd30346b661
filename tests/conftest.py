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


@pytest.fixture(autouse=True)
def _no_api_config_from_outside(monkeypatch):
    """A developer's own OPENAI_* variables or .env must not leak into tests: set them empty
    (load_dotenv never overrides an existing variable, and the client treats "" as unset)."""
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "LLM_BACKEND"):
        monkeypatch.setenv(k, "")
