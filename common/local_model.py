"""Load a local model (SmolLM2-135M-Instruct, or Qwen2.5-0.5B with --local-model qwen0.5b) from its GGUF
file into the plain-torch Llama of common/llama.py, and generate with it.

Loading: the GGUF stores quantized matrices (Q4_1/Q8_0); the ``gguf`` package dequantizes them to
float arrays. That takes ~5 s, so the float32 weights are cached once as a safetensors file in the
user cache directory (~540 MB) and later loads read that (about a second).

Which model a file holds is read from the file itself (common/model_files.select_model_file: GGUF
metadata), never from its name or --local-model alone. The derived caches are keyed by the file's
content: its SHA-256 and size (content_key). The official files' hashes are known (verified when they
were fetched); any other file is hashed once and the digest remembered (common/wheels.file_sha256), so
the same model under another name or path shares one cache and a different model never gets another's.

dtype: "fp32" (default) is the reference path the tests compare against. "int8" uses torch's own
dynamic quantization of the Linear layers (int8 weights, activations quantized on the fly) —
decoding one token is memory-bound, so fewer bytes read = faster. Small LLMs have a few huge
"outlier" activation channels (worst at the input of down_proj) that int8 activations cannot
represent, so before quantizing we apply SmoothQuant: divide each input channel of a Linear by a
scale s and multiply the matching weight column by s. The product is unchanged in exact arithmetic
(s is folded into the preceding RMSNorm weight, or into up_proj's rows), but the outliers move from
activations into weights, which int8 handles per output channel. int8 remains an approximation:
benchmarks/local_model_speed.py measures how far its next-token distribution is from fp32.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

from common.device import get_device
from common.errors import UserError
from common.llama import Llama, LlamaConfig
from common.model_files import GGUF_NAME, LOCAL_MODELS, QWEN, ModelFile, resolve_local_model, select_model_file
from common.outputs import cache_dir
from common.generate import generate
from common.tokenizer import ChatTokenizer, load_tokenizer

DTYPES = ("fp32", "int8")  # bf16 was tried: no faster on CPU and greedy output drifted


def _gguf_name_to_ours(name: str) -> str | None:
    if name == "token_embd.weight":
        return "embed.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":  # not present in SmolLM2 (tied); Qwen2.5-0.5B's GGUF has its own
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] != "blk":
        return None
    i, rest = parts[1], ".".join(parts[2:])
    table = {
        "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "mlp_norm.weight",
        "attn_q.weight": "attn.q_proj.weight", "attn_k.weight": "attn.k_proj.weight",
        "attn_v.weight": "attn.v_proj.weight", "attn_output.weight": "attn.o_proj.weight",
        "attn_q.bias": "attn.q_proj.bias", "attn_k.bias": "attn.k_proj.bias",      # Qwen2 only
        "attn_v.bias": "attn.v_proj.bias",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    return f"layers.{i}.{table[rest]}" if rest in table else None


ARCHITECTURES = ("llama", "qwen2")


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read config and dequantized float32 weights from a llama- or qwen2-architecture GGUF file."""
    import gguf
    import numpy as np

    try:
        return _read_gguf(path, gguf, np)
    except UserError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:  # gguf's own errors: one line, no traceback
        raise UserError(f"无法读取模型文件 {path}（{type(e).__name__}: {str(e)[:120]}）：文件可能已损坏，请重新下载。") from None


def _read_gguf(path: Path, gguf, np) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    f = reader.fields

    def val(key, default=None):
        return f[key].contents() if key in f else default

    arch = val("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path.name} 的架构是 {arch!r}：本课程的实现只支持 llama 和 qwen2。")
    names = {t.name for t in reader.tensors}
    cfg = LlamaConfig(
        vocab_size=len(f["tokenizer.ggml.tokens"].data),
        dim=int(val(f"{arch}.embedding_length")),
        n_layers=int(val(f"{arch}.block_count")),
        n_heads=int(val(f"{arch}.attention.head_count")),
        n_kv_heads=int(val(f"{arch}.attention.head_count_kv")),
        ffn_dim=int(val(f"{arch}.feed_forward_length")),
        rope_base=float(val(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(val(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(val(f"{arch}.context_length", 2048)),
        qkv_bias="blk.0.attn_q.bias" in names,
        rope_pairs=(arch == "llama"),       # llama.cpp permutes llama's Q/K rows; qwen2 keeps the halves layout
        tie_embeddings="output.weight" not in names,
    )
    weights = {}
    for t in reader.tensors:
        ours = _gguf_name_to_ours(t.name)
        if ours is None:
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))      # GGUF lists dims fastest-first
        weights[ours] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
    return cfg, weights


OFFICIAL_NAMES = {"smollm2": GGUF_NAME, "qwen0.5b": QWEN.file_name}


def content_key(mf: ModelFile) -> str:
    """Names the derived caches of a GGUF file by its content: model, SHA-256 (first 16 hex digits) and
    size. The SHA-256 is the pinned one for the course's own verified file, else computed once per version
    of the file (common/wheels.file_sha256; ~1-2 s per 500 MB the first time)."""
    from common.wheels import file_sha256

    digest = mf.sha256 or file_sha256(mf.path)
    return f"{mf.key}-{digest[:16]}-{mf.path.stat().st_size}"


def _adopt_legacy(mf: ModelFile, new: Path, legacy_suffix: str) -> None:
    """Caches written before content keys were named '<file stem>-<size>-...'. For the official file
    (hash verified) such a cache is its own: rename it instead of spending seconds and disk on a second one."""
    info = mf.info
    if (mf.sha256 or "") != info.sha256:
        return
    old = new.parent / f"{Path(OFFICIAL_NAMES[mf.key]).stem}-{info.size}-{legacy_suffix}"
    try:
        if new.exists():
            old.unlink(missing_ok=True)     # written again by an older copy of the course: a duplicate
        else:
            os.replace(old, new)
    except OSError:      # not there, or another process moved it first
        pass


def _cached_weights(mf: ModelFile, verbose: bool) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    import json

    from safetensors.torch import load_file, save_file

    path = mf.path
    base = f"{content_key(mf)}-fp32"
    wfile, cfile = cache_dir("derived") / f"{base}.safetensors", cache_dir("derived") / f"{base}.json"
    _adopt_legacy(mf, cfile, "fp32.json")
    _adopt_legacy(mf, wfile, "fp32.safetensors")
    if wfile.is_file() and cfile.is_file():
        try:
            cfg = LlamaConfig(**json.loads(cfile.read_text()))
            return cfg, load_file(str(wfile))
        except Exception:  # a damaged cache is rebuilt, never fatal
            pass
    if verbose:
        print("[模型] 首次加载：反量化 GGUF 权重并缓存为 float32（约 5～10 秒，只需一次）...", flush=True)
    cfg, weights = read_gguf(path)
    try:
        tmp = wfile.parent / f"{base}.tmp"
        save_file(weights, str(tmp))
        os.replace(tmp, wfile)
        cfile.write_text(json.dumps(cfg.__dict__))
    except OSError as e:  # e.g. disk full: still usable, just slower next time
        warnings.warn(f"could not cache weights: {e}")
    return cfg, weights


# English calibration prompts for SmoothQuant (only activation maxima are taken from them).
CALIBRATION_PROMPTS = [
    "Tell me about the history of Rome.",
    "Write a Python function that sorts a list.",
    "What are the benefits of exercise? Give three reasons.",
    "Translate 'good morning' to French and explain.",
]
SMOOTH_ALPHA = 0.7  # how much of the outlier scale moves into the weights (0.7 was best of 0.5/0.7/0.85 here)


@torch.no_grad()
def smooth_for_int8(model: Llama, tokenizer: ChatTokenizer, alpha: float = SMOOTH_ALPHA) -> Llama:
    """SmoothQuant scales folded into the fp32 model (outputs unchanged up to rounding)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, name=name):
                x = inp[0].abs().flatten(0, -2).amax(0)             # max |x| per input channel
                amax[name] = torch.maximum(amax[name], x) if name in amax else x
            hooks.append(mod.register_forward_hook(hook))
    for p in CALIBRATION_PROMPTS:
        model(torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": p}])]))
    for h in hooks:
        h.remove()

    def scale(act_max, weights):
        w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        return (act_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)

    P = torch.nn.Parameter
    for i, layer in enumerate(model.layers):
        a, m = layer.attn, layer.mlp
        s = scale(amax[f"layers.{i}.attn.q_proj"], [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        layer.attn_norm.weight = P(layer.attn_norm.weight / s, requires_grad=False)
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            lin.weight = P(lin.weight * s, requires_grad=False)
        s = scale(amax[f"layers.{i}.mlp.gate_proj"], [m.gate_proj.weight, m.up_proj.weight])
        layer.mlp_norm.weight = P(layer.mlp_norm.weight / s, requires_grad=False)
        for lin in (m.gate_proj, m.up_proj):
            lin.weight = P(lin.weight * s, requires_grad=False)
        s = scale(amax[f"layers.{i}.mlp.down_proj"], [m.down_proj.weight])    # hidden = silu(gate) * up
        m.down_proj.weight = P(m.down_proj.weight * s, requires_grad=False)
        m.up_proj.weight = P(m.up_proj.weight / s[:, None], requires_grad=False)
    s = scale(amax["lm_head"], [model.lm_head.weight])                       # unties lm_head from embed
    model.lm_head.weight = P(model.lm_head.weight * s, requires_grad=False)
    model.norm.weight = P(model.norm.weight / s, requires_grad=False)
    return model


def build_model(cfg: LlamaConfig, weights: dict[str, torch.Tensor], device, dtype: str = "fp32",
                tokenizer: ChatTokenizer | None = None) -> Llama:
    """Create the Llama module without random init (meta device) and assign the weights."""
    if dtype not in DTYPES:
        raise UserError(f"未知精度 {dtype!r}：可选 {' / '.join(DTYPES)}。")
    with torch.device("meta"):
        model = Llama(cfg)
    state = dict(weights)
    state.setdefault("lm_head.weight", state["embed.weight"])
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    from common.llama import rope_tables
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
    model.rope_cos, model.rope_sin = cos, sin
    model.eval().requires_grad_(False)
    model = model.to(device)
    if dtype == "fp32" and device.type == "cpu":
        # Same values and shape [vocab, dim], stored column-major. For one new token the LM head is a
        # matrix-vector product over 113 MB; PyTorch's CPU kernel streams this layout about 2x faster
        # (benchmarks/lm_head_layout.py: 5.1 ms vs 10.4 ms on 2 cores), ~10% of a cached decoding step.
        w = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t(), requires_grad=False)
        model.lm_head.weight = w
        if cfg.tie_embeddings:
            model.embed.weight = w
    if dtype == "int8":
        if device.type != "cpu":
            raise UserError("int8 动态量化只支持 CPU：请在 GPU 上使用 --dtype fp32。")
        from torch.ao.quantization import per_channel_dynamic_qconfig

        smooth_for_int8(model, tokenizer or load_tokenizer())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(
                model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model


def _int8_skeleton(cfg: LlamaConfig) -> Llama:
    """A Llama whose Linear layers are already dynamic-int8 modules (weights filled in later)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    with torch.device("meta"):
        model = Llama(cfg)

    def swap(mod: torch.nn.Module) -> None:
        for name, child in mod.named_children():
            if isinstance(child, torch.nn.Linear):
                setattr(mod, name, nnqd.Linear(child.in_features, child.out_features, bias_=child.bias is not None,
                                               dtype=torch.qint8))
            else:
                swap(child)

    swap(model)
    return model


def _load_int8_cached(mf: ModelFile, cfg: LlamaConfig, weights: dict[str, torch.Tensor]) -> Llama:
    """Quantizing 135 M weights takes seconds; the quantized state dict is cached (~250 MB) instead."""
    from common.llama import rope_tables

    path = mf.path
    qfile = cache_dir("derived") / f"{content_key(mf)}-int8-sq{SMOOTH_ALPHA}.pt"
    _adopt_legacy(mf, qfile, f"int8-sq{SMOOTH_ALPHA}.pt")
    if qfile.is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(qfile, weights_only=True)
                model = _int8_skeleton(cfg)
                model.load_state_dict(state, strict=True, assign=True)
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
            model.rope_cos, model.rope_sin = cos, sin
            return model.eval().requires_grad_(False)
        except Exception:  # stale or damaged cache: rebuild it
            pass
    model = build_model(cfg, weights, torch.device("cpu"), "int8", load_tokenizer(path))
    try:
        tmp = qfile.parent / (qfile.name + ".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, qfile)
    except OSError as e:
        warnings.warn(f"could not cache int8 weights: {e}")
    return model


class LocalModel:
    """The local model and its tokenizer, plus a generate() helper."""

    def __init__(self, model: Llama, tokenizer: ChatTokenizer, path: Path, device, dtype: str, load_seconds: float,
                 key: str = "smollm2"):
        self.key = key                      # "smollm2" | "qwen0.5b"
        self.info = LOCAL_MODELS[key]
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.device = device
        self.dtype = dtype
        self.load_seconds = load_seconds
        self.name = f"{self.info.name} ({dtype}, local)"

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, use_cache: bool = True,
                 stop_ids: set[int] | None = None, on_step=None, logits_processor=None) -> Iterator[int]:
        """Yield new token ids one at a time (common/generate.py's loop; stops at end-of-turn by default)."""
        return generate(self.model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, use_cache=use_cache,
                        stop_ids=self.tokenizer.eos_ids if stop_ids is None else stop_ids,
                        on_step=on_step, logits_processor=logits_processor)


_LOADED: dict[tuple, LocalModel] = {}


def load_local_model(path: str | os.PathLike | None = None, dtype: str | None = None, device=None,
                     verbose: bool = True, model: str | None = None, fused: bool = False) -> LocalModel:
    """Load (once per process) a local model.

    model: smollm2 (default) | qwen0.5b, else $LLM_LOCAL_MODEL; path: an explicit GGUF file (the model it
    holds is read from its metadata: when that is not `model`, the file wins and one line says so; a file
    that is no usable GGUF -> UserError); dtype: fp32 (default, or $LLM_COURSE_DTYPE) | int8.
    fused=True: an inference-only copy whose q/k/v and gate/up projections are one Linear each
    (Llama.fuse_projections: fewer, larger matmuls per decode step); kept apart from the unfused model, which
    the lessons that read or adapt single projections (LoRA, quantization) use."""
    dtype = dtype or os.environ.get("LLM_COURSE_DTYPE", "fp32")
    device = get_device() if device is None else torch.device(device)
    mf = select_model_file(path, resolve_local_model(model))
    gguf_path = mf.path
    cache_key = (str(gguf_path), dtype, str(device), fused)
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    t0 = time.perf_counter()
    cfg, weights = _cached_weights(mf, verbose)
    tok = load_tokenizer(gguf_path)
    if dtype == "int8" and device.type == "cpu":
        model_ = _load_int8_cached(mf, cfg, weights)
    else:
        model_ = build_model(cfg, weights, device, dtype, tok)
    if fused:
        model_.fuse_projections()
    lm = LocalModel(model_, tok, gguf_path, device, dtype, time.perf_counter() - t0, mf.key)
    _LOADED[cache_key] = lm
    return lm

