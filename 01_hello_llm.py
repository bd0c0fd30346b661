"""第 1 课：LLM 基础体验——亲眼看一个真实的大语言模型怎样一个 token 一个 token 地写字。

你将学到（约 5 分钟）：
  1. 流式输出：回答是一小片一小片"流"出来的；测出本次的首字延迟（TTFT）和每秒 token 数；
  2. 一步之内发生了什么：模型给出"下一个 token"的概率表，选一个接上，再重复——自回归生成；
  3. 温度（以及 top-k / top-p）：同一个问题在不同温度下的回答，和概率表如何变尖/变平（熵）；
  4. token 是什么：英文、中文、代码、emoji 各被切成多少个 token；
  5. 注意力：句子里某个词"看向"前面哪些词（真实注意力权重的热力图）。

默认离线运行本地模型 SmolLM2-135M-Instruct（只懂英文，所以提示词用英文）；
设置了 OPENAI_API_KEY / OPENAI_BASE_URL 时，第 1 部分的流式输出走 API，其余部分需要
logits 和注意力权重（API 不提供），仍在本地模型上运行。
示例：
  python 01_hello_llm.py --quick
  python 01_hello_llm.py --part 3 --prompt "Write a haiku about the sea." --temperatures 0,1,2
  python 01_hello_llm.py --part 5 --layer 3 --head 8
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import tempfile
import threading
import time
import unicodedata

import torch

from common.client import LLMClient, add_client_args, client_from_args
from common.device import setup_threads
from common.errors import UserError, run_cli
from common.outputs import output_dir, save_results
from common.sampling import check_sampling_args, sampling_probs

NAME = "01_hello_llm"
DEFAULT_PROMPT = "Explain what a large language model is in two sentences."
DEFAULT_SENTENCE = "The animal didn't cross the street because it was too tired."
TOKEN_SAMPLES = [  # 第 4 部分：同一个意思的英文和中文，再加代码和 emoji
    ("英文", "Large language models write text one token at a time."),
    ("中文", "大语言模型一次写出一个词元。"),
    ("代码", "def add(a, b):\n    return a + b"),
    ("emoji", "I love 🍕 and 🐱!"),
]
SHADES = " ░▒▓█"  # 终端热力图：权重越大，方块越"实"


class Parser(argparse.ArgumentParser):
    """参数写错时给一行中文提示（而不是英文的 usage 报错）。"""

    def error(self, message):
        self.exit(2, f"错误：参数有误（{message}）。运行 python {NAME}.py --help 查看所有选项。\n")


def parse_args(argv=None):
    p = Parser(description="第 1 课：LLM 基础体验（流式输出、自回归、温度、token、注意力）")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="提问（本地模型只懂英文）")
    p.add_argument("--temperature", type=float, default=0.7, help="第 1、2 部分的采样温度（0 = 贪心）")
    p.add_argument("--temperatures", default="0,0.7,1.5", help="第 3 部分对比的温度，逗号分隔")
    p.add_argument("--top-k", type=int, default=50, help="只在概率最高的 k 个 token 里抽（0 = 不限；仅本地模型）")
    p.add_argument("--top-p", type=float, default=0.9, help="只在累计概率达到 p 的最小集合里抽（1 = 不限）")
    p.add_argument("--max-tokens", type=int, default=None, help="第 1 部分最多生成多少 token（默认 120，--quick 为 40）")
    p.add_argument("--steps", type=int, default=None, help="第 2 部分演示几步（默认 6，--quick 为 3）")
    p.add_argument("--sentence", default=DEFAULT_SENTENCE, help="第 5 部分观察注意力的句子（英文）")
    p.add_argument("--focus", default="it", help="第 5 部分观察哪个词的注意力（默认 it；找不到就用最后一个 token）")
    p.add_argument("--layer", type=int, default=13, help="第 5 部分看第几层的注意力（0 起数，共 30 层）")
    p.add_argument("--head", type=int, default=-1, help="第 5 部分看哪个注意力头（0～8；-1 = 所有头的平均）")
    p.add_argument("--openai-encoding", action="store_true", help="第 4 部分：即使没有缓存也尝试下载 OpenAI 的 tiktoken 编码（需联网）")
    p.add_argument("--part", default="all", help="运行哪些部分：all，或逗号列表如 1,3,5")
    p.add_argument("--seed", type=int, default=0, help="随机种子（让采样结果可复现）")
    p.add_argument("--quick", action="store_true", help="快速模式：生成更少的 token（测试/CI 用）")
    add_client_args(p)
    a = p.parse_args(argv)

    # ---- 检查参数：写错了就给一行中文提示 ----
    check_sampling_args(a.temperature, a.top_k, a.top_p)
    try:
        a.temps = [float(t) for t in a.temperatures.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--temperatures 要写成逗号分隔的数字，例如 0,0.7,1.5（收到 {a.temperatures!r}）。") from None
    if not a.temps or any(t < 0 for t in a.temps):
        raise UserError(f"--temperatures 里的每个温度都必须 ≥ 0，例如 0,0.7,1.5（收到 {a.temperatures!r}）。")
    a.parts = [1, 2, 3, 4, 5] if a.part.strip().lower() == "all" else []
    if not a.parts:
        for x in a.part.split(","):
            if x.strip() not in {"1", "2", "3", "4", "5"}:
                raise UserError(f"--part 只能是 all 或 1～5 的逗号列表，例如 1,3,5（收到 {a.part!r}）。")
            a.parts.append(int(x))
        a.parts = sorted(set(a.parts))
    a.max_tokens = a.max_tokens if a.max_tokens is not None else (40 if a.quick else 120)
    a.steps = a.steps if a.steps is not None else (3 if a.quick else 6)
    if a.max_tokens < 1 or a.steps < 1:
        raise UserError("--max-tokens 和 --steps 必须是正整数。")
    if not a.prompt.strip() or not a.sentence.strip():
        raise UserError("--prompt 和 --sentence 不能为空：请给一句英文。")
    return a


def title(n, text):
    print(f"\n{'=' * 70}\n第 {n} 部分：{text}\n{'=' * 70}", flush=True)


def show(piece: str) -> str:
    """把 token 片段变得"看得见"：空格显示成 ␣，换行显示成 ⏎。"""
    return piece.replace(" ", "␣").replace("\n", "⏎")


def pad(text: str, width: int) -> str:
    """右对齐到 width 格（汉字在终端里占两格）。"""
    w = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return " " * max(0, width - w) + text


def entropy_bits(probs: torch.Tensor) -> float:
    """熵（单位：比特）：分布越"平"越大；全部概率压在一个 token 上时为 0。"""
    p = probs[probs > 0].double()
    return max(0.0, float(-(p * p.log2()).sum()))


# ---------------------------------------------------------------- 第 1 部分：流式输出
def part_stream(client, args):
    title(1, "流式输出——回答是一片一片到达的")
    print(f"后端：{client.backend}（{client.model_name}）\n提问：{args.prompt}\n回答：", flush=True)
    counter = {"n": 0}
    lm = client.local() if client.backend == "local" else None
    if lm is not None:  # 本地后端：给 generate 套一层计数器，数出真正生成了多少个 token
        original = lm.generate

        def counting_generate(*a, **kw):
            for tid in original(*a, **kw):
                counter["n"] += 1
                yield tid
        lm.generate = counting_generate
    pieces, t_first = [], None
    t0 = time.perf_counter()  # 模型已经加载好，下面只计生成的时间
    try:
        for piece in client.chat_stream(args.prompt, temperature=args.temperature, top_p=args.top_p,
                                        top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed):
            if t_first is None:
                t_first = time.perf_counter()
            pieces.append(piece)
            print(piece, end="", flush=True)
    finally:
        if lm is not None:
            del lm.generate  # 去掉计数器，恢复原来的方法
    t_end = time.perf_counter()
    if t_first is None:
        raise UserError("模型没有返回任何文字：请换一个提问，或检查 API 设置。")
    # 本地后端数的是 token；API 只能数"片段"（一个片段可能含多个 token，服务器不告诉我们）
    exact = lm is not None  # （若 API 中途失败、自动改用本地模型，这里仍按片段计数）
    n, unit = (counter["n"], "token") if exact else (len(pieces), "片段(chunk)")
    rate = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else None  # 只有一个时算不出速度
    print(f"\n\n收到 {len(pieces)} 个文本片段；前 10 个：{[show(p) for p in pieces[:10]]}")
    print(f"首字延迟 TTFT（发出请求 → 第一个片段）：{t_first - t0:.3f} 秒")
    speed = f"{rate:.1f} {unit}/秒" if rate else "（只收到 1 个，算不出）"
    print(f"生成速度：{speed}（第一个之后的 {n - 1} 个，用时 {t_end - t_first:.2f} 秒）")
    if not exact:
        print("说明：API 流式返回的是'片段'，一个片段不一定正好是一个 token，所以这里数的是片段数。")
    return {"backend": client.backend, "model": client.model_name, "text": "".join(pieces),
            "n_pieces": len(pieces), "count": n, "count_unit": "tokens" if exact else "chunks",
            "ttft_s": t_first - t0, "per_s": rate, "total_s": t_end - t0}


# ---------------------------------------------------------------- 第 2 部分：自回归的每一步
@torch.inference_mode()
def next_token_logits(lm, ids) -> torch.Tensor:
    """把整个序列喂给模型，取最后一个位置的 logits（对词表里每个 token 的打分）。"""
    return lm.model(torch.tensor([ids], device=lm.device))[0, -1].float().cpu()


def part_steps(lm, args, prompt_ids):
    title(2, "揭开一步：下一个 token 的概率表 → 选一个 → 接上 → 重复")
    tok = lm.tokenizer
    print(f"本地模型 {lm.name}，提问（英文）：{args.prompt}")
    print(f"提示词按聊天模板拼好后共 {len(prompt_ids)} 个 token。每一步都把整个序列重新喂给模型"
          f"（第 2 课会讲 KV cache 怎样省掉重复计算）。")
    print(f"选词规则：温度 {args.temperature}，top-k {args.top_k}，top-p {args.top_p}，种子 {args.seed}")
    gen = torch.Generator().manual_seed(args.seed)
    ids, steps, first_logits = list(prompt_ids), [], None
    for step in range(1, args.steps + 1):
        logits = next_token_logits(lm, ids)
        first_logits = logits if first_logits is None else first_logits
        raw = torch.softmax(logits, -1)                                       # 模型原始概率（T=1）
        used = sampling_probs(logits, args.temperature, args.top_k, args.top_p)  # 真正抽签用的概率
        if args.temperature == 0:
            chosen = int(logits.argmax())
        else:
            chosen = int(torch.multinomial(used, 1, generator=gen))
        top = torch.topk(raw, 5)
        kept = int((used > 0).sum())
        print(f"\n第 {step} 步  候选（原始概率 | 按当前规则抽签的概率；规则过滤后剩 {kept} 个候选"
              + ("，等于必选" if kept == 1 else "") + "）：")
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            mark = "  ← 选中" if i == chosen else ""
            print(f"   {pad(show(tok.piece(i)), 14)}  {p:7.2%} | {float(used[i]):7.2%}{mark}")
        if chosen not in top.indices.tolist():
            print(f"   {pad(show(tok.piece(chosen)), 14)}  {float(raw[chosen]):7.2%} | {float(used[chosen]):7.2%}  ← 选中（不在前 5）")
        ids.append(chosen)
        steps.append({"step": step, "chosen": tok.piece(chosen), "chosen_id": chosen,
                      "candidates": [{"token": tok.piece(i), "id": i, "prob": p}
                                     for p, i in zip(top.values.tolist(), top.indices.tolist())]})
        print(f"   目前的回答：{tok.decode(ids[len(prompt_ids):])!r}")
        if chosen in tok.eos_ids:
            print("   （选中了结束符，生成结束）")
            break
    return steps, first_logits


# ---------------------------------------------------------------- 第 3 部分：温度
def temperature_table(logits: torch.Tensor, temps, top_k=0, top_p=1.0, n_top=6):
    """同一组 logits 在不同温度下的概率分布：前几名的概率、熵、最大概率、top-k/top-p 留下几个 token。"""
    order = torch.topk(logits, n_top).indices                 # 前几名（温度不改变排名）
    rows = []
    for t in temps:
        probs = sampling_probs(logits, t)                     # 只有温度：softmax(logits / T)
        kept_k = int((sampling_probs(logits, t, top_k=top_k) > 0).sum()) if t > 0 else 1
        kept_p = int((sampling_probs(logits, t, top_p=top_p) > 0).sum()) if t > 0 else 1
        kept = int((sampling_probs(logits, t, top_k, top_p) > 0).sum()) if t > 0 else 1
        top = probs[order]
        rows.append({"temperature": t, "probs": probs, "top_ids": order.tolist(), "top_probs": top.tolist(),
                     "other_prob": float(1 - top.sum()), "entropy_bits": entropy_bits(probs),
                     "max_prob": float(probs.max()), "kept_top_k": kept_k, "kept_top_p": kept_p, "kept_both": kept})
    return rows


def part_temperature(lm, args, prompt_ids, logits):
    title(3, "温度（temperature）与 top-k / top-p")
    tok = lm.tokenizer
    print("温度把 logits 除以 T 再做 softmax：T 越小分布越'尖'（更确定），T 越大越'平'（更随机），T=0 就是每次选最大的。")
    rows = temperature_table(logits, args.temps, args.top_k, args.top_p)
    head = "".join(f"{'T=' + format(r['temperature'], 'g'):>9}" for r in rows)
    print(f"\n提示词之后第一个 token 的概率表（用真实 logits 算出，本地模型）：\n{pad('token', 16)}{head}")
    for j, i in enumerate(rows[0]["top_ids"]):
        print(pad(show(tok.piece(i)), 16) + "".join(f"{r['top_probs'][j]:9.2%}" for r in rows))
    print(pad("（其余全部）", 16) + "".join(f"{r['other_prob']:9.2%}" for r in rows))
    print(pad("熵（比特）", 16) + "".join(f"{r['entropy_bits']:9.2f}" for r in rows))
    print(pad("最大概率", 16) + "".join(f"{r['max_prob']:9.2%}" for r in rows))
    print(pad(f"top-k={args.top_k} 留下", 16) + "".join(f"{r['kept_top_k']:9d}" for r in rows))
    print(pad(f"top-p={args.top_p:g} 留下", 16) + "".join(f"{r['kept_top_p']:9d}" for r in rows))
    print(pad("两者都用留下", 16) + "".join(f"{r['kept_both']:9d}" for r in rows))
    print(f"（词表共 {lm.config.vocab_size} 个 token；top-k/top-p 把尾部的低概率 token 砍掉，避免胡言乱语）")

    n_new = 24 if args.quick else 48
    seeds = [args.seed] if args.quick else [args.seed, args.seed + 1]
    print(f"\n同一个提问，不同温度各生成 {n_new} 个 token（种子 {seeds}，top-k {args.top_k}，top-p {args.top_p}）：")
    samples = {}
    for t in args.temps:
        outs = []
        for s in seeds:
            out = list(lm.generate(prompt_ids, n_new, temperature=t, top_k=args.top_k, top_p=args.top_p, seed=s))
            outs.append(tok.decode(out))
            print(f"  T={t:<4g} 种子 {s}：{outs[-1]!r}", flush=True)
        samples[format(t, "g")] = outs
    if len(seeds) > 1:
        for t, outs in samples.items():
            print(f"  T={t}：换了种子，回答{'完全相同' if outs[0] == outs[1] else '不同'}")
    return {"table": [{k: v for k, v in r.items() if k != "probs"} | {"top_tokens": [tok.piece(i) for i in r["top_ids"]]}
                      for r in rows], "samples": samples, "new_tokens": n_new}


# ---------------------------------------------------------------- 第 4 部分：token
def openai_encoding(name: str, force: bool):
    """OpenAI 的 tiktoken 编码：只在本机已有缓存时使用（下载需要联网）；--openai-encoding 时才尝试下载。"""
    import tiktoken
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",
                                                                os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    cached = bool(cache) and os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
    if not (cached or force):
        return None
    box = {}

    def fetch():
        try:
            box["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # noqa: BLE001 - 没联网、缓存损坏……都只是"跳过对照"
            box["error"] = f"{type(e).__name__}"

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout=20)  # 最多等 20 秒，绝不卡住
    if "enc" not in box:
        print(f"（无法获取 OpenAI 编码 {name}：{box.get('error', '超过 20 秒没有下载完')}；跳过对照。）")
    return box.get("enc")


def part_tokens(lm, args):
    title(4, "token 是什么：模型读写的最小单位")
    tok = lm.tokenizer
    cjk = sum(1 for i in range(tok.n_vocab) if re.search(r"[\u4e00-\u9fff]", tok.token_bytes(i).decode("utf-8", "ignore")))
    print(f"本地模型的词表有 {tok.n_vocab} 个 token，其中只有 {cjk} 个包含汉字——它主要用英文训练。")
    extra = [(n, e) for n in ("o200k_base", "cl100k_base") if (e := openai_encoding(n, args.openai_encoding))]
    rows = []
    for label, text in TOKEN_SAMPLES:
        ids = tok.encode(text)
        pieces = [tok.piece(i) for i in ids]
        partial = sum(p.startswith("<0x") for p in pieces)  # 只是半个汉字/emoji 的字节片段
        row = {"label": label, "text": text, "chars": len(text), "utf8_bytes": len(text.encode()),
               "tokens": len(ids), "ids": ids, "pieces": pieces, "byte_fragments": partial}
        print(f"\n[{label}] {text!r}\n  {len(text)} 个字符 → {len(ids)} 个 token"
              f"（每字符 {len(ids) / len(text):.2f} 个；其中 {partial} 个是不完整字节片段 <0x..>）")
        print("  切分：" + " | ".join(show(p) for p in pieces))
        print(f"  id：{ids}")
        for n, e in extra:
            row[n] = len(e.encode(text))
            print(f"  对照 OpenAI {n}：{row[n]} 个 token：" + " | ".join(
                show(e.decode_single_token_bytes(i).decode("utf-8", "replace")) for i in e.encode(text)))
        rows.append(row)
    en, zh = rows[0], rows[1]
    print(f"\n同一个意思：英文 {en['tokens']} 个 token，中文 {zh['tokens']} 个 token（是英文的 {zh['tokens'] / en['tokens']:.1f} 倍）。")
    print("原因：英文常见单词在词表里是一个整体；汉字在 UTF-8 里占 3 个字节，而词表里几乎没有汉字，")
    print("      只好拆成字节片段。API 按 token 计费、上下文长度也按 token 算，所以用这种词表时中文更'贵'。")
    if not extra and not args.openai_encoding:
        print("（本机没有缓存 OpenAI 的 tiktoken 编码，跳过对照；联网时加 --openai-encoding 可以下载并对比。）")
    return {"vocab_size": tok.n_vocab, "vocab_tokens_with_chinese": cjk, "samples": rows,
            "openai_encodings": [n for n, _ in extra]}


# ---------------------------------------------------------------- 第 5 部分：注意力
@torch.inference_mode()
def attention_heads(lm, ids, layer: int) -> torch.Tensor:
    """真实的注意力权重 [头数, T, T]：第 i 行 = 第 i 个 token 分给各个 token 的注意力（每行和为 1）。"""
    _, attn = lm.model(torch.tensor([ids], device=lm.device), return_attn=True)
    return attn[layer][0].float().cpu()


def part_attention(lm, args):
    title(5, "注意力：一个词在'看'前面的哪些词")
    tok = lm.tokenizer
    ids = tok.encode(args.sentence)
    pieces = [tok.piece(i) for i in ids]
    q = next((i for i, p in enumerate(pieces) if p.strip() == args.focus.strip()), len(ids) - 1)
    heads = attention_heads(lm, ids, args.layer)
    A = heads.mean(0) if args.head < 0 else heads[args.head]   # 所有头的平均，或某一个头
    which = "所有头的平均" if args.head < 0 else f"第 {args.head} 号头"
    print(f"句子：{args.sentence!r}（{len(ids)} 个 token）\n第 {args.layer} 层，{which}。行 = 正在'看'的 token，"
          f"列 = 被看的 token；越实的方块权重越大（{SHADES[1]}≥0.05 {SHADES[2]}≥0.15 {SHADES[3]}≥0.3 {SHADES[4]}≥0.5）。")
    print("右上角永远是空的：这是因果掩码（causal mask）——生成时还看不到后面的词。\n")
    labels = [show(p)[:10] for p in pieces]
    print(" " * 13 + "".join(f"{j:<3d}" for j in range(len(ids))))
    for i, row in enumerate(A.tolist()):
        cells = "".join(SHADES[sum(w >= b for b in (0.05, 0.15, 0.3, 0.5))] * 2 + " " for w in row)
        print(f"{pad(labels[i], 10)}{i:>3} {cells}")
    row = A[q, :q + 1]
    print(f"\n'{show(pieces[q])}'（第 {q} 个 token）分给它自己和前面各 token 的注意力：")
    for j in range(q + 1):
        print(f"  {pad(labels[j], 10)} {row[j]:6.1%} {'█' * round(float(row[j]) * 40)}")
    print(f"第 0 个 token 分到了 {row[0]:.0%}：很多头把大量注意力'停放'在开头，常被称作注意力汇聚点(attention sink)。")
    per_head = []
    for h in range(heads.shape[0]):  # 每个头（不算第 0 个 token）最关注谁——不同的头分工不同
        j = int(heads[h, q, 1:q + 1].argmax()) + 1 if q > 0 else 0
        per_head.append({"head": h, "token": pieces[j], "weight": float(heads[h, q, j])})
    print("各个头（不算第 0 个 token）最关注的词：\n  " +
          "，".join(f"头{d['head']}→{show(d['token'])} {d['weight']:.2f}" for d in per_head))
    png = plot_attention(A, heads[:, q, :], labels, q, args.layer, args.head)
    print(f"热力图已保存：{png}")
    return {"sentence": args.sentence, "tokens": pieces, "layer": args.layer, "head": args.head, "focus_index": q,
            "focus_token": pieces[q], "focus_row": row.tolist(), "matrix": A.tolist(), "per_head_top": per_head,
            "png": png}


def plot_attention(A, focus_heads, labels, q, layer, head):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    ax1.imshow(A.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax1.set_title(f"layer {layer}, " + ("mean of all heads" if head < 0 else f"head {head}") + " (row = query, col = key)")
    ax2.imshow(focus_heads.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax2.set_title(f"each head: where '{labels[q]}' (query {q}) looks")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("key (attended-to token)")
    ax1.set_yticks(range(len(labels)), labels, fontsize=8)
    ax2.set_yticks(range(focus_heads.shape[0]), [f"head {h}" for h in range(focus_heads.shape[0])], fontsize=8)
    fig.tight_layout()
    path = output_dir(NAME) / "attention.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------- 主程序
def check_model_args(args, cfg):
    """层数、头数要等模型加载后才知道，所以在这里检查。"""
    if not 0 <= args.layer < cfg.n_layers:
        raise UserError(f"--layer 必须在 0～{cfg.n_layers - 1} 之间（收到 {args.layer}）：这个模型共 {cfg.n_layers} 层。")
    if not -1 <= args.head < cfg.n_heads:
        raise UserError(f"--head 必须在 0～{cfg.n_heads - 1} 之间，或 -1 表示所有头的平均（收到 {args.head}）。")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    threads = setup_threads()
    t_start = time.perf_counter()
    results = {"prompt": args.prompt, "seed": args.seed, "quick": args.quick, "parts": args.parts,
               "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "threads": threads}
    # 本课默认用 fp32（参考精度：概率和注意力都是原样的）；--dtype int8 可以改
    args.dtype = args.dtype or "fp32"
    client = client_from_args(args) if 1 in args.parts else None
    lm = None
    if (client is not None and client.backend == "local") or set(args.parts) & {2, 3, 4, 5}:
        t0 = time.perf_counter()
        lm = (client or LLMClient(backend="local", local_dtype=args.dtype, verbose=False)).local()
        print(f"[模型] 本地模型 {lm.name} 已就绪（{time.perf_counter() - t0:.1f} 秒，{threads} 个 CPU 线程）。它只懂英文。")
        check_model_args(args, lm.config)
        if client is not None and client.backend != "local":
            print("说明：第 1 部分走 API；其余部分需要 logits / 注意力权重（API 不提供），在本地模型上运行。")
        results["local_model"] = lm.name
    prompt_ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if lm else None
    logits = None
    if 1 in args.parts:
        results["streaming"] = part_stream(client, args)
    if 2 in args.parts:
        results["steps"], logits = part_steps(lm, args, prompt_ids)
    if 3 in args.parts:
        logits = next_token_logits(lm, prompt_ids) if logits is None else logits
        results["temperature_table"] = part_temperature(lm, args, prompt_ids, logits)
    if 4 in args.parts:
        results["tokens"] = part_tokens(lm, args)
    if 5 in args.parts:
        results["attention"] = part_attention(lm, args)
    results["total_seconds"] = time.perf_counter() - t_start
    path = save_results(NAME, results)
    print(f"\n结果已保存：{path}（总用时 {results['total_seconds']:.1f} 秒）")


if __name__ == "__main__":
    run_cli(main)
