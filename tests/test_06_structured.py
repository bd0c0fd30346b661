"""Lesson 06's server honours `response_format` (json_schema, json_object) and `tools` / `tool_choice` with the
grammar of common/json_schema.py, inside the continuous-batching engine (common/structured_serving.py).

The fast tests serve a tiny random Llama that uses the real SmolLM2 tokenizer (the mask needs its byte-level
vocabulary): its words are nonsense, but every constrained reply must still be valid, and the schemas used
here are bounded (enums, bounded integers, short strings) so that a reply always completes. The real openai
SDK is the client. The slow tests serve SmolLM2 itself (parse() with a pydantic model, a forced tool call,
and lesson 07's --quick pointed at the server).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from test_06_serve import KEY, auth, make_server, request, serve

from common import structured_serving as ss
from common.serving import ApiError, ChatRequest, Running

TINY = "tiny-random-llama"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                                 "parameters": WEATHER}}
TIME_TOOL = {"type": "function", "function": {"name": "current_time", "description": "The time now.",
                                              "parameters": {"type": "object", "properties": {},
                                                             "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Rome for 3 days?"}]


class Weather(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=9)
    rain: bool
    note: str = Field(max_length=6)


def valid(schema, instance) -> bool:
    import jsonschema

    return jsonschema.Draft202012Validator(schema).is_valid(instance)


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 2-layer Llama over SmolLM2's tokenizer (49,152 ids): fast, and its logits are arbitrary."""
    import torch

    from common.llama import Llama, LlamaConfig
    from common.tokenizer import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.n_vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=1024)
    return types.SimpleNamespace(model=Llama(cfg).eval(), tokenizer=tok, model_id=TINY)


@pytest.fixture(scope="module")
def running(tiny_lm, tmp_path_factory):
    db = tmp_path_factory.mktemp("structured") / "sessions.sqlite3"
    with Running(make_server(tiny_lm, db, max_context=512, prefill_chunk=64, default_max_tokens=64)) as run:
        yield run


@pytest.fixture()
def client(running):
    import openai

    return openai.OpenAI(base_url=running.base_url, api_key=KEY, max_retries=0, timeout=120)


def chat(run, **body):
    return request(run, "POST", "/v1/chat/completions", {"model": TINY, "messages": ASK, "max_tokens": 48, **body},
                   auth())


# ------------------------------------------------------------------ response_format
def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    r = client.chat.completions.parse(model=TINY, messages=ASK, response_format=Weather, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Weather)
    assert Weather.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_is_a_json_object_or_honestly_cut(client):
    """{"type": "json_object"} compiles {"type": "object"}: the reply starts with `{` and, when it ends on its
    own (finish_reason "stop"), parses as an object; a reply the budget cut says "length"."""
    for seed in range(3):
        r = client.chat.completions.create(model=TINY, messages=ASK, response_format={"type": "json_object"},
                                           max_tokens=40, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.message.content.startswith("{")
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def test_budget_cut_is_length_never_complete(client):
    import openai

    r = client.chat.completions.create(model=TINY, messages=ASK, max_tokens=3, response_format={
        "type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}})
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=TINY, messages=ASK, response_format=Weather, max_tokens=3)


@pytest.mark.parametrize("where, body, keyword", [
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}}, "not"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]}, "uniqueItems"),
])
def test_refused_schema_is_400_naming_the_keyword(running, client, where, body, keyword):
    import openai

    status, _, err = chat(running, **body)
    assert status == 400, err
    e = err["error"]
    assert (e["type"], e["param"], e["code"]) == ("invalid_request_error", where, "invalid_schema")
    assert repr(keyword) in e["message"] and "\n" not in e["message"]
    if where == "tools":
        assert "工具 f" in e["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=ASK, **body)
    assert keyword in str(info.value)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]}, "messages.1.tool_calls.0"),
])
def test_malformed_structured_fields_are_400_naming_them(running, body, param):
    status, _, err = chat(running, **body)
    assert status == 400 and err["error"]["param"] == param, err


# ------------------------------------------------------------------ tools
def check_call(call, schemas: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in schemas
    args = json.loads(call.function.arguments)
    assert valid(schemas[call.function.name], args), args
    return args


def test_forced_named_tool_call_non_streaming(client):
    r = client.chat.completions.create(model=TINY, messages=ASK, tools=[TIME_TOOL, WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name == "get_weather"
    check_call(choice.message.tool_calls[0], {"get_weather": WEATHER})


def test_required_tool_call_streaming_is_assembled_by_the_sdk(client):
    schemas = {"get_weather": WEATHER, "current_time": TIME_TOOL["function"]["parameters"]}
    stream = client.chat.completions.create(model=TINY, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice="required", stream=True, temperature=0)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls and calls[0].index == 0 and calls[0].id.startswith("call_") and calls[0].type == "function"
    assert calls[0].function.name in schemas and all(c.id is None and c.function.name is None for c in calls[1:])
    assert not any(d.content for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    args = "".join(c.function.arguments or "" for c in calls)
    assert valid(schemas[calls[0].function.name], json.loads(args))
    # the SDK's own stream helper assembles the fragments into one message
    with client.chat.completions.stream(model=TINY, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL],
                                        tool_choice="required", temperature=0) as s:
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert check_call(final.choices[0].message.tool_calls[0], schemas) == json.loads(args)   # greedy: the same call


def test_pydantic_function_tool_streams_parsed_arguments(client):
    import openai

    with client.chat.completions.stream(model=TINY, messages=ASK, tools=[openai.pydantic_function_tool(Weather)],
                                        tool_choice="required", max_tokens=64) as s:
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "Weather"
    assert isinstance(call.function.parsed_arguments, Weather)


def test_agent_loop_history_with_tool_calls_and_results(running, client):
    """The assistant's tool_calls and the tool's result go back in the history (an agent loop's second turn)."""
    first = client.chat.completions.create(model=TINY, messages=ASK, tools=[WEATHER_TOOL], tool_choice="required")
    msg = first.choices[0].message
    history = ASK + [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "Sunny, 24 C"}]
    second = client.chat.completions.create(model=TINY, messages=history, tools=[WEATHER_TOOL], tool_choice="none",
                                            max_tokens=4)
    assert second.choices[0].message.tool_calls is None and second.choices[0].finish_reason in ("stop", "length")
    rendered = ss.render_messages(ChatRequest(model=TINY, messages=history).messages)
    assert rendered[1] == {"role": "assistant", "content": json.dumps(
        {"name": "get_weather", "arguments": json.loads(msg.tool_calls[0].function.arguments)}, separators=(",", ":"))}
    assert rendered[2] == {"role": "tool", "content": "Sunny, 24 C"}
    plan = ss.compile_plan({"tools": [WEATHER_TOOL]}, running.srv.lm.tokenizer, rendered, [])
    assert plan.lazy and plan.prompt[0]["role"] == "system" and "get_weather" in plan.prompt[0]["content"]
    assert plan.prompt[1:] == rendered


def test_auto_tool_choice_is_a_valid_call_or_plain_text(client):
    for seed in range(3):
        r = client.chat.completions.create(model=TINY, messages=ASK, tools=[WEATHER_TOOL], temperature=1.0, seed=seed,
                                           max_tokens=24)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
            if choice.finish_reason == "tool_calls":
                check_call(choice.message.tool_calls[0], {"get_weather": WEATHER})
        else:
            assert not choice.message.content.lstrip(" \t\n\r").startswith("{")
            assert choice.finish_reason in ("stop", "length")


def test_auto_rule_free_until_the_first_non_space_character(tiny_lm):
    """tool_choice "auto": whitespace keeps the row free; a token starting with `{` switches the tool-call grammar
    on (tokens starting with `{` that cannot begin a call are masked while free); anything else is plain text."""
    import torch

    tok = tiny_lm.tokenizer
    plan = ss.compile_plan({"tools": [WEATHER_TOOL]}, tok, ASK, [])
    logits = torch.zeros(tok.n_vocab)
    row = plan.row()
    row.mask_(logits)
    assert logits[tok.encode("Hello")[0]] == 0
    bad = [t for t in range(tok.n_vocab) if tok.token_bytes(t).startswith(b"{}")]
    assert bad and all(logits[t] == float("-inf") for t in bad)           # `{}` can never start a call
    assert not row.advance(tok.encode(" ")[0]) and row.phase == "free"
    assert not row.advance(tok.encode("Hello")[0]) and row.phase == "text" and row.end_reason() == "stop"
    row = plan.row()
    for t in tok.encode(' {"name":"get_weather","arguments":{"city":"Oslo","days":2}}'):
        logits = torch.zeros(tok.n_vocab)
        row.mask_(logits)
        assert logits[t] == 0
        done = row.advance(t)
    assert done and row.phase == "json" and row.end_reason() == "tool_calls"


def test_tool_call_stream_fragments_and_cut_calls():
    names = ["get_weather"]
    text = '{"name":"get_weather","arguments":{"city":"Rome","days":3}}'
    stream, out = ss.ToolCallStream(names), []
    for i in range(1, len(text) + 1):
        out += stream.feed(text[:i])
    out += stream.feed(text, final=True, complete=True)
    assert out[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in out[1:]) == '{"city":"Rome","days":3}'
    cut = ss.ToolCallStream(names)
    assert cut.feed('{"name":"get_w') == [] and cut.feed('{"name":"get_w', final=True) == [{"content": '{"name":"get_w'}]
    assert ss.split_call(' {"name":"get_weather","arguments":{"ci', names, False) == ("get_weather", '{"ci')
    text_reply = ss.ToolCallStream(names)
    assert text_reply.feed("  ") == [] and text_reply.feed("  Hi") == [{"content": "  Hi"}]


# ------------------------------------------------------------------ inside the batch
def test_mixed_batch_every_constrained_row_is_valid(running, client):
    """Free and constrained requests at once (4 rows, 6 requests): every constrained reply is valid; free rows
    are unaffected (their text equals the same request sent alone, greedy)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    kinds = [dict(response_format=fmt), dict(), dict(tools=[WEATHER_TOOL], tool_choice="required"), dict(),
             dict(response_format=Weather), dict(tools=[TIME_TOOL, WEATHER_TOOL], tool_choice="required")]
    alone_free = client.chat.completions.create(model=TINY, messages=ASK, max_tokens=12, temperature=0).choices[0]
    results = [None] * len(kinds)

    def one(i):
        kw = kinds[i]
        call = client.chat.completions.parse if kw.get("response_format") is Weather else client.chat.completions.create
        results[i] = call(model=TINY, messages=ASK, max_tokens=64 if kw else 12, temperature=0, **kw).choices[0]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(kinds))]
    running.srv.engine.reset_stats()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert max(running.srv.engine.stats()["decode"]) > 1, "no step ran more than one row"
    assert valid(WEATHER, json.loads(results[0].message.content)) and results[0].finish_reason == "stop"
    for free in (results[1], results[3]):
        assert (free.message.content, free.finish_reason) == (alone_free.message.content, alone_free.finish_reason)
    check_call(results[2].message.tool_calls[0], {"get_weather": WEATHER})
    assert isinstance(results[4].message.parsed, Weather)
    check_call(results[5].message.tool_calls[0], {"get_weather": WEATHER, "current_time": TIME_TOOL["function"]["parameters"]})
    assert [results[i].finish_reason for i in (0, 2, 4, 5)] == ["stop", "tool_calls", "stop", "tool_calls"]


def test_engine_batched_constrained_equals_alone(tiny_lm):
    """At temperature 0 a constrained row's tokens are the same alone and in a batch beside free and other
    constrained rows (chunked prefill, rows joining at different steps)."""
    import time

    tok = tiny_lm.tokenizer
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"schema": WEATHER}}}
    tools = {"tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required"}
    specs = [(fmt, "Weather in Oslo?"), ({}, "Hi"), (tools, "Rome, 3 days?"), ({}, "Tell me a story."), (fmt, "Paris")]

    def jobs():
        out = []
        for extra, text in specs:
            plan = ss.compile_plan(extra, tok, [{"role": "user", "content": text}], [])
            out.append(serve.Job(tok.apply_chat_template(plan.prompt), 40, stop_ids=frozenset(tok.eos_ids),
                                 constraint=plan.row()))
        return out

    def run(batch: int, jobs_, gap: float):
        engine = serve.Engine(tiny_lm.model, max_batch=batch, max_len=512, prefill_chunk=32).start()
        got, done = {}, threading.Semaphore(0)
        try:
            for i, job in enumerate(jobs_):
                got[i] = []
                job.on_event = lambda kind, v, i=i: got[i].append(v) if kind == "token" else done.release()
                engine.submit(job)
                time.sleep(gap)
            for _ in jobs_:
                assert done.acquire(timeout=300)
        finally:
            engine.stop()
        return [got[i] for i in range(len(jobs_))], [j.finish_reason for j in jobs_], engine
    alone = [run(1, [job], 0)[:2] for job in jobs()]
    batched, reasons, engine = run(3, jobs(), 0.01)
    assert batched == [a[0][0] for a in alone] and reasons == [a[1][0] for a in alone]
    assert max(engine.stats()["decode"]) > 1
    assert reasons[0] == reasons[4] == "stop" and reasons[2] == "tool_calls"
    assert valid(WEATHER, json.loads(tok.decode(batched[0])))


def test_model_without_a_byte_vocabulary_is_400_not_500():
    tok = types.SimpleNamespace(apply_chat_template=lambda messages: [1])   # like lesson 04's PlainTextTemplate
    with pytest.raises(ApiError) as e:
        ss.compile_plan({"response_format": {"type": "json_object"}}, tok, ASK, [])
    assert (e.value.status, e.value.param, e.value.code) == (400, "response_format", "unsupported_parameter")
    assert ss.compile_plan({"response_format": {"type": "text"}, "tool_choice": "none"}, tok, ASK, []).compiled is None


def test_masks_are_cached_per_tokenizer_and_schema(tiny_lm):
    cache = ss.cache_for(tiny_lm.tokenizer)
    assert ss.cache_for(tiny_lm.tokenizer) is cache
    a = cache.get({"type": "object", "properties": {"x": {"type": "boolean"}}})
    assert cache.get({"properties": {"x": {"type": "boolean"}}, "type": "object"}) is a        # key order ignored
    assert cache.vocab is a.mask.vocab


def test_constrained_tokens_are_counted_in_metrics(running):
    import urllib.request

    def read(name: str) -> float:
        with urllib.request.urlopen(running.base_url.removesuffix("/v1") + "/metrics") as r:
            lines = r.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " "))
    before = read("llm_constrained_tokens_total")
    status, _, body = chat(running, response_format={"type": "json_schema", "json_schema": {"schema": WEATHER}})
    assert status == 200
    assert read("llm_constrained_tokens_total") - before == body["usage"]["completion_tokens"]
    assert read("llm_constraint_mask_seconds_total") > 0


# ------------------------------------------------------------------ the real model (slow)
@pytest.fixture(scope="module")
def smollm2(local_fp32, tmp_path_factory):
    db = tmp_path_factory.mktemp("structured-smollm2") / "sessions.sqlite3"
    with Running(make_server(local_fp32, db, max_context=1024, max_batch=4, default_max_tokens=96)) as run:
        yield run


@pytest.mark.slow
def test_smollm2_parse_json_object_and_forced_tool_call(smollm2):
    import openai

    client = openai.OpenAI(base_url=smollm2.base_url, api_key=KEY, max_retries=0, timeout=300)
    model = serve.MODEL_IDS["smollm2"]

    class Review(BaseModel):
        product: str = Field(max_length=40)
        rating: int = Field(ge=1, le=5)
        sentiment: Literal["positive", "negative", "neutral"]

    msg = [{"role": "user", "content": "Review: the desk lamp is great, 5 stars. Extract product, rating, sentiment as JSON."}]
    r = client.chat.completions.parse(model=model, messages=msg, response_format=Review, max_tokens=64, temperature=0)
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Review)
    cat = [{"role": "user", "content": 'Write a JSON object with the keys "name" and "age" for a cat named Tom, age 3.'}]
    r = client.chat.completions.create(model=model, messages=cat, response_format={"type": "json_object"}, max_tokens=96,
                                       temperature=0)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL], temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].finish_reason == "tool_calls"
    check_call(r.choices[0].message.tool_calls[0], {"get_weather": WEATHER})


@pytest.mark.slow
def test_lesson_07_quick_against_the_server_gets_only_parseable_constrained_outputs(smollm2, script_env, tmp_path):
    """Lesson 07's API path (response_format json_schema strict; tools with tool_choice required) pointed at the
    server: every constrained extraction completes and parses, every tool call's arguments are valid."""
    env = {**script_env, "OPENAI_BASE_URL": smollm2.base_url, "OPENAI_API_KEY": KEY,
           "OPENAI_MODEL": serve.MODEL_IDS["smollm2"]}
    out = tmp_path / "l07"
    proc = subprocess.run([sys.executable, "07_structured_output.py", "--quick", "--backend", "openai", "--retriever",
                           "bm25", "--out-dir", str(out)], cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["backend"] == "openai"
    for name, r in res["tasks"].items():
        c = r["constrained"]
        assert c["incomplete_at_token_limit"] == 0 and c["parse_rate"] == c["schema_valid_rate"] == 1.0, (name, c)
    assert res["agent"]["args_schema_valid"], res["agent"]
