"""Lesson 06's server under attack and faults: one HTTP-level test per defect of the security review
(docs/06 "我们怎样攻击自己的服务器" lists them as a checklist). Each test fails on the server before the fix.

Real servers on 127.0.0.1 (uvicorn in a thread), plain http.client / urllib / sockets and the real openai
SDK; faults are injected by monkeypatching the model or a route. No test asserts a duration: waits are
bounded polls. The unit-level tests of the same defects are in tests/test_serving_security.py.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from test_06_serve import (JWT_SECRET, KEY, MODEL, PASSWORD, USER, assert_error_shape, auth, gauges, make_server,
                           request, serve)

from common.serving import Running

OTHER_KEY = "test-key-other-5b2e90d4"
HI = [{"role": "user", "content": "Hi"}]
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def running(local_fp32, tmp_path_factory):
    db = tmp_path_factory.mktemp("attacks") / "sessions.sqlite3"
    # a high failed-attempt limit: this module's 401 tests all come from 127.0.0.1 (test 5 uses its own servers)
    keys = serve.Auth([KEY, OTHER_KEY], {USER: PASSWORD}, JWT_SECRET, 30, failed_limit=1000)
    srv = make_server(local_fp32, db, auth=keys, max_body=MAX_BODY)
    with Running(srv) as run:
        yield run


def chat(run, key=KEY, **body):
    return request(run, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 2, **body},
                   auth(key))


def stream_events(run, body: dict, key=KEY) -> list:
    """Every `data:` payload of one streaming chat request (parsed JSON, or the string "[DONE]")."""
    conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "stream": True, **body}),
                 {"Content-Type": "application/json", **auth(key)})
    resp = conn.getresponse()
    assert resp.status == 200
    events = [line[6:].strip() for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    conn.close()
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def wait_idle(run, bound_s: float = 60) -> dict:
    """Poll /metrics until no request runs or waits (bounded); the last gauges read."""
    deadline = time.monotonic() + bound_s
    while True:
        g = gauges(run)
        if (g["llm_running_batch_size"], g["llm_queue_length"]) == (0, 0) or time.monotonic() > deadline:
            return g
        time.sleep(0.1)


# ------------------------------------------------------------------ 1. one request must not kill the engine
def test_huge_seed_is_422_naming_the_parameter(running):
    for seed in (2**64, -2**63 - 1):
        status, _, body = chat(running, seed=seed)
        assert status == 422 and body["error"]["param"] == "seed", body
    status, _, body = request(running, "POST", "/v1/generate", {"prompt": "hi", "seed": 2**64}, auth())
    assert status == 422 and body["error"]["param"] == "seed"
    assert chat(running, seed=2**64 - 1, temperature=1.0)[0] == 200      # the edges themselves are fine
    assert chat(running, seed=-2**63, temperature=1.0)[0] == 200


def test_a_job_that_fails_to_start_fails_alone(running, local_fp32):
    """A job the engine cannot admit (a seed manual_seed refuses, submitted past the API) ends with "error";
    the engine thread lives on and serves the next request."""
    done = threading.Event()
    job = serve.Job([1, 2, 3], 2, seed=2**70, on_event=lambda kind, value: kind == "done" and done.set())
    running.srv.engine.submit(job)
    assert done.wait(60) and job.finish_reason == "error"
    assert running.srv.engine.alive() and request(running, "GET", "/readyz")[0] == 200
    assert chat(running)[0] == 200


def test_engine_survives_a_fault_in_a_step(running, local_fp32, monkeypatch):
    """The model raises once inside a step: that request gets an OpenAI-shaped 500 (JSON, engine_error), a
    stream gets a final error event and [DONE]; the next requests are served."""
    real = local_fp32.model.forward
    faults = []

    def forward_failing_once(*a, **kw):
        if len(faults) < 1:
            faults.append(1)
            raise RuntimeError("injected fault")
        return real(*a, **kw)
    monkeypatch.setattr(local_fp32.model, "forward", forward_failing_once)
    status, headers, body = chat(running)
    assert status == 500 and headers["content-type"].startswith("application/json")
    assert_error_shape(body)
    assert (body["error"]["type"], body["error"]["code"]) == ("server_error", "engine_error")
    faults.clear()
    events = stream_events(running, {"messages": HI, "max_tokens": 2})
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error", events
    assert chat(running)[0] == 200 and running.srv.engine.alive()


def test_readyz_is_not_ready_when_the_engine_thread_is_gone(local_fp32, tmp_path):
    with Running(make_server(local_fp32, tmp_path / "s.sqlite3")) as run:
        assert request(run, "GET", "/readyz")[0] == 200
        run.srv.engine.stop()                       # the thread ends (as a crashed one would)
        status, _, body = request(run, "GET", "/readyz")
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert chat(run)[0] == 503


# ------------------------------------------------------------------ 2./9. sessions are private per caller
def test_two_keys_starting_the_same_session_concurrently_see_only_their_own(running):
    sid = "shared-new-id"
    results = {}

    def talk(key):
        for i in range(2):
            results[key, i] = request(running, "POST", "/v1/generate", {"prompt": f"{key} says {i}",
                                                                       "max_new_tokens": 2, "session_id": sid},
                                      auth(key))[0]
    threads = [threading.Thread(target=talk, args=(k,)) for k in (KEY, OTHER_KEY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {200}
    for key, other in ((KEY, OTHER_KEY), (OTHER_KEY, KEY)):
        msgs = request(running, "GET", f"/v1/sessions/{sid}", headers=auth(key))[2]["messages"]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        assert users == [f"{key} says 0", f"{key} says 1"], msgs
        assert all(other not in m["content"] for m in msgs)


def test_another_callers_session_looks_exactly_like_an_unused_one(running):
    sid = request(running, "POST", "/v1/generate", {"prompt": "mine", "max_new_tokens": 2}, auth())[2]["session_id"]
    for method in ("GET", "DELETE"):
        theirs = request(running, method, f"/v1/sessions/{sid}", headers=auth(OTHER_KEY))
        unused = request(running, method, "/v1/sessions/never-used-id", headers=auth(OTHER_KEY))
        assert theirs[0] == unused[0] == 404
        assert theirs[2]["error"]["code"] == unused[2]["error"]["code"] == "session_not_found"
        assert theirs[2]["error"]["message"].replace(sid, "ID") == unused[2]["error"]["message"].replace("never-used-id", "ID")
    assert request(running, "GET", f"/v1/sessions/{sid}", headers=auth())[0] == 200    # still there for its owner


# ------------------------------------------------------------------ 3. identities survive reordering keys
def test_reordering_api_keys_keeps_a_callers_sessions(local_fp32, tmp_path):
    db = tmp_path / "s.sqlite3"
    with Running(make_server(local_fp32, db, auth=serve.Auth([KEY, OTHER_KEY], {}, "", 30))) as run:
        sid = request(run, "POST", "/v1/generate", {"prompt": "keep me", "max_new_tokens": 2},
                      auth(OTHER_KEY))[2]["session_id"]
    with Running(make_server(local_fp32, db, auth=serve.Auth([OTHER_KEY, KEY], {}, "", 30))) as run:
        status, _, body = request(run, "GET", f"/v1/sessions/{sid}", headers=auth(OTHER_KEY))
        assert status == 200 and body["messages"][0]["content"] == "keep me"
        assert request(run, "GET", f"/v1/sessions/{sid}", headers=auth(KEY))[0] == 404
    with Running(make_server(local_fp32, db, auth=serve.Auth([KEY], {}, "", 30))) as run:   # revoked
        assert request(run, "GET", f"/v1/sessions/{sid}", headers=auth(OTHER_KEY))[0] == 401
        assert request(run, "GET", f"/v1/sessions/{sid}", headers=auth(KEY))[0] == 404


# ------------------------------------------------------------------ 5. guessing credentials is throttled
def test_guessing_passwords_and_keys_gets_429(local_fp32, tmp_path):
    srv = make_server(local_fp32, tmp_path / "s.sqlite3")
    with Running(srv) as run:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        statuses = [request(run, "POST", "/oauth/token", raw=f"username=alice&password=guess{i}".encode(),
                            headers=form)[0] for i in range(100)]
        assert statuses[0] == 401 and statuses[-1] == 429 and set(statuses) == {401, 429}
        status, headers, body = request(run, "GET", "/v1/models", headers=auth(KEY))     # even the right key
        assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["code"] == "too_many_failed_attempts"
    with Running(make_server(local_fp32, tmp_path / "s.sqlite3")) as run:
        statuses = [request(run, "GET", "/v1/models", headers=auth(f"wrong-{i}"))[0] for i in range(100)]
        assert statuses[0] == 401 and statuses[-1] == 429 and set(statuses) == {401, 429}


# ------------------------------------------------------------------ 7. every error is OpenAI-shaped JSON
@pytest.mark.parametrize("part, code, param", [
    ({"type": "text", "text": 123}, "invalid_value", "messages.0.content.0.text"),
    ({"type": "text", "text": None}, "invalid_value", "messages.0.content.0.text"),
    ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "unsupported_content_type", "messages.0.content.0.type"),
])
def test_bad_content_parts_are_400_naming_the_part(running, part, code, param):
    status, headers, body = chat(running, messages=[{"role": "user", "content": [part]}])
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert_error_shape(body)
    assert (body["error"]["code"], body["error"]["param"]) == (code, param)
    if part["type"] != "text":
        assert "image_url" in body["error"]["message"]
    ok = chat(running, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert ok[0] == 200


@pytest.mark.parametrize("claims", [{"iat": 0}, {"sub": USER}, {"exp": 4102444800}])
def test_signed_jwt_without_sub_or_exp_is_json_401(running, claims):
    import jwt

    status, headers, body = request(running, "GET", "/v1/models",
                                    headers=auth(jwt.encode(claims, JWT_SECRET, algorithm="HS256")))
    assert status == 401 and headers["content-type"].startswith("application/json")
    assert body["error"]["code"] == "invalid_api_key"


def test_an_unexpected_exception_in_a_route_is_json_500(running, monkeypatch):
    def broken(*a, **kw):
        raise KeyError("injected bug")
    monkeypatch.setattr(running.srv, "history", broken)
    status, headers, body = chat(running)
    assert status == 500 and headers["content-type"].startswith("application/json")
    assert_error_shape(body)
    assert body["error"]["type"] == "server_error" and "injected" not in body["error"]["message"]


# ------------------------------------------------------------------ 11. unsupported parameters are refused
@pytest.mark.parametrize("field, value", [("presence_penalty", 0.5), ("frequency_penalty", 1), ("logit_bias", {"50": 5}),
                                          ("logprobs", True), ("top_logprobs", 2), ("n", 2),
                                          ("tools", [{"type": "web_search_preview"}]),
                                          ("response_format", {"type": "json_grammar"}), ("temperture", 0.5)])
def test_unsupported_parameters_are_400_naming_them(running, field, value):
    """(Function tools and response_format json_object / json_schema are honoured: tests/test_06_structured.py;
    other tool types and response_format types are still refused here.)"""
    status, _, body = chat(running, **{field: value})
    assert status == 400 and body["error"]["code"] == "unsupported_parameter", body
    assert body["error"]["param"] == field and field in body["error"]["message"]


def test_default_values_and_annotations_are_accepted(running):
    status, _, body = chat(running, n=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, logprobs=False,
                           user="learner-7")
    assert status == 200, body
    status, _, body = request(running, "POST", "/v1/generate", {"prompt": "hi", "max_tokens": 3}, auth())
    assert status == 400 and body["error"]["param"] == "max_tokens"


# ------------------------------------------------------------------ 4. a client that leaves frees its slot
def record_jobs(run, monkeypatch) -> list:
    """Every Job submitted to the engine from now on (to read its finish_reason and tokens afterwards)."""
    jobs, submit = [], run.srv.engine.submit
    monkeypatch.setattr(run.srv.engine, "submit", lambda job: jobs.append(job) or submit(job))
    return jobs


def test_non_streaming_client_that_disconnects_is_cancelled(running, monkeypatch):
    jobs = record_jobs(running, monkeypatch)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 200, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-API-Key: " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 60
    while not (jobs and jobs[0].generated) and time.monotonic() < deadline:    # generation has started
        time.sleep(0.02)
    sock.close()
    g = wait_idle(running)
    assert (g["llm_running_batch_size"], g["llm_queue_length"]) == (0, 0)
    assert jobs[0].finish_reason == "cancelled" and len(jobs[0].generated) < 200


@pytest.mark.slow
def test_fifty_streams_half_disconnecting(local_fp32, tmp_path):
    """50 concurrent streams, half closed right after their first token: every slot is freed, the
    others all complete, and the closed ones stopped early."""
    srv = make_server(local_fp32, tmp_path / "s.sqlite3", max_batch=16, max_queue=64)
    outcomes = {}

    def client(i: int):
        leave = i % 2 == 0
        conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=300)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}."}], "stream": True,
             "max_tokens": 64 if leave else 6, "ignore_eos": leave}), {"Content-Type": "application/json", **auth()})
        resp, lines = conn.getresponse(), []
        while (line := resp.fp.readline()) and not (leave and len(lines) == 2):
            if line.startswith(b"data: "):
                lines.append(line[6:].strip())
        if leave:
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        outcomes[i] = lines
    with Running(srv) as run:
        jobs, submit = [], srv.engine.submit
        srv.engine.submit = lambda job: jobs.append(job) or submit(job)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        g = wait_idle(run, 120)
        assert (g["llm_running_batch_size"], g["llm_queue_length"]) == (0, 0) and srv.engine.busy() == (0, 0)
    assert len(outcomes) == 50 and len(jobs) == 50
    for i, lines in outcomes.items():
        if i % 2:
            assert lines[-1] == b"[DONE]", lines
    left = [j for j in jobs if j.max_new_tokens == 64]
    assert len(left) == 25 and all(j.finish_reason == "cancelled" and len(j.generated) < 64 for j in left)


# ------------------------------------------------------------------ 6. authenticate first, cap the body
def raw_exchange(run, head: bytes, body_parts=(), bound_s: float = 60) -> tuple[int, dict]:
    """Send a request head and some body bytes on a raw socket; (status, JSON body) of the answer. The
    socket timeout only bounds a broken server: a server that waits for the rest of the body never answers."""
    sock = socket.create_connection(("127.0.0.1", run.port), timeout=bound_s)
    try:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):     # the server answered and closed early
                break
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                data.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0] if b"content-length: " in data else 0):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head_text, _, payload = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(payload)


def post_head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n").encode()


def test_unauthenticated_body_is_never_read(running):
    """Content-Length says 100 MB, only a few bytes come: the answer is 401 at once (no body is awaited)."""
    status, body = raw_exchange(running, post_head("/v1/chat/completions", "Content-Length: 100000000\r\n"),
                                [b'{"model": '])
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_oversize_body_is_413(running):
    status, body = raw_exchange(running, post_head("/v1/chat/completions",
                                                   f"X-API-Key: {KEY}\r\nContent-Length: {MAX_BODY + 1}\r\n"), [b"{"])
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert_error_shape(body)
    chunk = b"x" * 8192
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_BODY // len(chunk) + 2) + [b"0\r\n\r\n"]
    status, body = raw_exchange(running, post_head("/v1/chat/completions",
                                                   f"X-API-Key: {KEY}\r\nTransfer-Encoding: chunked\r\n"), chunks)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = raw_exchange(running, post_head("/oauth/token", f"Content-Length: {MAX_BODY + 1}\r\n"), [b"u"])
    assert status == 413                                   # every path is capped, not only /v1/
    assert chat(running, stop=["z" * 1000] * 40)[0] == 200        # 40 KB, under the cap: served


# ------------------------------------------------------------------ 8. credentials never reach the log
def test_query_string_credentials_never_reach_the_access_log(local_fp32, tmp_path, capfd):
    import logging

    secret = "sk-query-secret-77a1c0"
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    keep = Keep()
    with Running(make_server(local_fp32, tmp_path / "s.sqlite3"), log_level="info") as run:
        logging.getLogger("uvicorn.access").addHandler(keep)
        try:
            assert request(run, "GET", f"/v1/models?api_key={secret}", headers=auth())[0] == 200
            assert request(run, "GET", f"/v1/models?api_key={secret}")[0] == 401
            assert request(run, "GET", f"/healthz?token={secret}")[0] == 200
        finally:
            logging.getLogger("uvicorn.access").removeHandler(keep)
    out, err = capfd.readouterr()
    assert len(lines) == 3 and all("/v1/models?" in x or "/healthz?" in x for x in lines), lines
    assert secret not in "\n".join(lines) + out + err


# ------------------------------------------------------------------ 10. shutdown says what it cut
def test_shutdown_sends_an_error_event_to_streams_it_cuts(local_fp32, tmp_path, capsys):
    srv = make_server(local_fp32, tmp_path / "s.sqlite3")
    srv.stop_note = "[服务] 已停止：{requests}。"
    events, started = [], threading.Event()

    def long_stream():
        conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": HI, "max_tokens": 200, "ignore_eos": True, "stream": True}),
            {"Content-Type": "application/json", **auth()})
        resp = conn.getresponse()
        while line := resp.fp.readline():
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                started.set()
        conn.close()
    run = Running(srv, grace=2)
    with run:
        reader = threading.Thread(target=long_stream)
        reader.start()
        assert started.wait(60)
    reader.join(timeout=60)
    assert events[-1] == b"[DONE]", events
    last = json.loads(events[-2])
    assert (last["error"]["type"], last["error"]["code"]) == ("server_error", "server_shutdown")
    assert "正在关闭" in last["error"]["message"]
    assert srv.cut == 1 and "1 个请求在宽限期结束时被中断" in capsys.readouterr().out


# ------------------------------------------------------------------ 12. /v1/embeddings (lesson 03 against this server)
def test_embeddings_with_the_openai_sdk_equal_the_course_encoder(running):
    import numpy as np
    import openai

    from common.embeddings import load_local_embedder

    texts = ["The cat sat on the mat.", "Continuous batching shares each decode step."]
    client = openai.OpenAI(base_url=running.base_url, api_key=KEY, max_retries=0)
    assert serve.EMBEDDING_MODEL in [m.id for m in client.models.list()]
    resp = client.embeddings.create(model=serve.EMBEDDING_MODEL, input=texts)          # base64 by default
    want = load_local_embedder().embed(texts)
    got = np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 0
    floats = client.embeddings.create(model=serve.EMBEDDING_MODEL, input=texts[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, want[0], atol=1e-5)
    status, _, body = request(running, "POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"},
                              auth())
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_lesson_03_client_uses_api_chat_and_api_embeddings(running, monkeypatch):
    from common.client import LLMClient

    monkeypatch.delenv("OPENAI_EMBEDDING_MODEL", raising=False)
    client = LLMClient(base_url=running.base_url, api_key=KEY, verbose=False)
    assert client.backend == "openai" and client.model_name == MODEL
    assert client.embed_name == f"openai:{serve.EMBEDDING_MODEL}"
    vecs = client.embed(["a question", "an answer"])
    assert vecs.shape == (2, 384) and not client.embed_local
    assert client.chat("Hi", max_tokens=2, temperature=0)
    assert client.backend == "openai"
