"""Structured output for lesson 06's server: OpenAI's `response_format` (json_schema, json_object) and
`tools` / `tool_choice`, enforced with lesson 07's grammar (common/json_schema.py) inside the
continuous-batching engine.

How it fits together (docs/06_serve.md, section "response_format 与 tools"):
  - plan(body, tokenizer) reads the request: which schema to enforce, whether the output is a tool
    call, and the prompt messages (tool descriptions added to the system message, assistant
    `tool_calls` and `tool` results rendered as text so an agent loop can send its history back).
    A schema the compiler refuses, or a malformed field, is an ApiError 400 (never a 500).
  - Plan.row() gives the request its own RowConstraint. The engine (06_serve.py, Engine.step) calls
    mask_(logits_row) on that row's logits before picking a token, advance(token) after emitting it
    (True = the document is complete and nothing but the end can follow: finish now) and end_reason()
    when the row ends on its own. Rows without a constraint are untouched.
  - chat_body() / chat_events() shape the reply: plain content, or OpenAI's `tool_calls`
    (finish_reason "tool_calls"), non-streaming and streaming (delta.tool_calls with index; the first
    fragment carries id, type and name, the arguments follow in fragments as they are generated).

The tool-call grammar: {"name": <const>, "arguments": <the function's parameters schema>}, an anyOf over
the tools. Because the grammar is compact with a fixed key order, the generated text always starts with
`{"name":"<tool>","arguments":` and the arguments are the bytes between that prefix and the last `}`.
tool_choice "required" or a named function: the grammar holds from the first token. "auto": generation is
free until the first character that is not JSON whitespace; if it is `{` the tool-call grammar is switched
on from there (tokens starting with `{` that cannot begin a tool call are masked), anything else makes the
reply plain text. At most one tool call per reply (parallel_tool_calls is accepted and has no effect).

Caches: one Vocab (byte trie) per tokenizer, built on first use; compiled masks in an LRU keyed by the
schema's JSON, shared by every server of the process. A compiled mask's per-state tables grow as the engine
meets new states; a lock per compiled schema keeps two engines (two servers in one process) from growing
them at once.
"""
from __future__ import annotations

import asyncio
import collections
import json
import re
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field

from common.errors import UserError
from common.serving import ApiError, error_body, sse, text_of_content

JSON_WS = " \t\n\r"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")     # what OpenAI accepts as a function name
MASK_LRU = 64                                        # compiled schemas kept per tokenizer


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------ compiled masks and their caches
class Compiled:
    """One schema's TokenMask plus what the engine needs per step: the blocked-token tensor sized to the
    model's logits (a model may have more logits than the tokenizer has tokens: the extra ids are blocked),
    'complete and nothing else can follow', and for tool_choice "auto" the free-phase mask."""

    def __init__(self, mask, tokenizer):
        self.mask, self.tok = mask, tokenizer
        self.eos = mask.vocab.eos
        self.lock = threading.Lock()    # the mask's tables grow as states are met: one engine thread at a time
        self._blocked: dict[tuple[int, int], object] = {}
        self._final: dict[int, bool] = {}
        self._free = None

    def blocked(self, sid: int, width: int):
        key = (sid, width)
        if key not in self._blocked:
            self.mask.allowed(sid)
            self._blocked[key] = fit(self.mask.blocked[sid], width)
        return self._blocked[key]

    def final(self, sid: int) -> bool:
        """The document is complete and the only allowed token is the end: the row can finish right now."""
        if sid not in self._final:
            allowed = self.mask.allowed(sid)
            self._final[sid] = self.mask.done(sid) and int(allowed.sum()) == 1 and bool(allowed[self.eos])
        return self._final[sid]

    def advance_bytes(self, sid: int, data: bytes) -> int:
        for b in data:
            sid = self.mask.next(sid, b) if sid >= 0 else -1
        return sid

    def free_blocked(self, width: int):
        """tool_choice "auto" before the first non-space character: every token is allowed except those whose
        first non-space byte is `{` but which cannot begin a tool call."""
        if self._free is None:
            import torch

            bad = torch.zeros(self.mask.vocab.n, dtype=torch.bool)
            for t in range(self.mask.vocab.n):
                body = self.tok.token_bytes(t).lstrip(JSON_WS.encode())
                if body[:1] == b"{" and self.advance_bytes(self.mask.start, body) < 0:
                    bad[t] = True
            self._free = {}
            self._free_base = bad
        if width not in self._free:
            self._free[width] = fit(self._free_base, width, pad=False)
        return self._free[width]


def fit(blocked, width: int, pad: bool = True):
    """A blocked-token vector resized to the logits' width (extra model ids are blocked when pad)."""
    import torch

    n = blocked.numel()
    if n == width:
        return blocked
    if n > width:
        return blocked[:width]
    return torch.cat([blocked, torch.full((width - n,), pad, dtype=torch.bool)])


class MaskCache:
    """Per tokenizer: the Vocab (built on first use) and an LRU of compiled schemas."""

    def __init__(self, tokenizer):
        self.tok, self.vocab = tokenizer, None
        self.lock = threading.Lock()
        self.lru: collections.OrderedDict[str, Compiled] = collections.OrderedDict()

    def get(self, schema) -> Compiled:
        """Compile (or reuse) a schema. Raises UserError (one line naming the keyword) when it is refused."""
        from common.json_schema import TokenMask, Vocab, compile_schema

        key = json.dumps(schema, sort_keys=True)
        with self.lock:
            if key in self.lru:
                self.lru.move_to_end(key)
                return self.lru[key]
            if self.vocab is None:
                self.vocab = Vocab(self.tok)
            compiled = Compiled(TokenMask(compile_schema(schema), self.vocab, self.tok), self.tok)
            self.lru[key] = compiled
            if len(self.lru) > MASK_LRU:
                self.lru.popitem(last=False)
            return compiled


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def cache_for(tokenizer) -> MaskCache:
    with _CACHES_LOCK:
        if tokenizer not in _CACHES:
            _CACHES[tokenizer] = MaskCache(tokenizer)
        return _CACHES[tokenizer]


# ------------------------------------------------------------------ one row's constraint (used by the engine)
class RowConstraint:
    """One request's mask state inside the engine. phase: "json" (the grammar holds), "free" (tool_choice auto,
    nothing but whitespace written yet) or "text" (auto, and the reply turned out to be plain text)."""

    def __init__(self, compiled: Compiled, tool: bool, lazy: bool, metrics=None):
        self.c, self.tool, self.metrics = compiled, tool, metrics
        self.sid = compiled.mask.start
        self.phase = "free" if lazy else "json"

    def mask_(self, logits) -> None:
        """Set the logits of every token that would break the document to -inf (in place, this row only)."""
        t0 = time.perf_counter()
        with self.c.lock:
            if self.phase == "json":
                logits.masked_fill_(self.c.blocked(self.sid, logits.shape[-1]), float("-inf"))
            elif self.phase == "free":
                logits.masked_fill_(self.c.free_blocked(logits.shape[-1]), float("-inf"))
        self._timed(t0)

    def advance(self, token: int) -> bool:
        """Move the state past an emitted token. True = the document is complete and only the end can follow."""
        t0 = time.perf_counter()
        with self.c.lock:
            final = self._advance(token)
        self._timed(t0, token=True)
        return final

    def _advance(self, token: int) -> bool:
        if self.phase == "free":
            body = self.c.tok.token_bytes(token).lstrip(JSON_WS.encode())
            if body:
                self.phase = "json" if body[:1] == b"{" else "text"
                if self.phase == "json":
                    self.sid = self.c.advance_bytes(self.c.mask.start, body)
        elif self.phase == "json":
            self.sid = self.c.mask.advance(self.sid, token)
        if self.phase == "json" and self.sid < 0:
            raise RuntimeError("constrained decoding reached an invalid state")
        return self.phase == "json" and self.c.final(self.sid)

    def end_reason(self) -> str:
        """finish_reason when the row ends (end token chosen, or the document complete): a complete document is
        "stop" ("tool_calls" for a tool call); a document that cannot be completed (contradictory constraints
        left only the end token) is "length", never reported as complete."""
        if self.phase != "json":
            return "stop"
        with self.c.lock:
            complete = self.c.mask.done(self.sid)
        if not complete:
            return "length"
        return "tool_calls" if self.tool else "stop"

    def _timed(self, t0: float, token: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.mask_seconds.inc(time.perf_counter() - t0)
            if token:
                self.metrics.mask_tokens.inc()


# ------------------------------------------------------------------ request -> plan
@dataclass
class Plan:
    new: list[dict]                          # this request's messages as text (tool calls / results rendered)
    prompt: list[dict]                       # history + new, with the tool descriptions in the system message
    compiled: Compiled | None = None         # the schema to enforce (None: free text)
    tool_names: list[str] = field(default_factory=list)
    lazy: bool = False                       # tool_choice "auto": the grammar starts at a leading `{`

    @property
    def tools(self) -> bool:
        return bool(self.tool_names)

    def row(self, metrics=None) -> RowConstraint | None:
        return RowConstraint(self.compiled, self.tools, self.lazy, metrics) if self.compiled else None


def bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def response_schema(rf) -> dict | None:
    """response_format -> the schema to enforce (None for text)."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad('response_format 应该是 {"type": "text" | "json_object" | "json_schema", ...}', "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "object"}
    if rf["type"] != "json_schema":
        raise bad(f"本服务器不支持参数 response_format.type={rf['type']!r}（支持 text、json_object、json_schema）",
                  "response_format", "unsupported_parameter")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise bad('response_format.json_schema 应该是 {"name": ..., "schema": {...}, "strict": true}', "response_format")
    return spec.get("schema", {})


def function_tools(tools) -> list[dict]:
    """tools -> [{"name", "description", "parameters"}] (function tools only)."""
    if not isinstance(tools, list):
        raise bad("tools 应该是列表", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else t
            raise bad(f"本服务器不支持参数 tools[{i}].type={kind!r}：只支持 function 工具", "tools",
                      "unsupported_parameter")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not TOOL_NAME.match(fn["name"]):
            raise bad(f"tools[{i}].function 需要 name（字母、数字、_ 或 -，最长 64 个字符）", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
        out.append({"name": fn["name"], "description": str(fn.get("description") or ""), "parameters": params})
    if len({t["name"] for t in out}) != len(out):
        raise bad("tools 里有同名的函数", "tools")
    return out


def chosen_tools(tools: list[dict], choice) -> tuple[list[dict], bool]:
    """tool_choice -> (the tools the output may call, lazy). An empty list = no tool call (tool_choice "none")."""
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return [], False
    if not tools:
        raise bad(f"tool_choice={compact(choice)[:60]} 需要同时给出 tools", "tool_choice")
    if choice in ("auto", "required"):
        return tools, choice == "auto"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise bad('tool_choice 应该是 "none"、"auto"、"required" 或 {"type": "function", "function": {"name": ...}}',
                  "tool_choice")
    picked = [t for t in tools if t["name"] == name]
    if not picked:
        raise bad(f"tool_choice 指定的函数 {name!r} 不在 tools 里", "tool_choice")
    return picked, False


def tool_call_schema(tools: list[dict]) -> dict:
    alts = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def compile_or_400(cache: MaskCache, schema, param: str, where: str = ""):
    try:
        return cache.get(schema)
    except UserError as e:
        raise bad(f"{where}{e}", param, "invalid_schema") from None
    except RecursionError:
        raise bad(f"{where}schema 嵌套太深", param, "invalid_schema") from None


def compile_plan(extra: dict, tokenizer, new: list[dict], history: list[dict]) -> Plan:
    """The blocking part of plan() (compiling schemas, building the Vocab once): run off the event loop."""
    schema = response_schema(extra.get("response_format"))
    tools, lazy = chosen_tools(function_tools(extra.get("tools") or []), extra.get("tool_choice"))
    if not (schema is not None or tools):
        return Plan(new, history + new)
    if not hasattr(tokenizer, "token_bytes"):
        raise bad("这个模型（第 04 课的小 GPT）不支持结构化输出：它的分词器没有字节级词表",
                  "tools" if tools else "response_format", "unsupported_parameter")
    cache = cache_for(tokenizer)
    if tools and schema is not None:
        raise bad("本服务器不支持 response_format 和 tools 同时使用（tool_choice 为 none 时可以）", "response_format",
                  "unsupported_parameter")
    if schema is not None:
        return Plan(new, history + new, compile_or_400(cache, schema, "response_format"))
    for t in tools:                                   # each tool alone first: the error names the tool
        compile_or_400(cache, t["parameters"], "tools", f"工具 {t['name']} 的 parameters：")
    compiled = compile_or_400(cache, tool_call_schema(tools), "tools")
    return Plan(new, with_tool_prompt(history + new, tools, lazy, tokenizer), compiled, [t["name"] for t in tools],
                lazy)


async def plan(body, tokenizer, history: list[dict]) -> Plan:
    """A chat request (common/serving.ChatRequest) after the session's history -> Plan. 400 for a malformed
    field or a refused schema."""
    extra = body.model_extra or {}
    new = render_messages(body.messages)
    if not any(extra.get(k) is not None for k in ("response_format", "tools", "tool_choice")):
        return Plan(new, history + new)
    return await asyncio.to_thread(compile_plan, extra, tokenizer, new, history)


# ------------------------------------------------------------------ prompt: tools and tool history
def tool_instruction(tools: list[dict], lazy: bool) -> str:
    lines = ["You can call these tools:"]
    for t in tools:
        lines.append(f"- {t['name']}: {t['description']} Arguments (JSON Schema): {compact(t['parameters'])}")
    lines.append('To call a tool, reply with only a JSON object: {"name": "<tool name>", "arguments": {...}}.')
    if lazy:
        lines.append("If no tool is needed, answer in plain text.")
    return "\n".join(lines)


def with_tool_prompt(messages: list[dict], tools: list[dict], lazy: bool, tokenizer) -> list[dict]:
    """The tool descriptions go at the end of the system message (the model's default one when there is none)."""
    text = tool_instruction(tools, lazy)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}] + messages[1:]
    default = getattr(tokenizer, "default_system", "")
    return [{"role": "system", "content": f"{default}\n\n{text}" if default else text}] + messages


def render_messages(messages) -> list[dict]:
    """Chat messages -> {"role", "content"} text for the chat template. An assistant message's tool_calls are
    written as the JSON the model itself produces ({"name": ..., "arguments": {...}}, one per line); a `tool`
    message keeps its role (ChatML) and its text."""
    out = []
    for i, m in enumerate(messages):
        text = text_of_content(m.content, f"messages.{i}")
        calls = (m.model_extra or {}).get("tool_calls") if m.role == "assistant" else None
        if calls:
            text = "\n".join(([text] if text else []) + [call_text(c, f"messages.{i}.tool_calls.{j}")
                                                           for j, c in enumerate(calls)])
        out.append({"role": m.role, "content": text})
    return out


def call_text(call, where: str) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"{where} 应该是 {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": ...}}}}", where)
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass                                           # keep the string as it was sent
    return compact({"name": fn["name"], "arguments": args})


# ------------------------------------------------------------------ reply shaping
def split_call(text: str, names: list[str], complete: bool) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a generated tool call, or None when `text` is not (yet) one. The grammar
    writes `{"name":"<tool>","arguments":<args>}`: the arguments are the text between that prefix and the
    closing `}` (when the call is complete; a cut-off call gives what was written)."""
    s = text.lstrip(JSON_WS)
    for name in names:
        head = '{"name":' + compact(name) + ',"arguments":'
        if s.startswith(head):
            args = s[len(head):]
            return name, args[:-1] if complete and args.endswith("}") else args
    return None


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def chat_body(reply, head: dict, plan: Plan) -> dict:
    """The non-streaming chat.completion: content, or tool_calls with finish_reason "tool_calls"."""
    message = {"role": "assistant", "content": reply.text}
    call = split_call(reply.text, plan.tool_names, reply.finish == "tool_calls") if plan.tools else None
    if call is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id(), "type": "function", "function": {"name": call[0], "arguments": call[1]}}]}
    return {**head, "object": "chat.completion", "usage": reply.usage(),
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}]}


class ToolCallStream:
    """Turns a tool plan's growing text into stream deltas. Before the first non-space character nothing is
    sent; a reply starting with `{` is a tool call: one fragment with id, type and name as soon as the name is
    complete, then the arguments as they grow (the last `}` is held back: it may close the wrapper); any
    other reply is plain content."""

    def __init__(self, names: list[str]):
        self.names, self.mode, self.name, self.sent = names, None, None, 0

    def feed(self, text: str, final: bool = False, complete: bool = False) -> list[dict]:
        """Deltas for the text so far; final = the reply has ended, complete = it ended as a whole tool call."""
        if self.mode is None and text.lstrip(JSON_WS):
            self.mode = "call" if text.lstrip(JSON_WS)[0] == "{" else "text"
        if self.mode is None:
            return [{"content": text}] if final and text else []
        if self.mode == "text":
            out, self.sent = text[self.sent:], len(text)
            return [{"content": out}] if out else []
        call = split_call(text, self.names, complete)
        if call is None:                                  # cut off before the name was complete: send it as text
            return [{"content": text}] if final else []
        out = []
        if self.name is None:
            self.name = call[0]
            out.append({"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                        "function": {"name": self.name, "arguments": ""}}]})
        end = len(call[1]) if final else len(call[1]) - 1
        if end > self.sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": call[1][self.sent:end]}}]})
            self.sent = end
        return out


async def deltas(reply, plan: Plan):
    """The reply's stream deltas: {"content": piece}, or tool-call fragments (ToolCallStream)."""
    if not plan.tools:
        async for piece in reply.pieces():
            yield {"content": piece}
        return
    stream, text = ToolCallStream(plan.tool_names), ""
    async for piece in reply.pieces():
        text += piece
        for d in stream.feed(text):
            yield d
    for d in stream.feed(text, final=True, complete=reply.finish == "tool_calls"):
        yield d


async def chat_events(reply, head: dict, plan: Plan, include_usage: bool, on_complete):
    """The SSE events of a streamed chat completion: a first chunk with the role, the deltas, the finish_reason
    chunk (optionally a usage chunk), then [DONE]. on_complete() runs after a reply that ended normally."""
    chunk = {**head, "object": "chat.completion.chunk"}
    first = {"role": "assistant", "content": None if plan.tools else ""}
    yield sse({**chunk, "choices": [{"index": 0, "delta": first, "finish_reason": None}]})
    async for delta in deltas(reply, plan):
        yield sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    if (failed := reply.failure()) is not None:          # engine error or shutdown: the last event says why
        yield sse(error_body(failed))
        yield "data: [DONE]\n\n"
        return
    yield sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish}]})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": reply.usage()})
    yield "data: [DONE]\n\n"
    on_complete()
