"""Llama 架构（SmolLM2-135M-Instruct 用的就是它），用朴素的 torch 写成，可以一行一行读懂。

    tokens -> embedding -> 30 层 x [ RMSNorm -> 注意力 attention（RoPE, GQA） -> + 残差
                                     RMSNorm -> SwiGLU MLP（前馈网络）        -> + 残差 ]
           -> RMSNorm -> LM head（与 embedding 共用同一个矩阵）-> logits

几节课要用到的可选功能（都在 ``Llama.forward`` 里）：
  * KV 缓存（``KVCache``）：前面各位置的 key/value 留着不扔，新 token 只需算它自己的 K/V
    （第 2 课）；缓存的行可以清空后给新请求重用（服务引擎，第 6 课）；
  * ``attention_mask``：长短不一的提示词放进同一批（padding 补在左边或右边都行），并且"打包"
    计算，让 padding 不占任何矩阵乘法的工作量；
  * ``last_only``（只要下一个 token 的 logits）和 ``return_hidden``（返回隐藏状态，比如只在
    部分位置上算损失：第 5、8 课）；
  * ``return_attn=True``：同时返回每一层的注意力权重 [B, heads, T, S]（第 1 课）；
  * 只用于推理的提速（docs/02 的"单条序列解码一步的时间花在哪里"有实测）：``fuse_projections()`` 把 q/k/v、
    gate/up 各拼成一个 Linear；RoPE 用复数乘法、RMSNorm 用 F.rms_norm（``set_fast_paths`` 可以切回逐步的公式）。
驱动它一个 token 一个 token 往下生成的循环在 common/generate.py。

RoPE 提示：llama.cpp 的转换脚本会重排 Llama 模型 Q/K 权重的行，所以用 GGUF 权重时，RoPE 旋转的是
*相邻*的两维（第 0/1 维、第 2/3 维……），而不是 Hugging Face 布局里每个头的前一半和后一半。
tests/test_llama_reference.py 会拿它和 transformers 的输出逐一对比。
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
    dim: int = 576            # 隐藏维度：每个 token 的向量有多长
    n_layers: int = 30
    n_heads: int = 9          # query 头数
    n_kv_heads: int = 3       # key/value 头数（GQA：每 3 个 query 头共用一个 K/V 头）
    ffn_dim: int = 1536       # SwiGLU 中间层的宽度
    rope_base: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    # Qwen2 和 Llama 只差下面三个开关（其余代码完全相同）：
    qkv_bias: bool = False          # Qwen2：q/k/v 三个投影带偏置（bias）
    rope_pairs: bool = True         # GGUF 里的 llama：RoPE 旋转相邻两维；Qwen2（GGUF 里叫 "neox"）：旋转前后两半
    tie_embeddings: bool = True     # SmolLM2：LM head 就是 embedding 矩阵；Qwen2.5-0.5B 的 GGUF：有自己的 output.weight

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight —— 相当于不减均值、也不加偏置的 LayerNorm。"""

    fused = True    # True：同一个公式交给 torch 的 F.rms_norm 一次算完（结果相同，少几个小算子）

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.fused:
            return F.rms_norm(xf, xf.shape[-1:], self.weight.float(), self.eps).to(x.dtype)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """每个位置、每一对维度的旋转角的 cos/sin：[max_len, head_dim // 2]（角度 = 位置 × 这一对维度的频率）。"""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: bool = True) -> torch.Tensor:
    """把 x [B, H, T, D] 的维度两两配对，每一对按一个随位置变化的角度旋转。

    pairs=True：相邻两维配对 (x0,x1)、(x2,x3)……（llama.cpp 存 Llama 权重的方式）；
    pairs=False：第 i 维和第 i + D/2 维配对（"前后两半"即 NeoX 布局：Qwen2，以及 HF 布局的 Llama）。"""
    if pairs:
        x_pairs = x.float().unflatten(-1, (-1, 2))      # [B, H, T, D/2, 2]
        x0, x1 = x_pairs[..., 0], x_pairs[..., 1]       # 两个都是 [B, H, T, D/2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)              # [B, H, T, D]
    x0, x1 = x.float().chunk(2, dim=-1)                 # 两个都是 [B, H, T, D/2]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).to(x.dtype)


def apply_rope_complex(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """和 apply_rope(pairs=True) 完全相同的旋转，写成复数乘法：把相邻两维 (x0, x1) 看成复数 x0 + i·x1，
    乘上 cos + i·sin 就是转了一个角度。一个乘法算子代替十来个小算子（解码一步要做 60 次）。"""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))     # [B, H, T, D/2]，复数
    return torch.view_as_real(xc * cis).flatten(-2).to(x.dtype)      # [B, H, T, D]


def fuse_linears(linears: list[nn.Module]) -> nn.Module:
    """把输入相同的几个 Linear 拼成一个（输出按顺序首尾相接）：一次矩阵乘法代替几次。
    普通 Linear 拼权重；int8 动态量化的 Linear 按输出通道量化，所以直接拼 int8 权重和各行的 scale，
    得到的 int8 数值和拼之前一模一样。"""
    first = linears[0]
    out_features = sum(lin.out_features for lin in linears)
    biases = [lin.bias() if callable(getattr(lin, "bias", None)) else lin.bias for lin in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if isinstance(first, nn.Linear):
        w = first.weight
        fused = nn.Linear(first.in_features, out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        fused.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    ws = [lin.weight() for lin in linears]                               # torch.ao 的动态量化 Linear
    if any(w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) or w.q_per_channel_axis() != 0
           for w in ws):
        raise ValueError("fuse_linears: only per-output-channel quantized weights can be concatenated")
    w = torch._make_per_channel_quantized_tensor(
        torch.cat([w.int_repr() for w in ws]), torch.cat([w.q_per_channel_scales() for w in ws]),
        torch.cat([w.q_per_channel_zero_points() for w in ws]), 0)
    fused = type(first)(first.in_features, out_features, bias_=bias is not None, dtype=w.dtype)
    fused.set_weight_bias(w, bias)
    return fused


class KVCache:
    """为每一层预先分配好的 key 和 value：各是 [B, n_kv_heads, max_len, head_dim]。

    每个 token 占的内存 = 2（K 和 V）× 层数 × KV 头数 × head_dim × 每个数的字节数。

    简单情况（一条提示词，或几条等长的提示词）：每一行的第 [0, length) 列都是真实 token。一旦某次
    调用传了 attention_mask（提示词长短不一），或者有行被清空重用（服务引擎），缓存就变成"参差"的
    （*ragged*），这时还要为每一行分别记下：
      lengths [B]           已用了多少列（这一行的新 token 从这一列开始写）
      valid   [B, max_len]  已写的列里哪些是真实 token（注意力永远不看 padding）
      pos     [B]           这一行下一个真实 token 的位置编号（给 RoPE 用）
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.batch = batch
        self.max_len = max_len
        self.length = 0                     # 最长的那一行用了多少列
        self.lengths = self.valid = self.pos = None   # 每行各自的状态，变成 ragged 之后才有

    @property
    def ragged(self) -> bool:
        return self.lengths is not None

    def make_ragged(self) -> None:
        """切换成逐行记账（某次调用需要时会自动切换）。"""
        if self.ragged:
            return
        dev = self.k[0].device
        self.lengths = torch.full((self.batch,), self.length, dtype=torch.long, device=dev)
        self.valid = torch.zeros(self.batch, self.max_len, dtype=torch.bool, device=dev)
        self.valid[:, :self.length] = True
        self.pos = self.lengths.clone()

    def reset_rows(self, rows) -> None:
        """清空指定的几行，好让新的序列使用（其他行原样不动）。"""
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
        """第 0..n-1 行的视图（切片和原缓存共用存储，不复制任何数据）：服务引擎只跑正在用的那几行。
        需要 ragged 缓存（先调用 reset_rows）。"""
        if n == self.batch:
            return self
        self.make_ragged()
        view = copy.copy(self)
        view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
        view.batch = n
        view.lengths, view.valid, view.pos = self.lengths[:n], self.valid[:n], self.pos[:n]
        return view

    def nbytes_used(self) -> int:
        """已填入的位置上，key/value 实际占用的字节数。"""
        per_pos = sum(t[:1, :, :1].nelement() * t.element_size() for t in self.k + self.v)
        filled = int(self.valid.sum()) if self.ragged else self.length * self.batch
        return per_pos * filled

    def nbytes_allocated(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.k + self.v)

    def truncate(self, length: int) -> None:
        """把缓存退回到只剩前 length 个位置（投机解码：目标模型一次验证了 k 个草稿 token，只接受了前 n 个，
        后面那几列的 K/V 作废）。不用清零：下一次调用从第 length 列开始写，正好把它们覆盖掉。
        只用于非 ragged 的缓存（每一行长度相同）。"""
        if self.ragged:
            raise ValueError("truncate() needs a non-ragged cache (all rows the same length)")
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


def unpack(t: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """打包过的批次：把真实 token 的 [N, C] 放回补零的 [B, T, C]（``real`` 是 [B, T] 的 bool）。"""
    if real is None:
        return t
    full = t.new_zeros(*real.shape, t.shape[-1])
    full[real] = t
    return full


@dataclass
class Span:
    """一次 forward 调用里的 token 各落在哪里（位置、缓存列、遮罩）；所有层共用这一份。

    简单情况：``start``（每一行都写第 start..start+T 列）加上普通的因果遮罩。
    带遮罩的情况：``cols`` [B, T]（每个新 token 写进缓存的哪一列）和 ``mask`` [B, 1, T, S]
    （True = 这个 query 可以看那一列 key）。"""
    cos: torch.Tensor                # [T, D/2]；各行位置不同时是 [B, 1, T, D/2]
    sin: torch.Tensor
    cis: torch.Tensor | None         # cos + i·sin（复数形式，apply_rope_complex 用；不用时为 None）
    total: int                       # S：注意力要看的 key 列数
    start: int = 0
    cols: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    real: torch.Tensor | None = None   # 打包时是 [B, T] 的 bool：x 里只有真实 token，形状 [N, dim]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.qkv_proj = None        # Llama.fuse_projections() 之后：q/k/v 三个投影拼成的一个 Linear

    def forward(self, x, span: Span, layer: int, cache: KVCache | None, return_attn: bool):
        cfg = self.cfg
        B, T = span.real.shape if span.real is not None else x.shape[:2]
        if self.qkv_proj is not None:               # 一次矩阵乘法，再切成 q、k、v
            q, k, v = self.qkv_proj(x).split([cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = unpack(q, span.real).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)     # [B, 9, T, 64]
        k = unpack(k, span.real).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, 3, T, 64]
        v = unpack(v, span.real).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, 3, T, 64]
        if span.cis is not None:
            q, k = apply_rope_complex(q, span.cis), apply_rope_complex(k, span.cis)
        else:
            q, k = apply_rope(q, span.cos, span.sin, cfg.rope_pairs), apply_rope(k, span.cos, span.sin, cfg.rope_pairs)

        if cache is not None:  # 先把这一步的 K/V 写进缓存，再对到目前为止的所有位置做注意力
            if span.cols is None:
                cache.k[layer][:, :, span.start:span.start + T] = k
                cache.v[layer][:, :, span.start:span.start + T] = v
            else:                                    # 每一行写到它自己的列
                rows = torch.arange(B, device=x.device)[:, None]
                cache.k[layer][rows, :, span.cols] = k.transpose(1, 2)               # [B, T, 3, 64]
                cache.v[layer][rows, :, span.cols] = v.transpose(1, 2)
            k = cache.k[layer][:, :, :span.total]                                    # [B, 3, S, 64]
            v = cache.v[layer][:, :, :span.total]
        S = k.shape[2]

        if span.mask is not None:
            mask, is_causal = span.mask, False       # [B, 1, T, S]：因果 + padding
        elif T == 1:
            mask, is_causal = None, False            # 只有一个新 token：缓存里的每个位置它都能看
        elif S == T:
            mask, is_causal = None, True             # 没有更早的位置：普通的因果遮罩
        else:
            mask, is_causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T), False

        if return_attn:  # 按公式一步一步算，这样才拿得到注意力权重
            group = cfg.n_heads // cfg.n_kv_heads
            kx, vx = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, 9, S, 64]
            scores = (q.float() @ kx.float().transpose(-2, -1)) / math.sqrt(cfg.head_dim)  # [B, 9, T, S]
            if is_causal:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = scores.softmax(dim=-1)                                            # 每一行加起来等于 1
            out = (attn @ vx.float()).to(x.dtype)                                    # [B, 9, T, 64]
        else:  # 同样的数学，融合成一个算子（torch 的 scaled_dot_product_attention）
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)          # [B, T, 576]
        if span.real is not None:
            out = out[span.real]                                                     # [N, 576]：只留真实 token
        return self.o_proj(out), attn


class MLP(nn.Module):
    """SwiGLU：down( silu(gate(x)) * up(x) )——gate 那一路决定 up 的每一维放行多少。"""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up_proj = None    # Llama.fuse_projections() 之后：gate 和 up 拼成的一个 Linear

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, span: Span, layer: int, cache: KVCache | None, return_attn: bool):
        a, attn = self.attn(self.attn_norm(x), span, layer, cache, return_attn)
        x = x + a                                   # 残差连接
        x = x + self.mlp(self.mlp_norm(x))          # 残差连接
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
            self.lm_head.weight = self.embed.weight # 共用权重：读入 token 和给 token 打分用的是同一个矩阵
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.rope_complex = True    # RoPE 用复数乘法算（apply_rope_complex；只对相邻两维配对的布局）

    def fuse_projections(self) -> "Llama":
        """只用于推理的变换（原地修改，返回自己）：每层的 q/k/v 投影拼成一个 qkv_proj，gate/up 拼成一个
        gate_up_proj。输入相同的几次矩阵乘法变成一次：解码一步少 90 次算子调用（CPU 上每次调用都有固定开销），
        输出和拼之前相同（只差浮点舍入）。之后模型里就没有 q_proj、gate_proj 这些名字了，所以要挂 LoRA、
        要读单个投影权重（第 5、10 课）的地方用没拼过的模型。"""
        for layer in self.layers:
            a, m = layer.attn, layer.mlp
            if a.qkv_proj is None:
                a.qkv_proj = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
                del a.q_proj, a.k_proj, a.v_proj
            if m.gate_up_proj is None:
                m.gate_up_proj = fuse_linears([m.gate_proj, m.up_proj])
                del m.gate_proj, m.up_proj
        return self

    def set_fast_paths(self, rope: bool | None = None, norm: bool | None = None) -> "Llama":
        """打开/关掉两条等价的快速写法（基准测试 benchmarks/decode_levers.py 用它前后对比）：
        rope = 复数乘法版 RoPE，norm = F.rms_norm。None = 不变。"""
        if rope is not None:
            self.rope_complex = rope
        if norm is not None:
            for mod in self.modules():
                if isinstance(mod, RMSNorm):
                    mod.fused = norm
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch: int = 1, max_len: int = 2048) -> KVCache:
        dtype = self.norm.weight.dtype if self.norm.weight.is_floating_point() else torch.float32
        return KVCache(self.config, batch, min(max_len, self.config.max_seq_len), dtype, self.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                attention_mask: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False, return_attn: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab]。

        cache           一个 KVCache：前面各位置的 K/V 从里面读，这次调用算出的 K/V 接着写进去
        attention_mask  [B, T]，1 = 真实 token，0 = padding（长短不一的提示词放进同一批，padding 补在
                        左边或右边都行）：注意力永远不看 padding，每个真实 token 都拿到它真正的位置
                        编号（在自己那一行里从 0, 1, 2, ... 数起）。
                        这时整批会被*打包*：embedding、各个投影和 MLP 只在 N 个真实 token 上算
                        （[N, 576]，而不是 [B, T, 576]）；只有注意力这一步用补齐后的 [B, T] 布局。
                        所以服务引擎的一步里，一条 40 个 token 的 prefill 加上 7 条各 1 个 token 的
                        decode，矩阵乘法只算 47 个 token，而不是 8 x 40 个（第 6 课）。输出里 padding
                        位置全是零（用 last_only 时，一个真实 token 都没有的行也是全零）。
        last_only       只要每一行最后一个真实 token 的 logits：[B, vocab]（采样下一个 token 只需要它；
                        LM head 是 576 x 49152 的大矩阵，这样每行只在一个位置上算它）
        return_hidden   返回最终的隐藏状态（最后一个 RMSNorm 之后），不返回 logits；
                        ``model.lm_head(h).float()`` 可以把其中任意位置变成 logits
        return_attn     同时返回每一层的注意力权重 [B, heads, T, S]
        """
        B, T = input_ids.shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None                   # 没有 padding：走简单路径，结果一样而且更快
        span = self._span(B, T, cache, attention_mask)
        if span.real is not None:                   # 打包：只有真实 token 参与矩阵乘法
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
        h = unpack(h, span.real)                    # 打包过的：放回 [B, T, 576]，padding 处为零
        if last_only:
            h = h[torch.arange(B, device=h.device), self._last_real(B, T, attention_mask, h.device)]  # [B, 576]
        out = h if return_hidden else self.lm_head(h).float()                         # [B, (T,) 49152]
        return (out, attns) if return_attn else out

    @staticmethod
    def _last_real(B: int, T: int, mask: torch.Tensor | None, device) -> torch.Tensor:
        """每一行最后一个真实 token 的下标（这一行右边没有 padding 时就是 T - 1）。"""
        if mask is None:
            return torch.full((B,), T - 1, dtype=torch.long, device=device)
        return (T - 1 - mask.to(device).bool().flip(1).long().argmax(1))

    def _span(self, B: int, T: int, cache: KVCache | None, mask: torch.Tensor | None) -> Span:
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if mask is None and (cache is None or not cache.ragged):   # 简单、也最常见的情况
            start = cache.length if cache is not None else 0
            if start + T > limit:
                raise ValueError(f"sequence too long: {start + T} positions (limit {limit})")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            return Span(cos, sin, self._cis(cos, sin), start + T, start=start)
        dev = self.device
        m = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool()
        rank = (m.long().cumsum(1) - 1).clamp(min=0)              # 真实 token 依次编号 0, 1, 2, ...
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
        mask4 = ((key_col <= cols[:, :, None]) & key_ok[:, None, :])              # 既符合因果顺序，又是真实 token
        mask4 |= key_col == cols[:, :, None]       # padding 的 query 至少能看见自己（整行全遮住的话 softmax 会算出 NaN）
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        return Span(cos, sin, self._cis(cos, sin), S,
                    cols=cols if cache is not None else None, mask=mask4[:, None],
                    real=m if mask is not None else None)

    def _cis(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """每次调用算一次、所有层共用的复数旋转表（只有相邻两维配对的布局能这样算）。"""
        if not (getattr(self, "rope_complex", False) and self.config.rope_pairs):
            return None
        return torch.complex(cos, sin)

    @staticmethod
    def _advance(cache: KVCache, T: int, mask: torch.Tensor | None) -> None:
        """一次调用之后：已用列数加 T（末尾的 padding 不算），位置编号只按真实 token 往后数。"""
        if not cache.ragged:
            cache.length += T
            return
        if mask is None:
            cache.lengths += T
            cache.pos += T
        else:
            m = mask.to(cache.lengths.device).bool()
            used = torch.where(m.any(1), T - m.flip(1).long().argmax(1), 0)     # 算到最后一个真实 token 为止
            cache.lengths += used
            cache.pos += m.sum(1)
        cache.length = int(cache.lengths.max())
