"""第 04 课的 GPT（第 11 课也用它）：模型、生成、优化器（AdamW / Muon）与学习率。

从第 04 课移到这里，是为了让第 11 课（混合专家 MoE）在同一个模型上把 MLP 换成 MoE 层，而不复制一份代码
（课程脚本之间不互相 import）。按顺序读：
  get_batch → CausalSelfAttention → MLP → Block → GPT → RMSNorm / RoPE（第 5 步的零件）→ generate
  → build_optimizer / newton_schulz / Muon → lr_factor。
形状记号：B = batch，T = 序列长度，C = n_embd，H = 头数，D = C/H（每头维度），V = 词表大小。
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.sampling import sample_next_token
from common.training import Optimizers


# ---------------------------------------------------------------------------
# 数据：一次张量索引取出整批窗口
# ---------------------------------------------------------------------------
def get_batch(data: torch.Tensor, offsets: torch.Tensor, block_size: int):
    """一次张量索引取出整批数据（没有 Python 循环）。offsets: [B]。"""
    idx = offsets[:, None] + torch.arange(block_size + 1)    # [B, T+1]
    chunk = data[idx]                                        # [B, T+1]
    return chunk[:, :-1], chunk[:, 1:]                       # x: [B, T]，y: [B, T]（y 是 x 右移一位）


# ---------------------------------------------------------------------------
# 模型：多头注意力（融合版）→ MLP → Transformer 块 → GPT（第 04 课第 2 节讲手写的单头 / 多头版本）
# ---------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """和 MultiHeadAttention 数学上完全相同，但把 H 个头的 q/k/v 合成一次矩阵乘法，
    再调用 PyTorch 融合好的 F.scaled_dot_product_attention（快得多、省内存）。
    rope / qk_norm 是第 5 步（现代配方）的两处改动，默认关闭 = GPT-2。"""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, rope: bool = False, qk_norm: bool = False):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head, self.rope, self.dropout = n_head, rope, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.q_norm = RMSNorm(n_embd // n_head) if qk_norm else None
        self.k_norm = RMSNorm(n_embd // n_head) if qk_norm else None
        self.use_sdpa = True  # 设为 False 走手写公式（测试里用来对照）

    def forward(self, x):                                    # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                # 3 × [B, T, C]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, D]
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, D]
        if self.q_norm is not None:                          # 第 5 步 QK-norm：q、k 每个头先归一化，打分不会失控
            q, k = self.q_norm(q), self.k_norm(k)            # [B, H, T, D]
        if self.rope:                                        # 第 5 步 RoPE：按位置旋转 q、k（取代位置嵌入 wpe）
            cos, sin = rope_tables(T, C // self.n_head, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, T, D]
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, D]
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))        # [B, H, T, T]
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)  # [B, H, T, T]
            att = F.dropout(att, self.dropout, self.training)
            y = att @ v                                                   # [B, H, T, D]
        y = y.transpose(1, 2).contiguous().view(B, T, C)     # [B, T, C] 把各头拼回来
        return F.dropout(self.proj(y), self.dropout, self.training)  # [B, T, C]


class MLP(nn.Module):
    """C → 4C → C。kind：gelu（GPT-2）；第 5 步可换成 relu2 = ReLU(x)²，或 swiglu = silu(a)·b（LLaMA，
    多一个矩阵，所以隐藏层取 8C/3 让参数量不变）。"""

    def __init__(self, n_embd: int, dropout: float = 0.0, kind: str = "gelu", hidden: int | None = None):
        super().__init__()
        if hidden is None:                                   # 不指定就用标准宽度（第 11 课的专家用更窄的 hidden）
            hidden = 4 * n_embd if kind != "swiglu" else 2 * 8 * ((8 * n_embd // 3 + 7) // 8)  # swiglu：2 × 8C/3
        self.fc = nn.Linear(n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden if kind != "swiglu" else hidden // 2, n_embd, bias=False)
        self.kind, self.dropout = kind, dropout

    def forward(self, x):                                    # x: [B, T, C]
        h = self.fc(x)                                       # [B, T, 4C]（swiglu：2 × 8C/3）先升维再非线性
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:                                                # swiglu：一半当"门"，一半当"值"
            gate, value = h.chunk(2, dim=-1)                 # 2 × [B, T, 8C/3]
            h = F.silu(gate) * value                         # [B, T, 8C/3]
        return F.dropout(self.proj(h), self.dropout, self.training)  # [B, T, C]


class Block(nn.Module):
    """第 3 步：Transformer 块 = 先归一化再注意力/MLP（Pre-LN），结果加回输入（残差）。"""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, norm: str = "layer", rope: bool = False,
                 qk_norm: bool = False, mlp: str = "gelu"):
        super().__init__()
        self.ln1 = make_norm(norm, n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, rope, qk_norm)
        self.ln2 = make_norm(norm, n_embd)
        self.mlp = MLP(n_embd, dropout, mlp)

    def forward(self, x):                                    # x: [B, T, C]
        x = x + self.attn(self.ln1(x))                       # [B, T, C] 各位置之间交流信息
        x = x + self.mlp(self.ln2(x))                        # [B, T, C] 每个位置各自"思考"
        return x


class GPT(nn.Module):
    """第 4 步：token 嵌入 + 位置嵌入 → N 个块 → 归一化 → 输出层（默认与 token 嵌入共享权重）。
    第 5 步的开关：norm="rms"、pos="rope"（不再有 wpe）、qk_norm、mlp="relu2"/"swiglu"、tie=False。"""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0, norm: str = "layer", pos: str = "learned", qk_norm: bool = False,
                 mlp: str = "gelu", tie: bool = True):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, dropout=dropout, norm=norm, pos=pos, qk_norm=qk_norm, mlp=mlp, tie=tie)
        self.block_size, self.dropout = block_size, dropout
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd) if pos == "learned" else None
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout, norm, pos == "rope", qk_norm, mlp)
                                     for _ in range(n_layer)])
        self.ln_f = make_norm(norm, n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight           # 权重共享（GPT-2 的做法）
        self.apply(self._init_weights)
        for name, p in self.named_parameters():              # 残差支路的输出层初始化得更小（GPT-2）
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):                   # idx: [B, T] 整数 token id
        B, T = idx.shape
        x = self.wte(idx)                                    # [B, T, C]
        if self.wpe is not None:                             # 学到的位置嵌入（用 RoPE 时位置信息在注意力里）
            x = x + self.wpe(torch.arange(T, device=idx.device))  # [B, T, C] + [T, C]（广播）
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)                                     # [B, T, C]
        x = self.ln_f(x)                                     # [B, T, C]
        logits = self.lm_head(x)                             # [B, T, V] 每个位置对下一个 token 的打分
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))  # 标量：平均 -log p(正确的下一个)
        return logits, loss


# ---------------------------------------------------------------------------
# 第 5 步的零件：RMSNorm 与旋转位置编码 RoPE（LLaMA、今天的大多数模型都用它们）
# ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """只除以均方根再缩放：x / sqrt(mean(x²) + eps) · w。比 LayerNorm 少了"减均值"，也没有偏置。"""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):                                    # x: [..., dim]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, bias=False) if kind == "layer" else RMSNorm(dim)


def rope_tables(T: int, D: int, device, base: float = 10000.0):
    """位置 t 的第 i 对维度旋转角度 t·θᵢ，θᵢ = base^(-2i/D)：低维转得快、高维转得慢。返回 cos、sin：[T, D/2]。"""
    theta = base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)  # [D/2]
    angle = torch.arange(T, device=device, dtype=torch.float32)[:, None] * theta[None, :]  # [T, D/2]
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):                                 # x: [B, H, T, D]
    """把 (x[i], x[i+D/2]) 看成平面上的一个点，转 t·θᵢ 角度。旋转不改长度；两个位置的 q·k 只取决于它们的距离。"""
    x1, x2 = x.chunk(2, dim=-1)                              # 2 × [B, H, T, D/2]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # [B, H, T, D]


# ---------------------------------------------------------------------------
# 生成：每次取最后一个位置的 logits，按 temperature / top-k / top-p 抽一个 token（第 01 课的同一个采样函数）
# ---------------------------------------------------------------------------
@torch.no_grad()
def generate(model: GPT, idx, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """idx: [1, T0] → [1, T0 + max_new_tokens]。"""
    model.eval()
    for _ in range(max_new_tokens):
        ctx = idx[:, -model.block_size:]                     # [1, ≤block] 只保留最近的上下文
        logits, _ = model(ctx)                               # [1, T, V]
        nxt = sample_next_token(logits[0, -1], temperature, top_k, top_p, generator)  # 温度 0 = 贪心
        idx = torch.cat([idx, torch.tensor([[nxt]], device=idx.device)], dim=1)  # [1, T+1]
    return idx


# ---------------------------------------------------------------------------
# 优化器与学习率
# ---------------------------------------------------------------------------
def build_optimizer(model: GPT, a):
    """AdamW：矩阵（2 维参数）做权重衰减，归一化层的 1 维参数不做。每组记下自己的基础学习率 base_lr。
    --optimizer muon：块里的矩阵交给 Muon，嵌入、输出层和归一化层仍用 AdamW（Muon 只对"矩阵乘法的权重"有意义）。"""
    params = dict(model.named_parameters())                  # 共享的权重只出现一次
    muon = [p for n, p in params.items()                     # 第 11 课 MoE 的路由器（router）很小，仍用 AdamW
            if a.optimizer == "muon" and n.startswith("blocks.") and p.dim() == 2 and ".router." not in n]
    decay = [p for p in params.values() if p.dim() >= 2 and all(p is not q for q in muon)]
    no_decay = [p for p in params.values() if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay, "base_lr": a.lr},
                               {"params": no_decay, "weight_decay": 0.0, "base_lr": a.lr}],
                              lr=a.lr, betas=(0.9, a.beta2))
    if not muon:
        return adamw
    return Optimizers(Muon([{"params": muon, "base_lr": a.muon_lr}], lr=a.muon_lr), adamw)


def newton_schulz(G, steps: int = 5, coeffs=(3.4445, -4.7750, 2.0315)):
    """把矩阵 G 的所有奇异值推向 1、方向不变：G = U·S·Vᵀ → 约等于 U·Vᵀ（G 的"正交部分"），不用算 SVD。
    每一轮 X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X 对每个奇异值 s 做 s ← a·s + b·s³ + c·s⁵；这组系数让小的 s 长得很快。"""
    X = G / (G.norm() + 1e-7)                                # 先缩放，保证所有奇异值 ≤ 1
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X                                   # 让 XXᵀ 是较小的那个方阵
    a, b, c = coeffs
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon = 带 Nesterov 动量的 SGD，但每步的更新先"正交化"：所有方向走一样远，
    不会被梯度里几个特别大的方向主导。只用于 2 维权重矩阵。"""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)     # 动量：梯度的滑动累加
                g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov：往前多看一步
                update = newton_schulz(g, group["ns_steps"]) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-group["lr"])


def lr_factor(it: int, progress: float, a) -> float:
    """线性 warmup，然后按训练进度（0→1）余弦衰减到 min_lr_ratio。返回基础学习率的倍数。"""
    warm = min(1.0, (it + 1) / max(1, a.warmup_iters))
    return warm * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
