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
  python 01_hello_llm.py --part temperature --prompt "Write a haiku about the sea." --temperatures 0,1,2
  python 01_hello_llm.py --part 5 --layer 3 --head 8
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time

import torch

from common.cli import (add_knob, course_parser, float_list, non_negative_float, non_negative_int,
                        parts_type, positive_int, probability, setup_run)
from common import display
from common.client import client_from_args
from common.errors import UserError, run_cli
from common.local_model import load_local_model
from common.outputs import save_results
from common.plots import new_figure, save_figure
from common.sampling import sampling_probs

NAME = "01_hello_llm"
PARTS = ["stream", "steps", "temperature", "tokens", "attention"]   # --part 1..5 或这些名字
DEFAULT_PROMPT = "Explain what a large language model is in two sentences."
DEFAULT_SENTENCE = "The animal didn't cross the street because it was too tired."
TOKEN_SAMPLES = [  # 第 4 部分：同一个意思的英文和中文，再加代码和 emoji
    ("英文", "Large language models write text one token at a time."),
    ("中文", "大语言模型一次写出一个词元。"),
    ("代码", "def add(a, b):\n    return a + b"),
    ("emoji", "I love 🍕 and 🐱!"),
]
SHADES = " ░▒▓█"  # 终端热力图：权重越大，方块越"实"


def parse_args(argv=None):
    p = course_parser(NAME, __doc__, groups=("backend", "local"))
    p.add_argument("--part", type=parts_type(PARTS), default="all",
                   help="运行哪些部分：all，或逗号列表（数字或名字），如 1,3,5 或 stream,attention")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="提问（默认的本地模型 SmolLM2 只懂英文；中文提问请配 --local-model qwen0.5b）")
    p.add_argument("--temperature", type=non_negative_float, default=0.7, help="第 1、2 部分的采样温度（0 = 贪心）")
    p.add_argument("--temperatures", type=float_list, default="0,0.7,1.5", help="第 3 部分对比的温度，逗号分隔")
    p.add_argument("--top-k", type=non_negative_int, default=50, help="只在概率最高的 k 个 token 里抽（0 = 不限；仅本地模型）")
    p.add_argument("--top-p", type=probability, default=0.9, help="只在累计概率达到 p 的最小集合里抽（1 = 不限）")
    add_knob(p, "--max-new-tokens", type=positive_int, default=120, quick=40, help="第 1 部分最多生成多少个新 token")
    add_knob(p, "--steps", type=positive_int, default=6, quick=3, help="第 2 部分演示几步")
    add_knob(p, "--compare-tokens", type=positive_int, default=48, quick=24, help="第 3 部分：每个温度生成多少个 token")
    add_knob(p, "--compare-seeds", type=positive_int, default=2, quick=1,
             help="第 3 部分：每个温度用几个种子（--seed、--seed+1……）")
    p.add_argument("--sentence", default=DEFAULT_SENTENCE, help="第 5 部分观察注意力的句子（英文）")
    p.add_argument("--focus", default="it", help="第 5 部分观察哪个词的注意力（找不到就用最后一个 token）")
    p.add_argument("--layer", type=int, default=13, help="第 5 部分看第几层的注意力（0 起数，共 30 层）")
    p.add_argument("--head", type=int, default=-1, help="第 5 部分看哪个注意力头（0～8；-1 = 所有头的平均）")
    p.add_argument("--openai-encoding", action="store_true", help="第 4 部分：即使没有缓存也尝试下载 OpenAI 的 tiktoken 编码（需联网）")
    a = p.parse_args(argv)
    a.parts = a.part
    if not a.prompt.strip() or not a.sentence.strip():
        p.error("--prompt 和 --sentence 不能为空：请给一句英文")
    return a


def title(n, text):
    print(f"\n{'=' * 70}\n第 {n} 部分：{text}\n{'=' * 70}", flush=True)


def show(piece: str) -> str:
    """把 token 片段变得"看得见"：空格显示成 ␣，换行显示成 ⏎。"""
    return piece.replace(" ", "␣").replace("\n", "⏎")


def pad(text: str, width: int) -> str:
    """右对齐到 width 格（汉字在终端里占两格；common/display.py，所有课的表格共用）。"""
    return display.pad(text, width, ">")


def has_cjk(text: str) -> bool:
    """文字里有没有汉字（中日韩统一表意文字，含扩展 A 区和兼容区）。"""
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff" for c in text)


def prompt_label(prompt: str, languages: str) -> str:
    """"提问（中文）"还是"提问（英文）"：看提问里实际有没有汉字；模型只懂英文却收到中文提问时，顺带提醒一句。"""
    if not has_cjk(prompt):
        return "提问（英文）"
    if "中文" in languages:
        return "提问（中文）"
    return "提问（中文——这个模型只懂英文，回答可能答非所问）"


def languages_sentence(languages: str) -> str:
    """"它只懂英文。" / "它懂中文和英文。"——模型信息里的语言说明本身不一定带动词。"""
    return f"它{languages}。" if languages.startswith(("只", "懂", "能")) else f"它懂{languages}。"


def entropy_bits(probs: torch.Tensor) -> float:
    """熵（单位：比特）：分布越"平"越大；全部概率压在一个 token 上时为 0。"""
    p = probs[probs > 0].double()
    return max(0.0, float(-(p * p.log2()).sum()))


# ---------------------------------------------------------------- 第 1 部分：流式输出
def stream_pieces(client, lm, args, tokens: list):
    """一片一片地产出回答。本地模型：lm.generate 每生成一个 token 就回调 on_step（这里用来数 token），
    再由 stream_decoder 拼成完整的字；API：服务器推来的每个片段原样交出。"""
    if lm is None:
        yield from client.chat_stream(args.prompt, temperature=args.temperature, top_p=args.top_p,
                                      top_k=args.top_k, max_tokens=args.max_new_tokens, seed=args.seed)
        return
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    decoder = lm.tokenizer.stream_decoder()  # 一个汉字可能跨几个 token：凑齐了再交出
    count = lambda step: None if step.stop else tokens.append(step.token)  # noqa: E731
    for tid in lm.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, on_step=count):
        if text := decoder.feed(tid):
            yield text
    if tail := decoder.flush():
        yield tail


def part_stream(client, lm, args):
    title(1, "流式输出——回答是一片一片到达的")
    print(f"后端：{client.backend}（{client.model_name}）\n提问：{args.prompt}\n回答：", flush=True)
    exact = client.backend == "local"   # 本地后端数的是 token；API 只能数"片段"（服务器不告诉我们 token 数）
    tokens, pieces, t_first = [], [], None
    t0 = time.perf_counter()  # 模型已经加载好，下面只计生成的时间
    for piece in stream_pieces(client, lm if exact else None, args, tokens):
        t_first = t_first or time.perf_counter()
        pieces.append(piece)
        print(piece, end="", flush=True)
    t_end = time.perf_counter()
    if t_first is None:
        raise UserError("模型没有返回任何文字：请换一个提问，或检查 API 设置。")
    n, unit = (len(tokens), "token") if exact else (len(pieces), "片段(chunk)")
    rate = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else None  # 只有一个时算不出速度
    print(f"\n\n收到 {len(pieces)} 个文本片段；前 10 个：{[show(p) for p in pieces[:10]]}")
    print(f"首字延迟 TTFT（发出请求 → 第一个片段）：{t_first - t0:.3f} 秒")
    speed = f"{rate:.1f} {unit}/秒" if rate else "（只收到 1 个，算不出）"
    print(f"生成速度：{speed}（第一个之后的 {n - 1} 个，用时 {t_end - t_first:.2f} 秒）")
    if not exact:
        print("说明：API 流式返回的是'片段'，一个片段不一定正好是一个 token，所以这里数的是片段数。")
    return {"backend": client.backend, "model": client.model_name, "prompt": args.prompt, "text": "".join(pieces),
            "n_pieces": len(pieces), "count": n, "count_unit": "tokens" if exact else "chunks",
            "ttft_s": t_first - t0, "per_s": rate, "total_s": t_end - t0, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "max_new_tokens": args.max_new_tokens}


# ---------------------------------------------------------------- 第 2 部分：自回归的每一步
@torch.inference_mode()
def next_token_logits(lm, ids) -> torch.Tensor:
    """把整个序列喂给模型，取最后一个位置的 logits（对词表里每个 token 的打分）。"""
    return lm.model(torch.tensor([ids], device=lm.device), last_only=True)[0].float().cpu()


def print_step(tok, step, args, answer: list[int]) -> dict:
    """打印一步：前 5 名候选的原始概率和真正抽签用的概率，标出选中的 token。"""
    logits = step.logits.float().cpu()
    raw = torch.softmax(logits, -1)                                          # 模型原始概率（T=1）
    used = sampling_probs(logits, args.temperature, args.top_k, args.top_p)  # 真正抽签用的概率
    top, chosen = torch.topk(raw, 5), step.token
    kept = int((used > 0).sum())
    print(f"\n第 {step.index + 1} 步  候选（原始概率 | 按当前规则抽签的概率；规则过滤后剩 {kept} 个候选"
          + ("，等于必选" if kept == 1 else "") + "）：")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"   {pad(show(tok.piece(i)), 14)}  {p:7.2%} | {float(used[i]):7.2%}{'  ← 选中' if i == chosen else ''}")
    if chosen not in top.indices.tolist():
        print(f"   {pad(show(tok.piece(chosen)), 14)}  {float(raw[chosen]):7.2%} | {float(used[chosen]):7.2%}  ← 选中（不在前 5）")
    answer.append(chosen)
    print(f"   目前的回答：{tok.decode(answer)!r}")
    if step.stop:
        print("   （选中了结束符，生成结束）")
    return {"step": step.index + 1, "chosen": tok.piece(chosen), "chosen_id": chosen,
            "candidates": [{"token": tok.piece(i), "id": i, "prob": p}
                           for p, i in zip(top.values.tolist(), top.indices.tolist())]}


def part_steps(lm, args, prompt_ids):
    title(2, "揭开一步：下一个 token 的概率表 → 选一个 → 接上 → 重复")
    print(f"本地模型 {lm.name}，{prompt_label(args.prompt, lm.info.languages)}：{args.prompt}")
    print(f"提示词按聊天模板拼好后共 {len(prompt_ids)} 个 token。每一步都把整个序列重新喂给模型"
          f"（第 2 课会讲 KV cache 怎样省掉重复计算）。")
    print(f"选词规则：温度 {args.temperature}，top-k {args.top_k}，top-p {args.top_p}，种子 {args.seed}")
    answer, steps, logits = [], [], []
    def on_step(step):  # noqa: E306 - generate() 每走一步回调一次：这一步的 logits 和选中的 token
        logits.append(step.logits.float().cpu())
        steps.append(print_step(lm.tokenizer, step, args, answer))
    for _ in lm.generate(prompt_ids, args.steps, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, use_cache=False, on_step=on_step):
        pass
    return steps, logits[0]


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


def print_temperature_table(tok, rows, args, vocab_size):
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
    print(f"（词表共 {vocab_size} 个 token；top-k/top-p 把尾部的低概率 token 砍掉，避免胡言乱语）")


def part_temperature(lm, args, prompt_ids, logits):
    title(3, "温度（temperature）与 top-k / top-p")
    tok = lm.tokenizer
    print("温度把 logits 除以 T 再做 softmax：T 越小分布越'尖'（更确定），T 越大越'平'（更随机），T=0 就是每次选最大的。")
    rows = temperature_table(logits, args.temperatures, args.top_k, args.top_p)
    print_temperature_table(tok, rows, args, lm.config.vocab_size)
    n_new = args.compare_tokens
    seeds = [args.seed + i for i in range(args.compare_seeds)]
    print(f"\n同一个提问，不同温度各生成 {n_new} 个 token（种子 {seeds}，top-k {args.top_k}，top-p {args.top_p}）：")
    samples = {}
    for t in args.temperatures:
        outs = []
        for s in seeds:
            out = list(lm.generate(prompt_ids, n_new, temperature=t, top_k=args.top_k, top_p=args.top_p, seed=s))
            outs.append(tok.decode(out))
            print(f"  T={t:<4g} 种子 {s}：{outs[-1]!r}", flush=True)
        samples[format(t, "g")] = outs
    if len(seeds) > 1:
        for t, outs in samples.items():
            print(f"  T={t}：换了种子，回答{'完全相同' if outs[0] == outs[1] else '不同'}")
    return {"prompt": args.prompt, "top_k": args.top_k, "top_p": args.top_p, "seeds": seeds,
            "table": [{k: v for k, v in r.items() if k != "probs"} | {"top_tokens": [tok.piece(i) for i in r["top_ids"]]}
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


def tokenize_sample(tok, label, text, extra) -> dict:
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
    return row


def part_tokens(lm, args):
    title(4, "token 是什么：模型读写的最小单位")
    tok = lm.tokenizer
    cjk = sum(1 for i in range(tok.n_vocab) if re.search(r"[\u4e00-\u9fff]", tok.token_bytes(i).decode("utf-8", "ignore")))
    print(f"本地模型的词表有 {tok.n_vocab} 个 token，其中 {cjk} 个包含汉字（占 {100 * cjk / tok.n_vocab:.1f}%）。")
    extra = [(n, e) for n in ("o200k_base", "cl100k_base") if (e := openai_encoding(n, args.openai_encoding))]
    rows = [tokenize_sample(tok, label, text, extra) for label, text in TOKEN_SAMPLES]
    en, zh = rows[0], rows[1]
    print(f"\n同一个意思：英文 {en['tokens']} 个 token，中文 {zh['tokens']} 个 token（是英文的 {zh['tokens'] / en['tokens']:.1f} 倍）。")
    if zh["tokens"] > en["tokens"]:
        print("原因：英文常见单词在词表里是一个整体；汉字在 UTF-8 里占 3 个字节，词表里汉字越少，就越常")
        print("      拆成字节片段。API 按 token 计费、上下文长度也按 token 算，所以用这种词表时中文更'贵'。")
    else:
        print("这个词表里常用汉字和词是整体 token（见上面的汉字 token 数），所以中文不比英文'贵'。"
              "换 --local-model smollm2 / qwen0.5b 对比两种词表。")
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


def heads_on_first_token(focus_heads: torch.Tensor) -> int:
    """focus_heads [头数, q+1]：关注点那一行在每个头上的权重。数一数有几个头把最多的注意力给了第 0 个 token。"""
    return int((focus_heads.argmax(-1) == 0).sum())


def sink_sentence(first_share: float, first_is_max: bool, on_first: int, n_heads: int) -> str:
    """用测出的数字说话：第 0 个 token 分到多少（是不是这一行最多的），几个头把最多的注意力给了它。"""
    said = f"第 0 个 token 分到了 {first_share:.0%}；{n_heads} 个头里有 {on_first} 个把最多的注意力给了它"
    if on_first * 2 > n_heads and first_is_max:
        return said + "：很多头把大量注意力'停放'在开头，常被称作注意力汇聚点(attention sink)。"
    if on_first * 2 > n_heads:
        return said + "：这一层很多头把注意力'停放'在开头（注意力汇聚点，attention sink），但上面这一行的大头不在第 0 个 token。"
    if on_first > 0:
        return said + "：只有少数头把注意力'停放'在开头，这里的注意力汇聚点(attention sink)不明显。"
    return said + "：没有一个头把注意力'停放'在开头——在这一层、这个词上看不到注意力汇聚点(attention sink)。"


def print_heatmap(A, labels):
    print(" " * 13 + "".join(f"{j:<3d}" for j in range(len(labels))))
    for i, row in enumerate(A.tolist()):
        cells = "".join(SHADES[sum(w >= b for b in (0.05, 0.15, 0.3, 0.5))] * 2 + " " for w in row)
        print(f"{pad(labels[i], 10)}{i:>3} {cells}")


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
    print_heatmap(A, labels)
    row = A[q, :q + 1]
    print(f"\n'{show(pieces[q])}'（第 {q} 个 token）分给它自己和前面各 token 的注意力：")
    for j in range(q + 1):
        print(f"  {pad(labels[j], 10)} {row[j]:6.1%} {'█' * round(float(row[j]) * 40)}")
    on_first = heads_on_first_token(heads[:, q, :q + 1])
    print(sink_sentence(float(row[0]), int(row.argmax()) == 0, on_first, heads.shape[0]))
    per_head = []
    for h in range(heads.shape[0]):  # 每个头（不算第 0 个 token）最关注谁——不同的头分工不同
        j = int(heads[h, q, 1:q + 1].argmax()) + 1 if q > 0 else 0
        per_head.append({"head": h, "token": pieces[j], "weight": float(heads[h, q, j])})
    print("各个头（不算第 0 个 token）最关注的词：\n  " +
          "，".join(f"头{d['head']}→{show(d['token'])} {d['weight']:.2f}" for d in per_head))
    png = plot_attention(A, heads[:, q, :], labels, q, args)
    print(f"热力图已保存：{png}")
    return {"sentence": args.sentence, "tokens": pieces, "layer": args.layer, "head": args.head, "focus_index": q,
            "focus_token": pieces[q], "focus_row": row.tolist(), "matrix": A.tolist(), "per_head_top": per_head,
            "heads_max_on_first_token": on_first, "n_heads": heads.shape[0], "png": png}


def plot_attention(A, focus_heads, labels, q, args):
    fig, (ax1, ax2) = new_figure(2, 1, size=(14, 5.5))
    ax1.imshow(A.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax1.set_title(f"layer {args.layer}, " + ("mean of all heads" if args.head < 0 else f"head {args.head}")
                  + " (row = query, col = key)")
    im = ax2.imshow(focus_heads.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax2.set_title(f"layer {args.layer}, each head: where '{labels[q]}' (query {q}) looks")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("key (attended-to token)")
    ax1.set_yticks(range(len(labels)), labels, fontsize=8)
    ax1.set_ylabel("query (attending token)")
    ax2.set_ylabel("attention head")
    ax2.set_yticks(range(focus_heads.shape[0]), [f"head {h}" for h in range(focus_heads.shape[0])], fontsize=8)
    fig.colorbar(im, ax=ax2, label="attention weight (same 0-1 scale in both panels)")
    return str(save_figure(fig, args.out_dir / "attention.png"))


# ---------------------------------------------------------------- 主程序
def check_model_args(args, cfg):
    """层数、头数要等模型加载后才知道，所以在这里检查。"""
    if not 0 <= args.layer < cfg.n_layers:
        raise UserError(f"--layer 必须在 0～{cfg.n_layers - 1} 之间（收到 {args.layer}）：这个模型共 {cfg.n_layers} 层。")
    if not -1 <= args.head < cfg.n_heads:
        raise UserError(f"--head 必须在 0～{cfg.n_heads - 1} 之间，或 -1 表示所有头的平均（收到 {args.head}）。")


def load_local(client, args, device):
    """第 2～5 部分（以及本地后端的第 1 部分）需要本地模型；本课默认 fp32（概率和注意力都是原样的）。"""
    if not ((client is not None and client.backend == "local") or set(args.parts) - {"stream"}):
        return None
    t0 = time.perf_counter()
    lm = load_local_model(args.model_file, dtype=args.dtype, device=device, model=args.local_model)
    print(f"[模型] 本地模型 {lm.name} 已就绪（{time.perf_counter() - t0:.1f} 秒，{torch.get_num_threads()} 个 CPU 线程）。"
          + languages_sentence(lm.info.languages) + ("想用中文对话：--local-model qwen0.5b（Qwen2.5 0.5B，中英文，首次多下载约 478 MB）。"
                                       if lm.key == "smollm2" else ""))
    check_model_args(args, lm.config)
    if client is not None and client.backend != "local":
        print("说明：第 1 部分走 API；其余部分需要 logits / 注意力权重（API 不提供），在本地模型上运行。")
    return lm


def main(argv=None):
    args = parse_args(argv)
    device = setup_run(args)
    t_start = time.perf_counter()
    client = client_from_args(args) if "stream" in args.parts else None
    lm = load_local(client, args, device)
    results = {"parts": args.parts, "seed": args.seed, "quick": args.quick, "dtype": args.dtype,
               "threads": torch.get_num_threads(), "local_model": lm.name if lm else None}
    prompt_ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if lm else None
    logits = None
    if "stream" in args.parts:
        results["streaming"] = part_stream(client, lm, args)
    if "steps" in args.parts:
        results["steps"], logits = part_steps(lm, args, prompt_ids)
    if "temperature" in args.parts:
        logits = next_token_logits(lm, prompt_ids) if logits is None else logits
        results["temperature_table"] = part_temperature(lm, args, prompt_ids, logits)
    if "tokens" in args.parts:
        results["tokens"] = part_tokens(lm, args)
    if "attention" in args.parts:
        results["attention"] = part_attention(lm, args)
    results["total_seconds"] = time.perf_counter() - t_start
    # merge：只重跑某一部分时，别的部分的结果保留；每一部分都记下产生它的参数（run_args：提问、温度、层……）
    path = save_results(args.out_dir, results, merge=True, run_args=args,
                        files=[results["attention"]["png"]] if "attention" in results else ())
    print(f"\n结果已保存：{path}（总用时 {results['total_seconds']:.1f} 秒）")


if __name__ == "__main__":
    run_cli(main)
