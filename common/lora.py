"""从零写起的 LoRA（低秩适配，low-rank adaptation）：第 5 课讲它，第 8 课（DPO）接着用它。

    y = W x + (alpha / r) * B (A dropout(x))       W 冻结不动；只训练 A [r, in] 和 B [out, r]

B 初始化为全零，所以刚注入 LoRA 的模型在第一次更新之前，算出的结果和原模型完全一样；r 远小于
in 和 out，要训练的参数只占原来的一小部分。``merge`` 把低秩增量加进 W（推理时不再有额外开销），
``unmerge`` 用保存的副本把 W 一位不差地恢复回来。``adapters_disabled(model)`` 暂时关掉所有
适配器：这期间模型就是冻结的原模型——DPO 正是这样得到参考模型的，不需要再复制一份权重。
（一个适配器只有 A 和 B，存成文件也很小：见 save_adapter / load_adapter。）
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

# --targets 里的简称 -> common/llama.py 每个 Block 里对应的模块名
TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base                                   # 原来的那一层，冻结不训练
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))   # 和 nn.Linear / PEFT 一样的随机初始化
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.enabled = True                                # False：表现得和原来那一层完全一样
        self._saved_weight = None                          # merge 之前 W 的副本（unmerge 靠它精确恢复）

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.enabled:                # merge 过了：增量早已加进 W 里
            return y
        # 先乘 A（降到 r 维），再乘 B（升回 out 维）：只要 r*(in+out) 次乘加，而不是 in*out 次
        return y + (self.dropout(x) @ self.A.T @ self.B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale              # [out, in]，形状和 W 一样，秩 <= r

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._saved_weight = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """用保存的副本把 W 一位不差地恢复（用 W - delta 减回去会有舍入误差，不精确）。"""
        if self.merged:
            self.base.weight.copy_(self._saved_weight)
            self._saved_weight, self.merged = None, False


def parse_targets(text: str) -> list[str]:
    aliases = {"attn": "q,k,v,o", "mlp": "gate,up,down", "all": "q,k,v,o,gate,up,down"}
    names = [t.strip().lower() for t in aliases.get(text.strip().lower(), text).split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise UserError(f"--targets 里有不认识的名字 {bad or text!r}：可选 {','.join(TARGETS)}（或 attn / mlp / all）。")
    return list(dict.fromkeys(names))  # 去掉重复，保持原来的顺序


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> dict[str, LoRALinear]:
    """把每个 Block 里选中的 nn.Linear 换成 LoRALinear。事先把原模型的参数全部冻结，
    所以之后只有 A 和 B 两个矩阵参与训练。"""
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
    """在 with 块里所有适配器都关掉：模型算的就是冻结的原模型。"""
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
    """只保存 A 和 B（safetensors 格式），超参数写进文件的元数据。先写到临时文件再改名，
    所以中途被打断也不会留下半个文件。"""
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
    """把适配器读进一个用相同 targets/rank 注入过 LoRA 的模型；返回文件里的元数据。"""
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
