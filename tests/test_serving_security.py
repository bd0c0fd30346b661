"""Unit tests for lesson 06's plumbing under attack (common/serving.py): identities, sessions, JWTs, guessing.

Each test reproduces one defect of the security review (see docs/06 "我们怎样攻击自己的服务器") and fails
on the code before the fix. No model, no HTTP: these are the building blocks; tests/test_06_attacks.py
drives the same defects through the real server.
"""
from __future__ import annotations

import threading
import time

import jwt
import pytest

from common.errors import UserError
from common.serving import CHAT_ACCEPTED, ApiError, Auth, FailedAttempts, RedactQuery, Sessions, reject_unsupported

SECRET = "s" * 32


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def test_identity_of_a_key_does_not_depend_on_its_position():
    a = Auth(["key-one", "key-two"], {}, SECRET, 30)
    b = Auth(["key-two", "key-one"], {}, SECRET, 30)       # reordered
    c = Auth(["key-two"], {}, SECRET, 30)                  # key-one revoked
    assert a.identify(bearer("key-two"), "1.2.3.4") == b.identify(bearer("key-two"), "1.2.3.4") \
        == c.identify(bearer("key-two"), "1.2.3.4")
    assert a.identify(bearer("key-one"), "x") != a.identify(bearer("key-two"), "x")
    who = a.identify(bearer("key-one"), "x")
    assert who.startswith("key:") and "key-one" not in who and who != "key:0"
    with pytest.raises(ApiError) as e:
        c.identify(bearer("key-one"), "x")                 # a revoked key is refused ...
    assert e.value.status == 401                           # ... and no other key inherits its identity


def test_sessions_are_namespaced_per_owner(tmp_path):
    s = Sessions(tmp_path / "s.sqlite3")
    s.append("chat", "key:alice", [{"role": "user", "content": "alice's secret"}])
    assert s.get("chat", "key:bob") == []                  # same id, other owner: nothing to see
    s.append("chat", "key:bob", [{"role": "user", "content": "bob's question"}])
    assert [m["content"] for m in s.get("chat", "key:alice")] == ["alice's secret"]
    assert [m["content"] for m in s.get("chat", "key:bob")] == ["bob's question"]
    assert not s.delete("chat", "key:carol")               # someone else's id looks exactly like an unused one
    assert not s.delete("unused", "key:carol")
    assert s.delete("chat", "key:bob") and s.get("chat", "key:alice")
    s.close()


def test_two_callers_starting_the_same_new_session_at_once_do_not_mix(tmp_path):
    s = Sessions(tmp_path / "s.sqlite3")
    start = threading.Barrier(8)

    def talk(owner: str):
        start.wait()
        for i in range(20):
            s.append("same-id", owner, [{"role": "user", "content": f"{owner} {i}"},
                                        {"role": "assistant", "content": f"reply to {owner} {i}"}])
    threads = [threading.Thread(target=talk, args=(f"key:{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(8):
        msgs = s.get("same-id", f"key:{n}")
        assert len(msgs) == 40 and all(f"key:{n} " in m["content"] for m in msgs)
    s.close()


@pytest.mark.parametrize("claims", [
    {"iat": 0},                                            # no sub
    {"sub": "alice"},                                      # no exp
    {"sub": "mallory", "exp": 4102444800},                 # a user that is not configured (any more)
    {"sub": 123, "exp": 4102444800},                       # sub not a string
    {"sub": "alice", "exp": 1},                            # expired
])
def test_jwts_without_sub_or_exp_or_for_unknown_users_are_refused(claims):
    auth = Auth([], {"alice": "pw"}, SECRET, 30)
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(ApiError) as e:
        auth.identify(bearer(token), "x")
    assert e.value.status == 401
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert auth.identify(bearer(good), "x") == "user:alice"


def test_short_jwt_secret_refuses_to_start():
    with pytest.raises(UserError, match="LLM_JWT_SECRET"):
        Auth([], {"alice": "pw"}, "short", 30)
    Auth(["k"], {}, "", 30)                                # no users: no JWTs are issued, no secret needed


def test_failed_attempts_are_throttled_per_address():
    auth = Auth(["right"], {"alice": "pw"}, SECRET, 30, failed_limit=5)
    for _ in range(5):
        with pytest.raises(ApiError) as e:
            auth.issue_token("alice", "guess", client="10.0.0.1")
        assert e.value.status == 401
    for attempt in (lambda: auth.issue_token("alice", "pw", client="10.0.0.1"),
                    lambda: auth.identify(bearer("right"), "10.0.0.1"),
                    lambda: auth.identify(bearer("wrong"), "10.0.0.1")):
        with pytest.raises(ApiError) as e:
            attempt()
        assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
    assert auth.identify(bearer("right"), "10.0.0.2").startswith("key:")   # other addresses are not affected
    assert auth.issue_token("alice", "pw", client="10.0.0.2")


def test_failed_attempts_window_expires():
    f = FailedAttempts(limit=2, window=0.2)
    f.record("a")
    f.record("a")
    with pytest.raises(ApiError):
        f.check("a")
    time.sleep(0.25)
    f.check("a")


def test_access_log_query_strings_are_redacted():
    import logging

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/models?api_key=sk-secret", "1.1", 200), None)
    assert RedactQuery().filter(record)
    assert "sk-secret" not in record.getMessage() and "/v1/models?" in record.getMessage()
    plain = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                              ("127.0.0.1:5", "GET", "/healthz", "1.1", 200), None)
    assert RedactQuery().filter(plain) and "/healthz HTTP" in plain.getMessage()


def test_unsupported_parameters_accept_only_harmless_values():
    reject_unsupported({"n": 1, "presence_penalty": 0.0, "logprobs": False, "user": "u-1", "logit_bias": {}},
                       CHAT_ACCEPTED)
    for extra in ({"n": 2}, {"presence_penalty": 0.1}, {"logprobs": True}, {"typo_field": 1}):
        with pytest.raises(ApiError) as e:
            reject_unsupported(extra, CHAT_ACCEPTED)
        assert (e.value.status, e.value.code, e.value.param) == (400, "unsupported_parameter", next(iter(extra)))
