"""整个课程唯一的生成循环（自回归解码：一次生成一个 token），给本地的 ``Llama`` 用。

    for tok in generate(model, prompt_ids, 64, temperature=0.7, seed=0):   # 每次产出一个 token id
        ...

凡是用本地模型生成的地方（第 1、2、5 课，客户端，讲服务的那一课）都走这里，所以"token 怎么产生"
要改的话只改这一处：
  * ``on_step(step)``：每一步结束后调用，传入这一步的 token、实际耗时和 logits，可以用来数 token、
    计时（第 2 课）或者画进度条；
  * ``logits_processor(generated, logits)``：采样之前可以改 logits，比如把会破坏 JSON schema 的
    token 屏蔽掉（约束解码）；
  * ``use_cache=False``：每一步都把整个序列从头重算（很慢：第 2 课拿它做对比）。
``generate_batch`` 把几条长短不一的提示词放在一起生成（左边补 padding + 遮罩）；每一行得到的
token 和单独对那条提示词调用 ``generate`` 得到的完全相同（见 tests/test_generate.py）。
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from common.device import synchronize
from common.sampling import sample_next_token


@dataclass
class Step:
    index: int              # 第几个新 token（第一个是 0）
    token: int
    seconds: float          # 这一步实际花的时间：前向计算 + 采样
    logits: torch.Tensor    # [vocab] 采样这个 token 时用的 logits（已经过 logits_processor 处理）
    stop: bool              # 这个 token 是停止符（它不会被 yield 出去）


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


@torch.inference_mode()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, use_cache: bool = True,
             stop_ids: Sequence[int] = (), on_step: Callable[[Step], None] | None = None,
             logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None) -> Iterator[int]:
    """逐个产出新 token id，最多 max_new_tokens 个，每次前向计算产出一个。temperature 为 0 = 贪心。"""
    gen = _generator(seed)
    stop = set(stop_ids)
    device = model.device
    ids, new = list(prompt_ids), []
    cache = model.new_cache(1, len(ids) + max_new_tokens) if use_cache else None
    feed = ids
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        logits = model(torch.tensor([feed], device=device), cache=cache, last_only=True)[0]   # [vocab]
        if logits_processor is not None:
            logits = logits_processor(new, logits)
        tok = sample_next_token(logits, temperature, top_k, top_p, generator=gen)
        synchronize(device)
        if on_step is not None:
            on_step(Step(i, tok, time.perf_counter() - t0, logits, tok in stop))
        if tok in stop:
            return
        yield tok
        ids.append(tok)
        new.append(tok)
        feed = [tok] if use_cache else ids     # 有缓存时只需喂进新 token；没缓存就得喂整个序列


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                   pad_id: int = 0) -> list[list[int]]:
    """几条提示词一起生成；返回每一行生成的新 token（不含停止符）。

    提示词在左边补 padding 补到一样长，再用 attention mask 把 padding 遮住，所以每条提示词"看到"的
    和它单独生成时完全一样。采样时第 i 行用自己的随机数生成器，种子是 ``seed + i``（抽出的结果
    和 ``generate(..., seed=seed + i)`` 一模一样）。
    不管一批有几条，解码一个 token 都差不多要把全部权重读一遍，所以在 CPU 上按每个 token 算，
    一批一起生成比一条一条生成快得多。
    """
    if not prompts:
        return []
    B, L = len(prompts), max(len(p) for p in prompts)
    device = model.device
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):] = 1
    gens = [_generator(None if seed is None else seed + i) for i in range(B)]
    stop = set(stop_ids)
    cache = model.new_cache(B, L + max_new_tokens)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    logits = model(ids.to(device), cache=cache, attention_mask=mask.to(device), last_only=True)  # [B, vocab]
    for _ in range(max_new_tokens):
        if temperature == 0:
            toks = logits.argmax(-1).tolist()
        else:
            toks = [sample_next_token(logits[i], temperature, top_k, top_p, generator=gens[i]) for i in range(B)]
        for i, t in enumerate(toks):
            if not done[i]:
                if t in stop:
                    done[i] = True
                else:
                    out[i].append(t)
        if all(done):
            break
        logits = model(torch.tensor(toks, device=device)[:, None], cache=cache, last_only=True)
    return out
