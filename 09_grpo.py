"""第 09 课：用可验证的奖励做强化学习——手写 GRPO（DeepSeekMath / DeepSeek-R1 的做法），在 CPU 上训练 SmolLM2-135M-Instruct

你将学到：
  1. 奖励就是程序：任务 A 用第 08 课的检查器（简洁回答 + 一个简短追问），任务 B 是两位数加减法（答案唯一，
     格式 "88 - 69 = <数字>"），奖励 = 格式 + 正确；训练时不需要任何示范回答，也不需要偏好对；
  2. GRPO：每个问题采样一组 G 个回答，优势 = (奖励 − 组内平均) / (组内标准差 + ε)，全组奖励相同的组优势为 0；
     只在回答 token 上算带裁剪比值的策略梯度损失，再加 β × KL(策略 ‖ 参考)（k3 估计）；
     参考模型 = 同一个模型把 LoRA 适配器关掉（和第 08 课一样）；
  3. 每一步该看什么：平均奖励、通过率、优势为 0 的组占比、KL、平均回答长度、熵；
  4. 比较：任务 A 留出问题上 基座 / SFT（第 08 课的做法，同样步数）/ GRPO（零示范）；任务 B 基座 vs GRPO；
  5. 时间花在哪：采样（生成）、打分、反向传播各用多少秒。

本地模型只懂英文，所以提示都是英文的（data/dpo/ 和 data/grpo/）。
用时（2 核 CPU，见 docs/09_grpo.md）：--quick 约半分钟；默认约 11 分钟。

常用命令：
  python 09_grpo.py --quick                  # 快速体验：每个任务训练几步
  python 09_grpo.py                          # 完整一课：任务 A（基座/SFT/GRPO）+ 任务 B（基座/GRPO）
  python 09_grpo.py --beta 0 --loose-reward  # 不要 KL、奖励只看格式——看奖励被"钻空子"（例子和中性困惑度）
"""
from __future__ import annotations

import copy
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import add_knob, course_parser, non_negative_float, positive_float, positive_int, setup_run
from common.display import table
from common.errors import UserError, read_json, require, run_cli
from common.generate import generate_batch
from common.lora import adapters_disabled, inject_lora, save_adapter
from common.outputs import REPO_ROOT, output_dir, save_results
from common.plots import legend_outside, new_figure, save_figure
from common.preference import ECHO_RULES, PASS, judge, neutral_perplexity, response_logits, sample_k
from common.training import train_record, training_facts

NAME = "09_grpo"
DATA_A, DATA_B = REPO_ROOT / "data" / "dpo", REPO_ROOT / "data" / "grpo"
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]   # 和第 08 课一样：LoRA 注入全部 7 种线性层
ALPHA_OVER_RANK = 2.0
METRICS = ["reward", "pass_rate", "zero_adv_frac", "kl", "length", "entropy"]


# ---------------------------------------------------------------------------
# 1. 奖励就是程序
# ---------------------------------------------------------------------------
def reward_a(tok, prompt: str, ids: list[int], max_new: int, loose: bool = False) -> tuple[float, bool, str]:
    """任务 A：检查器通过 = 1。基座模型几乎从不通过（采样的回答都写满 max_new 个 token），全组奖励都是 0 就学不到东西，
    所以不通过时按检查器的几个部分给"部分分"（最多 0.3）：第一句越短越好（长度）、写完了（在 max_new 之内停下）、
    以一个问号结尾（追问）。loose=True：只看格式，两条防复述规则不算（会被钻空子）。
    返回 (奖励, 检查器是否通过, 原因)；报告的通过率永远是检查器的二值判断。"""
    ok, why, text = judge(tok, prompt, ids, max_new)
    if ok or (loose and why in ECHO_RULES):
        return 1.0, ok, why
    first = re.split(r"(?<=[.!?])\s+", text)[0]
    short = max(0.0, 1 - len(first.split()) / 30)
    finished = len(ids) < max_new
    ends_q = finished and text.endswith("?") and text.count("?") == 1
    return 0.1 * short + 0.1 * finished + 0.1 * ends_q, False, why


def reward_b(row: dict, text: str, loose: bool = False) -> tuple[float, bool, str]:
    """任务 B：奖励 = 格式 + 正确。格式：整段就是算式 "<a> <运算> <b> = <整数>"（题目里的两个数）得 0.5，
    回答里含有这个算式但还有别的话得 0.25；正确：回答里最后一个整数等于答案得 1.0。
    loose=True：只看格式，数字对不对不给分（会被钻空子）。返回 (奖励, 是否答对, 原因)；"答对"要求格式和数字都对。"""
    eq = re.compile(rf"{row['a']}\s*{re.escape(row['op'])}\s*{row['b']}\s*=\s*(-?\d+)\.?")
    strict = eq.fullmatch(text.strip())
    fmt = 0.5 if strict else 0.25 * bool(eq.search(text))
    right = lenient_correct(row, text)
    why = PASS if strict and right else "格式对，数字错" if strict else "数字对，格式不对" if right else "格式和数字都不对"
    return fmt + (0.0 if loose else 1.0 * right), bool(strict and right), why


def lenient_correct(row: dict, text: str) -> bool:
    """宽松的判对：回答里最后一个整数等于答案（不管格式）。用来区分"不会按格式写"和"不会算"。"""
    nums = re.findall(r"-?\d+", text)
    return bool(nums) and int(nums[-1]) == row["answer"]


# ---------------------------------------------------------------------------
# 2. GRPO 的三个公式（Shao et al. 2024, DeepSeekMath）
# ---------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G]（P 个问题，每个 G 个回答）→ Â_i = (r_i − mean(r)) / (std(r) + ε)，组内计算。
    全组奖励相同（std = 0）：这一组什么也学不到，优势恰好是 0。"""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, unbiased=False, keepdim=True)
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """每个 token 的 KL 估计 k3 = r − 1 − log r，r = π_ref / π_θ。r − 1 − log r ≥ 0 恒成立，r = 1 时恰好为 0。"""
    log_r = ref_logp - logp
    return log_r.exp() - 1 - log_r


def grpo_token_loss(logp, old_logp, ref_logp, adv, beta: float, clip: float):
    """每个回答 token 的损失：−min(ρ·Â, clip(ρ, 1−ε, 1+ε)·Â) + β·k3，ρ = π_θ / π_old。
    本课每批样本只做一步梯度，π_old 就是采样时的策略 = 现在的 π_θ，所以 ρ 的值恰好是 1、裁剪不起作用；
    但 ρ 的梯度 = ∇log π_θ，损失的梯度正是策略梯度 −Â·∇log π_θ。同一批样本多走几步时裁剪才起作用。"""
    ratio = (logp - old_logp).exp()
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = k3_kl(logp, ref_logp)
    return pg + beta * kl, kl


def token_logprobs(model, prompts, responses):
    """回答 token 的 log π(y_t | x, y_<t)、每个位置的熵、以及每个 token 属于第几行（提示和 padding 不算）。"""
    logits, targets, rows = response_logits(model, prompts, responses)
    logq = logits.log_softmax(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    return logq.gather(-1, targets[:, None])[:, 0], entropy, rows


# ---------------------------------------------------------------------------
# 3. 一步 GRPO：采样一组 → 打分 → 组内优势 → 一步梯度
# ---------------------------------------------------------------------------
def grpo_step(model, opt, prompts: list[list[int]], score, a, seed: int, stop_ids, end_id: int) -> dict:
    """score(i, ids) → (奖励, 是否通过, 是否"钻空子")，i 是第几个问题。"钻空子" = 宽松奖励给了满分、检查器却判不通过。
    返回这一步要看的数、三段用时（秒）、以及最多 2 个钻空子的采样 (第几个问题, ids, 奖励)。"""
    t0 = time.perf_counter()
    samples = sample_k(model, prompts, a.group, a.max_new_tokens, temperature=a.temperature, seed=seed,
                       stop_ids=stop_ids, batch=a.gen_batch)
    t1 = time.perf_counter()
    scored = [[score(i, o) for o in outs] for i, outs in enumerate(samples)]
    rewards = torch.tensor([[s[0] for s in row] for row in scored])
    adv = group_advantages(rewards)
    t2 = time.perf_counter()
    live = [(i, j) for i in range(len(prompts)) for j in range(a.group) if adv[i].abs().sum() > 0]
    flat = [(i, o, s) for i, outs in enumerate(samples) for o, s in zip(outs, scored[i])]
    st = {"reward": rewards.mean().item(), "pass_rate": sum(s[1] for *_, s in flat) / rewards.numel(),
          "gamed": sum(s[2] for *_, s in flat) / rewards.numel(), "hacks": [(i, o, s[0]) for i, o, s in flat if s[2]][:2],
          "zero_adv_frac": 1 - len({i for i, _ in live}) / len(prompts),
          "length": sum(len(o) for outs in samples for o in outs) / rewards.numel(), "kl": None, "entropy": None,
          "loss": 0.0}            # kl / entropy 只在有梯度的步上算：None = 这一步跳过了
    if live:                       # 全部组的优势都是 0：没有梯度，这一步跳过（只花了采样的时间）
        p = [prompts[i] for i, _ in live]
        r = [samples[i][j] + ([end_id] if len(samples[i][j]) < a.max_new_tokens else []) for i, j in live]
        logp, ent, rows = token_logprobs(model, p, r)
        with torch.no_grad(), adapters_disabled(model):
            ref_logp = token_logprobs(model, p, r)[0]
        adv_tok = torch.tensor([adv[i, j].item() for i, j in live])[rows]
        loss_tok, kl = grpo_token_loss(logp, logp.detach(), ref_logp, adv_tok, a.beta, a.clip)
        loss = loss_tok.mean()     # 对这一批所有回答 token 取平均（token 级）
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        opt.step()
        st.update(loss=loss.item(), kl=kl.mean().item(), entropy=ent.mean().item())
    st.update(t_generate=t1 - t0, t_score=t2 - t1, t_backward=time.perf_counter() - t2)
    st["examples"] = [(0, o, rewards[0, j].item(), adv[0, j].item()) for j, o in enumerate(samples[0])]   # 第 1 组
    return st


def fresh_policy(base, a):
    model = copy.deepcopy(base)
    torch.manual_seed(a.seed)
    inject_lora(model, TARGETS, a.rank, a.rank * ALPHA_OVER_RANK)
    return model


def prompt_order(n: int, steps: int, per_step: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(steps * per_step // n + 1)]).tolist()


def train_grpo(model, prompts: list[list[int]], make_score, a, label: str, path: Path) -> dict:
    """固定步数的 GRPO；make_score(idx) 返回这一批问题的打分函数。记录每一步的指标和三段用时。"""
    from tqdm import tqdm
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    order = prompt_order(len(prompts), a.steps, a.prompts_per_step, a.seed)
    hist = {k: [] for k in METRICS + ["gamed", "t_generate", "t_score", "t_backward"]}
    losses, first, t0, cut, hacks = [], None, time.perf_counter(), False, []
    bar = tqdm(range(a.steps), desc=label, ncols=90, file=sys.stdout)
    for step in bar:
        idx = order[step * a.prompts_per_step:(step + 1) * a.prompts_per_step]
        st = grpo_step(model, opt, [prompts[i] for i in idx], make_score(idx), a, a.seed + 1000 * step,
                       a.stop_ids, a.end_id)
        if first is None:            # 第 1 步：适配器的 B = 0，策略和参考逐位相同，KL 必须恰好是 0
            require(st["kl"] in (0.0, None), f"第 1 步的 KL 应恰好为 0（策略 = 参考），实际 {st['kl']}：参考模型不是关掉适配器的同一个模型？")
            first = {**st, "idx": idx}
        losses.append(st["loss"])
        hacks += [(step + 1, idx[i], ids, r) for i, ids, r in st["hacks"]]
        for k in hist:
            hist[k].append(st[k])
        bar.set_postfix(reward=f"{st['reward']:.2f}", passed=f"{st['pass_rate']:.2f}")
        if time.perf_counter() - t0 > a.time_budget * 60 and step + 1 < a.steps:
            cut = True
            break
    bar.close()
    save_adapter(model, path, {"rank": a.rank, "alpha": a.rank * ALPHA_OVER_RANK, "targets": TARGETS, "run": label})
    if cut:
        print(f"  ！！！注意：到达时间预算 {a.time_budget:g} 分钟，{label} 只训练了 {len(losses)}/{a.steps} 步。")
    rec = train_record(losses, a.steps, cut, time.perf_counter() - t0, sum(p.numel() for p in params), history=hist)
    rec["time_split"] = {k: sum(hist[k]) for k in ("t_generate", "t_score", "t_backward")}
    rec["hacks"] = hacks[-6:]          # 最后几个"钻空子"的采样：(第几步, 第几个训练问题, ids, 奖励)
    return rec, first


def train_sft(model, enc: list[tuple], a, path: Path) -> dict:
    """第 08 课的 SFT：只在示范回答（chosen）上算平均负对数似然；步数与 GRPO 相同，每步 --prompts-per-step 条。"""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    order = prompt_order(len(enc), a.steps, a.prompts_per_step, a.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(a.steps):
        idx = order[step * a.prompts_per_step:(step + 1) * a.prompts_per_step]
        for grp in opt.param_groups:
            grp["lr"] = a.lr * min(1.0, (step + 1) / 5)
        logits, targets, _ = response_logits(model, [enc[i][0] for i in idx], [enc[i][1] for i in idx])
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    save_adapter(model, path, {"rank": a.rank, "alpha": a.rank * ALPHA_OVER_RANK, "targets": TARGETS, "run": "sft"})
    return train_record(losses, a.steps, False, time.perf_counter() - t0, sum(p.numel() for p in params))


# ---------------------------------------------------------------------------
# 4. 评估（贪心解码，留出问题）
# ---------------------------------------------------------------------------
def greedy(model, prompts, a, max_new: int) -> list[list[int]]:
    outs = []
    for i in range(0, len(prompts), a.gen_batch):
        outs += generate_batch(model, prompts[i:i + a.gen_batch], max_new, stop_ids=a.stop_ids)
    return outs


def eval_a(model, tok, rows, prompts, a) -> dict:
    judged = [judge(tok, r["prompt"], o, a.max_new_tokens) for r, o in zip(rows, greedy(model, prompts, a, a.max_new_tokens))]
    reasons, texts = [j[1] for j in judged], [j[2] for j in judged]
    return {"pass_rate": reasons.count(PASS) / len(rows), "n": len(rows), "outputs": texts, "reasons": reasons,
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "reason_counts": {r: reasons.count(r) for r in dict.fromkeys(reasons)}}


def eval_b(model, tok, rows, prompts, a) -> dict:
    texts = [tok.decode(o).strip() for o in greedy(model, prompts, a, a.max_new_b)]
    judged = [reward_b(r, t) for r, t in zip(rows, texts)]
    return {"accuracy": sum(j[1] for j in judged) / len(rows), "n": len(rows), "outputs": texts,
            "format_rate": sum(j[2] in (PASS, "格式对，数字错") for j in judged) / len(rows),
            "lenient_accuracy": sum(lenient_correct(r, t) for r, t in zip(rows, texts)) / len(rows)}


def evaluate(model, tok, data, a, label: str, tasks="AB") -> dict:
    t0 = time.perf_counter()
    m = {"label": label, "neutral_ppl": neutral_perplexity(model, tok)}
    if "A" in tasks:
        m["A"] = eval_a(model, tok, data["held_a"], data["held_a_ids"], a)
    if "B" in tasks:
        m["B"] = eval_b(model, tok, data["held_b"], data["held_b_ids"], a)
    parts = [f"任务 A 通过率 {m['A']['pass_rate']:.1%}（{m['A']['mean_words']:.1f} 词）" if "A" in m else "",
             f"任务 B 准确率 {m['B']['accuracy']:.1%}（格式对 {m['B']['format_rate']:.0%}，宽松判对 "
             f"{m['B']['lenient_accuracy']:.0%}）" if "B" in m else ""]
    print(f"  [{label}] {'，'.join(p for p in parts if p)}；中性困惑度 {m['neutral_ppl']:.2f}"
          f"（评估 {time.perf_counter() - t0:.0f} 秒）")
    return m


# ---------------------------------------------------------------------------
# 5. 三次训练：任务 A 的 SFT 和 GRPO，任务 B 的 GRPO
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    p = course_parser(NAME, __doc__, groups=("device",))
    g = p.add_argument_group("本课参数")
    add_knob(g, "--steps", type=positive_int, default=16, quick=2, help="任务 A 的训练步数（SFT 和 GRPO 一样多）")
    add_knob(g, "--steps-b", type=positive_int, default=32, quick=2, help="任务 B 的 GRPO 步数（回答很短，每步便宜）")
    add_knob(g, "--group", type=positive_int, default=6, quick=4, help="GRPO 的组大小 G：每个问题采样几个回答")
    add_knob(g, "--prompts-per-step", type=positive_int, default=4, quick=1,
             help="每步几个问题（GRPO 每步 = 这么多问题 × G 个回答；SFT 每步 = 这么多条示范）")
    g.add_argument("--temperature", type=positive_float, default=0.8, help="GRPO 采样温度（和第 08 课在线采样一样）")
    g.add_argument("--beta", type=non_negative_float, default=0.04, help="KL 惩罚的权重 β（DeepSeekMath 用 0.04；0 = 不要 KL）")
    g.add_argument("--clip", type=positive_float, default=0.2, help="PPO 式裁剪的 ε")
    g.add_argument("--lr", type=positive_float, default=3e-4, help="LoRA 学习率（SFT 和 GRPO 用同一个）")
    g.add_argument("--rank", type=positive_int, default=8, help="LoRA 的秩 r（alpha = 2r）")
    g.add_argument("--loose-reward", action="store_true", help="奖励只看格式：任务 A 不管复述，任务 B 不管数字对不对（演示奖励被钻空子）")
    add_knob(g, "--eval-n", type=positive_int, default=64, quick=4, help="每个任务用几条留出问题评估")
    add_knob(g, "--time-budget", type=positive_float, default=8.0, quick=1.0, help="每次训练的时间上限（分钟），只是安全上限")
    add_knob(p, "--max-new-tokens", type=positive_int, default=48, quick=32,
             help="任务 A 每条回答最多生成多少个新 token（任务 B 固定 12 个）")
    a = p.parse_args(argv)
    a.gen_batch, a.max_new_b = 64, 12
    return a


def load_data(tok, a) -> dict:
    (train_a, held_a), (train_b, held_b) = [
        [read_json(d / f, f"任务 {t} 数据", f"请先运行 python {gen}。") for f in ("train.json", "heldout.json")]
        for d, t, gen in ((DATA_A, "A", "data/dpo/make_dataset.py"), (DATA_B, "B", "data/grpo/make_problems.py"))]
    if {r["prompt"] for r in train_a} & {r["prompt"] for r in held_a} or \
            {r["prompt"] for r in train_b} & {r["prompt"] for r in held_b}:
        raise UserError("训练问题和留出问题有重复：留出评估就不公平了。")
    enc = lambda r: tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], default_system=False)
    held_a, held_b = held_a[:a.eval_n], held_b[:a.eval_n]
    return {"train_a": train_a, "train_b": train_b, "held_a": held_a, "held_b": held_b,
            "train_a_ids": [enc(r) for r in train_a], "train_b_ids": [enc(r) for r in train_b],
            "held_a_ids": [enc(r) for r in held_a], "held_b_ids": [enc(r) for r in held_b],
            "sft": [(enc(r), tok.encode(r["chosen"]) + [tok.im_end]) for r in train_a]}


def with_gamed(res: tuple, full: float) -> tuple[float, bool, bool]:
    """(奖励, 是否通过, 原因) → (奖励, 是否通过, 是否钻空子)：没通过检查器，却拿到了通过才有的奖励 full。"""
    r, ok, _ = res
    return r, ok, not ok and r >= full


def grpo_run(base, tok, data, a, rows, ids, score, task: str, path: Path) -> dict:
    """一次 GRPO：训练 → 第 1 步的采样 → 留出评估。score(row, ids) → (奖励, 是否通过, 是否钻空子)。
    第 1 步时适配器的 B = 0，策略就是基座：这一步的采样就是"基座模型采样时多常通过"。"""
    pol = fresh_policy(base, a)
    tr, first = train_grpo(pol, ids, lambda idx: lambda i, o: score(rows[idx[i]], o), a, f"GRPO-{task}", path)
    print(training_facts(tr))
    print(f"  第 1 步（策略 = 基座）：采样回答的平均奖励 {first['reward']:.2f}，通过率 {first['pass_rate']:.1%}，"
          f"优势全为 0 的组 {first['zero_adv_frac']:.0%}。一组里的几个回答：")
    for i, o, r, adv in first["examples"][:4]:
        print(f"    奖励 {r:.2f} 优势 {adv:+.2f}：{tok.decode(o).strip()!r}")
    hacks = [{"step": s, "prompt": rows[i]["prompt"], "answer": tok.decode(o).strip(), "reward": r}
             for s, i, o, r in tr.pop("hacks")]
    return {**evaluate(pol, tok, data, a, f"GRPO 任务 {task}", task), "train": tr, "hacks": hacks,
            "base_sampled": {k: first[k] for k in ("reward", "pass_rate", "zero_adv_frac")}}


def run_task_a(base, tok, data, a, stage: Path, runs: dict) -> None:
    print(f"\n== 2. 任务 A：SFT（{a.steps} 步 × {a.prompts_per_step} 条示范）vs GRPO（{a.steps} 步 × "
          f"{a.prompts_per_step} 题 × G={a.group}，零示范）==")
    sft = fresh_policy(base, a)
    tr = train_sft(sft, data["sft"], a, stage / "adapter_sft.safetensors")
    print(training_facts(tr))
    runs["sft"] = {**evaluate(sft, tok, data, a, "SFT", "A"), "train": tr}
    del sft
    score = lambda row, o: with_gamed(reward_a(tok, row["prompt"], o, a.max_new_tokens, a.loose_reward), 1.0)
    runs["grpo_a"] = grpo_run(base, tok, data, a, data["train_a"], data["train_a_ids"], score, "A",
                              stage / "adapter_grpo_a.safetensors")


def run_task_b(base, tok, data, a, stage: Path, runs: dict) -> None:
    print(f"\n== 3. 任务 B：两位数加减法，GRPO {a.steps_b} 步 × {a.prompts_per_step} 题 × G={a.group} ==")
    full = 0.5 if a.loose_reward else 1.5          # 通过的回答能拿的奖励：宽松时只有格式分
    score = lambda row, o: with_gamed(reward_b(row, tok.decode(o).strip(), a.loose_reward), full)
    a_b = copy.copy(a)
    a_b.max_new_tokens, a_b.steps = a.max_new_b, a.steps_b
    runs["grpo_b"] = grpo_run(base, tok, data, a_b, data["train_b"], data["train_b_ids"], score, "B",
                              stage / "adapter_grpo_b.safetensors")


def main(argv=None):
    a = parse_args(argv)
    t_run = time.perf_counter()
    device = setup_run(a)
    torch.set_flush_denormal(True)
    out = output_dir(a.out_dir)
    stage = out / ".running"                 # 本次运行的文件先写在这里，整次跑完才换上去
    stage.mkdir(exist_ok=True)
    from common.local_model import load_local_model
    lm = load_local_model(dtype="fp32", device=device)
    base, tok = lm.model, lm.tokenizer
    a.stop_ids, a.end_id = tok.eos_ids, tok.im_end
    data = load_data(tok, a)
    print(f"模型：{lm.name}，设备 {device}，{torch.get_num_threads()} 个 CPU 线程。")
    print("\n== 1. 奖励就是程序；训练前先看基座模型 ==")
    print(f"任务 A：{len(data['train_a'])} 个训练问题（第 08 课的数据，只用问题，不用示范回答），"
          f"留出 {len(data['held_a'])} 个；奖励 = 检查器通过 1，否则按检查器的部分给部分分（≤ 0.3：第一句短、写完、以问号结尾）"
          f"{'；--loose-reward：只看格式' if a.loose_reward else ''}。")
    print(f"任务 B：{len(data['train_b'])} 道训练题，留出 {len(data['held_b'])} 道；"
          f"奖励 = 格式（整段是算式 \"a op b = <整数>\" 0.5，含有这个算式 0.25）+ 数字对 1.0"
          f"{'；--loose-reward：只看格式' if a.loose_reward else ''}。例子：{data['train_b'][0]['prompt']!r}")
    runs = {"base": evaluate(base, tok, data, a, "基座")}
    for i in range(2):
        print(f"    A：{data['held_a'][i]['prompt']!r} → {runs['base']['A']['outputs'][i]!r}"
              f"（{runs['base']['A']['reasons'][i]}）")
        print(f"    B：{data['held_b'][i]['prompt']!r} → {runs['base']['B']['outputs'][i]!r}")
    run_task_a(base, tok, data, a, stage, runs)
    run_task_b(base, tok, data, a, stage, runs)
    report(runs, data, a, stage, out, time.perf_counter() - t_run)


# ---------------------------------------------------------------------------
# 6. 汇总、图、results.json
# ---------------------------------------------------------------------------
def report(runs: dict, data: dict, a, stage: Path, out: Path, seconds: float) -> None:
    b, s, ga, gb = runs["base"], runs["sft"], runs["grpo_a"], runs["grpo_b"]
    print(f"\n== 4. 汇总（留出问题，贪心解码；任务 A {b['A']['n']} 题，任务 B {b['B']['n']} 题）==")
    echo = lambda m: "/".join(str(m["A"]["reason_counts"].get(x, 0)) for x in ECHO_RULES)
    print(table([["模型", "示范数据", "A 通过率", "A 平均词数", "复述/无内容", "中性困惑度"],
                 *[[n, d, f"{m['A']['pass_rate']:.1%}", f"{m['A']['mean_words']:.1f}", echo(m), f"{m['neutral_ppl']:.2f}"]
                   for n, d, m in (("基座", "-", b), ("SFT", f"{a.steps * a.prompts_per_step} 条", s), ("GRPO", "0 条", ga))]]))
    print(table([["模型", "B 准确率", "格式对", "宽松判对", "中性困惑度"],
                 *[[n, f"{m['B']['accuracy']:.1%}", f"{m['B']['format_rate']:.1%}", f"{m['B']['lenient_accuracy']:.1%}",
                    f"{m['neutral_ppl']:.2f}"] for n, m in (("基座", b), ("GRPO", gb))]]))
    print("（\"复述/无内容\" = 只看格式会通过、被检查器的两条防复述规则挡掉的回答数：奖励被钻空子时它会变大）")
    print("\n任务 B 训练前后（留出题）：")
    for i in range(min(3, b["B"]["n"])):
        print(f"  {data['held_b'][i]['prompt'].split('?')[0]}?（答案 {data['held_b'][i]['answer']}）"
              f" 基座 {b['B']['outputs'][i]!r} → GRPO {gb['B']['outputs'][i]!r}")
    print("\n时间花在哪（GRPO，秒）：")
    rows = [["任务", "采样（生成）", "打分", "反向传播", "采样占比"]]
    for key in ("grpo_a", "grpo_b"):
        t = runs[key]["train"]["time_split"]
        rows.append([key[-1].upper(), f"{t['t_generate']:.1f}", f"{t['t_score']:.2f}", f"{t['t_backward']:.1f}",
                     f"{t['t_generate'] / max(1e-9, sum(t.values())):.0%}"])
    print(table(rows))
    hacking = report_hacking(runs, a)
    files = [plot_training(runs, stage / "training.png").name] + [f.name for f in stage.glob("adapter_*.safetensors")]
    for name in files:
        (stage / name).replace(out / name)
    stage.rmdir()
    res = save_results(out, {
        "pass_rate": {"base": b["A"]["pass_rate"], "sft": s["A"]["pass_rate"], "grpo": ga["A"]["pass_rate"]},
        "accuracy": {"base": b["B"]["accuracy"], "grpo": gb["B"]["accuracy"]},
        "lenient_accuracy": {"base": b["B"]["lenient_accuracy"], "grpo": gb["B"]["lenient_accuracy"]},
        "neutral_ppl": {k: m["neutral_ppl"] for k, m in runs.items()},
        "time_split": {k: runs[k]["train"]["time_split"] for k in ("grpo_a", "grpo_b")},
        "reward_hacking": hacking, "runs": runs, "total_seconds": seconds}, run_args=a, files=files,
        may_write=["training.png", "adapter_sft.safetensors", "adapter_grpo_a.safetensors", "adapter_grpo_b.safetensors"])
    print(f"\n结果：{res}、{out / 'training.png'}（总用时 {seconds:.0f} 秒）")


def report_hacking(runs: dict, a) -> dict:
    """奖励被钻空子：训练时的采样里"拿到了通过才有的奖励、检查器却判不通过"的比例和例子；
    中性文本困惑度（和基座比）是护栏。只用严格奖励时这种采样按定义不存在（比例全是 0）。"""
    res, rows = {"loose_reward": a.loose_reward, "beta": a.beta}, [["任务", "钻空子的采样：第 1 步 → 最后 4 步",
                                                                  "留出：基座 → GRPO（检查器）", "中性困惑度（对基座）"]]
    for task, key, metric in (("A", "grpo_a", "pass_rate"), ("B", "grpo_b", "accuracy")):
        m, g = runs[key], runs[key]["train"]["history"]["gamed"]
        ppl = m["neutral_ppl"] / runs["base"]["neutral_ppl"] - 1
        res[task] = {"gamed_rate": g, "examples": m["hacks"], "neutral_ppl_change": ppl}
        rows.append([task, f"{g[0]:.0%} → {sum(g[-4:]) / len(g[-4:]):.0%}",
                     f"{runs['base'][task][metric]:.1%} → {m[task][metric]:.1%}", f"{m['neutral_ppl']:.2f}（{ppl:+.1%}）"])
    if a.loose_reward:
        print(f"\n奖励被钻空子（--loose-reward，β = {a.beta:g}）：宽松奖励给了满分、检查器判不通过的训练采样")
        print(table(rows))
        for task in "AB":
            for e in res[task]["examples"][-3:]:
                print(f"  {task} 第 {e['step']} 步 奖励 {e['reward']:.2f}：{e['prompt'].split('?')[0][:60]}? → {e['answer']!r}")
    return res


TITLES = {"reward": "mean reward of the samples", "pass_rate": "pass rate of the samples (dashed: gamed)",
          "zero_adv_frac": "groups with all-equal rewards (no signal)", "kl": "KL to reference (k3, per token)",
          "length": "mean response length (tokens)", "entropy": "entropy per response token (nats)"}


def plot_training(runs: dict, path: Path) -> Path:
    """六个面板，每一步的六个数；同一种颜色在每个面板里都是同一个任务。"""
    fig, ax = new_figure(ncols=3, nrows=2, size=(15, 8))
    for key, color, label in (("grpo_a", "tab:red", "task A (checker)"), ("grpo_b", "tab:blue", "task B (arithmetic)")):
        h = runs[key]["train"]["history"]
        for x, k in zip(ax.flat, METRICS):
            ys = [float("nan") if v is None else v for v in h[k]]      # None：这一步全部组优势为 0，没算
            x.plot(range(1, len(ys) + 1), ys, color=color, marker=".", label=label)
        if any(h["gamed"]):        # 钻空子的采样占比（虚线，画在通过率的面板上）
            ax.flat[1].plot(range(1, len(h["gamed"]) + 1), h["gamed"], color=color, ls="--", label=f"{label}: gamed")
    for x, k in zip(ax.flat, METRICS):
        x.set(xlabel="GRPO step", ylabel=k, title=TITLES[k])
        x.grid(alpha=0.3)
    legend_outside(ax.flat[-1])
    return save_figure(fig, path)


if __name__ == "__main__":
    run_cli(main)
