"""One argument parser for every lesson: shared flags defined once, defaults resolved in one place,
and every bad flag turned into one Chinese line (exit 2) instead of argparse's English usage.

    p = course_parser("01_hello_llm", __doc__, groups=("backend", "local"))
    p.add_argument("--temperature", type=non_negative_float, default=0.7, help="...")
    args = p.parse_args(argv)           # args.dtype, args.device, args.threads, args.out_dir ... resolved

Shared flags (one name, one meaning, in every lesson that has them):
  --backend --model --base-url   which LLM answers (group "backend"; see common/client.py)
  --local-model --model-file     which local model (smollm2 | qwen0.5b) and an optional explicit GGUF (group "local")
  --dtype --device --threads     how the local model runs (group "local"; --device/--threads alone: "device")
  --seed --quick --out-dir       every lesson
  --max-new-tokens               how many new tokens to generate (add_max_new_tokens)
A lesson's own knobs are declared once, default, --quick value and help together:
  add_knob(group, "--load-tokens", type=positive_int, default=32, quick=8, help="...")
Each default is resolved here, flag > environment variable > built-in default:
  --backend  LLM_BACKEND (auto)     --dtype  LLM_COURSE_DTYPE (fp32)     --device  LLM_COURSE_DEVICE (auto)
  --local-model  LLM_LOCAL_MODEL (smollm2)
  --threads  LLM_COURSE_THREADS (all cores torch sees)     --out-dir  outputs/<lesson>/ (LLM_COURSE_OUTPUTS root)
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from common.outputs import output_root

BACKENDS = ("auto", "openai", "local")
DTYPES = ("fp32", "int8")
DEVICES = ("auto", "cpu", "cuda", "mps")
LOCAL_MODEL_KEYS = ("smollm2", "qwen0.5b")   # common/model_files.py LOCAL_MODELS
GROUPS = ("backend", "local", "model", "device")


# ------------------------------------------------------------------ value types (Chinese messages)
def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} 不是{what}") from None


def positive_int(text: str) -> int:
    v = _number(text, int, "整数")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"需要正整数（收到 {v}）")
    return v


def non_negative_int(text: str) -> int:
    v = _number(text, int, "整数")
    if v < 0:
        raise argparse.ArgumentTypeError(f"不能是负数（收到 {v}）")
    return v


def positive_float(text: str) -> float:
    v = _number(text, float, "数字")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"需要大于 0 的数（收到 {text}）")
    return v


def non_negative_float(text: str) -> float:
    v = _number(text, float, "数字")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"不能是负数（收到 {text}）")
    return v


def probability(text: str) -> float:
    """A value in (0, 1] (e.g. top-p)."""
    v = _number(text, float, "数字")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"需要在 (0, 1] 之间（收到 {text}）")
    return v


def fraction(text: str) -> float:
    """A value in [0, 1) (e.g. dropout)."""
    v = _number(text, float, "数字")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"需要在 [0, 1) 之间（收到 {text}）")
    return v


def existing_file(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"文件不存在：{p}")
    return p


def existing_dir(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"文件夹不存在：{p}")
    return p


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. 32,64,128."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} 应是逗号分隔的整数，例如 32,64,128") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} 应是逗号分隔的正整数，例如 32,64,128")
    return values


def float_list(text: str) -> list[float]:
    """Comma-separated non-negative numbers, e.g. 0,0.7,1.5."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} 应是逗号分隔的数字，例如 0,0.7,1.5") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} 应是逗号分隔的非负数字，例如 0,0.7,1.5")
    return values


def parts_type(names: list[str]):
    """--part: "all", or a comma list of part numbers (1-based) or names, e.g. 1,3 or toy,memory."""
    def parse(text: str) -> list[str]:
        if text.strip() == "all":
            return list(names)
        chosen = []
        for item in (x.strip() for x in text.split(",") if x.strip()):
            if item.isdigit() and 1 <= int(item) <= len(names):
                chosen.append(names[int(item) - 1])
            elif item in names:
                chosen.append(item)
            else:
                options = " / ".join(f"{i} {n}" for i, n in enumerate(names, 1))
                raise argparse.ArgumentTypeError(f"没有第 {item!r} 部分（可选 all，或 {options}，逗号分隔）")
        return [n for n in names if n in chosen]   # always in lesson order
    return parse


# ------------------------------------------------------------------ the parser
_TRANSLATIONS = [
    (r"argument (\S+): invalid (int|float) value: '(.*)'",
     lambda m: f"参数 {m[1]} 的值 {m[3]!r} 无效：需要{'整数' if m[2] == 'int' else '数字'}。"),
    (r"argument (\S+): invalid choice: '?(.*?)'? \(choose from (.*)\)",
     lambda m: f"参数 {m[1]} 的值 {m[2]!r} 无效：可选 {' / '.join(x.strip(' ' + chr(39)) for x in m[3].split(','))}。"),
    (r"argument (\S+): expected one argument", lambda m: f"参数 {m[1]} 后面需要一个值。"),
    (r"argument (\S+): not allowed with argument (\S+)", lambda m: f"参数 {m[1]} 不能和 {m[2]} 同时使用。"),
    (r"argument (\S+): (.*)", lambda m: f"参数 {m[1]}：{m[2]}。"),
    (r"unrecognized arguments: (.*)", lambda m: f"不认识的参数：{m[1]}。"),
    (r"the following arguments are required: (.*)", lambda m: f"缺少必需的参数：{m[1]}。"),
    (r"ambiguous option: (\S+) could match (.*)", lambda m: f"参数 {m[1]} 有歧义，可能是 {m[2]}。"),
]


def translate_error(message: str) -> str:
    """argparse's English error -> one Chinese sentence (unknown messages pass through)."""
    for pattern, fmt in _TRANSLATIONS:
        m = re.fullmatch(pattern, message.strip())
        if m:
            return fmt(m)
    return message


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the lesson's docstring layout and show every real default in --help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if hasattr(action, "knob"):                 # add_knob: the default and the --quick value
            default, quick = (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for v in action.knob)
            shown = [f"默认 {default}"] if default is not None else []
            shown += [f"--quick 时 {quick}"] if quick is not None else []
            return text + (f"（{'；'.join(shown)}）" if shown else "")
        default = action.default
        if default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool) \
                and "默认" not in text and action.option_strings:
            if isinstance(default, (list, tuple)):
                default = ",".join(map(str, default))
            text += f"（默认 {default}）"
        return text


class CourseArgumentParser(argparse.ArgumentParser):
    def __init__(self, lesson: str, groups, **kw):
        super().__init__(formatter_class=_Formatter, allow_abbrev=False, **kw)
        self.lesson = lesson
        self.groups = tuple(groups)

    def error(self, message: str):  # argparse calls this for every bad flag
        sys.stdout.flush()
        print(f"错误：{translate_error(message)}（运行 python {self.prog} --help 查看所有参数）", file=sys.stderr)
        self.exit(2)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for action in self._actions:                # add_knob: flag given > --quick value > default
            if hasattr(action, "knob") and getattr(ns, action.dest) is None:
                default, quick = action.knob
                setattr(ns, action.dest, quick if getattr(ns, "quick", False) and quick is not None else default)
        try:
            return resolve_defaults(ns, self.lesson)
        except ValueError as e:           # a bad environment variable
            self.error(str(e))


def course_parser(lesson: str, description: str | None, groups=("local",), seed: bool = True) -> CourseArgumentParser:
    """A parser with the shared flags. groups: any of "backend", "local" (local model + dtype + device + threads),
    "model" (local model + device + threads, no dtype: e.g. training lessons), "device" (device + threads)."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown flag groups {unknown}")
    p = CourseArgumentParser(lesson, groups, prog=f"{lesson}.py", description=description)
    g = p.add_argument_group("通用参数（每课相同）")
    g.add_argument("--quick", action="store_true", help="快速模式：1 分钟内跑完（测试和 CI 用）")
    if seed:
        g.add_argument("--seed", type=int, default=0, help="随机种子：同样的种子 = 同样的结果")
    g.add_argument("--out-dir", type=Path, default=None,
                   help=f"结果（results.json、图）写到哪里（默认 outputs/{lesson}/）")
    if "backend" in groups:
        b = p.add_argument_group("模型后端")
        b.add_argument("--backend", choices=BACKENDS, default=None,
                       help="auto：配置了 API 且能连通就用 API，否则用本地模型；openai；local（默认读 LLM_BACKEND，否则 auto）")
        b.add_argument("--model", default=None, help="API 模型名（默认读 OPENAI_MODEL；Ollama 例：qwen2.5:0.5b）")
        b.add_argument("--base-url", default=None, help="OpenAI 兼容服务地址（默认读 OPENAI_BASE_URL）")
    if groups and set(groups) & {"local", "model", "device"}:
        d = p.add_argument_group("本地计算")
        if "local" in groups or "model" in groups:
            d.add_argument("--local-model", choices=LOCAL_MODEL_KEYS, default=None,
                           help="本地模型：smollm2（135M，只懂英文）或 qwen0.5b（Qwen2.5-Coder-0.5B，中英文，"
                                "首次使用多下载约 478 MB）（默认读 LLM_LOCAL_MODEL，否则 smollm2）")
            d.add_argument("--model-file", type=existing_file, default=None,
                           help="本地模型的 GGUF 文件路径（例如从 ModelScope 下载的官方文件；默认自动查找/下载）")
        if "local" in groups:
            d.add_argument("--dtype", choices=DTYPES, default=None,
                           help="本地模型推理精度：fp32（参考实现）或 int8（仅 CPU，更快但是近似）（默认读 LLM_COURSE_DTYPE，否则 fp32）")
        d.add_argument("--device", choices=DEVICES, default=None,
                       help="计算设备（默认读 LLM_COURSE_DEVICE，否则 auto：cuda → mps → cpu）")
        d.add_argument("--threads", type=positive_int, default=None,
                       help="CPU 线程数（默认读 LLM_COURSE_THREADS，否则全部核心）")
    return p


def add_knob(group, *flags, default, quick=None, **kw):
    """Declare one of a lesson's knobs once: its default, its value under --quick, and its help text.

    The flag parses to None when absent; CourseArgumentParser.parse_args then fills in `quick` (when the run
    has --quick and quick is not None) or `default`. --help shows both. A value the user gives always wins."""
    action = group.add_argument(*flags, default=None, **kw)
    action.knob = (default, quick)
    return action


def add_max_new_tokens(parser, default, help_text: str = "最多生成多少个新 token") -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=default, help=help_text)


def _env_choice(name: str, choices, default: str) -> str:
    value = (os.environ.get(name) or "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"环境变量 {name}={value!r} 无效：可选 {' / '.join(choices)}")
    return value


def resolve_defaults(args: argparse.Namespace, lesson: str) -> argparse.Namespace:
    """Fill every shared default in one place: flag > environment variable > built-in default."""
    if hasattr(args, "backend"):
        args.backend = args.backend or _env_choice("LLM_BACKEND", BACKENDS, "auto")
    if hasattr(args, "dtype"):
        args.dtype = args.dtype or _env_choice("LLM_COURSE_DTYPE", DTYPES, "fp32")
    if hasattr(args, "local_model"):
        args.local_model = args.local_model or _env_choice("LLM_LOCAL_MODEL", LOCAL_MODEL_KEYS, "smollm2")
    if hasattr(args, "device"):
        args.device = args.device or _env_choice("LLM_COURSE_DEVICE", DEVICES, "auto")
    if hasattr(args, "threads") and args.threads is None:
        env = (os.environ.get("LLM_COURSE_THREADS") or "").strip()
        if env and not (env.isdigit() and int(env) > 0):
            raise ValueError(f"环境变量 LLM_COURSE_THREADS={env!r} 无效：需要正整数")
        args.threads = int(env) if env else None
    args.out_dir = Path(args.out_dir).expanduser() if args.out_dir else output_root() / lesson
    args.lesson = lesson
    return args


def setup_run(args):
    """Apply the resolved flags: threads, seeds; return the torch device (for lessons that use torch)."""
    import random

    import torch

    from common.device import get_device, setup_threads

    setup_threads(getattr(args, "threads", None))
    if getattr(args, "seed", None) is not None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
    return get_device(getattr(args, "device", "auto") or "auto")
