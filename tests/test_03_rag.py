"""Tests for lesson 03 (RAG by hand): chunker, BM25, RRF, eval metrics, CLI (--json, bad input).

Expected values are computed here independently from the formulas (not copied from the script's output).
"""
from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "03_hands_on_rag.py"


rag = importlib.import_module("03_hands_on_rag")


@pytest.fixture(scope="module")
def enc():
    from common.tokenizer import load_tokenizer

    return load_tokenizer().enc


def _texts():
    en = (REPO / "data/rag/en/leave_policy.md").read_text(encoding="utf-8")
    zh = (REPO / "data/rag/zh/security.md").read_text(encoding="utf-8")
    # one very long "sentence" without any punctuation forces the token-boundary split path;
    # mixed scripts and emoji check that multi-byte characters are never cut in half
    long = "intro line\n" + " ".join(f"word{i} 数据{i} 🤖" for i in range(400)) + "\n\nlast paragraph. The end."
    return {"en": en, "zh": zh, "long": long}


@pytest.mark.parametrize("name", ["en", "zh", "long"])
@pytest.mark.parametrize("size,overlap", [(32, 0), (64, 16), (128, 32), (200, 100)])
def test_chunker_keeps_every_character_and_positions(enc, name, size, overlap):
    text = _texts()[name]
    chunks = rag.chunk_document(rag.Doc("d.md", text), enc, size, overlap)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    rebuilt = chunks[0].text
    for k, c in enumerate(chunks):
        assert c.text == text[c.start:c.end] and c.text  # positions are exact, no empty chunk
        assert c.index == k and c.id == f"d.md#{k}"
        assert c.n_tokens == len(enc.encode_ordinary(c.text)) <= size
        if k:
            prev = chunks[k - 1]
            assert prev.start < c.start <= prev.end  # moves forward, never leaves a gap
            if overlap == 0:
                assert c.start == prev.end  # no overlap asked -> chunks are disjoint
            rebuilt += c.text[prev.end - c.start:]  # add only the part not already covered
    assert rebuilt == text  # every character exactly once (after removing the overlaps)


def test_split_units_are_contiguous():
    text = "Hello world. Second sentence!\n\n# Title\n第一句。第二句！最后"
    units = rag.split_units(text)
    assert "".join(text[s:e] for s, e in units) == text
    assert [text[s:e] for s, e in units][:2] == ["Hello world. ", "Second sentence!\n\n"]


def test_bm25_tokens():
    assert rag.bm25_tokens("The cats sat on the mat") == ["cat", "sat", "mat"]
    assert rag.bm25_tokens("年假天数") == ["年假", "假天", "天数"]  # Chinese: bigrams
    assert rag.bm25_tokens("请 假") == ["请", "假"]  # single characters stay as unigrams
    # reimburse/reimbursed/reimbursement share one stem
    assert len({rag.stem(w) for w in ("reimburse", "reimbursed", "reimbursement", "reimburses")}) == 1


def test_bm25_matches_hand_computation():
    docs = ["cat cat dog", "dog bird", "cat fish fish fish"]  # no stopwords, no suffixes to strip
    query = "cat fish"
    k1, b = 1.5, 0.75
    toks = [d.split() for d in docs]
    N = len(docs)
    avgdl = sum(map(len, toks)) / N  # (3 + 2 + 4) / 3 = 3

    def idf(t):
        df = sum(t in d for d in toks)
        return math.log(1 + (N - df + 0.5) / (df + 0.5))

    expected = []
    for d in toks:
        s = 0.0
        for t in set(query.split()):
            tf = d.count(t)
            s += idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
        expected.append(s)
    # spot-check one term by hand: doc 0, "cat": df=2 -> idf = ln(1 + 1.5/2.5) = ln 1.6; tf=2, |d|=3=avgdl
    assert expected[0] == pytest.approx(math.log(1.6) * 2 * 2.5 / (2 + 1.5))
    got = rag.BM25(docs, k1=k1, b=b).scores(query)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert got[1] == 0.0  # shares no word with the query


def test_rrf_by_hand():
    s = rag.rrf([[2, 0], [0, 1, 2]], n=3, k=60)
    assert s[0] == pytest.approx(1 / 62 + 1 / 61)
    assert s[1] == pytest.approx(1 / 62)
    assert s[2] == pytest.approx(1 / 61 + 1 / 63)


def test_recall_and_mrr_toy():
    ranked = [["a", "b", "c"], ["b", "b", "a"], ["c", "c", "c"], ["x", "y", "z"]]
    gold = ["a", "a", "c", "a"]
    assert rag.recall_at_k(ranked, gold, 1) == pytest.approx(2 / 4)
    assert rag.recall_at_k(ranked, gold, 3) == pytest.approx(3 / 4)
    assert rag.mrr(ranked, gold) == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)


def test_contains_fact_normalisation():
    assert rag.contains_fact("You get 1,500 US dollars.", "1500", "en")
    assert rag.contains_fact("a 3-year warranty", "3 year", "en")
    assert rag.contains_fact("matched up to 5%", "5 percent", "en")
    assert rag.contains_fact("保修 3 年", "3年", "zh")


def _run(args, env, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.fixture()
def small_docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "pets.md").write_text("# Pets\n\nDogs are allowed in the office on Fridays. Cats must stay at home.\n",
                               encoding="utf-8")
    (d / "food.txt").write_text("The canteen serves lunch from 12:00 to 14:00. Coffee is free all day.\n",
                                encoding="utf-8")
    return d


def test_json_output_schema(small_docs, script_env):
    p = _run(["--docs", str(small_docs), "--question", "When is lunch served?", "--json", "--backend", "local",
              "--top-k", "2", "--chunk-size", "32", "--overlap", "8"], script_env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)  # stdout holds the JSON and nothing else
    for key in ("question", "retriever", "top_k", "chunk_size", "overlap", "embedder", "n_chunks", "results"):
        assert key in out
    assert out["retriever"] == "hybrid" and len(out["results"]) == 2
    top = out["results"][0]
    assert set(top) >= {"rank", "id", "source", "chunk", "start", "end", "score", "scores", "text"}
    assert top["source"] == "food.txt" and top["id"] == f"food.txt#{top['chunk']}"
    src = (small_docs / top["source"]).read_text(encoding="utf-8")
    assert src[top["start"]:top["end"]] == top["text"]
    assert {"bm25", "cosine"} <= set(top["scores"])


def test_question_matching_nothing(small_docs, script_env):
    p = _run(["--docs", str(small_docs), "--question", "zzqx vvrp", "--json", "--backend", "local",
              "--retriever", "bm25"], script_env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["results"] == [] and "找不到" in out["message"]


def test_empty_folder_is_a_clean_error(tmp_path, script_env):
    (tmp_path / "empty").mkdir()
    p = _run(["--docs", str(tmp_path / "empty"), "--backend", "local"], script_env)
    assert p.returncode == 2
    assert "错误" in p.stderr and "Traceback" not in p.stderr and ".md" in p.stderr


def test_non_utf8_file_is_a_clean_error(tmp_path, script_env):
    d = tmp_path / "gbk"
    d.mkdir()
    (d / "notes.txt").write_bytes("请假制度：每年十天。".encode("gbk"))
    p = _run(["--docs", str(d), "--backend", "local", "--json"], script_env)
    assert p.returncode == 2 and p.stdout == ""
    assert "UTF-8" in p.stderr and "notes.txt" in p.stderr and "Traceback" not in p.stderr


def test_shipped_question_sets_are_valid():
    for lang in ("en", "zh"):
        qs = rag.load_questions(REPO / f"data/rag/questions_{lang}.jsonl")
        assert len(qs) >= 30
        for q in qs:
            doc = (REPO / f"data/rag/{lang}" / q["source"]).read_text(encoding="utf-8")
            assert rag.contains_fact(doc, q["answer"], lang), q  # the gold fact really is in the gold file
