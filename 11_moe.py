"""第 11 课：混合专家（MoE）——手写路由器，和稠密模型在自己的 CPU 上并排训练

你将学到：
  1. MoE 层：路由器（线性层 → softmax → top-k）给每个 token 选 k 个专家，把 token 分发给 E 个专家 MLP，
     再按权重合并（按专家分组 + index_add，没有逐 token 的 Python 循环）；可选共享专家（DeepSeekMoE）
     和容量上限（超出容量的 token 被丢弃、计数，只走残差）；
  2. 让专家都忙起来：Switch Transformer 的负载均衡损失 E·Σfᵢ·Pᵢ；DeepSeek-V3 的无辅助损失偏置法
     （每个专家一个偏置，只影响"选谁"、不影响"权重"，每步按负载微调）；两样都不用时的路由坍缩；
  3. 实验：同样的训练时间、同样的步数，比较稠密模型（第 04 课 speedrun）、激活参数相同的 MoE
     （8 个窄专家选 2 个）、总参数相同的稠密模型：验证 loss、总参数 / 激活参数、token/s、内存；
  4. 看进去：每层专家负载随训练的变化（热力图）、每个专家处理哪类字符（元音、大写、标点、空格……）；
     用训练好的 MoE 写一段文字；
  5. 从玩具到真模型：按公开配置算 Mixtral-8x7B、DeepSeek-V2/V3、Qwen-MoE 的总参数 / 激活参数。

模型就是第 04 课的 GPT（common/tiny_gpt.py，speedrun 配方），只把每个块的 MLP 换成 MoE 层。
数据：和第 04 课相同（莎士比亚全集，字符级，最后 10% 作验证集）。
用时：默认约 12 分钟（同样时间：3 个模型各训练 2 分钟；同样步数：5 个模型各 200 步）；--quick 约半分钟。

常用命令：
  python 11_moe.py --quick                          # 快速体验
  python 11_moe.py                                  # 完整实验
  python 11_moe.py --minutes 3 --steps 400          # 更长的训练
  python 11_moe.py --experts 16 --top-k 2 --shared-experts 1 --capacity-factor 1.25
"""
from __future__ import annotations

import math
import os
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import add_knob, course_parser, non_negative_float, positive_float, positive_int, setup_run
from common.display import pad, table
from common.errors import require, run_cli
from common.moe import (CHAR_CLASSES, char_class_matrix, model_table, plot_curves, plot_loads,
                        plot_specialization, profile_forward, published_table, timed)
from common.outputs import save_results
from common.tiny_gpt import MLP, GPT, build_optimizer, generate, get_batch, lr_factor
from common.training import count_params, prepare_data

NAME = "11_moe"
# 骨架 = 第 04 课 --preset speedrun：4 层、4 头、128 维、上下文 128、batch 16、RMSNorm、RoPE、QK-norm、ReLU²、
# 输出层共享、Muon（块里的矩阵）+ AdamW（其余），warmup 50 步后余弦退火到 0.1 倍
BACKBONE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, norm="rms", pos="rope", qk_norm=True,
                mlp="relu2", tie=True)
TRAIN = dict(batch_size=16, lr=3e-3, muon_lr=0.02, optimizer="muon", weight_decay=0.1, beta2=0.99, grad_clip=1.0,
             warmup_iters=50, min_lr_ratio=0.1)
# 变体：名字 → (说明, MLP 的种类, 均衡方法)。"moe" 用 DeepSeek-V3 的偏置法，是本课的主角
VARIANTS = {"dense": ("稠密（第 04 课 speedrun）", "dense", None),
            "moe": ("MoE，激活参数相同（偏置均衡）", "moe", "bias"),
            "dense_big": ("稠密，总参数与 MoE 相同", "dense_big", None),
            "moe_aux": ("MoE，负载均衡损失", "moe", "aux"),
            "moe_none": ("MoE，不做均衡", "moe", "none")}


# ---------------------------------------------------------------------------
# 1. MoE 层：路由 → 分发 → 专家计算 → 合并
#    形状记号：N = B·T 个 token，C = n_embd，E = 专家数，k = 每个 token 选几个专家
# ---------------------------------------------------------------------------
class MoE(nn.Module):
    """把一个 MLP 换成 E 个更窄的专家 MLP + 一个路由器（+ 可选的共享专家）。x: [B, T, C] → [B, T, C]。"""

    def __init__(self, n_embd: int, n_experts: int, top_k: int, hidden: int, shared: int = 0,
                 balance: str = "bias", capacity_factor: float = 0.0):
        super().__init__()
        self.E, self.k, self.balance, self.capacity_factor = n_experts, top_k, balance, capacity_factor
        self.router = nn.Linear(n_embd, n_experts, bias=False)          # 每个专家一个打分方向
        self.experts = nn.ModuleList([MLP(n_embd, kind="relu2", hidden=hidden) for _ in range(n_experts)])
        self.shared = MLP(n_embd, kind="relu2", hidden=shared * hidden) if shared else None  # 每个 token 都用
        self.register_buffer("bias", torch.zeros(n_experts))            # DeepSeek-V3：只用来"选"，不参与加权
        self.aux_loss, self.stats = torch.zeros(()), {}

    def route(self, x):                                      # x: [N, C]
        """softmax 得到每个专家的概率；加上偏置后取 top-k 选专家；权重用不加偏置的概率（k>1 时归一化）。"""
        probs = F.softmax(self.router(x).float(), dim=-1)    # [N, E] 每行和为 1
        _, idx = torch.topk(probs + self.bias, self.k, dim=-1)  # [N, k] 选中的专家编号
        w = probs.gather(1, idx)                             # [N, k] 合并时的权重（与偏置无关）
        return probs, idx, (w / w.sum(-1, keepdim=True) if self.k > 1 else w)

    def capacity(self, n_assign: int) -> int:
        """每个专家最多接多少个 token：容量因子 × 平均负载；0 = 不设上限。"""
        return math.ceil(self.capacity_factor * n_assign / self.E) if self.capacity_factor > 0 else n_assign

    def dispatch(self, x, idx, w):
        """把 N·k 个 (token, 专家) 对按专家排好队，每个专家一次矩阵乘法算完自己那一段，再 index_add 加回去。"""
        N, k = idx.shape
        with timed("moe.dispatch"):
            e = idx.T.reshape(-1)                                # [kN] 先排所有 token 的第 1 选择，再第 2 选择……
            t = torch.arange(N, device=x.device).repeat(k)       # [kN] 每一对属于哪个 token
            order = torch.argsort(e, stable=True)                # [kN] 按专家分组（组内保持先来后到）
            counts = torch.bincount(e, minlength=self.E)         # [E] 每个专家被选中几次（路由的决定）
            pos = torch.arange(k * N, device=x.device) - (counts.cumsum(0) - counts)[e[order]]  # 在本专家队伍里的位置
            keep = order[pos < self.capacity(k * N)]             # 超出容量的 (token, 专家) 对被丢弃
            kept = torch.bincount(e[keep], minlength=self.E)     # [E] 真正算了几个
            xs = x[t[keep]]                                      # [kept, C] gather：按专家排好的 token
        with timed("moe.experts"):
            ys = torch.cat([f(chunk) for f, chunk in zip(self.experts, xs.split(kept.tolist()))])  # 每个专家一段
        with timed("moe.combine"):
            out = torch.zeros_like(x).index_add_(0, t[keep], ys * w.T.reshape(-1)[keep, None].to(ys.dtype))
        return out, counts, k * N - len(keep)

    def forward(self, x):                                    # x: [B, T, C]
        B, T, C = x.shape
        flat = x.reshape(-1, C)                              # [N, C]
        with timed("moe.router"):
            probs, idx, w = self.route(flat)
        out, counts, dropped = self.dispatch(flat, idx, w)   # 被丢弃的 token 这里输出 0：块里只剩残差 x
        if self.shared is not None:
            out = out + self.shared(flat)
        f = counts.float() / counts.sum()                    # fᵢ：分到专家 i 的比例（计数，不可导）
        self.aux_loss = balancing_loss(f, probs.mean(0))     # Pᵢ：专家 i 的平均路由概率（可导）
        self.stats = dict(counts=counts.detach(), dropped=int(dropped), top1=idx[:, 0].detach())
        return out.view(B, T, C)


def balancing_loss(f, P) -> torch.Tensor:
    """Switch Transformer：E·Σ fᵢ·Pᵢ。完全均匀时 fᵢ = Pᵢ = 1/E，值为 1；路由越集中越大（全压在一个专家上 = E）。
    梯度只经过 Pᵢ：负载高的专家 fᵢ 大，降低它的概率最能减小损失。"""
    return len(f) * (f * P).sum()


@torch.no_grad()
def update_bias(moe: MoE, gamma: float) -> None:
    """DeepSeek-V3 的无辅助损失均衡：负载高于平均的专家偏置减 γ，低于平均的加 γ。不碰任何权重和梯度。"""
    load = moe.stats["counts"].float()
    moe.bias += gamma * torch.sign(load.mean() - load)


def moe_layers(model) -> list[MoE]:
    return [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]


# ---------------------------------------------------------------------------
# 2. 三种模型：在第 04 课的 GPT 上换掉 MLP
# ---------------------------------------------------------------------------
def build_model(kind: str, balance, vocab: int, a) -> GPT:
    """dense：原样（隐藏层 4C）；moe：E 个隐藏层 4C·k/E 的专家（每个 token 激活的参数与 dense 相同）；
    dense_big：一个隐藏层 E·4C·k/E 的 MLP（总参数与 moe 相同，全部激活）。"""
    torch.manual_seed(a.seed)
    model = GPT(vocab_size=vocab, **BACKBONE)
    C = BACKBONE["n_embd"]
    hidden = 4 * C // a.top_k                                # 每个专家的宽度：k 个专家合起来 = 4C
    for block in model.blocks:
        if kind == "moe":
            block.mlp = MoE(C, a.experts, a.top_k, hidden, a.shared_experts, balance, a.capacity_factor)
        elif kind == "dense_big":
            block.mlp = MLP(C, kind="relu2", hidden=hidden * (a.experts + a.shared_experts))
        block.mlp.apply(GPT._init_weights)                   # 和 GPT 一样的初始化；残差出口 proj 更小
        for name, p in block.mlp.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * BACKBONE["n_layer"]))
    return model


def count_active(model) -> int:
    """每个 token 真正参与计算的参数：总参数减去每层没被选中的 E−k 个专家。"""
    idle = sum((m.E - m.k) * count_params(m.experts[0]) for m in moe_layers(model))
    return count_params(model) - idle


# ---------------------------------------------------------------------------
# 3. 训练：和第 04 课同样的一步（前向 → 反向 → 裁剪 → Muon/AdamW 更新）；MoE 多一件事：
#    aux = 把 α·Σ(每层的均衡损失) 加进 loss；bias = 更新之后按这一步的负载调偏置
# ---------------------------------------------------------------------------
def train_step(model, opt, x, y, balance, a) -> float:
    _, loss = model(x, y)                                    # 交叉熵（下一个字符预测）
    total = loss + a.aux_weight * sum(m.aux_loss for m in moe_layers(model)) if balance == "aux" else loss
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if balance == "bias":
        for m in moe_layers(model):
            update_bias(m, a.bias_rate)
    return loss.item()


@torch.no_grad()
def val_loss(model, data, offsets) -> float:
    """固定的一组验证窗口上的平均 loss（所有变体用同一组，才能比较）。"""
    model.eval()
    losses = [model(*get_batch(data["val"], o, BACKBONE["block_size"]))[1].item() for o in offsets]
    model.train()
    return sum(losses) / len(losses)


def train_variant(name: str, data, a, *, seconds: float | None = None, steps: int | None = None):
    """训练一个变体，直到用完时间（seconds）或步数（steps）；学习率按进度 warmup + 余弦（第 04 课的 lr_factor）。
    中途评估 4 次（不计入训练时间）。返回 (结果, 模型)。"""
    _, kind, balance = VARIANTS[name]
    model, hp = build_model(kind, balance, data["tok"].vocab_size, a), SimpleNamespace(**TRAIN)
    opt, gen = build_optimizer(model, hp), torch.Generator().manual_seed(a.seed)
    n_windows = len(data["train"]) - BACKBONE["block_size"] - 1
    loads, curve, it, elapsed = [], [], 0, 0.0
    while True:
        progress = it / steps if steps else elapsed / seconds
        if progress >= len(curve) / 4:                       # 进度 0、¼、½、¾、1 各评估一次
            curve.append(dict(step=it, seconds=round(elapsed, 2), val=val_loss(model, data, a.val_offsets)))
        if progress >= 1:
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(it, progress, hp)
        x, y = get_batch(data["train"], torch.randint(n_windows, (hp.batch_size,), generator=gen), BACKBONE["block_size"])
        train_step(model, opt, x, y, balance, a)
        elapsed += time.perf_counter() - t0
        if moe_layers(model):
            loads.append(torch.stack([m.stats["counts"] for m in moe_layers(model)]))  # [L, E]
        it += 1
    tokens = it * hp.batch_size * BACKBONE["block_size"]
    res = dict(label=VARIANTS[name][0], steps=it, tokens_seen=tokens, train_s=round(elapsed, 1),
               tokens_per_s=round(tokens / max(elapsed, 1e-9)), val_loss=curve[-1]["val"], curve=curve,
               params_total=count_params(model), params_active=count_active(model),
               memory_mb=round(memory_bytes(model, opt) / 2**20, 2))
    if loads:
        res["load"] = load_stats(torch.stack(loads).float())
    return res, model


def memory_bytes(model, opt) -> int:
    """训练时必须常驻内存的：全部权重（不管这一步选没选中）+ 优化器状态（动量等）。"""
    def walk(o):
        if torch.is_tensor(o):
            return o.numel() * o.element_size()
        return sum(walk(v) for v in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else []))
    return sum(p.numel() * p.element_size() for p in model.parameters()) + walk(opt.state_dict())


def load_stats(loads) -> dict:
    """loads: [步数, L, E] 每步每层每个专家分到的 token 数。负载比 = 实际份额 / 均匀份额（1 = 完全均匀）。"""
    S, L, E = loads.shape
    share = loads / loads.sum(-1, keepdim=True)              # [S, L, E]
    tail = share[-max(1, S // 10):].mean(0) * E              # [L, E] 最后 10% 的步里的平均负载比
    bins = torch.stack([c.mean(0) for c in share.chunk(min(S, 40))])  # [≤40, L, E] 画热力图用
    return dict(final_ratio=tail.tolist(), max_ratio=tail.max().item(), min_ratio=tail.min().item(),
                history=bins.permute(1, 2, 0).tolist())     # [L, E, 时间段]


def equal_time(data, a):
    print(f"\n=== 实验一：同样的训练时间（每个模型 {a.minutes:g} 分钟，评估不计时）===")
    out = {n: train_variant(n, data, a, seconds=a.minutes * 60) for n in ("dense", "moe", "dense_big")}
    print_results({n: r for n, (r, _) in out.items()})
    return out


def equal_steps(data, a):
    print(f"\n=== 实验二：同样的步数（每个模型 {a.steps} 步），以及三种均衡方法 ===")
    out = {n: train_variant(n, data, a, steps=a.steps) for n in VARIANTS}
    print_results({n: r for n, (r, _) in out.items()})
    return out


def print_results(res: dict) -> None:
    rows = [["变体", "总参数", "激活参数", "步数", "token 数", "token/s", "内存 MB", "验证 loss", "最忙/最闲专家"]]
    for n, r in res.items():
        lr = f"{r['load']['max_ratio']:.2f}× / {r['load']['min_ratio']:.2f}×" if "load" in r else "-"
        rows.append([r["label"], f"{r['params_total']:,}", f"{r['params_active']:,}", r["steps"], f"{r['tokens_seen']:,}",
                     f"{r['tokens_per_s']:,}", r["memory_mb"], f"{r['val_loss']:.3f}", lr])
    print(table(rows))


# ---------------------------------------------------------------------------
# 4. 看进去：每个专家处理哪类字符；容量上限丢掉多少 token；时间花在哪里；写一段文字
# ---------------------------------------------------------------------------
@torch.no_grad()
def specialization(model, data, a) -> list:
    """验证集上每层每个 token 的第 1 选择专家，按它读到的字符分类统计：[层][类别][专家] 的比例。"""
    model.eval()
    chars, top1 = [], [[] for _ in moe_layers(model)]
    for o in a.val_offsets:
        x, _ = get_batch(data["val"], o, BACKBONE["block_size"])
        model(x)
        chars += data["tok"].decode(x.reshape(-1).tolist())
        for l, m in enumerate(moe_layers(model)):
            top1[l].append(m.stats["top1"])
    model.train()
    mats = [char_class_matrix(chars, torch.cat(t), moe_layers(model)[0].E) for t in top1]
    print("\n每类字符最常去的专家（第 1 层 / 最后一层；括号里是占这类字符的比例）：")
    for c, name in enumerate(CHAR_CLASSES):
        first, last = mats[0][c], mats[-1][c]
        if not any(first):
            continue                                         # 验证窗口里没有这类字符
        print(f"  {pad(name, 6)} 第1层 → 专家 {max(range(len(first)), key=first.__getitem__)}（{max(first):.0%}）"
              f"   最后一层 → 专家 {max(range(len(last)), key=last.__getitem__)}（{max(last):.0%}）")
    return mats


@torch.no_grad()
def capacity_demo(model, data, a) -> dict:
    """训练时不设容量上限；这里给训练好的 MoE 加上容量因子 1.0 / 1.25 看丢掉多少 token、loss 变多少。"""
    out = {}
    for cf in (0.0, 1.0, 1.25):
        for m in moe_layers(model):
            m.capacity_factor = cf
        loss = val_loss(model, data, a.val_offsets[:4])
        dropped = sum(m.stats["dropped"] for m in moe_layers(model))
        total = sum(m.k * len(m.stats["top1"]) for m in moe_layers(model))
        out[str(cf)] = dict(val=loss, dropped_frac=dropped / total)
        print(f"  容量因子 {cf:g}{'（不限）' if cf == 0 else ''}：丢弃 {dropped / total:.1%} 的 (token, 专家) 对，"
              f"验证 loss {loss:.3f}")
    for m in moe_layers(model):
        m.capacity_factor = a.capacity_factor
    return out


def where_time_goes(dense, moe, data) -> dict:
    """一次前向里各部分的毫秒数（MoE 里用 timed(...) 标出的几段；CPU 上每个运算返回时已经算完）。"""
    x, _ = get_batch(data["val"], torch.arange(TRAIN["batch_size"]) * 1000, BACKBONE["block_size"])
    prof = {"dense": profile_forward(dense, x), "moe": profile_forward(moe, x)}
    p = prof["moe"]
    print(f"\n一次前向（batch {TRAIN['batch_size']}×{BACKBONE['block_size']}）：稠密 {prof['dense']['forward']:.1f} ms，"
          f"MoE {p['forward']:.1f} ms：路由 {p['moe.router']:.1f}、分发（排序、gather）{p['moe.dispatch']:.1f}、"
          f"专家计算 {p['moe.experts']:.1f}、合并 {p['moe.combine']:.1f} ms，其余（注意力、嵌入、输出层）"
          f"{p['forward'] - sum(p[k] for k in ('moe.router', 'moe.dispatch', 'moe.experts', 'moe.combine')):.1f} ms")
    return prof


def real_models(res: dict) -> list:
    """第 5 部分：按公开配置算出的真模型（common/moe.py），和本课的模型放在一张表里。"""
    rows = published_table() + [model_table(res)]
    print("\n=== 真实的 MoE 模型（按公开的 config.json 计算；括号里是论文/模型卡写的）===")
    print(table([["模型", "总参数", "激活参数", "激活比例", "路由专家", "共享专家", "top-k"]] +
                [[r["name"], r["total"], r["active"], f"{r['active_frac']:.1%}", r["experts"], r["shared"], r["top_k"]]
                 for r in rows]))
    return rows


# ---------------------------------------------------------------------------
# 5. 命令行参数与主流程
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    p = course_parser(NAME, __doc__, groups=("device",))
    g = p.add_argument_group("MoE")
    add_knob(g, "--experts", type=positive_int, default=8, help="每层的路由专家数 E")
    add_knob(g, "--top-k", type=positive_int, default=2, help="每个 token 选几个专家 k（每个专家宽 4C/k）")
    add_knob(g, "--shared-experts", type=int, choices=[0, 1, 2], default=0, help="共享专家个数（DeepSeekMoE），0 = 不用")
    add_knob(g, "--capacity-factor", type=non_negative_float, default=0.0, help="训练时的容量因子，0 = 不限")
    add_knob(g, "--aux-weight", type=positive_float, default=0.01, help="负载均衡损失的系数 α（moe_aux）")
    add_knob(g, "--bias-rate", type=positive_float, default=0.01, help="偏置法每步的调整量 γ（moe）")
    t = p.add_argument_group("实验")
    add_knob(t, "--minutes", type=positive_float, default=2.0, quick=0.03, help="实验一：每个模型训练几分钟")
    add_knob(t, "--steps", type=positive_int, default=200, quick=6, help="实验二：每个模型训练几步")
    add_knob(t, "--eval-batches", type=positive_int, default=20, quick=2, help="验证用几个固定的 batch")
    add_knob(t, "--sample-chars", type=positive_int, default=300, quick=100, help="最后让训练好的 MoE 写多少个字符")
    a = p.parse_args(argv)
    if a.top_k > a.experts:
        p.error(f"--top-k ({a.top_k}) 不能大于 --experts ({a.experts})")
    if (4 * BACKBONE["n_embd"]) % a.top_k:
        p.error(f"--top-k 必须整除 {4 * BACKBONE['n_embd']}（每个专家宽 4C/k）")
    return a


def main(argv=None):
    a = parse_args(argv)
    setup_run(a)
    torch.set_flush_denormal(True)
    t_start, load_avg = time.time(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    a.data, a.tokenizer, a.block_size = None, "char", BACKBONE["block_size"]   # 第 04 课的数据与划分
    data = prepare_data(a, None, True)
    eg = torch.Generator().manual_seed(999)
    a.val_offsets = [torch.randint(len(data["val"]) - a.block_size - 1, (TRAIN["batch_size"],), generator=eg)
                     for _ in range(a.eval_batches)]
    check_dispatch(a)                                        # 自检：分发/合并 == 逐 token 的循环
    by_time, by_steps = equal_time(data, a), equal_steps(data, a)
    moe = by_time["moe"][1]
    print("\n=== 看进去 ===")
    mats = specialization(moe, data, a)
    cap = capacity_demo(moe, data, a)
    prof = where_time_goes(by_time["dense"][1], moe, data)
    ids = generate(moe, data["val"][:1][None], a.sample_chars, 0.8, 0, 0.95, torch.Generator().manual_seed(a.seed))
    sample = data["tok"].decode(ids[0].tolist())
    print(f"\nMoE 写的一段文字：\n{sample}")
    res = {"equal_time": {n: r for n, (r, _) in by_time.items()}, "equal_steps": {n: r for n, (r, _) in by_steps.items()}}
    rows = real_models(dict(res["equal_time"]["moe"], experts=a.experts, top_k=a.top_k, shared=a.shared_experts))
    pngs = [plot_curves(res, a.out_dir / "moe_curves.png"),
            plot_loads({n: res["equal_steps"][n] for n in ("moe_none", "moe_aux", "moe")}, a.out_dir / "moe_load.png"),
            plot_specialization(mats, a.out_dir / "moe_experts.png")]
    path = save_results(a.out_dir, dict(**res, specialization=dict(classes=CHAR_CLASSES, per_layer=mats),
                                        capacity=cap, profile_ms=prof, real_models=rows, sample=sample,
                                        loadavg_start=load_avg, seconds_total=round(time.time() - t_start, 1)),
                        run_args={k: v for k, v in vars(a).items() if k != "val_offsets"}, files=pngs,
                        may_write=["moe_curves.png", "moe_load.png", "moe_experts.png"])
    print(f"\n图：{', '.join(str(p) for p in pngs)}\n结果：{path}（共 {time.time() - t_start:.0f} 秒）")


def check_dispatch(a) -> None:
    """自检：向量化的分发/合并与"每个 token 自己去找它的 k 个专家"的朴素循环结果相同。"""
    torch.manual_seed(a.seed)
    m = MoE(16, a.experts, a.top_k, 8, a.shared_experts, "bias", 0.0)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fast = m(x).reshape(-1, 16)
        _, idx, w = m.route(x.reshape(-1, 16))
        slow = torch.stack([sum(w[n, j] * m.experts[int(idx[n, j])](x.reshape(-1, 16)[n]) for j in range(m.k))
                            + (m.shared(x.reshape(-1, 16)[n]) if m.shared is not None else 0) for n in range(10)])
    require(torch.allclose(fast, slow, atol=1e-5), f"MoE 的分发/合并与逐 token 循环不一致（最大差 {(fast - slow).abs().max():.2e}）")
    print("自检通过：MoE 的分发/合并 == 逐 token 循环（10 个 token）")


if __name__ == "__main__":
    run_cli(main)
