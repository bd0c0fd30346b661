"""第 05 课：从零实现 LoRA，在 CPU 上微调一个真正的预训练模型（SmolLM2-135M-Instruct）

你将学到：
  1. LoRA 的原理：冻结原权重 W，只训练一个低秩增量 ΔW = (alpha/r)·B·A（A: r×in，B: out×r，B 初始化为 0）；
  2. 可训练参数有多少：每个被包装的线性层只多 r·(in+out) 个参数，整个模型不到 1%；
  3. 指令数据（LlamaFactory / Alpaca 的 instruction/input/output 格式）怎样变成训练样本：
     只在"答案"token 上算 loss（提示部分的标签设为 -100）；
  4. 在留出集上量化效果：训练前（零样本）和训练后的意图准确率、格式正确率；
  5. LoRA 与全参数微调对比：每步耗时、梯度 + 优化器状态占多少内存；
  6. 只保存适配器（几 MB），重新加载，合并进原权重（merged 与 unmerged 输出一致），再拆分恢复原权重。

任务："客服小助手"——把顾客留言分到 8 个意图之一，并按固定格式回答：
      intent: <意图> | order: <订单号或 none>。本地模型只懂英文，所以数据是英文的（data/lora/）。
用时（2 核 CPU）：--quick 约 1 分钟；默认约 10 分钟（训练时间由 --time-budget 控制）。

常用命令：
  python 05_lora.py --quick                         # 快速体验
  python 05_lora.py                                 # 完整一课：零样本 → LoRA 训练 → 评分 → 对比全参数微调 → 合并
  python 05_lora.py --rank 4 --targets q,v          # 换秩、换注入位置（练习）
  python 05_lora.py --targets q,k,v,o,gate,up,down  # 连 MLP 一起加 LoRA
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.device import get_device, setup_threads, synchronize  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.lora import (TARGETS, LoRALinear, inject_lora, load_adapter, lora_modules,  # noqa: E402
                         parse_targets, save_adapter)
from common.outputs import REPO_ROOT, output_dir, save_results  # noqa: E402

NAME = "05_lora"
DATA_DIR = REPO_ROOT / "data" / "lora"
ANSWER_RE = re.compile(r"^intent: ([a-z_]+) \| order: (\d+|none)$")   # 要求的精确格式
INTENT_RE = re.compile(r"intent\s*[:=]\s*([a-z_]+)", re.IGNORECASE)     # 宽松地找出意图


# ---------------------------------------------------------------------------
# 1. LoRA 层：y = W·x + (alpha/r)·B·A·dropout(x)，W 冻结，只训练 A、B
#    代码在 common/lora.py（第 08 课 DPO 也用它）：LoRALinear、inject_lora、merge/unmerge、保存/加载适配器。
#    读本课之前先读那个文件——它只有一百多行。
# ---------------------------------------------------------------------------
def param_report(model: nn.Module, targets: list[str]) -> dict:
    """按模块类型统计：被包装的层数、原参数量、LoRA 参数量（应等于 r·(in+out)·层数）。"""
    mods = lora_modules(model)
    per_type = {}
    for t in targets:
        ms = [m for n, m in mods.items() if n.endswith(TARGETS[t])]
        per_type[t] = {"layers": len(ms), "shape_out_in": list(ms[0].base.weight.shape),
                       "base_params": sum(m.base.weight.numel() for m in ms),
                       "lora_params": sum(m.A.numel() + m.B.numel() for m in ms),
                       "formula_r_in_plus_out": sum(m.rank * (m.base.in_features + m.base.out_features) for m in ms)}
    total = sum(p.numel() for p in model.parameters())          # parameters() 对共享的 embed/lm_head 只算一次
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"per_type": per_type, "trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total}


# ---------------------------------------------------------------------------
# 2. 数据：instruction/input/output → ChatML 提示 + 答案；标签里提示部分为 -100
# ---------------------------------------------------------------------------
def load_examples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"找不到数据文件 {path}；请检查 --data / --eval-data 的路径。")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} 不是合法的 UTF-8 JSON（{str(e)[:60]}）；格式应为 [{{\"instruction\", \"input\", \"output\"}}, ...]。")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
            and isinstance(r.get("input", ""), str) for r in rows):
        raise UserError(f"{path} 的格式不对：应为非空列表，每项含字符串字段 instruction、output（input 可选）。")
    return rows


def prompt_ids(tok, ex: dict) -> list[int]:
    """Alpaca/LlamaFactory 的拼法：instruction + 空行 + input 作为用户消息。不用默认的长 system 提示（省 token）。"""
    user = ex["instruction"] + ("\n\n" + ex["input"] if ex.get("input") else "")
    return tok.apply_chat_template([{"role": "user", "content": user}], default_system=False)


def encode_example(tok, ex: dict) -> tuple[list[int], list[int]]:
    """返回 (ids, labels)：labels 在提示位置是 -100（不算 loss），答案位置（含结尾的 <|im_end|>）是 token 本身。"""
    p = prompt_ids(tok, ex)
    a = tok.encode(ex["output"]) + [tok.im_end]
    return p + a, [-100] * len(p) + a


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """右侧补齐到同一长度。因果注意力下，末尾的补齐 token 影响不到前面的位置；它们的标签是 -100。"""
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    return ids, labels


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """下一个 token 的交叉熵，只在答案位置上平均。

    和 model(ids) 的结果相同，但词表投影（lm_head，576×49152）只在答案位置上算：
    提示占了约 85% 的位置，这一步省下约 1/5 的计算量（tests/ 里对照完整 logits 检查过）。
    """
    inp, tgt = ids[:, :-1], labels[:, 1:]                   # 位置 t 预测第 t+1 个 token
    h = model(inp, return_hidden=True)                      # 最后一层（RMSNorm 之后）的隐藏状态 [B, T, 576]
    keep = tgt != -100
    logits = model.lm_head(h[keep]).float()                 # [答案 token 数, vocab]
    return F.cross_entropy(logits, tgt[keep])


# ---------------------------------------------------------------------------
# 3. 评分：贪心生成答案，解析意图
# ---------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new: int, stop_ids: set[int], device) -> list[list[int]]:
    """批量贪心生成。Llama.forward 没有 padding mask，所以只把长度相同的提示放进同一批。

    解码一个 token 时主要花在读一遍全部权重上，批里多几条几乎不加时间；结果与逐条生成相同（测试对照 LocalModel.generate）。
    """
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for L, idx in groups.items():
        cache = model.new_cache(len(idx), L + max_new + 1)
        inp = torch.tensor([prompts[i] for i in idx], device=device)
        done = [False] * len(idx)
        for _ in range(max_new):
            nxt = model(inp, cache=cache)[:, -1].argmax(-1).tolist()
            for j, t in enumerate(nxt):
                if not done[j]:
                    if t in stop_ids:
                        done[j] = True
                    else:
                        out[idx[j]].append(t)
            if all(done):
                break
            inp = torch.tensor(nxt, device=device)[:, None]
    return out


def score(model, tok, examples: list[dict], max_new: int, device, label: str) -> dict:
    t0 = time.perf_counter()
    prompts = [prompt_ids(tok, ex) for ex in examples]
    gens = [tok.decode(g).strip() for g in greedy_generate(model, prompts, max_new, tok.eos_ids, device)]
    golds = [ex["output"].strip() for ex in examples]
    gold_intents = [m.group(1).lower() if (m := INTENT_RE.search(g)) else None for g in golds]
    pred_intents = [m.group(1).lower() if (m := INTENT_RE.search(g)) else None for g in gens]
    n = len(examples)
    res = {"n": n, "exact_match": sum(g == p for g, p in zip(golds, gens)) / n,
           "format_ok": sum(bool(ANSWER_RE.match(p)) for p in gens) / n,
           "intent_accuracy": (sum(g == p for g, p in zip(gold_intents, pred_intents)) / n
                               if all(gold_intents) else None),   # 只有金标准答案里都有 intent 时才算
           "seconds": time.perf_counter() - t0, "outputs": gens}
    acc = "—" if res["intent_accuracy"] is None else f"{res['intent_accuracy']:.1%}"
    print(f"  [{label}] 意图准确率 {acc}｜格式正确 {res['format_ok']:.1%}｜完全一致 {res['exact_match']:.1%}"
          f"（{n} 条留出样本，{res['seconds']:.0f} 秒）")
    return res


@torch.no_grad()
def heldout_loss(model, data: list, pad_id: int, device, bs: int = 8) -> float:
    """留出集上答案 token 的平均 loss（按 token 加权）。"""
    tot, n = 0.0, 0
    for i in range(0, len(data), bs):
        ids, labels = collate(data[i:i + bs], pad_id)
        k = int((labels[:, 1:] != -100).sum())
        tot += answer_loss(model, ids.to(device), labels.to(device)).item() * k
        n += k
    return tot / n


# ---------------------------------------------------------------------------
# 4. 训练循环（LoRA 和全参数微调共用）
# ---------------------------------------------------------------------------
def batches(data: list, bs: int, seed: int):
    """无限循环地按 epoch 打乱、切成 batch。同一个 seed 给出同样的顺序（全参数微调用同样的 batch 对比）。"""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=g).tolist()
        for i in range(0, len(order) - bs + 1, bs):
            yield [data[j] for j in order[i:i + bs]]


def train(model, params, data, a, device, steps: int, lr: float, budget_s: float | None, desc: str,
          on_interrupt=None) -> dict:
    from tqdm import tqdm
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = 0                                                  # 补齐用的 id 随便取：它的标签是 -100，不影响 loss
    losses, times, cpu_times = [], [], []
    warmup = max(1, min(10, steps // 10))
    it = batches(data, a.batch_size, a.seed)
    t_start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, ncols=90, file=sys.stdout)
    try:
        for step in bar:
            for g in opt.param_groups:                       # 线性 warmup，之后保持常数
                g["lr"] = lr * min(1.0, (step + 1) / warmup)
            ids, labels = collate(next(it), pad)
            t0, c0 = time.perf_counter(), time.process_time()   # 墙钟时间 + 本进程 CPU 时间（机器忙时后者更稳）
            loss = answer_loss(model, ids.to(device), labels.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", s_per_step=f"{times[-1]:.1f}")
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                bar.write(f"  到达时间预算 {budget_s / 60:.1f} 分钟，在第 {step + 1} 步停止。")
                break
    except KeyboardInterrupt:
        if on_interrupt:
            on_interrupt()
        raise
    finally:
        bar.close()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"losses": losses, "step_times": times, "step_cpu_times": cpu_times, "steps": len(losses), "optimizer_state_bytes": state_bytes}


def peak_rss_mb() -> float | None:
    """进程到目前为止的最高常驻内存（MB）。这是一个只升不降的"高水位"。Windows 上没有 resource 模块。"""
    try:
        import resource
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024     # macOS 单位是字节，Linux 是 KB


def saved_activation_bytes(model, ids, labels) -> int:
    """前向时为反向传播保存的张量（激活值）一共多少字节：用 autograd 的钩子逐个记录，参数本身不算。"""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = answer_loss(model, ids, labels)
    del loss
    return sum(seen.values())


def memory_report(model, params, opt_state_bytes, sample, device) -> dict:
    ids, labels = collate(sample, 0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params)
    act = saved_activation_bytes(model, ids.to(device), labels.to(device))
    mb = 2**20
    return {"weights_mb": weights / mb, "trainable_mb": trainable / mb, "grads_mb": trainable / mb,
            "optimizer_state_mb": opt_state_bytes / mb, "activations_mb": act / mb,
            "total_mb": (weights + 2 * trainable + opt_state_bytes + act) / mb}


# ---------------------------------------------------------------------------
# 5. 参数算术：本模型 & 一个 7B 模型（Llama-2-7B 的公开结构：32 层、hidden 4096、MLP 11008、词表 32000）
# ---------------------------------------------------------------------------
def lora_arithmetic(n_layers, dim, kv_dim, ffn, vocab, tied, targets, r) -> dict:
    shapes = {"q": (dim, dim), "k": (dim, kv_dim), "v": (dim, kv_dim), "o": (dim, dim),
              "gate": (dim, ffn), "up": (dim, ffn), "down": (ffn, dim)}            # (in, out)
    per_layer_base = sum(i * o for i, o in shapes.values()) + 2 * dim               # 7 个矩阵 + 2 个 RMSNorm
    total = n_layers * per_layer_base + vocab * dim * (1 if tied else 2) + dim
    lora = n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return {"total_params": total, "lora_params": lora, "lora_pct": 100 * lora / total,
            "full_ft_adam_fp32_gb": total * 16 / 1e9,    # 权重 4 + 梯度 4 + Adam 两个状态 8 字节/参数
            "lora_fp32_gb": (total * 4 + lora * 16) / 1e9}


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="从零实现 LoRA，在 CPU 上微调 SmolLM2-135M（第 05 课）")
    p.add_argument("--quick", action="store_true", help="快速体验：少量步数、少量评估样本（约 1 分钟）")
    p.add_argument("--rank", type=int, default=8, help="LoRA 的秩 r（默认 8）")
    p.add_argument("--alpha", type=float, default=16.0, help="缩放 alpha，实际缩放 = alpha/r（默认 16）")
    p.add_argument("--targets", default="q,k,v,o", help="注入到哪些线性层：q,k,v,o,gate,up,down 的逗号组合，或 attn/mlp/all")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA 分支输入的 dropout（默认 0）")
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA 学习率（默认 2e-3）")
    p.add_argument("--steps", type=int, default=None, help="最多训练多少步（默认 80；--quick 为 8）")
    p.add_argument("--time-budget", type=float, default=None, help="训练时间预算（分钟；默认 6，--quick 为 0.75）")
    p.add_argument("--batch-size", type=int, default=None, help="每步几条样本（默认 8；--quick 为 4）")
    p.add_argument("--data", default=str(DATA_DIR / "train.json"), help="训练数据（instruction/input/output 的 JSON 列表）")
    p.add_argument("--eval-data", default=str(DATA_DIR / "eval.json"), help="留出评估数据（同样格式）")
    p.add_argument("--eval-n", type=int, default=None, help="评估用多少条留出样本（默认全部；--quick 为 8）")
    p.add_argument("--max-new-tokens", type=int, default=16, help="评估时每条最多生成多少 token（默认 16）")
    p.add_argument("--max-len", type=int, default=256, help="超过这个 token 数的训练样本会被跳过（默认 256）")
    p.add_argument("--full-ft", type=int, default=None, metavar="N",
                   help="再做 N 步全参数微调，对比速度与内存（默认 4；--quick 为 2；0 = 不做）")
    p.add_argument("--full-ft-lr", type=float, default=2e-5, help="全参数微调的学习率（默认 2e-5）")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU 线程数（默认全部核）")
    p.add_argument("--device", default="auto", help="auto / cpu / cuda / mps")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    q = a.quick
    for k, full, quick in [("steps", 80, 8), ("time_budget", 6.0, 0.75), ("batch_size", 8, 4),
                           ("eval_n", 0, 8), ("full_ft", 4, 2)]:
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    if a.rank < 1 or a.steps < 1 or a.batch_size < 1 or a.eval_n < 0 or a.full_ft < 0 or a.max_new_tokens < 1:
        p.error("--rank、--steps、--batch-size、--max-new-tokens 须 ≥ 1；--eval-n、--full-ft 须 ≥ 0")
    if not (a.alpha > 0 and a.lr > 0 and a.full_ft_lr > 0 and a.time_budget > 0 and 0 <= a.dropout < 1 and a.max_len >= 8):
        p.error("--alpha、--lr、--full-ft-lr、--time-budget 须 > 0；--dropout 须在 [0,1)；--max-len 须 ≥ 8")
    a.targets = parse_targets(a.targets)
    return a


def main(argv=None):
    a = resolve_args(argv)
    train_rows, eval_rows = load_examples(a.data), load_examples(a.eval_data)   # 先检查数据，再加载模型
    if a.eval_n:
        eval_rows = eval_rows[:a.eval_n]
    t_run, c_run = time.perf_counter(), time.process_time()
    torch.manual_seed(a.seed)
    torch.set_flush_denormal(True)
    device = get_device(a.device)
    threads = setup_threads(a.threads) if device.type == "cpu" else None
    out = output_dir(NAME)

    from common.local_model import load_local_model
    lm = load_local_model(dtype="fp32", device=device)
    base, tok, cfg = lm.model, lm.tokenizer, lm.config
    print(f"模型：{lm.name}，设备 {device}" + (f"，{threads} 个 CPU 线程" if threads else ""))
    print("注意：本地模型只懂英文，所以数据、提示都是英文。")

    train_data = [encode_example(tok, ex) for ex in train_rows]
    skipped = sum(len(x) > a.max_len for x, _ in train_data)
    train_data = [d for d in train_data if len(d[0]) <= a.max_len]
    if len(train_data) < a.batch_size:
        raise UserError(f"可用的训练样本只有 {len(train_data)} 条，少于 --batch-size {a.batch_size}；请加数据或减小 batch。")
    eval_data = [encode_example(tok, ex) for ex in eval_rows]
    lens = [len(x) for x, _ in train_data]
    print(f"\n== 数据 ==\n训练 {len(train_data)} 条（跳过过长的 {skipped} 条），留出评估 {len(eval_rows)} 条；"
          f"每条 {min(lens)}～{max(lens)} 个 token（平均 {sum(lens) / len(lens):.0f}），"
          f"其中答案平均 {sum(sum(t != -100 for t in y) for _, y in train_data) / len(train_data):.1f} 个 token。")
    ex = train_rows[0]
    print(f"一条样本：input = {ex.get('input', '')!r}\n          output = {ex['output']!r}")

    # ---- 零样本（训练前）----
    print("\n== 1. 训练前：原模型（零样本）在留出集上的表现 ==")
    zero = score(base, tok, eval_rows, a.max_new_tokens, device, "零样本")
    loss_before = heldout_loss(base, eval_data, 0, device)

    # ---- 注入 LoRA ----
    print(f"\n== 2. 注入 LoRA：r={a.rank}，alpha={a.alpha:g}（缩放 alpha/r = {a.alpha / a.rank:g}），targets={','.join(a.targets)} ==")
    model = copy.deepcopy(base)            # 缓存里的 base 保持原样，后面要和它对照
    inject_lora(model, a.targets, a.rank, a.alpha, a.dropout)
    model.train()
    rep = param_report(model, a.targets)
    print(f"{'模块':<6}{'层数':>4}{'W 形状(out×in)':>16}{'原参数':>12}{'LoRA 参数':>11}{'= r·(in+out)·层数':>18}")
    for t, r in rep["per_type"].items():
        print(f"{t:<6}{r['layers']:>5}{'×'.join(map(str, r['shape_out_in'])):>16}{r['base_params']:>13,}"
              f"{r['lora_params']:>12,}{r['formula_r_in_plus_out']:>18,}")
    print(f"可训练 {rep['trainable']:,} / 总参数（原模型 {rep['total'] - rep['trainable']:,} + LoRA）{rep['total']:,}"
          f" = {rep['trainable_pct']:.3f}%")
    kv = cfg.n_kv_heads * cfg.head_dim
    ours = lora_arithmetic(cfg.n_layers, cfg.dim, kv, cfg.ffn_dim, cfg.vocab_size, True, a.targets, a.rank)
    b7 = lora_arithmetic(32, 4096, 4096, 11008, 32000, False, a.targets, a.rank)
    print(f"用公式算（本模型）：原模型 {ours['total_params']:,}，LoRA {ours['lora_params']:,}（占原模型 {ours['lora_pct']:.3f}%）")
    print(f"换成 7B 模型（32 层，hidden 4096，MLP 11008）：总参数 {b7['total_params']:,}，同样设置的 LoRA "
          f"{b7['lora_params']:,}（{b7['lora_pct']:.3f}%）；全参数 fp32+Adam 约 {b7['full_ft_adam_fp32_gb']:.0f} GB，"
          f"LoRA 约 {b7['lora_fp32_gb']:.0f} GB（fp32 权重为主）")

    # ---- 训练 LoRA ----
    print(f"\n== 3. 训练 LoRA：最多 {a.steps} 步或 {a.time_budget:g} 分钟，batch {a.batch_size}，lr {a.lr:g}，只在答案 token 上算 loss ==")
    params = [p for p in model.parameters() if p.requires_grad]
    adapter_path = out / "adapter.safetensors"
    meta = {"rank": a.rank, "alpha": a.alpha, "targets": a.targets, "base": lm.name}

    def on_interrupt():
        save_adapter(model, adapter_path, meta)
        print(f"\n已把当前的适配器保存到 {adapter_path}")

    lora_run = train(model, params, train_data, a, device, a.steps, a.lr, a.time_budget * 60, "LoRA", on_interrupt)
    model.eval()
    loss_after = heldout_loss(model, eval_data, 0, device)
    L = lora_run["losses"]
    k = max(1, min(5, len(L) // 4))
    print(f"训练 loss：前 {k} 步平均 {sum(L[:k]) / k:.3f} → 最后 {k} 步平均 {sum(L[-k:]) / k:.3f}；"
          f"留出集答案 loss：{loss_before:.3f} → {loss_after:.3f}")

    print("\n== 4. 训练后：LoRA 模型在同一留出集上的表现 ==")
    after = score(model, tok, eval_rows, a.max_new_tokens, device, "LoRA 之后")

    print("\n并排对比（留出样本，原模型 vs LoRA）：")
    for i in range(min(4, len(eval_rows))):
        print(f"  顾客：{eval_rows[i].get('input', '')}\n    期望：{eval_rows[i]['output']}\n"
              f"    训练前：{zero['outputs'][i]!r}\n    训练后：{after['outputs'][i]!r}")

    # ---- 保存 / 重新加载 / 合并 / 拆分 ----
    print("\n== 5. 只保存适配器，重新加载，合并进权重，再拆分 ==")
    save_adapter(model, adapter_path, meta)
    ad_mb, base_mb = adapter_path.stat().st_size / 2**20, sum(p.numel() * 4 for p in base.parameters()) / 2**20
    print(f"适配器 {adapter_path}：{ad_mb:.2f} MB；完整模型 fp32 权重 {base_mb:.0f} MB（{base_mb / ad_mb:.0f} 倍）")
    probe = collate([(prompt_ids(tok, ex), []) for ex in eval_rows[:4]], 0)[0].to(device)
    with torch.no_grad():
        ref = model(probe)
    del model, params                       # 从文件重新加载，证明文件里就是全部的训练成果
    model = copy.deepcopy(base)
    inject_lora(model, a.targets, a.rank, a.alpha)
    load_adapter(model, adapter_path)
    model.eval()
    with torch.no_grad():
        reloaded = model(probe)
        reload_equal = torch.equal(reloaded, ref)
        for m in lora_modules(model).values():
            m.merge()
        merged = model(probe)
        merge_diff = (merged - reloaded).abs().max().item()
        merge_tol = 1e-4 * reloaded.abs().max().item()     # fp32：相对 logits 最大值 1e-4（算错一个缩放会差几个数量级）
        same_argmax = torch.equal(merged.argmax(-1), reloaded.argmax(-1))
        mods = lora_modules(model)
        arith_diff = max((m.base.weight - m.delta_weight() - m._saved_weight).abs().max().item() for m in mods.values())
        for m in mods.values():
            m.unmerge()
        restored = all(torch.equal(m.base.weight, base.get_submodule(n).weight) for n, m in mods.items())
    print(f"重新加载后输出与训练时逐位相同：{reload_equal}")
    print(f"合并 W' = W + (alpha/r)·B·A 后：logits 最大绝对差 {merge_diff:.2e}（容差 {merge_tol:.1e} = 1e-4×最大|logit|；"
          f"不是 0 只因浮点求和顺序不同），"
          f"每个位置的 argmax 相同：{same_argmax}")
    print(f"拆分：从合并前保存的副本恢复，与原模型权重逐位相同：{restored}"
          f"（若用 W' - ΔW 计算，最大误差 {arith_diff:.1e}，不是逐位相同）")
    if not (reload_equal and merge_diff < merge_tol and restored):
        raise RuntimeError("merge/unmerge check failed")
    del model

    # ---- 对比：从同一个原模型出发，LoRA 与全参数微调各训练 N 步（同样的 batch），紧挨着测时间和内存 ----
    def med(xs):                                             # 第 1 步含预热（分配内存等），不计
        return statistics.median(xs[1:] or xs)

    side = {}
    if a.full_ft:
        print(f"\n== 6. 对比：从原模型出发，LoRA（lr {a.lr:g}）和全参数微调（lr {a.full_ft_lr:g}）各训练 {a.full_ft} 步，"
              f"用同样的 batch，紧挨着测速度和内存 ==")
        for kind in ("lora", "full"):
            m = copy.deepcopy(base)
            if kind == "lora":
                inject_lora(m, a.targets, a.rank, a.alpha, a.dropout)
            else:
                m.requires_grad_(True)                       # 全部 1.35 亿个参数都要训练
            m.train()
            ps = [p for p in m.parameters() if p.requires_grad]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = train(m, ps, train_data, a, device, a.full_ft, a.lr if kind == "lora" else a.full_ft_lr, None,
                      "LoRA" if kind == "lora" else "全参数")
            mem = memory_report(m, ps, r["optimizer_state_bytes"], train_data[:a.batch_size], device)
            mem.update(step_time=med(r["step_times"]), step_cpu_time=med(r["step_cpu_times"]), peak_rss_mb=peak_rss_mb())
            if device.type == "cuda":
                mem["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            side[kind] = {"losses": r["losses"], "step_times": r["step_times"], "step_cpu_times": r["step_cpu_times"],
                          **mem}
            del m, ps

        print(f"\n== 7. LoRA vs 全参数微调（本次运行实测）==")
        rows = [("每步墙钟时间（中位数，秒）", "step_time"), ("每步 CPU 时间（中位数，秒）", "step_cpu_time"),
                ("可训练参数 (MB)", "trainable_mb"), ("梯度 (MB)", "grads_mb"), ("AdamW 状态 (MB)", "optimizer_state_mb"),
                ("激活值（为反向保存的，MB）", "activations_mb"), ("合计：权重+梯度+状态+激活 (MB)", "total_mb")]
        if device.type == "cuda":
            rows.append(("GPU 显存峰值 (MB)", "cuda_peak_mb"))
        lv, fv = side["lora"], side["full"]
        print(f"{'':<28}{'LoRA':>12}{'全参数':>12}{'全参数/LoRA':>12}")
        for label, key in rows:
            side.setdefault("ratios_full_over_lora", {})[key] = fv[key] / lv[key] if lv[key] else None
            print(f"{label:<28}{lv[key]:>12.3f}{fv[key]:>12.3f}{fv[key] / lv[key]:>11.1f}x")
        if lv["peak_rss_mb"]:
            print(f"进程内存高水位（resource.ru_maxrss，只升不降）：LoRA 对比后 {lv['peak_rss_mb']:.0f} MB → "
                  f"全参数对比后 {fv['peak_rss_mb']:.0f} MB")
        print(f"这 {a.full_ft} 步的训练 loss：LoRA {[round(x, 3) for x in lv['losses']]}，"
              f"全参数 {[round(x, 3) for x in fv['losses']]}")
        print("（时间：反向传播仍要把梯度传过全部 30 层，LoRA 省掉的只是权重梯度和大部分优化器更新；"
              "内存：梯度和 AdamW 状态只属于 A、B，差距是百倍级。）")

    # ---- 图和 results.json ----
    png = out / "loss_curve.png"
    plot_losses(L, side["full"]["losses"] if side else None, png)
    print(f"\nloss 曲线：{png}")
    total_s, cpu_s = time.perf_counter() - t_run, time.process_time() - c_run
    res = {"config": {k: v for k, v in vars(a).items()}, "device": str(device), "threads": threads,
           "n_train": len(train_data), "n_eval": len(eval_rows),
           "params": rep, "arithmetic": {"this_model": ours, "llama2_7b_like": b7},
           "zero_shot": zero, "after_lora": after,
           "heldout_loss": {"before": loss_before, "after": loss_after},
           "lora_train": {**lora_run, "median_step_s": med(lora_run["step_times"]),
                          "median_step_cpu_s": med(lora_run["step_cpu_times"])},
           "comparison": side or None,
           "adapter": {"path": adapter_path, "mb": ad_mb, "full_model_fp32_mb": base_mb, "reload_bitwise_equal": reload_equal},
           "merge": {"max_abs_logit_diff": merge_diff, "tolerance": merge_tol, "argmax_equal": same_argmax,
                     "unmerge_bitwise_restored": restored, "arithmetic_unmerge_max_err": arith_diff},
           "loss_fell": loss_after < loss_before, "total_seconds": total_s, "total_cpu_seconds": cpu_s}
    print(f"结果：{save_results(NAME, res)}（总用时 {total_s:.0f} 秒，本进程 CPU 时间 {cpu_s:.0f} 秒）")
    za, aa = zero["intent_accuracy"], after["intent_accuracy"]
    if za is not None:
        print(f"\n小结：意图准确率 {za:.1%} → {aa:.1%}；格式正确 {zero['format_ok']:.1%} → {after['format_ok']:.1%}；"
              f"只训练了 {rep['trainable_pct']:.2f}% 的参数。")


def plot_losses(lora: list[float], full: list[float] | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(lora) + 1), lora, label="LoRA")
    if full:
        ax.plot(range(1, len(full) + 1), full, "o-", label="full fine-tuning")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token loss")
    ax.set_title("05_lora: training loss (loss on answer tokens only)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_cli(main)
