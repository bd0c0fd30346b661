"""第 3 课：亲手搭一个 RAG（检索增强生成）——切块、建索引、检索、拼提示词、带出处的回答、评测。

模型不知道你的私有文档。RAG 的做法是"开卷考试"：先从文档里检索出相关的段落，
再把它们和问题一起交给模型，让它只根据这些段落作答，并标出出处 [文件#块号]。

你将学到（main 按顺序执行、打印这 7 步）：
  1. 读入知识库；
  2. 把文档切成带位置信息的小块（按句子拼装，大小和重叠以 token 计）；
  3. 建两种索引：BM25（词匹配）和稠密向量（语义），向量缓存在磁盘上；
  4. 用三种检索器之一（bm25 / dense / hybrid = RRF 倒数排名融合）检索问题；
  5. 用一套带标准来源的问题集，测出三种检索器各自的 recall@k 和 MRR；
  6. 拼一个"只能根据资料回答"的提示词，流式生成带出处的回答；
  7. 检查生成的回答里有没有标准答案的关键事实（每道题可列出几种等价说法）。
切块、BM25、向量索引、RRF 的代码在 common/retrieval.py（第 7 课的智能体也用它），
docs/03_hands_on_rag.md 带你逐段读它。

用时：--quick 约半分钟到一分钟（一次检索评测 + 3 个短回答，时间主要花在本地模型生成上）；
完整运行还会对比三种块大小、评测 8 道题的回答，慢几倍。
示例：
  python 03_hands_on_rag.py --quick
  python 03_hands_on_rag.py --question "How many sick days do I get?" --show-prompt
  python 03_hands_on_rag.py --docs 我的文档/ --question "..." --retriever bm25 --json
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from textwrap import indent

import numpy as np

from common.cli import (add_knob, add_max_new_tokens, course_parser, existing_dir, existing_file, non_negative_int,
                        positive_int, setup_run)
from common.display import table as display_table
from common.errors import require, run_cli
from common.outputs import REPO_ROOT, save_results
from common.retrieval import (BM25, DATA_DIR, MIN_COSINE, RETRIEVERS, KnowledgeBase, chunk_all, cosine,
                              default_chunk_tokenizer, dense_index, load_docs, load_questions)

NAME = "03_hands_on_rag"
DEFAULT_QUESTION = {"en": "How many days of paid sick leave do I get per year?", "zh": "每年有几天带薪病假？"}
SWEEP_SIZES = (64, 128, 256)  # 完整运行：比较这几种块大小（重叠 = 块大小的 1/4）


# ---------------------------------------------------------------- 第 1~3 步：读入、切块、建索引
def read_documents(folder: Path, results: dict):
    print("== 第 1 步：读入知识库 ==")
    docs = load_docs(folder)  # common/retrieval.py：.md/.txt，UTF-8，出错给一行中文提示
    shown = folder.resolve().relative_to(REPO_ROOT) if folder.resolve().is_relative_to(REPO_ROOT) else folder
    print(f"  {shown}：{len(docs)} 个文件，共 {sum(len(d.text) for d in docs):,} 个字符")
    results.update(n_docs=len(docs))
    return docs


def check_chunks(docs, chunks, chunk_size: int) -> None:
    """自检（不变式）：每块的文字就是原文 [start, end)，不超过 chunk_size 个 token，
    同一文件的块从头到尾依次推进（相邻块只会重叠、不会留空隙），覆盖全文。"""
    for d in docs:
        cs = [c for c in chunks if c.source == d.name]
        ok = (cs and cs[0].start == 0 and cs[-1].end == len(d.text)
              and all(c.text == d.text[c.start:c.end] and c.n_tokens <= chunk_size for c in cs)
              and all(a.start < b.start <= a.end for a, b in zip(cs, cs[1:])))
        require(ok, f"文件 {d.name} 的块没有按位置完整覆盖原文，或有块超过 {chunk_size} token。")


def make_chunks(args, docs, results: dict):
    print(f"\n== 第 2 步：切块（每块 ≤ {args.chunk_size} token，重叠 ≤ {args.overlap} token）==")
    enc = default_chunk_tokenizer()  # 本地模型 SmolLM2 的分词器（tiktoken 格式）：块大小按它数 token
    chunks = chunk_all(docs, enc, args.chunk_size, args.overlap)
    sizes = [c.n_tokens for c in chunks]
    print(f"  {len(chunks)} 个块；每块 token 数：最少 {min(sizes)}，平均 {np.mean(sizes):.0f}，最多 {max(sizes)}")
    c0 = chunks[min(1, len(chunks) - 1)]
    print(f"  示例 [{c0.id}] 字符 {c0.start}..{c0.end}，{c0.n_tokens} token：{' '.join(c0.text.split())[:150]}...")
    check_chunks(docs, chunks, args.chunk_size)
    print("  自检 ✓ 每块 = 原文[start:end]，都不超过块大小，去掉重叠后正好拼回全文")
    results.update(n_chunks=len(chunks))
    return enc, chunks


def build_index(args, docs, chunks, results: dict):
    from common.client import client_from_args
    print("\n== 第 3 步：建索引 ==")
    client = client_from_args(args)  # 生成回答 + 嵌入向量（API 或本地）；本地模型要到第一次生成时才加载
    t0 = time.perf_counter()
    bm25 = BM25([c.text for c in chunks])                                             # 倒排表 + idf
    vecs, cached = dense_index(chunks, docs, client, args.chunk_size, args.overlap)  # 每块一个单位向量
    t_index = time.perf_counter() - t0
    print(f"  BM25：{len(bm25.postings):,} 个不同的词；稠密向量：{vecs.shape[0]} × {vecs.shape[1]}（{client.embed_name}）"
          f"，{'读自磁盘缓存' if cached else '刚计算并存入缓存'}，用时 {t_index:.2f} 秒")
    results.update(embedder=client.embed_name, backend=client.backend, index_seconds=round(t_index, 3),
                   index_from_cache=cached)
    return client, KnowledgeBase(docs, chunks, bm25, vecs, client, cached)


# ---------------------------------------------------------------- 第 4 步：检索
def check_cosine(qvec: np.ndarray, cvec: np.ndarray) -> None:
    """自检（不变式）：向量都归一化成了单位长度，所以余弦相似度 = 点积（检索时只算点积）。"""
    require(abs(cosine(qvec, cvec) - float(qvec @ cvec)) <= 1e-4, "向量没有归一化，余弦相似度不等于点积，稠密检索的排序不可信。")


def retrieve(args, kb: KnowledgeBase, question: str, results: dict) -> list[tuple[int, float, dict]]:
    print(f"\n== 第 4 步：检索（{args.retriever}，取前 {args.retrieve_k} 块）==\n  问题：{question}")
    qvec = kb.embed([question])[0]
    nothing, best_cos = kb.nothing_relevant(args.retriever, question, qvec)
    hits = [] if nothing else kb.rank(args.retriever, question, qvec)[:args.retrieve_k]
    chunks = kb.chunks
    results["hits"] = [{"rank": r + 1, "chunk": chunks[i].index, **vars(kb.hit(i, s, extra))}
                       for r, (i, s, extra) in enumerate(hits)]
    if nothing:
        msg = (f"知识库里找不到和这个问题相关的内容（没有共同的词，最高余弦相似度只有 {best_cos:.2f} < {MIN_COSINE}）："
               "换个说法，或确认文档里确实写了这件事。")
        print("  " + msg)
        results["message"] = msg
    for r, (i, s, extra) in enumerate(hits, start=1):
        detail = "，".join(f"{k}={v:.3f}" for k, v in extra.items())
        print(f"  {r}. [{chunks[i].id}] 分数 {s:.4f}（{detail}）{' '.join(chunks[i].text.split())[:90]}...")
    if hits:
        top, cvec = chunks[hits[0][0]], kb.vecs[hits[0][0]]
        print(f"  余弦相似度手算：q·c / (|q|·|c|) = {qvec @ cvec:.4f} / ({np.linalg.norm(qvec):.4f} × "
              f"{np.linalg.norm(cvec):.4f}) = {cosine(qvec, cvec):.4f}  （问题 vs [{top.id}]）")
        check_cosine(qvec, cvec)
    return hits


# ---------------------------------------------------------------- 第 5 步：评测检索
def recall_at_k(ranked_sources: list[list[str]], gold: list[str], k: int) -> float:
    """recall@k：标准来源文件出现在前 k 个块里的问题所占比例。"""
    return sum(g in r[:k] for r, g in zip(ranked_sources, gold)) / len(gold)


def mrr(ranked_sources: list[list[str]], gold: list[str], cutoff: int = 10) -> float:
    """MRR：第一个来自标准来源的块排第 r 名就得 1/r 分（前 cutoff 名里没有得 0），再取平均。"""
    total = 0.0
    for r, g in zip(ranked_sources, gold):
        hit = next((i for i, s in enumerate(r[:cutoff]) if s == g), None)
        total += 0.0 if hit is None else 1.0 / (hit + 1)
    return total / len(gold)


def evaluate(kb: KnowledgeBase, questions: list[dict], ks=(1, 3, 5)) -> dict:
    """三种检索器在同一套问题上的 recall@k 和 MRR@10。"""
    qvecs = kb.embed([q["question"] for q in questions])  # 一次算完所有问题的向量
    gold = [q["source"] for q in questions]
    out = {}
    for method in RETRIEVERS:
        ranked = [[kb.chunks[i].source for i, _, _ in kb.rank(method, q["question"], qv)]
                  for q, qv in zip(questions, qvecs)]
        out[method] = {f"recall@{k}": recall_at_k(ranked, gold, k) for k in ks}
        out[method]["mrr@10"] = mrr(ranked, gold)
    return out


def check_recall_monotone(table: dict) -> None:
    """自检（不变式）：前 k 块里命中，前 k+Δ 块里一定也命中，所以 recall@1 ≤ recall@3 ≤ recall@5。"""
    for m, row in table.items():
        vals = [v for c, v in row.items() if c.startswith("recall@")]
        require(vals == sorted(vals), f"{m} 的 recall@k 随 k 变大反而变小（{vals}），评测代码有 bug。")


def print_table(table: dict, title: str, chosen: str) -> None:
    cols = list(next(iter(table.values())).keys())
    print(f"\n{title}")
    rows = [["检索器", *cols]] + [[m, *(f"{row[c]:.3f}" for c in cols),
                                   "← --retriever（第 4、6、7 步用它）" if m == chosen else ""]
                                  for m, row in table.items()]
    print(indent(display_table(rows, align="<" + ">" * len(cols) + "<", sep="   "), "  "))


def retrieval_findings(table: dict, lang: str, embedder: str) -> dict:
    """预期（数据可以推翻它，所以是"发现"而不是自检）：hybrid 的 recall@3 不低于任一单一检索器，且 ≥ 0.9。
    每句解释都由这次测到的数字决定。"""
    h, b, d = (table[m]["recall@3"] for m in ("hybrid", "bm25", "dense"))
    best_name, best = ("bm25", b) if b >= d else ("dense", d)
    if h >= best:
        text = f"hybrid 的 recall@3 = {h:.3f}，不低于 bm25（{b:.3f}）和 dense（{d:.3f}）：两路检索找到的来源，融合后仍在前 3。"
    else:
        text = (f"hybrid 的 recall@3 = {h:.3f}，低于 {best_name} 的 {best:.3f}，和预期相反：RRF 只看名次，"
                f"只被一路检索排进前 3 的块，会被两路都排得中等的块挤出前 3。")
    top = max(table, key=lambda m: table[m]["mrr@10"])
    text += f"MRR@10 最高的是 {top}（{table[top]['mrr@10']:.3f}）。"
    good = h >= 0.9
    text2 = f"hybrid 的 recall@3 = {h:.3f}，{'达到' if good else '没达到'} 0.9。"
    if not good and lang == "zh" and "MiniLM" in embedder:
        text2 += f"可能的原因：{embedder} 是英文嵌入模型，读不懂中文（dense 的 recall@3 只有 {d:.3f}）。"
    elif not good:
        text2 += "可能的原因：问题的说法和文档差得远，或块大小不合适——试试 --chunk-size 和另一种 --retriever。"
    return {"hybrid_recall@3_ge_each_single": {"holds": h >= best, "hybrid": h, "bm25": b, "dense": d, "text": text},
            "hybrid_recall@3_ge_0.9": {"holds": good, "hybrid": h, "text": text2}}


def chunk_size_sweep(docs, enc, client, questions: list[dict]) -> dict:
    """完整运行：同一套问题，换几种块大小重新切块、建索引、评测（recall@3）。"""
    sweep = {}
    for size in SWEEP_SIZES:
        ov = size // 4
        ch = chunk_all(docs, enc, size, ov)
        vecs, _ = dense_index(ch, docs, client, size, ov)
        table = evaluate(KnowledgeBase(docs, ch, BM25([c.text for c in ch]), vecs, client), questions)
        sweep[f"{size}/{ov}"] = {"n_chunks": len(ch), **{m: r["recall@3"] for m, r in table.items()}}
    print("\n块大小对比（recall@3）：")
    rows = [["块/重叠", "块数", "bm25", "dense", "hybrid"]] + [
        [k, row["n_chunks"], f"{row['bm25']:.3f}", f"{row['dense']:.3f}", f"{row['hybrid']:.3f}"] for k, row in sweep.items()]
    print(indent(display_table(rows, sep="   "), "  "))
    return sweep


def plot_retrieval(table: dict, n_questions: int, chunk_size: int, out_dir: Path) -> Path:
    from common.plots import new_figure, save_figure
    cols = [c for c in next(iter(table.values())) if c.startswith("recall")] + ["mrr@10"]
    fig, ax = new_figure(size=(7, 4.2))
    w = 0.8 / len(table)
    for j, (m, row) in enumerate(table.items()):
        bars = ax.bar(np.arange(len(cols)) + j * w, [row[c] for c in cols], w, label=m)
        ax.bar_label(bars, fmt="%.3f", fontsize=6.5, padding=1)
    ax.set_xticks(np.arange(len(cols)) + w * (len(table) - 1) / 2, cols)
    ax.set_ylim(0, 1.3)  # bars end at 1.0; the legend sits in the empty band above them
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("share of questions (recall@k) / MRR@10")
    ax.set_xlabel("metric (recall@k: gold source file in the top k chunks)")
    ax.set_title(f"Retrieval on {n_questions} questions (chunk {chunk_size} tok)")
    ax.legend(loc="upper center", ncol=len(table), frameon=False)
    return save_figure(fig, out_dir / "retrieval.png")


NO_EVAL_NOTE = """
== 第 5 步：评测检索——跳过（第 5、7 步需要问题集，你的 --docs 没有配 --eval）==
  问题集是一个 JSONL 文件，每行一道题：问题、能回答它的文件名、回答里应出现的关键事实（可选：等价说法），例如：
    {"question": "How many sick days do I get?", "source": "leave.md", "answer": "10 days", "accept": ["ten days"]}
  写 10～40 道（换个说法提问，别从文档里抄句子），存成 my_questions.jsonl，再加 --eval my_questions.jsonl 运行：
  第 5 步给出三种检索器的 recall@k / MRR 和 retrieval.png，第 7 步检查生成的回答里有没有关键事实。
  格式和自带的 data/rag/questions_en.jsonl 一样，详见 docs/03_hands_on_rag.md。下面直接到第 6 步。"""


def evaluate_retrieval(args, kb: KnowledgeBase, enc, client, eval_path: Path | None, results: dict) -> list[dict]:
    if eval_path is None:
        print(NO_EVAL_NOTE)
        return []
    questions = load_questions(eval_path)
    print(f"\n== 第 5 步：评测检索（{eval_path.name}，{len(questions)} 道题，看标准来源文件是否在前 k 块里）==")
    unknown = sorted({q["source"] for q in questions} - {d.name for d in kb.docs})
    if unknown:
        print(f"  注意：问题集里的来源 {unknown[:3]} 不在文档里，这些题一定算错。")
    table = evaluate(kb, questions)
    check_recall_monotone(table)
    print_table(table, f"检索效果（块 ≤ {args.chunk_size} token，重叠 {args.overlap}；三种检索器总是一起比较）：",
                args.retriever)
    findings = retrieval_findings(table, args.lang, client.embed_name)
    for f in findings.values():
        print(f"  发现：{f['text']}")
    results.update(retrieval=table, findings=findings, n_questions=len(questions))
    if not args.quick:
        results["chunk_size_sweep_recall@3"] = chunk_size_sweep(kb.docs, enc, client, questions)
    results["plot"] = str(plot_retrieval(table, len(questions), args.chunk_size, args.out_dir))
    print(f"  图：{results['plot']}")
    return questions


# ---------------------------------------------------------------- 第 6 步：拼提示词、生成带出处的回答
PROMPTS = {
    "en": ("Answer the question using only the context below. Give a short answer and cite the source in square "
           "brackets, for example [{example}]. If the context does not contain the answer, say \"I don't know\".",
           "Context:\n{context}\n\nQuestion: {question}"),
    "zh": ("只根据下面的资料回答问题。回答要简短，并用方括号标注出处，例如 [{example}]。"
           "如果资料里没有答案，就回答“我不知道”。",
           "资料：\n{context}\n\n问题：{question}"),
}
CITATION = re.compile(r"\[([^\[\]#]+)#(\d+)\]")


def build_messages(question: str, hits: list, lang: str) -> list[dict]:
    system, user = PROMPTS[lang]
    context = "\n\n".join(f"[{c.id}] {' '.join(c.text.split())}" for c in hits)  # 压缩空白，省 token
    return [{"role": "system", "content": system.format(example=hits[0].id)},
            {"role": "user", "content": user.format(context=context, question=question)}]


def generate_answer(client, messages, max_new_tokens: int, seed: int, stream_to_screen: bool = True) -> str:
    """生成交给 common/client.py（本地模型或 API，同一个接口）；温度 0 = 每次同样的回答。"""
    parts = []
    for piece in client.chat_stream(messages, temperature=0.0, max_tokens=max_new_tokens, seed=seed):
        parts.append(piece)
        if stream_to_screen:
            print(piece, end="", flush=True)
    if stream_to_screen:
        print()
    return "".join(parts)


def answer_with_sources(args, kb, hits, client, enc, question: str, prompt_lang: str | None, results: dict) -> None:
    print("\n== 第 6 步：拼提示词，流式生成回答 ==")
    if not hits:
        print("  没有检索到资料，不调用模型。回答：I don't know / 我不知道。")
        return
    chunks = [kb.chunks[i] for i, _, _ in hits]
    messages = build_messages(question, chunks, prompt_lang or "en")  # prompt_lang None：只展示提示词，不生成
    if args.show_prompt:
        print("----- 完整提示词 -----")
        for m in messages:
            print(f"<{m['role']}>\n{m['content']}")
        print("----- 提示词结束 -----")
    n_prompt = sum(len(enc.encode_ordinary(m["content"])) for m in messages)
    print(f"  提示词约 {n_prompt} token（{len(hits)} 个块）。后端：{client.backend}（{client.model_name}）")
    if client.backend == "local" and client.local_key == "smollm2":
        print("  提醒：本地模型 SmolLM2 只有 1.35 亿参数、只懂英文，回答可能不准或不引用出处——检索结果本身更可靠。"
              "更好的本地回答：--local-model qwen0.5b（Qwen2.5 0.5B，中英文，首次多下载约 478 MB）。")
    if prompt_lang is None:
        print("  SmolLM2 读不懂中文资料，这里不生成回答。要中文回答：--local-model qwen0.5b（本地，中英文），"
              "或 --backend openai（或 Ollama 的 --base-url）。")
        return
    print("  回答：", end="")
    t0 = time.perf_counter()
    text = generate_answer(client, messages, args.max_new_tokens, args.seed)
    cited = sorted({f"{a}#{b}" for a, b in CITATION.findall(text)} & {c.id for c in chunks})
    if not cited:
        print("  [程序附加，非模型生成] 模型没有给出有效出处；检索到的来源是：" + "、".join(f"[{c.id}]" for c in chunks))
    results["demo"] = {"question": question, "answer": text, "model_cited": cited, "sources": [c.id for c in chunks],
                       "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------- 第 7 步：评测生成的回答
EN_NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                         "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
EN_NUMBERS.update(twenty=20, thirty=30, forty=40, fifty=50, sixty=60, seventy=70, eighty=80, ninety=90)
ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
ZH_UNITS = {"十": 10, "百": 100, "千": 1000}


def zh_number(text: str) -> int:
    """汉字数字 -> 整数：三 -> 3，十五 -> 15，二十二 -> 22，一千五百 -> 1500，一百零五 -> 105。"""
    total, cur = 0, 0
    for ch in text:
        if ch in ZH_DIGITS:
            cur = cur * 10 + ZH_DIGITS[ch]
        else:
            total += (cur or 1) * ZH_UNITS[ch]
            cur = 0
    return total + cur


def normalize(s: str, lang: str) -> str:
    """比较前统一写法：小写、1,500 -> 1500、数字词 -> 阿拉伯数字（three -> 3，二十二 -> 22）。"""
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s.lower())
    if lang == "zh":  # 中文：汉字数字换成阿拉伯数字，去掉所有空白
        s = re.sub(r"[零〇一二两三四五六七八九十百千]+", lambda m: str(zh_number(m.group())), s.replace("％", "%"))
        return re.sub(r"\s+", "", s)
    s = s.replace("-", " ").replace("%", " percent")
    tens, units = "|".join(w for w, v in EN_NUMBERS.items() if v >= 20), "|".join(list(EN_NUMBERS)[1:10])
    s = re.sub(rf"\b({tens}) ({units})\b", lambda m: str(EN_NUMBERS[m[1]] + EN_NUMBERS[m[2]]), s)  # twenty two -> 22
    s = re.sub(rf"\b({'|'.join(EN_NUMBERS)})\b", lambda m: str(EN_NUMBERS[m[1]]), s)                 # three -> 3
    return re.sub(r"\s+", " ", s).strip()


def match_fact(answer: str, facts: list[str], lang: str) -> str | None:
    """回答里出现了哪一种可接受的说法（返回它；都没有就返回 None）。数字要完整匹配：
    "3 days" 不会在 "13 days" 或 "30 days" 里被认出来；字母开头的说法也不能接在别的字母后面。"""
    ans = normalize(answer, lang)
    for fact in facts:
        f = normalize(fact, lang)
        if not f:
            continue
        pre = r"(?<![0-9a-z])(?<![0-9]\.)" if f[0].isascii() and f[0].isalnum() else ""
        post = r"(?![0-9]|\.[0-9])" if f[-1].isdigit() else ""
        if re.search(pre + re.escape(f) + post, ans):
            return fact
    return None


def accepted_facts(q: dict) -> list[str]:
    return [q["answer"], *q.get("accept", [])]


def evaluate_answers(args, kb, questions, client, prompt_lang: str | None, results: dict) -> None:
    gold_qs = [q for q in questions if q.get("answer")][:args.answer_eval]
    if not gold_qs or prompt_lang is None:
        return
    print(f"\n== 第 7 步：评测生成的回答（{len(gold_qs)} 道题：回答里是否出现标准答案的关键事实，或列出的等价说法）==")
    rows = []
    for q in gold_qs:
        hs = [kb.chunks[i] for i, _, _ in kb.rank(args.retriever, q["question"])[:args.retrieve_k]]
        text = generate_answer(client, build_messages(q["question"], hs, prompt_lang), args.max_new_tokens,
                               args.seed, stream_to_screen=False)
        matched = match_fact(text, accepted_facts(q), args.lang)
        rows.append({"question": q["question"], "gold": q["answer"], "accept": q.get("accept", []), "answer": text,
                     "matched": matched, "key_fact": matched is not None, "cited": bool(CITATION.search(text)),
                     "gold_source_retrieved": q["source"] in {c.source for c in hs}})
        how = f"命中「{matched}」" if matched else "未命中"
        print(f"  {'✓' if matched else '✗'} {q['question']}  标准：{q['answer']}（{how}）  模型：{' '.join(text.split())[:100]}")
    n_fact, n_cited = sum(r["key_fact"] for r in rows), sum(r["cited"] for r in rows)
    print(f"  含关键事实：{n_fact}/{len(rows)}；带出处：{n_cited}/{len(rows)}")
    results["answer_eval"] = {"n": len(rows), "key_fact": n_fact, "cited": n_cited, "rows": rows}


# ---------------------------------------------------------------- 参数和 main
def parse_args(argv=None):
    p = course_parser(NAME, __doc__, groups=("backend", "local"))
    p.add_argument("--docs", type=existing_dir, default=None, help="你的文档文件夹（.md/.txt，UTF-8）；默认用自带知识库")
    p.add_argument("--lang", choices=["en", "zh"], default="en", help="自带知识库的语言（本地小模型只懂英文）")
    p.add_argument("--question", default=None, help="要问的问题（默认：每年几天带薪病假）")
    p.add_argument("--retrieve-k", type=positive_int, default=3, help="检索多少个块放进提示词（1~20）")
    p.add_argument("--retriever", choices=RETRIEVERS, default="hybrid", help="第 4、6、7 步用哪种检索器")
    p.add_argument("--chunk-size", type=positive_int, default=128, help="每块最多多少 token（16~2048，本地模型的分词器）")
    p.add_argument("--overlap", type=non_negative_int, default=32, help="相邻块最多重叠多少 token（按整句回退）")
    p.add_argument("--eval", type=existing_file, default=None, help="问题集 JSONL（question, source, answer, 可选 accept）")
    add_knob(p, "--answer-eval", type=non_negative_int, default=8, quick=2, help="评测多少道题的生成回答")
    add_max_new_tokens(p, 80, "每个回答最多生成多少个新 token")
    p.add_argument("--show-prompt", action="store_true", help="打印完整的提示词")
    p.add_argument("--json", action="store_true", help="只在 stdout 输出检索结果（JSON），不生成回答")
    args = p.parse_args(argv)
    if args.retrieve_k > 20:
        p.error("--retrieve-k 需要在 1 到 20 之间")
    if not 16 <= args.chunk_size <= 2048:
        p.error("--chunk-size 需要在 16 到 2048 之间")
    if args.overlap >= args.chunk_size:
        p.error("--overlap 需要小于 --chunk-size")
    args.question = args.question if args.question is not None else DEFAULT_QUESTION[args.lang]
    if not args.question.strip():
        p.error("--question 不能为空")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_run(args)  # 线程数、随机种子
    if args.device != "auto":  # 本地模型和嵌入模型都按 LLM_COURSE_DEVICE 选设备
        os.environ["LLM_COURSE_DEVICE"] = args.device
    t_start = time.perf_counter()
    custom = args.docs is not None
    folder = args.docs if custom else DATA_DIR / args.lang
    eval_path = args.eval or (None if custom else DATA_DIR / f"questions_{args.lang}.jsonl")
    results = {"lang": args.lang, "docs": str(folder), "chunk_size": args.chunk_size, "overlap": args.overlap,
               "question": args.question, "retriever": args.retriever, "retrieve_k": args.retrieve_k}
    # --json：stdout 只留给最后的 JSON，过程中的所有输出都改到 stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        docs = read_documents(folder, results)                                # 第 1 步
        enc, chunks = make_chunks(args, docs, results)                         # 第 2 步
        client, kb = build_index(args, docs, chunks, results)                  # 第 3 步
        hits = retrieve(args, kb, args.question, results)                      # 第 4 步
        if not args.json:
            # SmolLM2 只懂英文：中文知识库 + SmolLM2 时不生成回答（prompt_lang = None）；Qwen 中英文都行
            english_only = client.backend == "local" and client.local_key == "smollm2"
            local_zh = english_only and args.lang == "zh" and not custom
            prompt_lang = None if local_zh else ("zh" if args.lang == "zh" and not english_only else "en")
            questions = evaluate_retrieval(args, kb, enc, client, eval_path, results)          # 第 5 步
            answer_with_sources(args, kb, hits, client, enc, args.question, prompt_lang, results)  # 第 6 步
            evaluate_answers(args, kb, questions, client, prompt_lang, results)                # 第 7 步
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return 0
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    # 一个文件夹 = 一次运行：这次没有画 retrieval.png（没有问题集）时，删掉上次留下的那张
    path = save_results(args.out_dir, results, files=[results["plot"]] if "plot" in results else (),
                        may_write=["retrieval.png"])
    print(f"\n结果已保存：{path}（总用时 {results['total_seconds']:.1f} 秒）")
    return 0


if __name__ == "__main__":
    run_cli(main)
