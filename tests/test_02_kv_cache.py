"""Tests for lesson 02 (KV cache): the numpy toy against an explicit per-position reference, MAC counts
against closed forms, the lesson's self-checks, the sentences that interpret measurements (rising and
falling cases), --part reruns, bad flags, and the docs' ``--quick`` run (shared with tests/test_docs.py).

The model-level facts (cached forward == full forward, generate with/without cache, KV bytes) are
tests/test_kv_cache.py's; they are not repeated here. No test asserts a timing.
"""
from __future__ import annotations

import importlib
import json
import re

import numpy as np
import pytest

from common.errors import UserError

SCRIPT = "02_understand_kv_cache.py"
lesson = importlib.import_module("02_understand_kv_cache")


def _toy_reference(w, n):
    """Independent reference: recompute every step with an explicit per-position loop (no matrix tricks)."""
    d = w["x0"].shape[0]
    xs, outs = [w["x0"]], []
    for _ in range(n):
        t = len(xs) - 1
        q = xs[t] @ w["q"]
        ks = [x @ w["k"] for x in xs]
        vs = [x @ w["v"] for x in xs]
        s = np.array([q @ k for k in ks]) / np.sqrt(d)
        p = np.exp(s - s.max())
        p /= p.sum()
        y = sum(pi * vi for pi, vi in zip(p, vs)) @ w["o"]
        outs.append(y)
        xs.append(np.tanh(y))
    return np.stack(outs)


def test_toy_cached_equals_uncached_and_reference():
    w = lesson.toy_weights(16, seed=3)
    a = lesson.toy_generate_no_cache(w, 20)
    b = lesson.toy_generate_cached(w, 20)
    ref = _toy_reference(w, 20)
    assert a.shape == b.shape == (20, 16)
    np.testing.assert_allclose(a, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b, ref, rtol=1e-10, atol=1e-12)
    # the outputs really depend on the weights (a broken loop returning constants would fail here)
    assert not np.allclose(b, lesson.toy_generate_cached(lesson.toy_weights(16, seed=4), 20))


def test_toy_mac_counts():
    # closed forms of the sums over L = 1..n (independent of the lesson's loop)
    for n, d in ((1, 8), (37, 16), (128, 32)):
        no_cache = 4 * d * d * n * (n + 1) // 2 + 2 * d * n * (n + 1) * (2 * n + 1) // 6
        cached = 4 * d * d * n + d * n * (n + 1)
        assert lesson.toy_macs(n, d) == (no_cache, cached)


# ---------------------------------------------------------------------------- self-checks
def test_self_checks_fail_with_a_chinese_line():
    a = np.zeros((3, 2))
    assert lesson.check_toy_same(a, a + 1e-12) < 1e-9
    with pytest.raises(UserError, match="自检失败"):
        lesson.check_toy_same(a, a + 1e-3)
    assert lesson.check_same_tokens([1, 2, 3], [1, 2, 3], "fp32") is None
    assert lesson.check_same_tokens([1, 2, 3], [1, 5, 3], "int8") == 1   # int8 may diverge: reported
    with pytest.raises(UserError, match="第 1 个"):
        lesson.check_same_tokens([1, 2, 3], [1, 5, 3], "fp32")
    lesson.check_kv_formula(46080, 46080.0)
    with pytest.raises(UserError, match="不一致"):
        lesson.check_kv_formula(46080, 46000.0)


def test_greedy_timed_gives_exactly_n_tokens_with_and_without_cache(local_fp32):
    # a question the model answers in a few words: with the usual stop ids it would end early ("Yes.<|im_end|>",
    # 3 tokens); 6 goes past that (each step without the cache is a full forward over the prompt: ~150 ms on 2 cores)
    prompt = local_fp32.tokenizer.apply_chat_template([{"role": "user", "content": "Reply with one word: yes or no?"}])
    tok_c, t_c = lesson.greedy_timed(local_fp32, prompt, 6, True, "cached")
    tok_n, t_n = lesson.greedy_timed(local_fp32, prompt, 6, False, "no cache")
    assert len(tok_c) == len(t_c) == len(tok_n) == len(t_n) == 6   # one timing per step
    assert lesson.check_same_tokens(tok_c, tok_n, "fp32") is None


# ---------------------------------------------------------------------------- sentences follow the numbers
def test_trend():
    assert lesson.trend([2.4, 2.9, 3.2]) == "rising"
    assert lesson.trend([10.4, 10.6, 6.7, 4.6]) == "falling"    # the busy-machine run
    assert lesson.trend([3.0, 6.0, 4.0]) == "mixed"
    assert lesson.trend([5.0, 5.1, 4.95]) == "flat"
    assert lesson.trend([3.01, 3.28, 3.34]) == "rising"         # small steps, but up 11 % end to end


def test_speedup_sentence_rising_and_falling():
    rising = lesson.speedup_sentence([32, 64, 128], [3.0, 4.2, 7.1])
    assert "上升" in rising and "3.0×" in rising and "7.1×" in rising and "相反" not in rising
    falling = lesson.speedup_sentence([32, 128, 256], [10.6, 6.7, 4.6])
    assert "下降" in falling and "相反" in falling and "重跑" in falling and "10.6×" in falling
    assert "下降" in lesson.speedup_sentence([32, 64, 128, 256], [10.4, 10.6, 6.7, 4.6])   # the run
    assert "忽高忽低" in lesson.speedup_sentence([32, 64, 128], [3.0, 6.0, 4.0])
    assert "几乎不随长度变化" in lesson.speedup_sentence([8, 16], [3.0, 3.1])
    assert "看不出趋势" in lesson.speedup_sentence([24], [3.0])


def _toy_rows(speedups, mac_ratios, n=(16, 32, 64, 128), d=64):
    rows = []
    for k, s, m in zip(n, speedups, mac_ratios):
        m_nc, m_c = lesson.toy_macs(k, d)
        rows.append({"n": k, "speedup": s, "mac_ratio": m, "macs_no_cache": m_nc, "macs_cached": m_c,
                     "gmacs_no_cache": 3.9, "gmacs_cached": 0.9})
    return rows


def test_toy_sentences_say_which_is_bigger():
    below = lesson.toy_sentences(_toy_rows([2.9, 3.7, 8.4, 16.0], [8.7, 17.1, 34.6, 71.6]))
    assert "随 n 上升" in below[1] and "都小于 MAC 比" in below[2]
    assert "涨了 93 倍" in below[0]   # (sum over L<=128) / (sum over L<=16) of 4·L·d² + 2·L²·d, d=64
    # the busy run: n=64 measured 42.4x against a MAC ratio of 33.1x
    above = lesson.toy_sentences(_toy_rows([3.0, 9.0, 42.4, 30.0], [8.7, 17.1, 33.1, 71.6]))
    assert "n=64 时实测反而大于 MAC 比" in above[2] and "都小于" not in " ".join(above)
    assert "没有随 n 稳定上升" in above[1]


def test_profile_sentence_names_the_biggest_op():
    mm = [{"op": "aten::mm", "share": 0.8}]
    both_mm = lesson.profile_sentence(mm, [{"op": "aten::mm", "share": 0.85}])
    assert "两边的大头都是矩阵乘" in both_mm and "80%" in both_mm
    sdpa = lesson.profile_sentence([{"op": "aten::_scaled_dot_product_flash_attention_for_cpu", "share": 0.78}], mm)
    assert "两边的大头都是矩阵乘" not in sdpa and "注意力（SDPA）" in sdpa and "78%" in sdpa and "和预期" in sdpa
    assert "两边的大头都是矩阵乘" in lesson.profile_sentence([{"op": "quantized::linear_dynamic", "share": 0.5}], mm)


def test_efficiency_sentence_and_timing_warnings():
    assert "1/11.4" in lesson.efficiency_sentence(0.99, 11.28, 513, 3.9)
    assert "不符" in lesson.efficiency_sentence(5.0, 4.0, 513, 3.9)
    assert lesson.busy_reason(4.40869140625, 2) == "开始时 1 分钟平均负载 4.4 ≥ CPU 核数 2，机器很忙"
    assert lesson.busy_reason(1.2, 2) is None and lesson.busy_reason(None, 2) is None
    assert lesson.noise_reason([0.06] * 20) is None
    assert "相差" in lesson.noise_reason([0.06] * 10 + [0.3] * 10)
    notes = []
    lesson.note_timing(notes, "A")
    lesson.note_timing(notes, None)
    lesson.note_timing(notes, "B")
    assert notes == ["A", "B"]


def test_note_timing_warns_once(capsys):
    notes = []
    for reason in ("机器很忙", "噪声很大"):
        lesson.note_timing(notes, reason)
    assert capsys.readouterr().out.count("注意：") == 1


# ---------------------------------------------------------------------------- flags and reruns
@pytest.mark.parametrize("flags", [
    ["--max-new-tokens", "0"], ["--lengths", "a,b"], ["--max-new-tokens", "8", "--lengths", "16"],
    ["--dtype", "fp16"], ["--part", "nope"], ["--seq-len", "-3"], ["--new-tokens", "12"],
])
def test_bad_flags_are_one_chinese_line(flags, capsys):
    with pytest.raises(SystemExit) as e:
        lesson.parse_args(["--quick", *flags])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("错误：")


def test_part_accepts_numbers_and_names():
    assert lesson.parse_args(["--part", "3,toy"]).part == ["toy", "memory"]
    a = lesson.parse_args(["--quick"])
    assert (a.part, a.max_new_tokens, a.lengths) == (lesson.PARTS, 24, [8, 16])


def test_part_rerun_keeps_the_other_parts_results(local_fp32, tmp_path, capsys):
    out = tmp_path / "02"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"toy": {"kept": 1}, "real": {"kept": 2}}), encoding="utf-8")
    lesson.main(["--quick", "--part", "memory", "--out-dir", str(out)])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["toy"] == {"kept": 1} and results["real"] == {"kept": 2}
    assert results["memory"]["bytes_per_token_formula"] == results["memory"]["bytes_per_token_measured"]
    assert "第 3 部分" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the docs' quick run
@pytest.fixture(scope="module")
def quick_run(lesson_runs):
    r = lesson_runs.run(SCRIPT, "--quick")
    assert r.returncode == 0, r.explain()
    return r, r.results("02_understand_kv_cache")


@pytest.mark.slow
def test_quick_run_results_and_clean_output(quick_run):
    r, res = quick_run
    toy = res["toy"]
    assert toy["allclose"] is True and [row["n"] for row in toy["table"]] == [16, 32, 64, 128]
    ratios = [row["mac_ratio"] for row in toy["table"]]
    assert ratios == sorted(ratios) and ratios[0] > 1          # counted, not timed: grows with n
    real = res["real"]
    assert real["identical_tokens"] is True and real["dtype"] == "fp32"
    assert [row["new_tokens"] for row in real["table"]] == [8, 16, 24]
    assert len(real["step_seconds_cached"]) == len(real["step_seconds_no_cache"]) == 24
    assert real["profile"]["cached_step"] and real["profile"]["no_cache_step"]
    assert (r.out_root / "02_understand_kv_cache" / "time_per_token_fp32.png").stat().st_size > 1000
    mem = res["memory"]
    assert mem["bytes_per_token_formula"] == mem["bytes_per_token_measured"] == 2 * 30 * 3 * 64 * 4  # SmolLM2-135M
    assert {m["model"] for m in mem["published_models_fp16"]} >= {"Llama-2-7B (MHA)", "Llama-3-8B (GQA)"}
    # the profiler's kineto lines and tracebacks stay out of the lesson's output
    assert "USDT" not in r.stderr and "profiler_start" not in r.stderr and "Traceback" not in r.stderr
    # the hint names the lengths this run generated (24 tokens, first length 8), not the full run's 64
    assert "只生成一次最长的 24 个 token" in r.stdout and "生成前 8 个 token 的耗时，就是前 8 步之和" in r.stdout
    assert "64 个 token" not in r.stdout
    assert res["real"]["run_args"]["max_new_tokens"] == 24 and res["files"] == ["time_per_token_fp32.png"]


def test_tables_line_up_by_display_width():
    from common.display import width
    rows = [{"n": 16, "no_cache_s": 0.01, "cached_s": 0.001, "speedup": 10.0, "mac_ratio": 8.5, "gmacs_no_cache": 1.5,
             "gmacs_cached": 0.5}, {"n": 128, "no_cache_s": 1.2345, "cached_s": 0.01, "speedup": 123.4,
                                    "mac_ratio": 64.5, "gmacs_no_cache": 12.25, "gmacs_cached": 3.5}]
    lines = lesson.toy_table(rows).splitlines()
    bars = [[width(line[:i]) for i, c in enumerate(line) if c == "|"] for line in lines]
    assert len(lines) == 3 and all(b == bars[0] for b in bars), lesson.toy_table(rows)


def test_warm_up_runs_both_paths_before_timing(monkeypatch):
    calls = []
    monkeypatch.setattr(lesson, "greedy_timed", lambda lm, ids, n, use_cache, desc: calls.append((n, use_cache)))
    lesson.warm_up(object(), [1, 2, 3])
    assert calls == [(2, True), (2, False)]


@pytest.mark.slow
def test_quick_run_sentences_are_computed_from_its_numbers(quick_run):
    r, res = quick_run
    real, toy = res["real"], res["toy"]
    table = real["table"]
    assert lesson.speedup_sentence([t["new_tokens"] for t in table], [t["speedup"] for t in table]) in r.stdout
    assert lesson.profile_sentence(real["profile"]["cached_step"], real["profile"]["no_cache_step"]) in r.stdout
    for line in lesson.toy_sentences(toy["table"]):
        assert line in r.stdout
    # the load average is printed rounded, and the busy warning appears at most once
    assert re.search(r"开始时 1 分钟平均负载 (\d+\.\d|未知)）", r.stdout)
    assert r.stdout.count("计时会不可靠") == (1 if res["timing_warnings"] else 0)
