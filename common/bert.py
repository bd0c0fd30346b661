"""A BERT encoder (post-LayerNorm transformer, as in all-MiniLM-L6-v2) in plain, readable torch.

    tokens -> word + position + token-type embeddings -> LayerNorm
           -> N x [ x = LN(x + SelfAttention(x));  x = LN(x + FFN_gelu(x)) ]  -> token vectors

Unlike the Llama in common/llama.py it attends in both directions (no causal mask): every token
sees the whole sentence, which is what a sentence encoder wants. Padding keys are masked out.
Weights use the Hugging Face ``BertModel`` names (``load_hf_state_dict``); common/embeddings.py
turns the token vectors into sentence vectors (mean pooling + L2 normalisation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        """Map the Hugging Face BertModel names onto ours (strict: KeyError if a tensor is missing)."""
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
            raise KeyError(f"missing tensor {prefix + missing[0]}")
        self.load_state_dict({ours: sd[prefix + theirs] for ours, theirs in m.items()}, strict=True)
