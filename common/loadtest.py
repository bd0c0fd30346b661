"""The clients of lesson 06's demo and of benchmarks/serve_load.py: a guided tour of the server with the official
`openai` SDK, then a load test (N concurrent streaming clients, one request at a time vs continuous batching on the
same server and engine), its report (explained with this run's own numbers), the estimated ceiling and the plot.

Everything here talks to a server started with common.serving.Running over HTTP, as any client would; it only
reaches into the server to switch the engine between the two modes (Engine.set_limit), read its step timings
(Engine.reset_stats / Engine.stats) and change the rate limit for the tour (RateLimiter.set_rpm / reset).
It never runs a torch op: in lesson 06 the engine thread is the only thread that does (see Engine.start).
Printed narration is in Chinese, like the lesson. `openai` and matplotlib (common.plots) are imported where they
are used, so that `python 06_serve.py` (the server alone) does not pay for them.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from common.errors import require
from common.outputs import save_results
from common.serving import Auth, Running

PROMPTS = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
    "Give me two tips for learning a new language quickly and remembering new words.",
    "Describe a cat to someone who has never seen one, using simple words.",
    "List the planets of the solar system in order from the sun.",
    "Tell me a short story about a robot who wants to become a painter.",
]


def banner(title: str) -> None:
    print("\n" + "=" * 70 + f"\n{title}\n" + "=" * 70)


def http_get(url: str, key: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode("utf-8")


def tour_auth(run: Running, client, user: tuple[str, str]) -> dict:
    """OAuth2 password flow -> a JWT, a wrong key (401), the rate limit (429)."""
    import openai

    form = f"grant_type=password&username={user[0]}&password={user[1]}".encode()
    with urllib.request.urlopen(urllib.request.Request(run.base_url.removesuffix("/v1") + "/oauth/token", form)) as r:
        token = json.loads(r.read())
    jwt_models = openai.OpenAI(base_url=run.base_url, api_key=token["access_token"], max_retries=0).models.list()
    print(f"\nOAuth2 密码模式：用户 {user[0]} 换到一个 JWT（{token['expires_in']} 秒后过期），用它列出模型："
          f"{[m.id for m in jwt_models]}（token 本身不打印）")

    status = {}
    try:
        openai.OpenAI(base_url=run.base_url, api_key="wrong-key", max_retries=0).models.list()
    except openai.AuthenticationError as e:
        status["401"] = e.status_code
        print(f"错误的 key → {e.status_code}：{e.body['message'] if isinstance(e.body, dict) else e}")
    limiter = run.srv.limiter
    limiter.set_rpm(3)                              # for the tour only: at most 3 requests a minute
    try:
        for i in range(4):
            client.models.list()
    except openai.RateLimitError as e:
        status["429"] = e.status_code
        print(f"每分钟限 3 次，第 {i + 1} 次 → {e.status_code}，Retry-After: {e.response.headers.get('retry-after')} 秒")
    finally:
        limiter.set_rpm(0)
        limiter.reset()
    require(status == {"401": 401, "429": 429}, f"认证/限流没有按预期返回 401/429：{status}")
    return status


def tour(run: Running, key: str, user: tuple[str, str], n_tokens: int) -> dict:
    """The openai SDK as the client: streaming, a session, a JWT, 401, 429, /metrics."""
    import openai

    client = openai.OpenAI(base_url=run.base_url, api_key=key, max_retries=0)
    banner("第 1 部分：用官方 openai SDK 访问我们自己的服务器")
    print(f"地址 {run.base_url}，模型列表：{[m.id for m in client.models.list()]}")
    print("流式回答：", end="", flush=True)
    t0, first, pieces = time.perf_counter(), None, 0
    for ch in client.chat.completions.create(model=run.srv.model_id, messages=[{"role": "user", "content": PROMPTS[3]}],
                                             max_tokens=n_tokens, temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces += 1
            print(ch.choices[0].delta.content, end="", flush=True)
    print(f"\n  → {pieces} 个 SSE 片段，首 token 延迟 {first * 1000:.0f} ms")

    sid, ask = f"demo-{uuid.uuid4().hex[:8]}", dict(model=run.srv.model_id, max_tokens=n_tokens, temperature=0)
    r1 = client.chat.completions.create(messages=[{"role": "user", "content": "My name is Lin. Say hello to me."}],
                                        extra_body={"session_id": sid}, **ask)
    r2 = client.chat.completions.create(messages=[{"role": "user", "content": "What is my name?"}],
                                        extra_body={"session_id": sid}, **ask)
    history = json.loads(http_get(run.base_url + f"/sessions/{sid}", key))["messages"]
    print(f"\n会话 {sid}：第二问的提示词有 {r2.usage.prompt_tokens} 个 token（第一问 {r1.usage.prompt_tokens} 个）"
          f"——服务器把历史拼了进去。\n  第二问的回答：{r2.choices[0].message.content!r}；数据库里现在有 {len(history)} 条消息。")
    require(len(history) == 4 and r2.usage.prompt_tokens > r1.usage.prompt_tokens, "会话历史没有保存或没有用上")

    status = tour_auth(run, client, user)

    families = {f.name: f for f in text_string_to_metric_families(http_get(run.base_url.removesuffix("/v1") + "/metrics"))}
    value = {s.name: s.value for f in families.values() for s in f.samples}
    print(f"\n/metrics（Prometheus 文本格式，{len(families)} 个指标族）：已生成 token "
          f"{value['llm_generated_tokens_total']:.0f} 个，首 token 延迟的直方图里有 "
          f"{value['llm_time_to_first_token_seconds_count']:.0f} 个样本，平均 "
          f"{value['llm_time_to_first_token_seconds_sum'] / max(1, value['llm_time_to_first_token_seconds_count']) * 1000:.0f} ms")
    return {"session_messages": len(history), "second_prompt_tokens": r2.usage.prompt_tokens,
            "first_prompt_tokens": r1.usage.prompt_tokens, "status": status,
            "generated_tokens": value["llm_generated_tokens_total"]}


def one_client(base_url: str, key: str, model: str, plan: list[tuple[str, int]]) -> list[dict]:
    """One load-test client: sends the streaming requests of its plan one after another and records when each
    content chunk arrives."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    out = []
    for prompt, n in plan:
        t0, times, text, usage = time.perf_counter(), [], "", None
        for ch in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if ch.choices and ch.choices[0].delta.content:
                times.append(time.perf_counter())
                text += ch.choices[0].delta.content
            usage = ch.usage or usage
        out.append({"want": n, "tokens": usage.completion_tokens, "ttft": times[0] - t0, "text": text,
                    "gaps": [b - a for a, b in zip(times, times[1:])], "times": times})
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load_round(run: Running, key: str, n_clients: int, per_client: int, max_tokens: int, seed: int) -> dict:
    """n clients start together; throughput = all generated tokens / time from the start until the last one ends."""
    rng = random.Random(seed * 1000 + n_clients)       # both modes send exactly the same requests
    plans = [[(rng.choice(PROMPTS), rng.randint(max(1, max_tokens // 2), max_tokens)) for _ in range(per_client)]
             for _ in range(n_clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        per = list(pool.map(lambda p: one_client(run.base_url, key, run.srv.model_id, p), plans))
    seconds = time.perf_counter() - t0
    records = [r for rs in per for r in rs]
    # steady throughput: only while every client is still connected (until the first one has its last token)
    full_until = min(rs[-1]["times"][-1] for rs in per)
    window = 0.0
    for r in records:                          # each request counts the share of its chunks inside that window
        times = r.pop("times")
        window += r["tokens"] * sum(t <= full_until for t in times) / len(times)
    require(all(r["tokens"] == r["want"] for r in records), "有请求生成的 token 数不等于 max_tokens（ignore_eos）")
    gaps = [g for r in records for g in r["gaps"]]
    ttft = [r["ttft"] for r in records]
    tokens = sum(r["tokens"] for r in records)
    return {"clients": n_clients, "requests": len(records), "tokens": tokens, "seconds": round(seconds, 3),
            "tok_s": tokens / seconds, "steady_tok_s": window / (full_until - t0),
            "ttft_p50_ms": percentile(ttft, 50) * 1000,
            "ttft_p95_ms": percentile(ttft, 95) * 1000, "tpot_p50_ms": percentile(gaps, 50) * 1000,
            "tpot_p95_ms": percentile(gaps, 95) * 1000, "texts": [r["text"] for r in records]}


def load_test(run: Running, key: str, clients: list[int], per_client: int, max_tokens: int, seed: int) -> dict:
    """For each number of clients: first one request at a time (the engine uses 1 row), then continuous batching
    (all rows), alternating, so that a change of load on the machine hits both modes alike."""
    engine = run.srv.engine
    rows = engine.cache.batch
    one_client(run.base_url, key, run.srv.model_id, [(PROMPTS[0], 2)])                 # warm-up
    out = {"one_at_a_time": [], "batching": []}
    steps, alone = {}, {}          # batching: decode steps by batch size; one at a time: decode / prefill steps

    def add(acc: dict, key, count_secs) -> None:
        count, secs = acc.get(key, (0, 0.0))
        acc[key] = (count + count_secs[0], secs + count_secs[1])
    for n in tqdm(clients, desc="压测（并发客户端数）", unit="轮"):
        for mode, limit in (("one_at_a_time", 1), ("batching", rows)):
            engine.set_limit(limit)
            engine.reset_stats()
            out[mode].append(load_round(run, key, n, per_client, max_tokens, seed))
            stats = engine.stats()
            if mode == "batching":
                for b, count_secs in stats["decode"].items():
                    add(steps, b, count_secs)
            else:
                add(alone, "decode", stats["decode"].get(1, (0, 0.0)))
                add(alone, "prefill", stats["prefill"])
    engine.set_limit(rows)
    same = sum(a == b for x, y in zip(out["one_at_a_time"], out["batching"]) for a, b in zip(x["texts"], y["texts"]))
    total = sum(len(x["texts"]) for x in out["batching"])
    for mode in out.values():
        for row in mode:
            row.pop("texts")
    out["step_ms"] = {b: 1000 * s / c for b, (c, s) in sorted(steps.items())}
    out["alone_ms"] = {k: 1000 * s / c for k, (c, s) in alone.items() if c}
    out["same_text"], out["compared"] = same, total
    return out


def report(load: dict, weight_mb: float | None, dtype: str = "fp32") -> dict:
    """Prints the table and explains the result with this run's numbers; returns the findings for results.json."""
    one, bat = load["one_at_a_time"], load["batching"]
    print(f"\n{'并发':>4} | {'一次一个 tok/s':>14} {'TTFT p50/p95 ms':>17} | {'连续批处理 tok/s':>16} "
          f"{'TTFT p50/p95 ms':>17} {'每 token p50/p95 ms':>19} | 倍数")
    for a, b in zip(one, bat):
        print(f"{a['clients']:>4} | {a['tok_s']:>14.1f} {a['ttft_p50_ms']:>8.0f}/{a['ttft_p95_ms']:<8.0f} | "
              f"{b['tok_s']:>16.1f} {b['ttft_p50_ms']:>8.0f}/{b['ttft_p95_ms']:<8.0f} "
              f"{b['tpot_p50_ms']:>9.0f}/{b['tpot_p95_ms']:<9.0f} | {b['tok_s'] / a['tok_s']:.2f}×")
    speedup = {b["clients"]: b["tok_s"] / a["tok_s"] for a, b in zip(one, bat)}
    top = max(speedup)
    print(f"\n{top} 个并发客户端时，连续批处理的总吞吐是一次一个的 {speedup[top]:.2f} 倍"
          f"（{bat[-1]['tok_s']:.1f} vs {one[-1]['tok_s']:.1f} tokens/s）。")
    steady = {b["clients"]: b["steady_tok_s"] / a["steady_tok_s"] for a, b in zip(one, bat)}
    print(f"  只算 {top} 个客户端都在线的那段时间（去掉最后几个请求收尾、批变小的阶段）：{steady[top]:.2f} 倍"
          f"（{bat[-1]['steady_tok_s']:.1f} vs {one[-1]['steady_tok_s']:.1f} tokens/s）。"
          f"每个客户端发的请求越多，收尾占比越小，两个数越接近。")
    ceil = explain_speedup(load, speedup, weight_mb, 8 if 8 in speedup else top)
    flat = explain_flattening(bat)
    a, b, c = bat[0], bat[-1], one[-1]
    grew = "变成" if b["tpot_p50_ms"] > a["tpot_p50_ms"] else "（这次没有变长）仍是"
    print(f"代价是延迟：每 token 间隔 p50 从 {a['clients']} 个客户端时的 {a['tpot_p50_ms']:.0f} ms {grew} "
          f"{b['clients']} 个时的 {b['tpot_p50_ms']:.0f} ms（每步要算的行更多；新请求的预填充也插在解码步里）。")
    print(f"一次一个时，{c['clients']} 个客户端的 TTFT p95 是 {c['ttft_p95_ms'] / 1000:.1f} 秒（排队等前面的人走完），"
          f"连续批处理是 {b['ttft_p95_ms'] / 1000:.1f} 秒"
          + ("：新请求下一步就能加入。" if b["ttft_p95_ms"] < c["ttft_p95_ms"] else "：这次并没有更短（机器太忙？）。"))
    why = ("int8 的激活量化按整个批算缩放系数，同一个请求和谁同批，舍入就不同；所以'批处理 == 单独算'只在 fp32 上检查"
           if dtype == "int8" else "批量计算的浮点舍入和单独算有 1e-5 级差别，两个 token 分数几乎相等时会选得不同")
    print(f"两种模式下同一请求的贪心输出逐字相同：{load['same_text']}/{load['compared']}"
          + ("。" if load["same_text"] == load["compared"] else f"（不同的那几个：{why}）。"))
    return {"speedup": speedup, "speedup_steady": steady, "flattens_at": flat, "ceiling": ceil}


def explain_speedup(load: dict, speedup: dict, weight_mb: float | None, clients: int) -> dict | None:
    """Why batching helps (a decode step reads every weight once, whatever the batch) and how far it can go at
    this many clients (the ceiling). Returns the ceiling (None when this run cannot estimate it)."""
    steps = load["step_ms"]
    if 1 in steps and len(steps) > 1:
        big = max(steps)
        ratio = steps[big] / steps[1]
        print(f"为什么：解码时每一步都要把全部权重从内存读一遍。实测纯解码的一步，批大小 1 用 {steps[1]:.0f} ms，"
              f"批大小 {big} 用 {steps[big]:.0f} ms——{big} 倍的 token 只多花了 {ratio:.2f} 倍时间，"
              f"每个 token 的时间降到批大小 1 时的 {ratio / big:.2f} 倍。")
        if weight_mb:
            print(f"  （批大小 1 时一步读约 {weight_mb:.0f} MB 权重，相当于 {weight_mb / steps[1]:.1f} GB/s："
                  f"这一步是'读内存受限'，计算单元大多在等数据；多放几行进来，读一次权重就能多算几个 token。）")
    ceil = ceiling(load, clients)
    if ceil:
        rows = ceil["rows"]
        print(f"上限（用本次测到的数估算，{ceil['clients']} 个客户端）：一次一个时每个请求 = 一次预填充 "
              f"{ceil['prefill_ms']:.0f} ms + {ceil['tokens_per_request'] - 1:.1f} 个解码步 × {ceil['decode1_ms']:.0f} ms。"
              f"连续批处理能把解码步分给 {rows} 行（批大小 {rows} 一步 {ceil['decode_rows_ms']:.0f} ms），但预填充主要是算力，"
              f"批处理省不了多少。假设一点也省不了，就算每一步都坐满 {rows} 行，倍数也只有约 {ceil['max_speedup']:.2f}"
              f"（实测 {speedup[ceil['clients']]:.2f}；预填充和解码挤在同一步时能共用一次读权重，所以实测可以略高于它）；"
              f"回答越长，预填充的占比越小，上限越接近纯解码的 {ceil['pure_decode_speedup']:.1f} 倍。")
    return ceil


def explain_flattening(bat: list[dict]) -> int | None:
    """Where the throughput curve flattens: from there on every step adds < 25%. Returns that client count."""
    gains = [b["tok_s"] / a["tok_s"] for a, b in zip(bat, bat[1:])]
    i = next((i for i in range(1, len(bat)) if all(g < 1.25 for g in gains[i - 1:])), None)  # < 1.25x from here on
    flat = bat[i]["clients"] if i else None
    if flat:
        gain = bat[i]["tok_s"] / bat[i - 1]["tok_s"]
        why = ("批大了以后矩阵乘变成'算力受限'，2 个核心的算力用满了，再加上注意力和 padding 的开销"
               if gain >= 1 else "吞吐反而下降了：多半是别的程序在抢 CPU（看看结尾的机器负载）")
        print(f"曲线在 {bat[i - 1]['clients']} → {flat} 个客户端时变平（吞吐 ×{gain:.2f}）：{why}。")
    else:
        print("在测到的范围内，吞吐还在随并发数明显上升（没有变平）。")
    return flat


def ceiling(load: dict, clients: int) -> dict | None:
    """Estimated ceiling of the speedup at c clients: prefill time cannot be batched away at all, and decode steps are
    shared by at most b = min(c, the largest batch measured) rows. None when this run has no numbers for it."""
    alone, steps = load.get("alone_ms", {}), load["step_ms"]
    row = next((r for r in load["batching"] if r["clients"] == clients), None)
    b = min(clients, max(steps, default=0))
    if row is None or "decode" not in alone or "prefill" not in alone or b not in steps:
        return None
    n, P, d1, db = row["tokens"] / row["requests"], alone["prefill"], alone["decode"], steps[b]
    return {"clients": clients, "rows": b, "tokens_per_request": n, "prefill_ms": P, "decode1_ms": d1,
            "decode_rows_ms": db, "max_speedup": (P + (n - 1) * d1) / (P + (n - 1) * db / b),
            "pure_decode_speedup": b * d1 / db}


def plot(load: dict, path) -> None:
    """Throughput and time to first token against the number of clients, both modes. One colour per mode in
    both panels (p50 solid, p95 dashed); x ticks are the client counts themselves (1, 2, 4, 8, 16)."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    from common.plots import legend_outside, new_figure, save_figure

    fig, (ax1, ax2) = new_figure(2, size=(13.5, 4.4))
    counts = sorted({r["clients"] for mode in ("one_at_a_time", "batching") for r in load[mode]})
    for mode, label, colour in (("one_at_a_time", "one at a time", "C1"), ("batching", "continuous batching", "C0")):
        rows = load[mode]
        x = [r["clients"] for r in rows]
        ax1.plot(x, [r["tok_s"] for r in rows], "o-", color=colour, label=f"{label}")
        ax2.plot(x, [r["ttft_p50_ms"] / 1000 for r in rows], "o-", color=colour, label=f"{label}: p50")
        ax2.plot(x, [r["ttft_p95_ms"] / 1000 for r in rows], "s--", color=colour, label=f"{label}: p95")
    ax1.set(ylabel="aggregate tokens/s", title="Throughput")
    ax2.set(ylabel="seconds (log scale)", title="Time to first token", yscale="log")
    ax2.yaxis.set_major_formatter(FormatStrFormatter("%g"))   # 0.2, not 2×10⁻¹
    lo, hi = ax2.get_ylim()
    if hi < 10 * lo:                                           # within one decade: label the minor ticks too
        ax2.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(counts))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("concurrent streaming clients (log scale)")
        ax.grid(alpha=0.3)
    legend_outside(ax2)
    print(f"图已保存：{save_figure(fig, path)}")


def demo(args, make_server) -> int:
    """Lesson 06's --demo: start the lesson's server in this process (make_server(args, **settings); auth on, a
    random key and user, never printed), run the tour and the load test against it, explain and save the results."""
    import torch     # only to report the thread count; this thread runs no torch op (see Engine.start in 06)

    key, user = "sk-demo-" + secrets.token_urlsafe(16), ("student", secrets.token_urlsafe(12))
    # the server's own loader thread loads the model (a torch op in this thread would slow the engine)
    srv = make_server(args, auth=Auth([key], dict([user]), secrets.token_urlsafe(32), 30),
                      session_db=args.out_dir / "demo_sessions.sqlite3")
    print(f"[演示] 进程内启动服务器（认证开启：一个随机 API key 和用户 {user[0]}，都不打印）……")
    t0 = time.perf_counter()
    with Running(srv) as run:
        facts = tour(run, key, user, args.tour_tokens)
        banner(f"第 2 部分：压测——{','.join(map(str, args.clients))} 个并发流式客户端，每个发 "
               f"{args.requests_per_client} 个请求，每个请求 {max(1, args.load_tokens // 2)}～{args.load_tokens} 个 token")
        print(f"同一台服务器、同一份引擎代码：'一次一个' = 引擎只用 KV 缓存的 1 行；'连续批处理' = 最多 "
              f"{srv.engine.cache.batch} 行。KV 缓存预分配 {srv.engine.cache.nbytes_allocated() / 2**20:.0f} MB。")
        load = load_test(run, key, args.clients, args.requests_per_client, args.load_tokens, args.seed)
        prompt_tokens = srv.metrics.registry.get_sample_value("llm_prompt_tokens_total")
        load["prefix_cached_tokens"], load["prompt_tokens"] = srv.engine.prefix_hits, prompt_tokens
        if srv.engine.prefix:
            print(f"前缀缓存：本次 {prompt_tokens:.0f} 个提示词 token 里有 {srv.engine.prefix_hits} 个"
                  f"（{srv.engine.prefix_hits / prompt_tokens:.0%}，开头的默认系统提示词）直接复制了缓存好的 K/V，不用重新预填充。")
    weight_mb = sum(p.numel() * p.element_size() for p in srv.lm.model.parameters()) / 1e6 if args.dtype == "fp32" else None
    findings = report(load, weight_mb, args.dtype)
    plot(load, args.out_dir / "serve_load.png")
    path = save_results(args.out_dir, {
        "tour": facts, "load": load, **findings, "settings": {
            "clients": args.clients, "requests_per_client": args.requests_per_client, "load_tokens": args.load_tokens,
            "dtype": args.dtype, "max_batch": args.max_batch, "threads": torch.get_num_threads()},
        "loadavg": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1)})
    print(f"结果已保存：{path}（机器负载 {os.getloadavg()[0]:.2f}；别的程序占用 CPU 时数字会偏低）")
    return 0
