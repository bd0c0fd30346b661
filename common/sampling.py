"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded."""
from __future__ import annotations

import torch

from common.errors import UserError


def check_sampling_args(temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
    """Validate user-facing sampling flags with Chinese messages."""
    if temperature is None or temperature < 0:
        raise UserError(f"--temperature 必须 ≥ 0（收到 {temperature}）：0 表示贪心，常用 0.7～1.0。")
    if top_k is None or top_k < 0:
        raise UserError(f"--top-k 必须 ≥ 0（收到 {top_k}）：0 表示不限制。")
    if top_p is None or not (0.0 < top_p <= 1.0):
        raise UserError(f"--top-p 必须在 (0, 1] 之间（收到 {top_p}）：1 表示不限制。")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The probability distribution that is actually sampled from, for 1-D logits [V].

    temperature 0 -> all mass on the argmax (greedy). top_k keeps the k most likely tokens,
    top_p keeps the smallest set whose probability reaches p; the rest get probability 0.
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
        before = torch.cumsum(sorted_p, dim=0) - sorted_p       # mass of strictly more likely tokens
        keep_sorted = before < top_p                            # keep until p is reached (always >= 1 token)
        keep_p = torch.zeros_like(keep)
        keep_p[order[keep_sorted]] = True
        keep &= keep_p
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum()


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> int:
    """Pick one token id from 1-D logits [V]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
