"""benchmarks/vs_llamacpp.py end to end, cheaply: a stub OpenAI server stands in for llama.cpp's server, and
the benchmark starts the real `06_serve.py` (SmolLM2 fp32) as a subprocess for 1 client x 1 request."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.openai_test_server import run_server

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("vs_llamacpp", ROOT / "benchmarks" / "vs_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_ratios_are_against_the_reference():
    bench = load_benchmark()
    results = [{"name": "ref", "reference": True, "rows": [{"tok_s": 50.0}, {"tok_s": 100.0}]},
               {"name": "ours", "rows": [{"tok_s": 25.0}, {"tok_s": 150.0}]}]
    text = bench.table(results, [1, 8])
    assert "| 1 | 50.0 | 25.0 (0.50×) |" in text
    assert "| 8 | 100.0 | 150.0 (1.50×) |" in text
    # every client sends the same requests to every server
    assert bench.plans(2, 2, 48) == bench.plans(2, 2, 48)
    assert all(n == 48 for plan in bench.plans(3, 2, 48) for _, n in plan)


@pytest.mark.slow            # starts the real 06_serve.py with SmolLM2 as a subprocess: an end-to-end run
def test_runs_a_stub_reference_and_lesson_06(tmp_path, capsys):
    pytest.importorskip("openai")
    bench = load_benchmark()
    out = tmp_path / "vs.json"
    with run_server() as server:
        rc = bench.main(["--url", server.base_url, "--api-key", "test-key", "--model", "test-model",
                         "--clients", "1", "--requests-per-client", "1", "--max-tokens", "4",
                         "--dtypes", "fp32", "--out", str(out)])
        sent = [r for r in server.requests if r["path"].endswith("/chat/completions")]
    assert rc == 0
    assert sent and all(r["json"]["stream"] and r["json"]["temperature"] == 0 for r in sent)
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["reference", "lesson 06 fp32"]
    ours = data["results"][1]["rows"][0]
    assert ours["clients"] == 1 and ours["requests"] == 1 and ours["tokens"] == 4    # ignore_eos: exactly 4
    assert ours["tok_s"] > 0
    printed = capsys.readouterr().out
    assert "| clients | reference | lesson 06 fp32 |" in printed and "×)" in printed
    assert "load average" in printed
