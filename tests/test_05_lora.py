"""Tests for 05_lora.py: LoRA invariants checked against the untouched base model.

Uses the real local model (fp32). Each test works on short inputs so the file stays fast.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "05_lora.py"


L5 = importlib.import_module("05_lora")


@pytest.fixture(scope="module")
def lm(local_fp32):
    return local_fp32


@pytest.fixture(scope="module")
def probe(lm):
    """Two held-out prompts of equal length cut to 24 tokens (a batch without padding)."""
    rows = L5.load_examples(REPO / "data" / "lora" / "eval.json")
    ids = [L5.prompt_ids(lm.tokenizer, r)[:24] for r in rows[:2]]
    return torch.tensor(ids)


def _wrapped(lm, targets=("q", "k", "v", "o"), rank=4, alpha=8.0):
    model = copy.deepcopy(lm.model)
    L5.inject_lora(model, list(targets), rank, alpha)
    return model


def _randomize_b(model, seed=0):
    """B starts at zero (so the LoRA update is zero); give it random values so merge has something to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L5.lora_modules(model).values():
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.02)


def test_b_zero_gives_base_outputs_exactly(lm, probe):
    model = _wrapped(lm, targets=("q", "k", "v", "o", "gate", "up", "down"))
    with torch.no_grad():
        assert torch.equal(model(probe), lm.model(probe))


def test_only_lora_params_get_gradients(lm, probe):
    model = _wrapped(lm)
    model.train()
    labels = probe.clone()
    labels[:, :16] = -100
    L5.answer_loss(model, probe, labels).backward()
    lora_ids = {id(p) for m in L5.lora_modules(model).values() for p in (m.A, m.B)}
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # with B = 0 the gradient reaches B (A's gradient is exactly zero, since dL/dA ∝ Bᵀ)
    assert any(m.B.grad.abs().sum() > 0 for m in L5.lora_modules(model).values())


@pytest.mark.parametrize("targets,rank", [(("q", "v"), 8), (("q", "k", "v", "o", "gate", "up", "down"), 2)])
def test_param_count_is_r_times_in_plus_out(lm, targets, rank):
    model = _wrapped(lm, targets, rank)
    mods = L5.lora_modules(model)
    assert len(mods) == lm.config.n_layers * len(targets)
    for m in mods.values():
        out_f, in_f = m.base.weight.shape          # read the shapes from the real weight, not from the config
        assert m.A.numel() + m.B.numel() == rank * (in_f + out_f)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(rank * (m.base.weight.shape[0] + m.base.weight.shape[1]) for m in mods.values())
    rep = L5.param_report(model, list(targets))
    assert rep["trainable"] == trainable
    assert rep["total"] == sum(p.numel() for p in lm.model.parameters()) + trainable
    # the script's closed-form arithmetic agrees with the real module count
    cfg = lm.config
    ar = L5.lora_arithmetic(cfg.n_layers, cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim, cfg.vocab_size,
                            True, list(targets), rank)
    assert ar["lora_params"] == trainable
    assert ar["total_params"] == sum(p.numel() for p in lm.model.parameters())


def test_default_config_trains_under_one_percent(lm):
    a = L5.resolve_args([])
    model = _wrapped(lm, a.targets, a.rank, a.alpha)
    assert L5.param_report(model, a.targets)["trainable_pct"] < 1.0


def test_merge_same_outputs_and_unmerge_restores_bitwise(lm, probe):
    model = _wrapped(lm, rank=4, alpha=8.0)
    _randomize_b(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(probe)
        assert not torch.equal(unmerged, lm.model(probe))          # the adapter really changes the outputs
        for m in L5.lora_modules(model).values():
            m.merge()
        merged = model(probe)
        # fp32, only the summation order differs: x·Wᵀ + s·(x·Aᵀ)·Bᵀ vs x·(W + s·B·A)ᵀ. Logits are O(10).
        assert (merged - unmerged).abs().max().item() < 1e-3
        assert torch.equal(merged.argmax(-1), unmerged.argmax(-1))
        # an independent reference for the merged weight: W + (alpha/r)·B·A computed in float64
        n, m = next(iter(L5.lora_modules(model).items()))
        w0 = lm.model.get_submodule(n).weight.double()
        expect = w0 + (m.alpha / m.rank) * (m.B.double() @ m.A.double())
        assert torch.allclose(m.base.weight.double(), expect, atol=1e-6)
        for m in L5.lora_modules(model).values():
            m.unmerge()
        for n, m in L5.lora_modules(model).items():
            assert torch.equal(m.base.weight, lm.model.get_submodule(n).weight), n
        assert torch.equal(model(probe), unmerged)


def test_adapter_save_load_round_trip(lm, probe, tmp_path):
    model = _wrapped(lm, targets=("q", "v"), rank=4, alpha=8.0)
    _randomize_b(model, seed=1)
    path = tmp_path / "adapter.safetensors"
    L5.save_adapter(model, path, {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]})
    weights_mb = sum(p.numel() * 4 for p in lm.model.parameters()) / 2**20
    assert path.stat().st_size / 2**20 < weights_mb / 50          # only A and B are stored

    fresh = _wrapped(lm, targets=("q", "v"), rank=4, alpha=8.0)  # new random A, zero B
    meta = L5.load_adapter(fresh, path)
    assert meta == {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]}
    for (n1, m1), (n2, m2) in zip(L5.lora_modules(model).items(), L5.lora_modules(fresh).items()):
        assert n1 == n2 and torch.equal(m1.A, m2.A) and torch.equal(m1.B, m2.B)
    with torch.no_grad():
        assert torch.equal(model(probe), fresh(probe))

    from common.errors import UserError
    with pytest.raises(UserError):
        L5.load_adapter(_wrapped(lm, targets=("q", "v"), rank=2), path)           # other rank
    with pytest.raises(UserError):
        L5.load_adapter(_wrapped(lm, targets=("q", "k", "v"), rank=4), path)      # other targets


def test_answer_loss_matches_full_logits_reference(lm):
    """The answer-only lm_head shortcut gives the same loss as cross-entropy on the model's full logits."""
    tok = lm.tokenizer
    rows = L5.load_examples(REPO / "data" / "lora" / "train.json")[:3]
    data = [L5.encode_example(tok, r) for r in rows]
    for ex, (ids, labels) in zip(rows, data):
        n_prompt = len(L5.prompt_ids(tok, ex))
        assert labels[:n_prompt] == [-100] * n_prompt                         # the prompt is masked
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.im_end  # the answer (and its end) is learned
        assert tok.decode(ids[n_prompt:-1]) == ex["output"]
    ids, labels = L5.collate(data, 0)
    with torch.no_grad():
        ours = L5.answer_loss(lm.model, ids, labels)
        logits = lm.model(ids)
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_batched_greedy_matches_local_generate(lm):
    tok = lm.tokenizer
    rows = L5.load_examples(REPO / "data" / "lora" / "eval.json")[:2]
    prompts = [L5.prompt_ids(tok, r)[:30] for r in rows] + [L5.prompt_ids(tok, rows[0])[:29]]  # two share a length
    ours = L5.greedy_generate(lm.model, prompts, 4, tok.eos_ids, torch.device("cpu"))
    for p, o in zip(prompts, ours):
        assert o == list(lm.generate(p, 4))


def test_dataset_files_and_generator_are_consistent(tmp_path, monkeypatch):
    d = REPO / "data" / "lora"
    train, ev = json.loads((d / "train.json").read_text("utf-8")), json.loads((d / "eval.json").read_text("utf-8"))
    assert len(train) >= 200 and len(ev) >= 50
    for r in train + ev:
        assert set(r) == {"instruction", "input", "output"}
        assert L5.ANSWER_RE.match(r["output"])
    assert not {r["input"] for r in train} & {r["input"] for r in ev}       # held-out messages are unseen
    # the committed JSON is exactly what the deterministic generator writes
    spec = importlib.util.spec_from_file_location("make_dataset", d / "make_dataset.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "HERE", tmp_path)
    gen.main()
    for name in ("train.json", "eval.json"):
        assert (tmp_path / name).read_bytes() == (d / name).read_bytes()


@pytest.mark.parametrize("args", [["--rank", "0"], ["--targets", "q,foo"], ["--lr", "-1"], ["--dropout", "1.5"],
                                  ["--data", "no/such/file.json"], ["--steps", "abc"]])
def test_bad_flags_exit_nonzero(args, script_env):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=script_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(("错误：", "usage:", "05_lora.py: error"))


def test_bad_data_file_is_a_user_error(tmp_path, script_env):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x"}]', encoding="utf-8")
    r = subprocess.run([sys.executable, str(SCRIPT), "--data", str(bad)], cwd=REPO, env=script_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "错误：" in r.stderr


def test_quick_run_end_to_end(script_env):
    """A smaller-than---quick run: the whole pipeline, then check the invariants it reports."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--steps", "3", "--eval-n", "2", "--full-ft", "1"],
                       cwd=REPO, env=script_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = Path(script_env["LLM_COURSE_OUTPUTS"]) / "05_lora"
    res = json.loads((out / "results.json").read_text("utf-8"))
    assert res["params"]["trainable_pct"] < 1
    assert res["heldout_loss"]["after"] < res["heldout_loss"]["before"]
    assert res["merge"]["max_abs_logit_diff"] < res["merge"]["tolerance"]
    assert res["merge"]["unmerge_bitwise_restored"] and res["adapter"]["reload_bitwise_equal"]
    cmp = res["comparison"]
    assert cmp["full"]["optimizer_state_mb"] > 50 * cmp["lora"]["optimizer_state_mb"]
    assert cmp["lora"]["trainable_mb"] * 2**20 == 4 * res["params"]["trainable"]        # fp32 A and B
    assert (out / "loss_curve.png").is_file() and (out / "adapter.safetensors").is_file()
