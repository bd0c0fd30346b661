"""LoRA (low-rank adaptation), written from scratch: lesson 05 teaches it, lesson 08 (DPO) reuses it.

    y = W x + (alpha / r) * B (A dropout(x))       W frozen; only A [r, in] and B [out, r] train

B starts at zero, so an injected model computes exactly what the base model computes until the
first update. ``merge`` adds the low-rank delta into W (no extra cost at inference), ``unmerge``
restores W bit for bit from a saved copy. ``adapters_disabled(model)`` switches every adapter off
for a while: the model is then exactly the frozen base model, which is how DPO gets its reference
model without a second copy of the weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from common.errors import UserError

# short names of --targets -> module names inside each block of common/llama.py
TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base                                   # the original layer, frozen
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))   # the same random init as nn.Linear / PEFT
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.enabled = True                                # False: behave exactly like the base layer
        self._saved_weight = None                          # copy of W before merge (unmerge restores it exactly)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.enabled:                # merged: delta already inside W
            return y
        # A first (down to r dims), then B (back up to out): r*(in+out) multiply-adds instead of in*out
        return y + (self.dropout(x) @ self.A.T @ self.B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale              # [out, in], same shape as W, rank <= r

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._saved_weight = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W bit for bit from the saved copy (W - delta would only be exact up to rounding)."""
        if self.merged:
            self.base.weight.copy_(self._saved_weight)
            self._saved_weight, self.merged = None, False


def parse_targets(text: str) -> list[str]:
    aliases = {"attn": "q,k,v,o", "mlp": "gate,up,down", "all": "q,k,v,o,gate,up,down"}
    names = [t.strip().lower() for t in aliases.get(text.strip().lower(), text).split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise UserError(f"--targets 里有不认识的名字 {bad or text!r}：可选 {','.join(TARGETS)}（或 attn / mlp / all）。")
    return list(dict.fromkeys(names))  # unique, order kept


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> dict[str, LoRALinear]:
    """Replace the chosen nn.Linear of every block by a LoRALinear. All original parameters are frozen
    first, so afterwards only the A and B matrices train."""
    model.requires_grad_(False)
    wrapped = {}
    for i, layer in enumerate(model.layers):
        for t in targets:
            parent_name, attr = TARGETS[t].split(".")
            parent = getattr(layer, parent_name)
            lora = LoRALinear(getattr(parent, attr), rank, alpha, dropout)
            setattr(parent, attr, lora)
            wrapped[f"layers.{i}.{TARGETS[t]}"] = lora
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every adapter is off: the model computes exactly the frozen base model."""
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise RuntimeError("unmerge the adapters before disabling them")
    old = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, old):
            m.enabled = e


def save_adapter(model: nn.Module, path: Path, meta: dict) -> None:
    """Save only A and B (safetensors), hyper-parameters in the file's metadata. Written to a temp file
    and renamed, so an interruption never leaves half a file."""
    from safetensors.torch import save_file
    tensors = {}
    for n, m in lora_modules(model).items():
        tensors[f"{n}.A"] = m.A.detach().cpu().contiguous()
        tensors[f"{n}.B"] = m.B.detach().cpu().contiguous()
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_adapter(model: nn.Module, path: Path) -> dict:
    """Read an adapter into a model injected with the same targets/rank; return its metadata."""
    from safetensors import safe_open
    mods = lora_modules(model)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        keys = set(f.keys())
        want = {f"{n}.{ab}" for n in mods for ab in "AB"}
        if keys != want:
            raise UserError(f"适配器 {Path(path).name} 和当前模型的 LoRA 层对不上（targets/层数不同）；请用相同的 --targets 注入后再加载。")
        for n, m in mods.items():
            for ab in "AB":
                t = f.get_tensor(f"{n}.{ab}")
                p = getattr(m, ab)
                if t.shape != p.shape:
                    raise UserError(f"适配器里 {n}.{ab} 的形状 {tuple(t.shape)} 与模型 {tuple(p.shape)} 不同；请用相同的 --rank。")
                with torch.no_grad():
                    p.copy_(t)
    return meta
