"""从 logits 里选出下一个 token：贪心、温度（temperature）、top-k、top-p（nucleus），可用种子复现。"""
from __future__ import annotations

import torch

from common.errors import UserError


def check_sampling_args(temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
    """检查用户给的采样参数；不合法时报一行中文错误。"""
    if temperature is None or temperature < 0:
        raise UserError(f"--temperature 必须 ≥ 0（收到 {temperature}）：0 表示贪心，常用 0.7～1.0。")
    if top_k is None or top_k < 0:
        raise UserError(f"--top-k 必须 ≥ 0（收到 {top_k}）：0 表示不限制。")
    if top_p is None or not (0.0 < top_p <= 1.0):
        raise UserError(f"--top-p 必须在 (0, 1] 之间（收到 {top_p}）：1 表示不限制。")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """对一维 logits [V] 算出真正用来抽样的概率分布。

    temperature 为 0 -> 全部概率都给 argmax（贪心）。top_k 只留概率最高的 k 个 token，
    top_p 只留"概率加起来刚好达到 p"的最小集合；其余 token 的概率都设为 0，再重新归一化。
    """
    logits = logits.float()
    if temperature == 0:
        probs = torch.zeros_like(logits)
        probs[logits.argmax()] = 1.0
        return probs
    probs = torch.softmax(logits / temperature, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        keep &= probs >= kth
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=0) - sorted_p       # 排在它前面（更可能）的 token 的概率之和
        keep_sorted = before < top_p                            # 前面累计还没到 p 就留下（第一个总会留下）
        keep_p = torch.zeros_like(keep)
        keep_p[order[keep_sorted]] = True
        keep &= keep_p
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum()


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> int:
    """从一维 logits [V] 里选出一个 token id。temperature 为 0 就是贪心（取 argmax）。"""
    if temperature == 0:
        return int(logits.argmax())
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
