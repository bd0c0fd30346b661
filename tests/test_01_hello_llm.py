"""Lesson 01 (01_hello_llm.py): the quick run end to end, the numbers it prints, and bad flags.

References used by the assertions:
  * temperature table: numpy float64 softmax / entropy / top-p cut computed here from the same logits;
  * part 2 (step by step, no KV cache): LocalModel.generate (KV cache) greedy ids;
  * attention: the logits of the return_attn=True path equal the fused SDPA path (so the returned
    weights are the ones the model actually used), plus causality and rows summing to 1;
  * API path: tests/openai_test_server.py's deterministic echo reply, and the request it recorded.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "01_hello_llm.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.openai_test_server import CHAT_MODEL, echo_reply, reply_pieces, run_server  # noqa: E402


# the file name starts with a digit, so a plain `import` statement cannot name it
lesson = importlib.import_module("01_hello_llm")


def _env(outputs: Path, **extra) -> dict:
    env = dict(os.environ)
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "LLM_BACKEND"):
        env[k] = ""  # empty, not absent: a developer's .env must not fill them in
    env.update(LLM_COURSE_OUTPUTS=str(outputs), PYTHONUNBUFFERED="1", MPLBACKEND="Agg", **extra)
    return env


def _run(args, env, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout)


# ---------------------------------------------------------------------------
# The quick run, offline, no key (run once for the module)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    empty_tiktoken_cache = tmp_path_factory.mktemp("tiktoken")
    t0 = time.perf_counter()
    r = _run(["--quick"], _env(out, TIKTOKEN_CACHE_DIR=str(empty_tiktoken_cache)))
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = json.loads((out / "01_hello_llm" / "results.json").read_text(encoding="utf-8"))
    return r, results, out, elapsed


def test_quick_run_shows_every_part(quick_run):
    r, results, out, elapsed = quick_run
    print(f"quick run took {elapsed:.1f} s")  # informative only; timings are never asserted
    for n in range(1, 6):
        assert f"第 {n} 部分" in r.stdout
    assert "Traceback" not in r.stderr
    assert results["parts"] == [1, 2, 3, 4, 5]
    # no OpenAI encoding is cached in the empty TIKTOKEN_CACHE_DIR: the part says so instead of downloading
    assert results["tokens"]["openai_encodings"] == []
    assert "跳过对照" in r.stdout


def test_quick_run_streaming_numbers(quick_run):
    _, results, _, _ = quick_run
    s = results["streaming"]
    assert s["backend"] == "local" and s["count_unit"] == "tokens"
    assert s["text"].strip() and 1 <= s["count"] <= 40  # --quick generates at most 40 tokens
    assert s["n_pieces"] <= s["count"]  # a piece is one token or, for a split UTF-8 char, several
    assert 0 < s["ttft_s"] <= s["total_s"]
    assert s["per_s"] > 0


def test_quick_run_temperature_and_steps(quick_run):
    _, results, _, _ = quick_run
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


def test_quick_run_attention_and_png(quick_run):
    r, results, out, _ = quick_run
    a = results["attention"]
    m = np.array(a["matrix"])
    assert m.shape == (len(a["tokens"]),) * 2
    assert np.allclose(m.sum(1), 1.0, atol=1e-5)
    assert np.all(np.triu(m, k=1) == 0.0)  # causal: nothing above the diagonal
    assert a["tokens"][a["focus_index"]].strip() == "it"
    png = Path(a["png"])
    assert png.parent == out / "01_hello_llm"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(ch in r.stdout for ch in "▒▓█")  # the terminal heatmap


def test_quick_run_token_counts(quick_run):
    _, results, _, _ = quick_run
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


def test_step_by_step_greedy_matches_generate(local_fp32, prompt_logits, capsys):
    ids, logits = prompt_logits
    args = lesson.parse_args(["--temperature", "0", "--steps", "4", "--backend", "local"])
    steps, first_logits = lesson.part_steps(local_fp32, args, ids)
    ref = list(local_fp32.generate(ids, len(steps), temperature=0.0, stop_ids=set()))
    assert [s["chosen_id"] for s in steps] == ref  # no-cache loop == KV-cache generate
    assert torch.equal(first_logits, logits)
    assert "第 2 部分" in capsys.readouterr().out


@pytest.mark.parametrize("layer", [0, 13, 29])
def test_attention_is_causal_rows_sum_to_one(local_fp32, layer):
    ids = local_fp32.tokenizer.encode(lesson.DEFAULT_SENTENCE)
    heads = lesson.attention_heads(local_fp32, ids, layer)
    cfg = local_fp32.config
    assert heads.shape == (cfg.n_heads, len(ids), len(ids))
    assert torch.all(heads >= 0)
    assert torch.all(torch.triu(heads, diagonal=1) == 0)
    torch.testing.assert_close(heads.sum(-1), torch.ones(cfg.n_heads, len(ids)), atol=1e-5, rtol=0)


def test_attention_weights_are_the_ones_the_model_uses(local_fp32):
    ids = torch.tensor([local_fp32.tokenizer.encode(lesson.DEFAULT_SENTENCE)])
    with torch.inference_mode():
        fused = local_fp32.model(ids)                                  # scaled_dot_product_attention
        explicit, attn = local_fp32.model(ids, return_attn=True)       # softmax(QK^T/sqrt(d)) @ V
    assert len(attn) == local_fp32.config.n_layers
    torch.testing.assert_close(explicit, fused, atol=2e-3, rtol=1e-4)


def test_openai_encoding_is_skipped_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    t0 = time.perf_counter()
    assert lesson.openai_encoding("o200k_base", force=False) is None
    assert time.perf_counter() - t0 < 1.0  # it only looked for a file; no download was attempted


# ---------------------------------------------------------------------------
# The API path, against the local OpenAI-compatible test server
# ---------------------------------------------------------------------------


def test_api_path_streams_from_server(tmp_path):
    with run_server() as server:
        env = _env(tmp_path / "outputs", OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="test-key",
                   OPENAI_MODEL=CHAT_MODEL)
        r = _run(["--quick", "--part", "1,5"], env)
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
# Bad flags: one Chinese line, non-zero exit, no traceback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "-3"],
    ["--temperatures", "0,abc"], ["--temperatures", "0,-1"], ["--part", "7"], ["--part", "1,x"],
    ["--max-tokens", "0"], ["--steps", "0"], ["--prompt", "  "],
])
def test_bad_values_raise_user_error(argv):
    from common.errors import UserError
    with pytest.raises(UserError) as e:
        lesson.parse_args(argv)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in str(e.value))  # Chinese explanation


@pytest.mark.parametrize("argv", [["--backend", "foo"], ["--temperature", "hot"], ["--no-such-flag"]])
def test_argparse_errors_are_chinese(argv, capsys):
    with pytest.raises(SystemExit) as e:
        lesson.parse_args(argv)
    assert e.value.code == 2
    assert "错误：参数有误" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--layer", "30"], ["--layer", "-1"], ["--head", "9"], ["--head", "-2"]])
def test_layer_and_head_checked_against_the_model(argv, local_fp32):
    from common.errors import UserError
    args = lesson.parse_args(argv)  # the ranges are only known once the model is loaded
    with pytest.raises(UserError, match=argv[0]):
        lesson.check_model_args(args, local_fp32.config)
    lesson.check_model_args(lesson.parse_args([]), local_fp32.config)  # the defaults are valid


@pytest.mark.parametrize("argv, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--backend", "foo"], "--backend"),
    (["--part", "5", "--layer", "99"], "--layer"),
])
def test_bad_flags_exit_cleanly(argv, needle, tmp_path):
    r = _run(argv, _env(tmp_path / "outputs"), timeout=120)
    assert r.returncode != 0
    assert "错误" in r.stderr and needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
