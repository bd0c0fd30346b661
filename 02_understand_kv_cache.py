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
不需要 API key。本地模型只懂英文，所以提示词用英文。
示例：
  python 02_understand_kv_cache.py --quick
  python 02_understand_kv_cache.py --part toy --seq-len 1024 --d-model 128
  python 02_understand_kv_cache.py --part real --new-tokens 128 --lengths 32,64,128 --dtype int8
  更长的对比（64/128/256/512，两种精度）：python benchmarks/kv_cache_speedup.py
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common.errors import UserError, run_cli

NAME = "02_understand_kv_cache"
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


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def part_toy(args) -> dict:
    print("\n=== 第 1 部分：numpy 玩具（单层注意力）===")
    d, N = args.d_model, args.seq_len
    w = toy_weights(d, args.seed)
    a, b = toy_generate_no_cache(w, N), toy_generate_cached(w, N)
    same = bool(np.allclose(a, b, rtol=1e-9, atol=1e-9))
    print(f"生成 {N} 步，d_model={d}：不缓存 vs 缓存 输出 allclose = {same}（最大差 {np.abs(a - b).max():.2e}）")
    if not same:
        raise RuntimeError("toy: cached and uncached outputs differ — the cache logic is wrong")
    ns = sorted({max(2, N // 8), max(2, N // 4), max(2, N // 2), N})
    rows = []
    print(f"\n{'步数 n':>7} | {'不缓存 s':>9} | {'缓存 s':>8} | {'实测加速':>8} | {'数出的 MAC 比':>12} | 不缓存 GMAC/s | 缓存 GMAC/s")
    for n in ns:
        reps = 3 if n <= 256 else 1   # 取多次中最快的一次，减少机器负载带来的噪声
        t_nc = _best_time(lambda: toy_generate_no_cache(w, n), reps)
        t_c = _best_time(lambda: toy_generate_cached(w, n), reps)
        m_nc, m_c = toy_macs(n, d)
        row = {"n": n, "no_cache_s": t_nc, "cached_s": t_c, "speedup": t_nc / t_c,
               "macs_no_cache": m_nc, "macs_cached": m_c, "mac_ratio": m_nc / m_c,
               "gmacs_no_cache": m_nc / t_nc / 1e9, "gmacs_cached": m_c / t_c / 1e9}
        rows.append(row)
        print(f"{n:>7} | {t_nc:9.4f} | {t_c:8.4f} | {row['speedup']:7.1f}× | {row['mac_ratio']:11.1f}× |"
              f" {row['gmacs_no_cache']:12.2f} | {row['gmacs_cached']:10.2f}")
    print("解读：n 翻倍时，不缓存的乘加次数约涨 4~8 倍（L·d² 项是 n²，注意力 L²·d 项是 n³），缓存的只涨约 2 倍。")
    print("      实测加速比跟着 MAC 比一起涨，但比它小：缓存的每一步只是几次很小的向量运算，")
    print("      每次调用 numpy 的固定开销占了大头（看最后两列：缓存路径每秒完成的乘加远少于不缓存路径）。")
    return {"d_model": d, "seq_len": N, "allclose": same, "max_abs_diff": float(np.abs(a - b).max()), "table": rows}


# ================================================================ 第 2 部分：真实模型
def next_token_logits(model, ids, cache=None):
    """把 ids 过一遍模型，只返回最后一个位置的 logits [vocab]。

    last_only=True：最后的 LM head（49152×576 的大矩阵）只算最后一个位置，因为下一个 token 只需要它。
    这样"不缓存"那一边没有白做的工作，比较才公平。
    """
    return model(ids, cache=cache, last_only=True)[0]


def greedy_timed(lm, prompt_ids: list[int], n: int, use_cache: bool, desc: str):
    """贪心生成 n 个 token，记录每一步的耗时。返回 (tokens, 每步秒数列表, cache 或 None)。"""
    import torch
    from tqdm import tqdm

    from common.device import synchronize

    model, dev = lm.model, lm.device
    ids = list(prompt_ids)
    cache = model.new_cache(1, len(ids) + n + 1) if use_cache else None
    inp = torch.tensor([ids], device=dev)
    toks, times = [], []
    with torch.inference_mode():
        for _ in tqdm(range(n), desc=desc, leave=False, ncols=80):
            t0 = time.perf_counter()
            nxt = int(next_token_logits(model, inp, cache).argmax())   # 贪心：取概率最大的
            synchronize(dev)
            times.append(time.perf_counter() - t0)
            toks.append(nxt)
            ids.append(nxt)
            # 有缓存：下一步只送入新 token；没缓存：下一步把整个序列重新送入
            inp = torch.tensor([[nxt]] if use_cache else [ids], device=dev)
    return toks, times, cache


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


def profile_step(lm, L: int, use_cache: bool, top: int = 6) -> list[dict]:
    """用 torch.profiler 看一步（长度 L 的序列生成下一个 token）时间花在哪些算子上。"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = lm.model
    ids = torch.randint(0, 1000, (1, L), device=lm.device)  # 内容无关紧要，只看耗时分布
    with torch.inference_mode():
        if use_cache:
            cache = model.new_cache(1, L + 2)
            next_token_logits(model, ids[:, :-1], cache)
            step = ids[:, -1:]
            cache_len = cache.length

            def run():
                cache.length = cache_len
                next_token_logits(model, step, cache)
        else:
            def run():
                next_token_logits(model, ids)
        run()  # 预热
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count // 3,
             "ms_per_step": e.self_cpu_time_total / 3 / 1e3} for e in rows]


def part_real(args) -> dict:
    import torch

    from common.device import get_device, setup_threads
    from common.local_model import load_local_model

    print(f"\n=== 第 2 部分：真实模型 SmolLM2-135M（{args.dtype}），贪心生成，有缓存 vs 无缓存 ===")
    device = get_device(args.device)
    if args.dtype == "int8" and device.type != "cpu":
        raise UserError("int8 动态量化只支持 CPU：请加 --device cpu，或改用 --dtype fp32。")
    threads = setup_threads(args.threads)
    torch.manual_seed(args.seed)
    lm = load_local_model(dtype=args.dtype, device=device)
    cfg = lm.config
    prompt_ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    P, n = len(prompt_ids), args.new_tokens
    print(f"设备 {device}，{threads} 个线程，提示词 {P} 个 token，生成 {n} 个 token（不在 EOS 停下，保证长度一致）。")
    print("提示：只生成一次最长的 n 个 token，并记录每一步的耗时；生成前 64 个 token 的耗时，就是前 64 步之和。")

    tok_c, t_c, cache = greedy_timed(lm, prompt_ids, n, True, "有缓存")
    tok_n, t_n, _ = greedy_timed(lm, prompt_ids, n, False, "无缓存")
    first_diff = next((i for i, (x, y) in enumerate(zip(tok_c, tok_n)) if x != y), None)
    identical = first_diff is None
    print(f"\n两种方式生成的 token 完全一致：{identical}" + ("" if identical else f"（第 {first_diff} 个起不同）"))
    print(f"生成的文字（前 120 个字符）：{lm.tokenizer.decode(tok_c)[:120]!r}")
    if not identical and args.dtype == "fp32":
        raise RuntimeError("fp32 cached and uncached greedy tokens differ")
    if not identical:
        print("说明：int8 动态量化按'整批行'的最大值定缩放系数，不缓存时一次送入整段序列，缩放系数不同，")
        print("      logits 有细微差别，贪心的 token 就可能分叉。所以 int8 只报告速度，一致性检查用 fp32（见测试）。")

    lengths = sorted(set(args.lengths) | {n})
    rows = []
    print(f"\n{'新 token 数':>10} | {'无缓存 s':>9} | {'有缓存 s':>9} | {'无缓存 tok/s':>11} | {'有缓存 tok/s':>11} | {'加速比':>6} | MAC 之比")
    for L in lengths:
        s_n, s_c = sum(t_n[:L]), sum(t_c[:L])
        m_n, m_c = model_macs(cfg, P, L)
        row = {"new_tokens": L, "no_cache_s": s_n, "cached_s": s_c, "no_cache_tok_s": L / s_n,
               "cached_tok_s": L / s_c, "speedup": s_n / s_c, "mac_ratio": m_n / m_c}
        rows.append(row)
        print(f"{L:>10} | {s_n:9.2f} | {s_c:9.2f} | {row['no_cache_tok_s']:11.1f} | {row['cached_tok_s']:11.1f} |"
              f" {row['speedup']:5.1f}× | {row['mac_ratio']:6.1f}×")

    # 为什么实测加速比 < MAC 之比：看每一步实际达到的"每秒乘加数"
    per_tok_c = float(np.median(t_c[1:])) if n > 1 else t_c[0]
    m_n_last = model_macs(cfg, P + n - 1, 1)[0]
    gmacs_n = m_n_last / t_n[-1] / 1e9
    gmacs_c = model_macs(cfg, P, 2)[1] - model_macs(cfg, P, 1)[1]
    gmacs_c = gmacs_c / per_tok_c / 1e9
    weight_bytes = linear_weight_bytes(lm.model)
    print(f"\n有缓存的一步（中位数）{per_tok_c * 1e3:.1f} ms，只做了约 {gmacs_c:.2f} GMAC/s；"
          f"无缓存的最后一步（{P + n - 1} 个 token）{t_n[-1] * 1e3:.0f} ms，达到 {gmacs_n:.2f} GMAC/s。")
    print(f"有缓存时每个 token 都要把约 {weight_bytes / 2**20:.0f} MiB 权重从内存读一遍，却只做很少的计算："
          f"它受限于内存带宽（每秒约 {weight_bytes / per_tok_c / 1e9:.1f} GB）和 Python/算子调度开销，而不是算力。")

    print("\n用 torch.profiler 看一步里哪些算子最耗时（各取 3 次平均）：")
    prof = {"cached_step": profile_step(lm, P + n, True), "no_cache_step": profile_step(lm, P + n, False)}
    for key, title in (("cached_step", f"有缓存的一步（第 {P + n} 个位置）"), ("no_cache_step", f"无缓存的一步（{P + n} 个 token）")):
        print(f"  {title}：" + "，".join(f"{r['op']} {r['share'] * 100:.0f}%" for r in prof[key][:4]))
    print("解读：两边的大头都是矩阵乘（aten::addmm / aten::mm / quantized linear）。不缓存时它们是大矩阵乘，")
    print("      CPU 能跑满；有缓存时是「向量 × 矩阵」，每读一个权重只做一次乘加，受限于内存带宽，")
    print("      剩下的时间是几百个小算子（rope、rmsnorm、拷贝）的调度开销。")
    print("      所以：n 越长加速比越大（无缓存那边 ~n² 增长）；int8 让每步少读 4 倍权重字节，有缓存那边更快。")

    png = plot_step_times(t_c, t_n, P, args.dtype)
    return {"dtype": args.dtype, "device": str(device), "threads": threads, "prompt_tokens": P, "new_tokens": n,
            "identical_tokens": identical, "first_diff": first_diff, "table": rows,
            "step_seconds_cached": t_c, "step_seconds_no_cache": t_n,
            "cached_step_median_ms": per_tok_c * 1e3, "weight_bytes": weight_bytes,
            "gmacs_cached_step": gmacs_c, "gmacs_no_cache_last_step": gmacs_n, "profile": prof, "plot": str(png)}


def plot_step_times(t_c: list[float], t_n: list[float], P: int, dtype: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.outputs import output_dir

    pos = np.arange(P, P + len(t_c))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(pos, np.array(t_n) * 1e3, label="no KV cache (recompute all)")
    ax.plot(pos, np.array(t_c) * 1e3, label="with KV cache (new token only)")
    ax.set_xlabel("sequence length (position of the new token)")
    ax.set_ylabel("time for this token (ms)")
    ax.set_yscale("log")
    ax.set_title(f"SmolLM2-135M ({dtype}): time per generated token")
    ax.grid(alpha=0.3)
    ax.legend()
    path = output_dir(NAME) / f"time_per_token_{dtype}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"图已保存：{path}")
    return path


# ================================================================ 第 3 部分：内存代价
def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bytes_per: int) -> int:
    return 2 * layers * kv_heads * head_dim * bytes_per   # 2 = K 和 V 各一份


def part_memory(args) -> dict:
    import torch

    from common.device import get_device
    from common.local_model import load_local_model

    print("\n=== 第 3 部分：代价是内存——KV 缓存有多大 ===")
    lm = load_local_model(dtype=args.dtype, device=get_device(args.device))
    cfg, model = lm.config, lm.model
    n = min(args.new_tokens, 64)
    cache = model.new_cache(1, n + 8)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, n), device=lm.device), cache=cache)
    elem = cache.k[0].element_size()
    formula = kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, elem)
    measured = cache.nbytes_used() / cache.length
    print(f"本模型：{cfg.n_layers} 层，{cfg.n_heads} 个注意力头，{cfg.n_kv_heads} 个 KV 头，每头 {cfg.head_dim} 维，"
          f"缓存用 {cache.k[0].dtype}（{elem} 字节）。")
    print(f"公式：2 × {cfg.n_layers} × {cfg.n_kv_heads} × {cfg.head_dim} × {elem} = {formula} 字节/token；"
          f"实测（填入 {cache.length} 个 token 后 nbytes_used() / {cache.length}）= {measured:.0f} 字节/token。"
          f"一致：{formula == measured}")
    if formula != measured:
        raise RuntimeError("KV cache formula and measured size disagree")
    mha = kv_bytes_per_token(cfg.n_layers, cfg.n_heads, cfg.head_dim, elem)
    print(f"GQA 省了多少：如果每个注意力头都有自己的 K/V（MHA，{cfg.n_heads} 个 KV 头），每 token 要 {mha} 字节，"
          f"是现在的 {mha / formula:.0f} 倍；本模型 {cfg.n_heads // cfg.n_kv_heads} 个 query 头共用一组 K/V。")
    print(f"另外注意：缓存是预先按 max_len 分配的（这里 {cache.max_len} 个位置），"
          f"已分配 {cache.nbytes_allocated() / 2**20:.2f} MiB，实际用了 {cache.nbytes_used() / 2**20:.2f} MiB——"
          "这种浪费正是 vLLM 的 PagedAttention 要解决的。")

    print("\n知名模型（公开配置值，来自各自发布的 config.json），fp16（2 字节），单条序列：")
    print(f"{'模型':<22} | 层数 | 头数 | KV头 | 每头维度 | 每 token | 4k 上下文 | 32k 上下文")
    others = []
    for name, layers, heads, kvh, hd in PUBLISHED_CONFIGS:
        b = kv_bytes_per_token(layers, kvh, hd, 2)
        row = {"model": name, "layers": layers, "heads": heads, "kv_heads": kvh, "head_dim": hd,
               "bytes_per_token_fp16": b, "gib_4k": b * 4096 / 2**30, "gib_32k": b * 32768 / 2**30}
        others.append(row)
        print(f"{name:<22} | {layers:>4} | {heads:>4} | {kvh:>4} | {hd:>8} | {b / 1024:6.0f} KiB |"
              f" {row['gib_4k']:6.2f} GiB | {row['gib_32k']:6.2f} GiB")
    print("解读：用一份 KV 缓存（内存）换掉 O(n²) 的重复计算（时间）。同时服务 32 个 32k 长的请求时，")
    print("      Llama-2-7B 光 KV 缓存就要 512 GiB——所以新模型都用 GQA（更少的 KV 头）来省内存。")
    return {"model": {"layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                      "cache_dtype": str(cache.k[0].dtype), "bytes_per_number": elem},
            "bytes_per_token_formula": formula, "bytes_per_token_measured": measured,
            "formula_matches_measured": formula == measured, "bytes_per_token_if_mha": mha,
            "gqa_saving_factor": mha / formula, "allocated_bytes": cache.nbytes_allocated(),
            "used_bytes": cache.nbytes_used(), "published_models_fp16": others}


# ================================================================ 命令行
def parse_lengths(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths 应该是逗号分隔的正整数，例如 32,64,128（收到 {text!r}）") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--lengths 应该是逗号分隔的正整数，例如 32,64,128（收到 {text!r}）")
    return vals


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"应该是正整数（收到 {text!r}）") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"应该是正整数（收到 {text!r}）")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="第 2 课：KV 缓存为什么快、快多少、代价是什么（实测）")
    p.add_argument("--part", choices=["all", "toy", "real", "memory"], default="all", help="只运行某一部分")
    p.add_argument("--seq-len", type=positive, default=None, help="玩具：最长生成步数（默认 512，--quick 为 128）")
    p.add_argument("--d-model", type=positive, default=None, help="玩具：向量维度（默认 256，--quick 为 64）")
    p.add_argument("--new-tokens", type=positive, default=None, help="真实模型：生成多少个 token（默认 256，--quick 为 24）")
    p.add_argument("--lengths", type=parse_lengths, default=None,
                   help="真实模型：在哪些长度上报告加速比，逗号分隔，都不能超过 --new-tokens（默认 32,64,128,256）")
    p.add_argument("--dtype", choices=["fp32", "int8"], default="fp32",
                   help="真实模型精度。默认 fp32：有/无缓存 token 完全一致；int8 更快，但不缓存时的动态量化会让 token 分叉")
    p.add_argument("--device", default="auto", help="auto / cpu / cuda / mps")
    p.add_argument("--threads", type=positive, default=None, help="CPU 线程数（默认：全部核心）")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="英文提示词（本地模型只懂英文）")
    p.add_argument("--quick", action="store_true", help="快速模式（不到 1 分钟，用于测试）")
    p.add_argument("--seed", type=int, default=0, help="随机种子")
    return p


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    args.seq_len = args.seq_len or (128 if args.quick else 512)
    args.d_model = args.d_model or (64 if args.quick else 256)
    args.new_tokens = args.new_tokens or (24 if args.quick else 256)
    if args.lengths is None:
        base = [8, 16] if args.quick else [32, 64, 128, 256]
        args.lengths = [x for x in base if x <= args.new_tokens]
    if max(args.lengths) > args.new_tokens:
        parser.error(f"--lengths 里的 {max(args.lengths)} 超过了 --new-tokens {args.new_tokens}：请调大 --new-tokens 或去掉它")
    if args.seq_len < 2:
        parser.error("--seq-len 至少是 2")

    from common.outputs import save_results

    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = {"args": {k: v for k, v in vars(args).items()}, "cpu_count": os.cpu_count(), "loadavg_1min_start": load}
    if args.part in ("all", "toy"):
        results["toy"] = part_toy(args)
    if args.part in ("all", "real"):
        results["real"] = part_real(args)
    if args.part in ("all", "memory"):
        results["memory"] = part_memory(args)
    results["seconds_total"] = time.perf_counter() - t0
    path = save_results(NAME, results)
    print(f"\n结果已保存：{path}（用时 {results['seconds_total']:.0f} 秒；开始时 1 分钟平均负载 {load}）")


if __name__ == "__main__":
    run_cli(main)
