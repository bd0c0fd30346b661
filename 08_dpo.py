"""第 08 课：对齐入门——从 SFT 到偏好优化（DPO），在 CPU 上训练真正的模型（SmolLM2-135M-Instruct）

你将学到：
  1. 偏好数据长什么样：同一个问题，一个"更好"（chosen）和一个"更差"（rejected）的回答；
     本课的偏好可以由程序检查（简洁 ≤ 30 词，并以一个简短的追问结尾），所以不需要裁判模型；
  2. 序列对数概率 log p(回答 | 问题)：只对回答部分的 token 求和（提示部分被遮住），带 padding 批量计算；
  3. 按公式手写 DPO 损失：-log σ(β[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))])；
     参考模型 π_ref = 同一个模型把 LoRA 适配器关掉——不用第二份模型；
  4. 训练前后对比：留出集上的奖励准确率、奖励差（margin）、与参考模型的 KL 距离；
     基座模型 / 只在 chosen 上做 SFT / DPO 三者生成回答，用检查器打分；
  5. β 的作用（两个取值）和一个失败模式（学习率太大 → 语言能力崩坏，用中性文本的困惑度量出来）。

本地模型只懂英文，所以数据和提示都是英文的（data/dpo/）。
用时（2 核 CPU 实测，见 docs/08_dpo.md）：--quick 约 1～1.5 分钟；默认是 4 次训练（各 30 步或 10 步）+ 5 次评估，约 9 分钟。
步数固定，--time-budget 只是每次训练的安全上限：被它截断时脚本会大声提示。

常用命令：
  python 08_dpo.py --quick                 # 快速体验：只训练 SFT 和一个 β 的 DPO，各几步
  python 08_dpo.py                         # 完整一课：基座 → SFT → DPO(两个 β) → 失败模式
  python 08_dpo.py --beta 0.5 --steps 60   # 换 β、换步数（练习）
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import add_knob, course_parser, positive_float, positive_int, setup_run
from common.errors import UserError, read_json, require, run_cli
from common.generate import generate_batch
from common.lora import adapters_disabled, inject_lora, save_adapter
from common.outputs import REPO_ROOT, output_dir, save_results
from common.plots import new_figure, save_figure
from common.training import train_record, training_facts

NAME = "08_dpo"
DATA_DIR = REPO_ROOT / "data" / "dpo"
MAX_WORDS = 30            # 检查器：整段回答最多 30 个词
MAX_QUESTION_WORDS = 10   # 结尾的追问最多 10 个词
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]   # LoRA 注入全部 7 种线性层
ALPHA_OVER_RANK = 2.0     # LoRA 缩放 alpha/r 固定为 2（与第 05 课 r=8, alpha=16 相同）
# 中性文本：与偏好无关的普通英文段落（为本项目编写），用它的困惑度看模型的"语言能力"有没有被训坏
NEUTRAL_TEXT = (
    "The river starts high in the mountains, where snow melts every spring and feeds dozens of small streams. "
    "As it flows toward the sea, the river passes farms, forests and several old towns that grew up around its "
    "bridges. In the past, boats carried grain and timber downstream, and the towns became busy markets. "
    "Today most goods travel by road and rail, but the river is still important for fishing, farming and tourism. "
    "Every summer, visitors rent small boats, walk along the banks and watch the birds that nest in the reeds. "
    "Scientists measure the water quality each month, because the health of the river tells them a lot about the "
    "land around it. When heavy rain falls, the water level can rise quickly, so the towns have built walls and "
    "planted trees to slow the flood water down."
)


# ---------------------------------------------------------------------------
# 1. 偏好：一个程序就能检查的"奖励"（只用来评估，训练时模型看不到它）
# ---------------------------------------------------------------------------
def check_answer(text: str) -> tuple[bool, str]:
    """通过 = 不超过 MAX_WORDS 个词：先回答（至少一句），再以一个（且只有一个）不超过 MAX_QUESTION_WORDS 词的问句结尾。"""
    t = text.strip()
    n = len(t.split())
    if n == 0:
        return False, "空回答"
    if n > MAX_WORDS:
        return False, "太长"
    sentences = re.split(r"(?<=[.!?])\s+", t)
    if not t.endswith("?") or t.count("?") != 1:
        return False, "没有以一个追问结尾"
    if len(sentences[-1].split()) > MAX_QUESTION_WORDS:
        return False, "追问太长"
    if len(sentences) < 2:                  # 只问一句（"How do you do?"）不算回答：见 docs/08_dpo.md 第 4 节
        return False, "只有追问，没有回答"
    return True, "通过"


def load_pairs(path: Path) -> list[dict]:
    rows = read_json(path, "偏好数据", "请先运行 python data/dpo/make_dataset.py，或检查 --data / --heldout。")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k].strip() for k in ("prompt", "chosen", "rejected"))
            for r in rows):
        raise UserError(f"{path} 的格式不对：应为非空列表，每项含非空字符串 prompt、chosen、rejected。")
    return rows


def encode_pair(tok, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(提示, chosen 回答, rejected 回答) 的 token id。回答以 <|im_end|> 结尾：模型也要学会"在哪里停"。"""
    prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], default_system=False)
    return prompt, tok.encode(row["chosen"]) + [tok.im_end], tok.encode(row["rejected"]) + [tok.im_end]


# ---------------------------------------------------------------------------
# 2. 序列对数概率：log p(回答 | 提示) = 回答里每个 token 的 log p 之和
# ---------------------------------------------------------------------------
def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0):
    """提示 + 回答拼起来，右侧补齐。返回 ids、attention_mask（1 = 真 token）、resp（1 = 回答 token）。"""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    resp = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        resp[i, len(p):len(p) + len(r)] = True
    return ids, mask, resp


def response_logits(model, prompts, responses):
    """回答位置上的 logits（float32）、目标 token、以及每个位置属于第几行。

    位置 t 的输出预测第 t+1 个 token，所以"回答 token"的预测来自它前一个位置。
    词表投影（576 → 49152）只在回答位置上算，提示和 padding 的位置跳过。
    """
    dev = model.device
    ids, mask, resp = (x.to(dev) for x in pad_batch(prompts, responses))
    h = model(ids[:, :-1], attention_mask=mask[:, :-1], return_hidden=True)   # [B, T-1, 576]
    keep = resp[:, 1:]                                                         # 被预测的是回答 token
    logits = model.lm_head(h[keep]).float()                                    # [回答 token 总数, vocab]
    rows = torch.arange(ids.shape[0], device=dev)[:, None].expand_as(keep)[keep]
    return logits, ids[:, 1:][keep], rows


def sequence_logprobs(model, prompts, responses) -> torch.Tensor:
    """每行一个数：sum_t log p(回答第 t 个 token | 提示 + 回答前 t-1 个 token)。"""
    logits, targets, rows = response_logits(model, prompts, responses)
    lp = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    return torch.zeros(len(prompts), device=lp.device).index_add(0, rows, lp)


# ---------------------------------------------------------------------------
# 3. DPO 损失（Rafailov et al. 2023）
# ---------------------------------------------------------------------------
def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float):
    """隐式奖励 r(y) = β·(log π(y) - log π_ref(y))；损失 = -log σ(r(y_w) - r(y_l))，对 batch 取平均。"""
    reward_c = beta * (pol_c - ref_c)
    reward_r = beta * (pol_r - ref_r)
    margin = reward_c - reward_r
    return -F.logsigmoid(margin).mean(), margin.detach()


class ReferenceLogprobs:
    """参考模型对每条训练数据的 log π_ref(y_w)、log π_ref(y_l)。

    参考模型就是"关掉适配器的同一个模型"（adapters_disabled），而且它永远不变，
    所以每对数据只需算一次，记下来，之后的每一步、每一次训练（SFT 之外的所有 DPO 运行）都直接查表。
    adapter_on=True（SFT→DPO）：参考模型 = SFT 刚结束时的策略（适配器开着）。它之后会被 DPO 改掉，
    所以不能边训边算：DPO 开始前用 fill() 把要用到的每一对一次算好。参考模型只在这张表里出现，
    表一旦填好就不需要第二份模型。
    """

    def __init__(self, encoded, adapter_on: bool = False):
        self.encoded, self.table, self.adapter_on = encoded, {}, adapter_on

    def fill(self, model, idx: list[int], bs: int = 8) -> None:
        todo = [i for i in dict.fromkeys(idx) if i not in self.table]
        for i in range(0, len(todo), bs):
            self._compute(model, todo[i:i + bs])

    @torch.no_grad()
    def get(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = [i for i in dict.fromkeys(idx) if i not in self.table]
        if todo and self.adapter_on:
            raise RuntimeError("SFT→DPO 的参考表必须在 DPO 开始前用 fill() 填好")
        if todo:
            self._compute(model, todo)
        dev = model.device
        return (torch.tensor([self.table[i][0] for i in idx], device=dev),
                torch.tensor([self.table[i][1] for i in idx], device=dev))

    @torch.no_grad()
    def _compute(self, model, todo: list[int]) -> None:
        with (contextlib.nullcontext() if self.adapter_on else adapters_disabled(model)):
            p = [self.encoded[i][0] for i in todo]
            c = sequence_logprobs(model, p, [self.encoded[i][1] for i in todo])
            r = sequence_logprobs(model, p, [self.encoded[i][2] for i in todo])
        for k, i in enumerate(todo):
            self.table[i] = (c[k].item(), r[k].item())


# ---------------------------------------------------------------------------
# 4. 训练：DPO 和 SFT 基线用同一个循环、同样的 batch 顺序，只有目标函数不同
# ---------------------------------------------------------------------------
def dpo_objective(ref: ReferenceLogprobs, beta: float, nll_weight: float = 0.0):
    """nll_weight > 0：再加上 chosen 回答每 token 的平均负对数似然 × nll_weight（Llama 3 的做法，RPO 论文也这么做）。
    纯 DPO 只要求 chosen "相对" rejected 变得更可能；两者的概率可以一起往下掉（docs/08 第 6 节），NLL 项把 chosen 拉住。"""
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


@torch.no_grad()
def self_rejected(base, tok, enc, a, steps: int) -> tuple[list, list[int]]:
    """--rejected model：chosen 仍用数据里的回答，rejected 换成基座模型自己（贪心）写出的回答（SPIN 的做法）。

    数据里的 rejected 是人写的长篇大论，模型本来就不太会那样开头：把它压低，贪心解码几乎不变（docs/08 第 4 节）。
    换成模型自己的回答，被压低的就是它现在最可能说的话。只为最长的那次训练（steps 步）会用到的对生成；检查器仍然只用于评估。"""
    used = sorted(set(batch_order(len(enc), steps, a.batch_size, a.seed)[:steps * a.batch_size]))
    outs = []
    for i in range(0, len(used), a.gen_batch):
        outs += generate_batch(base, [enc[k][0] for k in used[i:i + a.gen_batch]], a.max_new_tokens,
                               stop_ids=tok.eos_ids)
    new = list(enc)
    for k, o in zip(used, outs):                       # 没写完的回答就按写到的地方为止（不加 <|im_end|>）
        new[k] = (enc[k][0], enc[k][1], o + [tok.im_end] if len(o) < a.max_new_tokens else o)
    return new, used


def show_self_rejected(base, tok, enc, a, steps: int) -> list:
    t0 = time.perf_counter()
    new, used = self_rejected(base, tok, enc, a, steps)
    k = used[0]
    print(f"--rejected model：基座模型为训练会用到的 {len(used)} 个问题各写了一个回答（贪心，{time.perf_counter() - t0:.0f} 秒），"
          f"用它们代替数据里的 rejected（chosen 不变）。例如：\n  rejected（模型自己写的）：{tok.decode([t for t in new[k][2] if t != tok.im_end]).strip()!r}")
    return new


def sft_objective(model, enc, idx):
    """基线：只在 chosen 回答上做普通的 SFT（回答 token 的平均负对数似然），完全不看 rejected。"""
    logits, targets, _ = response_logits(model, [enc[i][0] for i in idx], [enc[i][1] for i in idx])
    return F.cross_entropy(logits, targets), {}


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """每一步用哪几对数据：固定种子的随机顺序，所有运行都一样（公平比较）。"""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch_size // n + 1)]).tolist()


def train(model, enc, objective, a, label: str, lr: float, steps: int, adapter_path: Path, first: int = 0) -> dict:
    """AdamW 训练 LoRA 参数固定步数；超过 --time-budget 就停（并大声说出来）；Ctrl-C 时保存适配器。
    first：从 batch 顺序的第几步开始（SFT→DPO 的 DPO 阶段接着 SFT 用过的 batch 往后走）。"""
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
            if (step + 1) % 10 == 0:
                save_adapter(model, adapter_path, meta)        # 检查点：只有几 MB
            if time.perf_counter() - t0 > a.time_budget * 60 and step + 1 < steps:
                cut = True
                break
    except KeyboardInterrupt:
        save_adapter(model, adapter_path, meta)
        print(f"\n已把当前的适配器保存到 {adapter_path}")
        raise
    finally:
        bar.close()
        model.eval()
    save_adapter(model, adapter_path, meta)
    done = len(losses)
    if cut:
        print(f"  ！！！注意：到达时间预算 {a.time_budget:g} 分钟，{label} 只训练了 {done}/{steps} 步就停了。"
              f"下面的比较不再是\"等步数\"的比较；机器慢就加大 --time-budget。")
    return train_record(losses, steps, cut, time.perf_counter() - t0, sum(p.numel() for p in params),
                        history=hist, adapter=adapter_path)


def sft_then_dpo(model, enc, a, label: str, beta: float, lr: float, steps: int, path: Path) -> dict:
    """标准流程（InstructGPT、Zephyr、Llama 都是先 SFT 再做偏好优化）：先 SFT K 步，再以"SFT 之后的模型"为参考做 DPO。
    总步数和其他运行一样：SFT 用 batch 顺序里的前 K 步，DPO 接着用后面的 steps−K 步，见过的数据和 SFT 基线完全相同。"""
    k = a.sft_steps
    sft = train(model, enc, sft_objective, a, f"{label}：SFT", lr, k, path)
    ref = ReferenceLogprobs(enc, adapter_on=True)       # 参考模型 = 此刻的策略，先把要用到的对数概率全算好
    ref.fill(model, batch_order(len(enc), steps, a.batch_size, a.seed)[k * a.batch_size:steps * a.batch_size])
    dpo = train(model, enc, dpo_objective(ref, beta, a.nll_weight), a, f"{label}：DPO", lr, steps - k, path, first=k)
    return train_record(sft["losses"] + dpo["losses"], steps, sft["cut_by_time_budget"] or dpo["cut_by_time_budget"],
                        sft["train_seconds"] + dpo["train_seconds"], dpo["trainable_params"],
                        history={h: sft["history"][h] + dpo["history"][h] for h in dpo["history"]},
                        phase_steps=[sft["steps"], dpo["steps"]], adapter=path)


# ---------------------------------------------------------------------------
# 5. 评估：留出集上的隐式奖励、KL 漂移、中性文本困惑度、生成 + 检查器
# ---------------------------------------------------------------------------
@torch.no_grad()
def heldout_logprobs(model, held, bs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """留出对的 (log π(y_w), log π(y_l))。参考模型和被训练的模型用完全相同的分批，
    所以训练前（适配器的 B = 0）两者逐位相同，margin 恰好是 0。"""
    pc, pr = [], []
    for i in range(0, len(held), bs):
        chunk = held[i:i + bs]
        pc.append(sequence_logprobs(model, [h[0] for h in chunk], [h[1] for h in chunk]))
        pr.append(sequence_logprobs(model, [h[0] for h in chunk], [h[2] for h in chunk]))
    return torch.cat(pc), torch.cat(pr)


@torch.no_grad()
def preference_metrics(model, held, ref_held, beta: float, kl_n: int, bs: int = 8) -> dict:
    """留出对上的奖励准确率（margin > 0 的比例）、平均 margin；
    以及 KL(π || π_ref)：在前 kl_n 条 chosen 回答的每个位置上，比较两个模型对下一个 token 的完整分布。"""
    pc, pr = heldout_logprobs(model, held, bs)
    _, margin = dpo_loss(pc, pr, ref_held[0], ref_held[1], beta)
    n_c = torch.tensor([len(h[1]) for h in held], device=pc.device)
    n_r = torch.tensor([len(h[2]) for h in held], device=pc.device)
    kls = []
    for i in range(0, kl_n, bs):
        chunk = held[i:min(i + bs, kl_n)]
        args = ([h[0] for h in chunk], [h[1] for h in chunk])
        logp = response_logits(model, *args)[0].log_softmax(-1)
        with adapters_disabled(model):
            logq = response_logits(model, *args)[0].log_softmax(-1)
        kls.append((logp.exp() * (logp - logq)).sum(-1))      # 每个位置一个 KL 值
    kl = torch.cat(kls)
    return {"reward_accuracy": (margin > 0).float().mean().item(), "mean_margin": margin.mean().item(),
            "margins": margin.tolist(),
            # 模型自己更偏向哪个回答（按每个 token 的平均 log p，避免长度的影响）：不依赖参考模型
            "prefers_chosen_per_token": ((pc / n_c) > (pr / n_r)).float().mean().item(),
            "kl_per_token": kl.mean().item(), "kl_tokens": kl.numel()}


@torch.no_grad()
def neutral_perplexity(model, tok) -> float:
    ids = torch.tensor([tok.encode(NEUTRAL_TEXT)], device=model.device)
    h = model(ids[:, :-1], return_hidden=True)
    return math.exp(F.cross_entropy(model.lm_head(h[0]).float(), ids[0, 1:]).item())


def generate_and_check(model, tok, prompts: list[list[int]], a, label: str) -> dict:
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), a.gen_batch):        # 贪心解码：同一个模型总给出同样的回答
        outs += generate_batch(model, prompts[i:i + a.gen_batch], a.max_new_tokens, stop_ids=tok.eos_ids)
    texts, reasons = [], []
    for o in outs:
        text = tok.decode(o).strip()
        finished = len(o) < a.max_new_tokens               # 用完 max_new_tokens 还没停 = 没写完
        ok, why = check_answer(text) if finished else (False, "太长（没写完）")
        texts.append(text)
        reasons.append(why)
    n_pass = sum(r == "通过" for r in reasons)
    res = {"pass_rate": n_pass / len(texts), "n": len(texts), "outputs": texts, "reasons": reasons,
           "mean_words": sum(len(t.split()) for t in texts) / len(texts), "seconds": time.perf_counter() - t0}
    counts = {r: reasons.count(r) for r in dict.fromkeys(reasons)}
    print(f"  [{label}] 检查器通过率 {res['pass_rate']:.1%}（{n_pass}/{len(texts)}），平均 {res['mean_words']:.1f} 词；"
          f"原因分布 {counts}（{res['seconds']:.0f} 秒）")
    return res


def evaluate(model, tok, held_enc, ref_held, gen_prompts, a, label: str, beta: float) -> dict:
    m = preference_metrics(model, held_enc, ref_held, beta, a.kl_n)
    m["neutral_ppl"] = neutral_perplexity(model, tok)
    print(f"  [{label}] 留出对：奖励准确率 {m['reward_accuracy']:.1%}，平均 margin {m['mean_margin']:+.3f}，"
          f"按每 token 更偏向 chosen {m['prefers_chosen_per_token']:.1%}；KL(π‖π_ref) {m['kl_per_token']:.4f}/token；"
          f"中性文本困惑度 {m['neutral_ppl']:.2f}")
    m["generation"] = generate_and_check(model, tok, gen_prompts, a, label)
    return m


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    from common.cli import add_max_new_tokens, existing_file, non_negative_float
    p = course_parser(NAME, __doc__, groups=("device",))
    p.add_argument("--beta", type=positive_float, default=0.1, help="DPO 的 β：越大，越不许模型离参考模型太远")
    p.add_argument("--beta-alt", type=positive_float, default=1.0, help="对比用的第二个 β（--quick 不跑）")
    p.add_argument("--lr", type=positive_float, default=3e-4,
                   help="LoRA 学习率（SFT 基线用同一个）。DPO 的 loss 很快就接近 0，AdamW 仍按 lr 大小的步子推，lr 太大会训坏")
    p.add_argument("--fail-lr-mult", type=non_negative_float, default=30.0,
                   help="失败模式：用 lr × 这个倍数再训练一次 DPO（0 = 不跑；--quick 不跑）")
    add_knob(p, "--steps", type=positive_int, default=30, quick=6, help="每次训练的步数")
    p.add_argument("--fail-steps", type=positive_int, default=10, help="失败模式那次训练的步数（坏掉只需要几步）")
    add_knob(p, "--time-budget", type=positive_float, default=3.0, quick=1.0,
             help="每次训练的时间上限（分钟）。只是安全上限：被它截断时会大声提示")
    p.add_argument("--nll-weight", type=non_negative_float, default=0.0,
                   help="DPO 损失再加上 chosen 的 NLL × 这个权重（0 = 纯 DPO；Llama 3 用 0.2）")
    p.add_argument("--rejected", choices=["data", "model"], default="data",
                   help="DPO 的 rejected：data = 数据里写好的差回答；model = 基座模型自己生成的回答（SPIN 式，训练前先生成）")
    p.add_argument("--sft-steps", type=int, default=0,
                   help="再加一次标准流程：先 SFT 这么多步，再以 SFT 后的模型为参考做 DPO，总步数仍是 --steps（0 = 不跑）")
    add_knob(p, "--batch-size", type=positive_int, default=4, quick=2, help="每步几对偏好数据")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA 的秩 r（alpha = 2r）")
    add_knob(p, "--eval-n", type=positive_int, default=64, quick=8, help="生成评估用几条留出提示")
    add_knob(p, "--eval-pairs", type=positive_int, default=32, quick=8, help="算奖励准确率用几对留出数据")
    add_max_new_tokens(p, 48, "评估时每条回答最多生成多少个新 token（用完还没结束算\"太长\"）")
    p.add_argument("--data", type=existing_file, default=DATA_DIR / "train.json", help="训练偏好数据")
    p.add_argument("--heldout", type=existing_file, default=DATA_DIR / "heldout.json", help="留出偏好数据")
    a = p.parse_args(argv)
    a.kl_n, a.gen_batch = min(16, a.eval_pairs), 64
    if not 0 <= a.sft_steps < a.steps:
        p.error(f"--sft-steps 要在 0 到 --steps - 1（{a.steps - 1}）之间：SFT 之后至少要留 1 步给 DPO")
    return a


def check_data(train_rows, held_rows) -> None:
    """自检：检查器必须让每个 chosen 通过、每个 rejected 不通过，训练和留出的问题不能重复。"""
    bad = [r["prompt"] for r in train_rows + held_rows
           if not check_answer(r["chosen"])[0] or check_answer(r["rejected"])[0]]
    if bad:
        raise UserError(f"数据与检查器不一致（{len(bad)} 对，例如 {bad[0]!r}）：chosen 应通过、rejected 应不通过。")
    if {r["prompt"] for r in train_rows} & {r["prompt"] for r in held_rows}:
        raise UserError("训练数据和留出数据有相同的问题：留出评估就不公平了。")


def fresh_policy(base, a):
    """从原模型复制一份并注入新的 LoRA（同一个种子 → 每次运行的初始适配器相同，B = 0）。"""
    model = copy.deepcopy(base)
    torch.manual_seed(a.seed)
    inject_lora(model, TARGETS, a.rank, a.rank * ALPHA_OVER_RANK)
    return model


def show_data(train_rows, held_rows, enc) -> None:
    ex = train_rows[0]
    print(f"训练 {len(train_rows)} 对，留出 {len(held_rows)} 对（问题的主题与训练不重叠）。一对例子：\n"
          f"  问题：{ex['prompt']}\n  chosen  ：{ex['chosen']}\n  rejected：{ex['rejected']}")
    print(f"检查器（只用于评估）：≤ {MAX_WORDS} 个词，并以一个 ≤ {MAX_QUESTION_WORDS} 词的追问结尾。"
          f"自检：全部 chosen 通过、全部 rejected 不通过。")
    lc, lr = [len(e[1]) for e in enc], [len(e[2]) for e in enc]
    print(f"回答长度（token，含 <|im_end|>）：chosen 平均 {sum(lc) / len(lc):.1f}，rejected 平均 {sum(lr) / len(lr):.1f}")


@torch.no_grad()
def show_logprobs(base, train_rows, enc) -> None:
    k = next(i for i, r in enumerate(train_rows) if r.get("kind") == "ramble")
    pc, pr = sequence_logprobs(base, [enc[k][0]] * 2, [enc[k][1], enc[k][2]]).tolist()
    nc, nr = len(enc[k][1]), len(enc[k][2])
    print(f"一对 ramble 数据：log p(chosen) = {pc:.2f}（{nc} 个 token，平均每个 {pc / nc:.2f}），"
          f"log p(rejected) = {pr:.2f}（{nr} 个 token，平均每个 {pr / nr:.2f}）")
    print(f"基座模型{'给 rejected 更高的平均每 token log p' if pr / nr > pc / nc else '给 chosen 更高的平均每 token log p'}；"
          f"而总和{'更偏向 chosen' if pc > pr else '更偏向 rejected'}。总和受长度影响，所以 DPO 不直接比较 log p，"
          f"而是比较\"相对参考模型各变了多少\"。")
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
    from common.local_model import load_local_model
    lm = load_local_model(dtype="fp32", device=device)
    base, tok = lm.model, lm.tokenizer
    print(f"模型：{lm.name}，设备 {device}，{torch.get_num_threads()} 个 CPU 线程。本地模型只懂英文，所以数据是英文的。")

    print("\n== 1. 偏好数据和检查器 ==")
    enc = [encode_pair(tok, r) for r in train_rows]
    held_enc = [encode_pair(tok, r) for r in held_rows[:a.eval_pairs]]
    gen_rows = held_rows[:a.eval_n]
    gen_prompts = [encode_pair(tok, r)[0] for r in gen_rows]
    show_data(train_rows, held_rows, enc)

    print("\n== 2. 序列对数概率 log p(回答 | 问题)：只对回答 token 求和 ==")
    show_logprobs(base, train_rows, enc)

    runs = {}
    ref_held = heldout_logprobs(base, held_enc)          # base 没有适配器：它就是参考模型

    print("\n== 3. 训练前：基座模型（= 参考模型）==")
    runs["base"] = evaluate(base, tok, held_enc, ref_held, gen_prompts, a, "基座", a.beta)
    plan = [("sft", "SFT(只学 chosen)", None, a.lr, a.steps), ("dpo", f"DPO β={a.beta:g}", a.beta, a.lr, a.steps)]
    if not a.quick:
        plan.append(("dpo_beta_alt", f"DPO β={a.beta_alt:g}", a.beta_alt, a.lr, a.steps))
        if a.fail_lr_mult > 0:
            plan.append(("dpo_high_lr", f"DPO β={a.beta:g} lr×{a.fail_lr_mult:g}", a.beta, a.lr * a.fail_lr_mult,
                         a.fail_steps))
    if a.sft_steps:
        plan.append(("sft_dpo", f"SFT{a.sft_steps}→DPO β={a.beta:g}", a.beta, a.lr, a.steps))
    if a.rejected == "model":                            # SPIN 式：rejected = 基座模型自己的回答
        enc = show_self_rejected(base, tok, enc, a, max(p[4] for p in plan))
    ref_train = ReferenceLogprobs(enc)
    for n, (key, label, beta, lr, steps) in enumerate(plan, 4):
        what = ("只在 chosen 上做 SFT（基线）" if beta is None else f"DPO，β={beta:g}" if key != "sft_dpo" else
                f"先 SFT {a.sft_steps} 步，再以 SFT 后的模型为参考做 {steps - a.sft_steps} 步 DPO（β={beta:g}）")
        print(f"\n== {n}. 训练 {label}：{what}，{steps} 步 × {a.batch_size} 对，lr {lr:g}，LoRA r={a.rank} ==")
        model = fresh_policy(base, a)
        objective = sft_objective if beta is None else dpo_objective(ref_train, beta, a.nll_weight)
        path = out / f"adapter_{key}.safetensors"
        tr = (sft_then_dpo(model, enc, a, label, beta, lr, steps, path) if key == "sft_dpo" else
              train(model, enc, objective, a, label, lr, steps, path))
        print(training_facts(tr))
        runs[key] = {**evaluate(model, tok, held_enc, ref_held, gen_prompts, a, label, a.beta if beta is None else beta),
                     "train": tr, "beta": beta, "lr": lr, "label": label}
        del model
        save_results(out, {"partial": True, "runs": runs})       # 中途的结果也留下（万一后面被中断）
    report(runs, gen_rows, a, out, time.perf_counter() - t_run)


def report(runs: dict, gen_rows, a, out: Path, seconds: float) -> None:
    print(f"\n== 汇总（本次运行实测；生成评估 {runs['base']['generation']['n']} 条留出提示，贪心解码）==")
    print(f"{'模型':<22}{'步数':>5}{'检查器通过率':>10}{'平均词数':>8}{'奖励准确率':>9}{'平均margin':>11}"
          f"{'KL/token':>10}{'中性困惑度':>9}")
    for key, r in runs.items():
        steps = r["train"]["steps"] if "train" in r else 0
        g = r["generation"]
        print(f"{r.get('label', '基座（参考模型）'):<22}{steps:>5}{g['pass_rate']:>14.1%}{g['mean_words']:>11.1f}"
              f"{r['reward_accuracy']:>13.1%}{r['mean_margin']:>+13.3f}{r['kl_per_token']:>10.4f}{r['neutral_ppl']:>13.2f}")

    print("\n并排对比（留出问题，贪心解码）：")
    for i in range(min(3, len(gen_rows))):
        print(f"  问题：{gen_rows[i]['prompt']}")
        for key in [k for k in ("base", "sft", "dpo", "sft_dpo") if k in runs]:
            g = runs[key]["generation"]
            print(f"    {runs[key].get('label', '基座'):<16}[{g['reasons'][i]}] {g['outputs'][i]!r}")

    base_p, sft_p, dpo_p = (runs[k]["generation"]["pass_rate"] for k in ("base", "sft", "dpo"))
    gain = dpo_p - base_p
    goal = {"dpo_minus_base_points": 100 * gain, "dpo_minus_sft_points": 100 * (dpo_p - sft_p),
            "raised_by_30_points": gain >= 0.30, "beats_sft": dpo_p > sft_p}
    equal_steps = runs["sft"]["train"]["steps"] == runs["dpo"]["train"]["steps"]
    print(f"\nDPO 对基座：检查器通过率 {base_p:.1%} → {dpo_p:.1%}（{100 * gain:+.1f} 个百分点）。")
    print(f"同样步数下 DPO 对只学 chosen 的 SFT：SFT {sft_p:.1%} vs DPO {dpo_p:.1%}，"
          f"{'DPO 更好' if goal['beats_sft'] else ('打平' if dpo_p == sft_p else 'SFT 更好')}"
          f"{'' if equal_steps else '（注意：两者的实际步数不同，见上面的时间预算提示）'}。")
    if "sft_dpo" in runs:
        p2 = runs["sft_dpo"]["generation"]["pass_rate"]
        goal.update(sft_dpo_minus_sft_points=100 * (p2 - sft_p), sft_dpo_beats_sft=p2 > sft_p)
        print(f"标准流程 {runs['sft_dpo']['label']}（共 {runs['sft_dpo']['train']['steps']} 步，和 SFT 一样多）：{p2:.1%}，"
              f"比 SFT {'高' if p2 > sft_p else '低' if p2 < sft_p else '持平'} {100 * abs(p2 - sft_p):.1f} 个百分点。"
              f"（表里它的奖励准确率、margin、KL 和其他运行一样，都相对基座模型；它训练时的参考模型是 SFT 后的模型。）")
    if "dpo_beta_alt" in runs:
        b, c = runs["dpo"], runs["dpo_beta_alt"]
        closer = "更小" if c["kl_per_token"] < b["kl_per_token"] else "更大"
        print(f"β 的作用：β={a.beta:g} 时 KL {b['kl_per_token']:.4f}、通过率 {b['generation']['pass_rate']:.1%}；"
              f"β={a.beta_alt:g} 时 KL {c['kl_per_token']:.4f}（{closer}）、通过率 {c['generation']['pass_rate']:.1%}。")
    if "dpo_high_lr" in runs:
        f, b0 = runs["dpo_high_lr"], runs["base"]
        print(f"失败模式（lr × {a.fail_lr_mult:g}）：中性文本困惑度 {b0['neutral_ppl']:.2f} → {f['neutral_ppl']:.2f}"
              f"（{f['neutral_ppl'] / b0['neutral_ppl']:.1f} 倍），KL {f['kl_per_token']:.4f}，"
              f"通过率 {f['generation']['pass_rate']:.1%}。一个例子：{f['generation']['outputs'][0]!r}")

    png = plot_training(runs, out / "training.png")
    print(f"\n训练曲线：{png}")
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "reward_accuracy": {"before": runs["base"]["reward_accuracy"], "after": runs["dpo"]["reward_accuracy"]},
        "mean_margin": {"before": runs["base"]["mean_margin"], "after": runs["dpo"]["mean_margin"]},
        "checker_pass_rate": {k: r["generation"]["pass_rate"] for k, r in runs.items()},
        "kl_per_token": {k: r["kl_per_token"] for k, r in runs.items()},
        "neutral_ppl": {k: r["neutral_ppl"] for k, r in runs.items()},
        "goal": goal, "runs": runs, "total_seconds": seconds,
    }
    print(f"结果：{save_results(out, results)}（总用时 {seconds:.0f} 秒）")


def plot_training(runs: dict, path: Path) -> Path:
    fig, ax = new_figure(ncols=2)
    for key, r in runs.items():
        if "train" not in r:
            continue
        losses, h = r["train"]["losses"], r["train"]["history"]
        ax[0].plot(range(1, len(losses) + 1), losses, label=key)
        if h["margin"]:                                  # SFT→DPO：margin 从 DPO 阶段开始才有
            ax[1].plot(range(len(losses) - len(h["margin"]) + 1, len(losses) + 1), h["margin"], label=key)
    ax[0].set(xlabel="step", ylabel="training loss", title="loss (SFT: NLL on chosen; DPO: -log sigmoid(margin))")
    ax[1].set(xlabel="step", ylabel="batch mean margin", title="DPO implicit reward margin")
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    return save_figure(fig, path)


if __name__ == "__main__":
    run_cli(main)
