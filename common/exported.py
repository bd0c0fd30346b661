"""Serve a lesson-04 tiny GPT with lesson 06's engine, without lesson 04's code.

Lesson 04 exports its model with ``torch.export`` when training ends (``model.pt2`` beside the
checkpoints: the forward pass as a graph, see ``common.training.export_model``). A server needs only
that file plus a checkpoint's weights and tokenizer - the way production serving loads an exported
artifact instead of importing the training code.

The tiny GPT has no KV cache (it is small and its context is 64-256 tokens), so ``TokenRows`` stands in
for one: it keeps each row's tokens, and every step re-runs the model on each row's last ``block_size``
tokens (the sliding window lesson 04's ``generate`` uses). Rows are right-padded: with causal attention
a position never sees the padding after it, so a row's logits do not depend on the other rows.
``TinyGPTModel`` and ``TokenRows`` offer the small part of ``common.llama``'s interface that the
engine uses (``new_cache``, ``reset_rows``, ``first_rows``, a call with ``cache``/``attention_mask``/
``last_only``), so the same engine serves either model.
"""
from __future__ import annotations

import copy
import types
from pathlib import Path

import torch

from common.errors import UserError
from common.training import EXPORT_NAME, export_matches, load_checkpoint, tokenizer_from_state


class TokenRows:
    """The 'cache' of a model without a KV cache: the tokens each row has been fed so far."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long)
        self.lengths = torch.zeros(batch, dtype=torch.long)

    def reset_rows(self, rows) -> None:
        self.lengths[torch.as_tensor(rows, dtype=torch.long)] = 0

    def first_rows(self, n: int) -> "TokenRows":
        """A view of rows 0..n-1 (shares storage: writes go to this cache)."""
        view = copy.copy(self)
        view.batch, view.tokens, view.lengths = n, self.tokens[:n], self.lengths[:n]
        return view


class TinyGPTModel:
    """An exported lesson-04 GPT behind the engine's model interface."""

    def __init__(self, program: torch.nn.Module, block_size: int):
        self.program, self.block_size = program, block_size
        self.device = torch.device("cpu")

    def new_cache(self, batch: int, max_len: int) -> TokenRows:
        return TokenRows(batch, max_len)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: TokenRows, attention_mask: torch.Tensor | None = None,
                 last_only: bool = True) -> torch.Tensor:
        """ids, attention_mask: [n, T] (right-padded new tokens) -> next-token logits [n, V]."""
        if not last_only:
            raise ValueError("TinyGPTModel only returns the last position's logits")
        n = ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        windows = []
        for r in range(n):
            k, start = int(mask[r].sum()), int(cache.lengths[r])
            if start + k > cache.max_len:
                raise ValueError(f"row {r} is longer than the cache ({cache.max_len} tokens)")
            cache.tokens[r, start:start + k] = ids[r, :k]
            cache.lengths[r] = start + k
            windows.append(cache.tokens[r, max(0, start + k - self.block_size):start + k])
        # the export was traced for batch >= 2 and length >= 2: pad up to that (padding never changes a row)
        T = max(2, max(len(w) for w in windows))
        batch = torch.zeros(max(n, 2), T, dtype=torch.long)
        for r, w in enumerate(windows):
            batch[r, :len(w)] = w
        logits = self.program(batch)[0]                      # [max(n,2), T, V]
        last = torch.tensor([max(len(w), 1) - 1 for w in windows])
        return logits[torch.arange(n), last]                 # [n, V]


class TextDecoder:
    """Streaming decode for tokenizers without byte-level pieces: decode everything so far, send what is new
    (a trailing U+FFFD means an unfinished multi-byte character: wait for the next token)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], 0

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new, self.sent = text[self.sent:], len(text)
        return new


class PlainTextTemplate:
    """A tokenizer for a model that never learned a chat format (lesson 04 trains on plain text):
    the 'chat template' is the messages' text, one per line, which the model then continues."""

    eos_ids: tuple = ()

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = "".join(str(m.get("content") or "") + "\n" for m in messages)
        return self.tok.encode(text) if text else []

    def stream_decoder(self) -> TextDecoder:
        return TextDecoder(self)


def load_tiny_gpt(checkpoint: Path):
    """A lesson-04 checkpoint (+ the model.pt2 beside it) -> an object with .model, .tokenizer, .model_id."""
    checkpoint = Path(checkpoint)
    ck = load_checkpoint(checkpoint)
    graph = checkpoint.parent / EXPORT_NAME
    fix = f"python 04_tiny_gpt.py --sample-only --checkpoint {checkpoint}"   # exports when missing or stale
    matches = export_matches(checkpoint.parent, ck["model_config"])
    if matches is None:
        raise UserError(f"{checkpoint.parent} 里没有 {EXPORT_NAME}（第 04 课训练结束时才导出）；运行 {fix} 导出它")
    if matches is False:
        raise UserError(f"{graph} 不是从这个检查点的模型导出的（例如 --overwrite 换了模型大小后留下的旧文件）；"
                        f"运行 {fix}，它会重新导出")
    try:
        program = torch.export.load(str(graph)).module()
        program.load_state_dict(ck["model"], strict=True)
    except Exception as e:  # noqa: BLE001 - the metadata matched, so the file itself is broken
        raise UserError(f"{graph} 已损坏（{type(e).__name__}）；删除它，再运行 {fix} 重新导出") from None
    return types.SimpleNamespace(model=TinyGPTModel(program, ck["model_config"]["block_size"]),
                                 tokenizer=PlainTextTemplate(tokenizer_from_state(ck["tokenizer"])),
                                 model_id=f"tiny-gpt-{checkpoint.parent.name}")
