"""Tests for lesson 04 (tiny GPT). No network: every CLI run uses --data with a generated text file."""
from __future__ import annotations

import importlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "04_tiny_gpt.py"


tg = importlib.import_module("04_tiny_gpt")
from common import training  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.sampling import sampling_probs  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _restore(restore_torch_globals, no_torch_export):   # no real torch.export: no test here loads model.pt2
    yield


def small_gpt(vocab=50, block=16, seed=0):
    torch.manual_seed(seed)
    return tg.GPT(vocab_size=vocab, block_size=block, n_layer=2, n_head=4, n_embd=32).eval()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    # Mixed English/Chinese text with learnable structure (repeated lines in random order).
    rng = random.Random(0)
    lines = ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。", "ROMEO: But soft, what light?",
             "JULIET: O Romeo, Romeo!", "To be, or not to be."]
    text = "\n".join(rng.choice(lines) for _ in range(1500))
    p = tmp_path_factory.mktemp("data") / "tiny.txt"
    p.write_text(text, encoding="utf-8")
    return p


def test_causal_mask_future_tokens_do_not_change_past_logits():
    model = small_gpt()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    t = 9
    idx2 = idx.clone()
    idx2[:, t:] = (idx2[:, t:] + 7) % 50  # change position t and everything after it
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx2)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)       # past: unchanged
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3)   # the changed positions do see the change


def test_fused_attention_matches_handwritten_heads():
    # Independent reference: the lesson's one-head-at-a-time MultiHeadAttention (explicit mask + softmax).
    torch.manual_seed(0)
    C, H, T = 32, 4, 12
    ref = tg.MultiHeadAttention(C, H, block_size=T)
    fused = tg.CausalSelfAttention(C, H)
    with torch.no_grad():
        wq = torch.cat([h.query.weight for h in ref.heads])
        wk = torch.cat([h.key.weight for h in ref.heads])
        wv = torch.cat([h.value.weight for h in ref.heads])
        fused.qkv.weight.copy_(torch.cat([wq, wk, wv]))
        fused.proj.weight.copy_(ref.proj.weight)
        x = torch.randn(3, T, C)
        y_ref = ref(x)
        y_sdpa = fused(x)
        fused.use_sdpa = False
        y_manual = fused(x)
    assert torch.allclose(y_ref, y_sdpa, atol=1e-5)
    assert torch.allclose(y_ref, y_manual, atol=1e-5)


def test_initial_loss_is_about_ln_vocab():
    for vocab in (84, 500):
        model = small_gpt(vocab=vocab)
        idx = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(2))
        tgt = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            _, loss = model(idx, tgt)
        assert abs(loss.item() - math.log(vocab)) < 0.1


def test_loss_matches_manual_cross_entropy():
    model = small_gpt()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    tgt = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, loss = model(idx, tgt)
    manual = -torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).mean()
    assert torch.allclose(loss, manual, atol=1e-5)


def test_a_few_steps_on_a_fixed_batch_reduce_loss():
    model = small_gpt().train()
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(6))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_save_load_gives_identical_logits(tmp_path):
    model = small_gpt()
    tok = training.CharTokenizer.from_text("abc 你好")
    path = tmp_path / "m.pt"
    training.save_checkpoint(path, {"format": training.CKPT_FORMAT, "model_config": model.config,
                                    "model": model.state_dict(), "tokenizer": tok.state()})
    ck = training.load_checkpoint(path)
    model2 = tg.GPT(**ck["model_config"])
    model2.load_state_dict(ck["model"])
    model2.eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model2(idx)[0])
    assert training.tokenizer_from_state(ck["tokenizer"]).chars == tok.chars
    assert not path.with_name("m.pt.tmp").exists()  # atomic write leaves no temp file


def test_char_tokenizer_round_trip_including_chinese():
    text = "床前明月光，疑是地上霜。\nHello, World! 😀 tab\tend"
    tok = training.CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_corpus(text).tolist() == ids  # vectorised corpus encoder agrees with the simple one
    with pytest.raises(UserError):
        tok.encode("X")  # unseen character -> clear error


def test_top_k_1_equals_greedy_and_top_p_keeps_the_top_token():
    model = small_gpt()
    start = torch.tensor([[1, 2, 3]])
    greedy = tg.generate(model, start, 10, temperature=0)
    topk1 = tg.generate(model, start, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    tiny_p = tg.generate(model, start, 10, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, topk1) and torch.equal(greedy, tiny_p)
    assert greedy.shape == (1, 13)


def test_generate_samples_with_the_course_sampler():
    # Lesson 04 draws each token from common.sampling's distribution (the rule lesson 01 teaches):
    # replaying the same generator over sampling_probs of the model's logits gives the same tokens.
    model = small_gpt()
    start = torch.tensor([[4, 5]])
    out = tg.generate(model, start, 6, temperature=0.9, top_k=7, top_p=0.8, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    idx = start
    with torch.no_grad():
        for _ in range(6):
            probs = sampling_probs(model(idx)[0][0, -1], 0.9, 7, 0.8)
            assert (probs > 0).sum() <= 7
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g).view(1, 1)], dim=1)
    assert torch.equal(out, idx)


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--evals", "2", "--device", "cpu", "--lr", "1e-2",
        "--warmup-iters", "5"]


def _results(out_dir: Path, preset: str = "small") -> dict:
    return json.loads((out_dir / preset / "results.json").read_text(encoding="utf-8"))


def test_resume_reproduces_uninterrupted_run(tmp_path, text_file):
    full, part = tmp_path / "full", tmp_path / "part"
    tg.main(["--data", str(text_file), *TINY, "--max-iters", "40", "--out-dir", str(full)])
    r_full = _results(full)
    assert (full / "small" / "loss_curve.png").exists() and (full / "small" / "ckpt_best.pt").exists()
    assert r_full["final_val_loss"] < r_full["init_loss"] - 0.5  # learning happened
    assert r_full["resume_check_steps"] == 3                    # the built-in self-check ran and passed

    tg.main(["--data", str(text_file), *TINY, "--max-iters", "40", "--out-dir", str(part), "--stop-after", "15"])
    r_stop = _results(part)
    assert r_stop["iters"] == 15 and r_stop["stopped"] == "stop_after"
    tg.main(["--resume", "--out-dir", str(part)])
    r_res = _results(part)
    assert r_res["iters"] == 40
    assert r_res["train_loss_per_iter"] == r_full["train_loss_per_iter"]  # bit-identical loss curve
    res_val = dict(zip(r_res["evals"]["iter"], r_res["evals"]["val"]))  # (+ one extra eval where it stopped)
    assert [res_val[i] for i in r_full["evals"]["iter"]] == r_full["evals"]["val"]


def test_resume_self_check_fails_loudly_when_the_checkpoint_misses_state(tmp_path, text_file, monkeypatch):
    # The invariant can fail: a checkpoint without the optimizer's moments does not resume exactly.
    def forgetful_restore(ck, model, optimizer, batch_gen):
        state = original(ck, model, optimizer, batch_gen)
        optimizer.state.clear()                                  # "forgot" AdamW's moments
        return state

    original = training.restore
    monkeypatch.setattr(training, "restore", forgetful_restore)
    with pytest.raises(UserError, match="自检失败"):
        tg.main(["--data", str(text_file), *TINY, "--max-iters", "12", "--out-dir", str(tmp_path)])


def test_fresh_run_refuses_to_overwrite_a_previous_checkpoint(tmp_path, text_file):
    args = ["--data", str(text_file), *TINY, "--max-iters", "6", "--out-dir", str(tmp_path)]
    tg.main(args)
    ckpt = tmp_path / "small" / "ckpt_best.pt"
    before = ckpt.read_bytes()
    with pytest.raises(UserError, match="--resume") as e:
        tg.main([*args[:-4], "--max-iters", "3", "--out-dir", str(tmp_path)])
    assert "--overwrite" in str(e.value) and "\n" not in str(e.value)
    assert ckpt.read_bytes() == before                          # the old checkpoint is untouched
    tg.main([*args, "--overwrite", "--seed", "5"])             # explicit flag: proceeds and replaces it
    assert ckpt.read_bytes() != before and _results(tmp_path)["train_args"]["seed"] == 5
    tg.main(["--data", str(text_file), *TINY, "--max-iters", "3", "--out-dir", str(tmp_path), "--quick"])
    assert (tmp_path / "quick" / "ckpt_last.pt").exists()      # another preset: its own folder, no refusal


def test_overwrite_and_sample_only_replace_a_stale_export(tmp_path, text_file, monkeypatch):
    """Issue: after --overwrite with another model size the old model.pt2 stayed, lesson 06 failed, and the
    suggested --sample-only did not re-export. Now: --overwrite removes the old export, --sample-only re-exports a
    missing or stale one, and lesson 06's loader names that command. (export_model is faked: no real torch.export.)"""
    from common import exported

    exports = []

    def fake_export(model, path):
        exports.append(model.config["n_embd"])
        path.write_bytes(b"graph")
        path.with_name(training.EXPORT_META).write_text(json.dumps(model.config), encoding="utf-8")
        return path

    monkeypatch.setattr(training, "export_model", fake_export)
    run = tmp_path / "small"
    args = ["--data", str(text_file), *TINY, "--max-iters", "3", "--out-dir", str(tmp_path)]
    tg.main(args)
    ckpt = run / "ckpt_best.pt"
    assert exports == [32] and training.export_matches(run, training.load_checkpoint(ckpt)["model_config"])
    stale_meta = (run / training.EXPORT_META).read_text(encoding="utf-8")
    training.claim_run_folder(run, resume=False, overwrite=True, resume_hint="")   # what --overwrite does first
    assert not (run / training.EXPORT_NAME).exists() and not (run / training.EXPORT_META).exists()
    tg.main([*args, "--n-embd", "16", "--overwrite"])          # another model size: a fresh export of it
    assert exports == [32, 16]
    (run / training.EXPORT_META).write_text(stale_meta, encoding="utf-8")   # an export of the old model size
    with pytest.raises(UserError, match="--sample-only") as e:
        exported.load_tiny_gpt(ckpt)
    assert "重新导出" in str(e.value) and str(ckpt) in str(e.value)
    tg.main(["--sample-only", "--out-dir", str(tmp_path), "--max-new-tokens", "5"])   # the command it suggests
    assert exports == [32, 16, 16] and training.export_matches(run, training.load_checkpoint(ckpt)["model_config"])
    tg.main(["--sample-only", "--out-dir", str(tmp_path), "--max-new-tokens", "5"])
    assert exports == [32, 16, 16]                              # a current export is kept
    (run / training.EXPORT_NAME).unlink()
    with pytest.raises(UserError, match="导出它"):
        exported.load_tiny_gpt(ckpt)
    tg.main(["--sample-only", "--out-dir", str(tmp_path), "--max-new-tokens", "5"])
    assert exports == [32, 16, 16, 16]


@pytest.fixture()
def _cli(run_script):
    """`python 04_tiny_gpt.py <args>`, run in this process (tests/conftest.py run_script)."""
    return lambda *args: run_script(SCRIPT.name, *args)


def test_bad_flags_exit_nonzero_with_message(tmp_path, _cli):
    r = _cli("--n-embd", "30", "--n-head", "4", "--max-iters", "1")
    assert r.returncode == 2 and "整除" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_or_foreign_checkpoint_gives_clear_error(tmp_path, _cli):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    r = _cli("--sample-only", "--checkpoint", str(bad))
    assert r.returncode != 0 and "损坏" in r.stderr and "Traceback" not in r.stderr
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="不是本课"):
        training.load_checkpoint(foreign)
    with pytest.raises(UserError, match="找不到检查点"):
        training.load_checkpoint(tmp_path / "nope.pt")


def test_the_users_own_checkpoint_file_is_never_to_be_deleted(tmp_path, _cli):
    """--sample-only --checkpoint FILE / --resume FILE: FILE is the user's; the message says to check the path,
    never '请删除它'. The lesson's own ckpt in outputs/ may be deleted and retrained (with the preset's command)."""
    mine = tmp_path / "my_notes.txt"
    mine.write_text("my own file, not a checkpoint\n", encoding="utf-8")
    for argv in (("--sample-only", "--checkpoint", str(mine)), ("--resume", str(mine))):
        r = _cli(*argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "删除" not in r.stderr and "不会改动它" in r.stderr and str(mine) in r.stderr
    assert mine.read_text(encoding="utf-8") == "my own file, not a checkpoint\n"
    out = tmp_path / "out"
    (out / "small").mkdir(parents=True)
    (out / "small" / "ckpt_best.pt").write_bytes(b"garbage")
    r = _cli("--sample-only", "--out-dir", str(out))
    assert r.returncode == 2 and f"请删除它重新训练（python 04_tiny_gpt.py --preset small --out-dir {out} --overwrite）" in r.stderr


def test_resume_without_a_checkpoint_names_the_requested_preset(tmp_path, _cli):
    r = _cli("--resume", "--preset", "medium", "--out-dir", str(tmp_path))
    assert r.returncode == 2 and "找不到检查点" in r.stderr and "Traceback" not in r.stderr
    assert f"python 04_tiny_gpt.py --preset medium --out-dir {tmp_path}）" in r.stderr and "--quick" not in r.stderr
    r = _cli("--sample-only", "--preset", "medium", "--out-dir", str(tmp_path))
    assert r.returncode == 2 and "--preset medium" in r.stderr and "--quick" not in r.stderr


def test_quick_with_bpe_trains_fewer_smaller_steps_but_flags_still_win():
    a = tg.parse_args(["--quick"])
    assert (a.max_iters, a.batch_size, a.seed, a.run_dir.name) == (300, 32, 0, "quick")
    a = tg.parse_args(["--quick", "--tokenizer", "bpe"])
    assert (a.max_iters, a.batch_size) == (tg.QUICK_BPE["max_iters"], tg.QUICK_BPE["batch_size"])
    a = tg.parse_args(["--quick", "--tokenizer", "bpe", "--max-iters", "7", "--batch-size", "3"])
    assert (a.max_iters, a.batch_size) == (7, 3)
    a = tg.parse_args(["--quick", "--preset", "medium"])              # --preset is a knob too: a given value wins
    assert (a.preset, a.time_budget, a.max_iters) == ("medium", 3.0, None)


def test_bpe_tokenizer_compacts_vocab_and_round_trips(text_file):
    text = text_file.read_text(encoding="utf-8")
    tok = training.BPETokenizer.from_text(text)
    ids = tok.encode_corpus(text)
    # Only ids that occur in the corpus are kept, renumbered 0..V-1.
    assert tok.vocab_size == len(set(ids.tolist())) == int(ids.max()) + 1
    assert tok.decode(ids.tolist()) == text
    assert tok.decode(tok.encode("ROMEO: But soft")) == "ROMEO: But soft"
    restored = training.tokenizer_from_state(tok.state())
    assert restored.encode("JULIET: O Romeo") == tok.encode("JULIET: O Romeo")


QUICK_ARGV = ("--quick",)  # exactly the docs' quick command (shared with tests/test_docs.py)


@pytest.mark.slow
def test_quick_run_end_to_end(lesson_runs):
    r = lesson_runs.run("04_tiny_gpt.py", *QUICK_ARGV, timeout=900)
    assert r.returncode == 0, r.explain()
    res = json.loads((r.out_root / "04_tiny_gpt" / "quick" / "results.json").read_text(encoding="utf-8"))
    assert res["iters"] == 300 and res["stopped"] is None and res["resume_check_steps"] == 3
    assert abs(res["init_loss"] - res["ln_vocab"]) < 0.1           # random init ≈ uniform guess
    assert res["final_val_loss"] < res["init_loss"] - 1.0           # it learned
    assert Path(res["loss_curve_png"]).is_file() and "自检通过" in r.stdout
