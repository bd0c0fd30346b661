"""A tiny OpenAI-compatible HTTP server for tests (standard library only).

It implements just enough of the OpenAI REST API for the official `openai`
Python SDK to talk to it:

    GET  /v1/models                 -> model list ("test-model", "test-embedding")
    GET  /v1/models/<id>            -> one model
    POST /v1/chat/completions       -> chat.completion, or SSE chat.completion.chunk stream
    POST /v1/embeddings             -> deterministic bag-of-words hashing embeddings
                                       (float list, or base64 float32 - the SDK asks for
                                       base64 by default)

Replies are deterministic: the assistant answers "Echo: <words of the last user
message>". Each word is one "token": the stream sends one chunk per word, and
max_tokens / max_completion_tokens truncate the reply (finish_reason "length").

Failure modes (attribute `mode`, settable by tests at any time, or chosen by the
API key so that a subprocess server can be driven from outside):

    mode     API key            behaviour
    "ok"     anything else      normal answers
    "401"    "bad-key",         401 invalid_api_key (the message echoes the key,
             "mode-401"         like the real API does, so tests can check that
                                clients do not leak it)
    "429"    "mode-429"         429 rate_limit_exceeded, with retry-after headers
    "quota"  "mode-quota"       429 insufficient_quota
    "500"    "mode-500"         500 server_error
    "drop"   "mode-drop"        stream: a few chunks, then the socket is closed
                                (no [DONE], incomplete chunked body);
                                non-stream: the connection is closed with no response
    "slow"   "mode-slow"        waits `slow_seconds` (default 5 s) before answering

Every request is recorded in `server.requests` (method, path, headers - the
Authorization header included - and the parsed JSON body) before the failure
mode is applied, so tests can count retries and check passed-through parameters.

In-process use:

    from tests.openai_test_server import run_server
    with run_server() as server:          # binds 127.0.0.1, free port
        client = openai.OpenAI(base_url=server.base_url, api_key="test-key")
        ...
        server.mode = "429"
        server.requests[-1]["json"]["temperature"]

Subprocess use (first stdout line is the base URL):

    python tests/openai_test_server.py --port 0 [--mode ok] [--lifetime 600]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

CHAT_MODEL = "test-model"
EMBEDDING_MODEL = "test-embedding"
MODEL_IDS = (CHAT_MODEL, EMBEDDING_MODEL)
DEFAULT_EMBEDDING_DIM = 64
MODES = ("ok", "401", "429", "quota", "500", "drop", "slow")
BAD_KEY = "bad-key"
# How many content chunks a "drop" stream sends before closing the socket.
DROP_AFTER_CHUNKS = 2

_WORD_RE = re.compile(r"\w+", re.UNICODE)


# ---------------------------------------------------------------------------
# Deterministic "model" behaviour (public so tests can build references)
# ---------------------------------------------------------------------------


def message_text(content: Any) -> str:
    """Text of a chat message content: a string or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return str(content)


def reply_pieces(messages: list[dict]) -> list[str]:
    """The full reply, split into stream pieces ("tokens"): 'Echo:', ' w1', ' w2', ...

    The reply echoes the whitespace-separated words of the LAST user message.
    """
    last_user = ""
    for msg in messages or []:
        if isinstance(msg, dict) and msg.get("role") == "user":
            last_user = message_text(msg.get("content"))
    return ["Echo:"] + [" " + w for w in last_user.split()]


def echo_reply(messages: list[dict], max_tokens: int | None = None) -> str:
    """The non-stream reply the server gives for `messages` (same as the joined stream)."""
    pieces = reply_pieces(messages)
    if max_tokens is not None:
        pieces = pieces[:max_tokens]
    return "".join(pieces)


def hash_embedding(text: str, dim: int = DEFAULT_EMBEDDING_DIM) -> list[float]:
    """Bag-of-words hashing embedding (NOT unit length on purpose).

    Each lower-cased word adds +-1 to one of `dim` buckets chosen by sha256, so
    texts that share words have a higher cosine similarity. Vectors are left
    un-normalised (like some OpenAI-compatible servers) so tests can check that
    a client normalises them. Text without words gets a fixed vector [1, 0, ...].
    """
    vec = [0.0] * dim
    words = _WORD_RE.findall(text.lower())
    for word in words:
        h = hashlib.sha256(word.encode("utf-8")).digest()
        bucket = int.from_bytes(h[:4], "little") % dim
        sign = 1.0 if h[4] % 2 == 0 else -1.0
        vec[bucket] += sign
    if not any(vec):
        # No words, or all contributions cancelled out: still a valid, non-zero vector.
        vec[0] = 1.0
    return vec


def _count_words(messages: list[dict]) -> int:
    return sum(len(message_text(m.get("content")).split()) for m in messages or [] if isinstance(m, dict))


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, like the real API
    server_version = "OpenAITestServer/1.0"
    timeout = 30  # idle keep-alive connections end by themselves eventually

    server: "OpenAITestServer._HTTPServer"  # type: ignore[name-defined]

    # -- plumbing ----------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.owner._track(self.connection, add=False)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, obj: Any, extra_headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", f"req_test_{self.server.owner._next_id()}")
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, message: str, err_type: str, code: str | None,
                    extra_headers: dict[str, str] | None = None) -> None:
        self._send_json(
            status,
            {"error": {"message": message, "type": err_type, "param": None, "code": code}},
            extra_headers,
        )

    def _drop_connection(self) -> None:
        """Close the TCP connection abruptly (FIN both ways), without finishing the response."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.connection.close()

    def _api_key(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    # -- dispatch ----------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._handle("POST")

    def _handle(self, method: str) -> None:
        owner = self.server.owner
        raw = self._read_body() if method == "POST" else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                owner._record(method, self.path, self.headers, None)
                self._send_error(400, "We could not parse the JSON body of your request.",
                                 "invalid_request_error", None)
                return
        owner._record(method, self.path, self.headers, body)

        path = self.path.split("?", 1)[0].rstrip("/")
        if path.startswith("/v1"):
            path = path[3:]

        # Authentication first, like the real API.
        key = self._api_key()
        mode = owner.mode
        if key is not None and key.startswith("mode-") and key[5:] in MODES:
            mode = key[5:]
        if key is None:
            self._send_error(401, "You didn't provide an API key. You need to provide your API key in an "
                             "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                             "invalid_request_error", None)
            return
        if key == BAD_KEY or mode == "401":
            self._send_error(401, f"Incorrect API key provided: {key}. You can find your API key at "
                             "https://platform.openai.com/account/api-keys.",
                             "invalid_request_error", "invalid_api_key")
            return
        if mode == "429":
            self._send_error(429, f"Rate limit reached for {CHAT_MODEL} on requests per min (RPM): "
                             "Limit 3, Used 3, Requested 1. Please try again in 20s.",
                             "requests", "rate_limit_exceeded",
                             {"retry-after": "0", "retry-after-ms": str(owner.retry_after_ms)})
            return
        if mode == "quota":
            self._send_error(429, "You exceeded your current quota, please check your plan and billing details.",
                             "insufficient_quota", "insufficient_quota")
            return
        if mode == "500":
            self._send_error(500, "The server had an error while processing your request. Sorry about that!",
                             "server_error", None)
            return
        if mode == "slow":
            # Interruptible wait, so stopping the server never hangs on a slow request.
            if owner._stopping.wait(owner.slow_seconds):
                self._drop_connection()
                return

        if method == "GET" and path == "/models":
            self._send_json(200, {"object": "list", "data": [_model_obj(m) for m in MODEL_IDS]})
        elif method == "GET" and path.startswith("/models/"):
            mid = path[len("/models/"):]
            if mid in MODEL_IDS:
                self._send_json(200, _model_obj(mid))
            else:
                self._send_error(404, f"The model '{mid}' does not exist", "invalid_request_error",
                                 "model_not_found")
        elif method == "POST" and path == "/chat/completions":
            self._chat(body if isinstance(body, dict) else {}, mode)
        elif method == "POST" and path == "/embeddings":
            self._embeddings(body if isinstance(body, dict) else {}, mode)
        else:
            self._send_error(404, f"Invalid URL ({method} {self.path})", "invalid_request_error", None)

    # -- endpoints ---------------------------------------------------------

    def _chat(self, body: dict, mode: str) -> None:
        owner = self.server.owner
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            self._send_error(400, "'messages' must be a non-empty array.", "invalid_request_error", None)
            return
        model = body.get("model") or CHAT_MODEL
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        pieces = reply_pieces(messages)
        finish = "stop"
        if isinstance(limit, int) and limit >= 0 and limit < len(pieces):
            pieces = pieces[:limit]
            finish = "length"
        cid = f"chatcmpl-test{owner._next_id()}"
        created = int(time.time())
        usage = {
            "prompt_tokens": _count_words(messages),
            "completion_tokens": len(pieces),
            "total_tokens": _count_words(messages) + len(pieces),
        }

        if not body.get("stream"):
            if mode == "drop":
                self._drop_connection()
                return
            self._send_json(200, {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_test",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }],
                "usage": usage,
            })
            return

        # Streaming: Server-Sent Events over a chunked HTTP/1.1 body (like api.openai.com).
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", f"req_test_{owner._next_id()}")
        self.end_headers()

        def chunk(delta: dict, finish_reason: str | None) -> dict:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_test",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        events: list[dict | str] = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        events += [chunk({"content": p}, None) for p in pieces]
        events.append(chunk({}, finish))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            # Last chunk has no choices, only usage (as the real API does).
            events.append({"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage})
        events.append("[DONE]")

        try:
            for i, ev in enumerate(events):
                if mode == "drop" and i == 1 + DROP_AFTER_CHUNKS:
                    # Role chunk + DROP_AFTER_CHUNKS content chunks went out; now vanish.
                    self._drop_connection()
                    return
                data = ev if isinstance(ev, str) else json.dumps(ev, ensure_ascii=False)
                self._write_chunk(f"data: {data}\n\n".encode("utf-8"))
                if owner.stream_delay:
                    time.sleep(owner.stream_delay)
            self._write_chunk(b"")  # terminating zero-length chunk
        except (BrokenPipeError, ConnectionResetError):
            # Client went away mid-stream (e.g. it stopped reading): nothing to do.
            self.close_connection = True

    def _write_chunk(self, payload: bytes) -> None:
        self.wfile.write(f"{len(payload):x}\r\n".encode("ascii") + payload + b"\r\n")

    def _embeddings(self, body: dict, mode: str) -> None:
        if not self.server.owner.serve_embeddings:      # a chat-only server, like many local ones
            self._send_error(404, f"Invalid URL (POST {self.path})", "invalid_request_error", None)
            return
        if mode == "drop":
            self._drop_connection()
            return
        inp = body.get("input")
        if isinstance(inp, str):
            texts = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            texts = [" ".join(map(str, inp))]  # one token array
        elif isinstance(inp, list) and inp:
            texts = [x if isinstance(x, str) else " ".join(map(str, x)) for x in inp]
        else:
            self._send_error(400, "'input' must be a non-empty string or array.", "invalid_request_error", None)
            return
        if any(t == "" for t in texts):
            self._send_error(400, "'$.input' is invalid. Please check the API reference.",
                             "invalid_request_error", None)
            return
        dim = body.get("dimensions")
        dim = dim if isinstance(dim, int) and dim > 0 else self.server.owner.embedding_dim
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = hash_embedding(text, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode("ascii") if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n_tokens = sum(len(t.split()) for t in texts)
        self._send_json(200, {
            "object": "list",
            "data": data,
            "model": body.get("model") or EMBEDDING_MODEL,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        })


def _model_obj(mid: str) -> dict:
    return {"id": mid, "object": "model", "created": 1700000000, "owned_by": "openai-test-server"}


# ---------------------------------------------------------------------------
# Server object + context manager
# ---------------------------------------------------------------------------


class OpenAITestServer:
    """An OpenAI-compatible server on 127.0.0.1, served from a background thread.

    Attributes tests may read or set at any time:
      base_url        "http://127.0.0.1:PORT/v1"
      requests        list of {"method", "path", "headers", "json"} dicts, oldest first
      mode            one of MODES (see module docstring)
      slow_seconds    how long "slow" mode waits before answering
      stream_delay    seconds between SSE chunks (default 0)
      retry_after_ms  value of the retry-after-ms header sent with 429 (keeps SDK retries fast)
      embedding_dim   embedding size when the request does not ask for `dimensions`
    """

    class _HTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = False
        owner: "OpenAITestServer"

        def handle_error(self, request, client_address):
            # A client that gave up (timeout tests) or a socket closed by stop() is expected here;
            # socketserver would print "Exception occurred during processing of request" for it.
            exc = sys.exc_info()[1]
            if isinstance(exc, (ConnectionError, OSError)) or self.owner._stopping.is_set():
                return
            super().handle_error(request, client_address)

    def __init__(self, mode: str = "ok", port: int = 0, verbose: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        self.mode = mode
        self.verbose = verbose
        self.slow_seconds = 5.0
        self.stream_delay = 0.0
        self.retry_after_ms = 10
        self.embedding_dim = DEFAULT_EMBEDDING_DIM
        self.serve_embeddings = True      # False: POST /v1/embeddings answers 404 (chat still works)
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd = self._HTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self.host, self.port = self._httpd.server_address[:2]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread: threading.Thread | None = None

    # internal helpers used by the handler
    def _next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def _record(self, method: str, path: str, headers: Any, body: Any) -> None:
        entry = {"method": method, "path": path, "headers": {k.lower(): v for k, v in headers.items()},
                 "json": body}
        with self._lock:
            self.requests.append(entry)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # public API
    def requests_to(self, suffix: str) -> list[dict]:
        """Recorded requests whose path (without query) ends with `suffix`, e.g. "/chat/completions"."""
        with self._lock:
            return [r for r in self.requests if r["path"].split("?", 1)[0].rstrip("/").endswith(suffix)]

    def start(self) -> "OpenAITestServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"openai-test-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and every open client connection."""
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> "OpenAITestServer":
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def run_server(mode: str = "ok", verbose: bool = False) -> Iterator[OpenAITestServer]:
    """Start a server on 127.0.0.1 (free port) for the duration of the `with` block."""
    server = OpenAITestServer(mode=mode, verbose=verbose).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now). Useful for 'server down' tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="OpenAI-compatible test server (127.0.0.1 only).")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 = any free port)")
    parser.add_argument("--mode", choices=MODES, default="ok", help="failure mode for every request")
    parser.add_argument("--lifetime", type=float, default=600.0,
                        help="exit after this many seconds (0 = run until killed)")
    parser.add_argument("--slow-seconds", type=float, default=5.0, help="delay used by mode 'slow'")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    server = OpenAITestServer(mode=args.mode, port=args.port, verbose=args.verbose)
    server.slow_seconds = args.slow_seconds
    server.start()
    print(server.base_url, flush=True)
    try:
        if args.lifetime > 0:
            time.sleep(args.lifetime)
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal

    # SIGTERM -> the KeyboardInterrupt path of main(), so the port is released promptly.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    sys.exit(main())
