"""Lesson 01 (01_hello_llm.py): the quick run end to end, the numbers it prints, and bad flags.

References used by the assertions:
  * temperature table: numpy float64 softmax / entropy / top-p cut computed here from the same logits;
  * part 2 (step by step): the chosen token under greedy decoding is the top candidate the step printed;
  * attention: causality and rows summing to 1; the attention-sink sentence against hand-made weights;
  * API path: tests/openai_test_server.py's deterministic echo reply, and the request it recorded.
The quick run goes through the shared ``lesson_runs`` fixture with the docs' own argv (``--quick``), so
tests/test_docs.py reuses it.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "01_hello_llm.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.openai_test_server import CHAT_MODEL, echo_reply, reply_pieces, run_server  # noqa: E402

# the file name starts with a digit, so a plain `import` statement cannot name it
lesson = importlib.import_module("01_hello_llm")


# ---------------------------------------------------------------------------
# The quick run, offline, no key (shared with tests/test_docs.py)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(lesson_runs):
    r = lesson_runs.run(SCRIPT, "--quick")
    assert r.returncode == 0, r.explain()
    return r, r.results("01_hello_llm")


@pytest.mark.slow
def test_quick_run_shows_every_part(quick_run):
    r, results = quick_run
    for n in range(1, 6):
        assert f"第 {n} 部分" in r.stdout
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr[-2000:]
    assert results["parts"] == lesson.PARTS
    # without a cached OpenAI encoding the part says so instead of downloading
    assert bool(results["tokens"]["openai_encodings"]) != ("跳过对照" in r.stdout)


@pytest.mark.slow
def test_quick_run_streaming_numbers(quick_run):
    _, results = quick_run
    s = results["streaming"]
    assert s["backend"] == "local" and s["count_unit"] == "tokens"
    assert s["text"].strip() and 1 <= s["count"] <= 40 == s["max_new_tokens"]  # --quick: at most 40 new tokens
    assert s["n_pieces"] <= s["count"]  # a piece is one token or, for a split UTF-8 char, several
    # same seed and sampling settings: part 3's T=0.7 sample is the start of the streamed answer
    assert s["temperature"] == 0.7 and s["text"].startswith(results["temperature_table"]["samples"]["0.7"][0])


@pytest.mark.slow
def test_quick_run_temperature_and_steps(quick_run):
    _, results = quick_run
    table = results["temperature_table"]["table"]
    assert [row["temperature"] for row in table] == [0.0, 0.7, 1.5]
    for row in table:
        assert sum(row["top_probs"]) + row["other_prob"] == pytest.approx(1.0, abs=1e-5)
    ents = [row["entropy_bits"] for row in table]
    maxp = [row["max_prob"] for row in table]
    assert ents[0] == 0.0 and ents == sorted(ents) and len(set(ents)) == 3
    assert maxp[0] == pytest.approx(1.0) and maxp == sorted(maxp, reverse=True)
    # the step-by-step part starts from the same logits: its first top candidate is the table's top token
    assert results["steps"][0]["candidates"][0]["id"] == table[0]["top_ids"][0]
    assert set(results["temperature_table"]["samples"]) == {"0", "0.7", "1.5"}


@pytest.mark.slow
def test_quick_run_attention_and_png(quick_run):
    r, results = quick_run
    a = results["attention"]
    m = np.array(a["matrix"])
    assert m.shape == (len(a["tokens"]),) * 2
    assert np.allclose(m.sum(1), 1.0, atol=1e-5)
    assert np.all(np.triu(m, k=1) == 0.0)  # causal: nothing above the diagonal
    assert a["tokens"][a["focus_index"]].strip() == "it"
    png = Path(a["png"])
    assert png.parent == r.out_root / "01_hello_llm"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(ch in r.stdout for ch in "▒▓█")  # the terminal heatmap
    # the printed attention-sink sentence is the one the measured weights give
    row = a["focus_row"]
    expected = lesson.sink_sentence(row[0], int(np.argmax(row)) == 0, a["heads_max_on_first_token"], a["n_heads"])
    assert expected in r.stdout


@pytest.mark.slow
def test_quick_run_token_counts(quick_run):
    _, results = quick_run
    rows = {row["label"]: row for row in results["tokens"]["samples"]}
    from common.tokenizer import load_tokenizer
    tok = load_tokenizer()
    for row in rows.values():
        assert tok.decode(row["ids"]) == row["text"]  # the split loses nothing
        assert row["chars"] == len(row["text"]) and row["tokens"] == len(row["ids"])
    # the point of the part, measured: the Chinese sentence needs more tokens than the English one
    assert rows["中文"]["tokens"] > rows["英文"]["tokens"]
    assert rows["中文"]["byte_fragments"] > 0 and rows["英文"]["byte_fragments"] == 0


# ---------------------------------------------------------------------------
# The functions the lesson teaches, against independent references
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_logits(local_fp32):
    ids = local_fp32.tokenizer.apply_chat_template([{"role": "user", "content": lesson.DEFAULT_PROMPT}])
    return ids, lesson.next_token_logits(local_fp32, ids)


def test_temperature_table_against_numpy(prompt_logits):
    _, logits = prompt_logits
    temps = [0.0, 0.2, 0.5, 0.7, 1.0, 1.5, 2.0]
    rows = lesson.temperature_table(logits, temps, top_k=50, top_p=0.9)
    x = logits.double().numpy()
    for row in rows:
        t, probs = row["temperature"], row["probs"].double().numpy()
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert sum(row["top_probs"]) + row["other_prob"] == pytest.approx(1.0, abs=1e-5)
        if t == 0:
            ref = np.zeros_like(x)
            ref[x.argmax()] = 1.0
            assert row["kept_top_k"] == row["kept_top_p"] == row["kept_both"] == 1
        else:
            z = np.exp((x - x.max()) / t)
            ref = z / z.sum()
            sorted_p = np.sort(ref)[::-1]
            n_top_p = int(np.searchsorted(np.cumsum(sorted_p), 0.9) + 1)  # smallest set reaching 0.9
            assert row["kept_top_k"] == 50
            assert row["kept_top_p"] == n_top_p
            assert row["kept_both"] == min(50, n_top_p)
        np.testing.assert_allclose(probs, ref, atol=1e-6)
        nz = ref[ref > 0]
        assert row["entropy_bits"] == pytest.approx(float(-(nz * np.log2(nz)).sum()), abs=1e-3)
        assert row["max_prob"] == pytest.approx(ref.max(), abs=1e-6)
    # sharper as T falls: entropy strictly decreases, max probability increases
    ents = [r["entropy_bits"] for r in rows]
    maxp = [r["max_prob"] for r in rows]
    assert all(a < b for a, b in zip(ents, ents[1:])), ents
    assert all(a >= b for a, b in zip(maxp, maxp[1:])), maxp


def test_step_by_step_greedy_picks_the_top_candidate(local_fp32, prompt_logits, capsys):
    ids, logits = prompt_logits
    args = lesson.parse_args(["--temperature", "0", "--steps", "4", "--backend", "local"])
    steps, first_logits = lesson.part_steps(local_fp32, args, ids)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:  # greedy: the chosen token is the most likely one of that step's table
        assert s["chosen_id"] == s["candidates"][0]["id"]
        assert s["candidates"][0]["prob"] >= s["candidates"][1]["prob"]
    torch.testing.assert_close(first_logits, logits)  # step 1 saw the prompt's next-token logits
    out = capsys.readouterr().out
    assert "第 2 部分" in out and out.count("← 选中") == 4


def test_attention_heads_are_causal_rows_sum_to_one(local_fp32):
    ids = local_fp32.tokenizer.encode(lesson.DEFAULT_SENTENCE)
    heads = lesson.attention_heads(local_fp32, ids, 13)
    cfg = local_fp32.config
    assert heads.shape == (cfg.n_heads, len(ids), len(ids))
    assert torch.all(heads >= 0) and torch.all(torch.triu(heads, diagonal=1) == 0)
    torch.testing.assert_close(heads.sum(-1), torch.ones(cfg.n_heads, len(ids)), atol=1e-5, rtol=0)


def test_sink_sentence_follows_the_weights():
    # 3 heads looking from token 2: two put their maximum on token 0, one on token 2
    focus = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    on_first = lesson.heads_on_first_token(focus)
    assert on_first == 2
    sink = lesson.sink_sentence(0.43, True, on_first, 3)
    assert "43%" in sink and "3 个头里有 2 个" in sink and "很多头" in sink
    # the case: the shown head gives token 0 only 9 % although most heads park there
    shown = lesson.sink_sentence(0.09, False, 7, 9)
    assert "9%" in shown and "不在第 0 个 token" in shown
    # no head parks on token 0: the sentence must not claim an attention sink
    none = lesson.sink_sentence(0.05, False, lesson.heads_on_first_token(torch.tensor([[0.1, 0.9], [0.2, 0.8]])), 2)
    assert "很多头" not in none and "没有一个头" in none
    assert "只有少数头" in lesson.sink_sentence(0.2, False, 1, 9)


def test_openai_encoding_is_not_downloaded_without_cache(tmp_path, monkeypatch):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail(f"tried to fetch {name}"))
    assert lesson.openai_encoding("o200k_base", force=False) is None


def test_part_rerun_keeps_the_other_parts_results(local_fp32, tmp_path, capsys):
    out = tmp_path / "01"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"streaming": {"count": 7}, "attention": {"layer": 3},
                                                  "tokens": {"old": True}}), encoding="utf-8")
    lesson.main(["--part", "tokens", "--out-dir", str(out)])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["streaming"] == {"count": 7} and results["attention"] == {"layer": 3}  # kept
    assert results["tokens"]["vocab_size"] == local_fp32.tokenizer.n_vocab and "old" not in results["tokens"]
    assert results["parts"] == ["tokens"]
    assert "第 4 部分" in capsys.readouterr().out
    # the rerun part records the arguments it ran with; the kept parts keep theirs (none here)
    assert results["tokens"]["run_args"]["parts"] == ["tokens"] and results["tokens"]["run_args"]["prompt"]
    assert "run_args" not in results["streaming"]


def test_prompt_label_follows_the_prompt_language_and_the_model():
    assert lesson.has_cjk("什么是大语言模型？") and lesson.has_cjk("Explain 模型") and not lesson.has_cjk("Explain LLMs.")
    assert not lesson.has_cjk("こんにちは") and not lesson.has_cjk("ＯＫ！")   # kana, full-width Latin: not 汉字
    assert lesson.prompt_label("Explain LLMs.", "只懂英文") == "提问（英文）"
    assert lesson.prompt_label("Explain LLMs.", "中文和英文") == "提问（英文）"
    assert lesson.prompt_label("什么是大语言模型？", "中文和英文") == "提问（中文）"
    label = lesson.prompt_label("什么是大语言模型？", "只懂英文")
    assert label.startswith("提问（中文") and "只懂英文" in label


def test_languages_sentence_is_a_whole_sentence():
    assert lesson.languages_sentence("只懂英文") == "它只懂英文。"
    assert lesson.languages_sentence("中文和英文") == "它懂中文和英文。"
    from common.model_files import LOCAL_MODELS
    for info in LOCAL_MODELS.values():   # every model's sentence has a verb after 它
        assert lesson.languages_sentence(info.languages)[1] in "只懂能"


def test_part_2_labels_a_chinese_prompt_as_chinese(local_fp32, tmp_path, capsys):
    lesson.main(["--part", "steps", "--steps", "1", "--prompt", "什么是大语言模型？", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "提问（中文" in out and "提问（英文）" not in out


# ---------------------------------------------------------------------------
# The API path, against the local OpenAI-compatible test server
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_api_path_streams_from_server(tmp_path, script_env, run_script, restore_torch_globals):
    with run_server() as server:
        env = dict(script_env, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="test-key", OPENAI_MODEL=CHAT_MODEL)
        r = run_script(SCRIPT, "--quick", "--part", "1,5", env=env, timeout=300)    # in-process (tests/conftest.py)
        chat = [q for q in server.requests if q["path"].endswith("/chat/completions")]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(chat) == 1 and chat[0]["json"]["stream"] is True
    sent = chat[0]["json"]
    assert sent["messages"] == [{"role": "user", "content": lesson.DEFAULT_PROMPT}]
    assert sent["temperature"] == 0.7 and sent["top_p"] == 0.9 and sent["max_tokens"] == 40
    results = json.loads((tmp_path / "outputs" / "01_hello_llm" / "results.json").read_text(encoding="utf-8"))
    s = results["streaming"]
    assert s["backend"] == "openai" and s["count_unit"] == "chunks"
    assert s["text"] == echo_reply(sent["messages"], 40)
    assert s["n_pieces"] == s["count"] == len(reply_pieces(sent["messages"]))
    assert "在本地模型上运行" in r.stdout  # the logits/attention parts say where they run
    assert "attention" in results


# ---------------------------------------------------------------------------
# Bad flags: one Chinese line, exit 2, no traceback (tests/test_cli.py runs a few as subprocesses)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "-3"],
    ["--temperatures", "0,abc"], ["--temperatures", "0,-1"], ["--part", "7"], ["--part", "1,x"],
    ["--max-new-tokens", "0"], ["--steps", "0"], ["--prompt", "  "], ["--backend", "foo"],
    ["--temperature", "hot"], ["--no-such-flag"], ["--max-tokens", "5"],
])
def test_bad_flags_are_one_chinese_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        lesson.parse_args(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("错误：") and any("\u4e00" <= ch <= "\u9fff" for ch in err[0][3:])


def test_part_accepts_numbers_and_names():
    assert lesson.parse_args(["--part", "5,stream"]).parts == ["stream", "attention"]
    assert lesson.parse_args([]).parts == lesson.PARTS


def test_dtype_follows_the_environment(monkeypatch):
    monkeypatch.setenv("LLM_COURSE_DTYPE", "int8")   # the lesson used to ignore it
    assert lesson.parse_args([]).dtype == "int8"
    assert lesson.parse_args(["--dtype", "fp32"]).dtype == "fp32"
    monkeypatch.delenv("LLM_COURSE_DTYPE")
    a = lesson.parse_args(["--quick"])
    assert (a.dtype, a.max_new_tokens, a.steps) == ("fp32", 40, 3)


@pytest.mark.parametrize("argv", [["--layer", "30"], ["--layer", "-1"], ["--head", "9"], ["--head", "-2"]])
def test_layer_and_head_checked_against_the_model(argv, local_fp32):
    from common.errors import UserError
    args = lesson.parse_args(argv)  # the ranges are only known once the model is loaded
    with pytest.raises(UserError, match=argv[0]):
        lesson.check_model_args(args, local_fp32.config)
    lesson.check_model_args(lesson.parse_args([]), local_fp32.config)  # the defaults are valid


def test_layer_out_of_range_exits_cleanly(run_script, restore_torch_globals):
    r = run_script(SCRIPT, "--part", "5", "--layer", "99")     # in-process, through run_cli (tests/conftest.py)
    assert r.returncode == 2 and "--layer" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
