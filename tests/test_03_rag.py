"""Tests for lesson 03 (RAG by hand) and common/retrieval.py: chunker, BM25, RRF, the knowledge base and its
disk cache, eval metrics, the answer matcher, findings, CLI (--json, bad input), and the --quick run (slow).

Expected values are computed here independently from the formulas (not copied from the script's output).
"""
from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from common.errors import SelfCheckFailed

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "03_hands_on_rag.py"


rag = importlib.import_module("03_hands_on_rag")
ret = importlib.import_module("common.retrieval")


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
    chunks = ret.chunk_document(ret.Doc("d.md", text), enc, size, overlap)
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
    units = ret.split_units(text)
    assert "".join(text[s:e] for s, e in units) == text
    assert [text[s:e] for s, e in units][:2] == ["Hello world. ", "Second sentence!\n\n"]


def test_bm25_tokens():
    assert ret.bm25_tokens("The cats sat on the mat") == ["cat", "sat", "mat"]
    assert ret.bm25_tokens("年假天数") == ["年假", "假天", "天数"]  # Chinese: bigrams
    assert ret.bm25_tokens("请 假") == ["请", "假"]  # single characters stay as unigrams
    # reimburse/reimbursed/reimbursement share one stem
    assert len({ret.stem(w) for w in ("reimburse", "reimbursed", "reimbursement", "reimburses")}) == 1


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
    got = ret.BM25(docs, k1=k1, b=b).scores(query)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert got[1] == 0.0  # shares no word with the query


def test_rrf_by_hand():
    s = ret.rrf([[2, 0], [0, 1, 2]], n=3, k=60)
    assert s[0] == pytest.approx(1 / 62 + 1 / 61)
    assert s[1] == pytest.approx(1 / 62)
    assert s[2] == pytest.approx(1 / 61 + 1 / 63)


def test_recall_and_mrr_toy():
    ranked = [["a", "b", "c"], ["b", "b", "a"], ["c", "c", "c"], ["x", "y", "z"]]
    gold = ["a", "a", "c", "a"]
    assert rag.recall_at_k(ranked, gold, 1) == pytest.approx(2 / 4)
    assert rag.recall_at_k(ranked, gold, 3) == pytest.approx(3 / 4)
    assert rag.mrr(ranked, gold) == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)


class FakeEmbedder:
    """Deterministic unit vectors from word counts over a tiny vocabulary (no model to load)."""

    embed_name = "fake:bag-of-words"
    VOCAB = ["dog", "cat", "lunch", "coffee", "office", "friday"]

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        v = np.array([[t.lower().count(w) for w in self.VOCAB] for t in texts], dtype=np.float32) + 0.01
        return v / np.linalg.norm(v, axis=1, keepdims=True)


DOCS = [ret.Doc("pets.md", "Dogs may come to the office on Friday. A cat must stay at home."),
        ret.Doc("food.md", "Lunch is served from noon. Coffee is free. The dog bowl is by the door.")]


def _kb(tmp_path, enc, size=16, overlap=0):
    emb = FakeEmbedder()
    chunks = ret.chunk_all(DOCS, enc, size, overlap)
    vecs, cached = ret.dense_index(chunks, DOCS, emb, size, overlap, cache=tmp_path)
    return ret.KnowledgeBase(DOCS, chunks, ret.BM25([c.text for c in chunks]), vecs, emb, cached), emb


def test_knowledge_base_ranks_and_fuses(tmp_path, enc):
    kb, _ = _kb(tmp_path, enc)
    q = "Where is the coffee for lunch?"
    qv = kb.embed([q])[0]
    bm = kb.bm25.scores(q)
    cos = kb.vecs @ qv
    bm_rank = [i for i, _, _ in kb.rank("bm25", q)]
    dense_rank = [i for i, _, _ in kb.rank("dense", q)]
    assert bm_rank == sorted((i for i in range(len(bm)) if bm[i] > 0), key=lambda i: -bm[i])  # only shared words
    assert dense_rank == sorted(range(len(cos)), key=lambda i: -cos[i])
    # hybrid = reciprocal rank fusion of the two rankings, computed here by hand
    fused = {i: sum(1 / (60 + rank.index(i) + 1) for rank in (bm_rank, dense_rank) if i in rank)
             for i in range(len(kb.chunks))}
    hybrid = kb.rank("hybrid", q)
    assert [s for _, s, _ in hybrid] == pytest.approx(sorted(fused.values(), reverse=True))
    hits = kb.search(q, k=2)
    assert len(hits) == 2 and hits[0].source == "food.md" and hits[0].id.startswith("food.md#")
    assert hits[0].text == kb.chunks[hybrid[0][0]].text and hits[0].score == pytest.approx(hybrid[0][1])
    assert kb.search("zzqx vvrp", retriever="bm25") == []  # no shared word: nothing relevant
    with pytest.raises(ValueError):
        kb.rank("bm26", q)


def test_dense_index_cache_key(tmp_path, enc):
    kb1, emb1 = _kb(tmp_path, enc)
    kb2, emb2 = _kb(tmp_path, enc)
    assert not kb1.from_cache and kb2.from_cache and emb2.calls == 0  # second time: read from disk
    assert np.array_equal(kb1.vecs, kb2.vecs)
    _, emb3 = _kb(tmp_path, enc, size=24)  # other chunking parameters: recomputed
    assert emb3.calls > 0
    DOCS[0].text += " Birds too."
    try:
        kb4, emb4 = _kb(tmp_path, enc)  # a file changed: recomputed
        assert not kb4.from_cache and emb4.calls > 0
    finally:
        DOCS[0].text = DOCS[0].text[:-len(" Birds too.")]


def test_load_knowledge_base_on_a_folder(tmp_path, enc):
    d = tmp_path / "docs"
    d.mkdir()
    for doc in DOCS:
        (d / doc.name).write_text(doc.text, encoding="utf-8")
    kb = ret.load_knowledge_base(folder=d, chunk_size=16, overlap=0, embedder=FakeEmbedder(), cache=tmp_path / "c")
    by_name = sorted(DOCS, key=lambda doc: doc.name)  # files are read in name order
    assert [c.text for c in kb.chunks] == [c.text for c in ret.chunk_all(by_name, enc, 16, 0)]
    assert kb.search("coffee", k=1, retriever="bm25")[0].source == "food.md"
    with pytest.raises(ret.UserError):
        ret.load_knowledge_base(folder=tmp_path / "missing", embedder=FakeEmbedder())


def test_check_chunks_catches_a_broken_chunk(enc):
    chunks = ret.chunk_all(DOCS, enc, 16, 4)
    rag.check_chunks(DOCS, chunks, 16)  # the real chunker passes
    chunks[1].text = chunks[1].text + "x"
    with pytest.raises(SelfCheckFailed):
        rag.check_chunks(DOCS, chunks, 16)


@pytest.mark.parametrize("answer,fact,lang", [
    ("You get 1,500 US dollars.", "1500", "en"), ("a 3-year warranty", "3 year", "en"),
    ("matched up to 5%", "5 percent", "en"), ("保修 3 年", "3年", "zh"),
    ("You can carry over five days.", "5 days", "en"), ("It is twenty-two days.", "22", "en"),
    ("保修三年", "3 年", "zh"), ("每年二十二天", "22", "zh"), ("预算一千五百元", "1500", "zh"),
    ("Arrive at 9:30.", "9:30", "en"), ("The answer is: 22.", "22", "en"),
])
def test_matcher_normalises_numbers(answer, fact, lang):
    assert rag.match_fact(answer, [fact], lang) == fact


@pytest.mark.parametrize("answer,fact,lang", [
    ("You get 13 days.", "3 days", "en"), ("It takes 30 days.", "3", "en"), ("10 days", "3", "en"),
    ("2.5 hours", "5 hours", "en"), ("at 19:30", "9:30", "en"), ("122 days", "22", "en"),
    ("保修 13 年", "3 年", "zh"), ("保修十三年", "3 年", "zh"), ("It is reimbursed.", "not reimbursed", "en"),
])
def test_matcher_rejects_wrong_numbers_and_facts(answer, fact, lang):
    assert rag.match_fact(answer, [fact], lang) is None


def test_matcher_accepts_listed_phrasings_and_reports_which():
    qs = {q["question"]: q for q in ret.load_questions(REPO / "data/rag/questions_en.jsonl")}
    wine = qs["Will the company pay for wine at a team dinner?"]
    facts = rag.accepted_facts(wine)
    assert rag.match_fact("The company does not pay for wine at a team dinner", [wine["answer"]], "en") is None
    assert rag.match_fact("The company does not pay for wine at a team dinner", facts, "en") == "does not pay"
    assert rag.match_fact("Alcohol is not reimbursed [expenses.md#1]", facts, "en") == "not reimbursed"
    assert rag.match_fact("Yes, the company pays for wine.", facts, "en") is None
    zh = {q["question"]: q for q in ret.load_questions(REPO / "data/rag/questions_zh.jsonl")}
    wine_zh = zh["团队聚餐喝的葡萄酒公司给报吗？"]
    assert rag.match_fact("酒水不能报销。", rag.accepted_facts(wine_zh), "zh") == "不能报"
    assert rag.match_fact("可以报销。", rag.accepted_facts(wine_zh), "zh") is None


def test_findings_follow_the_numbers():
    def table(b, d, h):
        return {m: {"recall@1": 0.5, "recall@3": v, "mrr@10": v} for m, v in (("bm25", b), ("dense", d), ("hybrid", h))}

    worse = rag.retrieval_findings(table(0.927, 1.0, 0.976), "en", "local:all-MiniLM-L6-v2")
    f = worse["hybrid_recall@3_ge_each_single"]
    assert not f["holds"] and "低于 dense 的 1.000" in f["text"] and "和预期相反" in f["text"]
    better = rag.retrieval_findings(table(0.8, 0.85, 0.95), "en", "local:all-MiniLM-L6-v2")
    assert better["hybrid_recall@3_ge_each_single"]["holds"] and "不低于" in better["hybrid_recall@3_ge_each_single"]["text"]
    zh = rag.retrieval_findings(table(0.927, 0.659, 0.878), "zh", "local:all-MiniLM-L6-v2")
    assert not zh["hybrid_recall@3_ge_0.9"]["holds"] and "0.659" in zh["hybrid_recall@3_ge_0.9"]["text"]


def test_recall_monotone_check():
    rag.check_recall_monotone({"bm25": {"recall@1": 0.5, "recall@3": 0.7, "recall@5": 0.7, "mrr@10": 0.6}})
    with pytest.raises(SelfCheckFailed):
        rag.check_recall_monotone({"bm25": {"recall@1": 0.8, "recall@3": 0.7, "recall@5": 0.9, "mrr@10": 0.6}})


@pytest.fixture()
def small_docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "pets.md").write_text("# Pets\n\nDogs are allowed in the office on Fridays. Cats must stay at home.\n",
                               encoding="utf-8")
    (d / "food.txt").write_text("The canteen serves lunch from 12:00 to 14:00. Coffee is free all day.\n",
                                encoding="utf-8")
    return d


def _json_main(args, tmp_path, monkeypatch, capsys) -> dict:
    """Run the lesson's main in this process (the embedder loads once per test session)."""
    monkeypatch.setenv("LLM_COURSE_OUTPUTS", str(tmp_path / "outputs"))  # the vector cache goes there
    assert rag.main([*args, "--json", "--backend", "local"]) == 0
    return json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else


def test_json_output_schema(small_docs, tmp_path, monkeypatch, capsys):
    out = _json_main(["--docs", str(small_docs), "--question", "When is lunch served?",
                      "--retrieve-k", "2", "--chunk-size", "32", "--overlap", "8"], tmp_path, monkeypatch, capsys)
    for key in ("question", "retriever", "retrieve_k", "chunk_size", "overlap", "embedder", "n_chunks", "hits"):
        assert key in out
    assert out["retriever"] == "hybrid" and len(out["hits"]) == 2
    top = out["hits"][0]
    assert set(top) >= {"rank", "id", "source", "chunk", "start", "end", "score", "scores", "text"}
    assert top["source"] == "food.txt" and top["id"] == f"food.txt#{top['chunk']}"
    src = (small_docs / top["source"]).read_text(encoding="utf-8")
    assert src[top["start"]:top["end"]] == top["text"]
    assert {"bm25", "cosine"} <= set(top["scores"])


def test_question_matching_nothing(small_docs, tmp_path, monkeypatch, capsys):
    out = _json_main(["--docs", str(small_docs), "--question", "zzqx vvrp", "--retriever", "bm25"],
                     tmp_path, monkeypatch, capsys)
    assert out["hits"] == [] and "找不到" in out["message"]


def test_own_docs_without_a_question_set(small_docs, tmp_path, monkeypatch, capsys):
    """--docs and no --eval: step 5 says why it is skipped and how to write a question set, and the
    retrieval.png of an earlier run (with a question set) does not stay beside these results."""
    monkeypatch.setenv("LLM_COURSE_OUTPUTS", str(tmp_path / "outputs"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "retrieval.png").write_bytes(b"an earlier run's plot")
    assert rag.main(["--docs", str(small_docs), "--question", "When is lunch served?", "--backend", "local",
                     "--max-new-tokens", "4", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "第 4 步" in text and "第 5 步：评测检索——跳过" in text and "第 6 步" in text
    assert "--eval" in text and '"question"' in text and '"source"' in text and '"answer"' in text
    assert not (out / "retrieval.png").exists()
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "retrieval" not in res and "files" not in res


def test_empty_or_blank_folder_is_a_user_error(tmp_path):
    # the lesson turns a UserError into one Chinese line + exit 2 (common/errors.run_cli; see the non-UTF-8 test)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ret.UserError, match=r"\.md"):
        ret.load_docs(tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.md").write_text("  \n", encoding="utf-8")
    with pytest.raises(ret.UserError, match="都是空的"):
        ret.load_docs(tmp_path / "blank")


def test_non_utf8_file_is_a_clean_error(tmp_path, run_script):
    d = tmp_path / "gbk"
    d.mkdir()
    (d / "notes.txt").write_bytes("请假制度：每年十天。".encode("gbk"))
    p = run_script(SCRIPT.name, "--docs", str(d), "--backend", "local", "--json")   # in-process (tests/conftest.py)
    assert p.returncode == 2 and p.stdout == ""
    assert "UTF-8" in p.stderr and "notes.txt" in p.stderr and "Traceback" not in p.stderr


def test_shipped_question_sets_are_valid():
    for lang in ("en", "zh"):
        qs = ret.load_questions(REPO / f"data/rag/questions_{lang}.jsonl")
        assert len(qs) >= 30
        for q in qs:
            doc = (REPO / f"data/rag/{lang}" / q["source"]).read_text(encoding="utf-8")
            assert rag.match_fact(doc, [q["answer"]], lang), q  # the gold fact really is in the gold file
            assert all(isinstance(a, str) and a.strip() for a in q.get("accept", [])), q


@pytest.mark.slow
def test_quick_run_end_to_end(lesson_runs):
    # exactly the docs' quick command, so tests/test_docs.py shares this run
    r = lesson_runs.run("03_hands_on_rag.py", "--quick", timeout=300)
    assert r.returncode == 0, r.explain()
    steps = [int(m) for m in re.findall(r"== 第 (\d) 步", r.stdout)]
    assert steps == [1, 2, 3, 4, 5, 6, 7], steps  # printed in order, none missing
    res = r.results("03_hands_on_rag")
    table = res["retrieval"]
    assert set(table) == {"bm25", "dense", "hybrid"} and res["n_questions"] == 41
    for row in table.values():
        assert 0 <= row["recall@1"] <= row["recall@3"] <= row["recall@5"] <= 1 and 0 <= row["mrr@10"] <= 1
    f = res["findings"]["hybrid_recall@3_ge_each_single"]
    assert f["holds"] == (f["hybrid"] >= max(f["bm25"], f["dense"])) and f["hybrid"] == table["hybrid"]["recall@3"]
    ev = res["answer_eval"]
    assert ev["n"] == len(ev["rows"]) == 2
    assert ev["key_fact"] == sum(row["matched"] is not None for row in ev["rows"])
    assert ev["cited"] == sum(row["cited"] for row in ev["rows"])
    for row in ev["rows"]:  # the recorded phrasing really occurs in the answer, per the matcher
        assert row["key_fact"] == (rag.match_fact(row["answer"], [row["gold"], *row["accept"]], "en") is not None)
    assert (r.out_root / "03_hands_on_rag" / "retrieval.png").is_file()
    assert r.results("03_hands_on_rag")["files"] == ["retrieval.png"]
    assert res["hits"] and res["demo"]["sources"] == [h["id"] for h in res["hits"]]


@pytest.mark.parametrize("line,msg", [("{not json", "不是合法的 JSON"), ('{"question": "q"}', "缺少"),
                                      ('{"question": "q", "source": "a.md", "accept": "x"}', "accept")])
def test_bad_question_set_is_a_user_error(tmp_path, line, msg):
    p = tmp_path / "q.jsonl"
    p.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ret.UserError, match=msg):
        ret.load_questions(p)


@pytest.mark.slow
def test_chinese_set_with_the_local_model_evaluates_retrieval_but_does_not_generate(run_script, script_env,
                                                                                      restore_torch_globals):
    r = run_script(SCRIPT.name, "--quick", "--lang", "zh", timeout=300)    # in-process (tests/conftest.py)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((Path(script_env["LLM_COURSE_OUTPUTS"]) / "03_hands_on_rag" / "results.json").read_text("utf-8"))
    assert res["n_questions"] == 41 and set(res["retrieval"]) == {"bm25", "dense", "hybrid"}
    assert "不生成回答" in r.stdout and "demo" not in res and "answer_eval" not in res
    f = res["findings"]["hybrid_recall@3_ge_0.9"]
    assert f["holds"] == (res["retrieval"]["hybrid"]["recall@3"] >= 0.9)
