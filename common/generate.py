"""The one generation loop of the course (autoregressive decoding), for the local ``Llama``.

    for tok in generate(model, prompt_ids, 64, temperature=0.7, seed=0):   # yields token ids
        ...

Every lesson that generates with the local model goes through here (lessons 01, 02, 05, the
client, the serving lesson), so a change to how tokens are produced is made once:
  * ``on_step(step)``: called after every step with the token, the step's wall time and the
    logits, e.g. to count tokens, time them (lesson 02) or draw a progress bar;
  * ``logits_processor(generated, logits)``: may change the logits before sampling, e.g. mask
    tokens that would break a JSON schema (constrained decoding);
  * ``use_cache=False`` recomputes the whole sequence every step (slow: lesson 02 compares).
``generate_batch`` runs several prompts of different lengths together (left padding + mask);
each row's tokens equal what ``generate`` gives for that prompt alone (tests/test_generate.py).
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
    index: int              # 0 for the first new token
    token: int
    seconds: float          # wall time of this step: forward pass + sampling
    logits: torch.Tensor    # [vocab] next-token logits the token was sampled from (after processing)
    stop: bool              # the token is a stop token (it is not yielded)


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


@torch.inference_mode()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, use_cache: bool = True,
             stop_ids: Sequence[int] = (), on_step: Callable[[Step], None] | None = None,
             logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one per forward pass. temperature 0 = greedy."""
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
        feed = [tok] if use_cache else ids     # with a cache only the new token goes in


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                   pad_id: int = 0) -> list[list[int]]:
    """Generate for several prompts at once; returns each row's new tokens (stop token excluded).

    Prompts are padded on the left to one length and an attention mask hides the padding, so
    every prompt sees exactly what it would see alone. With sampling, row i draws from its own
    generator seeded ``seed + i`` (the same draws ``generate(..., seed=seed + i)`` makes).
    Decoding one token costs about one read of all weights whatever the batch size, which is why
    a batch is much faster per token than one prompt at a time on a CPU.
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
