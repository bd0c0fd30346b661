"""Tests for common/lora.py and 05_lora.py.

* common/lora.py invariants on a tiny random Llama (fast, no model file): zero-init B gives the base
  outputs bit for bit, merge == unmerged within rounding, unmerge restores W bit for bit, adapters_disabled
  is exactly the base model, save/load round trip.
* The lesson's own pieces: answer-only loss against the full-logits cross-entropy, batched greedy scoring
  against per-prompt generation (real model, short inputs), the training cap, the sentences that interpret
  the LoRA-vs-full-FT timings, bad flags.
* Slow: the docs' `--quick` run end to end, and a run whose time cap cuts training short.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError, run_cli
from common.llama import Llama, LlamaConfig
from common.lora import TARGETS, adapters_disabled, inject_lora, load_adapter, lora_modules, save_adapter

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "05_lora.py"
L5 = importlib.import_module("05_lora")
ALL = list(TARGETS)


# ----------------------------------------------------------------------------- a tiny random Llama
TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Llama(TINY).eval()
    with torch.no_grad():                           # norms are ones at init: give them random values too
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))


def wrapped(base, targets=("q", "k", "v", "o"), rank=4, alpha=8.0, b_seed=None):
    """A deep copy of base with LoRA injected; b_seed: give B random values (B = 0 means no change yet)."""
    model = copy.deepcopy(base)
    inject_lora(model, list(targets), rank, alpha)
    if b_seed is not None:
        g = torch.Generator().manual_seed(b_seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.05)
    return model.eval()


def test_zero_init_b_gives_base_outputs_bitwise(tiny, tokens):
    model = wrapped(tiny, ALL)
    assert len(lora_modules(model)) == TINY.n_layers * len(ALL)
    assert all(m.A.abs().sum() > 0 and not m.B.any() for m in lora_modules(model).values())  # A random, B zero
    with torch.no_grad():
        assert torch.equal(model(tokens), tiny(tokens))


def test_merge_matches_unmerged_and_unmerge_restores_bitwise(tiny, tokens):
    model = wrapped(tiny, ALL, rank=4, alpha=8.0, b_seed=0)
    with torch.no_grad():
        unmerged = model(tokens)
        assert not torch.equal(unmerged, tiny(tokens))           # the adapter really changes the outputs
    merge = L5.check_merge(model, tokens, unmerged)              # the lesson's self-check merges every layer
    assert all(m.merged for m in lora_modules(model).values())
    assert merge["max_abs_logit_diff"] < merge["tolerance"] and merge["argmax_equal"]
    # an independent reference for the merged weight: W + (alpha/r)·B·A computed in float64
    for n, m in lora_modules(model).items():
        expect = tiny.get_submodule(n).weight.double() + (8.0 / 4) * (m.B.double() @ m.A.double())
        assert torch.allclose(m.base.weight.double(), expect, atol=1e-6), n
    unmerge = L5.check_unmerge(model, tiny)
    assert unmerge["unmerge_bitwise_restored"]
    assert not any(m.merged for m in lora_modules(model).values())
    for n, m in lora_modules(model).items():
        assert torch.equal(m.base.weight, tiny.get_submodule(n).weight), n
    with torch.no_grad():
        assert torch.equal(model(tokens), unmerged)


def test_check_unmerge_notices_a_changed_weight(tiny, tokens):
    """The self-check can fail: if W was changed behind the adapter's back, unmerge does not restore the base."""
    model = wrapped(tiny, ("q",), b_seed=0)
    with torch.no_grad():
        L5.check_merge(model, tokens, model(tokens))
        m = next(iter(lora_modules(model).values()))
        m._saved_weight[0, 0] += 1.0
    assert not L5.check_unmerge(model, tiny)["unmerge_bitwise_restored"]


def test_adapters_disabled_is_the_base_model_bitwise(tiny, tokens):
    model = wrapped(tiny, ALL, b_seed=2)
    with torch.no_grad():
        adapted = model(tokens)
        with adapters_disabled(model):
            assert torch.equal(model(tokens), tiny(tokens))
        assert torch.equal(model(tokens), adapted)               # switched back on afterwards
        for m in lora_modules(model).values():
            m.merge()
    with pytest.raises(RuntimeError):                             # merged adapters cannot be switched off
        with adapters_disabled(model):
            pass


def test_adapter_save_load_round_trip(tiny, tokens, tmp_path):
    model = wrapped(tiny, ("q", "v"), rank=4, alpha=8.0, b_seed=1)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]})
    fresh = wrapped(tiny, ("q", "v"), rank=4, alpha=8.0)          # other random A, zero B
    assert load_adapter(fresh, path) == {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]}
    for (n1, m1), (n2, m2) in zip(lora_modules(model).items(), lora_modules(fresh).items()):
        assert n1 == n2 and torch.equal(m1.A, m2.A) and torch.equal(m1.B, m2.B)
    with torch.no_grad():
        ok, _ = L5.check_reload_equal(fresh, tokens, model(tokens))
    assert ok
    with pytest.raises(UserError):
        load_adapter(wrapped(tiny, ("q", "v"), rank=2), path)     # other rank
    with pytest.raises(UserError):
        load_adapter(wrapped(tiny, ("q", "k", "v"), rank=4), path)  # other targets


def test_param_count_is_r_times_in_plus_out(tiny):
    for targets, rank in [(("q", "v"), 8), (ALL, 2)]:
        model = wrapped(tiny, targets, rank)
        mods = lora_modules(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == sum(rank * sum(m.base.weight.shape) for m in mods.values())  # shapes from the weights
        rep = L5.param_report(model, list(targets))
        assert rep["trainable"] == trainable
        assert rep["total"] == sum(p.numel() for p in tiny.parameters()) + trainable
        ar = L5.lora_arithmetic(TINY.n_layers, TINY.dim, TINY.n_kv_heads * TINY.head_dim, TINY.ffn_dim,
                                TINY.vocab_size, True, list(targets), rank)
        assert ar["lora_params"] == trainable
        assert ar["total_params"] == sum(p.numel() for p in tiny.parameters())


def tiny_examples(n=12, prompt=10, answer=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, TINY.vocab_size, (prompt + answer,), generator=g).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def test_only_lora_params_get_gradients(tiny):
    model = wrapped(tiny).train()
    ids, labels = L5.collate(tiny_examples(3), 0)
    L5.answer_loss(model, ids, labels).backward()
    lora_ids = {id(p) for m in lora_modules(model).values() for p in (m.A, m.B)}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in lora_ids) == p.requires_grad, name
    # with B = 0 the gradient reaches B; A's is exactly zero (dL/dA is proportional to B)
    assert all(m.B.grad.abs().sum() > 0 and not m.A.grad.any() for m in lora_modules(model).values())


def test_training_runs_the_planned_steps_and_the_cap_cuts_and_says_so(tiny):
    data = tiny_examples()
    model = wrapped(tiny).train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = L5.heldout_loss(model, data)
    full = L5.train(model, params, data, steps=5, lr=1e-2, batch_size=4, seed=0, desc="t")
    assert full["steps"] == full["planned_steps"] == 5 and not full["cut_by_time_budget"]
    assert full["trainable_params"] == sum(p.numel() for p in params) and full["train_seconds"] > 0
    assert L5.cap_warning(full) == ""
    assert L5.heldout_loss(model, data) < before                  # it learns (loss on the same examples)
    model = wrapped(tiny).train()
    params = [p for p in model.parameters() if p.requires_grad]
    cut = L5.train(model, params, data, steps=5, lr=1e-2, batch_size=4, seed=0, cap_s=0.0, desc="t")
    assert cut["steps"] == 1 and cut["planned_steps"] == 5 and cut["cut_by_time_budget"]
    assert cut["losses"][0] == full["losses"][0]                  # same batches, same first step
    text = L5.cap_warning(cut)
    assert "1/5" in text and "--time-budget" in text and "不能用来评价" in text


def side(lora_wall, full_wall, lora_cpu, full_cpu):
    mem = {"trainable_mb": 1.0, "optimizer_state_mb": 2.0, "activations_mb": 10.0, "total_mb": 100.0}
    full_mem = {"trainable_mb": 500.0, "optimizer_state_mb": 1000.0, "activations_mb": 14.0, "total_mb": 330.0}
    return ({"step_time": lora_wall, "step_cpu_time": lora_cpu, **mem},
            {"step_time": full_wall, "step_cpu_time": full_cpu, **full_mem})


def test_timing_sentences_follow_the_numbers():
    slower = L5.timing_sentences(*side(2.0, 3.2, 2.0, 3.0), steps=4, n_layers=30)
    assert len(slower) == 1 and "符合预期" in slower[0] and "1.60" in slower[0] and "30 层" in slower[0]
    inverted = L5.timing_sentences(*side(3.0, 2.0, 3.0, 2.5), steps=4, n_layers=30)
    assert "与预期相反" in inverted[0] and "0.67" in inverted[0] and "符合预期" not in " ".join(inverted)
    unclear = L5.timing_sentences(*side(2.0, 2.1, 2.0, 1.9), steps=2, n_layers=30)
    assert "看不出谁快" in unclear[0] and "符合预期" not in " ".join(unclear)
    noisy = L5.timing_sentences(*side(5.0, 13.5, 4.6, 6.7), steps=2, n_layers=30)   # the baseline's busy run
    assert "符合预期" in noisy[0] and len(noisy) == 2 and "CPU 时间更可信" in noisy[1]
    wall_inverted = L5.timing_sentences(*side(42.5, 36.1, 4.86, 8.15), steps=2, n_layers=30)  # a busy-machine run
    assert "按 CPU 时间判断" in wall_inverted[0] and "符合预期" in wall_inverted[0] and "0.85" in wall_inverted[0]
    assert "CPU 时间更可信" in wall_inverted[1]
    assert "500 倍" in L5.memory_sentence(*side(1, 1, 1, 1)) and "3.3 倍" in L5.memory_sentence(*side(1, 1, 1, 1))


def test_a_failed_self_check_is_one_chinese_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: L5.require(False, "合并后输出不同。"))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["错误：自检失败：合并后输出不同。"]


# ----------------------------------------------------------------------------- the lesson's data path
@pytest.fixture(scope="module")
def wide():
    """A tiny random Llama with the real vocabulary: the real tokenizer's ids fit, forward passes are cheap."""
    torch.manual_seed(3)
    return Llama(LlamaConfig(vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                             max_seq_len=256)).eval()


def test_answer_loss_matches_full_logits_reference(wide, tokenizer):
    """The answer-only lm_head shortcut gives the same loss as cross-entropy on the model's full logits."""
    rows = L5.load_examples(REPO / "data" / "lora" / "train.json")[:3]
    data = [L5.encode_example(tokenizer, r) for r in rows]
    for ex, (ids, labels) in zip(rows, data):
        n_prompt = len(L5.prompt_ids(tokenizer, ex))
        assert labels[:n_prompt] == [-100] * n_prompt                               # the prompt is masked
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.im_end  # the answer (and its end) is learned
        assert tokenizer.decode(ids[n_prompt:-1]) == ex["output"]
    ids, labels = L5.collate(data, 0)
    with torch.no_grad():
        ours = L5.answer_loss(wide, ids, labels)
        logits = wide(ids)
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_score_batches_prompts_of_different_lengths_like_one_at_a_time(wide, tokenizer, monkeypatch, capsys):
    from common.generate import generate
    rows = L5.load_examples(REPO / "data" / "lora" / "eval.json")
    rows = [rows[0], rows[1], {**rows[2], "input": rows[2]["input"] + " Thanks a lot for your help today."}]
    prompts = [L5.prompt_ids(tokenizer, r) for r in rows]
    assert len({len(p) for p in prompts}) > 1                                   # really different lengths
    monkeypatch.setattr(L5, "EVAL_BATCH", 2)                                    # two batches: 2 + 1 prompts
    res = L5.score(wide, tokenizer, rows, 6, "t")
    alone = [tokenizer.decode(list(generate(wide, p, 6, stop_ids=tokenizer.eos_ids))).strip() for p in prompts]
    assert res["outputs"] == alone
    assert res["format_ok"] == 0 and res["n"] == 3                              # a random model gets nothing right
    assert "[t] 意图准确率 0.0%｜格式正确 0.0%" in capsys.readouterr().out


def test_an_invented_intent_is_not_format_correct():
    intents = L5.intent_set(L5.load_examples(REPO / "data" / "lora" / "train.json"))
    assert "refund" in intents and "excuse_intent" not in intents
    golds = ["intent: refund | order: 123", "intent: refund | order: none", "intent: complaint | order: none"]
    gens = ["intent: refund | order: 123", "intent: excuse_intent | order: none", "refund please"]
    res = L5.grade(golds, gens, intents)
    assert res["format_ok"] == pytest.approx(1 / 3)              # only the first: the second made its intent up
    assert res["invented_intent"] == pytest.approx(1 / 3) and res["invented_intents"] == ["excuse_intent"]
    assert res["exact_match"] == pytest.approx(1 / 3) and res["intent_accuracy"] == pytest.approx(1 / 3)


def column_ends(text: str) -> list[list[int]]:
    """For each line, the terminal column where each cell ends (cells are separated by 2+ spaces)."""
    import re

    from common.display import width
    ends = []
    for line in text.splitlines():
        ends.append([width(line[:m.end()]) for m in re.finditer(r"\S+(?: \S+)*", line)])
    return ends


def test_lora_vs_full_table_lines_up_in_a_chinese_terminal():
    rows = [("每步墙钟时间（中位数，秒）", "step_time"), ("可训练参数 (MB)", "trainable_mb"), ("梯度 (MB)", "grads_mb")]
    lv = {"step_time": 0.5, "trainable_mb": 1.25, "grads_mb": 1.25}
    fv = {"step_time": 1.5, "trainable_mb": 500.0, "grads_mb": 500.0}
    ends = column_ends(L5.compare_table(rows, lv, fv))
    assert len(ends) == 4
    numbers = [e[-3:] for e in ends]                          # the three right-aligned number columns
    assert all(e == numbers[0] for e in numbers), L5.compare_table(rows, lv, fv)


def test_param_table_lines_up(local_fp32):
    a = L5.parse_args([])
    text = L5.param_table(L5.param_report(wrapped(local_fp32.model, a.targets, a.rank, a.alpha), a.targets))
    ends = [e[1:] for e in column_ends(text)]                   # every column after the module name, right-aligned
    assert len(ends) == 5 and all(e == ends[0] for e in ends), text


def test_a_two_step_comparison_is_not_plotted(tmp_path):
    from PIL import Image
    main_run = {"losses": [3.0, 2.5, 2.0, 1.8], "warmup_steps": 1}
    side = {"lora": {"losses": [3.0, 3.1], "warmup_steps": 1}, "full": {"losses": [3.0, 3.0], "warmup_steps": 1}}
    png, note = L5.plot_losses(main_run, side, tmp_path / "two.png")
    assert "2 步" in note and "不画对比" in note
    long = {k: {"losses": [3.0, 2.9, 2.8, 2.7, 2.6], "warmup_steps": 1} for k in ("lora", "full")}
    png5, note5 = L5.plot_losses(main_run, long, tmp_path / "five.png")
    assert note5 == ""
    assert Image.open(png).size[0] < Image.open(png5).size[0]  # one panel vs two


def test_default_config_trains_under_one_percent(local_fp32):
    a = L5.parse_args([])
    assert (a.steps, a.batch_size, a.full_ft, a.targets) == (80, 8, 4, ["q", "k", "v", "o"])
    model = wrapped(local_fp32.model, a.targets, a.rank, a.alpha)
    assert L5.param_report(model, a.targets)["trainable_pct"] < 1.0


def test_dataset_files_and_generator_are_consistent(tmp_path, data_generator):
    d = REPO / "data" / "lora"
    train, ev = json.loads((d / "train.json").read_text("utf-8")), json.loads((d / "eval.json").read_text("utf-8"))
    assert len(train) >= 200 and len(ev) >= 50
    for r in train + ev:
        assert set(r) == {"instruction", "input", "output"}
        assert L5.ANSWER_RE.match(r["output"])
    assert not {r["input"] for r in train} & {r["input"] for r in ev}       # held-out messages are unseen
    # the committed JSON is exactly what the deterministic generator writes
    data_generator(d).main()
    for name in ("train.json", "eval.json"):
        assert (tmp_path / name).read_bytes() == (d / name).read_bytes()


@pytest.mark.parametrize("args", [["--rank", "0"], ["--targets", "q,foo"], ["--lr", "-1"], ["--dropout", "1.5"],
                                  ["--max-len", "4"], ["--eval-n", "-2"], ["--eval-data", "/no/such.json"]])
def test_bad_flags_are_one_chinese_line(args, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: L5.main(args))                  # fails while parsing, before the model is loaded
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("错误："), lines


def test_bad_data_file_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x"}]', encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: L5.main(["--data", str(bad)]))  # checked before the model is loaded
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("错误：") and "instruction" in lines[0], lines


# ----------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_quick_run_end_to_end(lesson_runs):
    """Exactly the docs' quick command (the run is shared with tests/test_docs.py)."""
    r = lesson_runs.run("05_lora.py", "--quick", timeout=900)
    assert r.returncode == 0, r.explain()
    res = r.results("05_lora")
    out = r.out_root / "05_lora"
    assert res["params"]["trainable_pct"] < 1
    assert res["heldout_loss"]["after"] < res["heldout_loss"]["before"]
    assert res["merge"]["max_abs_logit_diff"] < res["merge"]["tolerance"] and res["merge"]["argmax_equal"]
    assert res["merge"]["unmerge_bitwise_restored"] and res["adapter"]["reload_bitwise_equal"]
    run = res["lora_train"]
    assert run["planned_steps"] == 8 and (run["steps"] == 8) != res["training_cut_short"]
    assert ("训练被时间上限截断" in r.stdout) == res["training_cut_short"]
    cmp = res["comparison"]
    assert cmp["full"]["optimizer_state_mb"] > 50 * cmp["lora"]["optimizer_state_mb"]
    assert cmp["lora"]["trainable_mb"] * 2**20 == 4 * res["params"]["trainable"]        # fp32 A and B
    assert cmp["lora"]["warmup_steps"] == cmp["full"]["warmup_steps"]                    # like with like
    assert all(s in r.stdout for s in cmp["interpretation"])
    assert (out / "loss_curve.png").is_file() and (out / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_a_tiny_time_cap_is_reported_loudly(script_env, run_script, restore_torch_globals):
    r = run_script(SCRIPT.name, "--quick", "--time-budget", "0.0001", "--eval-n", "2", "--full-ft", "0",
                   timeout=900)                      # in-process (tests/conftest.py): no new interpreter importing torch
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((Path(script_env["LLM_COURSE_OUTPUTS"]) / "05_lora" / "results.json").read_text("utf-8"))
    assert res["training_cut_short"] and res["lora_train"]["cut_by_time_budget"]
    assert res["lora_train"]["steps"] == 1 and res["lora_train"]["planned_steps"] == 8
    assert "⚠ 训练被时间上限截断：只跑了 1/8 步" in r.stdout
    assert r.stdout.count("训练被时间上限截断") == 2                  # after training and again in the summary
