"""Device choice (cuda -> mps -> cpu) and CPU thread settings, in one place."""
from __future__ import annotations

import os

import torch

from common.errors import UserError


def get_device(pref: str = "auto") -> torch.device:
    """Pick a torch device. pref: auto | cpu | cuda | mps (LLM_COURSE_DEVICE overrides auto)."""
    pref = (pref or "auto").lower()
    if pref == "auto":
        pref = os.environ.get("LLM_COURSE_DEVICE", "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise UserError("没有检测到可用的 CUDA GPU：请改用 --device cpu（或 auto）。")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("没有检测到 Apple MPS：请改用 --device cpu（或 auto）。")
    if pref not in ("cpu", "cuda", "mps"):
        raise UserError(f"未知设备 {pref!r}：可选 auto / cpu / cuda / mps。")
    return torch.device(pref)


def setup_threads(n: int | None = None) -> int:
    """Use n CPU threads for torch (default: LLM_COURSE_THREADS or all physical cores torch sees)."""
    if n is None:
        env = os.environ.get("LLM_COURSE_THREADS")
        n = int(env) if env and env.isdigit() else None
    if n:
        torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()
