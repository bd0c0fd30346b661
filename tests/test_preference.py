"""common/preference.py: the checker (each rule, including the two anti-echo rules), response-only sequence
log-probabilities with padding, and sample_k (k answers per prompt, batched, seeded). Tiny random Llama."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.generate import generate
from common.llama import Llama, LlamaConfig
from common.preference import (ECHO_RULES, REASONS, check_answer, is_echo, judge, response_logits, sample_k,
                               sequence_logprobs)

REPO = Path(__file__).resolve().parents[1]
TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
BASIL = "How do I keep basil alive indoors?"


def tiny_model(seed=0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(TINY).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 32) * 0.25)   # varied tokens when sampling
    return model


def rand_ids(n, g, lo=1, hi=64):
    return torch.randint(lo, hi, (n,), generator=g).tolist()


# ------------------------------------------------------------------ the checker
@pytest.mark.parametrize("prompt,text,reason", [
    (BASIL, "Water it when the soil is dry. Is it near a window?", "通过"),
    (BASIL, "Water it when the soil is dry.", "没有以一个追问结尾"),                         # no follow-up question
    (BASIL, "Is it near a window? Water it when the soil is dry.", "没有以一个追问结尾"),    # question not at the end
    (BASIL, " ".join(["word"] * 30) + " ok?", "太长"),                                     # 31 words
    (BASIL, "Tip. " + " ".join(["really"] * 11) + "?", "追问太长"),
    (BASIL, "Why? Is it near a window?", "没有以一个追问结尾"),                              # two questions
    (BASIL, "How do you do?", "只有追问，没有回答"),
    (BASIL, "", "空回答"),
    # the follow-up question is (nearly) the user's own question
    (BASIL, "Basil is nice. How do I keep basil alive indoors?", "追问是在复述问题"),
    (BASIL, "Basil is nice. How do you keep basil alive indoors?", "追问是在复述问题"),
    ("I want to fix a squeaky door. What should I do?", "Oil the hinges. What should I do?", "追问是在复述问题"),
    # nothing said beyond the question itself
    (BASIL, "You want to keep basil alive indoors. Any tips?", "没有超出问题的内容"),
    (BASIL, "Keep basil alive. Is it indoors?", "没有超出问题的内容"),
    (BASIL, "Keep it indoors. Is it alive?", "没有超出问题的内容"),
    # a real follow-up may share a word or two with the question
    (BASIL, "Water it only when the soil is dry. Is your basil indoors all year?", "通过"),
])
def test_checker(prompt, text, reason):
    ok, why = check_answer(prompt, text)
    assert (ok, why) == (reason == "通过", reason)
    assert why in REASONS + ["通过"]


def test_echo_rules_come_last_so_their_counts_are_removed_passes():
    """An answer rejected by an anti-echo rule passes every format rule: the reason counts are the passes each
    new rule removed. Dropping the anti-echo part of the answer's body keeps it failing only on that rule."""
    assert REASONS[-2:] == ECHO_RULES
    echo = "Basil is nice. How do I keep basil alive indoors?"
    assert check_answer("", echo) == (True, "通过")              # without the prompt, format alone passes
    assert check_answer(BASIL, echo)[1] == ECHO_RULES[0]
    empty = "You want to keep basil alive indoors. Any tips?"
    assert check_answer("Tell me something.", empty) == (True, "通过")
    assert check_answer(BASIL, empty)[1] == ECHO_RULES[1]


def test_is_echo_compares_with_each_sentence_of_the_prompt():
    p = "I'm trying to cook rice on the stove. Any advice?"
    assert is_echo("Any advice?", p) and is_echo("How do I cook rice on the stove?", p)
    assert not is_echo("What kind of rice is it?", p) and not is_echo("Do you cook rice on a gas stove?", p)


def test_dataset_chosen_pass_rejected_fail_with_the_echo_rules():
    for name in ("train.json", "heldout.json"):
        for r in json.loads((REPO / "data" / "dpo" / name).read_text("utf-8")):
            assert check_answer(r["prompt"], r["chosen"]) == (True, "通过")
            assert check_answer(r["prompt"], r["rejected"])[0] is False


def test_judge_counts_an_unfinished_answer_as_too_long():
    class Tok:
        def decode(self, ids):
            return " ".join(["Water it daily.", "Is it dry?"][i] for i in ids)
    assert judge(Tok(), BASIL, [0, 1], 3) == (True, "通过", "Water it daily. Is it dry?")
    assert judge(Tok(), BASIL, [0, 1], 2) == (False, "太长（没写完）", "Water it daily. Is it dry?")


# ------------------------------------------------------------------ log-probabilities
def test_sequence_logprob_counts_response_tokens_only_and_ignores_padding():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [rand_ids(n, g) for n in (3, 7, 5)]
    responses = [rand_ids(n, g) for n in (6, 2, 4)]
    got = sequence_logprobs(model, prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = model(ids)[0].double().log_softmax(-1)          # full logits, one unpadded row
        expect = sum(logp[len(p) - 1 + t, r[t]].item() for t in range(len(r)))   # response tokens only
        assert got[i].item() == pytest.approx(expect, abs=1e-4)
    # the prompt tokens themselves are not scored: a response-free row would be zero
    assert sequence_logprobs(model, [prompts[0]], [[]])[0].item() == 0.0
    # number of scored positions = number of response tokens
    _, targets, rows = response_logits(model, prompts, responses)
    assert rows.bincount(minlength=3).tolist() == [len(r) for r in responses]
    assert targets.tolist() == [t for r in responses for t in r]


# ------------------------------------------------------------------ sampling k answers per prompt
def test_sample_k_row_r_is_generate_with_seed_plus_r_and_batch_size_does_not_matter():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = [rand_ids(n, g) for n in (3, 6, 4)]
    k = 3
    got = sample_k(model, prompts, k, 8, temperature=1.0, seed=10, stop_ids=[5], batch=4)
    assert [len(x) for x in got] == [k] * 3
    for i, p in enumerate(prompts):
        for j in range(k):       # row r = i * k + j of the flattened batch, sampled with seed 10 + r
            alone = list(generate(model, p, 8, temperature=1.0, seed=10 + i * k + j, stop_ids=[5]))
            assert got[i][j] == alone
    assert sample_k(model, prompts, k, 8, temperature=1.0, seed=10, stop_ids=[5], batch=64) == got
    assert len({tuple(x) for x in got[0]}) > 1          # k different answers, not one answer k times
