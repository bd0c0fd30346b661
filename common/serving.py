"""Production plumbing around lesson 06's server: Prometheus metrics, OpenAI-shaped errors, API-key /
OAuth2 + JWT authentication, a per-caller rate limit, SQLite conversation sessions, and the generic HTTP
parts (SSE framing, error responses and handlers, request counting, binding a port, a server running
in a background thread).

Lesson 06 teaches the engine (continuous batching) and the OpenAI-compatible routes; these pieces are
the standard parts every serving system has around them. Messages a user sees (errors, metric help)
are in Chinese, like the lesson.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from typing import Literal
from urllib.parse import parse_qs

import jwt
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from common.cli import positive_int
from common.errors import UserError


class Metrics:
    """Prometheus metrics in their own CollectorRegistry (several servers in one process do not collide)."""

    def __init__(self):
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
        # structured output (common/structured_serving.py): time spent masking and advancing constrained rows
        self.mask_seconds = Counter("llm_constraint_mask_seconds", "结构化输出：掩码和状态推进花的时间（秒）", registry=r)
        self.mask_tokens = Counter("llm_constrained_tokens", "结构化输出：受约束生成的 token 数", registry=r)

    def set_load(self, waiting: int, running: int) -> None:
        """The engine's queue length and running batch size (gauges)."""
        self.queue.set(waiting)
        self.batch.set(running)


class ApiError(Exception):
    """Every error goes back in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers
        self.param = param


# OpenAI chat parameters lesson 06 does not implement: only their "not used" values (listed) are accepted,
# anything else is 400 unsupported_parameter. None = any value passes here: an annotation, or a field
# common/structured_serving.py checks and honours (response_format, tools, tool_choice).
CHAT_ACCEPTED = {"n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
                 "logprobs": (False,), "top_logprobs": (0,), "response_format": None,
                 "tools": None, "tool_choice": None, "parallel_tool_calls": (True, False),
                 "user": None, "metadata": None, "store": (False,)}


def reject_unsupported(extra: dict | None, accepted: dict) -> None:
    """Fields a request model did not declare (pydantic's model_extra): 400 unsupported_parameter naming the
    first one, unless `accepted` lists it with its harmless values (a tuple; None = any value is harmless)."""
    for name, value in (extra or {}).items():
        if name in accepted and (accepted[name] is None or value is None or value in accepted[name]):
            continue
        raise ApiError(400, f"本服务器不支持参数 {name}={json.dumps(value, ensure_ascii=False)[:80]}"
                            "（去掉它，或用默认值）", code="unsupported_parameter", param=name)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


MIN_JWT_SECRET_BYTES = 32      # HS256 keys shorter than the hash output are guessable offline (RFC 7518 3.2)


class FailedAttempts:
    """Throttle credential guessing: after `limit` failed attempts from one client address within `window`
    seconds, that address gets 429 + Retry-After (for every credential, right or wrong) until the window passes."""

    def __init__(self, limit: int = 10, window: float = 60.0):
        self.limit, self.window = limit, window
        self.fails: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()

    def check(self, client: str) -> None:
        with self.lock:
            q, now = self.fails[client], time.monotonic()
            while q and now - q[0] >= self.window:
                q.popleft()
            if len(q) >= self.limit:
                wait = max(1, int(self.window - (now - q[0])) + 1)
                raise ApiError(429, f"认证失败次数太多：请 {wait} 秒后再试", "rate_limit_error",
                               "too_many_failed_attempts", {"Retry-After": str(wait)})

    def record(self, client: str) -> None:
        with self.lock:
            self.fails[client].append(time.monotonic())


class Auth:
    """API keys (Bearer or X-API-Key) and JWTs issued by the OAuth2 password flow. Off when nothing is configured.

    A caller's identity (it owns rate-limit buckets and sessions) is stable: `key:<first 16 hex digits of the
    key's SHA-256>` for an API key, `user:<name>` for a JWT. Reordering LLM_API_KEYS changes nothing; a removed
    key's sessions become unreachable (nobody else's identity can match its hash), and come back if the same
    key is configured again."""

    def __init__(self, keys: list[str], users: dict[str, str], secret: str, expire_minutes: float,
                 failed_limit: int = 10):
        if users and len(secret.encode("utf-8")) < MIN_JWT_SECRET_BYTES:
            raise UserError(f"LLM_JWT_SECRET 太短（{len(secret.encode('utf-8'))} 字节）：至少 {MIN_JWT_SECRET_BYTES} 字节，"
                            "例如 python -c \"import secrets; print(secrets.token_urlsafe(32))\" 生成一个。")
        self.keys = [_digest(k) for k in keys]                  # only hashes: no plain key kept even in memory
        self.users = {u: _digest(p) for u, p in users.items()}
        self.secret, self.expire_minutes = secret, expire_minutes
        self.failures = FailedAttempts(failed_limit)

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.users)

    def identify(self, headers, client: str) -> str:
        """The caller's identity (for rate limits and session ownership); 401 when authentication fails,
        429 when this client address has failed too often recently."""
        if not self.enabled:
            return f"anon:{client}"
        self.failures.check(client)
        auth = headers.get("authorization", "")
        cred = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "").strip()
        if cred:
            d = _digest(cred)   # constant time: compare with every key, never stop early
            if any([hmac.compare_digest(d, k) for k in self.keys]):
                return "key:" + d.hex()[:16]
            user = self._jwt_user(cred)
            if user is not None:
                return "user:" + user
        self.failures.record(client)
        raise ApiError(401, "缺少或无效的 API key / token（Authorization: Bearer ... 或 X-API-Key）",
                       "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def _jwt_user(self, token: str) -> str | None:
        """A valid JWT's user: signed with our secret, unexpired, with `exp` and `sub`, for a user still configured."""
        if not self.users or token.count(".") != 2:
            return None
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        return sub if isinstance(sub, str) and sub in self.users else None

    def issue_token(self, username: str, password: str, client: str = "?") -> str:
        self.failures.check(client)
        ok = [hmac.compare_digest(_digest(password), d) for u, d in self.users.items() if u == username]
        if not any(ok):
            self.failures.record(client)
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

    def set_rpm(self, rpm: int) -> None:
        """Change the limit while the server runs (0 = off); requests already counted stay counted."""
        self.rpm = rpm

    def reset(self) -> None:
        """Forget every caller's recent requests (a fresh minute for everyone)."""
        self.hits.clear()


class Sessions:
    """Conversation history in SQLite: sessions survive a server restart.

    Every identity has its own namespace of session ids (the primary key starts with the owner): two callers
    who pick the same id get two separate conversations, nobody can read, extend or even detect another
    caller's session, and creating a session is the first INSERT of its rows (atomic, under one lock)."""

    def __init__(self, path):
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        # Table "messages" of earlier versions keyed sessions by id alone and owners by key position: not reused.
        self.db.execute("CREATE TABLE IF NOT EXISTS chat_messages (owner TEXT, session TEXT, idx INTEGER, "
                        "role TEXT, content TEXT, created REAL, PRIMARY KEY (owner, session, idx))")
        self.db.commit()

    def get(self, session: str, owner: str) -> list[dict]:
        """The owner's messages in this session ([] when the owner has no such session)."""
        with self.lock:
            rows = self.db.execute("SELECT role, content FROM chat_messages WHERE owner=? AND session=? ORDER BY idx",
                                   (owner, session)).fetchall()
        return [{"role": r, "content": c} for r, c in rows]

    def append(self, session: str, owner: str, messages: list[dict]) -> None:
        with self.lock, self.db:
            start = self.db.execute("SELECT COUNT(*) FROM chat_messages WHERE owner=? AND session=?",
                                    (owner, session)).fetchone()[0]
            self.db.executemany("INSERT INTO chat_messages VALUES (?, ?, ?, ?, ?, ?)",
                                [(owner, session, start + i, m["role"], m["content"], time.time())
                                 for i, m in enumerate(messages)])

    def delete(self, session: str, owner: str) -> bool:
        with self.lock, self.db:
            return self.db.execute("DELETE FROM chat_messages WHERE owner=? AND session=?",
                                   (owner, session)).rowcount > 0

    def close(self) -> None:
        with self.lock:
            self.db.close()



def _env_number(name: str, default, kind=float):
    text = (os.environ.get(name) or "").strip()
    try:
        value = kind(text) if text else default
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"环境变量 {name}={text!r} 无效：需要非负数。")
    return value


def settings_from_env(api_keys: str | None, rate_limit_rpm: int | None, session_db, default_session_db) -> dict:
    """Authentication, rate limit and session database: command-line value > environment variable > default.
    Returns the Server keyword arguments auth, rate_limit_rpm and session_db. Secrets are read, never printed."""
    keys = api_keys if api_keys is not None else os.environ.get("LLM_API_KEYS", "")
    users = {}
    for item in filter(None, (x.strip() for x in os.environ.get("LLM_USERS", "").split(","))):
        name, sep, password = item.partition(":")
        if not (sep and name and password):
            raise UserError("环境变量 LLM_USERS 格式应为 用户名:密码,用户名:密码")
        users[name] = password
    secret = os.environ.get("LLM_JWT_SECRET") or ""
    if users and not secret:
        print("[认证] 没有设置 LLM_JWT_SECRET：本次用随机密钥签发 JWT（重启后旧 token 失效）。")
    rpm = rate_limit_rpm if rate_limit_rpm is not None else _env_number("LLM_RATE_LIMIT_RPM", 0, int)
    return dict(auth=Auth([k.strip() for k in keys.split(",") if k.strip()], users,
                          secret or secrets.token_urlsafe(32), _env_number("LLM_JWT_EXPIRE_MINUTES", 30.0)),
                rate_limit_rpm=rpm,
                session_db=session_db or os.environ.get("LLM_SESSION_DB") or default_session_db)


# ------------------------------------------------------------------ OpenAI request/response shapes
def text_of_content(content, where: str) -> str:
    """A chat message's content as text. Content parts must each be {"type": "text", "text": <string>}: other
    part types (images, audio) and non-string text are a 400 naming the part (`where` = "messages.<i>")."""
    if not isinstance(content, list):
        return content or ""
    for i, part in enumerate(content):
        if part.get("type") != "text":
            raise ApiError(400, f"不支持内容类型 {part.get('type')!r}：本服务器只懂文字（type=text）",
                           code="unsupported_content_type", param=f"{where}.content.{i}.type")
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"type=text 的内容段需要字符串 text（收到 {part.get('text')!r}）",
                           code="invalid_value", param=f"{where}.content.{i}.text")
    return "".join(part["text"] for part in content)


def embeddings_body(vecs, tokens: int, model: str, encoding_format: str) -> dict:
    """OpenAI's /v1/embeddings response; "base64" (the openai SDK's default) = little-endian float32 bytes."""
    def encode(v):
        return base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding_format == "base64" else v.tolist()
    return {"object": "list", "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vecs)]}


# ------------------------------------------------------------------ the OpenAI request bodies and one reply
SESSION_ID = r"^[A-Za-z0-9_-]{1,64}$"
SEED = dict(ge=-2**63, le=2**64 - 1)        # what torch.Generator.manual_seed accepts: beyond it, 422 at the API


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|developer|user|assistant|tool)$")
    content: str | list[dict] | None = None      # 字符串，或 [{"type": "text", "text": "..."}, ...]


class ChatRequest(BaseModel):
    """OpenAI 的 /v1/chat/completions 请求体（本服务器支持的字段；不认识的字段回 400，见 common/serving.py 的 CHAT_ACCEPTED）。"""
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **SEED)
    session_id: str | None = Field(None, pattern=SESSION_ID)   # 扩展：接着某个会话聊
    ignore_eos: bool = False                                    # 扩展（vLLM 也有）：压测时固定生成长度


class GenerateRequest(BaseModel):
    """原教程自己的 /v1/generate：一句话进，一段话出，可带会话。"""
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    session_id: str | None = Field(None, pattern=SESSION_ID)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, **SEED)


class EmbeddingRequest(BaseModel):
    """OpenAI 的 /v1/embeddings 请求体。openai SDK 默认要 base64（小端 float32 的字节再 base64），省流量。"""
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


class Reply:
    """The server side of one request: tokens sent by lesson 06's engine thread become text pieces on the event
    loop (stop strings, client disconnects, engine errors, shutdown). srv is lesson 06's Server (its .lm.tokenizer
    decodes, its .engine cancels); job is the engine's Job, whose on_event this reply takes over."""

    def __init__(self, srv, job, stops: list[str]):
        self.srv, self.job, self.stops = srv, job, [s for s in stops if s]
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_event = lambda kind, value: loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        self.finish: str | None = None          # stop / length / cancelled / error / shutdown
        self.text = ""

    async def pieces(self, request: Request | None = None):
        """逐段产出文字。request 给出时（非流式）另有一个任务等着客户端断开，断开就取消这个请求。"""
        dec, sent = self.srv.lm.tokenizer.stream_decoder(), 0
        hold = max((len(s) for s in self.stops), default=1) - 1   # 可能是 stop 开头的尾巴先不发
        watcher = asyncio.create_task(self._watch(request)) if request is not None else None
        try:
            while True:
                kind, value = await self.queue.get()
                self.text += dec.feed(value) if kind == "token" else dec.flush()
                cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0 or kind == "done":
                    end = cut if cut >= 0 else len(self.text)
                    self.text, self.finish = self.text[:end], "stop" if cut >= 0 else value
                    if end > sent:
                        yield self.text[sent:end]
                    return
                if len(self.text) - hold > sent:
                    yield self.text[sent:len(self.text) - hold]
                    sent = len(self.text) - hold
        finally:
            if watcher is not None:
                watcher.cancel()
            if self.job.finish_reason is None:        # 断开或命中 stop：让引擎立刻释放这一行
                self.srv.engine.cancel(self.job)

    async def _watch(self, request: Request) -> None:
        """请求体读完以后，receive() 只会在客户端断开时返回 http.disconnect：断开了就取消生成。"""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.srv.engine.cancel(self.job)

    async def wait(self, request: Request) -> None:
        """非流式：等整个回答生成完（客户端断开就取消）；引擎出错或服务器关闭时抛出对应的 ApiError。"""
        async for _ in self.pieces(request):
            pass
        if (failed := self.failure()) is not None:
            raise failed

    def failure(self) -> ApiError | None:
        """引擎出错或服务器关闭时，这个请求该回的错误（OpenAI 的格式）；正常结束时为 None。"""
        if self.finish == "error":
            return ApiError(500, "生成时服务器内部出错，请重试", "server_error", "engine_error")
        if self.finish == "shutdown":
            return ApiError(503, "服务器正在关闭……请稍后重试", "server_error", "server_shutdown")
        return None

    def usage(self) -> dict:
        p, c = len(self.job.prompt), len(self.job.generated)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ------------------------------------------------------------------ generic routes (the app's state.srv is the server)
# srv has .ready(), .not_ready_reason(), .model_id, .metrics (Metrics) and .auth (Auth): lesson 06's Server.
async def healthz():
    return {"status": "ok"}


async def readyz(request: Request):
    srv = request.app.state.srv
    if not srv.ready():
        return error_response(503, srv.not_ready_reason(), "server_error", "not_ready")
    return {"status": "ready", "model": srv.model_id}


async def prometheus_metrics(request: Request):
    return Response(generate_latest(request.app.state.srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def oauth_token(request: Request):
    """OAuth2 password grant: form username/password -> a JWT with a limited lifetime (then used as a Bearer token)."""
    auth = request.app.state.srv.auth
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    if form.get("grant_type", "password") != "password" or not auth.users:
        raise ApiError(400, "只支持 grant_type=password（且服务器要配置了 LLM_USERS）", code="unsupported_grant_type")
    token = auth.issue_token(form.get("username", ""), form.get("password", ""),
                             client=request.client.host if request.client else "?")
    return {"access_token": token, "token_type": "bearer", "expires_in": int(auth.expire_minutes * 60)}


def auth_banner(auth: Auth, host: str) -> str:
    """The startup line about authentication (a warning when it is off on a non-loopback address)."""
    if auth.enabled:
        return f"[认证] 开启：{len(auth.keys)} 个 API key，{len(auth.users)} 个用户（key 本身不会打印）。"
    where = "" if host in ("127.0.0.1", "localhost", "::1") else \
        f"  警告：监听 {host} 且没有认证，同一网络里的任何人都能用！请设置 LLM_API_KEYS。"
    return f"[认证] 关闭（没有配置 LLM_API_KEYS / --api-keys / LLM_USERS）。{where}"


def shutdown_fate(cut: int) -> str:
    """What happened to the requests in flight when the server stopped (the stop line printed in the foreground)."""
    return f"{cut} 个请求在宽限期结束时被中断（客户端收到了 server_shutdown 错误）" if cut else "进行中的请求都已结束"


def port_number(text: str) -> int:
    """argparse type for --port: an integer 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"端口需要在 1～65535 之间（收到 {value}）")
    return value


# ------------------------------------------------------------------ generic HTTP plumbing
def sse(obj) -> str:
    """One Server-Sent Events message: `data: <json>` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_response(status: int, message: str, type_: str = "invalid_request_error", code=None, headers=None,
                   param=None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_body(e: ApiError) -> dict:
    """An ApiError as OpenAI's error object (also the last event of a stream that failed)."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


async def on_api_error(request: Request, e: ApiError):
    return error_response(e.status, e.message, e.type, e.code, e.headers, e.param)


async def on_unexpected(request: Request, e: Exception):
    """Any exception no other handler took (a bug): still OpenAI-shaped JSON, never a plain-text 500.
    Starlette logs the traceback after this response is sent."""
    return error_response(500, "服务器内部错误（已记录日志）", "server_error", "internal_error")


async def on_invalid(request: Request, e: RequestValidationError):
    """FastAPI's validation errors: malformed JSON -> 400, a field of the wrong type or value -> 422."""
    errs = e.errors()
    if any(x.get("type") == "json_invalid" for x in errs):
        return error_response(400, "请求体不是合法的 JSON", code="invalid_json")
    where = ".".join(str(p) for p in errs[0].get("loc", ()) if p != "body")
    return error_response(422, f"参数 {where} 无效：{errs[0].get('msg')}", code="invalid_value", param=where)


async def on_http_error(request: Request, e: HTTPException):
    return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)


class CountRequests:
    """A minimal ASGI middleware: counts requests by route and status code (llm_requests_total)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        status = [500]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_)
        finally:
            if scope["type"] == "http":
                self.metrics.requests.labels(getattr(scope.get("route"), "path", "other"), str(status[0])).inc()


class Gatekeeper:
    """An ASGI middleware in front of the routes: nothing is parsed for a caller who may not ask.

    For paths under `protected` it calls check(headers, client_address) BEFORE reading any body (the
    server's authentication, rate limit and readiness; it raises ApiError) and puts the caller's identity
    in scope["state"]["caller"] for the routes. For every path a body over max_body bytes is refused with
    413 (Content-Length first; a chunked body is counted while read). The (bounded) body is read here and
    replayed to the app; later receive() calls pass through, so the app still sees http.disconnect."""

    def __init__(self, app, check, max_body: int, protected: str = "/v1/"):
        self.app, self.check, self.max_body, self.protected = app, check, max_body, protected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            if scope["path"].startswith(self.protected):
                client = scope.get("client")
                who = self.check(Headers(scope=scope), client[0] if client else "?")
                scope.setdefault("state", {})["caller"] = who
            body = await self._read_body(scope, receive)
        except ApiError as e:
            response = error_response(e.status, e.message, e.type, e.code, e.headers, e.param)
            return await response(scope, receive, send)
        if body is None:                     # the client left while sending its body: nobody to answer
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"请求体太大：最多 {self.max_body} 字节", code="request_too_large")

    async def _read_body(self, scope, receive) -> bytes | None:
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                raise self._too_large()
            if not message.get("more_body", False):
                return b"".join(chunks)


def install_plumbing(app: FastAPI, metrics: Metrics, check=None, max_body: int = 1 << 20) -> None:
    """Every error in OpenAI's shape (ApiError, validation errors, unknown paths, any other exception),
    the Gatekeeper (check(headers, client) for /v1/ before any body is read; bodies capped at max_body)
    and every request counted (the outermost middleware, so refused requests are counted too)."""
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_middleware(Gatekeeper, check=check or (lambda headers, client: None), max_body=max_body)
    app.add_middleware(CountRequests, metrics=metrics)


class RedactQuery(logging.Filter):
    """uvicorn's access log line gets the path with its query string (record.args[2]); a key sent as
    ?api_key=... would be written to the log. Keep the path, hide the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 2 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[已隐去]", *args[3:])
        return True


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that, when asked to stop, first calls on_drain(grace seconds) (the app can then end
    what will not finish in time, and say so) and only then drains connections as uvicorn does."""

    def __init__(self, config: uvicorn.Config, on_drain=None):
        super().__init__(config)
        self.on_drain = on_drain

    async def shutdown(self, sockets=None) -> None:
        if self.on_drain is not None:
            self.on_drain(self.config.timeout_graceful_shutdown or 0)
        await super().shutdown(sockets)


def make_uvicorn(app, log_level: str, grace: float, on_drain=None) -> GracefulServer:
    """A GracefulServer for app whose access log never contains a query string (installed after uvicorn.Config
    has configured logging)."""
    server = GracefulServer(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace), on_drain)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in access.filters):
        access.addFilter(RedactQuery())
    return server


def bind(host: str, port: int) -> socket.socket:
    """Bind the port ourselves: one Chinese line when it is taken; port=0 lets the OS pick a free one (demo, tests)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"无法监听 {host}:{port}（{e.strerror}）：端口被占用？换一个 --port。") from None
    return sock


class Running:
    """A server run by uvicorn in a background thread (the demo and the tests); leaving the with-block stops
    it gracefully (grace seconds for requests in flight). srv is anything with .app() (the ASGI app to serve)
    and .ready() (True once it can answer), optionally .drain(grace) (see GracefulServer); entering waits
    until uvicorn listens and, unless wait_ready=False, until srv.ready()."""

    def __init__(self, srv, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 wait_ready: bool = True, grace: float = 10):
        self.srv, self.sock, self.wait_ready = srv, bind(host, port), wait_ready
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self.server = make_uvicorn(srv.app(), log_level, grace, getattr(srv, "drain", None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 300
        while not (self.server.started and (self.srv.ready() or not self.wait_ready)):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UserError("服务器没能启动（见上面的日志）。")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
