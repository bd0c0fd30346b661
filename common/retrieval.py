"""Retrieval over a folder of text files: load -> chunk -> index (BM25 + dense vectors) -> search.

Lesson 03 builds RAG step by step on these pieces and docs/03_hands_on_rag.md walks through them;
other lessons (e.g. an agent's "search the handbook" tool) just use the one-line entry point:

    from common.retrieval import load_knowledge_base
    kb = load_knowledge_base(lang="en", chunk_size=128, overlap=32)   # the shipped data/rag/<lang> handbook
    kb = load_knowledge_base(folder=Path("my_docs"))                   # or any folder of .md/.txt (UTF-8)
    for hit in kb.search("How many sick days do I get?", k=3, retriever="hybrid"):
        print(hit.id, hit.score, hit.text)                             # Hit(text, source, score, id, ...)

The pieces, in pipeline order:
  load_docs(folder)                      -> [Doc(name, text)]
  chunk_all(docs, enc, size, overlap)    -> [Chunk(source, index, start, end, text, n_tokens)]
      sentences packed greedily up to `size` tokens; the next chunk steps back whole sentences
      (at most `overlap` tokens); a sentence longer than `size` is cut at token boundaries.
  BM25(texts).scores(query)              -> Okapi BM25 score per chunk (word matching)
  dense_index(chunks, docs, embedder, ...) -> unit vectors per chunk, cached on disk
  rrf(rankings, n)                       -> reciprocal rank fusion of several rankings ("hybrid")
  KnowledgeBase.rank / .search           -> the three retrievers: bm25 | dense | hybrid

An embedder is anything with ``embed(list[str]) -> np.ndarray [N, D]`` (rows L2-normalised) and a name
(``embed_name``, as LLMClient has, or ``name``): the local all-MiniLM-L6-v2 by default, or an API's
embedding model through common.client.LLMClient.
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

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "rag"   # the shipped handbook: data/rag/{en,zh}
RETRIEVERS = ("bm25", "dense", "hybrid")
MIN_COSINE = 0.2  # dense: if even the best chunk is less similar than this, treat it as "nothing relevant"
RRF_K = 60        # the constant k of reciprocal rank fusion (the value of the original RRF paper)


# ---------------------------------------------------------------------------- 1. documents
@dataclass
class Doc:
    name: str  # path relative to the folder; used as the source in citations
    text: str


def load_docs(folder: Path) -> list[Doc]:
    """Read every .md / .txt file (UTF-8) under folder, in name order. Empty files are skipped (a note
    goes to stderr); every problem is a one-line Chinese UserError."""
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
            text = raw.decode("utf-8-sig")  # UTF-8, with or without a BOM
        except UnicodeDecodeError as e:
            raise UserError(f"文件 {p} 不是 UTF-8 编码（第 {e.start} 字节处无法解码）：请另存为 UTF-8 后重试。") from None
        if text.strip():
            docs.append(Doc(p.relative_to(folder).as_posix(), text))
        else:
            print(f"  （跳过空文件 {p.name}）", file=sys.stderr)
    if not docs:
        raise UserError(f"文件夹 {folder} 里的文件都是空的：请放入有内容的 .md/.txt 文件。")
    return docs


# ---------------------------------------------------------------------------- 2. chunking
@dataclass
class Chunk:
    source: str    # file name
    index: int     # which chunk of that file (from 0)
    start: int     # character range [start, end) in the file's text
    end: int
    text: str
    n_tokens: int

    @property
    def id(self) -> str:
        """The citation form "file#index"."""
        return f"{self.source}#{self.index}"


# A sentence/paragraph ends at . ! ? ; (followed by whitespace or the end), at Chinese sentence
# punctuation, or at a newline. The whitespace after a boundary belongs to the sentence before it.
UNIT_END = re.compile(r"[.!?;](?=\s|$)[\"'”’)]*\s*|[。！？；]+[”’）]*\s*|\n\s*")


def split_units(text: str) -> list[tuple[int, int]]:
    """Split text into back-to-back sentence units [(start, end)]; joined they are exactly the text."""
    units, start = [], 0
    for m in UNIT_END.finditer(text):
        if m.end() > start:
            units.append((start, m.end()))
            start = m.end()
    if start < len(text):
        units.append((start, len(text)))
    return units


def _split_long(text: str, s: int, e: int, enc, chunk_size: int, n_tok) -> list[tuple[int, int, int]]:
    """A sentence longer than chunk_size tokens: cut it at token boundaries into pieces of at most
    chunk_size tokens (re-counted), never inside a character."""
    pieces, pos = [], s
    while pos < e:
        win = min(e, pos + 32 * chunk_size)  # look at a bounded window, not the whole sentence each time
        ids = enc.encode_ordinary(text[pos:win])
        if len(ids) <= chunk_size:
            cut = win
        else:
            _, offsets = enc.decode_with_offsets(ids)  # start character of each token
            m = chunk_size
            while m > 1 and (pos + offsets[m] <= pos or n_tok(pos, pos + offsets[m]) > chunk_size):
                m -= 1  # a CJK character can take 2-3 byte tokens: step back to a whole character
            cut = max(pos + offsets[m], pos + 1)
        pieces.append((pos, cut, n_tok(pos, cut)))
        pos = cut
    return pieces


def chunk_document(doc: Doc, enc, chunk_size: int, overlap: int) -> list[Chunk]:
    """Pack sentences into chunks of at most chunk_size tokens (counted with `enc`, a tiktoken-style
    encoding); each next chunk steps back whole sentences, at most `overlap` tokens."""
    text = doc.text
    n_tok = lambda s, e: len(enc.encode_ordinary(text[s:e]))  # noqa: E731
    pieces = []  # (start, end, tokens): sentence units, over-long ones cut further
    for s, e in split_units(text):
        n = n_tok(s, e)
        pieces += [(s, e, n)] if n <= chunk_size else _split_long(text, s, e, enc, chunk_size, n_tok)
    chunks, i = [], 0
    while i < len(pieces):
        j = i + 1  # greedily add sentences while the chunk stays within chunk_size
        while j < len(pieces) and n_tok(pieces[i][0], pieces[j][1]) <= chunk_size:
            j += 1
        s, e = pieces[i][0], pieces[j - 1][1]
        chunks.append(Chunk(doc.name, len(chunks), s, e, text[s:e], n_tok(s, e)))
        if j >= len(pieces):
            break
        k, ov = j, 0  # overlap: step back whole sentences, at most `overlap` tokens, always moving forward
        while k - 1 > i and ov + pieces[k - 1][2] <= overlap:
            ov += pieces[k - 1][2]
            k -= 1
        i = k
    return chunks


def chunk_all(docs: list[Doc], enc, chunk_size: int, overlap: int) -> list[Chunk]:
    return [c for d in docs for c in chunk_document(d, enc, chunk_size, overlap)]


# ---------------------------------------------------------------------------- 3a. BM25 (word matching)
STOPWORDS = set("""a an the and or of to in on at for by with from as is are was were be been do does did i me my we our
you your it its this that these those what which who whom how when where why can could may might will would shall
should must if not no yes there their they he she his her have has had get gets any some all more most than then
so such about into over under up down out off per each""".split())
SUFFIXES = ("ations", "ation", "ments", "ment", "ings", "ing", "ies", "ed", "es", "s")


def stem(w: str) -> str:
    """A tiny stemmer: drop one common suffix and a final e, so reimbursed / reimbursement / reimburse
    become one word. (Real systems use Porter / Snowball; this only shows the idea.)"""
    for suf in SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3 and not w.endswith("ss"):
            w = w[:-len(suf)] + ("y" if suf == "ies" else "")
            break
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


def bm25_tokens(text: str) -> list[str]:
    """BM25 "words": English words (lower case, stopwords removed, stemmed); Chinese has no spaces, so
    each run of CJK characters becomes its overlapping character pairs (bigrams)."""
    out = []
    for m in re.finditer(r"[\u3400-\u9fff]+|[a-z0-9]+", text.lower()):
        w = m.group()
        if w[0] >= "\u3400":  # a run of CJK characters -> bigrams; a single character stays a unigram
            out += [w] if len(w) == 1 else [w[i:i + 2] for i in range(len(w) - 1)]
        elif w not in STOPWORDS:
            out.append(stem(w))
    return out


class BM25:
    """Okapi BM25: score(q, d) = sum over t in q of idf(t) * tf*(k1+1) / (tf + k1*(1 - b + b*|d|/avgdl)),
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)); a word repeated in the query counts once."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        docs = [bm25_tokens(t) for t in texts]
        self.N = len(docs)
        self.doc_len = np.array([len(d) for d in docs], dtype=np.float64)
        self.avgdl = float(self.doc_len.mean()) if self.N else 0.0
        self.postings: dict[str, list[tuple[int, int]]] = {}  # inverted index: word -> [(chunk, term frequency)]
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


# ---------------------------------------------------------------------------- 3b. dense vectors (meaning)
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity a.b / (|a| |b|); for unit vectors it is just the dot product."""
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embedder_name(embedder) -> str:
    """The embedding model's name, part of the vector cache key (LLMClient.embed_name, LocalEmbedder.name)."""
    name = getattr(embedder, "embed_name", None)
    return name if name else f"local:{embedder.name}"


def index_cache_dir() -> Path:
    """Where chunk vectors are cached: <user cache>/rag_index (shared by every lesson that indexes)."""
    from common.outputs import cache_dir
    return cache_dir("rag_index")


def dense_index(chunks: list[Chunk], docs: list[Doc], embedder, chunk_size: int, overlap: int,
                cache: Path | None = None, batch_size: int = 32) -> tuple[np.ndarray, bool]:
    """Unit vectors [n_chunks, D] for all chunks, and whether they came from the disk cache.
    Cache key = each file's content hash + chunking parameters + embedding model name: change any of
    them and the vectors are recomputed. cache=None: index_cache_dir()."""
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
        if embedder_name(embedder) != name:  # an API failed half-way and the client fell back to local: redo all
            continue
        vecs = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
        return vecs, False
    raise UserError("嵌入接口不稳定，计算块向量失败：请检查网络或 API 配置后重试，或用 --backend local。")


# ---------------------------------------------------------------------------- 3c. hybrid: rank fusion
def rrf(rankings: list[list[int]], n: int, k: int = RRF_K) -> np.ndarray:
    """Reciprocal rank fusion: each ranking gives its r-th item (from 1) 1/(k + r) points. Only ranks
    count, so the different score scales of BM25 and cosine do not matter."""
    s = np.zeros(n)
    for ranking in rankings:
        for r, idx in enumerate(ranking, start=1):
            s[idx] += 1.0 / (k + r)
    return s


# ---------------------------------------------------------------------------- 4. search
@dataclass
class Hit:
    text: str      # the chunk's text
    source: str    # file name (relative to the folder)
    score: float   # bm25 score, cosine, or fused RRF score, depending on the retriever
    id: str = ""   # citation form "file#index"
    start: int = 0  # character range in the file
    end: int = 0
    scores: dict = field(default_factory=dict)  # each retriever's raw score ({"bm25": .., "cosine": ..})


class KnowledgeBase:
    """Chunks with their BM25 index and vectors, and the three retrievers over them."""

    def __init__(self, docs: list[Doc], chunks: list[Chunk], bm25: BM25, vecs: np.ndarray, embedder,
                 from_cache: bool = False):
        self.docs, self.chunks, self.bm25, self.vecs = docs, chunks, bm25, vecs
        self.embedder, self.from_cache = embedder, from_cache

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(list(texts))

    def rank(self, method: str, question: str, qvec: np.ndarray | None = None) -> list[tuple[int, float, dict]]:
        """All (matching) chunks ordered by `method`: [(chunk number, score, raw scores)], best first.
        BM25 returns only chunks sharing a word with the question; dense and hybrid return every chunk."""
        if method not in RETRIEVERS:
            raise ValueError(f"unknown retriever {method!r}; choose from {RETRIEVERS}")
        bm = self.bm25.scores(question)
        bm_rank = [int(i) for i in np.argsort(-bm, kind="stable") if bm[i] > 0]
        if method == "bm25":
            return [(i, float(bm[i]), {"bm25": float(bm[i])}) for i in bm_rank]
        if qvec is None:
            qvec = self.embed([question])[0]
        cos = self.vecs @ qvec  # unit vectors: the dot product is the cosine similarity
        dense_rank = [int(i) for i in np.argsort(-cos, kind="stable")]
        if method == "dense":
            return [(i, float(cos[i]), {"cosine": float(cos[i])}) for i in dense_rank]
        fused = rrf([bm_rank, dense_rank], len(self.chunks))
        order = [int(i) for i in np.argsort(-fused, kind="stable")]
        return [(i, float(fused[i]), {"bm25": float(bm[i]), "cosine": float(cos[i])}) for i in order]

    def nothing_relevant(self, method: str, question: str, qvec: np.ndarray | None = None) -> tuple[bool, float | None]:
        """(True if the knowledge base has nothing for this question, best cosine similarity or None).
        Nothing = no chunk shares a word with the question (bm25), the best cosine is below MIN_COSINE
        (dense), or both (hybrid). The question is embedded only when needed (not for bm25 without qvec)."""
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
        """The k best chunks for the query ([] when nothing in the knowledge base is relevant)."""
        qvec = None if retriever == "bm25" else self.embed([query])[0]
        if self.nothing_relevant(retriever, query, qvec)[0]:
            return []
        return [self.hit(i, s, extra) for i, s, extra in self.rank(retriever, query, qvec)[:k]]


def default_chunk_tokenizer():
    """Chunk sizes are counted in tokens of the local model's tokenizer (SmolLM2, a tiktoken encoding)."""
    from common.tokenizer import load_tokenizer
    return load_tokenizer().enc


def load_knowledge_base(lang: str = "en", chunk_size: int = 128, overlap: int = 32, folder: Path | None = None,
                        embedder=None, cache: Path | None = None) -> KnowledgeBase:
    """Load, chunk and index a folder (default: the shipped handbook data/rag/<lang>).
    embedder: default the local all-MiniLM-L6-v2; pass an LLMClient to use an API's embeddings."""
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
