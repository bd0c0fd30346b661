"""第 2 课：理解优化原理——为什么生成很慢，KV 缓存到底快了多少（玩具模型 + 真实模型，实测）。

你将学到：
  1. 生成是"一个一个 token"进行的：第 t 步要用到前面所有 token 的 K（键）和 V（值）。
     不缓存时，每一步都把整个前缀重新算一遍；有了 KV 缓存，每一步只算新 token 的那一行。
  2. 用 numpy 写一个单层注意力的玩具：两种做法输出完全一致（allclose），
     再数一数各自的乘加次数（MAC），看实测的加速比是否跟着"数出来的"加速比走。
  3. 用真实模型 SmolLM2-135M 贪心生成：有缓存 / 无缓存的 token 必须一模一样，
     实测 tokens/s 和加速比，画出"每个 token 的耗时随位置变化"的曲线，并用 torch.profiler
     看时间花在哪儿——实测加速比为什么达不到 FLOP 之比（有缓存的一步是"读内存"受限的）。
  4. 代价是内存：每个 token 的 KV 缓存字节数 = 2 × 层数 × KV 头数 × 每头维度 × 每个数的字节数；
     实测缓存张量的大小和公式对比，再算几个知名模型（公开配置）在 4k / 32k 上下文时要多少显存。

用时：约 10 分钟阅读；--quick 不到 1 分钟；默认完整运行约 3~5 分钟（2 核 CPU，空闲时）。
不需要 API key。本地模型只懂英文，所以提示词用英文。计时受机器负载影响：开始时机器很忙会先提醒。
示例：
  python 02_understand_kv_cache.py --quick
  python 02_understand_kv_cache.py --part toy --seq-len 1024 --d-model 128
  python 02_understand_kv_cache.py --part real --max-new-tokens 128 --lengths 32,64,128 --dtype int8
  更长的对比（64/128/256/512，两种精度）：python benchmarks/kv_cache_speedup.py
"""
from __future__ import annotations

import os
import time
import timeit

import numpy as np
import torch

from common.cli import add_knob, course_parser, int_list, parts_type, positive_int, setup_run
from common.errors import UserError, require, run_cli
from common.display import table
from common.outputs import save_results
from common.plots import legend_outside, new_figure, save_figure

NAME = "02_understand_kv_cache"
PARTS = ["toy", "real", "memory"]
DEFAULT_PROMPT = "Write a long story about a robot who learns to paint."
# 知名模型的"公开配置值"（来自各模型在 Hugging Face 上发布的 config.json）：
# 层数 num_hidden_layers、KV 头数 num_key_value_heads、每头维度 head_dim = hidden_size / num_attention_heads。
PUBLISHED_CONFIGS = [
    # (模型, 层数, 注意力头数, KV 头数, 每头维度)
    ("Llama-2-7B (MHA)", 32, 32, 32, 128),
    ("Llama-3-8B (GQA)", 32, 32, 8, 128),
    ("Qwen2.5-7B (GQA)", 28, 28, 4, 128),
    ("Llama-3.1-70B (GQA)", 80, 64, 8, 128),
]


# ================================================================ 计时可靠吗？解读要跟着实测数字走
def busy_reason(load: float | None, cores: int) -> str | None:
    """机器忙（1 分钟平均负载 ≥ 核数）时返回原因，否则 None。"""
    return f"开始时 1 分钟平均负载 {load:.1f} ≥ CPU 核数 {cores}，机器很忙" if load is not None and load >= cores else None


def noise_reason(step_seconds: list[float]) -> str | None:
    """有缓存的每一步本该差不多快：最慢的一成比最快的一成慢 2 倍以上，就说明计时噪声很大。"""
    t = sorted(step_seconds)
    if len(t) < 5:
        return None
    lo, hi = t[len(t) // 10], t[-1 - len(t) // 10]
    return f"有缓存的各步耗时相差 {hi / lo:.1f} 倍（本该差不多），计时噪声很大" if hi > 2 * lo else None


def note_timing(reasons: list[str], reason: str | None) -> None:
    """机器忙、计时噪声大时只提醒一次（一行）；所有原因都记进 results.json。"""
    if reason and not reasons:
        print(f"注意：{reason}——下面的计时会不可靠，建议在空闲的机器上重跑。")
    reasons += [reason] if reason else []


def trend(values: list[float], tol: float = 0.1) -> str:
    """rising / falling / flat / mixed：相邻两个数、或首尾之间变化超过 tol（相对）才算涨或跌。"""
    steps = [b / a - 1 for a, b in zip(values, values[1:])] + [values[-1] / values[0] - 1]
    up, down = any(s > tol for s in steps), any(s < -tol for s in steps)
    return "mixed" if up and down else "rising" if up else "falling" if down else "flat"


# ================================================================ 第 1 部分：numpy 玩具
def toy_weights(d: int, seed: int) -> dict[str, np.ndarray]:
    """一个单层注意力：Wq/Wk/Wv/Wo 四个 d×d 矩阵（float64，方便严格比较）。"""
    rng = np.random.default_rng(seed)
    w = {k: rng.standard_normal((d, d)) / np.sqrt(d) for k in ("q", "k", "v", "o")}
    w["x0"] = rng.standard_normal(d)  # 第一个"token"的向量
    return w


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def toy_generate_no_cache(w: dict, n: int) -> np.ndarray:
    """不用缓存：第 t 步把前缀 x[0..t] 整个重新过一遍注意力（和真实模型不用缓存时一样，所有位置都算）。"""
    d = w["x0"].shape[0]
    xs = [w["x0"]]
    outs = []
    for _ in range(n):
        x = np.stack(xs)                                  # [L, d]，L = 当前长度
        q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]      # 3·L·d² 次乘加（每步都重算全部）
        s = q @ k.T / np.sqrt(d)                          # L²·d
        s = np.where(np.tri(len(xs), dtype=bool), s, -np.inf)  # 因果遮罩：只能看自己和前面
        y = (_softmax(s) @ v) @ w["o"]                    # L²·d + L·d²
        outs.append(y[-1])
        xs.append(np.tanh(y[-1]))                         # 下一个"token"由这一步的输出决定（自回归）
    return np.stack(outs)


def toy_generate_cached(w: dict, n: int) -> np.ndarray:
    """用 KV 缓存：每步只算新 token 的 q/k/v，把 k/v 追加进缓存，再和缓存里所有 k/v 做注意力。"""
    d = w["x0"].shape[0]
    k_cache = np.empty((n, d))
    v_cache = np.empty((n, d))
    x = w["x0"]
    outs = []
    for t in range(n):
        q = x @ w["q"]                                    # 只算 1 行：3·d² 次乘加
        k_cache[t], v_cache[t] = x @ w["k"], x @ w["v"]
        s = k_cache[:t + 1] @ q / np.sqrt(d)              # (t+1)·d
        y = (_softmax(s) @ v_cache[:t + 1]) @ w["o"]      # (t+1)·d + d²
        outs.append(y)
        x = np.tanh(y)
    return np.stack(outs)


def toy_macs(n: int, d: int) -> tuple[int, int]:
    """数乘加次数（和上面两个函数逐行对应）。返回 (不缓存, 缓存)。"""
    no_cache = sum(4 * L * d * d + 2 * L * L * d for L in range(1, n + 1))
    cached = sum(4 * d * d + 2 * L * d for L in range(1, n + 1))
    return no_cache, cached


def check_toy_same(a: np.ndarray, b: np.ndarray) -> float:
    """自检：缓存只是省掉重复计算，输出必须和不缓存的一样（allclose）。返回最大差。"""
    require(np.allclose(a, b, rtol=1e-9, atol=1e-9),
            f"玩具的缓存版和不缓存版输出不同（最大差 {np.abs(a - b).max():.2e}），缓存逻辑写错了。")
    return float(np.abs(a - b).max())


def toy_sentences(rows: list[dict]) -> list[str]:
    """玩具：MAC 数怎样涨、实测加速比是否跟着 MAC 比走、哪个更大——全部从表里的数字算出来。"""
    a, b = rows[0], rows[-1]
    lines = [f"n 从 {a['n']} 到 {b['n']}（×{b['n'] / a['n']:.0f}）：不缓存的乘加数涨了 {b['macs_no_cache'] / a['macs_no_cache']:.0f} 倍"
             f"（L·d² 项 ∝ n²，注意力 L²·d 项 ∝ n³），缓存的只涨了 {b['macs_cached'] / a['macs_cached']:.0f} 倍。"]
    kind = trend([r["speedup"] for r in rows])
    lines.append("实测加速比随 n 上升，跟着 MAC 比走。" if kind == "rising" else
                 f"实测加速比没有随 n 稳定上升（{' → '.join(format(r['speedup'], '.1f') + '×' for r in rows)}），"
                 "和 MAC 比的走势不同：计时受到了干扰，或 n 太小、固定开销占了大头。")
    above = [r["n"] for r in rows if r["speedup"] > r["mac_ratio"]]
    if not above:
        slower = b["gmacs_no_cache"] / b["gmacs_cached"]
        lines.append(f"每个 n 上实测都小于 MAC 比：缓存的每一步只是几次很小的向量运算，numpy 每次调用的固定开销占了大头"
                     f"（n={b['n']} 时缓存路径每秒完成的乘加是不缓存路径的 1/{slower:.1f}）。")
    else:
        lines.append(f"n={', '.join(map(str, above))} 时实测反而大于 MAC 比：不缓存的运行比按乘加数预期的更慢——"
                     "多半是机器忙（多线程 BLAS 抢不到 CPU）或矩阵大到放不进 CPU 缓存，在空闲机器上重跑再看。")
    return lines


def toy_table(rows: list[dict]) -> str:
    """玩具的计时表（按终端显示宽度对齐：汉字占两格）。"""
    head = ["步数 n", "不缓存 s", "缓存 s", "实测加速", "数出的 MAC 比", "不缓存 GMAC/s", "缓存 GMAC/s"]
    return table([head] + [[r["n"], f"{r['no_cache_s']:.4f}", f"{r['cached_s']:.4f}", f"{r['speedup']:.1f}×",
                            f"{r['mac_ratio']:.1f}×", f"{r['gmacs_no_cache']:.2f}", f"{r['gmacs_cached']:.2f}"]
                           for r in rows], sep=" | ")


def part_toy(args) -> dict:
    print("\n=== 第 1 部分：numpy 玩具（单层注意力）===")
    d, N = args.d_model, args.seq_len
    w = toy_weights(d, args.seed)
    diff = check_toy_same(toy_generate_no_cache(w, N), toy_generate_cached(w, N))
    print(f"生成 {N} 步，d_model={d}：不缓存 vs 缓存 输出 allclose = True（最大差 {diff:.2e}）")
    rows = []
    for n in sorted({max(2, N // 8), max(2, N // 4), max(2, N // 2), N}):
        reps = 3 if n <= 256 else 1   # 取多次中最快的一次，减少机器负载带来的噪声
        t_nc = min(timeit.repeat(lambda: toy_generate_no_cache(w, n), repeat=reps, number=1))
        t_c = min(timeit.repeat(lambda: toy_generate_cached(w, n), repeat=reps, number=1))
        m_nc, m_c = toy_macs(n, d)
        rows.append({"n": n, "no_cache_s": t_nc, "cached_s": t_c, "speedup": t_nc / t_c,
                     "macs_no_cache": m_nc, "macs_cached": m_c, "mac_ratio": m_nc / m_c,
                     "gmacs_no_cache": m_nc / t_nc / 1e9, "gmacs_cached": m_c / t_c / 1e9})
    print("\n" + toy_table(rows))
    lines = toy_sentences(rows)
    print("解读：" + "\n      ".join(lines))
    return {"d_model": d, "seq_len": N, "allclose": True, "max_abs_diff": diff, "table": rows, "interpretation": lines}


# ================================================================ 第 2 部分：真实模型
def greedy_timed(lm, prompt_ids: list[int], n: int, use_cache: bool, desc: str) -> tuple[list[int], list[float]]:
    """用课程唯一的生成循环（common/generate.py）贪心生成恰好 n 个 token（stop_ids=()：不在结束符停下），
    on_step 回调记下每一步的耗时（一次前向 + 选词）。返回 (tokens, 每步秒数)。"""
    from tqdm import tqdm

    from common.generate import generate

    times = []
    with tqdm(total=n, desc=desc, leave=False, ncols=80) as bar:
        def on_step(step):
            times.append(step.seconds)
            bar.update()
        tokens = list(generate(lm.model, prompt_ids, n, temperature=0.0, use_cache=use_cache, stop_ids=(), on_step=on_step))
    return tokens, times


def warm_up(lm, prompt_ids: list[int]) -> None:
    """计时前先各跑 2 步（不计时）：进程里的第一次前向要分配内存、初始化线程池和矩阵乘内核，
    会慢上一秒多。不预热的话，先跑的"有缓存"第 1 步会多出这一截，看起来像有缓存反而更慢。"""
    for use_cache in (True, False):
        greedy_timed(lm, prompt_ids, 2, use_cache, "预热")


def check_same_tokens(tok_c: list[int], tok_n: list[int], dtype: str) -> int | None:
    """自检：fp32 下有缓存和无缓存必须逐个 token 相同。返回第一个不同的位置（int8 允许分叉，只报告）。"""
    first_diff = next((i for i, (x, y) in enumerate(zip(tok_c, tok_n)) if x != y), None)
    require(first_diff is None or dtype != "fp32",
            f"fp32 下有缓存和无缓存生成的 token 从第 {first_diff} 个起不同，KV 缓存的实现有错。")
    return first_diff


def model_macs(cfg, P: int, n: int) -> tuple[int, int]:
    """数真实模型的乘加次数：每个 token 过一遍所有 Linear + 注意力（因果，只看前面）+ 最后一个位置的 LM head。"""
    hd = cfg.head_dim
    per_tok = cfg.n_layers * (cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * cfg.dim
                              + 3 * cfg.dim * cfg.ffn_dim)
    head = cfg.dim * cfg.vocab_size
    attn = 2 * cfg.n_layers * cfg.n_heads * hd  # 每个 (query, key) 对：q·k 和 加权求和 v

    def full(L):   # 把 L 个 token 整个过一遍
        return L * per_tok + head + attn * L * (L + 1) // 2

    no_cache = sum(full(P + t) for t in range(n))
    cached = full(P) + sum(per_tok + head + attn * (P + t + 1) for t in range(1, n))
    return no_cache, cached


def linear_weight_bytes(model) -> int:
    """生成一个 token 至少要从内存读多少字节权重：所有线性层（含 LM head）的权重各读一遍。

    fp32 每个数 4 字节；int8 动态量化的 Linear 每个数 1 字节（缩放系数忽略不计）。
    词嵌入只查 1 行，不算（SmolLM2 的 LM head 和词嵌入共用矩阵，已经在 LM head 里算过）。
    """
    total = 0
    for mod in model.modules():
        if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            w = getattr(mod, "weight", None)
            if w is not None and not callable(w) and w.is_floating_point():
                total += w.nelement() * w.element_size()
            else:  # torch.ao 动态量化的 Linear：int8 权重
                total += mod.in_features * mod.out_features
    return total


def speed_table(cfg, P: int, lengths: list[int], t_c: list[float], t_n: list[float]) -> list[dict]:
    """生成前 L 个 token 的耗时 = 这次运行前 L 步之和（贪心生成 L 个 token 正是更长那次的前 L 步）。"""
    rows = []
    for L in lengths:
        s_n, s_c = sum(t_n[:L]), sum(t_c[:L])
        m_n, m_c = model_macs(cfg, P, L)
        rows.append({"new_tokens": L, "no_cache_s": s_n, "cached_s": s_c, "no_cache_tok_s": L / s_n,
                     "cached_tok_s": L / s_c, "speedup": s_n / s_c, "mac_ratio": m_n / m_c})
    head = ["新 token 数", "无缓存 s", "有缓存 s", "无缓存 tok/s", "有缓存 tok/s", "加速比", "MAC 之比"]
    print("\n" + table([head] + [[r["new_tokens"], f"{r['no_cache_s']:.2f}", f"{r['cached_s']:.2f}",
                                  f"{r['no_cache_tok_s']:.1f}", f"{r['cached_tok_s']:.1f}", f"{r['speedup']:.1f}×",
                                  f"{r['mac_ratio']:.1f}×"] for r in rows], sep=" | "))
    return rows


def efficiency_sentence(gmacs_cached: float, gmacs_no_cache: float, weight_mib: float, gb_s: float) -> str:
    """有缓存的一步是不是"读内存受限"：它每秒完成的乘加应远少于无缓存的一步。"""
    if gmacs_cached < gmacs_no_cache:
        return (f"有缓存的一步每秒完成的乘加只有无缓存的 1/{gmacs_no_cache / gmacs_cached:.1f}：每个 token 都要把约 {weight_mib:.0f} MiB "
                f"权重从内存读一遍，却只做很少的计算——它受限于内存带宽（每秒约 {gb_s:.1f} GB）和算子调度开销，而不是算力。")
    return (f"这次有缓存的一步每秒完成的乘加（{gmacs_cached:.2f} GMAC/s）不比无缓存的（{gmacs_no_cache:.2f}）少，"
            "和预期（它受限于读内存）不符：多半是计时受到了干扰，请在空闲时重跑。")


def step_efficiency(lm, P: int, t_c: list[float], t_n: list[float]) -> dict:
    """为什么实测加速比 < MAC 之比：比一比两种一步各自达到的"每秒乘加数"。"""
    cfg, n = lm.config, len(t_c)
    per_tok_c = float(np.median(t_c[1:])) if n > 1 else t_c[0]
    gmacs_n = model_macs(cfg, P + n - 1, 1)[0] / t_n[-1] / 1e9
    gmacs_c = (model_macs(cfg, P, 2)[1] - model_macs(cfg, P, 1)[1]) / per_tok_c / 1e9
    weight_bytes = linear_weight_bytes(lm.model)
    print(f"\n有缓存的一步（中位数）{per_tok_c * 1e3:.1f} ms，约 {gmacs_c:.2f} GMAC/s；"
          f"无缓存的最后一步（{P + n - 1} 个 token）{t_n[-1] * 1e3:.0f} ms，约 {gmacs_n:.2f} GMAC/s。")
    print(efficiency_sentence(gmacs_c, gmacs_n, weight_bytes / 2**20, weight_bytes / per_tok_c / 1e9))
    return {"cached_step_median_ms": per_tok_c * 1e3, "weight_bytes": weight_bytes,
            "gmacs_cached_step": gmacs_c, "gmacs_no_cache_last_step": gmacs_n}


def profile_step(lm, L: int, use_cache: bool, top: int = 6) -> list[dict]:
    """用 torch.profiler 看一步（长度 L 的序列生成下一个 token）时间花在哪些算子上。"""
    # kineto（profiler 的底层）默认往 stderr 打 "USDT: profiler_start/stop"；6 = 一行也不打。要在第一次用 profiler 之前设。
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    model = lm.model
    ids = torch.randint(0, 1000, (1, L), device=lm.device)  # 内容无关紧要，只看耗时分布
    cache = model.new_cache(1, L + 2) if use_cache else None
    with torch.inference_mode():
        if use_cache:
            model(ids[:, :-1], cache=cache, last_only=True)    # 先把前 L-1 个 token 写进缓存
        start = cache.length if use_cache else 0

        def run():   # 有缓存：只送最后 1 个 token（每次先把缓存退回原位）；无缓存：整段重算
            if use_cache:
                cache.length = start
            model(ids[:, -1:] if use_cache else ids, cache=cache, last_only=True)
        run()  # 预热
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count // 3,
             "ms_per_step": e.self_cpu_time_total / 3 / 1e3} for e in rows]


def plot_step_times(t_c: list[float], t_n: list[float], P: int, name: str, dtype: str, out_dir):
    pos = np.arange(P, P + len(t_c))
    fig, ax = new_figure(size=(9.5, 4))
    ax.plot(pos, np.array(t_n) * 1e3, label="no KV cache (recompute all)", color="C1")
    ax.plot(pos, np.array(t_c) * 1e3, label="with KV cache (new token only)", color="C0")
    ax.annotate("step 1 = prefill: both read\nthe whole prompt (after warm-up)", (pos[0], t_c[0] * 1e3),
                xytext=(12, -6), textcoords="offset points", fontsize=8, va="top")
    ax.set(xlabel="sequence length (position of the new token)", ylabel="time for this token (ms, log scale)",
           yscale="log", title=f"{name} ({dtype}): time per generated token")
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))   # 60, not 6×10¹
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3)
    legend_outside(ax)
    path = save_figure(fig, out_dir / f"time_per_token_{dtype}.png")
    print(f"图已保存：{path}")
    return path


def speedup_sentence(lengths: list[int], speedups: list[float]) -> str:
    """真实模型：加速比随生成长度怎样变，和预期（越长越大）对照。"""
    if len(lengths) < 2:
        return f"只测了一个长度（{lengths[0]} 个 token，{speedups[0]:.1f}×），看不出趋势：用 --lengths 给几个长度。"
    span = f"{lengths[0]} 个 token 时 {speedups[0]:.1f}× → {lengths[-1]} 个时 {speedups[-1]:.1f}×"
    return {"rising": f"实测加速比随长度上升（{span}），和预期一致：无缓存那边每步都要重算整段，越往后越慢。",
            "falling": f"实测加速比随长度下降（{span}），和预期（越长越大）相反：最可能是测量中途机器负载变了"
                       "（有缓存和无缓存是先后跑的），请在空闲时重跑。",
            "flat": f"实测加速比几乎不随长度变化（{span}），预期是越长越大：长度相差太小时看不出来，试试更大的 --max-new-tokens。",
            "mixed": f"实测加速比随长度忽高忽低（{span}），没有预期的上升趋势：计时受到了干扰，请在空闲时重跑。",
            }[trend(speedups)]


def op_kind(op: str) -> str:
    name = op.lower()
    if "scaled_dot_product" in name or "attention" in name:
        return "注意力（SDPA）"
    if name.split("::")[-1] in ("mm", "addmm", "matmul", "bmm", "linear", "linear_dynamic"):
        return "矩阵乘"
    return "小算子"


def profile_sentence(cached: list[dict], no_cache: list[dict]) -> str:
    """profiler：两边最耗时的算子各是什么，和"两边的大头都是矩阵乘"的预期对照。"""
    c, n = cached[0], no_cache[0]
    said = f"有缓存一步的大头是 {c['op']}（{op_kind(c['op'])}，{c['share']:.0%}），无缓存一步是 {n['op']}（{op_kind(n['op'])}，{n['share']:.0%}）"
    if op_kind(c["op"]) == op_kind(n["op"]) == "矩阵乘":
        return (said + "：两边的大头都是矩阵乘。不缓存时是大矩阵乘，CPU 能跑满；有缓存时是「向量 × 矩阵」，"
                "每读一个权重只做一次乘加，受限于内存带宽。")
    return (said + "：和预期（两边的大头都是读权重的矩阵乘）不同。机器忙时多线程算子（如 SDPA）抢不到 CPU，耗时会被放大；"
            "小算子占大头则说明调度开销压过了计算。请在空闲机器上重跑再看。")


def part_real(args, device, notes: list[str]) -> dict:
    from common.local_model import load_local_model

    if args.dtype == "int8" and device.type != "cpu":
        raise UserError("int8 动态量化只支持 CPU：请加 --device cpu，或改用 --dtype fp32。")
    lm = load_local_model(args.model_file, dtype=args.dtype, device=device, model=args.local_model)
    print(f"\n=== 第 2 部分：真实模型 {lm.info.name}（{args.dtype}），贪心生成，有缓存 vs 无缓存 ===")
    prompt_ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    P, n = len(prompt_ids), args.max_new_tokens
    print(f"设备 {device}，{torch.get_num_threads()} 个线程，提示词 {P} 个 token，生成 {n} 个 token（不在 EOS 停下，保证长度一致）。")
    L = min(args.lengths or [n])
    print(f"提示：只生成一次最长的 {n} 个 token，并记录每一步的耗时；生成前 {L} 个 token 的耗时，就是前 {L} 步之和。")
    warm_up(lm, prompt_ids)
    tok_c, t_c = greedy_timed(lm, prompt_ids, n, True, "有缓存")
    tok_n, t_n = greedy_timed(lm, prompt_ids, n, False, "无缓存")
    first_diff = check_same_tokens(tok_c, tok_n, args.dtype)
    print(f"\n两种方式生成的 token 完全一致：{first_diff is None}" + ("" if first_diff is None else f"（第 {first_diff} 个起不同）"))
    print(f"生成的文字（前 120 个字符）：{lm.tokenizer.decode(tok_c)[:120]!r}")
    if first_diff is not None:
        print("说明：int8 动态量化按'整批行'的最大值定缩放系数，不缓存时一次送入整段序列，缩放系数不同，")
        print("      logits 有细微差别，贪心的 token 就可能分叉。所以 int8 只报告速度，一致性检查用 fp32（见测试）。")
    note_timing(notes, noise_reason(t_c[1:]))
    rows = speed_table(lm.config, P, sorted(set(args.lengths) | {n}), t_c, t_n)
    print(speedup_sentence([r["new_tokens"] for r in rows], [r["speedup"] for r in rows]))
    eff = step_efficiency(lm, P, t_c, t_n)
    print("\n用 torch.profiler 看一步里哪些算子最耗时（各取 3 次平均）：")
    prof = {"cached_step": profile_step(lm, P + n, True), "no_cache_step": profile_step(lm, P + n, False)}
    for key, title in (("cached_step", f"有缓存的一步（第 {P + n} 个位置）"), ("no_cache_step", f"无缓存的一步（{P + n} 个 token）")):
        print(f"  {title}：" + "，".join(f"{r['op']} {r['share'] * 100:.0f}%" for r in prof[key][:4]))
    print("解读：" + profile_sentence(prof["cached_step"], prof["no_cache_step"]))
    if args.dtype == "fp32":
        print("      想让有缓存的一步更快，就要让它读更少的字节：试试 --dtype int8（权重从 4 字节降到 1 字节）。")
    png = plot_step_times(t_c, t_n, P, lm.info.name, args.dtype, args.out_dir)
    return {"dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(), "prompt_tokens": P,
            "new_tokens": n, "identical_tokens": first_diff is None, "first_diff": first_diff, "table": rows,
            "step_seconds_cached": t_c, "step_seconds_no_cache": t_n, **eff, "profile": prof, "plot": str(png)}


# ================================================================ 第 3 部分：内存代价
def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bytes_per: int) -> int:
    return 2 * layers * kv_heads * head_dim * bytes_per   # 2 = K 和 V 各一份


def check_kv_formula(formula: int, measured: float) -> None:
    """自检：公式算出的每 token 字节数必须等于缓存张量实际占用的。"""
    require(formula == measured, f"KV 缓存公式 {formula} 字节/token 和实测 {measured:.0f} 字节/token 不一致。")


def published_table() -> list[dict]:
    print("\n知名模型（公开配置值，来自各自发布的 config.json），fp16（2 字节），单条序列：")
    rows = []
    for name, layers, heads, kvh, hd in PUBLISHED_CONFIGS:
        b = kv_bytes_per_token(layers, kvh, hd, 2)
        rows.append({"model": name, "layers": layers, "heads": heads, "kv_heads": kvh, "head_dim": hd,
                     "bytes_per_token_fp16": b, "gib_4k": b * 4096 / 2**30, "gib_32k": b * 32768 / 2**30})
    print(table([["模型", "层数", "头数", "KV头", "每头维度", "每 token", "4k 上下文", "32k 上下文"]]
                + [[r["model"], r["layers"], r["heads"], r["kv_heads"], r["head_dim"],
                    f"{r['bytes_per_token_fp16'] / 1024:.0f} KiB", f"{r['gib_4k']:.2f} GiB", f"{r['gib_32k']:.2f} GiB"]
                   for r in rows], sep=" | "))
    mha, gqa = rows[0], rows[1]
    print(f"解读：用一份 KV 缓存（内存）换掉 O(n²) 的重复计算（时间）。同时服务 32 个 32k 长的请求时，{mha['model']} 光 KV 缓存"
          f"就要 {32 * mha['gib_32k']:.0f} GiB，\n      同样层数和头数、只有 {gqa['kv_heads']} 个 KV 头的 {gqa['model']} 只要 "
          f"{32 * gqa['gib_32k']:.0f} GiB——所以新模型都用 GQA（更少的 KV 头）来省内存。")
    return rows


def part_memory(args, device) -> dict:
    from common.local_model import load_local_model

    print("\n=== 第 3 部分：代价是内存——KV 缓存有多大 ===")
    lm = load_local_model(args.model_file, dtype=args.dtype, device=device, model=args.local_model)
    cfg, model = lm.config, lm.model
    n = min(args.max_new_tokens, 64)
    cache = model.new_cache(1, n + 8)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, n), device=lm.device), cache=cache)
    elem = cache.k[0].element_size()
    formula = kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, elem)
    measured = cache.nbytes_used() / cache.length
    check_kv_formula(formula, measured)
    print(f"本模型：{cfg.n_layers} 层，{cfg.n_heads} 个注意力头，{cfg.n_kv_heads} 个 KV 头，每头 {cfg.head_dim} 维，"
          f"缓存用 {cache.k[0].dtype}（{elem} 字节）。")
    print(f"公式：2 × {cfg.n_layers} × {cfg.n_kv_heads} × {cfg.head_dim} × {elem} = {formula} 字节/token；"
          f"实测（填入 {cache.length} 个 token 后 nbytes_used() / {cache.length}）= {measured:.0f} 字节/token。一致：True")
    mha = kv_bytes_per_token(cfg.n_layers, cfg.n_heads, cfg.head_dim, elem)
    print(f"GQA 省了多少：如果每个注意力头都有自己的 K/V（MHA，{cfg.n_heads} 个 KV 头），每 token 要 {mha} 字节，"
          f"是现在的 {mha / formula:.0f} 倍；本模型 {cfg.n_heads // cfg.n_kv_heads} 个 query 头共用一组 K/V。")
    print(f"另外注意：缓存是预先按 max_len 分配的（这里 {cache.max_len} 个位置），"
          f"已分配 {cache.nbytes_allocated() / 2**20:.2f} MiB，实际用了 {cache.nbytes_used() / 2**20:.2f} MiB——"
          "这种浪费正是 vLLM 的 PagedAttention 要解决的。")
    return {"model": {"layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                      "cache_dtype": str(cache.k[0].dtype), "bytes_per_number": elem},
            "bytes_per_token_formula": formula, "bytes_per_token_measured": measured, "formula_matches_measured": True,
            "bytes_per_token_if_mha": mha, "gqa_saving_factor": mha / formula, "allocated_bytes": cache.nbytes_allocated(),
            "used_bytes": cache.nbytes_used(), "published_models_fp16": published_table()}


# ================================================================ 命令行
def parse_args(argv=None):
    p = course_parser(NAME, __doc__, groups=("local",))
    p.add_argument("--part", type=parts_type(PARTS), default="all", help="运行哪些部分：all，或 toy / real / memory（也可写 1,2,3），逗号分隔")
    add_knob(p, "--seq-len", type=positive_int, default=512, quick=128, help="玩具：最长生成步数")
    add_knob(p, "--d-model", type=positive_int, default=256, quick=64, help="玩具：向量维度")
    add_knob(p, "--max-new-tokens", type=positive_int, default=256, quick=24, help="真实模型：生成多少个新 token")
    add_knob(p, "--lengths", type=int_list, default=(32, 64, 128, 256), quick=(8, 16),
             help="真实模型：在哪些长度上报告加速比，逗号分隔，都不能超过 --max-new-tokens（不填时只取不超过它的那些）")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="英文提示词（本地模型只懂英文）")
    a = p.parse_args(argv)
    if isinstance(a.lengths, tuple):                 # 没填 --lengths（内置默认是元组，int_list 给的是列表）
        a.lengths = [x for x in a.lengths if x <= a.max_new_tokens]
    if a.lengths and max(a.lengths) > a.max_new_tokens:
        p.error(f"--lengths 里的 {max(a.lengths)} 超过了 --max-new-tokens {a.max_new_tokens}：请调大 --max-new-tokens 或去掉它")
    if a.seq_len < 2:
        p.error("--seq-len 至少是 2")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    device = setup_run(args)
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    notes: list[str] = []
    note_timing(notes, busy_reason(load, os.cpu_count() or 1))
    results = {"args": vars(args), "cpu_count": os.cpu_count(), "loadavg_1min_start": load}
    if "toy" in args.part:
        results["toy"] = part_toy(args)
    if "real" in args.part:
        results["real"] = part_real(args, device, notes)
    if "memory" in args.part:
        results["memory"] = part_memory(args, device)
    results["timing_warnings"] = notes
    results["seconds_total"] = time.perf_counter() - t0
    # merge：只重跑某一部分时，别的部分的结果保留；每一部分记下产生它的参数（run_args）
    path = save_results(args.out_dir, results, merge=True, run_args=args,
                        files=[results["real"]["plot"]] if "real" in results else ())
    load_text = f"{load:.1f}" if load is not None else "未知"
    print(f"\n结果已保存：{path}（用时 {results['seconds_total']:.0f} 秒；开始时 1 分钟平均负载 {load_text}）")


if __name__ == "__main__":
    run_cli(main)
