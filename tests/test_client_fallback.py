"""Each capability of LLMClient falls back on its own (lesson 03 pointed at a chat-only server).

A server without /v1/embeddings must not move generation to the local model, and the switch is said in
one line. Uses the standard-library OpenAI test server; the local embedder is faked at its boundary
(loading the real MiniLM is tested in tests/test_embeddings.py)."""
from __future__ import annotations

import numpy as np
import pytest

from common import client as client_mod
from tests.openai_test_server import run_server


class FakeEmbedder:
    def embed(self, texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2.0


@pytest.fixture
def chat_only_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr("common.embeddings.load_local_embedder", lambda: FakeEmbedder())
    with run_server() as server:
        server.serve_embeddings = False
        yield server


def test_embeddings_fail_over_alone_and_chat_stays_on_the_api(chat_only_server, capsys):
    c = client_mod.LLMClient(backend="auto", base_url=chat_only_server.base_url, api_key="k", model="test-model",
                             verbose=False)
    assert c.backend == "openai" and c.embed_name.startswith("openai:")
    vecs = c.embed(["a b", "c"])
    assert vecs.shape == (2, 4) and c.embed_name == "local:all-MiniLM-L6-v2"
    err = capsys.readouterr().err
    assert err.count("[后端]") == 1 and "嵌入" in err and "生成不受影响" in err
    assert c.backend == "openai" and c.chat("hello there", max_tokens=5) == "Echo: hello there"
    assert len(chat_only_server.requests_to("/chat/completions")) == 1
    c.embed(["again"])                                   # decided once: no second 404, no second notice
    assert len(chat_only_server.requests_to("/embeddings")) == 1 and "[后端]" not in capsys.readouterr().err


def test_explicit_openai_backend_still_raises_when_embeddings_fail(chat_only_server):
    c = client_mod.LLMClient(backend="openai", base_url=chat_only_server.base_url, api_key="k", model="test-model",
                             verbose=False)
    with pytest.raises(client_mod.LLMError, match="404"):
        c.embed(["a"])


def test_chat_failure_does_not_move_embeddings(monkeypatch, capsys):
    monkeypatch.setattr("common.embeddings.load_local_embedder", lambda: FakeEmbedder())
    with run_server() as server:
        c = client_mod.LLMClient(backend="auto", base_url=server.base_url, api_key="k", model="test-model",
                                 verbose=False)
        monkeypatch.setattr(c, "_local_stream", lambda *a, **k: iter(["local answer"]))
        server.mode = "500"
        assert c.chat("hi", max_tokens=3) == "local answer" and c.backend == "local"
        server.mode = "ok"
        c.embed(["a b"])
        assert c.embed_name.startswith("openai:") and len(server.requests_to("/embeddings")) == 1
