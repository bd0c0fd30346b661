"""第 08 课：对齐入门——SFT 之后做偏好优化（DPO），在 CPU 上训练真正的模型（SmolLM2-135M-Instruct）

你将学到：
  1. 偏好数据：同一个问题，一个"更好"（chosen）和一个"更差"（rejected）的回答；本课的偏好能用程序检查
     （简洁 ≤ 30 词，先回答、再以一个不复述问题的简短追问结尾：common/preference.py 的 check_answer）；
  2. 序列对数概率 log p(回答 | 问题)：只对回答 token 求和，带 padding 批量计算（common/preference.py）；
  3. 按公式手写 DPO 损失；参考模型 = 同一个模型把 LoRA 适配器关掉，不用第二份模型；
  4. 实验一（离线对）：基座 → SFT → 在数据集现成的偏好对上做 DPO——生成几乎不变，为什么；
  5. 实验二（在线对，on-policy）：SFT 之后让模型自己每题采样 k 个回答，用检查器打分，
     "通过的"当 chosen、"不通过的"当 rejected，再做 DPO（InstructGPT / Llama / Zephyr 的套路）；
  6. 等计算量的公平比较：基座、SFT、SFT 多训同样步数、SFT→离线 DPO、SFT→在线 DPO，
     看通过率、平均词数、中性文本困惑度、与基座的 KL、留出对的奖励准确率、用时（含采样）。

本地模型只懂英文，所以数据和提示都是英文的（data/dpo/）。检查器只用来造在线偏好对和评估，训练时模型看不到它。
用时（2 核 CPU，见 docs/08_dpo.md）：--quick 约 40 秒；默认约 7 分钟。
步数固定，--time-budget 只是每次训练的安全上限：被它截断时脚本会大声提示。

常用命令：
  python 08_dpo.py --quick                   # 快速体验：每段训练几步
  python 08_dpo.py                           # 完整一课：两个实验 + 汇总表
  python 08_dpo.py --k 8 --temperature 1.0   # 练习：每题多采样几个、温度更高
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import add_knob, course_parser, positive_float, positive_int, setup_run
from common.display import table
from common.errors import UserError, read_json, require, run_cli
from common.generate import generate_batch
from common.lora import LoRALinear, adapters_disabled, inject_lora, save_adapter
from common.outputs import REPO_ROOT, output_dir, save_results
from common.plots import new_figure, save_figure
from common.preference import (ECHO_RULES, MAX_QUESTION_WORDS, MAX_WORDS, PASS, check_answer, judge,
                               neutral_perplexity, response_logits, sample_k, sequence_logprobs)
from common.training import train_record, training_facts

NAME = "08_dpo"
DATA_DIR = REPO_ROOT / "data" / "dpo"
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]   # LoRA 注入全部 7 种线性层
ALPHA_OVER_RANK = 2.0     # LoRA 缩放 alpha/r 固定为 2（与第 05 课 r=8, alpha=16 相同）
RUNS = {"base": "基座", "sft": "SFT", "sft_more": "SFT 多训", "dpo_offline": "SFT→离线 DPO",
        "dpo_onpolicy": "SFT→在线 DPO"}


# ---------------------------------------------------------------------------
# 1. 数据
# ---------------------------------------------------------------------------
def load_pairs(path: Path) -> list[dict]:
    rows = read_json(path, "偏好数据", "请先运行 python data/dpo/make_dataset.py，或检查 --data / --heldout。")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k].strip() for k in ("prompt", "chosen", "rejected"))
            for r in rows):
        raise UserError(f"{path} 的格式不对：应为非空列表，每项含非空字符串 prompt、chosen、rejected。")
    return rows


def check_data(train_rows, held_rows) -> None:
    """自检：检查器必须让每个 chosen 通过、每个 rejected 不通过，训练和留出的问题不能重复。"""
    bad = [r["prompt"] for r in train_rows + held_rows
           if not check_answer(r["prompt"], r["chosen"])[0] or check_answer(r["prompt"], r["rejected"])[0]]
    if bad:
        raise UserError(f"数据与检查器不一致（{len(bad)} 对，例如 {bad[0]!r}）：chosen 应通过、rejected 应不通过。")
    if {r["prompt"] for r in train_rows} & {r["prompt"] for r in held_rows}:
        raise UserError("训练数据和留出数据有相同的问题：留出评估就不公平了。")


def encode_prompt(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], default_system=False)


def encode_pair(tok, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(提示, chosen 回答, rejected 回答) 的 token id。回答以 <|im_end|> 结尾：模型也要学会"在哪里停"。"""
    return encode_prompt(tok, row["prompt"]), tok.encode(row["chosen"]) + [tok.im_end], tok.encode(row["rejected"]) + [tok.im_end]


# ---------------------------------------------------------------------------
# 2. DPO 损失（Rafailov et al. 2023）和参考模型
# ---------------------------------------------------------------------------
def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float):
    """隐式奖励 r(y) = β·(log π(y) - log π_ref(y))；损失 = -log σ(r(y_w) - r(y_l))，对 batch 取平均。"""
    reward_c = beta * (pol_c - ref_c)
    reward_r = beta * (pol_r - ref_r)
    margin = reward_c - reward_r
    return -F.logsigmoid(margin).mean(), margin.detach()


class ReferenceLogprobs:
    """参考模型对每对数据的 (log π_ref(y_w), log π_ref(y_l))。参考模型 = 关掉适配器的同一个模型，它永远不变，
    所以每对只算一次，记在表里，之后每一步直接查表。"""

    def __init__(self, encoded):
        self.encoded, self.table = encoded, {}

    @torch.no_grad()
    def get(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = [i for i in dict.fromkeys(idx) if i not in self.table]
        if todo:
            with adapters_disabled(model):
                p = [self.encoded[i][0] for i in todo]
                c = sequence_logprobs(model, p, [self.encoded[i][1] for i in todo])
                r = sequence_logprobs(model, p, [self.encoded[i][2] for i in todo])
            for k, i in enumerate(todo):
                self.table[i] = (c[k].item(), r[k].item())
        dev = model.device
        return (torch.tensor([self.table[i][0] for i in idx], device=dev),
                torch.tensor([self.table[i][1] for i in idx], device=dev))


def dpo_objective(ref: ReferenceLogprobs, beta: float, nll_weight: float = 0.0):
    """nll_weight > 0：再加上 chosen 每 token 的平均负对数似然 × nll_weight（RPO；Llama 3 也这么做）。
    纯 DPO 只要求 chosen "相对" rejected 变得更可能，两者可以一起往下掉；NLL 项把 chosen 本身拉住。"""
    def objective(model, enc, idx):
        p = [enc[i][0] for i in idx]
        pol_c = sequence_logprobs(model, p, [enc[i][1] for i in idx])
        pol_r = sequence_logprobs(model, p, [enc[i][2] for i in idx])
        ref_c, ref_r = ref.get(model, idx)
        loss, margin = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
        if nll_weight > 0:                             # 同一次前向里已经有 log π(y_w)：不用多算
            n_tok = torch.tensor([len(enc[i][1]) for i in idx], dtype=pol_c.dtype, device=pol_c.device)
            loss = loss + nll_weight * (-(pol_c / n_tok)).mean()
        return loss, {"acc": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
                      "chosen_drift": (pol_c.detach() - ref_c).mean().item()}
    return objective


def sft_objective(model, enc, idx):
    """SFT：只在 chosen 回答上算平均负对数似然，完全不看 rejected。"""
    logits, targets, _ = response_logits(model, [enc[i][0] for i in idx], [enc[i][1] for i in idx])
    return F.cross_entropy(logits, targets), {}


def fresh_policy(base, a):
    """从原模型复制一份并注入新的 LoRA（同一个种子 → 初始适配器相同，B = 0）。"""
    model = copy.deepcopy(base)
    torch.manual_seed(a.seed)
    inject_lora(model, TARGETS, a.rank, a.rank * ALPHA_OVER_RANK)
    return model


def stack_fresh_adapter(sft_model, a):
    """SFT 的适配器合并进权重（W ← W + B·A），再注入一个新的适配器（B = 0）。
    于是"关掉适配器" = SFT 之后的策略：DPO 的参考模型还是一个开关，不用第二份模型、也不用事先算表。"""
    model = copy.deepcopy(sft_model)
    for layer in model.layers:
        for parent in (layer.attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, LoRALinear):
                    mod.merge()
                    setattr(parent, name, mod.base)
    torch.manual_seed(a.seed + 1)
    inject_lora(model, TARGETS, a.rank, a.rank * ALPHA_OVER_RANK)
    return model


# ---------------------------------------------------------------------------
# 3. 训练循环：SFT 和 DPO 用同一个循环，只有目标函数不同
# ---------------------------------------------------------------------------
def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """每一步用哪几条数据：固定种子的随机顺序，所有运行都一样（公平比较）。"""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch_size // n + 1)]).tolist()


def train(model, enc, objective, a, label: str, lr: float, steps: int, adapter_path: Path, first: int = 0) -> dict:
    """AdamW 训练 LoRA 参数固定步数；超过 --time-budget 就停（并大声说出来）。
    first：从 batch 顺序的第几步开始（"SFT 多训"接着 SFT 用过的 batch 往后走）。
    Ctrl-C 时把半训的适配器存进本次运行的临时文件夹，不会盖掉上一次完整运行的结果。"""
    from tqdm import tqdm
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = batch_order(len(enc), first + steps, a.batch_size, a.seed)[first * a.batch_size:]
    losses, hist = [], {"acc": [], "margin": [], "chosen_drift": []}
    meta = {"rank": a.rank, "alpha": a.rank * ALPHA_OVER_RANK, "targets": TARGETS, "run": label}
    t0, cut = time.perf_counter(), False
    bar = tqdm(range(steps), desc=label, ncols=90, file=sys.stdout)
    model.train()
    try:
        for step in bar:
            idx = order[step * a.batch_size:(step + 1) * a.batch_size]
            for grp in opt.param_groups:                   # 5 步线性 warmup
                grp["lr"] = lr * min(1.0, (step + 1) / 5)
            loss, stats = objective(model, enc, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            for k, v in stats.items():
                hist[k].append(v)
            bar.set_postfix(loss=f"{loss.item():.3f}", **({"acc": f"{stats['acc']:.2f}"} if "acc" in stats else {}))
            if time.perf_counter() - t0 > a.time_budget * 60 and step + 1 < steps:
                cut = True
                break
    except KeyboardInterrupt:
        save_adapter(model, adapter_path, meta)
        print(f"\n已把半训的适配器保存到 {adapter_path}（上一次完整运行的文件没有动）")
        raise
    finally:
        bar.close()
        model.eval()
    save_adapter(model, adapter_path, meta)
    if cut:
        print(f"  ！！！注意：到达时间预算 {a.time_budget:g} 分钟，{label} 只训练了 {len(losses)}/{steps} 步就停了。"
              f"下面的比较不再是\"等步数\"的比较；机器慢就加大 --time-budget。")
    return train_record(losses, steps, cut, time.perf_counter() - t0, sum(p.numel() for p in params),
                        history=hist, adapter=adapter_path.name)


# ---------------------------------------------------------------------------
# 4. 在线偏好对：让 SFT 之后的模型自己回答，检查器打分，配成对
# ---------------------------------------------------------------------------
def onpolicy_pairs(model, tok, rows: list[dict], a) -> tuple[list, dict]:
    """每个问题采样 a.k 个回答并打分。有通过也有不通过：通过的当 chosen、不通过的当 rejected，一一配对；
    全部不通过：chosen 用数据集里的标准回答（检查器保证它通过），rejected 仍是模型自己的回答；
    全部通过：检查器给不出"哪个更差"，这道题不用。"""
    t0 = time.perf_counter()
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    samples = sample_k(model, prompts, a.k, a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                       stop_ids=tok.eos_ids, batch=a.gen_batch)
    pairs, stats = [], {"all_pass": 0, "all_fail": 0, "mixed": 0, "samples_passed": 0, "examples": []}
    for row, p, outs in zip(rows, prompts, samples):
        good, bad = [], []
        for o in outs:
            ok, why, text = judge(tok, row["prompt"], o, a.max_new_tokens)
            ids = o + [tok.im_end] if len(o) < a.max_new_tokens else o      # 没写完的回答就停在写到的地方
            (good if ok else bad).append((ids, text, why))
        stats["samples_passed"] += len(good)
        if not bad:
            stats["all_pass"] += 1
            continue
        kind = "mixed" if good else "all_fail"
        stats[kind] += 1
        good = good or [(tok.encode(row["chosen"]) + [tok.im_end], row["chosen"], "数据集的 chosen")]
        for g, b in zip(good * len(bad), bad):
            pairs.append((p, g[0], b[0]))
            if len(stats["examples"]) < 3 and kind == "mixed":
                stats["examples"].append({"prompt": row["prompt"], "chosen": g[1], "rejected": b[1], "why": b[2]})
    stats.update(pairs=len(pairs), prompts=len(rows), k=a.k, seconds=time.perf_counter() - t0)
    return pairs, stats


def show_pairs(stats: dict) -> None:
    n = stats["prompts"] * stats["k"]
    print(f"采样 {stats['prompts']} 题 × {stats['k']} 个回答（温度 {stats.get('temperature', '')}），用时 {stats['seconds']:.0f} 秒；"
          f"{stats['samples_passed']}/{n} 个回答通过检查器。")
    print(f"  有过有不过 {stats['mixed']} 题，全不过 {stats['all_fail']} 题（chosen 用数据集的回答），"
          f"全过 {stats['all_pass']} 题（不用）→ 共 {stats['pairs']} 对。例子：")
    for e in stats["examples"]:
        print(f"  问题：{e['prompt']}\n    chosen  ：{e['chosen']!r}\n    rejected：{e['rejected']!r}（{e['why']}）")


# ---------------------------------------------------------------------------
# 5. 评估：留出对的隐式奖励、与基座的 KL、中性文本困惑度、生成 + 检查器
# ---------------------------------------------------------------------------
@torch.no_grad()
def heldout_pass(model, held, kl_n: int = 0, bs: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """留出对的 (log π(y_w), log π(y_l))，以及前 kl_n 条 chosen 回答每个位置上的 log 分布 log π(· | 前文)（算 KL 用）。
    log π(y_w) 本来就是从 chosen 的 log 分布里取出来的，所以 KL 不用再做一次前向。
    参考模型和被训练的模型用完全相同的分批，所以训练前（适配器的 B = 0）两者逐位相同，margin 恰好是 0。"""
    pc, pr, dists = [], [], []
    for i in range(0, len(held), bs):
        chunk = held[i:i + bs]
        prompts = [h[0] for h in chunk]
        logits, targets, rows = response_logits(model, prompts, [h[1] for h in chunk])
        logp = logits.log_softmax(-1)                  # 和 sequence_logprobs 同样的算法：结果逐位相同
        pc.append(torch.zeros(len(chunk), device=logp.device).index_add(0, rows, logp.gather(-1, targets[:, None])[:, 0]))
        dists.append(logp[rows < kl_n - i])
        pr.append(sequence_logprobs(model, prompts, [h[2] for h in chunk]))
    return torch.cat(pc), torch.cat(pr), torch.cat(dists)


@torch.no_grad()
def preference_metrics(model, ref, held, beta: float, kl_n: int, bs: int = 8) -> dict:
    """留出对上的奖励准确率（margin > 0 的比例，相对基座模型）、平均 margin；
    KL(π ‖ π_基座)：在前 kl_n 条 chosen 回答的每个位置上，比较两个模型对下一个 token 的完整分布。
    ref = heldout_pass(基座, held, kl_n)：基座永远不变，只算一次，每次评估直接拿来用。"""
    pc, pr, logp = heldout_pass(model, held, kl_n, bs)
    _, margin = dpo_loss(pc, pr, ref[0], ref[1], beta)
    kl = (logp.exp() * (logp - ref[2])).sum(-1)        # 每个位置一个 KL 值
    return {"reward_accuracy": (margin > 0).float().mean().item(), "mean_margin": margin.mean().item(),
            "margins": margin.tolist(), "kl_per_token": kl.mean().item(), "kl_tokens": kl.numel()}


def generate_and_check(model, tok, rows: list[dict], a) -> dict:
    outs = []
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    for i in range(0, len(prompts), a.gen_batch):          # 贪心解码：同一个模型总给出同样的回答
        outs += generate_batch(model, prompts[i:i + a.gen_batch], a.max_new_tokens, stop_ids=tok.eos_ids)
    judged = [judge(tok, r["prompt"], o, a.max_new_tokens) for r, o in zip(rows, outs)]
    texts, reasons = [j[2] for j in judged], [j[1] for j in judged]
    return {"pass_rate": reasons.count(PASS) / len(texts), "n": len(texts), "outputs": texts, "reasons": reasons,
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "reason_counts": {r: reasons.count(r) for r in dict.fromkeys(reasons)}}


def evaluate(model, tok, held_enc, ref_held, gen_rows, a, label: str) -> dict:
    t0 = time.perf_counter()
    m = preference_metrics(model, ref_held, held_enc, a.beta, a.kl_n)
    m["neutral_ppl"] = neutral_perplexity(model, tok)
    m["generation"] = g = generate_and_check(model, tok, gen_rows, a)
    print(f"  [{label}] 检查器通过率 {g['pass_rate']:.1%}（{g['n']} 题），平均 {g['mean_words']:.1f} 词，"
          f"原因 {g['reason_counts']}；留出对奖励准确率 {m['reward_accuracy']:.1%}，KL {m['kl_per_token']:.4f}/token，"
          f"中性困惑度 {m['neutral_ppl']:.2f}（评估 {time.perf_counter() - t0:.0f} 秒）")
    return m


# ---------------------------------------------------------------------------
# 6. 两个实验
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    from common.cli import existing_file, non_negative_float
    p = course_parser(NAME, __doc__, groups=("device",))
    g = p.add_argument_group("本课参数")
    add_knob(g, "--sft-steps", type=positive_int, default=30, quick=3, help="SFT 的步数（所有后续运行都从这里出发）")
    add_knob(g, "--extra-steps", type=positive_int, default=20, quick=2,
             help="SFT 之后每条分支再训练的步数：SFT 多训 / 离线 DPO / 在线 DPO 一样多（等计算量比较）")
    add_knob(g, "--k", type=positive_int, default=4, quick=4, help="在线 DPO：每个训练问题采样几个回答")
    g.add_argument("--temperature", type=positive_float, default=0.8, help="在线 DPO：采样温度")
    add_knob(g, "--sample-prompts", type=positive_int, default=64, quick=2, help="在线 DPO：从多少个训练问题上采样")
    g.add_argument("--beta", type=positive_float, default=0.5, help="DPO 的 β：越大，越不许模型离参考模型太远")
    g.add_argument("--lr", type=positive_float, default=3e-4, help="SFT（和\"SFT 多训\"）的 LoRA 学习率")
    g.add_argument("--dpo-lr", type=positive_float, default=1e-3, help="DPO（离线和在线）的 LoRA 学习率")
    g.add_argument("--nll-weight", type=non_negative_float, default=0.0,
                   help="DPO 损失再加上 chosen 的 NLL × 这个权重（0 = 纯 DPO；Llama 3 用 0.2）")
    add_knob(g, "--time-budget", type=positive_float, default=3.0, quick=1.0,
             help="每次训练的时间上限（分钟）。只是安全上限：被它截断时会大声提示")
    add_knob(g, "--batch-size", type=positive_int, default=4, quick=2, help="每步几条（对）数据")
    g.add_argument("--rank", type=positive_int, default=8, help="LoRA 的秩 r（alpha = 2r）")
    add_knob(g, "--eval-n", type=positive_int, default=64, quick=4, help="生成评估用几条留出提示")
    add_knob(g, "--eval-pairs", type=positive_int, default=32, quick=4, help="算奖励准确率用几对留出数据")
    add_knob(g, "--max-new-tokens", type=positive_int, default=48, quick=24,
             help="每条回答最多生成多少个新 token（用完还没结束算\"太长\"）")
    g.add_argument("--data", type=existing_file, default=DATA_DIR / "train.json", help="训练偏好数据")
    g.add_argument("--heldout", type=existing_file, default=DATA_DIR / "heldout.json", help="留出偏好数据")
    a = p.parse_args(argv)
    a.kl_n, a.gen_batch = min(16, a.eval_pairs), 64
    return a


def branch(name: str, model, enc, objective, a, stage: Path, first: int = 0) -> dict:
    lr = a.lr if name == "sft_more" else a.dpo_lr
    print(f"\n-- {RUNS[name]}：再训练 {a.extra_steps} 步 × {a.batch_size}，lr {lr:g} --")
    tr = train(model, enc, objective, a, RUNS[name], lr, a.extra_steps, stage / f"adapter_{name}.safetensors", first)
    print(training_facts(tr))
    return tr


def experiment_offline(base, tok, enc, ev, a, stage: Path, runs: dict):
    """实验一：SFT，然后从同一个 SFT 出发，(a) 接着 SFT，(b) 在数据集现成的偏好对上做 DPO。"""
    print(f"\n== 3. SFT：只学 chosen，{a.sft_steps} 步 × {a.batch_size} 条，lr {a.lr:g}，LoRA r={a.rank} ==")
    sft = fresh_policy(base, a)
    tr = train(sft, enc, sft_objective, a, RUNS["sft"], a.lr, a.sft_steps, stage / "adapter_sft.safetensors")
    print(training_facts(tr))
    runs["sft"] = {**ev(sft, RUNS["sft"]), "train": tr, "wall_seconds": tr["train_seconds"]}

    print(f"\n== 4. 实验一：同样再训练 {a.extra_steps} 步，接着 SFT vs 在数据集的偏好对上做 DPO ==")
    more = copy.deepcopy(sft)
    t = branch("sft_more", more, enc, sft_objective, a, stage, first=a.sft_steps)
    runs["sft_more"] = {**ev(more, RUNS["sft_more"]), "train": t, "wall_seconds": tr["train_seconds"] + t["train_seconds"]}
    del more
    off = stack_fresh_adapter(sft, a)                   # 参考模型 = 关掉新适配器 = SFT 之后的模型
    objective = dpo_objective(ReferenceLogprobs(enc), a.beta, a.nll_weight)
    t = branch("dpo_offline", off, enc, objective, a, stage, first=a.sft_steps)
    runs["dpo_offline"] = {**ev(off, RUNS["dpo_offline"]), "train": t,
                           "wall_seconds": tr["train_seconds"] + t["train_seconds"]}
    del off
    return sft


def experiment_onpolicy(sft, tok, train_rows, ev, a, stage: Path, runs: dict) -> dict:
    """实验二：SFT 之后的模型自己采样，检查器打分配成对，再做 DPO（参考模型 = SFT 之后的模型）。"""
    print(f"\n== 5. 实验二：在线偏好对——SFT 之后的模型每题采样 {a.k} 个回答，检查器打分 ==")
    g = torch.Generator().manual_seed(a.seed + 2)       # 只在训练问题里挑，留出问题从不参与
    pick = torch.randperm(len(train_rows), generator=g)[:a.sample_prompts].tolist()
    pairs, stats = onpolicy_pairs(sft, tok, [train_rows[i] for i in pick], a)
    stats["temperature"] = a.temperature
    show_pairs(stats)
    require(len(pairs) > 0, "在线采样没有配出任何偏好对（全部通过？）：换 --seed 或加大 --sample-prompts。")
    on = stack_fresh_adapter(sft, a)
    t = branch("dpo_onpolicy", on, pairs, dpo_objective(ReferenceLogprobs(pairs), a.beta, a.nll_weight), a, stage)
    runs["dpo_onpolicy"] = {**ev(on, RUNS["dpo_onpolicy"]), "train": t, "sampling": stats,
                            "wall_seconds": runs["sft"]["train"]["train_seconds"] + stats["seconds"] + t["train_seconds"]}
    return stats


@torch.no_grad()
def show_logprobs(base, train_rows, enc) -> None:
    k = next(i for i, r in enumerate(train_rows) if r.get("kind") == "ramble")
    pc, pr = sequence_logprobs(base, [enc[k][0]] * 2, [enc[k][1], enc[k][2]]).tolist()
    nc, nr = len(enc[k][1]), len(enc[k][2])
    print(f"一对 ramble 数据：log p(chosen) = {pc:.2f}（{nc} 个 token，平均每个 {pc / nc:.2f}），"
          f"log p(rejected) = {pr:.2f}（{nr} 个 token，平均每个 {pr / nr:.2f}）")
    # 自检：同样几条数据，单独算 vs 放在带 padding 的 batch 里算
    alone = torch.cat([sequence_logprobs(base, [e[0]], [e[2]]) for e in enc[:3]])
    diff = (alone - sequence_logprobs(base, [e[0] for e in enc[:3]], [e[2] for e in enc[:3]])).abs().max().item()
    print(f"单独算 vs 放进带 padding 的 batch 算：最大差 {diff:.2e}（padding 被 attention_mask 遮住）")
    require(diff <= 1e-3, f"padding 改变了序列 log p（差 {diff:.2e}）。")


def main(argv=None):
    a = parse_args(argv)
    train_rows, held_rows = load_pairs(a.data), load_pairs(a.heldout)
    check_data(train_rows, held_rows)
    t_run = time.perf_counter()
    device = setup_run(a)
    torch.set_flush_denormal(True)
    out = output_dir(a.out_dir)
    stage = out / ".running"                    # 本次运行的文件先写在这里，跑完才整体换上去
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    from common.local_model import load_local_model
    lm = load_local_model(dtype="fp32", device=device)
    base, tok = lm.model, lm.tokenizer
    print(f"模型：{lm.name}，设备 {device}，{torch.get_num_threads()} 个 CPU 线程。本地模型只懂英文，所以数据是英文的。")

    print("\n== 1. 偏好数据和检查器 ==")
    enc = [encode_pair(tok, r) for r in train_rows]
    held_enc = [encode_pair(tok, r) for r in held_rows[:a.eval_pairs]]
    gen_rows = held_rows[:a.eval_n]
    ex = train_rows[0]
    print(f"训练 {len(train_rows)} 对，留出 {len(held_rows)} 对（主题不重叠）。例子：\n  问题：{ex['prompt']}\n"
          f"  chosen  ：{ex['chosen']}\n  rejected：{ex['rejected']}")
    print(f"检查器：≤ {MAX_WORDS} 词；先回答，再以一个 ≤ {MAX_QUESTION_WORDS} 词的追问结尾；追问不能复述用户的问题，"
          f"回答要说出问题之外的东西。自检：全部 chosen 通过、全部 rejected 不通过。")

    print("\n== 2. 序列对数概率 log p(回答 | 问题)：只对回答 token 求和 ==")
    show_logprobs(base, train_rows, enc)
    ref_held = heldout_pass(base, held_enc, a.kl_n)      # 奖励准确率、KL 都相对基座模型
    runs = {}

    def ev(model, label):
        return {**evaluate(model, tok, held_enc, ref_held, gen_rows, a, label), "label": label}

    print("\n== 评估基座模型 ==")
    runs["base"] = {**ev(base, RUNS["base"]), "wall_seconds": 0.0}
    sft = experiment_offline(base, tok, enc, ev, a, stage, runs)
    stats = experiment_onpolicy(sft, tok, train_rows, ev, a, stage, runs)
    del sft
    report(runs, stats, gen_rows, a, stage, time.perf_counter() - t_run)
    publish(stage, out)
    print(f"结果：{out / 'results.json'}、{out / 'training.png'}、{out}/adapter_*.safetensors（总用时 {time.perf_counter() - t_run:.0f} 秒）")


def publish(stage: Path, out: Path) -> None:
    """整次运行成功结束才把这次的文件一起换上去，并删掉上一次留下、这次没有的文件：目录里永远是同一次完整运行的结果。"""
    new = {f.name for f in stage.iterdir()}
    for f in out.iterdir():
        if f.is_file() and f.name not in new and (f.suffix in (".safetensors", ".png") or f.name == "results.json"):
            f.unlink()
    for name in sorted(new, key=lambda n: n == "results.json"):     # results.json 最后换
        os.replace(stage / name, out / name)
    stage.rmdir()


# ---------------------------------------------------------------------------
# 7. 汇总
# ---------------------------------------------------------------------------
def report(runs: dict, stats: dict, gen_rows, a, stage: Path, seconds: float) -> None:
    print(f"\n== 6. 汇总（{runs['base']['generation']['n']} 条留出提示，贪心解码；奖励准确率和 KL 都相对基座）==")
    rows = [["模型", "步数", "用时(秒)", "通过率", "平均词数", "中性困惑度", "KL/token", "奖励准确率", "复述/无内容"]]
    for key, r in runs.items():
        g, tr = r["generation"], r.get("train")
        steps = 0 if not tr else tr["steps"] + (0 if key == "sft" else runs["sft"]["train"]["steps"])
        echo = "/".join(str(g["reason_counts"].get(x, 0)) for x in ECHO_RULES)
        rows.append([r["label"], steps, f"{r['wall_seconds']:.0f}", f"{g['pass_rate']:.1%}", f"{g['mean_words']:.1f}",
                     f"{r['neutral_ppl']:.2f}", f"{r['kl_per_token']:.4f}", f"{r['reward_accuracy']:.1%}", echo])
    print(table(rows))
    print("（用时 = 训练秒数，在线 DPO 含采样；\"复述/无内容\" = 只看格式会通过、被两条防复述规则挡掉的回答数）")

    s, o = runs["sft"]["generation"], runs["dpo_onpolicy"]["generation"]
    flip = [i for i in range(len(gen_rows)) if (s["reasons"][i] == PASS) != (o["reasons"][i] == PASS)]
    diff = (flip + [i for i in range(len(gen_rows)) if i not in flip])[:3]      # 先看结果不同的题
    print("\n并排对比（留出问题，贪心；先列检查器结果不同的题）：")
    for i in diff:
        print(f"  问题：{gen_rows[i]['prompt']}\n    SFT        [{s['reasons'][i]}] {s['outputs'][i]!r}\n"
              f"    在线 DPO   [{o['reasons'][i]}] {o['outputs'][i]!r}")

    pass_rate = {k: r["generation"]["pass_rate"] for k, r in runs.items()}
    plot_training(runs, stage / "training.png")
    save_results(stage, {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "pass_rate": pass_rate,
        "reward_accuracy": {"before": runs["base"]["reward_accuracy"], "after": runs["dpo_onpolicy"]["reward_accuracy"],
                            **{k: r["reward_accuracy"] for k, r in runs.items()}},
        "mean_margin": {"before": runs["base"]["mean_margin"], "after": runs["dpo_onpolicy"]["mean_margin"]},
        "mean_words": {k: r["generation"]["mean_words"] for k, r in runs.items()},
        "neutral_ppl": {k: r["neutral_ppl"] for k, r in runs.items()},
        "kl_per_token": {k: r["kl_per_token"] for k, r in runs.items()},
        "wall_seconds": {k: r["wall_seconds"] for k, r in runs.items()},
        "removed_by_echo_rules": {k: {x: r["generation"]["reason_counts"].get(x, 0) for x in ECHO_RULES}
                                  for k, r in runs.items()},
        "onpolicy_sampling": stats, "runs": runs, "total_seconds": seconds,
    })


COLORS = {"sft": "tab:blue", "sft_more": "tab:green", "dpo_offline": "tab:orange", "dpo_onpolicy": "tab:red"}


def plot_training(runs: dict, path: Path) -> Path:
    """三个面板，同一种颜色在每个面板里都是同一次运行：SFT 的 loss、DPO 的 loss、DPO 的 margin。"""
    fig, ax = new_figure(ncols=3, size=(15, 4.6))
    n0 = runs["sft"]["train"]["steps"]
    for key, color in COLORS.items():
        tr = runs[key]["train"]
        x0 = 0 if key == "sft" else n0
        xs = range(x0 + 1, x0 + len(tr["losses"]) + 1)
        ax[0 if key.startswith("sft") else 1].plot(xs, tr["losses"], color=color, label=RUNS_EN[key])
        if tr["history"]["margin"]:
            ax[2].plot(xs, tr["history"]["margin"], color=color, label=RUNS_EN[key])
    ax[0].set(ylabel="NLL per chosen token", title="SFT loss")
    ax[1].set(ylabel="-log sigmoid(margin)", title="DPO loss")
    ax[2].set(ylabel="batch mean margin = beta * (delta log p)", title="DPO implicit reward margin")
    for x in ax:
        x.set_xlabel(f"training step (steps 1-{n0}: the shared SFT)")
        x.grid(alpha=0.3)
        x.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    return save_figure(fig, path)


RUNS_EN = {"sft": "SFT", "sft_more": "SFT continued", "dpo_offline": "SFT -> DPO on the dataset's pairs",
           "dpo_onpolicy": "SFT -> DPO on its own samples"}


if __name__ == "__main__":
    run_cli(main)
