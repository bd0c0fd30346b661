"""Lesson 06 (serving): the continuous-batching engine and the OpenAI-compatible server.

Real servers on 127.0.0.1 (uvicorn in a thread, or `python 06_serve.py` as a subprocess), the real
`openai` client and plain urllib / http.client; no mocks. The independent reference for generated
tokens is common/generate.generate (one prompt alone, no batching, no server).
"""
from __future__ import annotations

import http.client
import importlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common import loadtest
from common.serving import RateLimiter, Running

serve = importlib.import_module("06_serve")

KEY = "test-key-3f9a1c77"
USER, PASSWORD = "alice", "pw-7d1e0b"
JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"
MODEL = serve.MODEL_IDS["smollm2"]


def make_server(lm, db, **kw) -> "serve.Server":
    settings = dict(auth=serve.Auth([KEY], {USER: PASSWORD}, JWT_SECRET, 30), rate_limit_rpm=0, session_db=db,
                    max_batch=4, max_context=256, prefill_chunk=16, max_queue=8, default_max_tokens=16,
                    load_model=lambda: lm)
    settings.update(kw)
    return serve.Server(**settings)


@pytest.fixture(scope="module")
def running(local_fp32, tmp_path_factory):
    db = tmp_path_factory.mktemp("serve") / "sessions.sqlite3"
    with Running(make_server(local_fp32, db)) as run:
        yield run


def request(run, method, path, body=None, headers=None, raw=None):
    """(status, headers, parsed JSON body) of one plain HTTP request to the server."""
    url = run.base_url.removesuffix("/v1") + path
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def reference(lm, content: str, n: int) -> str:
    from common.generate import generate

    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": content}])
    return lm.tokenizer.decode(list(generate(lm.model, ids, n, stop_ids=lm.tokenizer.eos_ids)))


def assert_error_shape(body):
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body


# ------------------------------------------------------------------ the engine
def test_engine_batched_greedy_tokens_equal_running_alone(local_fp32):
    """Requests of different prompt lengths join a running batch at different steps (chunked prefill
    of 16 tokens, 3 rows for 5 requests, so some wait and reuse a freed row; the shared system prompt
    comes from the prefix cache, except for the request with its own system message): every request's
    greedy tokens equal common/generate.generate run on that prompt alone."""
    from common.generate import generate

    lm, tok = local_fp32, local_fp32.tokenizer
    prompts = ["Hi", "What is the capital of France?", "Write a poem about the sea, the wind and the stars.",
               "List three fruits.", "Explain gravity to a child in two short sentences, using simple words."]
    lengths = [4, 6, 3, 5, 4]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    chats[3].insert(0, {"role": "system", "content": "You are a grocer."})      # no prefix-cache hit
    ids = [tok.apply_chat_template(c) for c in chats]
    expected = [list(generate(lm.model, p, n, stop_ids=tok.eos_ids)) for p, n in zip(ids, lengths)]
    engine = serve.Engine(lm.model, max_batch=3, max_len=128, prefill_chunk=16)
    prefix = tok.apply_chat_template([], add_generation_prompt=False)
    engine.set_prefix(prefix)
    engine.start()
    got, done = {}, threading.Semaphore(0)
    try:
        for i, (p, n) in enumerate(zip(ids, lengths)):
            got[i] = []
            engine.submit(serve.Job(p, n, stop_ids=frozenset(tok.eos_ids), on_event=lambda kind, v, i=i:
                                    got[i].append(v) if kind == "token" else done.release()))
            time.sleep(0.02 * i)               # arrive while others are running
        for _ in ids:
            assert done.acquire(timeout=300)
    finally:
        engine.stop()
    assert [got[i] for i in range(len(ids))] == expected
    assert engine.busy() == (0, 0)
    assert max(engine.step_stats) > 1, "no step ran more than one sequence at once"
    assert engine.prefix_hits == 4 * len(prefix)


def test_engine_rejects_too_long_and_full_queue(local_fp32):
    engine = serve.Engine(local_fp32.model, max_batch=1, max_len=32, prefill_chunk=8, max_queue=1)  # not started
    with pytest.raises(ValueError):
        engine.submit(serve.Job(list(range(30)), 5))
    engine.submit(serve.Job([1, 2, 3], 2))
    with pytest.raises(serve.QueueFull):
        engine.submit(serve.Job([1, 2, 3], 2))


def test_kv_cache_load_prefix_equals_prefilling_the_prefix(local_fp32):
    """KVCache.load_prefix fills a reused row (stale contents, other rows busy) exactly as prefilling the prefix
    there would: the next token's logits match, and the row's length, position and valid columns are the prefix's."""
    import torch

    model, tok = local_fp32.model, local_fp32.tokenizer
    prefix = tok.apply_chat_template([], add_generation_prompt=False)
    rest = tok.apply_chat_template([{"role": "user", "content": "Hi"}])[len(prefix):]
    P = len(prefix)
    alone = model.new_cache(1, P)
    with torch.inference_mode():
        model(torch.tensor([prefix]), cache=alone)
        ks, vs = [k[0, :, :P].clone() for k in alone.k], [v[0, :, :P].clone() for v in alone.v]
        ref = model.new_cache(1, 2 * P + 8)
        want = model(torch.tensor([prefix + rest]), cache=ref, last_only=True)[0]
        cache = model.new_cache(2, 2 * P + 8)
        cache.reset_rows([0, 1])
        model(torch.randint(0, 1000, (2, 7)), cache=cache)          # row 1 holds stale tokens
        cache.load_prefix(1, ks, vs)
        assert int(cache.lengths[1]) == int(cache.pos[1]) == P and int(cache.valid[1].sum()) == P
        assert int(cache.lengths[0]) == 7                             # the other row is untouched
        mask = torch.tensor([[0] * len(rest), [1] * len(rest)])
        ids = torch.tensor([rest, rest])
        got = model(ids, cache=cache, attention_mask=mask, last_only=True)[1]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_engine_limit_and_stats_accessors(local_fp32):
    """set_limit(1) serves one request at a time (every decode step has batch size 1); stats() is a copy the
    caller cannot corrupt; reset_stats() empties it; set_limit never exceeds the cache's rows."""
    tok = local_fp32.tokenizer
    engine = serve.Engine(local_fp32.model, max_batch=3, max_len=64, prefill_chunk=16)
    engine.set_limit(1)
    engine.start()
    done = threading.Semaphore(0)
    try:
        for p in ("Hi", "Name a fruit.", "Say yes."):
            engine.submit(serve.Job(tok.apply_chat_template([{"role": "user", "content": p}]), 3,
                                    on_event=lambda kind, v: done.release() if kind == "done" else None))
        for _ in range(3):
            assert done.acquire(timeout=300)
    finally:
        engine.stop()
    stats = engine.stats()
    assert set(stats["decode"]) == {1} and stats["decode"][1][0] > 0 and stats["prefill"][0] >= 3
    stats["decode"].clear()
    assert engine.stats()["decode"], "stats() must return a copy"
    engine.reset_stats()
    assert engine.stats() == {"decode": {}, "prefill": (0, 0.0)}
    engine.set_limit(99)
    assert engine.limit == 3


def test_rate_limiter_set_rpm_and_reset():
    limiter = RateLimiter(0)
    for _ in range(5):
        limiter.check("a")                                    # off
    limiter.set_rpm(2)
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(serve.ApiError) as e:
        limiter.check("a")
    assert e.value.status == 429
    limiter.check("b")                                        # per caller
    limiter.reset()
    limiter.check("a")                                        # a fresh minute


def test_parse_args_knobs_follow_quick():
    quick = serve.parse_args(["--demo", "--quick"])
    full = serve.parse_args(["--demo"])
    assert (quick.clients, quick.requests_per_client, quick.load_tokens, quick.tour_tokens) == ([1, 4], 1, 8, 12)
    assert (full.clients, full.requests_per_client, full.load_tokens, full.tour_tokens) == ([1, 2, 4, 8, 16], 2, 32, 24)
    assert serve.parse_args(["--quick", "--clients", "2,3", "--load-tokens", "5"]).clients == [2, 3]


# ------------------------------------------------------------------ the OpenAI-compatible API
def test_stream_and_non_stream_match_the_reference(running, local_fp32):
    import openai

    client = openai.OpenAI(base_url=running.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL, serve.EMBEDDING_MODEL]      # chat first (clients pick the first), then embeddings
    msg = [{"role": "user", "content": "Name a fruit."}]
    r = client.chat.completions.create(model=MODEL, messages=msg, max_tokens=6, temperature=0)
    expected = reference(local_fp32, "Name a fruit.", 6)
    assert r.choices[0].message.content == expected
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens == len(
        local_fp32.tokenizer.apply_chat_template(msg))
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=MODEL, messages=msg, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sse_wire_format_ends_with_done(running):
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}),
        {"Content-Type": "application/json", "X-API-Key": KEY})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string_seed_and_sampling(running):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count from one to ten in words."}],
            "max_tokens": 12, "temperature": 0}
    _, _, full = request(running, "POST", "/v1/chat/completions", body, auth())
    text = full["choices"][0]["message"]["content"]
    word = text.split()[2] if len(text.split()) > 2 else text.split()[-1]
    _, _, cut = request(running, "POST", "/v1/chat/completions", {**body, "stop": [word]}, auth())
    assert cut["choices"][0]["message"]["content"] == text[:text.index(word)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 4}
    a = request(running, "POST", "/v1/chat/completions", sampled, auth())[2]["choices"][0]["message"]["content"]
    b = request(running, "POST", "/v1/chat/completions", sampled, auth())[2]["choices"][0]["message"]["content"]
    assert a == b                                            # same seed -> same sample


# ------------------------------------------------------------------ auth, limits, errors
def test_auth_api_key_and_oauth_jwt(running):
    import jwt
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=running.base_url, api_key="wrong", max_retries=0).models.list()
    status, headers, body = request(running, "GET", "/v1/models")
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert_error_shape(body)
    assert request(running, "GET", "/v1/models", headers={"X-API-Key": KEY})[0] == 200
    form = f"grant_type=password&username={USER}&password={PASSWORD}".encode()
    status, _, token = request(running, "POST", "/oauth/token", raw=form,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and token["token_type"] == "bearer"
    assert jwt.decode(token["access_token"], JWT_SECRET, algorithms=["HS256"])["sub"] == USER
    assert request(running, "GET", "/v1/models", headers=auth(token["access_token"]))[0] == 200
    bad = form.replace(PASSWORD.encode(), b"nope")
    assert request(running, "POST", "/oauth/token", raw=bad,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 401
    expired = jwt.encode({"sub": USER, "exp": int(time.time()) - 10}, JWT_SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": USER, "exp": int(time.time()) + 60}, "another-secret-0123456789abcdef0123", algorithm="HS256")
    assert request(running, "GET", "/v1/models", headers=auth(expired))[0] == 401
    assert request(running, "GET", "/v1/models", headers=auth(forged))[0] == 401
    assert request(running, "GET", "/healthz")[0] == 200       # probes need no key


def test_rate_limit_429_with_retry_after(running):
    import openai

    limiter = running.srv.limiter
    limiter.set_rpm(2)
    try:
        client = openai.OpenAI(base_url=running.base_url, api_key=KEY, max_retries=0)
        client.models.list()
        client.models.list()
        with pytest.raises(openai.RateLimitError) as e:
            client.models.list()
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "rate_limit_exceeded"
    finally:
        limiter.set_rpm(0)
        limiter.reset()


def test_bad_requests_400_422_404(running):
    status, _, body = request(running, "POST", "/v1/chat/completions", raw=b'{"model": "x", "messages": [',
                              headers=auth())
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, _, body = request(running, "POST", "/v1/chat/completions",
                              {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
                              auth())
    assert status == 422 and body["error"]["param"] == "temperature"
    assert request(running, "POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, auth())[0] == 422
    status, _, body = request(running, "POST", "/v1/chat/completions",
                              {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
                              auth())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    long_prompt = "word " * 400                                      # > max_context (256) tokens
    status, _, body = request(running, "POST", "/v1/generate", {"prompt": long_prompt}, auth())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _, body = request(running, "POST", "/v1/chat/completions",
                              {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, auth())
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, _, body = request(running, "GET", "/no/such/path")
    assert status == 404
    assert_error_shape(body)


def test_full_queue_503(running):
    engine = running.srv.engine
    engine.max_queue, old = 0, engine.max_queue               # every new request finds the queue full
    try:
        status, headers, body = request(running, "POST", "/v1/generate", {"prompt": "hi"}, auth())
    finally:
        engine.max_queue = old
    assert status == 503 and body["error"]["code"] == "queue_full" and headers.get("Retry-After")


def test_not_ready_503_until_model_loaded(local_fp32, tmp_path):
    gate = threading.Event()
    srv = make_server(local_fp32, tmp_path / "s.sqlite3", load_model=lambda: gate.wait(60) and local_fp32)
    with Running(srv, wait_ready=False) as run:
        assert request(run, "GET", "/readyz")[0] == 503
        assert request(run, "GET", "/v1/models", headers=auth())[0] == 503
        assert request(run, "GET", "/healthz")[0] == 200
        gate.set()
        deadline = time.monotonic() + 60
        while request(run, "GET", "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request(run, "GET", "/v1/models", headers=auth())[0] == 200


# ------------------------------------------------------------------ sessions, disconnects, metrics
def test_sessions_persist_across_restart(local_fp32, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    with Running(make_server(local_fp32, db)) as run:
        status, _, first = request(run, "POST", "/v1/generate", {"prompt": "My name is Lin.", "max_new_tokens": 3},
                                   auth())
        assert status == 200
        sid = first["session_id"]
    with Running(make_server(local_fp32, db)) as run:      # a new process would see the same file
        status, _, hist = request(run, "GET", f"/v1/sessions/{sid}", headers=auth())
        assert status == 200 and [m["role"] for m in hist["messages"]] == ["user", "assistant"]
        assert hist["messages"][1]["content"] == first["text"]
        status, _, second = request(run, "POST", "/v1/generate",
                                    {"prompt": "What is my name?", "max_new_tokens": 3, "session_id": sid}, auth())
        assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        form = f"username={USER}&password={PASSWORD}".encode()
        token = request(run, "POST", "/oauth/token", raw=form,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})[2]["access_token"]
        assert request(run, "GET", f"/v1/sessions/{sid}", headers=auth(token))[0] == 404   # not alice's session
        assert len(request(run, "GET", f"/v1/sessions/{sid}", headers=auth())[2]["messages"]) == 4
        assert request(run, "DELETE", f"/v1/sessions/{sid}", headers=auth())[0] == 200
        assert request(run, "GET", f"/v1/sessions/{sid}", headers=auth())[0] == 404


def gauges(run) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(run.base_url.removesuffix("/v1") + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_disconnecting_client_frees_its_slot(running):
    before = gauges(running)["llm_generated_tokens_total"]
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200,
         "stream": True, "ignore_eos": True}), {"Content-Type": "application/json", "X-API-Key": KEY})
    resp = conn.getresponse()
    data_lines = 0
    while data_lines < 2:                                  # the role chunk, then the first token
        data_lines += resp.fp.readline().startswith(b"data: ")
    assert gauges(running)["llm_running_batch_size"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        g = gauges(running)
        if g["llm_running_batch_size"] == 0 and g["llm_queue_length"] == 0:
            break
        time.sleep(0.1)
    assert (g["llm_running_batch_size"], g["llm_queue_length"]) == (0, 0)
    assert running.srv.engine.busy() == (0, 0)
    assert g["llm_generated_tokens_total"] - before < 200          # stopped early, not run to the end


def test_metrics_parse_as_prometheus_text(running):
    request(running, "GET", "/v1/models", headers=auth())
    values = gauges(running)
    for name in ("llm_generated_tokens_total", "llm_time_to_first_token_seconds_count",
                 "llm_time_per_output_token_seconds_count", "llm_queue_length", "llm_running_batch_size"):
        assert name in values
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(running.base_url.removesuffix("/v1") + "/metrics") as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    labels = [s.labels for s in fams["llm_requests"].samples]
    assert {"path": "/v1/models", "status": "200"} in labels


# ------------------------------------------------------------------ the script itself
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_script_serves_and_never_logs_secrets(script_env, tmp_path):
    """`python 06_serve.py` as a user runs it: secrets in, requests with right and wrong ones,
    SIGTERM -> graceful stop; no key, password or token in anything it printed."""
    port = free_port()
    secret_key, password = "sk-never-print-me-8c1d", "pw-never-print-me-42"
    env = {**script_env, "LLM_API_KEYS": secret_key, "LLM_USERS": f"bob:{password}", "LLM_COURSE_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "06_serve.py", "--port", str(port), "--out-dir", str(tmp_path)],
                            cwd=Path(serve.__file__).parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)

        class Run:
            base_url = base + "/v1"
        token = request(Run, "POST", "/oauth/token", raw=f"username=bob&password={password}".encode(),
                        headers={"Content-Type": "application/x-www-form-urlencoded"})[2]["access_token"]
        assert request(Run, "GET", "/v1/models", headers=auth(secret_key))[0] == 200
        assert request(Run, "GET", "/v1/models", headers=auth(secret_key + "x"))[0] == 401
        assert request(Run, "POST", "/v1/generate", {"prompt": "hi", "max_new_tokens": 2}, auth(token))[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "已停止" in out, out
    for secret in (secret_key, password, token):
        assert secret not in out


@pytest.mark.slow
def test_demo_quick_runs(lesson_runs):
    run = lesson_runs.run("06_serve.py", "--demo", "--quick", timeout=600)
    assert run.returncode == 0, run.explain()
    res = run.results("06_serve")
    assert res["tour"]["status"] == {"401": 401, "429": 429} and res["tour"]["session_messages"] == 4
    assert [r["clients"] for r in res["load"]["batching"]] == [1, 4]
    assert all(r["tokens"] > 0 and r["tok_s"] > 0 for r in res["load"]["one_at_a_time"] + res["load"]["batching"])
    # Steady-state figure: with one client the window is the whole stream, so it can only be >= the
    # whole-round figure (which also counts the time after the last token); it is reported for every N.
    for row in res["load"]["one_at_a_time"] + res["load"]["batching"]:
        assert row["steady_tok_s"] > 0
        if row["clients"] == 1:
            assert row["steady_tok_s"] >= row["tok_s"]
    assert set(res["speedup_steady"]) == set(res["speedup"])
    assert (run.out_root / "06_serve" / "serve_load.png").is_file()
    assert "sk-demo-" not in run.stdout + run.stderr


# ------------------------------------------------------------------ --checkpoint: a lesson-04 tiny GPT
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A lesson-04 run trained for a few steps (block size 16, so replies slide past the context window)."""
    tg = importlib.import_module("04_tiny_gpt")
    root = tmp_path_factory.mktemp("tiny")
    text = root / "text.txt"
    text.write_text("\n".join(["ROMEO: But soft, what light?", "JULIET: O Romeo, Romeo!", "To be, or not to be."] * 300),
                    encoding="utf-8")
    tg.main(["--data", str(text), "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
             "--batch-size", "8", "--eval-iters", "2", "--evals", "2", "--device", "cpu", "--lr", "1e-2",
             "--warmup-iters", "5", "--max-iters", "30", "--out-dir", str(root / "run")])
    return tg, root / "run" / "small" / "ckpt_best.pt"


def test_checkpoint_serves_the_tiny_gpt_like_lesson_04_generates(tiny_checkpoint, tmp_path):
    """Lesson 04 exports model.pt2; the server loads it (no lesson-04 code) with a checkpoint's weights. Concurrent
    greedy requests (batched, different lengths, past the 16-token window) equal lesson 04's own generate()."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    import torch

    from common.exported import load_tiny_gpt
    from common.training import load_checkpoint, tokenizer_from_state

    tg, ckpt = tiny_checkpoint
    assert (ckpt.parent / "model.pt2").is_file()
    ck = load_checkpoint(ckpt)
    ref_model = tg.GPT(**ck["model_config"]).eval()
    ref_model.load_state_dict(ck["model"])
    tok = tokenizer_from_state(ck["tokenizer"])
    prompts, n = ["ROMEO:", "To be, or", "J", "JULIET: O Romeo, Romeo! To be"], 24

    def expected(p):
        ids = tok.encode(p + "\n")
        return tok.decode(tg.generate(ref_model, torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist())

    lm = load_tiny_gpt(ckpt)
    with Running(make_server(lm, tmp_path / "s.sqlite3", max_context=128)) as run:
        client = openai.OpenAI(base_url=run.base_url, api_key=KEY, max_retries=0)
        model = "tiny-gpt-small"
        assert [m.id for m in client.models.list()] == [model, serve.EMBEDDING_MODEL]

        def ask(p):
            return client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                  max_tokens=n, temperature=0).choices[0].message.content
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(ask, prompts))
        stream = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompts[0]}], max_tokens=n, temperature=0, stream=True)
            if c.choices)
        status, _, body = request(run, "POST", "/v1/generate", {"prompt": "a\u4e2d", "max_new_tokens": 2}, auth())
    assert got == [expected(p) for p in prompts]
    assert stream == got[0]
    assert status == 400 and "字符" in body["error"]["message"]        # a character the model never saw


def test_checkpoint_without_export_gives_one_clear_line(tiny_checkpoint, tmp_path, run_script):
    import shutil

    _, ckpt = tiny_checkpoint
    lone = tmp_path / "copy" / "ckpt_best.pt"
    lone.parent.mkdir()
    shutil.copy(ckpt, lone)
    out = run_script("06_serve.py", "--checkpoint", str(lone), "--port", str(free_port()), "--out-dir", str(tmp_path))
    assert out.returncode != 0 and "model.pt2" in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_report_ceiling_is_between_one_and_the_pure_decode_ratio():
    """The lesson's ceiling: prefill cannot be batched away, so the bound lies between 1x and the
    pure-decode ratio b*d1/db, reaches that ratio when prefill is free, and falls as prefill grows."""
    def load(prefill_ms):
        return {"alone_ms": {"decode": 25.0, "prefill": prefill_ms}, "step_ms": {1: 24.0, 8: 40.0},
                "batching": [{"clients": 8, "tokens": 8 * 25, "requests": 8}]}

    pure = 8 * 25.0 / 40.0
    bounds = [loadtest.ceiling(load(p), 8)["max_speedup"] for p in (0.0, 40.0, 400.0)]
    assert bounds[0] == pytest.approx(pure)
    assert pure > bounds[1] > bounds[2] > 1.0
    assert loadtest.ceiling(load(40.0), 4) is None          # no batching row for 4 clients, no bound
