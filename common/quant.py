"""量化（quantization）的零件，第 10 课用，基准脚本也用。全部手写，可以一行一行读懂。

三组工具：
  1. 网格量化（``quantize`` / ``dequantize`` / ``fake_quant``）：把一个浮点矩阵映射到 2^bits 个等距的格点上。
       对称（absmax）：  scale = max|w| / qmax，      code = round(w / scale) ∈ [-qmax, qmax]，w ≈ code · scale
       非对称（min/scale）：scale = (max - min) / (2^bits - 1)，code = round((w - min) / scale) ∈ [0, 2^bits - 1]，
                         w ≈ code · scale + min
     一组数共用一个 scale（和 min）。"一组"可以是整个张量（per-tensor）、矩阵的一行 = 一个输出通道
     （per-channel），或者一行里连续的 group 个数（group-wise，GGUF/GPTQ/AWQ 常用 32、64、128）。
     组越小，一个离群值（outlier）能"拖累"的数越少，误差越小；代价是要多存 scale：每个权重多 16/group 比特。
  2. GGUF 的块格式 Q8_0、Q4_0、Q4_1（``gguf_quantize`` / ``gguf_dequantize``）：llama.cpp、Ollama 用的文件里
     每 32 个权重一块，块里先放 fp16 的 scale（Q4_1 还有 fp16 的 min），再放 32 个整数码。用 numpy 按
     llama.cpp 参考实现的每一步（同样的 float32 运算、同样的舍入）写出来，所以和 ``gguf.quants`` 逐字节相同
     （tests/test_10_quantize.py 检查）。
  3. 只量化权重的 int4 线性层（``Int4Linear``）：权重按 Q4_1 的思路（每 32 个一组，fp16 scale + min）存成
     4 比特，每次前向时"现场"反量化成 float32 再做矩阵乘。读的字节少了 6 倍多，但反量化本身要时间——
     第 10 课实测它在 CPU 上是快还是慢。
  4. 质量：留出文本上的平均 loss（``gpt_loss`` / ``llama_nll``），第 10 课用它们比较每种量化方案。
第 10 课的几样测量也在这里：``compare_with_gguf``（手写格式 vs gguf 包）、``requantize_shipped``（模型文件里的块
反量化再量化）、``weight_bytes_per_token`` / ``module_bytes`` / ``bandwidth_gb_s``（每 token 读多少字节、本机带宽）。
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ================================================================ 1. 网格量化（torch）
TENSOR, CHANNEL = "tensor", "channel"     # group 的两种特殊取值；整数 = 每组几个数（沿输入维度）


@dataclass
class Quantized:
    """一个量化后的矩阵：整数码 + 每组的 scale（非对称时还有 min）。codes/scale/zero 都按 [组数, 组大小] 排。"""
    codes: torch.Tensor       # int16 [G, g]：整数码
    scale: torch.Tensor       # float32 [G, 1]
    zero: torch.Tensor | None # float32 [G, 1]：非对称时每组的最小值 min，对称时 None
    shape: tuple              # 原来的形状
    bits: int
    pad: int = 0              # 行长不是组大小的整数倍时，每行末尾补了几个数（反量化时去掉）

    def dequantize(self, in_place: bool = False) -> torch.Tensor:
        """码 × scale（+ min）。in_place：码已经是 float32 时就在码上算，不另占一份内存（码随之变成结果）。"""
        w = self.codes.mul_(self.scale) if in_place else self.codes.float() * self.scale
        if self.zero is not None:
            w += self.zero
        if self.pad:
            w = w.reshape(self.shape[0], -1)[:, :-self.pad]
        return w.reshape(self.shape)


def _groups(w: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """按分组方式把 w 摆成 [组数, 组大小]：tensor → 1 组；channel → 每行一组；整数 g → 每行切成 g 个一组。
    行长不是 g 的整数倍时（比如 SmolLM2 的 576 = 4.5 × 128），每行末尾重复最后一个数补齐：
    补的数不改变最后一组的最大值和最小值，也就不改变它的 scale。返回 (分好的组, 每行补了几个)。"""
    w = w.float()
    if group == TENSOR:
        return w.reshape(1, -1), 0
    rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    if group == CHANNEL or int(group) >= rows.shape[1]:
        return rows, 0
    pad = -rows.shape[1] % int(group)
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return rows.reshape(-1, int(group)), pad


def _grid(g: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """分好组的 g [G, g] → (整数码（还是 float32 存着），每组的 scale，每组的 min 或 None)。"""
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)        # 每组的最小、最大值
    if symmetric:
        qmax = 2 ** (bits - 1) - 1                                   # int8：127；int4：7
        scale = torch.maximum(hi, -lo) / qmax                        # max|w| = max(最大值, −最小值)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)   # 全 0 的组：随便取个 scale，码全是 0
        return (g / scale).round_().clamp_(-qmax, qmax), scale, None
    levels = 2 ** bits - 1                                           # int8：255；int4：15
    scale = (hi - lo) / levels
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (g - lo).div_(scale).round_().clamp_(0, levels), scale, lo


def quantize(w: torch.Tensor, bits: int, symmetric: bool = True, group=CHANNEL) -> Quantized:
    """把 w 量化成 bits 比特的整数码（见模块说明里的两个公式）。"""
    g, pad = _groups(w, group)
    codes, scale, zero = _grid(g, bits, symmetric)
    return Quantized(codes.to(torch.int16), scale, zero, tuple(w.shape), bits, pad)


def dequantize(q: Quantized) -> torch.Tensor:
    return q.dequantize()


def fake_quant(w: torch.Tensor, bits: int, symmetric: bool = True, group=CHANNEL) -> torch.Tensor:
    """量化再反量化（"假量化"）：形状、类型不变，但每个数都落在了格点上——用来测量量化带来的误差。
    和 quantize(...).dequantize() 的结果逐位相同，只是码不转成 int16 再转回来、就地反量化（省一大半时间）。"""
    g, pad = _groups(w, group)
    codes, scale, zero = _grid(g, bits, symmetric)
    return Quantized(codes, scale, zero, tuple(w.shape), bits, pad).dequantize(in_place=True).to(w.dtype)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """相对误差 ‖w − ŵ‖ / ‖w‖（Frobenius 范数）：0 = 完全一样，1 = 和全 0 一样差。"""
    return float((w.float() - w_hat.float()).norm() / w.float().norm().clamp(min=1e-30))


def bits_per_weight(bits: int, group, symmetric: bool = True, cols: int | None = None, scale_bits: int = 16) -> float:
    """平均每个权重占几比特：码本身 bits 比特，加上摊到每个权重上的 scale（和 min）。
    per-channel 时一组 = 一行 cols 个数；per-tensor 时摊薄到几乎为 0（这里按 0 算）。"""
    per_group = scale_bits * (1 if symmetric else 2)
    size = cols if group == CHANNEL else None if group == TENSOR else int(group)
    return bits + (per_group / size if size else 0.0)


def group_label(group) -> str:
    return {TENSOR: "per-tensor", CHANNEL: "per-channel"}.get(group, f"group-{group}")


# ================================================================ 2. GGUF 的块格式（numpy，和 llama.cpp 逐字节相同）
QK = 32   # 每块 32 个权重
# 每块的字节数：fp16 的 scale 2 字节（Q4_1 再加 2 字节 min）+ 码（Q8_0 每个 1 字节，Q4_* 两个码挤进 1 字节）
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 2 + 2 + QK // 2}


def gguf_bits_per_weight(fmt: str) -> float:
    return BLOCK_BYTES[fmt] * 8 / QK


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.size % QK:
        raise ValueError(f"{x.size} values are not a whole number of {QK}-value blocks")
    return x.reshape(-1, QK)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """[n, 1] float32 → [n, 2] 字节：先舍入到 fp16（就近、平局取偶），再按小端取出两个字节。"""
    return v.astype(np.float16).view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """32 个 0..15 的码 → 16 字节：第 i 字节的低 4 位是第 i 个码，高 4 位是第 i+16 个码（llama.cpp 的排法）。"""
    return q[:, :QK // 2] | (q[:, QK // 2:] << np.uint8(4))


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & np.uint8(0x0F), b >> np.uint8(4)], axis=1)


def q8_0_quantize(x: np.ndarray) -> np.ndarray:
    """Q8_0：d = max|x| / 127，码 = round(x / d)（四舍五入、.5 远离 0），块 = [d 的 fp16 | 32 个 int8]。"""
    b = _blocks(x)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    y = b * inv
    a = np.abs(y)                  # C 的 roundf（.5 远离 0）。不能写 floor(a + 0.5)：a = 0.49999997 时 a + 0.5
    whole = np.floor(a)            # 在 float32 里舍入成 1.0，结果就错了；小数部分 × 2 再取整没有这个问题
    q = (np.sign(y) * (whole + np.floor(2 * (a - whole)))).astype(np.int8)
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)


def q8_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d).reshape(-1)


def q4_0_quantize(x: np.ndarray) -> np.ndarray:
    """Q4_0：对称，但用满 16 个码 -8..7：绝对值最大的那个数（带符号）正好落在 -8 上，d = 它 / -8。
    码 = trunc(x / d + 8.5) 限制在 0..15（存的是 码 + 8），块 = [d 的 fp16 | 16 字节]。"""
    b = _blocks(x)
    biggest = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    d = biggest / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(b * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)


def q4_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = _unpack_nibbles(blocks[:, 2:]).astype(np.float32) - np.float32(8)
    return (q * d).reshape(-1)


def q4_1_quantize(x: np.ndarray) -> np.ndarray:
    """Q4_1：非对称，d = (max − min) / 15，码 = trunc((x − min) / d + 0.5) ∈ 0..15，
    块 = [d 的 fp16 | min 的 fp16 | 16 字节]。SmolLM2 文件里的矩阵就是这个格式。"""
    b = _blocks(x)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc((b - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1)


def q4_1_dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (_unpack_nibbles(blocks[:, 4:]).astype(np.float32) * d + m).reshape(-1)


GGUF_FORMATS: dict[str, tuple[Callable, Callable]] = {
    "Q8_0": (q8_0_quantize, q8_0_dequantize),
    "Q4_0": (q4_0_quantize, q4_0_dequantize),
    "Q4_1": (q4_1_quantize, q4_1_dequantize),
}


def gguf_quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """任意形状的 float 数组 → [块数, 每块字节数] 的 uint8（元素总数必须是 32 的倍数）。
    大数组每 2^16 块分一段量化（结果一样）：临时数组小，不用为几百 MB 的临时内存反复向系统要页。"""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    step = QK << 16
    if x.size <= step:
        return GGUF_FORMATS[fmt][0](x)
    return np.concatenate([GGUF_FORMATS[fmt][0](x[i:i + step]) for i in range(0, x.size, step)])


def gguf_dequantize(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """[块数, 每块字节数]（或拉平的字节）→ 一维 float32。"""
    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, BLOCK_BYTES[fmt])
    return GGUF_FORMATS[fmt][1](blocks)


def compare_with_gguf(x: np.ndarray) -> dict:
    """手写的每种格式和 gguf 包的参考实现（``gguf.quants``）比：量化出的字节、反量化出的数是否完全相同。"""
    import gguf
    out = {}
    for fmt in GGUF_FORMATS:
        qtype = getattr(gguf.GGMLQuantizationType, fmt)
        ref = np.asarray(gguf.quants.quantize(x.reshape(64, -1), qtype)).reshape(-1, BLOCK_BYTES[fmt])
        mine = gguf_quantize(x, fmt)
        back = gguf_dequantize(mine, fmt)
        out[fmt] = {"blocks": len(mine), "bytes_equal": bool(np.array_equal(ref, mine)),
                    "dequantize_equal": bool(np.array_equal(np.asarray(gguf.quants.dequantize(ref, qtype)).reshape(-1), back)),
                    "max_abs_error": float(np.abs(back - x).max())}
    return out


def requantize_shipped(path, limit: int) -> dict:
    """模型文件里存的块：反量化 → 用手写的同一格式再量化 → 和文件里的块逐字节比较（每种格式最多 limit 个张量）。
    顺便数一数文件里每种格式有几个张量、多少权重，算出整个文件平均每个权重几比特。"""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from common.model_files import read_gguf_header

    def nbytes(shape, kind) -> int:          # 每块 block 个权重占 size 字节
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        return int(np.prod(shape)) // block * size

    head = read_gguf_header(path)            # 只读文件头里的张量表（名字、形状、格式、位置），不读词表
    # 表里的位置从数据区开头算；文件到最后一个张量的末尾为止（need_size），由此倒推出数据区从哪里开始
    data_start = head.need_size - max(off + nbytes(shape, kind) for shape, kind, off in head.tensors.values())
    types, checked = {}, {}
    for shape, kind, off in head.tensors.values():
        fmt = GGMLQuantizationType(kind).name
        types.setdefault(fmt, [0, 0])
        types[fmt][0] += 1
        types[fmt][1] += int(np.prod(shape))
        if fmt in GGUF_FORMATS and checked.get(fmt, {}).get("tensors", 0) < limit:
            raw = np.fromfile(path, np.uint8, nbytes(shape, kind), offset=data_start + off).reshape(-1, BLOCK_BYTES[fmt])
            again = gguf_quantize(gguf_dequantize(raw, fmt), fmt)
            c = checked.setdefault(fmt, {"tensors": 0, "blocks": 0, "blocks_equal": 0})
            c["tensors"] += 1
            c["blocks"] += len(raw)
            c["blocks_equal"] += int((again == raw).all(1).sum())
    n_params = sum(n for _, n in types.values())
    size = path.stat().st_size
    return {"tensor_types": {k: {"tensors": a, "weights": b} for k, (a, b) in types.items()}, "requantized": checked,
            "file_bytes": size, "params": n_params, "file_bits_per_weight": size * 8 / n_params}


# ================================================================ 3. 只量化权重的 int4 线性层
class Int4Linear(nn.Module):
    """权重存成 4 比特（每 group 个一组，fp16 的 scale 和 min，和 Q4_1 同一个思路），前向时现场反量化。

    显存/内存里：每个权重 0.5 字节 + 每组 4 字节（group=32 时平均 5 比特，fp32 的 1/6.4）。
    每次前向都要把整个矩阵解包、乘 scale、加 min，写出一份临时的 float32 权重，再交给 F.linear：
    读的字节少了，但多做了一遍"写 fp32 权重"——这正是 CPU 上它不一定更快的原因（第 10 课实测）。
    """

    def __init__(self, linear: nn.Linear, group: int = QK):
        super().__init__()
        q = quantize(linear.weight.detach(), 4, symmetric=False, group=group)
        codes = q.codes.to(torch.uint8).reshape(linear.out_features, -1)
        half = codes.shape[1] // 2
        self.register_buffer("packed", codes[:, :half] | (codes[:, half:] << 4))       # [out, in/2] uint8
        self.register_buffer("scale", q.scale.half().reshape(linear.out_features, -1))  # [out, in/group]
        self.register_buffer("zero", q.zero.half().reshape(linear.out_features, -1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group

    def weight_float(self) -> torch.Tensor:
        codes = torch.cat([self.packed & 0x0F, self.packed >> 4], dim=1).float()     # [out, in]
        codes = codes.view(self.out_features, -1, self.group)
        w = codes * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_float().to(x.dtype), self.bias)

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (self.packed, self.scale, self.zero))


def copy_sharing_weights(model: nn.Module) -> nn.Module:
    """模型结构的副本，权重张量和原模型共用（不复制）：之后把副本里的层换掉（to_int4），原模型不受影响。"""
    import copy
    return copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]})


def to_int4(model: nn.Module, group: int = QK, skip: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """把 model 里的每个 nn.Linear（skip(name) 为真的除外）换成 Int4Linear，原地修改并返回 model。
    共用权重的层（SmolLM2 的 lm_head = embedding）会得到一份自己的 4 比特副本，embedding 不变。"""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not skip(full) and child.in_features % group == 0:
                setattr(mod, child_name, Int4Linear(child, group))
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """生成一个 token 至少要从内存读多少字节的权重：每个线性层的权重读一遍（embedding 只查一行，不算）。"""
    total = 0
    for mod in model.modules():
        if isinstance(mod, Int4Linear):
            total += mod.nbytes()
        elif isinstance(mod, nn.Linear):
            total += mod.weight.nelement() * mod.weight.element_size()
        elif hasattr(mod, "in_features") and hasattr(mod, "out_features") and callable(getattr(mod, "weight", None)):
            total += mod.in_features * mod.out_features + 8 * mod.out_features   # torch 的动态 int8：1 字节 + 每行 scale
    return total


def module_bytes(model: nn.Module) -> int:
    """模型在内存里的权重和缓冲区一共多少字节（共用的张量只算一次）。"""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nelement() * t.element_size()
    return total


def bandwidth_gb_s(mib: int = 256, reps: int = 5) -> float:
    """本机内存带宽（读）：对一个远大于 CPU 缓存的数组求和，取最快的一次。"""
    import time
    a = torch.ones(mib * 2**20 // 4)
    a.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nelement() * 4 / best / 1e9


def quantize_weights(state: dict[str, torch.Tensor], choose: Callable[[str, torch.Tensor], tuple | None]) -> dict:
    """假量化一个 state_dict：choose(名字, 张量) 返回 (bits, symmetric, group) 就量化这个张量，返回 None 就原样保留。
    只看二维的矩阵（一维的归一化权重、偏置总是保留）。返回新的 dict，原来的不变。
    几个名字共用同一个张量时（SmolLM2 的 lm_head 就是 embed），同样的方案只算一次。"""
    out, done = {}, {}
    for name, t in state.items():
        how = choose(name, t) if t.dim() == 2 and t.is_floating_point() else None
        if how:
            key = (t.data_ptr(), tuple(t.shape), tuple(how))
            if key not in done:
                done[key] = fake_quant(t, *how)
        out[name] = done[key] if how else t
    return out


# ================================================================ 4. 质量：留出文本上的平均 loss
@torch.inference_mode()
def gpt_loss(program, windows: torch.Tensor) -> float:
    """第 04 课导出的 GPT 在验证窗口 [n, T+1] 上的平均交叉熵（每个窗口：前 T 个 token 预测后 T 个）。"""
    losses = []
    for batch in windows.split(64):
        batch = batch if len(batch) > 1 else batch.repeat(2, 1)      # 导出的图要求 batch ≥ 2
        logits = program(batch[:, :-1])[0]
        losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(len(batch), -1))
    return float(torch.cat(losses).mean())


@torch.inference_mode()
def llama_nll(model, ids: list[int], window: int = 512) -> float:
    """Llama 在一串 token 上的平均负对数似然（每 window 个 token 一段，段与段之间不共享上下文）。"""
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[s:s + window + 1]])
        logits = model(chunk[:, :-1])[0]
        total += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return total / count
