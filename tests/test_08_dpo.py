"""Tests for 08_dpo.py: the DPO loss, sequence log-probabilities, the reference model, the checker
and the data, mostly on a tiny random Llama (fast); the lesson's own --quick run is marked slow."""
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


def test_nll_weight_adds_the_chosen_tokens_mean_nll_to_the_dpo_loss():
    """--nll-weight w: loss = DPO + w * mean over pairs of (-log p(chosen) / chosen tokens), the NLL computed
    independently here with cross-entropy on the full sequence's logits."""
    import torch.nn.functional as F

    model = with_lora(tiny_model())
    g = torch.Generator().manual_seed(5)
    enc = [_pair(g, c_len=n) for n in (3, 6)]
    ref, idx = L8.ReferenceLogprobs(enc), [0, 1]
    with torch.no_grad():
        plain, _ = L8.dpo_objective(ref, 0.3)(model, enc, idx)
        mixed, _ = L8.dpo_objective(ref, 0.3, nll_weight=0.7)(model, enc, idx)
        nll = []
        for prompt, chosen, _ in enc:
            ids = torch.tensor([prompt + chosen])
            logits = model(ids)[0, len(prompt) - 1:-1]
            nll.append(F.cross_entropy(logits.double(), torch.tensor(chosen)).item())
    assert abs((mixed - plain).item() - 0.7 * sum(nll) / 2) < 1e-4


# ------------------------------------------------------------------ log-probabilities
def test_sequence_logprob_counts_response_tokens_only_and_ignores_padding():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [rand_ids(n, g) for n in (3, 7, 5)]
    responses = [rand_ids(n, g) for n in (6, 2, 4)]
    got = L8.sequence_logprobs(model, prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = model(ids)[0].double().log_softmax(-1)          # full logits, one unpadded row
        expect = sum(logp[len(p) - 1 + t, r[t]].item() for t in range(len(r)))   # response tokens only
        assert got[i].item() == pytest.approx(expect, abs=1e-4)
    # the prompt tokens themselves are not scored: a response-free row would be zero
    assert L8.sequence_logprobs(model, [prompts[0]], [[]])[0].item() == 0.0
    # number of scored positions = number of response tokens
    _, targets, rows = L8.response_logits(model, prompts, responses)
    assert rows.bincount(minlength=3).tolist() == [len(r) for r in responses]
    assert targets.tolist() == [t for r in responses for t in r]


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
    ref = L8.heldout_logprobs(base, held)
    m = L8.preference_metrics(model, held, ref, 0.1, kl_n=3)
    assert m["margins"] == [0.0] * 11 and m["reward_accuracy"] == 0.0 and m["kl_per_token"] == pytest.approx(0.0, abs=1e-6)


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
    ref_held = L8.heldout_logprobs(base, held)
    before = L8.preference_metrics(model, held, ref_held, 0.5, kl_n=4)
    a = argparse.Namespace(batch_size=8, seed=0, rank=4, time_budget=10.0)
    tr = L8.train(model, train_enc, L8.dpo_objective(L8.ReferenceLogprobs(train_enc), 0.5), a, "tiny", 1e-2, 30,
                  tmp_path / "adapter.safetensors")
    after = L8.preference_metrics(model, held, ref_held, 0.5, kl_n=4)
    assert tr["steps"] == 30 and not tr["cut_by_time_budget"] and (tmp_path / "adapter.safetensors").is_file()
    assert tr["planned_steps"] == 30 and len(tr["losses"]) == 30 and tr["train_seconds"] > 0     # lesson 05's names
    assert tr["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert after["reward_accuracy"] > before["reward_accuracy"]
    assert after["reward_accuracy"] >= 0.75 and after["mean_margin"] > 0 and after["kl_per_token"] > 0


def test_sft_then_dpo_uses_the_sft_policy_as_reference(tmp_path):
    """--sft-steps K: K SFT steps, then DPO whose reference is the policy at the end of SFT. The reference table
    must hold the SFT policy's log-probs (adapter on, not the base's), be filled before DPO starts, and so the
    first DPO step sees margins of exactly 0 and a loss of log 2; the DPO phase continues the batch order at step K."""
    g = torch.Generator().manual_seed(4)
    enc = [_pair(g) for _ in range(12)]
    base = tiny_model()
    model = with_lora(base)
    a = argparse.Namespace(batch_size=2, seed=0, rank=4, time_budget=10.0, sft_steps=2, nll_weight=0.0)
    seen, first_dpo = [], {}
    real_train, real_obj = L8.train, L8.dpo_objective

    def spy_objective(ref, beta, w):
        inner = real_obj(ref, beta, w)

        def objective(m, e, idx):
            loss, stats = inner(m, e, idx)
            first_dpo.setdefault("loss", loss.item())
            first_dpo.setdefault("ref", ref)
            return loss, stats
        return objective

    def spy_train(m, e, objective, a_, label, lr, steps, path, first=0):
        seen.append((first, steps))
        if objective is L8.sft_objective:
            out = real_train(m, e, objective, a_, label, lr, steps, path, first)
            p = [x[0] for x in e]
            with torch.no_grad():
                first_dpo["sft_c"] = L8.sequence_logprobs(m, p, [x[1] for x in e])
            return out
        return real_train(m, e, objective, a_, label, lr, steps, path, first)

    L8.train, L8.dpo_objective = spy_train, spy_objective
    try:
        tr = L8.sft_then_dpo(model, enc, a, "t", 0.5, 1e-2, 5, tmp_path / "adapter.safetensors")
    finally:
        L8.train, L8.dpo_objective = real_train, real_obj
    assert seen == [(0, 2), (2, 3)] and tr["steps"] == 5 and tr["phase_steps"] == [2, 3]
    assert tr["planned_steps"] == 5 and len(tr["losses"]) == len(tr["history"]["acc"]) + 2 == 5
    assert first_dpo["loss"] == pytest.approx(math.log(2), abs=1e-6)      # policy == reference at DPO step 0
    ref = first_dpo["ref"]
    used = L8.batch_order(12, 5, 2, 0)[4:10]
    assert set(ref.table) == set(used)
    with torch.no_grad():
        base_c = L8.sequence_logprobs(base, [x[0] for x in enc], [x[1] for x in enc])
    for i in used:       # the reference is the SFT policy (adapter on), not the base
        assert ref.table[i][0] == pytest.approx(first_dpo["sft_c"][i].item(), abs=1e-4)
        assert ref.table[i][0] != pytest.approx(base_c[i].item(), abs=1e-4)
    with pytest.raises(RuntimeError):    # a reference that would be computed from the moving policy is refused
        ref.get(model, [next(i for i in range(12) if i not in ref.table)])


def test_sft_steps_must_leave_a_dpo_step(capsys):
    with pytest.raises(SystemExit) as e:
        L8.parse_args(["--steps", "10", "--sft-steps", "10"])
    assert e.value.code != 0 and "--sft-steps" in capsys.readouterr().err


def test_self_rejected_replaces_only_the_used_rejected_answers_with_the_base_models_greedy_answer():
    """--rejected model: for every pair training will use, rejected = what the base model writes greedily
    for that prompt (checked against common.generate.generate, one prompt at a time, no cache: an
    independent path); chosen and prompts stay as they were, unused pairs are untouched."""
    from common.generate import generate
    g = torch.Generator().manual_seed(3)
    enc = [(rand_ids(4 + i % 3, g), rand_ids(5, g), rand_ids(7, g)) for i in range(20)]
    base = tiny_model()
    tok = argparse.Namespace(im_end=63, eos_ids={63})
    a = argparse.Namespace(batch_size=4, seed=0, gen_batch=5, max_new_tokens=6)
    new, used = L8.self_rejected(base, tok, enc, a, steps=3)
    assert used == sorted(set(L8.batch_order(20, 3, 4, 0)[:12])) and len(used) > 4
    for k in range(20):
        assert new[k][:2] == enc[k][:2]
        if k not in used:
            assert new[k] == enc[k]
            continue
        alone = list(generate(base, enc[k][0], 6, use_cache=False, stop_ids=[63]))
        assert new[k][2] == (alone + [63] if len(alone) < 6 else alone)


# ------------------------------------------------------------------ checker and data
@pytest.mark.parametrize("text,ok", [
    ("Water it when the soil is dry. Is it near a window?", True),
    ("Water it when the soil is dry.", False),                                   # no follow-up question
    ("Is it near a window? Water it when the soil is dry.", False),              # question not at the end
    (" ".join(["word"] * 30) + " ok?", False),                                   # 31 words: too long
    ("Tip. " + " ".join(["really"] * 11) + "?", False),                          # question too long
    ("Why? Is it near a window?", False),                                        # two questions
    ("How do you do?", False),                                                   # a question but no answer
    ("How do you do it?", False),                                                # (what DPO learned to game)
    ("", False),
])
def test_checker(text, ok):
    assert L8.check_answer(text)[0] is ok


def test_dataset_matches_checker_and_generator(data_generator):
    d = REPO / "data" / "dpo"
    train, held = (json.loads((d / n).read_text("utf-8")) for n in ("train.json", "heldout.json"))
    assert len(train) >= 300 and len(held) >= 100
    L8.check_data(train, held)                       # chosen pass, rejected fail, no shared prompts
    gen = data_generator(d)
    for r in train + held:                           # the generator's copy of the rule agrees with the lesson's
        assert gen.CHECKER(r["chosen"]) == L8.check_answer(r["chosen"])[0]
        assert gen.CHECKER(r["rejected"]) == L8.check_answer(r["rejected"])[0]


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
    assert set(res["checker_pass_rate"]) == {"base", "sft", "dpo"}
    assert all(0 <= v <= 1 for v in res["checker_pass_rate"].values())
    assert res["kl_per_token"]["base"] == 0.0 and res["kl_per_token"]["dpo"] > 0
    assert (run.out_root / "08_dpo" / "training.png").is_file()
    assert (run.out_root / "08_dpo" / "adapter_dpo.safetensors").is_file()
