"""第 3 课：亲手搭一个 RAG（检索增强生成）——切块、建索引、检索、拼提示词、带出处的回答、评测。

模型不知道你的私有文档。RAG 的做法是"开卷考试"：先从文档里检索出相关的段落，
再把它们和问题一起交给模型，让它只根据这些段落作答，并标出出处 [文件#块号]。

你将学到：
  1. 把文档切成带位置信息的小块（按句子拼装，大小和重叠以 token 计）；
  2. 三种检索器：BM25（词匹配）、稠密向量（语义，余弦相似度）、混合（RRF 倒数排名融合）；
  3. 向量缓存：文件内容不变就不必重新计算；
  4. 拼一个"只能根据资料回答"的提示词，流式生成带出处的回答；
  5. 用一套带标准答案来源的问题集，测出每种检索器的 recall@k 和 MRR。

用时：--quick 最快（一次检索评测 + 3 个短回答，时间主要花在本地模型生成上）；
完整运行还会对比三种块大小、评测 8 道题的回答，慢几倍。
示例：
  python 03_hands_on_rag.py --quick
  python 03_hands_on_rag.py --question "How many sick days do I get?" --show-prompt
  python 03_hands_on_rag.py --docs 我的文档/ --question "..." --retriever bm25 --json
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli

NAME = "03_hands_on_rag"
DATA_DIR = Path(__file__).resolve().parent / "data" / "rag"
DEFAULT_QUESTION = {"en": "How many days of paid sick leave do I get per year?", "zh": "每年有几天带薪病假？"}
MIN_COSINE = 0.2  # 稠密检索：最高余弦相似度低于它，就当作"知识库里没有相关内容"
RRF_K = 60        # RRF 的常数 k（原论文的取值）
say = print       # 旁白输出；--json 模式下改为写到 stderr，保证 stdout 只有 JSON


# ---------------------------------------------------------------- 第 1 步：读入文档
@dataclass
class Doc:
    name: str  # 相对于文档文件夹的路径，用作出处
    text: str


def load_docs(folder: Path) -> list[Doc]:
    """读入文件夹里的 .md / .txt（UTF-8）。任何问题都给出一行中文提示。"""
    if not folder.is_dir():
        raise UserError(f"找不到文档文件夹 {folder}：请用 --docs 指向一个包含 .md/.txt 文件的文件夹。")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".md", ".txt"))
    if not paths:
        raise UserError(f"文件夹 {folder} 里没有 .md 或 .txt 文件：请放入 UTF-8 编码的文本文件后再试。")
    docs = []
    for p in paths:
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise UserError(f"无法读取文件 {p}（{e.strerror or e}）：请检查文件权限。") from None
        try:
            text = raw.decode("utf-8-sig")  # 兼容带 BOM 的 UTF-8
        except UnicodeDecodeError as e:
            raise UserError(f"文件 {p} 不是 UTF-8 编码（第 {e.start} 字节处无法解码）：请另存为 UTF-8 后重试。") from None
        if text.strip():
            docs.append(Doc(p.relative_to(folder).as_posix(), text))
        else:
            say(f"  （跳过空文件 {p.name}）")
    if not docs:
        raise UserError(f"文件夹 {folder} 里的文件都是空的：请放入有内容的 .md/.txt 文件。")
    return docs


# ---------------------------------------------------------------- 第 2 步：切块
@dataclass
class Chunk:
    source: str    # 文件名
    index: int     # 该文件里的第几块（从 0 开始）
    start: int     # 在原文中的字符位置 [start, end)
    end: int
    text: str
    n_tokens: int

    @property
    def id(self) -> str:
        return f"{self.source}#{self.index}"


# 句子/段落的边界：句末标点（后面跟空白或文本结尾），中文句末标点，或换行。边界后的空白归前一句。
UNIT_END = re.compile(r"[.!?;](?=\s|$)[\"'”’)]*\s*|[。！？；]+[”’）]*\s*|\n\s*")


def split_units(text: str) -> list[tuple[int, int]]:
    """把文本切成首尾相接的句子单元 [(start, end)]，拼起来正好是原文（一个字符不多不少）。"""
    units, start = [], 0
    for m in UNIT_END.finditer(text):
        if m.end() > start:
            units.append((start, m.end()))
            start = m.end()
    if start < len(text):
        units.append((start, len(text)))
    return units


def chunk_document(doc: Doc, enc, chunk_size: int, overlap: int) -> list[Chunk]:
    """按句子拼块：每块不超过 chunk_size 个 token；下一块回退整句，重叠不超过 overlap 个 token。"""
    text = doc.text
    n_tok = lambda s, e: len(enc.encode_ordinary(text[s:e]))  # noqa: E731
    pieces = []  # (start, end, tokens)：句子单元；超长的句子按 token 边界再切开
    for s, e in split_units(text):
        n = n_tok(s, e)
        if n <= chunk_size:
            pieces.append((s, e, n))
            continue
        pos = s  # 超长的句子：在 token 边界处切开，每段重新数 token，保证不超过 chunk_size
        while pos < e:
            win = min(e, pos + 32 * chunk_size)  # 只看前面一小段，避免反复编码整句
            ids = enc.encode_ordinary(text[pos:win])
            if len(ids) <= chunk_size:
                cut = win
            else:
                _, offsets = enc.decode_with_offsets(ids)  # 每个 token 的起始字符位置
                m = chunk_size
                while m > 1 and (pos + offsets[m] <= pos or n_tok(pos, pos + offsets[m]) > chunk_size):
                    m -= 1  # 一个汉字可能占 2~3 个 token：往回退到一个完整字符的边界
                cut = max(pos + offsets[m], pos + 1)
            pieces.append((pos, cut, n_tok(pos, cut)))
            pos = cut
    chunks, i = [], 0
    while i < len(pieces):
        j = i + 1  # 贪心地往块里加句子，直到再加就超过 chunk_size
        while j < len(pieces) and n_tok(pieces[i][0], pieces[j][1]) <= chunk_size:
            j += 1
        s, e = pieces[i][0], pieces[j - 1][1]
        chunks.append(Chunk(doc.name, len(chunks), s, e, text[s:e], n_tok(s, e)))
        if j >= len(pieces):
            break
        k, ov = j, 0  # 重叠：从块尾往回退整句，总量不超过 overlap，且保证向前推进
        while k - 1 > i and ov + pieces[k - 1][2] <= overlap:
            ov += pieces[k - 1][2]
            k -= 1
        i = k
    return chunks


def chunk_all(docs: list[Doc], enc, chunk_size: int, overlap: int) -> list[Chunk]:
    return [c for d in docs for c in chunk_document(d, enc, chunk_size, overlap)]


# ---------------------------------------------------------------- 第 3 步：三种检索器
STOPWORDS = set("""a an the and or of to in on at for by with from as is are was were be been do does did i me my we our
you your it its this that these those what which who whom how when where why can could may might will would shall
should must if not no yes there their they he she his her have has had get gets any some all more most than then
so such about into over under up down out off per each""".split())


def bm25_tokens(text: str) -> list[str]:
    """BM25 的"词"：英文按单词（小写、去停用词、简单词干化）；中文没有空格，按相邻两字（bigram）。"""
    out = []
    for m in re.finditer(r"[\u3400-\u9fff]+|[a-z0-9]+", text.lower()):
        w = m.group()
        if w[0] >= "\u3400":  # 一段连续的汉字 -> 双字组；单个汉字就保留单字
            out += [w] if len(w) == 1 else [w[i:i + 2] for i in range(len(w) - 1)]
        elif w not in STOPWORDS:
            out.append(stem(w))
    return out


SUFFIXES = ("ations", "ation", "ments", "ment", "ings", "ing", "ies", "ed", "es", "s")


def stem(w: str) -> str:
    """极简词干化：去掉一个常见后缀和词尾 e，让 reimbursed / reimbursement / reimburse 变成同一个词。
    （正式做法是 Porter / Snowball 词干算法；这里只为演示"词形不同也能匹配"。）"""
    for suf in SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3 and not w.endswith("ss"):
            w = w[:-len(suf)] + ("y" if suf == "ies" else "")
            break
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


class BM25:
    """Okapi BM25：score(q, d) = Σ_{t∈q} idf(t) · tf·(k1+1) / (tf + k1·(1 − b + b·|d|/avgdl))
    idf(t) = ln(1 + (N − df + 0.5) / (df + 0.5))；查询里重复的词只算一次。"""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        docs = [bm25_tokens(t) for t in texts]
        self.N = len(docs)
        self.doc_len = np.array([len(d) for d in docs], dtype=np.float64)
        self.avgdl = float(self.doc_len.mean()) if self.N else 0.0
        self.postings: dict[str, list[tuple[int, int]]] = {}  # 倒排表：词 -> [(块号, 词频)]
        for i, d in enumerate(docs):
            for t, tf in Counter(d).items():
                self.postings.setdefault(t, []).append((i, tf))
        self.idf = {t: math.log(1 + (self.N - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()}

    def scores(self, query: str) -> np.ndarray:
        s = np.zeros(self.N)
        norm = self.k1 * (1 - self.b + self.b * self.doc_len / max(self.avgdl, 1e-9))
        for t in set(bm25_tokens(query)):
            for i, tf in self.postings.get(t, ()):
                s[i] += self.idf[t] * tf * (self.k1 + 1) / (tf + norm[i])
        return s


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """余弦相似度 = 两个向量夹角的余弦 = a·b / (|a|·|b|)。向量事先归一化后，它就是点积 a·b。"""
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def dense_index(chunks: list[Chunk], docs: list[Doc], client, chunk_size: int, overlap: int) -> tuple[np.ndarray, bool]:
    """所有块的向量（API 模式用服务商的嵌入接口，本地用 all-MiniLM-L6-v2；都已归一化为单位长度）。
    缓存在磁盘上，键 = 文件内容哈希 + 切块参数 + 嵌入模型名；任何一项变了就重算。"""
    from tqdm import tqdm

    from common.outputs import output_dir
    for _attempt in range(2):
        name = client.embed_name
        h = hashlib.sha256(json.dumps({"v": 1, "embedder": name, "chunk_size": chunk_size, "overlap": overlap,
                                       "files": [[d.name, hashlib.sha256(d.text.encode()).hexdigest()] for d in docs]}
                                      ).encode()).hexdigest()
        path = output_dir(NAME) / "index_cache" / f"{h[:20]}.npy"
        if path.is_file():
            vecs = np.load(path)
            if vecs.shape[0] == len(chunks):
                return vecs, True
        bs, parts = 32, []
        for s in tqdm(range(0, len(chunks), bs), desc="计算块向量", unit="批", file=sys.stderr, leave=False):
            parts.append(np.asarray(client.embed([c.text for c in chunks[s:s + bs]]), dtype=np.float32))
        if client.embed_name != name:  # API 中途失败、客户端回退到了本地模型：全部用本地模型重算
            continue
        vecs = np.concatenate(parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
        return vecs, False
    raise UserError("嵌入接口不稳定，计算块向量失败：请检查网络或 API 配置后重试，或用 --backend local。")


def rrf(rankings: list[list[int]], n: int, k: int = RRF_K) -> np.ndarray:
    """倒数排名融合：每个检索器给第 r 名（从 1 数）加 1/(k + r) 分。只看名次，不看原始分数的尺度。"""
    s = np.zeros(n)
    for ranking in rankings:
        for r, idx in enumerate(ranking, start=1):
            s[idx] += 1.0 / (k + r)
    return s


class Retriever:
    def __init__(self, chunks: list[Chunk], bm25: BM25, vecs: np.ndarray, embed_fn):
        self.chunks, self.bm25, self.vecs, self.embed_fn = chunks, bm25, vecs, embed_fn

    def rank(self, method: str, question: str, qvec: np.ndarray | None = None) -> list[tuple[int, float, dict]]:
        """按 method 给所有（匹配到的）块排序：[(块号, 分数, 各检索器的原始分数)]，从高到低。"""
        bm = self.bm25.scores(question)
        bm_rank = [int(i) for i in np.argsort(-bm, kind="stable") if bm[i] > 0]  # BM25 只返回有共同词的块
        if method == "bm25":
            return [(i, float(bm[i]), {"bm25": float(bm[i])}) for i in bm_rank]
        if qvec is None:
            qvec = self.embed_fn([question])[0]
        cos = self.vecs @ qvec  # 向量都是单位长度：点积就是余弦相似度
        dense_rank = [int(i) for i in np.argsort(-cos, kind="stable")]
        if method == "dense":
            return [(i, float(cos[i]), {"cosine": float(cos[i])}) for i in dense_rank]
        fused = rrf([bm_rank, dense_rank], len(self.chunks))
        order = [int(i) for i in np.argsort(-fused, kind="stable")]
        return [(i, float(fused[i]), {"bm25": float(bm[i]), "cosine": float(cos[i])}) for i in order]


# ---------------------------------------------------------------- 第 5 步：评测
def load_questions(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"找不到问题集 {path}：--eval 需要一个 JSONL 文件，每行 {{\"question\", \"source\", \"answer\"}}。")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"问题集 {path} 第 {n} 行不是合法的 JSON：每行应是一个 JSON 对象。") from None
        if not isinstance(obj, dict) or not obj.get("question") or not obj.get("source"):
            raise UserError(f"问题集 {path} 第 {n} 行缺少 question 或 source 字段。")
        items.append(obj)
    if not items:
        raise UserError(f"问题集 {path} 是空的。")
    return items


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


def evaluate(ret: Retriever, questions: list[dict], ks=(1, 3, 5)) -> dict:
    qvecs = ret.embed_fn([q["question"] for q in questions])  # 一次算完所有问题的向量
    gold = [q["source"] for q in questions]
    out = {}
    for method in ("bm25", "dense", "hybrid"):
        ranked = [[ret.chunks[i].source for i, _, _ in ret.rank(method, q["question"], qv)]
                  for q, qv in zip(questions, qvecs)]
        out[method] = {f"recall@{k}": recall_at_k(ranked, gold, k) for k in ks}
        out[method]["mrr@10"] = mrr(ranked, gold)
    return out


def print_table(res: dict, title: str) -> None:
    cols = list(next(iter(res.values())).keys())
    say(f"\n{title}")
    say(f"  {'检索器':<8}" + "".join(f"{c:>11}" for c in cols))
    for m, row in res.items():
        say(f"  {m:<11}" + "".join(f"{row[c]:>11.3f}" for c in cols))


# ---------------------------------------------------------------- 第 4 步：拼提示词、生成回答
PROMPTS = {
    "en": ("Answer the question using only the context below. Give a short answer and cite the source in square "
           "brackets, for example [{example}]. If the context does not contain the answer, say \"I don't know\".",
           "Context:\n{context}\n\nQuestion: {question}"),
    "zh": ("只根据下面的资料回答问题。回答要简短，并用方括号标注出处，例如 [{example}]。"
           "如果资料里没有答案，就回答“我不知道”。",
           "资料：\n{context}\n\n问题：{question}"),
}
CITATION = re.compile(r"\[([^\[\]#]+)#(\d+)\]")


def build_messages(question: str, hits: list[Chunk], lang: str) -> list[dict]:
    system, user = PROMPTS[lang]
    context = "\n\n".join(f"[{c.id}] {' '.join(c.text.split())}" for c in hits)  # 压缩空白，省 token
    return [{"role": "system", "content": system.format(example=hits[0].id)},
            {"role": "user", "content": user.format(context=context, question=question)}]


def answer(client, messages, max_tokens: int, seed: int, stream_to_screen: bool = True) -> str:
    parts = []
    for piece in client.chat_stream(messages, temperature=0.0, max_tokens=max_tokens, seed=seed):
        parts.append(piece)
        if stream_to_screen:
            say(piece, end="", flush=True)
    if stream_to_screen:
        say()
    return "".join(parts)


def normalize(s: str) -> str:
    s = s.lower().replace("-", " ").replace("%", " percent")
    s = re.sub(r"(?<=\d),(?=\d)", "", s)  # 1,500 -> 1500
    return re.sub(r"\s+", " ", s).strip()


def contains_fact(ans: str, fact: str, lang: str) -> bool:
    if lang == "zh":  # 中文：去掉所有空白再比
        return re.sub(r"\s+", "", fact.lower()) in re.sub(r"\s+", "", ans.lower())
    return normalize(fact) in normalize(ans)


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    from common.client import add_client_args
    p = argparse.ArgumentParser(description="第 3 课：亲手搭 RAG（切块、检索、带出处的回答、评测）")
    p.add_argument("--docs", type=Path, default=None, help="你的文档文件夹（.md/.txt，UTF-8）；默认用自带知识库")
    p.add_argument("--lang", choices=["en", "zh"], default="en", help="自带知识库的语言（本地小模型只懂英文）")
    p.add_argument("--question", default=None, help="要问的问题")
    p.add_argument("--top-k", type=int, default=3, help="放进提示词的块数")
    p.add_argument("--retriever", choices=["bm25", "dense", "hybrid"], default="hybrid")
    p.add_argument("--chunk-size", type=int, default=128, help="每块最多多少 token（本地模型的分词器）")
    p.add_argument("--overlap", type=int, default=32, help="相邻块最多重叠多少 token（按整句回退）")
    p.add_argument("--eval", type=Path, default=None, help="问题集 JSONL（question, source, answer）")
    p.add_argument("--answer-eval", type=int, default=None, help="评测多少道题的生成回答（默认 quick 2 道，完整 8 道）")
    p.add_argument("--max-tokens", type=int, default=80, help="回答最多生成多少 token")
    p.add_argument("--show-prompt", action="store_true", help="打印完整的提示词")
    p.add_argument("--json", action="store_true", help="只在 stdout 输出检索结果（JSON），不生成回答")
    p.add_argument("--quick", action="store_true", help="快速模式（<1 分钟）：不做块大小对比，少评测几道回答")
    p.add_argument("--seed", type=int, default=0)
    add_client_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.top_k <= 20:
        p.error("--top-k 需要在 1 到 20 之间")
    if not 16 <= args.chunk_size <= 2048:
        p.error("--chunk-size 需要在 16 到 2048 之间")
    if not 0 <= args.overlap < args.chunk_size:
        p.error("--overlap 需要 ≥ 0 且小于 --chunk-size")
    if args.answer_eval is not None and args.answer_eval < 0:
        p.error("--answer-eval 不能是负数")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.json:
        global say
        say = lambda *a, **k: print(*a, **{**k, "file": sys.stderr})  # noqa: E731
        real_stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):  # 任何杂项输出都去 stderr
            result = run(args)
        real_stdout.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        return 0
    run(args)
    return 0


def run(args) -> dict:
    import torch
    from common.client import client_from_args
    from common.outputs import output_dir, save_results
    from common.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    custom = args.docs is not None
    folder = args.docs if custom else DATA_DIR / args.lang
    question = args.question or DEFAULT_QUESTION[args.lang]
    if not question.strip():
        raise UserError("--question 不能为空。")

    say("== 第 1 步：读入知识库 ==")
    docs = load_docs(folder)
    say(f"  {folder}：{len(docs)} 个文件，共 {sum(len(d.text) for d in docs):,} 个字符")

    say(f"\n== 第 2 步：切块（每块 ≤ {args.chunk_size} token，重叠 ≤ {args.overlap} token）==")
    enc = load_tokenizer().enc  # 本地模型 SmolLM2 的分词器（tiktoken 格式）：块大小按它数 token
    chunks = chunk_all(docs, enc, args.chunk_size, args.overlap)
    sizes = [c.n_tokens for c in chunks]
    say(f"  {len(chunks)} 个块；每块 token 数：最少 {min(sizes)}，平均 {np.mean(sizes):.0f}，最多 {max(sizes)}")
    c0 = chunks[min(1, len(chunks) - 1)]
    say(f"  示例 [{c0.id}] 字符 {c0.start}..{c0.end}，{c0.n_tokens} token：{' '.join(c0.text.split())[:150]}...")

    say("\n== 第 3 步：建索引 ==")
    client = client_from_args(args)  # 生成回答 + 嵌入向量；本地模型要到第一次生成时才加载
    t0 = time.perf_counter()
    bm25 = BM25([c.text for c in chunks])
    vecs, cached = dense_index(chunks, docs, client, args.chunk_size, args.overlap)
    t_index = time.perf_counter() - t0
    say(f"  BM25：{len(bm25.postings):,} 个不同的词；稠密向量：{vecs.shape[0]} × {vecs.shape[1]}（{client.embed_name}）"
        f"，{'读自磁盘缓存' if cached else '刚计算并存入缓存'}，用时 {t_index:.2f} 秒")
    ret = Retriever(chunks, bm25, vecs, client.embed)

    say(f"\n== 第 4 步：检索 ==\n  问题：{question}")
    qvec = client.embed([question])[0]
    ranked = ret.rank(args.retriever, question, qvec)
    best_cos = float((vecs @ qvec).max())
    no_match = (not ranked if args.retriever == "bm25"
                else best_cos < MIN_COSINE and (args.retriever == "dense" or not bm25.scores(question).any()))
    hits = [] if no_match else ranked[:args.top_k]
    result = {"question": question, "retriever": args.retriever, "top_k": args.top_k, "chunk_size": args.chunk_size,
              "overlap": args.overlap, "embedder": client.embed_name, "docs": str(folder), "n_chunks": len(chunks),
              "results": [{"rank": r + 1, "id": chunks[i].id, "source": chunks[i].source, "chunk": chunks[i].index,
                           "start": chunks[i].start, "end": chunks[i].end, "score": s, "scores": extra,
                           "text": chunks[i].text} for r, (i, s, extra) in enumerate(hits)]}
    if no_match:
        msg = (f"知识库里找不到和这个问题相关的内容（没有共同的词，最高余弦相似度只有 {best_cos:.2f} < {MIN_COSINE}）："
               "换个说法，或确认文档里确实写了这件事。")
        say("  " + msg)
        result["message"] = msg
    if args.json:
        return result
    for r, (i, s, extra) in enumerate(hits, start=1):
        detail = "，".join(f"{k}={v:.3f}" for k, v in extra.items())
        say(f"  {r}. [{chunks[i].id}] 分数 {s:.4f}（{detail}）{' '.join(chunks[i].text.split())[:90]}...")
    if hits:
        top = chunks[hits[0][0]]
        cvec = vecs[hits[0][0]]
        say(f"  余弦相似度手算：q·c / (|q|·|c|) = {qvec @ cvec:.4f} / ({np.linalg.norm(qvec):.4f} × "
            f"{np.linalg.norm(cvec):.4f}) = {cosine(qvec, cvec):.4f}  （问题 vs [{top.id}]）")

    # ---- 评测检索器
    eval_path = args.eval or (None if custom else DATA_DIR / f"questions_{args.lang}.jsonl")
    results = {"lang": args.lang, "docs": str(folder), "n_docs": len(docs), "n_chunks": len(chunks),
               "chunk_size": args.chunk_size, "overlap": args.overlap, "embedder": client.embed_name,
               "backend": client.backend, "index_seconds": round(t_index, 3),
               "index_from_cache": cached}
    questions = load_questions(eval_path) if eval_path else []
    if questions:
        say(f"\n== 第 5 步：评测检索（{eval_path.name}，{len(questions)} 道题，看标准来源文件是否在前 k 块里）==")
        known = {d.name for d in docs}
        unknown = sorted({q["source"] for q in questions} - known)
        if unknown:
            say(f"  注意：问题集里的来源 {unknown[:3]} 不在文档里，这些题一定算错。")
        table = evaluate(ret, questions)
        print_table(table, f"检索效果（块 ≤ {args.chunk_size} token，重叠 {args.overlap}）：")
        h3 = table["hybrid"]["recall@3"]
        checks = {"hybrid_recall@3_ge_each_single": h3 >= max(table["bm25"]["recall@3"], table["dense"]["recall@3"]),
                  "hybrid_recall@3_ge_0.9": h3 >= 0.9}
        for k, v in checks.items():
            say(f"  检查 {k}: {'通过 ✓' if v else '未通过 ✗'}")
        results.update(retrieval=table, checks=checks, n_questions=len(questions))
        if not args.quick:
            sweep = {}
            for size in (64, 128, 256):
                ov = size // 4
                ch = chunk_all(docs, enc, size, ov)
                v, _ = dense_index(ch, docs, client, size, ov)
                sweep[f"{size}/{ov}"] = {"n_chunks": len(ch), **{m: r["recall@3"] for m, r in
                                         evaluate(Retriever(ch, BM25([c.text for c in ch]), v, client.embed), questions).items()}}
            say("\n块大小对比（recall@3）：")
            say(f"  {'块/重叠':<10}{'块数':>6}{'bm25':>8}{'dense':>8}{'hybrid':>8}")
            for k, row in sweep.items():
                say(f"  {k:<10}{row['n_chunks']:>6}{row['bm25']:>8.3f}{row['dense']:>8.3f}{row['hybrid']:>8.3f}")
            results["chunk_size_sweep_recall@3"] = sweep
        _plot(results, output_dir(NAME))

    # ---- 拼提示词 + 生成回答
    say("\n== 第 6 步：拼提示词，流式生成回答 ==")
    local_zh = client.backend == "local" and args.lang == "zh" and not custom
    if not hits:
        say("  没有检索到资料，不调用模型。回答：I don't know / 我不知道。")
    else:
        lang = "zh" if args.lang == "zh" and client.backend != "local" else "en"
        messages = build_messages(question, [chunks[i] for i, _, _ in hits], lang)
        if args.show_prompt:
            say("----- 完整提示词 -----")
            for m in messages:
                say(f"<{m['role']}>\n{m['content']}")
            say("----- 提示词结束 -----")
        n_prompt = sum(len(enc.encode_ordinary(m["content"])) for m in messages)
        say(f"  提示词约 {n_prompt} token（{len(hits)} 个块）。后端：{client.backend}（{client.model_name}）")
        if client.backend == "local":
            say("  提醒：本地模型只有 1.35 亿参数、只懂英文，回答可能不准或不引用出处——检索结果本身更可靠。")
        if local_zh:
            say("  本地小模型读不懂中文资料，这里不生成回答。要中文回答，请用 --backend openai（或 Ollama 的 --base-url）。")
        else:
            say("  回答：", end="")
            t0 = time.perf_counter()
            text = answer(client, messages, args.max_tokens, args.seed)
            cited = sorted({f"{a}#{b}" for a, b in CITATION.findall(text)} & {chunks[i].id for i, _, _ in hits})
            if not cited:
                say("  [程序附加，非模型生成] 模型没有给出有效出处；检索到的来源是："
                    + "、".join(f"[{chunks[i].id}]" for i, _, _ in hits))
            results["demo"] = {"question": question, "answer": text, "model_cited": cited,
                               "sources": [chunks[i].id for i, _, _ in hits],
                               "seconds": round(time.perf_counter() - t0, 2)}

    # ---- 评测生成的回答（是否包含标准答案里的关键事实）
    n_ans = args.answer_eval if args.answer_eval is not None else (2 if args.quick else 8)
    gold_qs = [q for q in questions if q.get("answer")][:n_ans]
    if gold_qs and not local_zh:
        lang = "zh" if args.lang == "zh" and client.backend != "local" else "en"
        say(f"\n== 第 7 步：评测生成的回答（{len(gold_qs)} 道题：回答里是否出现标准答案的关键事实）==")
        rows = []
        for q in gold_qs:
            hs = [chunks[i] for i, _, _ in ret.rank(args.retriever, q["question"])[:args.top_k]]
            text = answer(client, build_messages(q["question"], hs, lang), args.max_tokens, args.seed, False)
            ok, cited = contains_fact(text, q["answer"], args.lang), bool(CITATION.search(text))
            rows.append({"question": q["question"], "gold": q["answer"], "answer": text, "contains_fact": ok,
                         "cited": cited, "gold_source_retrieved": q["source"] in {c.source for c in hs}})
            say(f"  {'✓' if ok else '✗'} {q['question']}  标准：{q['answer']}  模型：{' '.join(text.split())[:100]}")
        acc = sum(r["contains_fact"] for r in rows) / len(rows)
        say(f"  含关键事实：{sum(r['contains_fact'] for r in rows)}/{len(rows)}；"
            f"带出处：{sum(r['cited'] for r in rows)}/{len(rows)}")
        results["answer_eval"] = {"n": len(rows), "contains_fact_rate": acc, "rows": rows}

    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    path = save_results(NAME, results)
    say(f"\n结果已保存：{path}（总用时 {results['total_seconds']:.1f} 秒）")
    return result


def _plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = results["retrieval"]
    cols = [c for c in next(iter(table.values())) if c.startswith("recall")] + ["mrr@10"]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(table)
    for j, (m, row) in enumerate(table.items()):
        ax.bar(np.arange(len(cols)) + j * w, [row[c] for c in cols], w, label=m)
    ax.set_xticks(np.arange(len(cols)) + w * (len(table) - 1) / 2, cols)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Retrieval on {results['n_questions']} questions (chunk {results['chunk_size']} tok)")
    ax.legend()
    fig.tight_layout()
    path = out / "retrieval.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    say(f"  图：{path}")


if __name__ == "__main__":
    run_cli(main)
