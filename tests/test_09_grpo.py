"""Tests for 09_grpo.py: group advantages, the clipped policy-gradient loss and its gradient direction, the k3 KL,
response-only token log-probs, the reference (adapter off), one seeded GRPO step (reproducible; no update when every
group is all-equal), the rewards, and task B's data, mostly on a tiny random Llama (fast); the lesson's own --quick run
is marked slow."""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from common.llama import Llama
from common.lora import adapters_disabled, inject_lora, lora_modules
from test_08_dpo import tiny_model  # the same tiny random Llama as lesson 08's tests

REPO = Path(__file__).resolve().parents[1]
L9 = importlib.import_module("09_grpo")


def with_lora(base: Llama, rank=4, random_b=False) -> Llama:
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    inject_lora(model, L9.TARGETS, rank, 2.0 * rank)
    if random_b:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)
    return model


def step_args(**kw):
    a = dict(group=4, max_new_tokens=6, temperature=1.0, gen_batch=64, beta=0.04, clip=0.2)
    return argparse.Namespace(**{**a, **kw})


# ------------------------------------------------------------------ advantages, loss, KL
def test_group_advantages_are_zero_mean_per_group_and_zero_for_all_equal_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [1.2, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    adv = L9.group_advantages(r)
    assert torch.allclose(adv.mean(1), torch.zeros(4), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[3], torch.zeros(4))
    assert adv[0].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-3)             # std 0.5: ±0.5 / 0.5
    assert adv[2, 0] > 0 > adv[2, 2] and adv[2, 2] == adv[2, 3]                   # ranks kept, ties tied


def test_k3_kl_is_non_negative_and_exactly_zero_when_policy_is_reference():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(1000, generator=g) * 5, -torch.rand(1000, generator=g) * 5
    kl = L9.k3_kl(logp, ref)
    assert (kl >= 0).all() and (kl > 0).any()
    assert torch.equal(L9.k3_kl(logp, logp), torch.zeros(1000))
    # k3 is an unbiased estimate of KL(pi || ref) when y ~ pi: check on a small categorical distribution
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    assert (p * L9.k3_kl(p.log(), q.log())).sum() == pytest.approx(exact.item(), rel=1e-5)


def test_ratio_is_one_and_clip_inactive_with_one_step_per_batch_but_gradient_is_the_policy_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5])
    loss, _ = L9.grpo_token_loss(logp, logp.detach(), logp.detach(), adv, beta=0.0, clip=0.2)
    assert torch.equal(loss.detach(), -adv)                                     # ratio == 1 exactly
    loss.sum().backward()
    assert torch.equal(logp.grad, -adv)                                         # d/dlogp = -A (REINFORCE)
    # after the policy moved past 1 + eps on a positive-advantage token, the clipped term has no gradient
    moved = torch.tensor([0.0], requires_grad=True)
    loss, _ = L9.grpo_token_loss(moved, torch.tensor([-0.5]), moved.detach(), torch.tensor([1.0]), 0.0, 0.2)
    loss.sum().backward()
    assert moved.grad.item() == 0.0 and loss.item() == pytest.approx(-1.2)


def test_gradient_raises_the_higher_reward_answer_and_lowers_the_lower_one():
    model = with_lora(tiny_model(), random_b=True)
    prompt, good, bad = [3, 9, 14, 5], [7, 21, 30], [40, 2, 11, 8]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)

    def seq_logp():
        with torch.no_grad():
            lp, _, rows = L9.token_logprobs(model, [prompt, prompt], [good, bad])
            return torch.zeros(2).index_add(0, rows, lp)

    before = seq_logp()
    adv = L9.group_advantages(torch.tensor([[1.0, 0.0]]))[0]
    logp, _, rows = L9.token_logprobs(model, [prompt, prompt], [good, bad])
    with torch.no_grad(), adapters_disabled(model):
        ref = L9.token_logprobs(model, [prompt, prompt], [good, bad])[0]
    loss, _ = L9.grpo_token_loss(logp, logp.detach(), ref, adv[rows], beta=0.04, clip=0.2)
    opt.zero_grad()
    loss.mean().backward()
    opt.step()
    after = seq_logp()
    assert after[0] > before[0] and after[1] < before[1]


# ------------------------------------------------------------------ response-only log-probs, reference
def test_token_logprobs_cover_response_tokens_only_and_ignore_padding():
    model = tiny_model()
    prompts, responses = [[1, 2, 3, 4, 5, 6], [7, 8]], [[10, 11], [12, 13, 14, 15]]
    lp, ent, rows = L9.token_logprobs(model, prompts, responses)
    assert lp.shape == ent.shape == (6,) and rows.tolist() == [0, 0, 1, 1, 1, 1]
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):           # each row alone, no padding, by hand
            logq = model(torch.tensor([p + r]))[0].log_softmax(-1)
            want = torch.stack([logq[len(p) - 1 + t, tok] for t, tok in enumerate(r)])
            assert torch.allclose(lp[rows == i], want, atol=1e-5)
    assert (ent > 0).all()


def test_reference_with_adapters_off_is_bitwise_the_base_model():
    base = tiny_model()
    model = with_lora(base, random_b=True)
    args = ([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]])
    with torch.no_grad():
        want = L9.token_logprobs(base, *args)[0]
        assert not torch.equal(L9.token_logprobs(model, *args)[0], want)
        with adapters_disabled(model):
            assert torch.equal(L9.token_logprobs(model, *args)[0], want)


# ------------------------------------------------------------------ one GRPO step on the tiny model
def count_score(i, ids):
    """A made-up verifiable reward: how many even token ids the answer has (passed = at least 3; gamed = exactly 2,
    as if a loose reward paid for it)."""
    even = sum(t % 2 == 0 for t in ids)
    return float(even), even >= 3, even == 2


def one_step(seed=7, score=count_score, **kw):
    base = tiny_model()
    with torch.no_grad():      # a random tiny model is nearly greedy even at temperature 1: flatten its logits
        base.lm_head.weight.mul_(0.02)
    model = with_lora(base)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    st = L9.grpo_step(model, opt, [[1, 2, 3], [4, 5, 6, 7]], score, step_args(**kw), seed, (), 0)
    return model, st


def test_seeded_grpo_step_is_reproducible_and_first_step_kl_is_zero():
    m1, s1 = one_step()
    m2, s2 = one_step()
    assert s1["zero_adv_frac"] < 1 and s1["loss"] != 0.0
    assert s1["kl"] == 0.0                                       # B = 0 before the step: policy == reference
    for k in ("reward", "pass_rate", "gamed", "hacks", "zero_adv_frac", "length", "entropy", "loss", "examples"):
        assert s1[k] == s2[k]
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    _, s3 = one_step(seed=8)
    assert s3["examples"] != s1["examples"]


def test_step_counts_gamed_samples_and_keeps_two_of_them():
    seen = []

    def score(i, ids):                                           # here "gamed" = every answer that fails
        seen.append((i, list(ids)))
        return count_score(i, ids)[0], count_score(i, ids)[1], not count_score(i, ids)[1]
    _, st = one_step(score=score)
    flags = [not count_score(i, o)[1] for i, o in seen]
    assert len(seen) == 8 and 2 < sum(flags) < 8                 # 2 prompts x group 4: more gamed than are kept
    assert st["gamed"] == sum(flags) / 8
    assert [(i, list(o)) for i, o, _ in st["hacks"]] == [s for s, f in zip(seen, flags) if f][:2]
    assert all(r == count_score(i, o)[0] for i, o, r in st["hacks"])


def test_all_equal_groups_give_no_update():
    model, st = one_step(score=lambda i, ids: (1.0, True, False))
    assert st["zero_adv_frac"] == 1.0 and st["loss"] == 0.0
    assert all(torch.equal(m.B, torch.zeros_like(m.B)) for m in lora_modules(model).values())


# ------------------------------------------------------------------ rewards and data
class FakeTok:
    def __init__(self, text):
        self.text = text

    def decode(self, ids):
        return self.text


def test_reward_a_is_one_exactly_when_the_checker_passes_and_loose_reward_pays_for_echoes():
    prompt = "How do I keep basil alive indoors?"
    good = "Put it in your sunniest window and water only when the soil is dry. Is your window facing south?"
    echo = "You should keep it alive. How do I keep basil alive indoors?"
    assert L9.reward_a(FakeTok(good), prompt, [1] * 20, 48) == (1.0, True, L9.PASS)
    r, ok, why = L9.reward_a(FakeTok(echo), prompt, [1] * 15, 48)
    assert not ok and why in L9.ECHO_RULES and 0 < r <= 0.3
    assert L9.reward_a(FakeTok(echo), prompt, [1] * 15, 48, loose=True) == (1.0, False, why)
    # unfinished rambling: only the "short first sentence" part can pay, and a shorter first sentence pays more
    long_first = L9.reward_a(FakeTok("word " * 40), prompt, [1] * 48, 48)
    short_first = L9.reward_a(FakeTok("Water it weekly. " + "word " * 30), prompt, [1] * 48, 48)
    assert long_first[:2] == (0.0, False) and 0 < short_first[0] < 0.1 and not short_first[1]


def test_reward_b_format_plus_correctness():
    row = {"a": 88, "op": "-", "b": 69, "answer": 19}
    assert L9.reward_b(row, "88 - 69 = 19")[:2] == (1.5, True)
    assert L9.reward_b(row, "88-69=19.")[:2] == (1.5, True)
    assert L9.reward_b(row, "88 - 69 = 18")[:2] == (0.5, False)
    assert L9.reward_b(row, "The answer is 19")[:2] == (1.0, False)
    assert L9.reward_b(row, "To solve 88 - 69 = 19, subtract")[:2] == (1.25, False)
    assert L9.reward_b(row, "The answer is 18")[:2] == (0.0, False)
    assert L9.reward_b(row, "88 + 69 = 19")[:2] == (1.0, False)          # the equation must be the one asked
    assert L9.reward_b(row, "Answer: 19")[:2] == (1.0, False)            # the old format is no longer the format
    assert L9.lenient_correct(row, "88 - 69 = 19") and not L9.lenient_correct(row, "19 and 20")


def test_loose_rewards_pay_full_marks_for_gamed_answers_and_strict_ones_never_do():
    row = {"a": 88, "op": "-", "b": 69, "answer": 19}
    # task B, loose: only the format counts, so a well-formed wrong equation earns what a right one earns
    assert L9.with_gamed(L9.reward_b(row, "88 - 69 = 18", loose=True), 0.5) == (0.5, False, True)
    assert L9.with_gamed(L9.reward_b(row, "88 - 69 = 19", loose=True), 0.5) == (0.5, True, False)
    assert L9.with_gamed(L9.reward_b(row, "The answer is 19", loose=True), 0.5) == (0.0, False, False)
    for text in ("88 - 69 = 18", "To solve 88 - 69 = 19, subtract", "The answer is 19", "88 - 69 = 19"):
        assert not L9.with_gamed(L9.reward_b(row, text), 1.5)[2]
    # task A, loose: an answer that echoes the user's question scores 1, the checker says no
    prompt, echo = "How do I keep basil alive indoors?", "You should keep it alive. How do I keep basil alive indoors?"
    assert L9.with_gamed(L9.reward_a(FakeTok(echo), prompt, [1] * 15, 48, loose=True), 1.0) == (1.0, False, True)
    assert not L9.with_gamed(L9.reward_a(FakeTok(echo), prompt, [1] * 15, 48), 1.0)[2]


def test_report_hacking_keeps_examples_and_the_perplexity_guard(capsys):
    hist = lambda g: {"train": {"history": {"gamed": g}}}
    ex = [{"step": 3, "prompt": "What is 88 - 69? ...", "answer": "88 - 69 = 18", "reward": 0.5}]
    runs = {"base": {"neutral_ppl": 20.0, "A": {"pass_rate": 0.0}, "B": {"accuracy": 0.1}},
            "grpo_a": {**hist([0.0, 0.0]), "hacks": [], "neutral_ppl": 21.0, "A": {"pass_rate": 0.0}},
            "grpo_b": {**hist([0.1, 0.5, 0.75]), "hacks": ex, "neutral_ppl": 25.0, "B": {"accuracy": 0.05}}}
    res = L9.report_hacking(runs, argparse.Namespace(loose_reward=True, beta=0.0))
    assert res["B"]["examples"] == ex and res["A"]["examples"] == [] and res["B"]["gamed_rate"] == [0.1, 0.5, 0.75]
    assert res["B"]["neutral_ppl_change"] == pytest.approx(0.25) and res["A"]["neutral_ppl_change"] == pytest.approx(0.05)
    out = capsys.readouterr().out
    assert "88 - 69 = 18" in out and "+25.0%" in out


def test_task_b_files_are_what_the_seeded_generator_writes(tmp_path):
    d = REPO / "data" / "grpo"
    spec = importlib.util.spec_from_file_location("make_problems", d / "make_problems.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.HERE = tmp_path
    gen.main()
    for name in ("train.json", "heldout.json"):
        assert (tmp_path / name).read_bytes() == (d / name).read_bytes()
    train, held = (json.loads((d / n).read_text()) for n in ("train.json", "heldout.json"))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(r["answer"] == (r["a"] + r["b"] if r["op"] == "+" else r["a"] - r["b"]) >= 0 for r in train + held)


# ------------------------------------------------------------------ the lesson itself (slow)
@pytest.mark.slow
def test_quick_run(lesson_runs):
    run = lesson_runs.run("09_grpo.py", "--quick", timeout=900)
    assert run.returncode == 0, run.explain()
    res = run.results("09_grpo")
    assert set(res["pass_rate"]) == {"base", "sft", "grpo"} and set(res["accuracy"]) == {"base", "grpo"}
    hack = res["reward_hacking"]                                     # strict rewards: nothing can be "gamed"
    assert hack["loose_reward"] is False and hack["A"]["examples"] == hack["B"]["examples"] == []
    assert not any(hack["A"]["gamed_rate"] + hack["B"]["gamed_rate"])
    assert all(0 <= v <= 1 for v in [*res["pass_rate"].values(), *res["accuracy"].values()])
    for key in ("grpo_a", "grpo_b"):
        t = res["time_split"][key]
        assert t["t_generate"] > 0 and t["t_backward"] >= 0
        assert res["runs"][key]["train"]["history"]["kl"][0] in (0.0, None)    # None: no group had a signal
    d = run.out_root / "09_grpo"
    assert (d / "training.png").is_file() and not (d / ".running").exists()
