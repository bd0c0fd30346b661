"""The Llama architecture (as used by SmolLM2-135M-Instruct) in plain, readable torch.

    tokens -> embedding -> 30 x [ RMSNorm -> attention (RoPE, grouped-query) -> + residual
                                  RMSNorm -> SwiGLU MLP                      -> + residual ]
           -> RMSNorm -> LM head (tied to the embedding) -> logits

Optional pieces the lessons need (all in ``Llama.forward``):
  * a KV cache (``KVCache``): keys/values of earlier positions are kept, so a new token only
    computes its own K/V (lesson 02); rows can be reset and reused (a serving engine, lesson 06);
  * ``attention_mask``: prompts of different lengths in one batch (padding on either side), packed
    so that padding costs no matmul work;
  * ``last_only`` (next-token logits only) and ``return_hidden`` (hidden states, e.g. for a loss on
    some positions only: lessons 05 and 08);
  * ``return_attn=True``: every layer's attention weights [B, heads, T, S] (lesson 01).
The generation loop that drives it lives in common/generate.py.

RoPE note: llama.cpp's converter permutes the Q/K weight rows of Llama models, so with GGUF
weights RoPE rotates *adjacent* pairs (dims 0/1, 2/3, ...) rather than the two halves of the
head as in the Hugging Face layout. tests/test_llama_reference.py compares against transformers.
"""
from __future__ import annotations

import copy
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
    # Qwen2 differs from Llama in three switches (same code otherwise):
    qkv_bias: bool = False          # Qwen2: biases on the q/k/v projections
    rope_pairs: bool = True         # GGUF llama: RoPE rotates adjacent pairs; Qwen2 (GGUF "neox"): the two halves
    tie_embeddings: bool = True     # SmolLM2: LM head = embedding matrix; Qwen2.5-0.5B GGUF: its own output.weight

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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: bool = True) -> torch.Tensor:
    """Rotate pairs of dims of x [B, H, T, D] by position-dependent angles.

    pairs=True: adjacent pairs (x0,x1), (x2,x3), ... (Llama weights as llama.cpp stores them);
    pairs=False: dim i with dim i + D/2 (the "halves"/NeoX layout: Qwen2, and Llama in the HF layout)."""
    if pairs:
        x_pairs = x.float().unflatten(-1, (-1, 2))      # [B, H, T, D/2, 2]
        x0, x1 = x_pairs[..., 0], x_pairs[..., 1]       # [B, H, T, D/2] each
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)              # [B, H, T, D]
    x0, x1 = x.float().chunk(2, dim=-1)                 # [B, H, T, D/2] each
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).to(x.dtype)


class KVCache:
    """Pre-allocated keys and values for every layer: [B, n_kv_heads, max_len, head_dim] each.

    Memory per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per number.

    The simple case (one prompt, or prompts of equal length): every row holds real tokens in
    columns [0, length). Once a call passes an attention_mask (prompts of different lengths) or
    rows are reset for reuse (a serving engine), the cache becomes *ragged* and also tracks, per row:
      lengths [B]           columns in use (new tokens of that row are written from here)
      valid   [B, max_len]  which written columns hold a real token (padding is never attended to)
      pos     [B]           the position (for RoPE) the row's next real token gets
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.batch = batch
        self.max_len = max_len
        self.length = 0                     # columns in use by the longest row
        self.lengths = self.valid = self.pos = None   # per-row state, only once ragged

    @property
    def ragged(self) -> bool:
        return self.lengths is not None

    def make_ragged(self) -> None:
        """Switch to per-row bookkeeping (done automatically when a call needs it)."""
        if self.ragged:
            return
        dev = self.k[0].device
        self.lengths = torch.full((self.batch,), self.length, dtype=torch.long, device=dev)
        self.valid = torch.zeros(self.batch, self.max_len, dtype=torch.bool, device=dev)
        self.valid[:, :self.length] = True
        self.pos = self.lengths.clone()

    def reset_rows(self, rows) -> None:
        """Empty some rows so new sequences can use them (the other rows are untouched)."""
        self.make_ragged()
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths[rows] = 0
        self.pos[rows] = 0
        self.valid[rows] = False
        self.length = int(self.lengths.max()) if self.batch else 0

    def load_prefix(self, row: int, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """前缀缓存：把一段算好的开头（每层一个 [kv_heads, P, head_dim] 的 K 和 V）复制进第 row 行。
        这一行先清空，然后就像已经预填充过这 P 个 token：下一个 token 写在第 P 列、位置是 P。"""
        self.reset_rows([row])
        P = ks[0].shape[1] if ks else 0
        for layer, (k, v) in enumerate(zip(ks, vs)):
            self.k[layer][row, :, :P] = k
            self.v[layer][row, :, :P] = v
        self.lengths[row] = self.pos[row] = P
        self.valid[row, :P] = True
        self.length = int(self.lengths.max())

    def first_rows(self, n: int) -> "KVCache":
        """A view of rows 0..n-1 (slices share storage, nothing is copied): a serving engine runs only the rows
        in use. Needs a ragged cache (reset_rows first)."""
        if n == self.batch:
            return self
        self.make_ragged()
        view = copy.copy(self)
        view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
        view.batch = n
        view.lengths, view.valid, view.pos = self.lengths[:n], self.valid[:n], self.pos[:n]
        return view

    def nbytes_used(self) -> int:
        """Bytes actually holding keys/values for the filled positions."""
        per_pos = sum(t[:1, :, :1].nelement() * t.element_size() for t in self.k + self.v)
        filled = int(self.valid.sum()) if self.ragged else self.length * self.batch
        return per_pos * filled

    def nbytes_allocated(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.k + self.v)


def unpack(t: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Packed batch: the real tokens' [N, C] back into a zero-padded [B, T, C] (``real`` [B, T] bool)."""
    if real is None:
        return t
    full = t.new_zeros(*real.shape, t.shape[-1])
    full[real] = t
    return full


@dataclass
class Span:
    """Where one forward call's tokens sit, shared by all layers.

    Simple case: ``start`` (write columns start..start+T of every row) and a plain causal mask.
    Masked case: ``cols`` [B, T] (the cache column of each new token) and ``mask`` [B, 1, T, S]
    (True = this query may attend to that key column)."""
    cos: torch.Tensor                # [T, D/2], or [B, 1, T, D/2] when rows have different positions
    sin: torch.Tensor
    total: int                       # S: key columns attended over
    start: int = 0
    cols: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    real: torch.Tensor | None = None   # [B, T] bool when packed: x holds only the real tokens, [N, dim]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, span: Span, layer: int, cache: KVCache | None, return_attn: bool):
        cfg = self.cfg
        B, T = span.real.shape if span.real is not None else x.shape[:2]
        q = unpack(self.q_proj(x), span.real).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)     # [B, 9, T, 64]
        k = unpack(self.k_proj(x), span.real).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, 3, T, 64]
        v = unpack(self.v_proj(x), span.real).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, 3, T, 64]
        q, k = apply_rope(q, span.cos, span.sin, cfg.rope_pairs), apply_rope(k, span.cos, span.sin, cfg.rope_pairs)

        if cache is not None:  # write this step's K/V, then attend over everything so far
            if span.cols is None:
                cache.k[layer][:, :, span.start:span.start + T] = k
                cache.v[layer][:, :, span.start:span.start + T] = v
            else:                                    # each row writes at its own columns
                rows = torch.arange(B, device=x.device)[:, None]
                cache.k[layer][rows, :, span.cols] = k.transpose(1, 2)               # [B, T, 3, 64]
                cache.v[layer][rows, :, span.cols] = v.transpose(1, 2)
            k = cache.k[layer][:, :, :span.total]                                    # [B, 3, S, 64]
            v = cache.v[layer][:, :, :span.total]
        S = k.shape[2]

        if span.mask is not None:
            mask, is_causal = span.mask, False       # [B, 1, T, S]: causal + padding
        elif T == 1:
            mask, is_causal = None, False            # one new token may look at every cached position
        elif S == T:
            mask, is_causal = None, True
        else:
            mask, is_causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T), False

        if return_attn:  # the explicit formula, so the weights can be returned
            group = cfg.n_heads // cfg.n_kv_heads
            kx, vx = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, 9, S, 64]
            scores = (q.float() @ kx.float().transpose(-2, -1)) / math.sqrt(cfg.head_dim)  # [B, 9, T, S]
            if is_causal:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = scores.softmax(dim=-1)                                            # rows sum to 1
            out = (attn @ vx.float()).to(x.dtype)                                    # [B, 9, T, 64]
        else:  # the same maths, fused (torch's scaled_dot_product_attention)
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)          # [B, T, 576]
        if span.real is not None:
            out = out[span.real]                                                     # [N, 576]: real tokens only
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

    def forward(self, x, span: Span, layer: int, cache: KVCache | None, return_attn: bool):
        a, attn = self.attn(self.attn_norm(x), span, layer, cache, return_attn)
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
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight # tied: the same matrix reads tokens in and out
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch: int = 1, max_len: int = 2048) -> KVCache:
        dtype = self.norm.weight.dtype if self.norm.weight.is_floating_point() else torch.float32
        return KVCache(self.config, batch, min(max_len, self.config.max_seq_len), dtype, self.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                attention_mask: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False, return_attn: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab].

        cache           a KVCache: earlier positions are read from it and this call's K/V appended
        attention_mask  [B, T], 1 = real token, 0 = padding (prompts of different lengths in one
                        batch, padded on the left or the right): padding is never attended to and
                        every real token gets its true position (0, 1, 2, ... within its own row).
                        The batch is then *packed*: embedding, projections and MLP run on the N real
                        tokens only ([N, 576], not [B, T, 576]); only attention sees the padded [B, T]
                        layout. So a serving step that mixes a 40-token prefill with 7 one-token decodes
                        costs 47 tokens of matmul, not 8 x 40 (lesson 06). Padding positions of the
                        output hold zeros (with last_only, so does a row that has no real token).
        last_only       only each row's last real token: logits [B, vocab] (all next-token sampling needs;
                        the LM head, a 576 x 49152 matrix, then runs on one position per row)
        return_hidden   the final hidden states (after the last RMSNorm) instead of logits;
                        ``model.lm_head(h).float()`` turns any of them into logits
        return_attn     also every layer's attention weights [B, heads, T, S]
        """
        B, T = input_ids.shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None                   # nothing padded: the simple path is exact and faster
        span = self._span(B, T, cache, attention_mask)
        if span.real is not None:                   # packed: only real tokens go through the matmuls
            input_ids = input_ids[span.real]                                          # [N]
        x = self.embed(input_ids)                                                     # [B, T, 576] or [N, 576]
        if x.dtype != self.norm.weight.dtype:
            x = x.to(self.norm.weight.dtype)
        attns = []
        for i, block in enumerate(self.layers):
            x, attn = block(x, span, i, cache, return_attn)
            attns.append(attn)
        if cache is not None:
            self._advance(cache, T, attention_mask)
        h = self.norm(x)                                                              # [B, T, 576]
        h = unpack(h, span.real)                    # packed: back to [B, T, 576], zeros at padding
        if last_only:
            h = h[torch.arange(B, device=h.device), self._last_real(B, T, attention_mask, h.device)]  # [B, 576]
        out = h if return_hidden else self.lm_head(h).float()                         # [B, (T,) 49152]
        return (out, attns) if return_attn else out

    @staticmethod
    def _last_real(B: int, T: int, mask: torch.Tensor | None, device) -> torch.Tensor:
        """Index of each row's last real token (T - 1 unless the row is padded on the right)."""
        if mask is None:
            return torch.full((B,), T - 1, dtype=torch.long, device=device)
        return (T - 1 - mask.to(device).bool().flip(1).long().argmax(1))

    def _span(self, B: int, T: int, cache: KVCache | None, mask: torch.Tensor | None) -> Span:
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if mask is None and (cache is None or not cache.ragged):   # the simple, common case
            start = cache.length if cache is not None else 0
            if start + T > limit:
                raise ValueError(f"sequence too long: {start + T} positions (limit {limit})")
            return Span(self.rope_cos[start:start + T], self.rope_sin[start:start + T], start + T, start=start)
        dev = self.device
        m = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool()
        rank = (m.long().cumsum(1) - 1).clamp(min=0)              # 0, 1, 2, ... over the real tokens
        if cache is None:
            pos, cols, key_ok = rank, torch.arange(T, device=dev).expand(B, T), m
        else:
            cache.make_ragged()
            pos = cache.pos[:, None] + rank
            cols = cache.lengths[:, None] + torch.arange(T, device=dev)           # [B, T]
            if int(cols.max()) >= limit:
                raise ValueError(f"sequence too long: {int(cols.max()) + 1} cache columns (limit {limit})")
            cache.valid[torch.arange(B, device=dev)[:, None], cols] = m
            key_ok = cache.valid[:, :int(cols.max()) + 1]
        S = key_ok.shape[1]
        key_col = torch.arange(S, device=dev)[None, None, :]                       # [1, 1, S]
        mask4 = ((key_col <= cols[:, :, None]) & key_ok[:, None, :])              # causal and real
        mask4 |= key_col == cols[:, :, None]       # a padding query sees itself (never an empty row)
        return Span(self.rope_cos[pos][:, None], self.rope_sin[pos][:, None], S,
                    cols=cols if cache is not None else None, mask=mask4[:, None],
                    real=m if mask is not None else None)

    @staticmethod
    def _advance(cache: KVCache, T: int, mask: torch.Tensor | None) -> None:
        """After a call: T more columns used (trailing padding excepted), real tokens counted as positions."""
        if not cache.ragged:
            cache.length += T
            return
        if mask is None:
            cache.lengths += T
            cache.pos += T
        else:
            m = mask.to(cache.lengths.device).bool()
            used = torch.where(m.any(1), T - m.flip(1).long().argmax(1), 0)     # up to the last real token
            cache.lengths += used
            cache.pos += m.sum(1)
        cache.length = int(cache.lengths.max())
