"""第 10 课：量化——模型怎样装进笔记本：每个比特值多少质量、换来多少速度；再用量化模型当草稿做投机解码。

你将学到：
  1. 数和格子：对称（absmax）和非对称（min/scale）量化，per-tensor / per-channel / 每 32、128 个一组，int8 和 int4；
     在本地模型真实的权重矩阵上量一量每种选择的误差，看一个离群值（outlier）怎样毁掉整个张量的 scale，
     以及课程的 --dtype int8 里 SmoothQuant 那一步在做什么（把激活的离群值"搬"进权重）。
  2. 课程自己发的模型文件：手写 GGUF 的 Q8_0、Q4_0、Q4_1 块格式（common/quant.py），和 gguf 包的参考实现逐字节比较；
     把 SmolLM2 文件里存的 Q4_1 权重反量化再用手写的 Q4_1 量化一遍，得到的块和文件里的一模一样。
  3. 每个比特的质量代价：第 04 课的小 GPT（真正的 fp32 权重）和本地模型在留出文本上的 loss / 困惑度，
     int8 / int4、per-channel / 分组各差多少；哪些张量最敏感（嵌入和输出层、注意力、MLP 各自留 8 位试试）。
  4. 每个比特换来的速度和内存：解码一个 token 要把权重读一遍——按本机实测的内存带宽算出 tokens/s 的上限，
     和 fp32、int8（torch 动态量化）、int4（只量化权重，现场反量化）的实测值放在一起。
  5. 投机解码：int8 模型当草稿一次猜 k 个 token，fp32 模型一次前向验证；贪心输出必须和 fp32 单独生成的逐 token 相同。
     再看 prompt lookup（草稿 = 从提示词里抄一段）在"引用原文"的 RAG 回答上有多快。

用时：约 40 分钟阅读；--quick 不到 1 分钟；默认完整运行约 5～10 分钟（2 核 CPU，空闲时；--local-model qwen0.5b 更久）。
只在 CPU 上运行（torch 的 int8 动态量化只支持 CPU）。第 3 步要用第 04 课的检查点：没有时先用第 04 课的脚本训练一个很小的。
示例：
  python 10_quantize.py --quick
  python 10_quantize.py --part gguf
  python 10_quantize.py --part speculative --k 1,2,4,8 --local-model qwen0.5b
  python 10_quantize.py --part quality --checkpoint outputs/04_tiny_gpt/small/ckpt_best.pt
  同一次运行里并排测 SmolLM2 和 Qwen 的投机解码：python benchmarks/speculative_speed.py
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from common import quant as Q
from common import quant_report as R
from common.cli import add_knob, course_parser, existing_file, int_list, parts_type, positive_int, setup_run
from common.device import peak_rss_mb
from common.errors import require, run_cli
from common.outputs import save_results

NAME = "10_quantize"
PARTS = ["grid", "gguf", "quality", "speed", "speculative"]
CPU = torch.device("cpu")
# 第 1、3 步比较的量化方案：(比特数, 对称?, 分组)
SCHEMES = [(8, True, Q.TENSOR), (8, True, Q.CHANNEL), (4, True, Q.TENSOR), (4, True, Q.CHANNEL),
           (4, False, Q.CHANNEL), (4, True, 128), (4, True, 32), (4, False, 32)]
PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a bicycle works, step by step."]


def scheme_label(bits: int, symmetric: bool, group) -> str:
    return f"int{bits} {'对称' if symmetric else '非对称'} {Q.group_label(group)}"


def load(args, dtype: str = "fp32"):
    from common.local_model import load_local_model
    return load_local_model(args.model_file, dtype=dtype, device=CPU, model=args.local_model)


# ================================================================ 第 1 步：数和格子
def grid_table(lm) -> tuple[list[dict], dict]:
    """几个真实矩阵 × 每种方案：相对误差 ‖w − ŵ‖/‖w‖，以及平均每个权重几比特。"""
    mid = lm.config.n_layers // 2
    mats = {"embed": lm.model.embed.weight.detach(), "layer0.q_proj": lm.model.layers[0].attn.q_proj.weight.detach(),
            f"layer{mid}.down_proj": lm.model.layers[mid].mlp.down_proj.weight.detach()}
    rows = []
    print(f"\n{'方案':<26} | {'比特/权重':>8} | " + " | ".join(f"{k:>16}" for k in mats))
    for bits, sym, group in SCHEMES:
        errs = {k: Q.relative_error(w, Q.fake_quant(w, bits, sym, group)) for k, w in mats.items()}
        bpw = Q.bits_per_weight(bits, group, sym, cols=mats["embed"].shape[1])
        rows.append({"scheme": scheme_label(bits, sym, group), "bits": bits, "symmetric": sym, "group": group,
                     "bits_per_weight": bpw, "relative_error": errs})
        print(f"{rows[-1]['scheme']:<26} | {bpw:8.3f} | " + " | ".join(f"{e:16.4f}" for e in errs.values()))
    return rows, mats


def outlier_row(w: torch.Tensor) -> dict:
    """找出"最不合群"的一行（最大绝对值 / 这一行的标准差最大），数一数 per-tensor int4 时有多少权重被舍成 0。"""
    ratio = w.abs().amax(1) / w.std(1)
    r = int(ratio.argmax())
    zero_tensor = float((Q.quantize(w, 4, True, Q.TENSOR).codes == 0).float().mean())
    zero_group = float((Q.quantize(w, 4, True, 32).codes == 0).float().mean())
    return {"row": r, "max_over_std": float(ratio[r]), "row_values": w[r].tolist(),
            "tensor_step": float(w.abs().max() / 7), "zero_share_per_tensor": zero_tensor, "zero_share_group32": zero_group}


@torch.inference_mode()
def smoothquant_demo(lm, layer: int, alpha: float) -> dict:
    """down_proj 的输入激活有少数几个巨大的通道：int8 量化激活（每个 token 一个 scale）时它们把别的通道挤成 0。
    SmoothQuant：每个输入通道除以 s、对应的权重列乘以 s（乘积不变），s = max|x|^α / max|w|^(1−α)。"""
    from common.local_model import CALIBRATION_PROMPTS
    mod, xs = lm.model.layers[layer].mlp.down_proj, []
    hook = mod.register_forward_hook(lambda m, inp, out: xs.append(inp[0].reshape(-1, inp[0].shape[-1])))
    for p in CALIBRATION_PROMPTS:
        lm.model(torch.tensor([lm.tokenizer.apply_chat_template([{"role": "user", "content": p}])]))
    hook.remove()
    x, w = torch.cat(xs), mod.weight.detach().float()
    y = x @ w.T
    amax = x.abs().amax(0)
    s = (amax.pow(alpha) / w.abs().amax(0).pow(1 - alpha)).clamp(min=1e-5)

    def int8_error(xx, ww):      # 激活每个 token 一个 scale，权重每个输出通道一个 scale（和 torch 的 int8 动态量化一样）
        return Q.relative_error(y, Q.fake_quant(xx, 8, True, Q.CHANNEL) @ Q.fake_quant(ww, 8, True, Q.CHANNEL).T)
    return {"layer": layer, "tokens": x.shape[0], "channel_amax": amax.tolist(),
            "max_over_median": float(amax.max() / amax.median()), "alpha": alpha,
            "error_int8": int8_error(x, w), "error_int8_smoothed": int8_error(x / s, w * s)}


def part_grid(args, lm) -> dict:
    from common.local_model import SMOOTH_ALPHA
    print(f"\n=== 第 1 步：数和格子——{lm.info.name} 的几个真实矩阵，每种量化方案的相对误差 ===")
    rows, mats = grid_table(lm)
    print("读表：同样的比特数，组越小误差越小（一个大数只拖累自己那一组）；同样分组，非对称比对称多用了一个码、"
          "也不浪费负半边，误差更小；\n      int4 per-tensor 差得离谱：整个矩阵共用一个 scale，由最大的那个数决定。"
          "\n      SmolLM2 的矩阵在“int4 非对称 group-32”上误差是 0：文件里存的就是这个网格（Q4_1），嵌入矩阵存的是 Q8_0。")
    w = mats[[k for k in mats if "down_proj" in k][0]]
    row = outlier_row(w)
    print(f"\n离群值：down_proj 第 {row['row']} 行的最大值是这一行标准差的 {row['max_over_std']:.0f} 倍。"
          f"per-tensor int4 的一格宽 {row['tensor_step']:.4f}，\n      整个矩阵 {row['zero_share_per_tensor']:.0%} 的权重被舍成 0；"
          f"每 32 个一组时只有 {row['zero_share_group32']:.0%}。")
    act = smoothquant_demo(lm, lm.config.n_layers // 2, SMOOTH_ALPHA)
    print(f"\n激活也有离群通道：第 {act['layer']} 层 down_proj 的输入（{act['tokens']} 个 token），最大的通道是中位数的 "
          f"{act['max_over_median']:.0f} 倍。\n把激活和权重都量化成 int8 后，输出的相对误差：直接量化 {act['error_int8']:.4f}，"
          f"SmoothQuant（α={act['alpha']}）之后 {act['error_int8_smoothed']:.4f}。")
    print("      这就是 common/local_model.py 的 smooth_for_int8：激活的离群通道除以 s，权重对应的列乘以 s，"
          "难量化的部分搬到了按通道量化的权重里。")
    png = R.plot_outliers(row, act, args.out_dir)
    print(f"图已保存：{png}")
    row.pop("row_values")
    act["channel_amax"] = act["channel_amax"][:0]
    return {"matrices": {k: list(v.shape) for k, v in mats.items()}, "table": rows, "outlier": row,
            "smoothquant": act, "plot": str(png)}


# ================================================================ 第 2 步：GGUF 的块格式，手写
def check_formats_against_gguf(seed: int) -> dict:
    """随机数（带离群值、一整块 0）：手写的 Q8_0/Q4_0/Q4_1 和 gguf.quants 逐字节相同，反量化也相同。"""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(32 * 2048) * 0.02).astype(np.float32)
    x[rng.integers(0, x.size, 40)] *= 60                    # 离群值
    x[:32] = 0                                              # 全 0 的一块（scale = 0 的特殊情况）
    out = Q.compare_with_gguf(x)
    for fmt, r in out.items():
        require(r["bytes_equal"] and r["dequantize_equal"],
                f"手写的 {fmt} 和 gguf 参考实现不同（字节相同 {r['bytes_equal']}，反量化相同 {r['dequantize_equal']}）。")
    return out


def part_gguf(args, lm) -> dict:
    print("\n=== 第 2 步：GGUF 的块格式——手写 Q8_0 / Q4_0 / Q4_1，和 gguf 包的参考实现逐字节比较 ===")
    ref = check_formats_against_gguf(args.seed)
    for fmt, r in ref.items():
        print(f"{fmt}：{r['blocks']} 块，字节相同 {r['bytes_equal']}，反量化相同 {r['dequantize_equal']}，最大误差 {r['max_abs_error']:.4f}")
    print("一块 32 个权重：Q8_0 = fp16 的 d + 32 个 int8；Q4_0 = fp16 的 d + 16 字节（两个 4 比特码一字节，码 − 8 再乘 d）；"
          "\n                 Q4_1 = fp16 的 d + fp16 的 min + 16 字节（码 × d + min）。")
    shipped = Q.requantize_shipped(lm.path, args.gguf_tensors)
    print(f"\n{lm.path.name}：" + "，".join(f"{k} {v['tensors']} 个张量" for k, v in shipped["tensor_types"].items()))
    for fmt, c in shipped["requantized"].items():
        print(f"  文件里的 {fmt} 块（{c['tensors']} 个张量，{c['blocks']:,} 块）反量化再手写量化：{c['blocks_equal']:,} 块逐字节相同"
              f"（{c['blocks_equal'] / c['blocks']:.2%}）")
    bpw = {"fp32": 32.0, "fp16/bf16": 16.0, **{f: Q.gguf_bits_per_weight(f) for f in Q.GGUF_FORMATS},
           "int4 对称 group-128（GPTQ/AWQ 常用）": Q.bits_per_weight(4, 128),
           f"{lm.path.name}（整个文件）": shipped["file_bits_per_weight"]}
    print("\n每个权重几比特：" + "，".join(f"{k} {v:.2f}" for k, v in bpw.items()))
    print(f"所以本课程的 fp32 {lm.info.name} 其实是反量化过的 4 比特模型：文件里只有这么多信息，转成 fp32 并不会变准。")
    return {"reference_check": ref, "shipped": shipped, "bits_per_weight": bpw}


# ================================================================ 第 3 步：每个比特的质量代价
def group_of(name: str) -> str:
    """张量属于哪一组：嵌入和输出层（它们常常共用一个矩阵）/ 注意力 / MLP。"""
    if any(k in name for k in ("embed", "wte", "wpe", "lm_head")):
        return "嵌入/输出层"
    return "注意力" if "attn" in name else "MLP"


def variants() -> list[tuple[str, object]]:
    """(名字, choose)：choose(名字, 张量) → (比特, 对称?, 分组) 或 None（不量化）。后三个是"敏感度"实验。"""
    out = [("fp32", None)] + [(scheme_label(*s), lambda n, t, s=s: s) for s in SCHEMES if s[2] != Q.TENSOR]
    for keep in ("嵌入/输出层", "注意力", "MLP"):
        out.append((f"int4 对称 per-channel，{keep} 留 8 位",
                    lambda n, t, keep=keep: (8, True, Q.CHANNEL) if group_of(n) == keep else (4, True, Q.CHANNEL)))
    return out


def run_variants(evaluate, module, table: list, key: str) -> None:
    """每个方案：把 module 的权重换成假量化的，evaluate() 一次，最后换回原来的权重。"""
    state = module.state_dict()
    same = lambda t: (t.data_ptr(), tuple(t.shape))             # noqa: E731  共用的张量（lm_head = embed）只复制一份
    copies = {key: t.detach().clone() for key, t in {same(t): t for t in state.values()}.items()}
    orig = {k: copies[same(t)] for k, t in state.items()}
    for label, choose in variants():
        if choose is not None:
            module.load_state_dict(Q.quantize_weights(orig, choose), strict=False)
        loss = evaluate()
        base = table[0][key] if table else loss
        table.append({"variant": label, key: loss, "delta": loss - base, "ppl": float(np.exp(loss))})
        print(f"  {label:<36} {key} {loss:.4f}（{loss - base:+.4f}）  困惑度 {np.exp(loss):8.3f}")
    module.load_state_dict(orig, strict=False)


def tiny_gpt_quality(args, path) -> dict:
    from common.exported import load_tiny_gpt
    from common.training import load_checkpoint
    ck = load_checkpoint(path)
    program = load_tiny_gpt(path).model.program
    windows = R.gpt_windows(ck, args.gpt_windows)
    n = sum(p.numel() for p in ck["model"].values())
    print(f"\n第 04 课的 GPT（{path}，{n:,} 个参数，fp32 训练出来的真权重），验证集 {windows.numel():,} 个 token：")
    table: list = []
    run_variants(lambda: Q.gpt_loss(program, windows), program, table, "val_loss")
    return {"checkpoint": str(path), "params": n, "val_tokens": windows.numel(), "table": table}


def quality_sentence(gpt: list[dict], local: list[dict], name: str) -> str:
    """从这次的两张表里读出结论：int4 group-32 的代价、分组比 per-channel 好多少、哪一组留 8 位救回最多。"""
    g, m = ({r["variant"]: r["delta"] for r in t} for t in (gpt, local))
    g32, pc = scheme_label(4, True, 32), scheme_label(4, True, Q.CHANNEL)
    keep = {k: v for k, v in m.items() if "留 8 位" in k}
    best = min(keep, key=keep.get).split("，")[1]
    return (f"读表：小 GPT 上 int4 group-32 多了 {g[g32]:+.4f} nats（per-channel {g[pc]:+.4f}）；{name} 上 int4 group-32 多了 "
            f"{m[g32]:+.4f}，per-channel {m[pc]:+.4f}。\n      敏感度：int4 per-channel 时，{best}救回最多。"
            + (f"“非对称 group-32”只多了 {m[scheme_label(4, False, 32)]:+.4f}：SmolLM2 的矩阵本来就在这个网格（Q4_1）上，"
               "差别来自嵌入矩阵（文件里是 Q8_0）。" if "SmolLM2" in name else ""))


def part_quality(args, lm, checkpoint: Path) -> dict:
    print("\n=== 第 3 步：每个比特的质量代价（loss 越低越好；括号里是比 fp32 多了多少 nats）===")
    out = {"tiny_gpt": tiny_gpt_quality(args, checkpoint)}
    ids = R.held_out_ids(lm.tokenizer, args.eval_tokens)
    print(f"\n{lm.info.name}，留出文本 {len(ids)} 个 token。注意：它的“fp32”本身就是文件里 4 比特权重反量化出来的：")
    table: list = []
    run_variants(lambda: Q.llama_nll(lm.model, ids), lm.model, table, "nll")
    int8 = Q.llama_nll(load(args, "int8").model, ids)
    table.append({"variant": "int8 动态（torch + SmoothQuant，--dtype int8）", "nll": int8, "delta": int8 - table[0]["nll"],
                  "ppl": float(np.exp(int8))})
    print(f"  {table[-1]['variant']:<36} nll {int8:.4f}（{int8 - table[0]['nll']:+.4f}）  困惑度 {np.exp(int8):8.3f}")
    out[lm.key] = {"tokens": len(ids), "table": table}
    print(quality_sentence(out["tiny_gpt"]["table"], table, lm.info.name))
    return out


# ================================================================ 第 4 步：每个比特换来的速度和内存
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def decode_tok_s(model, prompt_ids: list[int], n: int) -> float:
    """贪心解码 n 个 token，每一步的耗时取中位数（第一步含预填充，不算）。"""
    from common.generate import generate
    steps = []
    list(generate(model, prompt_ids, n + 1, stop_ids=(), on_step=lambda s: steps.append(s.seconds)))
    return 1 / float(np.median(steps[1:]))


def part_speed(args, lm) -> dict:
    print("\n=== 第 4 步：每个比特换来的速度——解码一个 token 要把权重读一遍 ===")
    bw = Q.bandwidth_gb_s()
    print(f"本机实测内存带宽（读 256 MiB 数组）：{bw:.1f} GB/s，{torch.get_num_threads()} 个线程。")
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    models = [("fp32", lm.model), ("int8 动态（torch）", load(args, "int8").model),
              ("int4 group-32 只量化权重（现场反量化）", Q.to_int4(Q.copy_sharing_weights(lm.model)))]
    rows = []
    print(f"{'精度':<28} | 每 token 读权重 | 带宽算出的上限 | 实测 tok/s | 达到上限 | 内存里的权重 | 进程峰值内存")
    for label, model in models:
        per_tok = Q.weight_bytes_per_token(model)
        tok_s = decode_tok_s(model, prompt, args.speed_tokens)
        rows.append({"variant": label, "bytes_per_token": per_tok, "ceiling_tok_s": bw * 1e9 / per_tok,
                     "tok_s": tok_s, "weights_mb": Q.module_bytes(model) / 1e6, "peak_rss_mb": peak_rss_mb()})
        r = rows[-1]
        print(f"{label:<28} | {per_tok / 1e6:10.0f} MB | {r['ceiling_tok_s']:10.1f} tok/s | {tok_s:9.1f} | "
              f"{tok_s / r['ceiling_tok_s']:7.0%} | {r['weights_mb']:9.0f} MB | {r['peak_rss_mb'] or 0:9.0f} MB")
    f32, i4 = rows[0], rows[2]
    print(f"读表：int8 读的字节是 fp32 的 1/{f32['bytes_per_token'] / rows[1]['bytes_per_token']:.1f}，"
          f"实测快了 {rows[1]['tok_s'] / f32['tok_s']:.1f} 倍。"
          f"int4 读得更少（1/{f32['bytes_per_token'] / i4['bytes_per_token']:.1f}），实测却是 {i4['tok_s']:.1f} tok/s："
          "\n      每一步先把整个矩阵解包成 fp32 临时权重再乘——写回内存的字节反而比 fp32 直接读还多。"
          "\n      llama.cpp 快，是因为它的内核在寄存器里解包 4 比特、直接和激活做点积，从不写出 fp32 权重。")
    print(f"文件大小：{lm.path.name} {lm.path.stat().st_size / 1e6:.0f} MB；fp32 缓存约 {f32['weights_mb']:.0f} MB。"
          "进程峰值内存只升不降（第一列之后的数包含前面已加载的模型）。")
    return {"bandwidth_gb_s": bw, "threads": torch.get_num_threads(), "gguf_file_mb": lm.path.stat().st_size / 1e6,
            "table": rows}


# ================================================================ 第 5 步：投机解码
def compare(target, draft_obj, ids: list[int], n: int, k: int, ref: list[int], t_ref: float, stop) -> dict:
    from common.speculative import speculative_generate
    (out, st), t = timed(lambda: speculative_generate(target, draft_obj, ids, n, k, stop))
    require(out == ref, f"投机解码（k={k}）的输出和目标模型单独贪心生成的不同（第 "
            f"{next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))} 个 token 起）。")
    require(st.accepted + st.rounds + 1 == st.emitted >= len(out),
            f"接受统计对不上：{st.accepted} 个草稿 + {st.rounds} 轮 + 1 ≠ 产出的 {st.emitted} 个 token。")
    return {**st.as_dict(), "seconds": t, "reference_seconds": t_ref, "tokens": len(out), "identical": True}


def spec_for_prompt(args, models: dict, prompt: str, ks) -> tuple[dict, dict]:
    """一个提示词：目标模型单独贪心生成（参考答案和基准时间；也记下课程默认 fp32 布局的时间），
    再用每个 k 的模型草稿、以及 prompt lookup 各生成一次。models：target / plain / draft / tokenizer。"""
    from common.generate import generate
    from common.speculative import ModelDraft, PromptLookupDraft
    tok, target = models["tokenizer"], models["target"]
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}])
    stop, n = set(tok.eos_ids), args.max_new_tokens
    ref, t_ref = timed(lambda: list(generate(target, ids, n, stop_ids=stop)))
    _, t_plain = timed(lambda: list(generate(models["plain"], ids, n, stop_ids=stop)))
    by_k = {k: compare(target, ModelDraft(models["draft"], len(ids) + n + k + 1), ids, n, k, ref, t_ref, stop)
            for k in ks}
    lookup = compare(target, PromptLookupDraft(), ids, n, args.lookup_k, ref, t_ref, stop)
    for r in [*by_k.values(), lookup]:
        r["plain_fp32_seconds"] = t_plain
    return by_k, lookup


def part_speculative(args, lm) -> dict:
    from common.speculative import prepack_for_cpu, rag_prompt, summarize_runs
    print(f"\n=== 第 5 步：投机解码——int8 的 {lm.info.name} 当草稿，fp32 的它当目标（贪心）===")
    models = {"target": prepack_for_cpu(lm.model), "plain": lm.model, "draft": load(args, "int8").model,
              "tokenizer": lm.tokenizer}
    print("目标模型用 oneDNN 预先排好布局的 fp32 权重（common/speculative.py 的 prepack_for_cpu：同样的权重值，"
          "验证 k+1 个 token 几乎和算 1 个一样快）；\n“加速比”和它自己单独生成比，“比课程默认 fp32”和其他课用的 fp32 比。")
    for m in (models["target"], models["plain"], models["draft"]):                  # 预热
        list(generate_quietly(m, lm.tokenizer.encode("Hi"), 2))
    per_k, lookup = {k: [] for k in args.k}, []
    for p in PROMPTS[:args.prompts]:
        by_k, look = spec_for_prompt(args, models, p, args.k)
        lookup.append(look)
        for k, r in by_k.items():
            per_k[k].append(r)
    table = {f"k={k}": summarize_runs(rs) for k, rs in per_k.items()}
    _, rag = spec_for_prompt(args, models, rag_prompt(), [])
    lookups = {"自由写作": summarize_runs(lookup), "RAG：引用原文": summarize_runs([rag])}
    R.print_spec_table({f"int8 模型 k={k}": s for k, s in zip(args.k, table.values())} |
                     {f"prompt lookup（{name}）": s for name, s in lookups.items()})
    best = max(table, key=lambda key: table[key]["speedup"])
    print(f"读表：每个结果都和目标模型单独贪心生成的逐 token 比过（相同）。最好的是 {best}：{table[best]['speedup']:.2f}×。"
          "\n      k 越大，一次验证能前进越多，但草稿每多猜一个都要花时间，猜错的越多越白费——所以有一个最好的 k。"
          f"\n      prompt lookup 不花草稿时间：回答在抄原文时（RAG）{lookups['RAG：引用原文']['speedup']:.2f}×，"
          f"自由写作时 {lookups['自由写作']['speedup']:.2f}×。")
    png = R.plot_speculative(table, args.k, lm.key, args.out_dir)
    print(f"图已保存：{png}")
    return {"draft": "int8", "target": "fp32 (oneDNN layout)", "by_k": table, "prompt_lookup": lookups, "plot": str(png),
            "runs": {f"k={k}": rs for k, rs in per_k.items()}}


def generate_quietly(model, ids: list[int], n: int):
    from common.generate import generate
    return generate(model, ids, n, stop_ids=())


# ================================================================ 命令行
def parse_args(argv=None):
    p = course_parser(NAME, __doc__, groups=("model",))
    p.add_argument("--part", type=parts_type(PARTS), default="all",
                   help="运行哪些步：all，或 grid / gguf / quality / speed / speculative（也可写 1～5），逗号分隔")
    p.add_argument("--checkpoint", type=existing_file, default=None,
                   help="第 04 课的检查点（默认找 outputs/04_tiny_gpt/ 下的，没有就现训一个很小的）")
    add_knob(p, "--k", type=int_list, default=(1, 2, 4, 6), quick=(2, 4), help="投机解码：草稿每轮猜几个 token，逗号分隔")
    add_knob(p, "--lookup-k", type=positive_int, default=10, quick=10, help="prompt lookup：每轮最多抄几个 token")
    add_knob(p, "--max-new-tokens", type=positive_int, default=96, quick=20, help="投机解码：每个提示词生成多少 token")
    add_knob(p, "--prompts", type=positive_int, default=2, quick=1, help=f"投机解码：用几个提示词（最多 {len(PROMPTS)} 个）")
    add_knob(p, "--eval-tokens", type=positive_int, default=1024, quick=192, help="本地模型的留出文本取多少 token")
    add_knob(p, "--gpt-windows", type=positive_int, default=256, quick=16, help="第 04 课 GPT 的验证窗口数")
    add_knob(p, "--gpt-iters", type=positive_int, default=300, quick=60, help="没有检查点时现训小 GPT 的步数")
    add_knob(p, "--gguf-tensors", type=positive_int, default=1000, quick=3, help="第 2 步：每种格式最多重新量化几个文件里的张量")
    add_knob(p, "--speed-tokens", type=positive_int, default=32, quick=8, help="第 4 步：每种精度计时解码几个 token")
    a = p.parse_args(argv)
    if any(k < 1 for k in a.k):
        p.error("--k 里的每个数都至少是 1")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_run(args)
    t0, load_avg = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    # 第 3 步要用第 04 课的检查点。要现训时，训练进程趁本课加载模型（大多只用一个核）先跑起来，第 1 步之前等它结束
    pending = "quality" in args.part and R.start_checkpoint(args.checkpoint, args.out_dir, args.gpt_iters, args.seed)
    lm = load(args)
    checkpoint = pending and pending()
    print(f"本地模型：{lm.info.name}（fp32，CPU，{torch.get_num_threads()} 个线程）；开始时 1 分钟平均负载 {load_avg:.1f}")
    steps = {"grid": part_grid, "gguf": part_gguf, "quality": lambda a, m: part_quality(a, m, checkpoint),
             "speed": part_speed, "speculative": part_speculative}
    results = {"args": vars(args), "model": lm.key}
    for part in args.part:
        results[part] = steps[part](args, lm)
    if "gguf" in results:
        results["bits_per_weight"] = results["gguf"]["bits_per_weight"]
    if "quality" in results:
        results["ppl"] = {name: {r["variant"]: r["ppl"] for r in v["table"]} for name, v in results["quality"].items()}
    if "speculative" in results:
        results["speculative"] = {lm.key: results["speculative"]}
    path = args.out_dir / "results.json"
    results.update({k: R.merged(path, results, k) for k in ("ppl", "speculative") if k in results})
    results["seconds_total"] = time.perf_counter() - t0
    print(f"\n结果已保存：{save_results(args.out_dir, results, merge=True)}（用时 {results['seconds_total']:.0f} 秒）")


if __name__ == "__main__":
    run_cli(main)
