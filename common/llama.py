"""The Llama architecture (as used by SmolLM2-135M-Instruct) in plain, readable torch.

    tokens -> embedding -> 30 x [ RMSNorm -> attention (RoPE, grouped-query) -> + residual
                                  RMSNorm -> SwiGLU MLP                      -> + residual ]
           -> RMSNorm -> LM head (tied to the embedding) -> logits

Optional pieces the lessons need:
  * a KV cache (``KVCache``): keys/values of earlier positions are kept, so a new token only
    computes its own K/V (lesson 02);
  * ``return_attn=True``: every layer's attention weights [B, heads, T, S] (lesson 01).

RoPE note: llama.cpp's converter permutes the Q/K weight rows of Llama models, so with GGUF
weights RoPE rotates *adjacent* pairs (dims 0/1, 2/3, ...) rather than the two halves of the
head as in the Hugging Face layout. tests/test_llama_reference.py compares against transformers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576            # hidden size
    n_layers: int = 30
    n_heads: int = 9          # query heads
    n_kv_heads: int = 3       # key/value heads (GQA: 3 query heads share one K/V head)
    ffn_dim: int = 1536       # SwiGLU hidden size
    rope_base: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight — LayerNorm without mean-centering and bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position and every pair of dims: [max_len, head_dim // 2]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0,x1), (x2,x3), ... of x [B, H, T, D] by position-dependent angles."""
    x_pairs = x.float().unflatten(-1, (-1, 2))          # [B, H, T, D/2, 2]
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]           # [B, H, T, D/2] each
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)                  # [B, H, T, D]


class KVCache:
    """Pre-allocated keys and values for every layer: [B, n_kv_heads, max_len, head_dim] each.

    ``length`` is how many positions are filled. Memory per token =
    2 (K and V) x layers x kv_heads x head_dim x bytes per number.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def nbytes_used(self) -> int:
        """Bytes actually holding keys/values for the filled positions."""
        per_pos = sum(t[:, :, :1].nelement() * t.element_size() for t in self.k + self.v)
        return per_pos * self.length

    def nbytes_allocated(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, start: int, return_attn: bool):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)     # [B, 9, T, 64]
        k = self.k_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, 3, T, 64]
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, 3, T, 64]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:  # write this step's K/V, then attend over everything so far
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k = cache.k[layer][:, :, :start + T]                                     # [B, 3, S, 64]
            v = cache.v[layer][:, :, :start + T]
        S = k.shape[2]

        if return_attn:  # the explicit formula, so the weights can be returned
            group = cfg.n_heads // cfg.n_kv_heads
            kx, vx = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, 9, S, 64]
            scores = (q.float() @ kx.float().transpose(-2, -1)) / math.sqrt(cfg.head_dim)  # [B, 9, T, S]
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            scores = scores.masked_fill(~causal, float("-inf"))
            attn = scores.softmax(dim=-1)                                            # rows sum to 1
            out = (attn @ vx.float()).to(x.dtype)                                    # [B, 9, T, 64]
        else:  # the same maths, fused (torch's scaled_dot_product_attention)
            attn = None
            if T == 1:
                mask, is_causal = None, False          # one new token may look at every cached position
            elif S == T:
                mask, is_causal = None, True
            else:
                mask, is_causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T), False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)          # [B, T, 576]
        return self.o_proj(out), attn


class MLP(nn.Module):
    """SwiGLU: down( silu(gate(x)) * up(x) )."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache, start, return_attn):
        a, attn = self.attn(self.attn_norm(x), cos, sin, layer, cache, start, return_attn)
        x = x + a                                   # residual
        x = x + self.mlp(self.mlp_norm(x))          # residual
        return x, attn


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight     # tied: the same matrix reads tokens in and out
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, batch: int = 1, max_len: int = 2048) -> KVCache:
        p = next(self.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return KVCache(self.config, batch, min(max_len, self.config.max_seq_len), dtype, p.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, return_attn: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab] (and each layer's attention if return_attn)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > (cache.max_len if cache is not None else self.config.max_seq_len):
            raise ValueError(f"sequence too long: {start + T} positions")
        cos = self.rope_cos[start:start + T]                                          # [T, 32]
        sin = self.rope_sin[start:start + T]
        x = self.embed(input_ids)                                                     # [B, T, 576]
        if x.dtype != self.norm.weight.dtype:
            x = x.to(self.norm.weight.dtype)
        attns = []
        for i, block in enumerate(self.layers):
            x, attn = block(x, cos, sin, i, cache, start, return_attn)
            if return_attn:
                attns.append(attn)
        if cache is not None:
            cache.length = start + T
        logits = self.lm_head(self.norm(x)).float()                                   # [B, T, 49152]
        return (logits, attns) if return_attn else logits
