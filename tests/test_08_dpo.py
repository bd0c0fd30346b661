"""Tests for 08_dpo.py: the DPO loss, the reference model (adapter off; SFT merged + fresh adapter), on-policy
pairs, the run's artefacts, plot and summary, and the data, mostly on a tiny random Llama (fast); the lesson's
own --quick run is marked slow. The checker and sequence log-probs (common/preference.py): tests/test_preference.py."""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from common.llama import Llama, LlamaConfig
from common.lora import adapters_disabled, inject_lora, lora_modules

REPO = Path(__file__).resolve().parents[1]
L8 = importlib.import_module("08_dpo")
TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def tiny_model(seed=0) -> Llama:
    torch.manual_seed(seed)
    return Llama(TINY).eval()


def with_lora(base: Llama, rank=4, random_b=False) -> Llama:
    model = copy.deepcopy(base)
    inject_lora(model, L8.TARGETS, rank, 2.0 * rank)
    if random_b:   # B starts at zero; random values make the adapted model differ from the base
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)
    return model


def rand_ids(n, g, lo=1, hi=64):
    return torch.randint(lo, hi, (n,), generator=g).tolist()


# ------------------------------------------------------------------ DPO loss
def test_dpo_loss_equals_float64_formula():
    g = torch.Generator().manual_seed(0)
    pol_c, pol_r, ref_c, ref_r = (torch.randn(5, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    for beta in (0.1, 0.5, 2.0):
        loss, margin = L8.dpo_loss(pol_c.float(), pol_r.float(), ref_c.float(), ref_r.float(), beta)
        direct, margins = 0.0, []
        for i in range(5):   # the paper's formula, written out in plain float64 Python
            z = beta * ((pol_c[i].item() - ref_c[i].item()) - (pol_r[i].item() - ref_r[i].item()))
            margins.append(z)
            direct += -math.log(1.0 / (1.0 + math.exp(-z))) / 5
        assert loss.item() == pytest.approx(direct, rel=1e-5, abs=1e-6)
        assert margin.tolist() == pytest.approx(margins, rel=1e-5, abs=1e-5)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pol_c = torch.tensor([-20.0, -5.0], requires_grad=True)
    pol_r = torch.tensor([-30.0, -4.0], requires_grad=True)
    loss, _ = L8.dpo_loss(pol_c, pol_r, torch.tensor([-21.0, -6.0]), torch.tensor([-29.0, -4.5]), 0.1)
    loss.backward()
    assert (pol_c.grad < 0).all() and (pol_r.grad > 0).all()   # gradient descent raises log pi(y_w), lowers log pi(y_l)


def _pair(g, prompt_len=6, c_len=5, r_len=9):
    return rand_ids(prompt_len, g), rand_ids(c_len, g), rand_ids(r_len, g)


def test_one_dpo_step_raises_chosen_logprob_on_a_model():
    base = tiny_model()
    model = with_lora(base)
    g = torch.Generator().manual_seed(3)
    enc = [_pair(g) for _ in range(4)]
    ref = L8.ReferenceLogprobs(enc)
    idx = list(range(4))
    p = [e[0] for e in enc]
    with torch.no_grad():
        c0 = L8.sequence_logprobs(model, p, [e[1] for e in enc])
        r0 = L8.sequence_logprobs(model, p, [e[2] for e in enc])
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.05)
    loss, _ = L8.dpo_objective(ref, 0.5)(model, enc, idx)
    loss.backward()
    opt.step()
    with torch.no_grad():
        c1 = L8.sequence_logprobs(model, p, [e[1] for e in enc])
        r1 = L8.sequence_logprobs(model, p, [e[2] for e in enc])
    assert (c1 - r1).mean() > (c0 - r0).mean()      # the margin grew
    assert c1.sum() > c0.sum()                       # chosen log-probs went up
    # the reference did not move: it is the frozen base, looked up from the table
    assert torch.equal(ref.get(model, idx)[0], c0)


# ------------------------------------------------------------------ the reference model
def test_reference_with_adapters_off_is_bitwise_the_base_model():
    base = tiny_model()
    model = with_lora(base, random_b=True)
    ids = torch.tensor([rand_ids(12, torch.Generator().manual_seed(5))])
    with torch.no_grad():
        want = base(ids)
        assert not torch.equal(model(ids), want)          # the adapters change the output ...
        with adapters_disabled(model):
            assert torch.equal(model(ids), want)          # ... and switched off it is exactly the base
        assert not torch.equal(model(ids), want)          # switched back on afterwards


def test_fresh_adapters_give_zero_margins():
    """Before training the policy equals the reference, so every implicit reward margin is exactly 0."""
    base = tiny_model()
    model = with_lora(base)
    g = torch.Generator().manual_seed(2)
    held = [_pair(g, prompt_len=int(torch.randint(3, 9, (1,), generator=g))) for _ in range(11)]  # > one chunk of 8
    m = L8.preference_metrics(model, L8.heldout_pass(base, held, 3), held, 0.1, kl_n=3)
    assert m["margins"] == [0.0] * 11 and m["reward_accuracy"] == 0.0 and m["kl_per_token"] == pytest.approx(0.0, abs=1e-6)


def test_kl_against_the_precomputed_base_equals_kl_computed_pair_by_pair():
    """The base model's log-distributions are computed once (heldout_pass) and reused by every evaluation, and
    the policy's come from the same forward pass as log p(chosen); the KL must equal KL(model || base) computed
    from scratch, one pair at a time without padding, and log p(chosen) must equal sequence_logprobs bitwise."""
    base = tiny_model()
    model = with_lora(base, random_b=True)
    g = torch.Generator().manual_seed(4)
    held = [_pair(g, prompt_len=int(torch.randint(3, 9, (1,), generator=g))) for _ in range(11)]
    ref = L8.heldout_pass(base, held, 10)
    kl_n = 10                                            # > one chunk of 8, and fewer than all pairs
    m = L8.preference_metrics(model, ref, held, 0.1, kl_n=kl_n)
    per_pos = []
    with torch.no_grad():
        for p, c, _ in held[:kl_n]:
            logp = L8.response_logits(model, [p], [c])[0].log_softmax(-1)
            logq = L8.response_logits(base, [p], [c])[0].log_softmax(-1)
            per_pos += (logp.exp() * (logp - logq)).sum(-1).tolist()
    assert m["kl_tokens"] == len(per_pos) == sum(len(h[1]) for h in held[:kl_n])
    assert m["kl_per_token"] == pytest.approx(sum(per_pos) / len(per_pos), rel=1e-4) and m["kl_per_token"] > 0
    with pytest.raises((ValueError, RuntimeError)):      # a cache built for other pairs is refused, not misused
        L8.preference_metrics(model, L8.heldout_pass(base, held, 3), held, 0.1, kl_n=kl_n)
    pc, pr, _ = L8.heldout_pass(model, held, kl_n)
    for i in range(0, 11, 8):                            # the chunks of 8 that heldout_pass uses
        chunk = held[i:i + 8]
        assert torch.equal(pc[i:i + 8], L8.sequence_logprobs(model, [h[0] for h in chunk], [h[1] for h in chunk]))
        assert torch.equal(pr[i:i + 8], L8.sequence_logprobs(model, [h[0] for h in chunk], [h[2] for h in chunk]))


# ------------------------------------------------------------------ training end to end on the tiny model
def test_heldout_reward_accuracy_rises_after_training(tmp_path):
    """Chosen answers use even token ids, rejected ones odd ids; held-out pairs are new random sequences
    of the same kinds. DPO must learn the rule: held-out reward accuracy after > before."""
    g = torch.Generator().manual_seed(0)

    def pair():
        p = rand_ids(5, g)
        return p, [2 * t for t in rand_ids(6, g, 1, 32)], [2 * t + 1 for t in rand_ids(6, g, 0, 32)]

    train_enc, held = [pair() for _ in range(32)], [pair() for _ in range(16)]
    base = tiny_model()
    model = with_lora(base)
    ref_held = L8.heldout_pass(base, held, 4)
    before = L8.preference_metrics(model, ref_held, held, 0.5, kl_n=4)
    a = argparse.Namespace(batch_size=8, seed=0, rank=4, time_budget=10.0)
    tr = L8.train(model, train_enc, L8.dpo_objective(L8.ReferenceLogprobs(train_enc), 0.5), a, "tiny", 1e-2, 30,
                  tmp_path / "adapter.safetensors")
    after = L8.preference_metrics(model, ref_held, held, 0.5, kl_n=4)
    assert tr["steps"] == 30 and not tr["cut_by_time_budget"] and (tmp_path / "adapter.safetensors").is_file()
    assert tr["adapter"] == "adapter.safetensors"
    assert tr["planned_steps"] == 30 and len(tr["losses"]) == 30 and tr["train_seconds"] > 0     # lesson 05's names
    assert tr["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert after["reward_accuracy"] > before["reward_accuracy"]
    assert after["reward_accuracy"] >= 0.75 and after["mean_margin"] > 0 and after["kl_per_token"] > 0


def test_stacked_adapter_reference_is_the_sft_policy():
    """SFT adapter merged into the weights, a fresh adapter on top: with the new adapter still B = 0 the model is
    the SFT policy, and with adapters off it stays the SFT policy after training moves the new adapter; the SFT
    model itself is not changed; a DPO step on top starts from margins of exactly 0 (loss log 2)."""
    base = tiny_model()
    sft = with_lora(base, random_b=True)                  # stands in for a trained SFT adapter
    ids = torch.tensor([rand_ids(12, torch.Generator().manual_seed(5))])
    with torch.no_grad():
        want = sft(ids)
        stacked = L8.stack_fresh_adapter(sft, argparse.Namespace(rank=4, seed=0))
        assert torch.allclose(stacked(ids), want, atol=1e-5)
        assert not torch.allclose(base(ids), want, atol=1e-3)
        for m in lora_modules(stacked).values():
            assert not m.merged and torch.count_nonzero(m.B) == 0
            m.B.normal_(0, 0.1)                           # "training" moves the new adapter ...
        assert not torch.allclose(stacked(ids), want, atol=1e-3)
        with adapters_disabled(stacked):                  # ... the reference (adapter off) is still the SFT policy
            assert torch.allclose(stacked(ids), want, atol=1e-5)
        assert torch.equal(sft(ids), want) and not any(m.merged for m in lora_modules(sft).values())
    fresh = L8.stack_fresh_adapter(sft, argparse.Namespace(rank=4, seed=0))
    g = torch.Generator().manual_seed(6)
    enc = [_pair(g) for _ in range(3)]
    loss, _ = L8.dpo_objective(L8.ReferenceLogprobs(enc), 0.5)(fresh, enc, [0, 1, 2])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


class WordTok:
    """A stand-in tokenizer: token i decodes to WORDS[i]; the chat template is the prompt's length in tokens."""
    WORDS = ["Water it daily.", "Is it dry?", "Bad.", "Rambling words here."]
    im_end, eos_ids = 9, {9}

    def decode(self, ids):
        return " ".join(self.WORDS[i] for i in ids)

    def encode(self, text):
        return [7] * len(text.split())

    def apply_chat_template(self, messages, default_system=False):
        return [8] * len(messages[0]["content"].split())


def test_onpolicy_pairs_pass_vs_fail_all_fail_uses_the_data_and_all_pass_is_skipped(monkeypatch):
    rows = [{"prompt": "How do I keep basil alive?", "chosen": "Sun and little water. Is it sunny?", "rejected": "x"}] * 3
    outs = [[[0, 1], [0], [0, 1], [2]],              # mixed: 2 pass, 2 fail -> 2 pairs
            [[0], [2], [3, 3, 3, 3], [0]],           # all fail (one unfinished) -> data's chosen vs each, 4 pairs
            [[0, 1]] * 4]                            # all pass -> no pair
    seen = {}

    def fake_sample_k(model, prompts, k, max_new, **kw):
        seen.update(k=k, max_new=max_new, prompts=prompts, **kw)
        return outs
    monkeypatch.setattr(L8, "sample_k", fake_sample_k)
    a = argparse.Namespace(k=4, max_new_tokens=4, temperature=0.8, seed=3, gen_batch=64)
    pairs, stats = L8.onpolicy_pairs(None, WordTok(), rows, a)
    assert seen["k"] == 4 and seen["temperature"] == 0.8 and seen["seed"] == 3 and seen["stop_ids"] == {9}
    assert (stats["mixed"], stats["all_fail"], stats["all_pass"], stats["pairs"]) == (1, 1, 1, 6)
    assert stats["samples_passed"] == 2 + 0 + 4
    prompt = [8] * 6                                 # the stand-in template: one token per word
    assert pairs[:2] == [(prompt, [0, 1, 9], [0, 9]), (prompt, [0, 1, 9], [2, 9])]
    data_chosen = [7] * 7 + [9]
    assert pairs[2:] == [(prompt, data_chosen, [0, 9]), (prompt, data_chosen, [2, 9]),
                         (prompt, data_chosen, [3, 3, 3, 3]), (prompt, data_chosen, [0, 9])]   # unfinished: no <|im_end|>
    assert stats["examples"][0]["why"] == "没有以一个追问结尾"


def test_ctrl_c_saves_the_half_trained_adapter_where_told_and_reraises(tmp_path):
    model = with_lora(tiny_model())
    g = torch.Generator().manual_seed(1)
    enc = [_pair(g) for _ in range(4)]
    calls = []

    def objective(m, e, idx):
        calls.append(idx)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return L8.sft_objective(m, e, idx)
    a = argparse.Namespace(batch_size=2, seed=0, rank=4, time_budget=10.0)
    (tmp_path / "stage").mkdir()                          # main() creates the run's stage folder
    with pytest.raises(KeyboardInterrupt):
        L8.train(model, enc, objective, a, "t", 1e-2, 5, tmp_path / "stage" / "adapter_x.safetensors")
    assert (tmp_path / "stage" / "adapter_x.safetensors").is_file() and len(calls) == 2


def test_publish_replaces_the_whole_set_and_removes_stale_files(tmp_path):
    out, stage = tmp_path / "out", tmp_path / "out" / ".running"
    stage.mkdir(parents=True)
    for name, text in [("results.json", "old"), ("training.png", "old"), ("adapter_dpo.safetensors", "old"),
                       ("notes.txt", "mine")]:
        (out / name).write_text(text)
    for name in ("results.json", "training.png", "adapter_sft.safetensors"):
        (stage / name).write_text("new")
    L8.publish(stage, out)
    assert sorted(f.name for f in out.iterdir()) == ["adapter_sft.safetensors", "notes.txt", "results.json",
                                                      "training.png"]
    assert all((out / n).read_text() == "new" for n in ("results.json", "training.png", "adapter_sft.safetensors"))
    assert (out / "notes.txt").read_text() == "mine"


def fake_runs():
    def gen(p):
        return {"pass_rate": p, "mean_words": 20.0, "n": 2, "outputs": ["a", "b"], "reasons": ["通过", "太长"],
                "reason_counts": {"通过": 1, "追问是在复述问题": 1}}

    def tr(n, dpo):
        hist = {"acc": [1.0] * n if dpo else [], "margin": [0.1 * i for i in range(n)] if dpo else [], "chosen_drift": []}
        return {"steps": n, "losses": [1.0 / (i + 1) for i in range(n)], "history": hist}
    runs = {"base": {"label": "基座", "wall_seconds": 0.0}}
    for key, n, dpo in [("sft", 5, False), ("sft_more", 3, False), ("dpo_offline", 3, True), ("dpo_onpolicy", 3, True)]:
        runs[key] = {"label": L8.RUNS[key], "wall_seconds": 1.0, "train": tr(n, dpo)}
    for r in runs.values():
        r.update(generation=gen(0.5), neutral_ppl=27.0, kl_per_token=0.1, reward_accuracy=1.0, mean_margin=0.5)
    return runs


def test_plot_same_colour_means_same_run_in_every_panel_axes_labelled_legends_outside(monkeypatch):
    figs = []
    monkeypatch.setattr(L8, "save_figure", lambda fig, path: figs.append(fig) or path)
    L8.plot_training(fake_runs(), Path("unused.png"))
    fig = figs[0]
    fig.canvas.draw()
    colours = {}
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
        leg = ax.get_legend()
        assert leg is not None and not leg.get_window_extent().overlaps(ax.get_window_extent())
    assert len(colours) == 4 and all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == 4      # four runs, four colours


def test_summary_rows_line_up_in_a_terminal(tmp_path, capsys):
    from common.display import width
    a = argparse.Namespace(seed=0)
    stats = {"pairs": 1}
    L8.report(fake_runs(), stats, [{"prompt": "p1"}, {"prompt": "p2"}], a, tmp_path, 1.0)
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("模型"))
    block = lines[head:head + 6]
    assert block[1].startswith("基座") and len({width(line) for line in block}) == 1
    res = json.loads((tmp_path / "results.json").read_text("utf-8"))
    assert set(res["pass_rate"]) == {"base", "sft", "sft_more", "dpo_offline", "dpo_onpolicy"}
    assert res["removed_by_echo_rules"]["sft"] == {"追问是在复述问题": 1, "没有超出问题的内容": 0}


# ------------------------------------------------------------------ checker and data
def test_dataset_matches_checker_and_generator(data_generator):
    d = REPO / "data" / "dpo"
    train, held = (json.loads((d / n).read_text("utf-8")) for n in ("train.json", "heldout.json"))
    assert len(train) >= 300 and len(held) >= 100
    L8.check_data(train, held)                       # chosen pass, rejected fail, no shared prompts
    gen = data_generator(d)
    for r in train + held:                           # the generator's copy of the rule agrees with the lesson's
        assert gen.CHECKER(r["chosen"]) == L8.check_answer(r["prompt"], r["chosen"])[0]
        assert gen.CHECKER(r["rejected"]) == L8.check_answer(r["prompt"], r["rejected"])[0]


def test_dataset_files_are_what_the_generator_writes(tmp_path, data_generator):
    d = REPO / "data" / "dpo"
    data_generator(d).main()
    for name in ("train.json", "heldout.json"):
        assert (tmp_path / name).read_bytes() == (d / name).read_bytes()


# ------------------------------------------------------------------ the lesson itself (slow)
@pytest.mark.slow
def test_quick_run(lesson_runs):
    run = lesson_runs.run("08_dpo.py", "--quick", timeout=900)
    assert run.returncode == 0, run.explain()
    res = run.results("08_dpo")
    assert res["reward_accuracy"]["before"] == 0.0                  # policy == reference before training
    assert res["reward_accuracy"]["after"] > res["reward_accuracy"]["before"]
    assert res["mean_margin"]["after"] > 0
    assert set(res["pass_rate"]) == {"base", "sft", "sft_more", "dpo_offline", "dpo_onpolicy"}
    assert all(0 <= v <= 1 for v in res["pass_rate"].values())
    assert res["kl_per_token"]["base"] == 0.0 and res["kl_per_token"]["dpo_onpolicy"] > 0
    assert res["onpolicy_sampling"]["pairs"] > 0
    # wall time: on-policy DPO includes the SFT steps and the sampling
    assert res["wall_seconds"]["dpo_onpolicy"] > res["onpolicy_sampling"]["seconds"] > 0
    d = run.out_root / "08_dpo"
    assert (d / "training.png").is_file() and not (d / ".running").exists()
    for key in ("sft", "sft_more", "dpo_offline", "dpo_onpolicy"):
        assert (d / f"adapter_{key}.safetensors").is_file()
