"""Production plumbing around lesson 06's server: Prometheus metrics, OpenAI-shaped errors, API-key /
OAuth2 + JWT authentication, a per-caller rate limit and SQLite conversation sessions.

Lesson 06 teaches the engine (continuous batching) and the OpenAI-compatible routes; these pieces are
the standard parts every serving system has around them. Messages a user sees (errors, metric help)
are in Chinese, like the lesson.
"""
from __future__ import annotations

import collections
import threading
import time


class Metrics:
    """Prometheus metrics in their own CollectorRegistry (several servers in one process do not collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()          # no *_created timestamp series: /metrics is easier to read
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llm_requests", "HTTP 请求数（按路径和状态码）", ["path", "status"], registry=r)
        self.tokens = Counter("llm_generated_tokens", "生成的 token 总数", registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "提示词 token 总数", registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "首 token 延迟（从进队列算起）", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("llm_time_per_output_token_seconds", "相邻两个 token 的间隔", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.step = Histogram("llm_engine_step_seconds", "引擎一步（一次批量前向）的耗时", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.queue = Gauge("llm_queue_length", "等待中的请求数", registry=r)
        self.batch = Gauge("llm_running_batch_size", "正在运行（占着 KV 缓存行）的序列数", registry=r)


class ApiError(Exception):
    """Every error goes back in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _digest(text: str) -> bytes:
    import hashlib
    return hashlib.sha256(text.encode("utf-8")).digest()


class Auth:
    """API keys (Bearer or X-API-Key) and JWTs issued by the OAuth2 password flow. Off when nothing is configured."""

    def __init__(self, keys: list[str], users: dict[str, str], secret: str, expire_minutes: float):
        self.keys = [_digest(k) for k in keys]                  # only hashes: no plain key kept even in memory
        self.users = {u: _digest(p) for u, p in users.items()}
        self.secret, self.expire_minutes = secret, expire_minutes

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.users)

    def identify(self, headers, client: str) -> str:
        """The caller's identity (for rate limits and session ownership); 401 when authentication fails."""
        import hmac

        import jwt

        if not self.enabled:
            return f"anon:{client}"
        auth = headers.get("authorization", "")
        cred = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "").strip()
        if cred:
            d = _digest(cred)   # constant time: compare with every key, never stop early
            hits = [hmac.compare_digest(d, k) for k in self.keys]
            if any(hits):
                return f"key:{hits.index(True)}"
            if self.users and cred.count(".") == 2:
                try:
                    return "user:" + jwt.decode(cred, self.secret, algorithms=["HS256"])["sub"]
                except jwt.PyJWTError:
                    pass
        raise ApiError(401, "缺少或无效的 API key / token（Authorization: Bearer ... 或 X-API-Key）",
                       "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def issue_token(self, username: str, password: str) -> str:
        import hmac

        import jwt

        ok = [hmac.compare_digest(_digest(password), d) for u, d in self.users.items() if u == username]
        if not any(ok):
            raise ApiError(401, "用户名或密码错误", "authentication_error", "invalid_grant")
        now = int(time.time())
        return jwt.encode({"sub": username, "iat": now, "exp": now + int(self.expire_minutes * 60)},
                          self.secret, algorithm="HS256")


class RateLimiter:
    """At most rpm requests per identity per minute (sliding window); past it 429 + Retry-After. rpm=0: off."""

    def __init__(self, rpm: int):
        self.rpm = rpm
        self.hits: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def check(self, who: str) -> None:
        if not self.rpm:
            return
        now, q = time.monotonic(), self.hits[who]
        while q and now - q[0] >= 60:
            q.popleft()
        if len(q) >= self.rpm:
            wait = max(1, int(60 - (now - q[0])) + 1)
            raise ApiError(429, f"请求太频繁：每分钟最多 {self.rpm} 次，请 {wait} 秒后再试", "rate_limit_error",
                           "rate_limit_exceeded", {"Retry-After": str(wait)})
        q.append(now)


class Sessions:
    """Conversation history in SQLite: sessions survive a server restart. A session belongs to the identity that made it."""

    def __init__(self, path):
        import sqlite3

        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS messages (session TEXT, owner TEXT, idx INTEGER, "
                        "role TEXT, content TEXT, created REAL, PRIMARY KEY (session, idx))")
        self.db.commit()

    def get(self, session: str, owner: str) -> list[dict] | None:
        with self.lock:
            rows = self.db.execute("SELECT owner, role, content FROM messages WHERE session=? ORDER BY idx",
                                   (session,)).fetchall()
        if rows and rows[0][0] != owner:
            return None                       # someone else's session: as if it did not exist
        return [{"role": r, "content": c} for _, r, c in rows]

    def append(self, session: str, owner: str, messages: list[dict]) -> None:
        with self.lock, self.db:
            start = self.db.execute("SELECT COUNT(*) FROM messages WHERE session=?", (session,)).fetchone()[0]
            self.db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                                [(session, owner, start + i, m["role"], m["content"], time.time())
                                 for i, m in enumerate(messages)])

    def delete(self, session: str, owner: str) -> bool:
        if not self.get(session, owner):
            return False
        with self.lock, self.db:
            self.db.execute("DELETE FROM messages WHERE session=?", (session,))
        return True

    def close(self) -> None:
        with self.lock:
            self.db.close()

