"""Tests for lesson 07 (constrained decoding by hand, function calling, agent loop).

The independent reference is llguidance (requirements-dev.txt), the JSON-schema engine used by
vLLM/SGLang/llama.cpp, run on the same tokenizer (built from the same tiktoken encoding). Both are
configured for the same JSON surface syntax: no whitespace, "," and ":" separators, properties in
schema order, escapes \\" \\\\ \\b \\f \\n \\r \\t only (llguidance also allows \\u00XX for control
characters by default; we switch that off with json_allowed_escapes), no DEL byte in strings.

One documented difference: when the grammar forces a run of bytes (e.g. `{"intent":"` at the start),
llguidance's compute_bitmask() allows only the canonical BPE token(s) of that forced text, while it
still accepts other splits of the same bytes when asked token by token (validate_tokens). Our mask
allows every token that keeps the document valid. So the reference set is: llguidance's bitmask plus
the tokens whose bytes are a prefix of (or start with) the forced bytes and that llguidance's
validate_tokens accepts. Everywhere else the two sets must be identical.
"""
from __future__ import annotations

import importlib
import json
import bisect
import random
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
L = importlib.import_module("07_structured_output")
CJK = re.compile(r"[\u4e00-\u9fff]")
QUICK = ("07_structured_output.py", "--quick")

SCHEMAS = {
    "support": json.loads((REPO / "data/structured/support.schema.json").read_text()),
    "review": json.loads((REPO / "data/structured/review.schema.json").read_text()),
    "nested_array": {"type": "object", "additionalProperties": False, "required": ["people", "note", "done"],
                     "properties": {
                         "people": {"type": "array", "maxItems": 3, "items": {
                             "type": "object", "additionalProperties": False, "required": ["name", "age"],
                             "properties": {"name": {"type": "string"}, "age": {"type": ["integer", "null"]}}}},
                         "note": {"type": ["string", "null"]}, "done": {"type": "boolean"}}},
    "numbers": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 2},
    "enum_mix": {"enum": ["a", "ab", 1, 12, True, None]},
    "top_integer": {"type": "integer"},
}
LL_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
              "json_allowed_escapes": '"\\bfnrt'}
WORDS = ["desk lamp", "café", "中文", "emoji 😀", 'say "hi"', "back\\slash", "tab\there", "line\nbreak", "", "x"]


def sample(schema: dict, rng: random.Random):
    """A random valid instance of a schema in the subset (independent of the lesson's compiler)."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    t = schema["type"]
    t = rng.choice(t) if isinstance(t, list) else t
    if t == "object":
        return {k: sample(s, rng) for k, s in schema["properties"].items()}
    if t == "array":
        n = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 3))
        return [sample(schema["items"], rng) for _ in range(n)]
    return {"string": lambda: rng.choice(WORDS), "integer": lambda: rng.choice([0, -7, 12345, rng.randint(-999, 999)]),
            "number": lambda: rng.choice([0, -0.5, 3.25, 1e21, 2.5e-07, 42]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[t]()


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@pytest.fixture(scope="module")
def tok():
    from common.tokenizer import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok):
    return L.Vocab(tok)


@pytest.fixture(scope="module")
def ll_tok(tok):
    import llguidance.tiktoken
    return llguidance.tiktoken.lltokenizer_from_encoding(tok.enc, n_vocab=tok.n_vocab, eos_token=tok.im_end)


class TokenIndex:
    """Ordinary tokens by their bytes: exact lookup, and all tokens starting with some bytes (bisect)."""

    def __init__(self, tok):
        self.by_bytes = {tok.token_bytes(i): i for i in range(17, tok.n_vocab)}
        self.sorted = sorted(self.by_bytes)

    def related(self, forced: bytes) -> list[int]:
        """Tokens whose bytes are a prefix of `forced` or start with it."""
        out = [self.by_bytes[forced[:k]] for k in range(1, len(forced)) if forced[:k] in self.by_bytes]
        i = bisect.bisect_left(self.sorted, forced)
        while i < len(self.sorted) and self.sorted[i].startswith(forced):
            out.append(self.by_bytes[self.sorted[i]])
            i += 1
        return out


@pytest.fixture(scope="module")
def token_index(tok):
    return TokenIndex(tok)


def reference_allowed(matcher, index: TokenIndex, n_vocab: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")[:n_vocab]
    ref = bits.astype(bool)
    forced = matcher.compute_ff_bytes()
    for t in index.related(forced) if forced else ():   # other splits of the forced bytes: ask token by token
        ref[t] = ref[t] or matcher.validate_tokens([t]) == 1
    return ref


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_mask_equals_llguidance_on_prefixes(name, tok, vocab, ll_tok, token_index):
    import llguidance

    schema = SCHEMAS[name]
    mask = L.JsonMask(L.Grammar(schema), vocab, tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=LL_OPTIONS)
    rng = random.Random(name)
    checked = 0
    for _ in range(6):
        doc = compact(sample(schema, rng))
        ids = tok.encode(doc)
        m = llguidance.LLMatcher(ll_tok, grammar)
        assert not m.is_error(), m.get_error()
        sid = mask.start
        for i in range(len(ids) + 1):
            ours = mask.allowed(sid).numpy()
            ref = reference_allowed(m, token_index, tok.n_vocab)
            diff = np.nonzero(ours != ref)[0][:8]
            assert not len(diff), (f"{doc!r} after {tok.decode(ids[:i])!r}: differ on "
                                   f"{[(tok.piece(int(t)), bool(ours[t])) for t in diff]}")
            checked += 1
            if i < len(ids):
                sid = mask.advance(sid, ids[i])
                assert sid >= 0 and m.consume_token(ids[i]), (doc, i)
        assert L.Grammar(schema).done(mask.states[sid]) and ours[tok.im_end]
    assert checked >= 12


def test_complete_document_allows_only_end_of_turn(tok, vocab):
    mask = L.JsonMask(L.Grammar(SCHEMAS["support"]), vocab, tok)
    sid = mask.start
    for t in tok.encode('{"intent":"refund","order_id":null,"urgent":false,"items":[]}'):
        sid = mask.advance(sid, t)
    assert torch.nonzero(mask.allowed(sid)).flatten().tolist() == [tok.im_end]


@pytest.mark.parametrize("name", ["support", "review", "nested_array", "numbers"])
def test_random_constrained_walks_validate_with_jsonschema(name, tok, vocab):
    """Random logits (biased towards closing tokens) through the mask: every finished output is
    valid JSON that jsonschema accepts."""
    import jsonschema

    schema = SCHEMAS[name]
    mask = L.JsonMask(L.Grammar(schema), vocab, tok)
    closing = torch.tensor([any(c in (tok.token_bytes(i) if i >= 17 else b"") for c in b'"]}')
                            for i in range(tok.n_vocab)], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    finished = 0
    for _ in range(10):
        proc, out = mask.processor(), []
        for _ in range(150):
            logits = proc(out, torch.randn(tok.n_vocab, generator=g) * 2 + 6 * closing)
            t = int(torch.argmax(logits))
            if t == tok.im_end:
                proc.on_step(types.SimpleNamespace(index=len(out), stop=True))   # what the generation loop reports
                break
            out.append(t)
        if proc.complete:
            finished += 1
            jsonschema.validate(json.loads(tok.decode(out)), schema)
    assert finished >= 5


@pytest.mark.parametrize("schema,keyword", [({"type": "string", "pattern": "(?=a)a+"}, "pattern"),
                                            ({"not": {"type": "string"}}, "not"),
                                            ({"type": "object", "properties": {"a": {"type": "string", "format": "hostname"}},
                                              "required": ["a"]}, "format")])
def test_unsupported_keyword_gives_chinese_error_naming_it(schema, keyword):
    from common.errors import UserError

    with pytest.raises(UserError) as e:
        L.Grammar(schema)
    assert keyword in str(e.value) and CJK.search(str(e.value))


def test_unsupported_keyword_from_the_command_line(tmp_path, run_script):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"type": "object", "properties": {"x": {"type": "number", "multipleOf": 2}}, "required": ["x"]}))
    r = run_script("07_structured_output.py", "--schema", str(f), "--prompt", "hi")   # in-process (tests/conftest.py)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and "multipleOf" in err[0] and "$.x" in err[0] and CJK.search(err[0]), r.stderr


def test_enum_next_to_type_is_filtered_by_the_type():
    """The issue's other defect: the enum was compiled and the sibling `type` ignored, so null got through."""
    from test_json_schema import accepts

    g = L.Grammar({"type": "string", "enum": ["1", "2-two", "3 three", None]})
    assert not accepts(g, "null") and accepts(g, '"1"') and accepts(g, '"3 three"')


class DigitsLM:
    """A stand-in model for generate_local: always prefers the token "1"; stops (end of turn) after `stop_after`."""

    def __init__(self, tok, stop_after=None):
        self.tokenizer, self.stop_after = tok, stop_after

    def generate(self, prompt_ids, max_new, temperature, top_p, seed, on_step, logits_processor):
        one, out = self.tokenizer.encode("1")[0], []
        for i in range(max_new):
            logits = torch.zeros(self.tokenizer.n_vocab)
            logits[one] = 1.0
            if self.stop_after is not None and i == self.stop_after:
                logits[self.tokenizer.im_end] = 2.0
            t = int(torch.argmax(logits_processor(out, logits)))
            on_step(types.SimpleNamespace(index=i, seconds=0.0, stop=t == self.tokenizer.im_end))
            if t == self.tokenizer.im_end:
                return
            out.append(t)
            yield t


def test_number_cut_off_by_the_token_budget_is_not_complete(tok, vocab):
    """The issue's defect: {"type": "number"} with a 64-token budget printed 64 digits as complete."""
    args = types.SimpleNamespace(temperature=0.0, top_p=1.0, seed=0)
    mask = L.JsonMask(L.Grammar({"type": "number"}), vocab, tok)
    proc = mask.processor()
    text, _ = L.generate_local(DigitsLM(tok), [], 64, args, proc)
    assert text == "1" * 64 and mask.done(proc.sid) and not proc.complete
    proc = mask.processor()
    text, _ = L.generate_local(DigitsLM(tok, stop_after=5), [], 64, args, proc)
    assert text == "1" * 5 and proc.complete


def test_calculator_is_safe_arithmetic():
    assert L.calculate("17 * 23") == 391 and L.calculate("(1250 - 348) / 2") == 451 and L.calculate("2^10") == 1024
    for bad in ("__import__('os').system('echo hi')", "open('x')", "2 ** 100000", "a + 1"):
        with pytest.raises((ValueError, SyntaxError)):
            L.calculate(bad)


class RecordingToolbox(L.Toolbox):
    def __init__(self):
        super().__init__("bm25")
        self.calls = []

    def run(self, name, args):
        self.calls.append((name, args))
        return "42"


def test_agent_loop_stops_at_the_step_limit():
    box = RecordingToolbox()
    trace = L.agent_loop("q", lambda msgs: ("think", "calculator", {"expression": "6 * 7"}), box, 3, printer=lambda *_: None)
    assert trace["stopped"] == "step_limit" and len(trace["steps"]) == 3 and len(box.calls) == 3
    assert trace["answer"] is None


def test_invalid_tool_arguments_never_reach_python():
    box = RecordingToolbox()
    trace = L.agent_loop("q", lambda msgs: ("think", "calculator", {"expr": 1}), box, 2, printer=lambda *_: None)
    assert box.calls == [] and not trace["args_valid"] and "schema" in trace["steps"][0]["observation"]


@pytest.mark.slow
def test_local_agent_tool_arguments_are_schema_valid(local_fp32, vocab):
    """The real model through the mask: every tool call that reaches Python validates against the tool's schema."""
    import types

    import jsonschema

    lm = local_fp32
    box = RecordingToolbox()
    args = types.SimpleNamespace(max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0)
    trace = L.agent_loop("What is 17 times 23?", L.LocalPolicy(lm, L.Vocab(lm.tokenizer), args), box, 2,
                         printer=lambda *_: None)
    params = {t["name"]: t["parameters"] for t in L.TOOLS}
    for step in trace["steps"]:
        jsonschema.validate(step["arguments"], params[step["tool"]])
    for name, a in box.calls:
        jsonschema.validate(a, params[name])
    assert trace["args_valid"] and trace["steps"]


@pytest.mark.slow
def test_quick_run_results(lesson_runs):
    run = lesson_runs.run(*QUICK, timeout=900)
    assert run.returncode == 0, run.explain()
    res = run.results("07_structured_output")
    for name, r in res["tasks"].items():
        c = r["constrained"]
        assert c["incomplete_at_token_limit"] == 0, name
        assert c["parse_rate"] == c["schema_valid_rate"] == 1.0, name
        for mode in ("prompt_only", "constrained"):
            assert 0 <= r[mode]["field_accuracy"] <= 1
    ov = res["mask_overhead"]
    assert ov["mask_ms_per_token"] > 0 and ov["overhead_ratio"] == pytest.approx(ov["mask_ms_per_token"] / ov["unconstrained_step_ms"])
    assert res["agent"]["args_schema_valid"] and res["agent"]["tasks"] == 2
    assert "自检通过" in run.stdout


def test_api_path_sends_native_response_format_and_tools(monkeypatch):
    """The real openai SDK against the local test server: the schema goes out as response_format
    (json_schema, strict) and the tools as `tools`; the server's plain-text reply is handled."""
    import types

    from common.client import LLMClient
    from tests.openai_test_server import run_server

    args = types.SimpleNamespace(max_new_tokens=32, temperature=0.0, seed=0)
    with run_server() as server:
        client = LLMClient(backend="openai", base_url=server.base_url, api_key="test", model="test-model", verbose=False)
        assert client.openai is not None
        text, complete = L.api_extract(L.chat_api(client), [{"role": "user", "content": "hi there"}],
                                       SCHEMAS["support"], args)
        thought, tool, tool_args = L.ApiPolicy(L.chat_api(client), args)([{"role": "user", "content": "What is 2+2?"}])
        first, second = [r["json"] for r in server.requests_to("/chat/completions")]
    rf = first["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["properties"] == SCHEMAS["support"]["properties"]
    assert text.startswith("Echo") and complete
    assert [t["function"]["name"] for t in second["tools"]] == [t["name"] for t in L.TOOLS]
    assert second["tools"][0]["function"]["parameters"] == L.TOOLS[0]["parameters"]
    assert tool == "final_answer" and tool_args["answer"].startswith("Echo")   # no tool_calls -> the text is the answer
    assert LLMClient(backend="local", verbose=False).openai is None
