"""投机解码（speculative decoding，贪心版）：便宜的"草稿"先猜 k 个 token，贵的目标模型一次前向把它们全部验证。

为什么能快：解码一个 token 时，目标模型要把全部权重从内存读一遍；一次前向喂进 k+1 个 token，权重同样只读一遍，
耗时几乎不变（第 2 课：有缓存的一步受限于读内存）。草稿猜对几个，目标模型一次前向就前进几个 token。

一轮（目标模型的缓存里已经有上下文，只差最后一个 token ``last`` 还没喂进去）：
  1. 草稿提议 d1..dk；
  2. 目标模型带 KV 缓存对 [last, d1, ..., dk] 做一次前向，得到每个位置的贪心选择 g0..gk
     （g0 = 目标模型在 last 之后会选的 token，g1 = 在 d1 之后会选的，……）；
  3. 从头比较：d1 == g0、d2 == g1 …… 接受最长的一致前缀 d1..dn，再加上目标模型自己的 g_n
     （第一个不一致处目标模型的选择；全对时是"奖励"token g_k）。所以每轮至少前进 1 个 token；
  4. 缓存退回（``KVCache.truncate``）到 last 和 d1..dn 为止：dn 之后那几列是按错误的草稿算的，作废。
每个被接受的 token 都等于目标模型在同样前缀上的贪心选择，所以输出和目标模型单独贪心生成的 token 完全相同
（tests/test_10_quantize.py 检查；浮点上只差在"一次前向算 k+1 个位置"和"一次算 1 个"的舍入，
极少数几乎平局的位置理论上可能翻转——第 10 课对每个结果都实际比一遍）。

两种草稿：
  * ``ModelDraft``：一个更小或量化过的模型（有自己的 KV 缓存），一个一个贪心地猜；
  * ``PromptLookupDraft``：不用模型——在上下文里找到最近一次出现的"最后几个 token"，把它后面的 token 抄过来
    （prompt lookup decoding）。回答在复述上下文时（RAG），一猜一长串；其余时候常常什么也提不出来。
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SpecStats:
    """一次投机解码的账：每轮提议了几个、接受了几个，目标模型前向了几次，时间花在哪边。

    恒等式：产出的 token 数 ``emitted`` = 1（预填充给出的第一个）+ 接受的草稿数 + 轮数。
    遇到停止符时，返回的 token 在停止符前截断（``emitted`` 仍是截断前的个数）。"""
    k: int
    emitted: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    per_round: list = field(default_factory=list)      # 每轮 (提议数, 接受数)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0

    def record(self, proposed: int, accepted: int) -> None:
        self.rounds += 1
        self.proposed += proposed
        self.accepted += accepted
        self.per_round.append((proposed, accepted))

    @property
    def acceptance(self) -> float:
        """草稿 token 被接受的比例（一个都没提议过时是 0）。"""
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict:
        return {"k": self.k, "emitted": self.emitted, "rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "target_calls": self.target_calls, "acceptance": self.acceptance,
                "draft_seconds": self.draft_seconds, "target_seconds": self.target_seconds}


class ModelDraft:
    """用一个模型当草稿：它有自己的 KV 缓存，缓存里是它已经"读过"的 token（``self.fed``）。
    每次提议前，先把缓存退回到和新上下文一致的最长前缀（上一轮被拒绝的草稿要丢掉），再喂进还没读过的部分。"""

    def __init__(self, model, max_len: int):
        self.model = model
        self.cache = model.new_cache(1, max_len)
        self.fed: list[int] = []

    @torch.inference_mode()
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        keep = 0
        limit = min(len(self.fed), len(context) - 1)        # 至少留一个 token 要喂，才拿得到下一个的 logits
        while keep < limit and self.fed[keep] == context[keep]:
            keep += 1
        self.cache.truncate(keep)
        self.fed = list(context[:keep])
        feed, out = list(context[keep:]), []
        for _ in range(k):
            logits = self.model(torch.tensor([feed], device=self.model.device), cache=self.cache, last_only=True)[0]
            self.fed += feed
            feed = [int(logits.argmax())]
            out.append(feed[0])
        return out


class PromptLookupDraft:
    """prompt lookup：取上下文最后 n 个 token（n 从 max_ngram 试到 1），找它在前面最近一次出现的位置，
    提议紧跟在那次出现后面的 k 个 token。找不到就不提议（这一轮退化成普通的一步解码）。"""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = list(context)
        for n in range(min(self.max_ngram, len(ctx) - 1), 0, -1):
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):          # 从后往前找：最近的一次出现
                if ctx[start:start + n] == tail:
                    return ctx[start + n:start + n + k]
        return []


def rag_prompt() -> str:
    """prompt lookup 最擅长的提示词：一段公司制度（第 03 课的英文文档）+ 一个要求逐字引用原文回答的问题。"""
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "data" / "rag" / "en" / "leave_policy.md").read_text(encoding="utf-8")[:900]
    return (f"Read the policy below.\n\n{doc}\n\nQuestion: How many days of paid vacation do full-time employees get, "
            "and how many can they carry over? Answer by quoting the sentences from the policy word for word.")


def summarize_runs(runs: list[dict]) -> dict:
    """几次运行合在一起：接受率 = 接受的草稿数 / 提议的草稿数；加速比 = 目标模型单独生成的总时间 / 投机解码的总时间。
    每次运行是 SpecStats.as_dict() 加上 seconds、reference_seconds、plain_fp32_seconds、tokens、identical。"""
    total = sum(r["seconds"] for r in runs)
    prop, acc = sum(r["proposed"] for r in runs), sum(r["accepted"] for r in runs)
    return {"acceptance": acc / prop if prop else 0.0, "speedup": sum(r["reference_seconds"] for r in runs) / total,
            "speedup_vs_plain_fp32": sum(r["plain_fp32_seconds"] for r in runs) / total,
            "identical": all(r["identical"] for r in runs), "draft_share": sum(r["draft_seconds"] for r in runs) / total,
            "tokens_per_target_call": sum(r["tokens"] for r in runs) / sum(r["target_calls"] for r in runs)}


def prepack_for_cpu(model):
    """验证一步要把 k+1 个 token 一起乘过每个权重矩阵。PyTorch 默认的 CPU 矩阵乘在 1 行时走"矩阵 × 向量"的快路径，
    2 行起换成通用矩阵乘，每次调用都要重新整理（pack）一遍权重：实测 2～7 行比 1 行慢一倍多，验证就不便宜了。
    oneDNN（mkldnn）的线性层把 fp32 权重预先排成它的分块布局，1 行和 7 行都快（第 10 课实测）。
    返回一个权重相同、布局不同的副本（原模型不变）；权重值不变，只是求和顺序不同，logits 差在 1e-4 量级。
    不是 CPU、或者这个 torch 没有 oneDNN 时原样返回。"""
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return model
    from torch.utils import mkldnn

    packed = copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]})   # 权重共用，不复制
    for mod in list(packed.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(mod, name, mkldnn.to_mkldnn(child))
    return packed


@torch.inference_mode()
def speculative_generate(target, draft, prompt_ids: Sequence[int], max_new_tokens: int, k: int,
                         stop_ids: Sequence[int] = ()) -> tuple[list[int], SpecStats]:
    """贪心投机解码：返回 (新 token，不含停止符；SpecStats)。draft 是有 propose(context, k) 的对象。"""
    stats, stop, dev = SpecStats(k=k), set(stop_ids), target.device
    ctx = list(prompt_ids)
    cache = target.new_cache(1, len(ctx) + max_new_tokens + k + 1)
    t0 = time.perf_counter()
    logits = target(torch.tensor([ctx], device=dev), cache=cache, last_only=True)[0]    # 预填充
    stats.target_calls += 1
    out = [int(logits.argmax())]
    stats.target_seconds += time.perf_counter() - t0
    # 不变量：缓存里是 ctx + out[:-1]，out[-1] 还没喂给目标模型
    while len(out) < max_new_tokens and not stop & set(out):
        n_draft = min(k, max_new_tokens - len(out) - 1)          # 不会生成超过 max_new_tokens 个
        t0 = time.perf_counter()
        proposal = list(draft.propose(ctx + out, n_draft))[:n_draft] if n_draft > 0 else []
        t1 = time.perf_counter()
        feed = torch.tensor([[out[-1], *proposal]], device=dev)
        best = target(feed, cache=cache)[0].argmax(-1).tolist()     # [1 + 提议数]：每个位置的贪心选择
        n = 0
        while n < len(proposal) and proposal[n] == best[n]:
            n += 1
        cache.truncate(len(ctx) + len(out) + n)                   # 保留 last 和被接受的 n 个草稿
        out += proposal[:n] + [best[n]]
        stats.target_calls += 1
        stats.record(len(proposal), n)
        stats.draft_seconds += t1 - t0
        stats.target_seconds += time.perf_counter() - t1
    stats.emitted = len(out)
    first_stop = next((i for i, t in enumerate(out) if t in stop), len(out))
    return out[:first_stop], stats
