"""common/loadtest.py without a server: the report's findings from a synthetic load-test result.

The end-to-end run (a real server, real clients) is tests/test_06_serve.py::test_demo_quick_runs.
"""
from __future__ import annotations

import pytest

from common import loadtest


def row(clients: int, tok_s: float, ttft: float = 100.0, tpot: float = 30.0) -> dict:
    return {"clients": clients, "requests": clients, "tokens": 24 * clients, "seconds": 1.0, "tok_s": tok_s,
            "steady_tok_s": tok_s, "ttft_p50_ms": ttft, "ttft_p95_ms": ttft, "tpot_p50_ms": tpot, "tpot_p95_ms": tpot}


def synthetic(batching: list[float]) -> dict:
    clients = [1, 2, 4, 8]
    return {"one_at_a_time": [row(c, 10.0, ttft=100.0 * c) for c in clients],
            "batching": [row(c, t, tpot=20.0 + c) for c, t in zip(clients, batching)],
            "step_ms": {1: 25.0, 2: 27.0, 4: 30.0, 8: 40.0}, "alone_ms": {"decode": 25.0, "prefill": 60.0},
            "same_text": 15, "compared": 15}


def test_report_findings(capsys):
    load = synthetic([10.0, 19.0, 36.0, 40.0])
    found = loadtest.report(load, weight_mb=538.0)
    out = capsys.readouterr().out
    assert found["speedup"] == {1: 1.0, 2: 1.9, 4: 3.6, 8: 4.0}
    assert found["speedup_steady"] == found["speedup"]
    assert found["flattens_at"] == 8                     # 4 -> 8 clients adds only 11%
    assert found["ceiling"]["clients"] == 8 and found["ceiling"]["rows"] == 8
    assert found["ceiling"]["max_speedup"] == pytest.approx(loadtest.ceiling(load, 8)["max_speedup"])
    assert "4.00 倍" in out and "15/15" in out and "538 MB" in out


def test_report_without_flattening_or_ceiling(capsys):
    load = synthetic([10.0, 19.0, 36.0, 70.0])
    del load["alone_ms"]
    found = loadtest.report(load, weight_mb=None, dtype="int8")
    assert found["flattens_at"] is None and found["ceiling"] is None
    assert "没有变平" in capsys.readouterr().out
