"""Device choice (cuda -> mps -> cpu), CPU thread settings, and two facts about the machine that
lessons report next to their measurements (is it busy? peak process memory), in one place."""
from __future__ import annotations

import os
import sys

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


def machine_busy() -> tuple[float, int] | None:
    """(1-minute load average, CPU count) when the load is at least the number of cores, i.e. other
    processes compete for the CPU and wall-clock timings are unreliable; None otherwise (or on Windows,
    which has no load average). Lessons that time things warn once when this is not None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    return (load, cores) if load >= cores else None


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (a high-water mark: it never goes down).
    None where the resource module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024     # bytes on macOS, KB on Linux
