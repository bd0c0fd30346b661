"""在一个文件夹的文本文件里做检索：读入 -> 切块 -> 建索引（BM25 + 稠密向量）-> 搜索。

第 3 课用这些零件一步步搭出 RAG，docs/03_hands_on_rag.md 带你逐个读；别的课（比如智能体的
"查员工手册"工具）只用下面这一行入口：

    from common.retrieval import load_knowledge_base
    kb = load_knowledge_base(lang="en", chunk_size=128, overlap=32)   # 自带的员工手册 data/rag/<lang>
    kb = load_knowledge_base(folder=Path("my_docs"))                   # 或任何放着 .md/.txt（UTF-8）的文件夹
    for hit in kb.search("How many sick days do I get?", k=3, retriever="hybrid"):
        print(hit.id, hit.score, hit.text)                             # Hit(text, source, score, id, ...)

这些零件，按流水线的先后顺序：
  load_docs(folder)                      -> [Doc(name, text)]
  chunk_all(docs, enc, size, overlap)    -> [Chunk(source, index, start, end, text, n_tokens)]
      按句子贪心地往块里装，每块最多 `size` 个 token；下一块往回退几个整句作为重叠（最多
      `overlap` 个 token）；比 `size` 还长的句子在 token 边界处切开。
  BM25(texts).scores(query)              -> 每个块的 Okapi BM25 分数（按词匹配）
  dense_index(chunks, docs, embedder, ...) -> 每个块一个单位向量，缓存在磁盘上
  rrf(rankings, n)                       -> 倒数排名融合：把几份排名合成一份（"hybrid"）
  KnowledgeBase.rank / .search           -> 三种检索器：bm25 | dense | hybrid
  load_questions(path)                   -> 评测用的问题集（JSONL，带标准答案所在的文件和关键事实）

嵌入模型（embedder）可以是任何对象，只要有 ``embed(list[str]) -> np.ndarray [N, D]``（每行已做 L2 归一化）
和一个名字（``embed_name``，LLMClient 就有；或者 ``name``）：默认是本地的 all-MiniLM-L6-v2，
也可以通过 common.client.LLMClient 用 API 的嵌入模型。
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "rag"   # 自带的员工手册：data/rag/{en,zh}
RETRIEVERS = ("bm25", "dense", "hybrid")
MIN_COSINE = 0.2  # dense：连最相似的块都低于这个值，就当作"知识库里没有相关内容"
RRF_K = 60        # 倒数排名融合里的常数 k（用 RRF 原论文里的取值）


# ---------------------------------------------------------------------------- 1. 文档
@dataclass
class Doc:
    name: str  # 相对于文件夹的路径；引用出处时就写它
    text: str


def load_docs(folder: Path) -> list[Doc]:
    """按文件名顺序读入 folder 下所有 .md / .txt 文件（UTF-8）。空文件跳过（在 stderr 提示一句）；
    出任何问题都报成一行中文的 UserError。"""
    folder = Path(folder)
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
            text = raw.decode("utf-8-sig")  # UTF-8，带不带 BOM 都行
        except UnicodeDecodeError as e:
            raise UserError(f"文件 {p} 不是 UTF-8 编码（第 {e.start} 字节处无法解码）：请另存为 UTF-8 后重试。") from None
        if text.strip():
            docs.append(Doc(p.relative_to(folder).as_posix(), text))
        else:
            print(f"  （跳过空文件 {p.name}）", file=sys.stderr)
    if not docs:
        raise UserError(f"文件夹 {folder} 里的文件都是空的：请放入有内容的 .md/.txt 文件。")
    return docs


# ---------------------------------------------------------------------------- 2. 切块
@dataclass
class Chunk:
    source: str    # 文件名
    index: int     # 这个文件的第几块（从 0 数起）
    start: int     # 在文件文本里的字符范围 [start, end)
    end: int
    text: str
    n_tokens: int

    @property
    def id(self) -> str:
        """引用时的写法："文件名#块号"。"""
        return f"{self.source}#{self.index}"


# 一个句子/段落在这些地方结束：. ! ? ;（后面是空白或文本结尾）、中文的句末标点，或者换行。
# 分界处后面的空白算进前一个句子。
UNIT_END = re.compile(r"[.!?;](?=\s|$)[\"'”’)]*\s*|[。！？；]+[”’）]*\s*|\n\s*")


def split_units(text: str) -> list[tuple[int, int]]:
    """把文本切成首尾相接的句子单元 [(start, end)]；全部拼起来正好是原文。"""
    units, start = [], 0
    for m in UNIT_END.finditer(text):
        if m.end() > start:
            units.append((start, m.end()))
            start = m.end()
    if start < len(text):
        units.append((start, len(text)))
    return units


def _split_long(text: str, s: int, e: int, enc, chunk_size: int, n_tok) -> list[tuple[int, int, int]]:
    """一个句子比 chunk_size 个 token 还长：在 token 边界处把它切成几段，每段最多 chunk_size 个
    token（切完重新数一遍），绝不会切在一个字符中间。"""
    pieces, pos = [], s
    while pos < e:
        win = min(e, pos + 32 * chunk_size)  # 每次只看一个有限的窗口，而不是每次都看整句
        ids = enc.encode_ordinary(text[pos:win])
        if len(ids) <= chunk_size:
            cut = win
        else:
            _, offsets = enc.decode_with_offsets(ids)  # 每个 token 从第几个字符开始
            m = chunk_size
            while m > 1 and (pos + offsets[m] <= pos or n_tok(pos, pos + offsets[m]) > chunk_size):
                m -= 1  # 一个汉字可能占 2-3 个字节级 token：往回退到完整字符的边界
            cut = max(pos + offsets[m], pos + 1)
        pieces.append((pos, cut, n_tok(pos, cut)))
        pos = cut
    return pieces


def chunk_document(doc: Doc, enc, chunk_size: int, overlap: int) -> list[Chunk]:
    """把句子装进块里，每块最多 chunk_size 个 token（用 `enc` 来数，一个 tiktoken 风格的编码器）；
    下一块会往回退几个整句，和上一块重叠，重叠最多 `overlap` 个 token。"""
    text = doc.text
    n_tok = lambda s, e: len(enc.encode_ordinary(text[s:e]))  # noqa: E731
    pieces = []  # (start, end, token 数)：句子单元，太长的句子再切开
    for s, e in split_units(text):
        n = n_tok(s, e)
        pieces += [(s, e, n)] if n <= chunk_size else _split_long(text, s, e, enc, chunk_size, n_tok)
    chunks, i = [], 0
    while i < len(pieces):
        j = i + 1  # 贪心：只要块还不超过 chunk_size，就继续加句子
        while j < len(pieces) and n_tok(pieces[i][0], pieces[j][1]) <= chunk_size:
            j += 1
        s, e = pieces[i][0], pieces[j - 1][1]
        chunks.append(Chunk(doc.name, len(chunks), s, e, text[s:e], n_tok(s, e)))
        if j >= len(pieces):
            break
        k, ov = j, 0  # 重叠：往回退整句，最多 `overlap` 个 token，但下一块的开头总要比这一块靠后
        while k - 1 > i and ov + pieces[k - 1][2] <= overlap:
            ov += pieces[k - 1][2]
            k -= 1
        i = k
    return chunks


def chunk_all(docs: list[Doc], enc, chunk_size: int, overlap: int) -> list[Chunk]:
    return [c for d in docs for c in chunk_document(d, enc, chunk_size, overlap)]


# ---------------------------------------------------------------------------- 3a. BM25（按词匹配）
STOPWORDS = set("""a an the and or of to in on at for by with from as is are was were be been do does did i me my we our
you your it its this that these those what which who whom how when where why can could may might will would shall
should must if not no yes there their they he she his her have has had get gets any some all more most than then
so such about into over under up down out off per each""".split())
SUFFIXES = ("ations", "ation", "ments", "ment", "ings", "ing", "ies", "ed", "es", "s")


def stem(w: str) -> str:
    """一个极简的词干提取：去掉一个常见后缀和末尾的 e，让 reimbursed / reimbursement / reimburse
    变成同一个词。（真正的系统用 Porter / Snowball 算法；这里只演示思路。）"""
    for suf in SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3 and not w.endswith("ss"):
            w = w[:-len(suf)] + ("y" if suf == "ies" else "")
            break
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


def bm25_tokens(text: str) -> list[str]:
    """BM25 眼里的"词"：英文就是单词（转小写、去掉停用词、提取词干）；中文词之间没有空格，
    所以每一串连续的汉字拆成相邻两个字的组合（bigram，彼此重叠）。"""
    out = []
    for m in re.finditer(r"[\u3400-\u9fff]+|[a-z0-9]+", text.lower()):
        w = m.group()
        if w[0] >= "\u3400":  # 一串汉字 -> 相邻两字的组合；只有一个字就保留单字
            out += [w] if len(w) == 1 else [w[i:i + 2] for i in range(len(w) - 1)]
        elif w not in STOPWORDS:
            out.append(stem(w))
    return out


class BM25:
    """Okapi BM25：score(q, d) = 对 q 里的每个词 t 求和 idf(t) * tf*(k1+1) / (tf + k1*(1 - b + b*|d|/avgdl))，
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))（tf：t 在块 d 里出现几次；df：几个块含有 t）；问题里重复的词只算一次。"""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        docs = [bm25_tokens(t) for t in texts]
        self.N = len(docs)
        self.doc_len = np.array([len(d) for d in docs], dtype=np.float64)
        self.avgdl = float(self.doc_len.mean()) if self.N else 0.0
        self.postings: dict[str, list[tuple[int, int]]] = {}  # 倒排索引：词 -> [(块号, 词频)]
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


# ---------------------------------------------------------------------------- 3b. 稠密向量（按意思匹配）
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """余弦相似度 a.b / (|a| |b|)；对单位向量来说就是点积。"""
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embedder_name(embedder) -> str:
    """嵌入模型的名字，是向量缓存键的一部分（LLMClient.embed_name，LocalEmbedder.name）。"""
    name = getattr(embedder, "embed_name", None)
    return name if name else f"local:{embedder.name}"


def index_cache_dir() -> Path:
    """块向量缓存在哪里：outputs/rag_index/（设置了 $LLM_COURSE_OUTPUTS 时放在它下面，测试就是这样），
    所有要建索引的课共用；可以放心删除。"""
    from common.outputs import output_root
    return output_root() / "rag_index"


def dense_index(chunks: list[Chunk], docs: list[Doc], embedder, chunk_size: int, overlap: int,
                cache: Path | None = None, batch_size: int = 32) -> tuple[np.ndarray, bool]:
    """返回所有块的单位向量 [n_chunks, D]，以及它们是不是从磁盘缓存里读的。
    缓存键 = 每个文件内容的哈希 + 切块参数 + 嵌入模型名：其中任何一样变了，
    向量都会重新计算。cache=None 表示用 index_cache_dir()。"""
    from tqdm import tqdm

    cache = Path(cache) if cache is not None else index_cache_dir()
    for _attempt in range(2):
        name = embedder_name(embedder)
        key = json.dumps({"v": 1, "embedder": name, "chunk_size": chunk_size, "overlap": overlap,
                          "files": [[d.name, hashlib.sha256(d.text.encode()).hexdigest()] for d in docs]})
        path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
        if path.is_file():
            vecs = np.load(path)
            if vecs.shape[0] == len(chunks):
                return vecs, True
        parts = []
        for s in tqdm(range(0, len(chunks), batch_size), desc="计算块向量", unit="批", file=sys.stderr, leave=False):
            parts.append(np.asarray(embedder.embed([c.text for c in chunks[s:s + batch_size]]), dtype=np.float32))
        if embedder_name(embedder) != name:  # API 中途失败、客户端改用了本地模型：全部重算
            continue
        vecs = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
        return vecs, False
    raise UserError("嵌入接口不稳定，计算块向量失败：请检查网络或 API 配置后重试，或用 --backend local。")


# ---------------------------------------------------------------------------- 3c. 混合检索（hybrid）：排名融合
def rrf(rankings: list[list[int]], n: int, k: int = RRF_K) -> np.ndarray:
    """倒数排名融合（RRF）：每份排名给它的第 r 名（从 1 数起）加 1/(k + r) 分。只看名次，
    所以 BM25 分数和余弦相似度的数值范围差得再远也没关系。"""
    s = np.zeros(n)
    for ranking in rankings:
        for r, idx in enumerate(ranking, start=1):
            s[idx] += 1.0 / (k + r)
    return s


# ---------------------------------------------------------------------------- 4. 搜索
@dataclass
class Hit:
    text: str      # 块的文本
    source: str    # 文件名（相对于文件夹）
    score: float   # 看用的是哪种检索器：bm25 分数、余弦相似度，或融合后的 RRF 分数
    id: str = ""   # 引用写法 "文件名#块号"
    start: int = 0  # 在文件里的字符范围
    end: int = 0
    scores: dict = field(default_factory=dict)  # 各检索器的原始分数（{"bm25": .., "cosine": ..}）


class KnowledgeBase:
    """所有块，连同它们的 BM25 索引和向量，以及在上面工作的三种检索器。"""

    def __init__(self, docs: list[Doc], chunks: list[Chunk], bm25: BM25, vecs: np.ndarray, embedder,
                 from_cache: bool = False):
        self.docs, self.chunks, self.bm25, self.vecs = docs, chunks, bm25, vecs
        self.embedder, self.from_cache = embedder, from_cache

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(list(texts))

    def rank(self, method: str, question: str, qvec: np.ndarray | None = None) -> list[tuple[int, float, dict]]:
        """按 `method` 排好序的（匹配上的）块：[(块号, 分数, 原始分数)]，最好的排在最前。
        BM25 只返回和问题至少有一个共同词的块；dense 和 hybrid 返回全部块。"""
        if method not in RETRIEVERS:
            raise ValueError(f"unknown retriever {method!r}; choose from {RETRIEVERS}")
        bm = self.bm25.scores(question)
        bm_rank = [int(i) for i in np.argsort(-bm, kind="stable") if bm[i] > 0]
        if method == "bm25":
            return [(i, float(bm[i]), {"bm25": float(bm[i])}) for i in bm_rank]
        if qvec is None:
            qvec = self.embed([question])[0]
        cos = self.vecs @ qvec  # 都是单位向量：点积就是余弦相似度
        dense_rank = [int(i) for i in np.argsort(-cos, kind="stable")]
        if method == "dense":
            return [(i, float(cos[i]), {"cosine": float(cos[i])}) for i in dense_rank]
        fused = rrf([bm_rank, dense_rank], len(self.chunks))
        order = [int(i) for i in np.argsort(-fused, kind="stable")]
        return [(i, float(fused[i]), {"bm25": float(bm[i]), "cosine": float(cos[i])}) for i in order]

    def nothing_relevant(self, method: str, question: str, qvec: np.ndarray | None = None) -> tuple[bool, float | None]:
        """返回（知识库里是否没有和这个问题相关的内容，最高的余弦相似度或 None）。
        "没有" = 没有任何块和问题有共同的词（bm25）、最高余弦相似度低于 MIN_COSINE（dense），
        或者两条都成立（hybrid）。只在需要时才给问题算向量（bm25 且没传 qvec 时不算）。"""
        no_words = not self.bm25.scores(question).any()
        if qvec is None and method != "bm25":
            qvec = self.embed([question])[0]
        best_cos = float((self.vecs @ qvec).max()) if qvec is not None and len(self.chunks) else None
        if method == "bm25":
            return no_words, best_cos
        return best_cos < MIN_COSINE and (method == "dense" or no_words), best_cos

    def hit(self, i: int, score: float, scores: dict) -> Hit:
        c = self.chunks[i]
        return Hit(c.text, c.source, score, c.id, c.start, c.end, scores)

    def search(self, query: str, k: int = 3, retriever: str = "hybrid") -> list[Hit]:
        """和查询最相关的 k 个块（知识库里没有相关内容时返回 []）。"""
        qvec = None if retriever == "bm25" else self.embed([query])[0]
        if self.nothing_relevant(retriever, query, qvec)[0]:
            return []
        return [self.hit(i, s, extra) for i, s, extra in self.rank(retriever, query, qvec)[:k]]


def default_chunk_tokenizer():
    """块的大小按本地模型分词器（SmolLM2，一个 tiktoken 编码）的 token 数来算。"""
    from common.tokenizer import load_tokenizer
    return load_tokenizer().enc


def load_knowledge_base(lang: str = "en", chunk_size: int = 128, overlap: int = 32, folder: Path | None = None,
                        embedder=None, cache: Path | None = None) -> KnowledgeBase:
    """读入一个文件夹、切块并建好索引（默认是自带的员工手册 data/rag/<lang>）。
    embedder：默认用本地的 all-MiniLM-L6-v2；传入一个 LLMClient 就改用 API 的嵌入模型。"""
    if folder is None:
        if lang not in ("en", "zh"):
            raise UserError(f"自带知识库只有 en 和 zh 两种语言（收到 {lang!r}）。")
        folder = DATA_DIR / lang
    if not 0 <= overlap < chunk_size:
        raise UserError(f"重叠需要 ≥ 0 且小于块大小（收到块 {chunk_size}、重叠 {overlap}）。")
    if embedder is None:
        from common.embeddings import load_local_embedder
        embedder = load_local_embedder()
    docs = load_docs(Path(folder))
    chunks = chunk_all(docs, default_chunk_tokenizer(), chunk_size, overlap)
    vecs, cached = dense_index(chunks, docs, embedder, chunk_size, overlap, cache)
    return KnowledgeBase(docs, chunks, BM25([c.text for c in chunks]), vecs, embedder, cached)


# ---------------------------------------------------------------------------- 5. 问题集（评测用）
def load_questions(path: Path) -> list[dict]:
    """读入问题集（JSONL），每行一个对象：{"question", "source"（能回答它的文件）,
    "answer"（关键事实）, 可选的 "accept": [关键事实的几种等价说法]}。"""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"无法读取问题集 {path}（{e}）：需要一个 UTF-8 编码的 JSONL 文件。") from None
    items = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"问题集 {path} 第 {n} 行不是合法的 JSON：每行应是一个 JSON 对象。") from None
        if not isinstance(obj, dict) or not obj.get("question") or not obj.get("source"):
            raise UserError(f"问题集 {path} 第 {n} 行缺少 question 或 source 字段。")
        accept = obj.get("accept", [])
        if not isinstance(accept, list) or not all(isinstance(a, str) and a.strip() for a in accept):
            raise UserError(f"问题集 {path} 第 {n} 行的 accept 应是字符串列表。")
        items.append(obj)
    if not items:
        raise UserError(f"问题集 {path} 是空的。")
    return items
