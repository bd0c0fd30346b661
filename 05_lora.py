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
用时（空闲的 2 核 CPU）：--quick 约 40 秒；默认约 10 分钟（训练固定 80 步；--time-budget 只是保险上限）。

常用命令：
  python 05_lora.py --quick                         # 快速体验
  python 05_lora.py                                 # 完整一课：零样本 → LoRA 训练 → 评分 → 合并 → 对比全参数微调
  python 05_lora.py --rank 4 --targets q,v          # 换秩、换注入位置（练习）
  python 05_lora.py --targets q,k,v,o,gate,up,down  # 连 MLP 一起加 LoRA
"""
from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import (add_knob, add_max_new_tokens, course_parser, existing_file, fraction, non_negative_int,
                        positive_float, positive_int, setup_run)
from common.device import machine_busy, peak_rss_mb, synchronize
from common.errors import UserError, read_json, require, run_cli
from common.display import table
from common.generate import generate_batch
from common.lora import TARGETS, inject_lora, load_adapter, lora_modules, parse_targets, save_adapter
from common.outputs import REPO_ROOT, output_dir, partial_path, save_results
from common.plots import legend_outside, new_figure, save_figure
from common.training import train_record, training_facts

NAME = "05_lora"
DATA_DIR = REPO_ROOT / "data" / "lora"
ANSWER_RE = re.compile(r"^intent: ([a-z_]+) \| order: (\d+|none)$")   # 要求的精确格式
INTENT_RE = re.compile(r"intent\s*[:=]\s*([a-z_]+)", re.IGNORECASE)     # 宽松地找出意图
EVAL_BATCH = 16                     # 评估时一批生成几条（长度不同也行：左侧补齐 + 注意力掩码）


# 1. LoRA 层：y = W·x + (alpha/r)·B·A·dropout(x)，W 冻结，只训练 A、B
#    代码在 common/lora.py（第 08 课 DPO 也用它），先读它，一百多行：
#      LoRALinear.__init__   A: r×in 小随机数，B: out×r 全 0 → 注入后的模型和原模型逐位相同
#      LoRALinear.forward    base(x) + (dropout(x) @ Aᵀ @ Bᵀ)·alpha/r：先降到 r 维再升回来
#      delta_weight / merge / unmerge   ΔW = (alpha/r)·B·A 加进 W；unmerge 从副本逐位恢复 W
#      inject_lora           冻结全部原参数，把选中的 nn.Linear 换成 LoRALinear
#      save_adapter / load_adapter     只存 A、B（safetensors，几 MB）
#      adapters_disabled     临时关掉所有适配器 = 原模型（第 08 课用它当参考模型）
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


def lora_arithmetic(n_layers, dim, kv_dim, ffn, vocab, tied, targets, r) -> dict:
    """同样的计数用公式算：本模型（与真实模块计数核对）和一个 7B 模型（Llama-2-7B 的公开结构）。"""
    shapes = {"q": (dim, dim), "k": (dim, kv_dim), "v": (dim, kv_dim), "o": (dim, dim),
              "gate": (dim, ffn), "up": (dim, ffn), "down": (ffn, dim)}            # (in, out)
    per_layer_base = sum(i * o for i, o in shapes.values()) + 2 * dim               # 7 个矩阵 + 2 个 RMSNorm
    total = n_layers * per_layer_base + vocab * dim * (1 if tied else 2) + dim
    lora = n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return {"total_params": total, "lora_params": lora, "lora_pct": 100 * lora / total,
            "full_ft_adam_fp32_gb": total * 16 / 1e9,    # 权重 4 + 梯度 4 + Adam 两个状态 8 字节/参数
            "lora_fp32_gb": (total * 4 + lora * 16) / 1e9}


# 2. 数据：instruction/input/output → ChatML 提示 + 答案；标签里提示部分为 -100
def load_examples(path: str | Path) -> list[dict]:
    rows = read_json(path, "数据文件", "请检查 --data / --eval-data 的路径和格式：[{\"instruction\", \"input\", \"output\"}, ...]。")
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


# 3. 评分：贪心生成答案（common/generate.py 的 generate_batch），解析意图
def intent_set(rows: list[dict]) -> set[str]:
    """标签集合：数据里金标准答案出现过的全部意图（训练集 + 留出集）。"""
    return {m.group(1).lower() for r in rows if (m := INTENT_RE.search(r["output"]))}


def grade(golds: list[str], gens: list[str], intents: set[str]) -> dict:
    """给生成的答案打分。格式正确 = 完全符合 "intent: <意图> | order: <订单号或 none>" 并且意图在标签集合里；
    格式对、意图却是编出来的（如 excuse_intent）单独计数（invented_intent），不算格式正确。"""
    gold_intents = [m.group(1).lower() if (m := INTENT_RE.search(g)) else None for g in golds]
    pred_intents = [m.group(1).lower() if (m := INTENT_RE.search(g)) else None for g in gens]
    shaped = [m.group(1) if (m := ANSWER_RE.match(p)) else None for p in gens]
    n = len(gens)
    return {"n": n, "exact_match": sum(g == p for g, p in zip(golds, gens)) / n,
            "format_ok": sum(i is not None and i in intents for i in shaped) / n,
            "invented_intent": sum(i is not None and i not in intents for i in shaped) / n,
            "invented_intents": sorted({i for i in shaped if i is not None and i not in intents}),
            "intent_accuracy": (sum(g == p for g, p in zip(gold_intents, pred_intents)) / n
                                if all(gold_intents) else None)}   # 只有金标准答案里都有 intent 时才算


def score(model, tok, examples: list[dict], max_new: int, label: str, intents: set[str] | None = None) -> dict:
    from tqdm import tqdm
    t0 = time.perf_counter()
    prompts = [prompt_ids(tok, ex) for ex in examples]
    gens: list[str] = []
    with tqdm(total=len(prompts), desc=f"评估（{label}）", unit="条", ncols=90, file=sys.stdout, leave=False) as bar:
        for i in range(0, len(prompts), EVAL_BATCH):        # 一批里长度不同也行；分批只为了显示进度
            chunk = prompts[i:i + EVAL_BATCH]
            gens += [tok.decode(g).strip() for g in generate_batch(model, chunk, max_new, stop_ids=tok.eos_ids)]
            bar.update(len(chunk))
    res = {**grade([ex["output"].strip() for ex in examples], gens, intents or intent_set(examples)),
           "seconds": time.perf_counter() - t0, "outputs": gens}
    acc = "—" if res["intent_accuracy"] is None else f"{res['intent_accuracy']:.1%}"
    made_up = (f"｜格式对但意图是编的 {res['invented_intent']:.1%}（{', '.join(res['invented_intents'])}）"
               if res["invented_intents"] else "")
    print(f"  [{label}] 意图准确率 {acc}｜格式正确 {res['format_ok']:.1%}{made_up}｜完全一致 {res['exact_match']:.1%}"
          f"（{res['n']} 条留出样本，{res['seconds']:.0f} 秒）")
    return res


@torch.no_grad()
def heldout_loss(model, data: list, pad_id: int = 0, bs: int = 8) -> float:
    """留出集上答案 token 的平均 loss（按 token 加权）。"""
    from tqdm import tqdm
    tot, n = 0.0, 0
    for i in tqdm(range(0, len(data), bs), desc="留出集 loss", ncols=90, file=sys.stdout, leave=False):
        ids, labels = collate(data[i:i + bs], pad_id)
        k = int((labels[:, 1:] != -100).sum())
        tot += answer_loss(model, ids.to(model.device), labels.to(model.device)).item() * k
        n += k
    return tot / n


# 4. 训练循环（LoRA 和全参数微调共用）：固定步数；时间上限只是保险
def batches(data: list, bs: int, seed: int):
    """无限循环地按 epoch 打乱、切成 batch。同一个 seed 给出同样的顺序（全参数微调用同样的 batch 对比）。"""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=g).tolist()
        for i in range(0, len(order) - bs + 1, bs):
            yield [data[j] for j in order[i:i + bs]]


def train(model, params, data, *, steps: int, lr: float, batch_size: int, seed: int, cap_s: float | None = None,
          desc: str = "LoRA", on_interrupt=None) -> dict:
    """训练 steps 步（线性 warmup 后学习率不变）。cap_s 秒用完时提前停下，并在结果里记下 cut_by_time_budget。
    返回的记录和第 08 课同名（common/training.py 的 train_record）：steps、planned_steps、losses、train_seconds……"""
    from tqdm import tqdm
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, times, cpu_times = [], [], []
    warmup = max(1, min(10, steps // 10))
    it, device, cut = batches(data, batch_size, seed), model.device, False
    t_start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, ncols=90, file=sys.stdout)
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup)
            ids, labels = collate(next(it), 0)               # 补齐用的 id 随便取：它的标签是 -100，不影响 loss
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
            if cap_s is not None and step + 1 < steps and time.perf_counter() - t_start > cap_s:
                cut = True
                break
    except KeyboardInterrupt:
        if on_interrupt:
            on_interrupt()
        raise
    finally:
        bar.close()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return train_record(losses, steps, cut, time.perf_counter() - t_start, sum(p.numel() for p in params),
                        step_times=times, step_cpu_times=cpu_times, warmup_steps=warmup, time_budget_s=cap_s,
                        optimizer_state_bytes=state_bytes)


def median_step(xs: list[float]) -> float:
    return statistics.median(xs[1:] or xs)                   # 第 1 步含预热（分配内存等），不计


def cap_warning(run: dict, where: str = "下面") -> str:
    """训练被时间上限截断时的说明（由本次的数字算出）。没截断时返回空字符串。"""
    if not run["cut_by_time_budget"]:
        return ""
    done, planned, med = run["steps"], run["planned_steps"], median_step(run["step_times"])
    need_min = -(-med * planned * 1.5 // 60)                 # 按本次的速度跑完 planned 步所需时间 ×1.5，向上取整
    return (f"⚠ 训练被时间上限截断：只跑了 {done}/{planned} 步（{done / planned:.0%}），"
            f"{run['train_seconds'] / 60:.1f} 分钟用完了 --time-budget {run['time_budget_s'] / 60:g} 分钟"
            f"（本次每步中位数 {med:.1f} 秒）。\n"
            f"⚠ 所以{where}的 loss 和准确率来自一个没训练完的 LoRA，会比训练满 {planned} 步差，不能用来评价 LoRA；"
            f"请在空闲时重跑，或加大 --time-budget（按本次速度约需 {need_min:.0f} 分钟），或减少 --steps。")


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


def memory_report(model, params, opt_state_bytes, sample) -> dict:
    ids, labels = collate(sample, 0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params)
    act = saved_activation_bytes(model, ids.to(model.device), labels.to(model.device))
    mb = 2**20
    return {"weights_mb": weights / mb, "trainable_mb": trainable / mb, "grads_mb": trainable / mb,
            "optimizer_state_mb": opt_state_bytes / mb, "activations_mb": act / mb,
            "total_mb": (weights + 2 * trainable + opt_state_bytes + act) / mb}


# 5. 自检：重新加载、合并、拆分。这些是不变量：不成立就是代码错了（一行中文，退出码 1）
@torch.no_grad()
def check_reload_equal(model, probe: torch.Tensor, ref: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """从文件重新加载适配器的模型，logits 与训练结束时的模型逐位相同。"""
    out = model(probe)
    return torch.equal(out, ref), out


@torch.no_grad()
def check_merge(model, probe: torch.Tensor, unmerged: torch.Tensor) -> dict:
    """把每层的 ΔW 合并进 W 之后，logits 与未合并时只差浮点求和顺序带来的误差，每个位置 argmax 相同。"""
    for m in lora_modules(model).values():
        m.merge()
    merged = model(probe)
    return {"max_abs_logit_diff": (merged - unmerged).abs().max().item(),
            "tolerance": 1e-4 * unmerged.abs().max().item(),   # fp32：相对 logits 最大值 1e-4（算错缩放会差几个数量级）
            "argmax_equal": torch.equal(merged.argmax(-1), unmerged.argmax(-1))}


@torch.no_grad()
def check_unmerge(model, base) -> dict:
    """拆分：从合并前保存的副本恢复 W，与原模型逐位相同；对照用减法 W' - ΔW 恢复时的误差。"""
    mods = lora_modules(model)
    arith = max((m.base.weight - m.delta_weight() - base.get_submodule(n).weight).abs().max().item()
                for n, m in mods.items())
    for m in mods.values():
        m.unmerge()
    restored = all(torch.equal(m.base.weight, base.get_submodule(n).weight) for n, m in mods.items())
    return {"unmerge_bitwise_restored": restored, "arithmetic_unmerge_max_err": arith}


# 6. 解读 LoRA 与全参数微调的对比：每句话都由本次测到的数字算出
def timing_sentences(lv: dict, fv: dict, steps: int, n_layers: int) -> list[str]:
    """LoRA（lv）和全参数（fv）每步时间的解读：符合预期、相反、或看不出差别，各说各的话。"""
    wall, cpu = fv["step_time"] / lv["step_time"], fv["step_cpu_time"] / lv["step_cpu_time"]
    n_full = fv["trainable_mb"] * 2**20 / 4                  # fp32：每个参数 4 字节
    noisy = max(wall, cpu) / min(wall, cpu) > 1.5            # 墙钟与 CPU 时间对不上：别的进程在抢 CPU
    basis = [cpu] if noisy else [wall, cpu]
    ratios = f"墙钟 {wall:.2f} 倍，CPU 时间 {cpu:.2f} 倍" + ("；按 CPU 时间判断" if noisy else "")
    if all(x >= 1.1 for x in basis):
        out = [f"时间：本次全参数每步比 LoRA 慢（{ratios}），符合预期：LoRA 省掉了权重梯度那一份矩阵乘法和 "
               f"{n_full / 1e8:.2f} 亿个参数的 AdamW 更新；但反向传播仍要把梯度传过全部 {n_layers} 层，所以省不到一个数量级。"]
    elif all(x < 1 / 1.1 for x in basis):
        out = [f"时间：与预期相反，本次全参数每步反而比 LoRA 快（{ratios}）。每边只测了 {steps} 步（去掉第 1 步取中位数），"
               f"机器上别的进程抢 CPU 时这么少的步数计时不可靠；请在空闲时用 --full-ft 10 重跑再看。"]
    else:
        out = [f"时间：本次看不出谁快（{ratios}；差不到 10%，或两个比值方向不一致）。预期全参数略慢（多了权重梯度和 "
               f"{n_full / 1e8:.2f} 亿个参数的优化器更新）；每边只测了 {steps} 步，请在空闲时用 --full-ft 10 重跑再看。"]
    if noisy:
        out.append(f"墙钟时间比（{wall:.1f}×）和 CPU 时间比（{cpu:.1f}×）相差很大：测量时有别的进程在抢 CPU，"
                   f"墙钟时间不可靠，CPU 时间更可信。")
    return out


def memory_sentence(lv: dict, fv: dict) -> str:
    r = {k: fv[k] / lv[k] for k in ("optimizer_state_mb", "activations_mb", "total_mb")}
    return (f"内存：梯度和 AdamW 状态只属于可训练参数，本次全参数是 LoRA 的 {r['optimizer_state_mb']:.0f} 倍；"
            f"算上权重（两边相同）和激活值（{r['activations_mb']:.1f} 倍），合计 {r['total_mb']:.1f} 倍。")


# 7. 本课的各个步骤（main 按打印顺序调用它们）
def step_load_model(a):
    device = setup_run(a)                                    # 线程数、随机种子、设备
    torch.set_flush_denormal(True)
    from common.local_model import load_local_model
    lm = load_local_model(a.model_file, dtype="fp32", device=device, model=a.local_model)      # LoRA 训练用 fp32
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"模型：{lm.name}，设备 {device}" + (f"，{threads} 个 CPU 线程" if threads else ""))
    print("注意：本地模型只懂英文，所以数据、提示都是英文。")
    if busy := machine_busy():
        print(f"⚠ 机器正忙（1 分钟平均负载 {busy[0]:.1f} ≥ {busy[1]} 个核）：本课的计时不可靠，训练可能碰到 "
              f"--time-budget 上限；建议在空闲时重跑。")
    return lm, threads


def step_data(a, tok, train_rows: list[dict], eval_rows: list[dict]) -> tuple[list, list]:
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
    return train_data, eval_data


def step_inject(a, lm) -> tuple[nn.Module, dict, dict]:
    print(f"\n== 2. 注入 LoRA：r={a.rank}，alpha={a.alpha:g}（缩放 alpha/r = {a.alpha / a.rank:g}），targets={','.join(a.targets)} ==")
    model = copy.deepcopy(lm.model)                          # 缓存里的原模型保持原样，后面要和它对照
    inject_lora(model, a.targets, a.rank, a.alpha, a.dropout)
    model.train()
    rep = param_report(model, a.targets)
    print(param_table(rep))
    print(f"可训练 {rep['trainable']:,} / 总参数（原模型 {rep['total'] - rep['trainable']:,} + LoRA）{rep['total']:,}"
          f" = {rep['trainable_pct']:.3f}%")
    cfg = lm.config
    ours = lora_arithmetic(cfg.n_layers, cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim, cfg.vocab_size, True,
                           a.targets, a.rank)
    b7 = lora_arithmetic(32, 4096, 4096, 11008, 32000, False, a.targets, a.rank)
    print(f"用公式算（本模型）：原模型 {ours['total_params']:,}，LoRA {ours['lora_params']:,}（占原模型 {ours['lora_pct']:.3f}%）")
    print(f"换成 7B 模型（32 层，hidden 4096，MLP 11008）：总参数 {b7['total_params']:,}，同样设置的 LoRA "
          f"{b7['lora_params']:,}（{b7['lora_pct']:.3f}%）；全参数 fp32+Adam 约 {b7['full_ft_adam_fp32_gb']:.0f} GB，"
          f"LoRA 约 {b7['lora_fp32_gb']:.0f} GB（fp32 权重为主）")
    return model, rep, {"this_model": ours, "llama2_7b_like": b7}


def param_table(rep: dict) -> str:
    """每种被注入的线性层一行：层数、形状、原参数、LoRA 参数（按终端显示宽度对齐，汉字占两格）。"""
    rows = [["模块", "层数", "W 形状(out×in)", "原参数", "LoRA 参数", "= r·(in+out)·层数"]]
    rows += [[t, r["layers"], "×".join(map(str, r["shape_out_in"])), f"{r['base_params']:,}", f"{r['lora_params']:,}",
              f"{r['formula_r_in_plus_out']:,}"] for t, r in rep["per_type"].items()]
    return table(rows)


def step_train(a, model, train_data: list, eval_data: list, loss_before: float, meta: dict) -> tuple[dict, float]:
    print(f"\n== 3. 训练 LoRA：{a.steps} 步（时间上限 {a.time_budget:g} 分钟，只作保险），batch {a.batch_size}，"
          f"lr {a.lr:g}，只在答案 token 上算 loss ==")
    def on_interrupt():                                      # Ctrl-C：先保存当前的适配器（不覆盖上次训练完的那份）
        path = partial_path(output_dir(a.out_dir) / "adapter.safetensors")
        save_adapter(model, path, meta)
        print(f"\n已把当前（没训练完）的适配器保存到 {path}")

    params = [p for p in model.parameters() if p.requires_grad]
    run = train(model, params, train_data, steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                cap_s=a.time_budget * 60, desc="LoRA", on_interrupt=on_interrupt)
    model.eval()
    print(training_facts(run))
    if run["cut_by_time_budget"]:
        print(cap_warning(run))
    loss_after = heldout_loss(model, eval_data)
    L = run["losses"]
    k = max(1, min(5, len(L) // 4))
    print(f"训练 loss：前 {k} 步平均 {sum(L[:k]) / k:.3f} → 最后 {k} 步平均 {sum(L[-k:]) / k:.3f}；"
          f"留出集答案 loss：{loss_before:.3f} → {loss_after:.3f}")
    return run, loss_after


def step_after(a, model, tok, eval_rows: list[dict], zero: dict, intents: set[str]) -> dict:
    print("\n== 4. 训练后：LoRA 模型在同一留出集上的表现 ==")
    after = score(model, tok, eval_rows, a.max_new_tokens, "LoRA 之后", intents)
    print("\n并排对比（留出样本，原模型 vs LoRA）：")
    for i in range(min(4, len(eval_rows))):
        print(f"  顾客：{eval_rows[i].get('input', '')}\n    期望：{eval_rows[i]['output']}\n"
              f"    训练前：{zero['outputs'][i]!r}\n    训练后：{after['outputs'][i]!r}")
    return after


def step_save_adapter(a, model, meta: dict, probe: torch.Tensor, partial: bool) -> tuple[dict, torch.Tensor]:
    print("\n== 5. 只保存适配器，重新加载，合并进权重，再拆分 ==")
    path = output_dir(a.out_dir) / "adapter.safetensors"
    path = partial_path(path) if partial else path          # 没训练完的适配器不覆盖上次训练完的那份
    save_adapter(model, path, meta)
    ad_mb = path.stat().st_size / 2**20
    base_mb = sum(p.numel() * 4 for n, p in model.named_parameters() if not p.requires_grad) / 2**20
    print(f"适配器 {path}：{ad_mb:.2f} MB；完整模型 fp32 权重 {base_mb:.0f} MB（{base_mb / ad_mb:.0f} 倍）")
    with torch.no_grad():
        ref = model(probe)                                   # 训练结束时的输出，重新加载后要逐位相同
    return {"path": path, "mb": ad_mb, "full_model_fp32_mb": base_mb}, ref


def step_reload_merge_unmerge(a, base, path: Path, probe: torch.Tensor, ref: torch.Tensor) -> tuple[bool, dict]:
    model = copy.deepcopy(base)                              # 一个全新的原模型副本 + 文件里的 A、B
    inject_lora(model, a.targets, a.rank, a.alpha)
    load_adapter(model, path)
    model.eval()
    reload_equal, reloaded = check_reload_equal(model, probe, ref)
    merge = {**check_merge(model, probe, reloaded), **check_unmerge(model, base)}
    print(f"重新加载后输出与训练时逐位相同：{reload_equal}")
    why = "不是 0 只因浮点求和顺序不同" if merge["max_abs_logit_diff"] > 0 else "这次恰好是 0"
    print(f"合并 W' = W + (alpha/r)·B·A 后：logits 最大绝对差 {merge['max_abs_logit_diff']:.2e}（容差 "
          f"{merge['tolerance']:.1e} = 1e-4×最大|logit|；{why}），每个位置的 argmax 相同：{merge['argmax_equal']}")
    err = merge["arithmetic_unmerge_max_err"]
    print(f"拆分：从合并前保存的副本恢复，与原模型权重逐位相同：{merge['unmerge_bitwise_restored']}"
          f"（若用 W' - ΔW 计算，最大误差 {err:.1e}，{'不是逐位相同' if err > 0 else '这次恰好也逐位相同'}）")
    require(reload_equal, "从文件重新加载的适配器，输出与训练结束时不是逐位相同（保存或加载丢了东西）。")
    require(merge["max_abs_logit_diff"] < merge["tolerance"],
            f"合并后 logits 最大差 {merge['max_abs_logit_diff']:.2e} 超过容差 {merge['tolerance']:.1e}（ΔW 算错了）。")
    require(merge["unmerge_bitwise_restored"], "拆分后的权重与原模型不是逐位相同。")
    return reload_equal, merge


def compare_run(a, base, kind: str, train_data: list) -> dict:
    """从原模型出发训练 --full-ft 步（kind = lora 或 full），测时间、数内存。"""
    m = copy.deepcopy(base)
    if kind == "lora":
        inject_lora(m, a.targets, a.rank, a.alpha, a.dropout)
    else:
        m.requires_grad_(True)                               # 全部参数都要训练
    m.train()
    ps = [p for p in m.parameters() if p.requires_grad]
    if m.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r = train(m, ps, train_data, steps=a.full_ft, lr=a.lr if kind == "lora" else a.full_ft_lr,
              batch_size=a.batch_size, seed=a.seed, desc="LoRA" if kind == "lora" else "全参数")
    mem = memory_report(m, ps, r["optimizer_state_bytes"], train_data[:a.batch_size])
    mem.update(step_time=median_step(r["step_times"]), step_cpu_time=median_step(r["step_cpu_times"]),
               peak_rss_mb=peak_rss_mb())
    if m.device.type == "cuda":
        mem["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {"losses": r["losses"], "step_times": r["step_times"], "step_cpu_times": r["step_cpu_times"],
            "warmup_steps": r["warmup_steps"], **mem}


def compare_table(rows: list[tuple[str, str]], lv: dict, fv: dict) -> str:
    """LoRA vs 全参数：每个量一行（按终端显示宽度对齐：汉字占两格，中文终端里列也是齐的）。"""
    return table([["", "LoRA", "全参数", "全参数/LoRA"]]
                 + [[label, f"{lv[key]:.3f}", f"{fv[key]:.3f}", f"{fv[key] / lv[key]:.1f}x" if lv[key] else "—"]
                    for label, key in rows])


def step_compare(a, base, train_data: list) -> dict:
    print(f"\n== 6. 对比：从原模型出发，LoRA（lr {a.lr:g}）和全参数微调（lr {a.full_ft_lr:g}）各训练 {a.full_ft} 步，"
          f"用同样的 batch，紧挨着测速度和内存 ==")
    side = {kind: compare_run(a, base, kind, train_data) for kind in ("lora", "full")}
    print("\n== 7. LoRA vs 全参数微调（本次运行实测）==")
    rows = [("每步墙钟时间（中位数，秒）", "step_time"), ("每步 CPU 时间（中位数，秒）", "step_cpu_time"),
            ("可训练参数 (MB)", "trainable_mb"), ("梯度 (MB)", "grads_mb"), ("AdamW 状态 (MB)", "optimizer_state_mb"),
            ("激活值（为反向保存的，MB）", "activations_mb"), ("合计：权重+梯度+状态+激活 (MB)", "total_mb")]
    if "cuda_peak_mb" in side["lora"]:
        rows.append(("GPU 显存峰值 (MB)", "cuda_peak_mb"))
    lv, fv = side["lora"], side["full"]
    side["ratios_full_over_lora"] = {key: fv[key] / lv[key] if lv[key] else None for _, key in rows}
    print(compare_table(rows, lv, fv))
    if lv["peak_rss_mb"]:
        print(f"进程内存高水位（resource.ru_maxrss，只升不降）：LoRA 对比后 {lv['peak_rss_mb']:.0f} MB → "
              f"全参数对比后 {fv['peak_rss_mb']:.0f} MB")
    print(f"这 {a.full_ft} 步的训练 loss：LoRA {[round(x, 3) for x in lv['losses']]}，"
          f"全参数 {[round(x, 3) for x in fv['losses']]}")
    if busy := machine_busy():
        print(f"⚠ 测量时机器正忙（1 分钟平均负载 {busy[0]:.1f} ≥ {busy[1]} 个核）：下面关于时间的结论不可靠。")
    side["interpretation"] = timing_sentences(lv, fv, a.full_ft, len(base.layers)) + [memory_sentence(lv, fv)]
    print("\n".join(side["interpretation"]))
    return side


MIN_COMPARE_STEPS = 5   # 对比只跑了几步时，两条 loss 曲线说明不了任何事（--quick 只有 2 步）：不画右图


def plot_losses(main_run: dict, side: dict | None, path: Path) -> tuple[Path, str]:
    """左：本课的 LoRA 训练；右：LoRA 与全参数微调，同样的 batch、同样的学习率计划（只比较同类）。对数纵轴。
    对比少于 MIN_COMPARE_STEPS 步时只画左图。返回 (图的路径, 一句说明右图为什么没有画；画了就是空字符串)。"""
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator
    note = ""
    if side and len(side["lora"]["losses"]) < MIN_COMPARE_STEPS:
        note = (f"（对比只跑了 {len(side['lora']['losses'])} 步：这么少的步数里两条 loss 曲线的高低只是噪声，"
                f"所以图里不画对比；对比看的是上面的速度和内存表。至少 {MIN_COMPARE_STEPS} 步（--full-ft）才画。）")
        side = None
    fig, axes = new_figure(ncols=2 if side else 1, size=(13.5, 4.4) if side else (7.5, 4.4))
    axes = list(axes) if side else [axes]
    colours = {"LoRA": "C0", "full fine-tuning": "C1"}      # 两个面板里同一种颜色 = 同一种训练
    runs = [[("LoRA", "-", main_run["losses"])]]
    if side:
        runs.append([("LoRA", "o-", side["lora"]["losses"]), ("full fine-tuning", "s-", side["full"]["losses"])])
    warm = [main_run["warmup_steps"]] + ([side["lora"]["warmup_steps"]] if side else [])
    titles = ["LoRA training", "LoRA vs full FT: same batches, same schedule"]
    for ax, lines, w, title in zip(axes, runs, warm, titles):
        for label, style, ys in lines:
            ax.plot(range(1, len(ys) + 1), ys, style, label=label, color=colours[label])
        ys = [y for _, _, v in lines for y in v]
        ax.set_title(f"{title} ({len(lines[0][2])} steps, {f'{w}-step warmup' if w > 1 else 'no warmup'})", fontsize=10)
        ax.set_yscale("log")
        if max(ys) < 10 * min(ys):                          # less than a decade: label the ticks plainly
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="training step", ylabel="answer-token loss (log scale)")
        ax.grid(alpha=0.3, which="both")
    legend_outside(axes[-1])
    return save_figure(fig, path), note


# 命令行参数与 main
def parse_args(argv=None) -> argparse.Namespace:
    p = course_parser(NAME, __doc__, groups=("model",))     # LoRA 用 fp32 训练，没有 --dtype
    g = p.add_argument_group("LoRA 与训练")
    g.add_argument("--rank", type=positive_int, default=8, help="LoRA 的秩 r")
    g.add_argument("--alpha", type=positive_float, default=16.0, help="缩放 alpha，实际缩放 = alpha/r")
    g.add_argument("--targets", type=parse_targets, default="q,k,v,o",
                   help="注入到哪些线性层：q,k,v,o,gate,up,down 的逗号组合，或 attn/mlp/all")
    g.add_argument("--dropout", type=fraction, default=0.0, help="LoRA 分支输入的 dropout，0 ≤ p < 1（默认 0）")
    g.add_argument("--lr", type=positive_float, default=2e-3, help="LoRA 学习率")
    add_knob(g, "--steps", type=positive_int, default=80, quick=8, help="训练多少步")
    add_knob(g, "--time-budget", type=positive_float, default=30.0, quick=3.0,
             help="训练时间的保险上限，分钟：到点提前停下，并明确告诉你结果因此不完整")
    add_knob(g, "--batch-size", type=positive_int, default=8, quick=2, help="每步几条样本")
    g.add_argument("--max-len", type=positive_int, default=256, help="超过这个 token 数（≥ 8）的训练样本会被跳过")
    d = p.add_argument_group("数据与评估")
    d.add_argument("--data", type=existing_file, default=str(DATA_DIR / "train.json"),
                   help="训练数据：instruction/input/output 的 JSON 列表（默认 data/lora/train.json）")
    d.add_argument("--eval-data", type=existing_file, default=str(DATA_DIR / "eval.json"),
                   help="留出评估数据，同样格式（默认 data/lora/eval.json）")
    add_knob(d, "--eval-n", type=non_negative_int, default=0, quick=8, help="评估用多少条留出样本（0 = 全部）")
    add_max_new_tokens(d, 16, "评估时每条最多生成多少个新 token")
    c = p.add_argument_group("对比全参数微调")
    add_knob(c, "--full-ft", type=non_negative_int, default=4, quick=2, metavar="N",
             help="再做 N 步全参数微调，对比速度与内存（0 = 不做）")
    c.add_argument("--full-ft-lr", type=positive_float, default=2e-5, help="全参数微调的学习率")
    a = p.parse_args(argv)
    if a.max_len < 8:
        p.error(f"--max-len 须 ≥ 8（收到 {a.max_len}）")
    return a


def main(argv=None):
    a = parse_args(argv)
    train_rows, eval_rows = load_examples(a.data), load_examples(a.eval_data)   # 先检查数据，再加载模型
    eval_rows = eval_rows[:a.eval_n] if a.eval_n else eval_rows
    t_run, c_run = time.perf_counter(), time.process_time()
    lm, threads = step_load_model(a)
    tok = lm.tokenizer
    train_data, eval_data = step_data(a, tok, train_rows, eval_rows)

    print("\n== 1. 训练前：原模型（零样本）在留出集上的表现 ==")
    intents = intent_set(train_rows + eval_rows)             # 标签集合：数据里出现过的意图
    zero = score(lm.model, tok, eval_rows, a.max_new_tokens, "零样本", intents)
    loss_before = heldout_loss(lm.model, eval_data)

    model, rep, arith = step_inject(a, lm)
    meta = {"rank": a.rank, "alpha": a.alpha, "targets": a.targets, "base": lm.name}
    lora_run, loss_after = step_train(a, model, train_data, eval_data, loss_before, meta)
    after = step_after(a, model, tok, eval_rows, zero, intents)

    probe = collate([(prompt_ids(tok, ex), []) for ex in eval_rows[:4]], 0)[0].to(model.device)
    partial = lora_run["cut_by_time_budget"]                # 被时间上限截断：这次的产物都是"没做完的"
    adapter, ref = step_save_adapter(a, model, meta, probe, partial)
    del model                                                # 从文件重新加载，证明文件里就是全部的训练成果
    adapter["reload_bitwise_equal"], merge = step_reload_merge_unmerge(a, lm.model, adapter["path"], probe, ref)

    side = step_compare(a, lm.model, train_data) if a.full_ft else None

    png = output_dir(a.out_dir) / "loss_curve.png"
    png, note = plot_losses(lora_run, side, partial_path(png) if partial else png)
    print(f"\nloss 曲线：{png}{note}")
    total_s, cpu_s = time.perf_counter() - t_run, time.process_time() - c_run
    res = {"config": vars(a), "device": str(lm.model.device), "threads": threads,
           "n_train": len(train_data), "n_eval": len(eval_rows), "params": rep, "arithmetic": arith,
           "zero_shot": zero, "after_lora": after, "heldout_loss": {"before": loss_before, "after": loss_after},
           "lora_train": {**lora_run, "median_step_s": median_step(lora_run["step_times"]),
                          "median_step_cpu_s": median_step(lora_run["step_cpu_times"])},
           "training_cut_short": lora_run["cut_by_time_budget"], "comparison": side, "adapter": adapter, "merge": merge,
           "loss_fell": loss_after < loss_before, "total_seconds": total_s, "total_cpu_seconds": cpu_s}
    saved = save_results(a.out_dir, res, files=[png, adapter["path"]], partial=partial,
                         may_write=["loss_curve.png", "adapter.safetensors"])
    print(f"结果：{saved}（总用时 {total_s:.0f} 秒，本进程 CPU 时间 {cpu_s:.0f} 秒）")
    za, aa = zero["intent_accuracy"], after["intent_accuracy"]
    if za is not None:
        print(f"\n小结：意图准确率 {za:.1%} → {aa:.1%}；格式正确 {zero['format_ok']:.1%} → {after['format_ok']:.1%}；"
              f"只训练了 {rep['trainable_pct']:.2f}% 的参数。")
    if lora_run["cut_by_time_budget"]:
        print(cap_warning(lora_run, "上面"))


if __name__ == "__main__":
    run_cli(main)
