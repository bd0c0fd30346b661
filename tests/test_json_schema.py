"""Tests for common/json_schema.py (JSON Schema -> byte grammar -> token mask).

Three independent references:
  * the official JSON-Schema-Test-Suite (tests/data/JSON-Schema-Test-Suite, draft 2020-12 and draft-07
    files for the supported keywords, plus optional/format for the supported formats): for every schema
    the compiler accepts, no invalid instance may be accepted by the grammar, and every valid instance
    written compactly is accepted, apart from the documented differences in VALID_BUT_REJECTED;
  * llguidance on the same tokenizer: allowed-token sets equal at every prefix (see test_07 for the
    configuration and the one documented difference about forced bytes);
  * jsonschema: random walks through the mask end in documents that validate.
"""
from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.json_schema import Grammar, MaskProcessor, TokenMask, Vocab, compile_schema, validate

SUITE = Path(__file__).resolve().parent / "data" / "JSON-Schema-Test-Suite" / "tests"
CJK = re.compile(r"[\u4e00-\u9fff]")
# Valid instances the grammar rejects on purpose (with infer_types=False), by (file, group, test):
VALID_BUT_REJECTED = {
    # key order: properties are written in the order the schema (after merging allOf) declares them
    ("allOf", "allOf", "allOf"), ("allOf", "allOf with base schema", "valid"),
    ("const", "const with object", "same object with different property order is valid"),
    # numbers: an integer is written without ".0"; a const/enum number only as the schema writes it
    # (1.0 for 1.0, 1 for 1 -- the same choice llguidance makes)
    ("type", "integer type matches integers", "a float with zero fractional part is an integer"),
    ("const", "const with 0 does not match other zero-like types", "float zero is valid"),
    ("const", "const with 1 does not match true", "float one is valid"),
    ("const", "const with -2.0 matches integer and float types", "integer -2 is valid"),
    ("enum", "enum with 0 does not match false", "float zero is valid"),
    ("enum", "enum with 1 does not match true", "float one is valid"),
    ("const", "float and integers are equal up to 64-bit representation limits", "float is valid"),
    ("enum", "enum with [0] does not match [false]", "[0.0] is valid"),
    ("enum", "enum with [1] does not match [true]", "[1.0] is valid"),
    # draft-07 ignores keywords next to $ref; we apply them too (stricter)
    ("ref", "ref overrides any sibling keywords", "ref valid, maxItems ignored"),
    # formats are regular-expression subsets of the RFCs: no leap seconds, no quoted/IP-literal e-mail
    # local parts or domains, only hierarchical URIs (scheme://host...)
    ("date-time", "validation of date-time strings", "a valid date-time with a leap second, UTC"),
    ("date-time", "validation of date-time strings", "a valid date-time with a leap second, with minus offset"),
    ("time", "validation of time strings", "a valid time string with leap second, Zulu"),
    ("time", "validation of time strings", "valid leap second, large negative time-offset"),
    ("time", "validation of time strings", "valid leap second, large positive time-offset"),
    ("time", "validation of time strings", "valid leap second, negative time-offset"),
    ("time", "validation of time strings", "valid leap second, positive time-offset"),
    ("time", "validation of time strings", "valid leap second, zero time-offset"),
    ("email", "validation of e-mail addresses", "a quoted string with a @ in the local part is valid"),
    ("email", "validation of e-mail addresses", "a quoted string with a double dot in the local part is valid"),
    ("email", "validation of e-mail addresses", "a quoted string with a space in the local part is valid"),
    ("email", "validation of e-mail addresses", "an IPv4-address-literal after the @ is valid"),
    ("email", "validation of e-mail addresses", "an IPv6-address-literal after the @ is valid"),
    ("uri", "validation of URIs", "a valid URL"), ("uri", "validation of URIs", "a valid URN"),
    ("uri", "validation of URIs", "a valid URL with many special characters"),
    ("uri", "validation of URIs", "a valid mailto URI"), ("uri", "validation of URIs", "a valid newsgroup URI"),
    ("uri", "validation of URIs", "a valid tel URI"),
}


def accepts(grammar: Grammar, text: str) -> bool:
    state = grammar.start
    for b in text.encode():
        state = grammar.step(state, b)
        if state is None:
            return False
    return grammar.done(state)


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def one_of_as_any_of(schema):
    if isinstance(schema, dict):
        return {("anyOf" if k == "oneOf" else k): one_of_as_any_of(v) for k, v in schema.items()}
    return [one_of_as_any_of(v) for v in schema] if isinstance(schema, list) else schema


def suite_cases():
    for f in sorted(SUITE.glob("**/*.json")):
        import jsonschema
        cls = jsonschema.Draft7Validator if "draft7" in f.parts else jsonschema.Draft202012Validator
        for group in json.loads(f.read_text(encoding="utf-8")):
            yield f, cls, group


@pytest.mark.parametrize("infer_types", [True, False])
def test_suite_never_accepts_an_invalid_instance(infer_types):
    """Zero invalid instances accepted. The one thing the grammar cannot express is oneOf's "exactly one":
    an instance that satisfies several branches is let through (and caught by validate() afterwards);
    such a case is recognised mechanically (it is valid once oneOf is read as anyOf) and counted."""
    groups = refused = loose = 0
    for f, cls, group in suite_cases():
        try:
            g = Grammar(group["schema"], infer_types=infer_types)
        except UserError as e:
            assert CJK.search(str(e)) and "\n" not in str(e)
            refused += 1
            continue
        groups += 1
        for t in group["tests"]:
            if not t["valid"] and accepts(g, compact(t["data"])):
                assert "oneOf" in json.dumps(group["schema"]), (f.name, group["description"], t["description"])
                assert cls(one_of_as_any_of(group["schema"])).is_valid(t["data"]), (f.name, group["description"])
                loose += 1
    assert groups >= 300 and refused <= 50 and loose <= 20, (groups, refused, loose)


def test_suite_accepts_every_valid_instance_written_compactly():
    rejected, checked = set(), 0
    for f, _, group in suite_cases():
        try:
            g = Grammar(group["schema"], infer_types=False)
        except UserError:
            continue
        for t in group["tests"]:
            if t["valid"]:
                checked += 1
                if not accepts(g, compact(t["data"])):
                    rejected.add((f.stem, group["description"], t["description"]))
    assert rejected == VALID_BUT_REJECTED and checked >= 700


def test_type_inference_only_narrows():
    """Without `type`, the keywords decide (properties -> object); the schema itself also accepts other types."""
    g = Grammar({"properties": {"a": {"type": "integer"}}})
    assert accepts(g, '{"a":1}') and not accepts(g, "12")
    assert accepts(Grammar({"properties": {"a": {"type": "integer"}}}, infer_types=False), "12")


# ---------------------------------------------------------------- the two defects of the issue
def test_enum_with_a_sibling_type_never_allows_what_the_type_forbids():
    g = compile_schema({"type": "string", "enum": ["1", "2-two", "3 three", None]})
    assert not accepts(g, "null")
    assert all(accepts(g, compact(v)) for v in ["1", "2-two", "3 three"])
    g = compile_schema({"type": "integer", "minimum": 2, "enum": [1, 2, 3, "x"]})
    assert [v for v in (1, 2, 3, "x") if accepts(g, compact(v))] == [2, 3]


def test_a_value_cut_off_by_the_token_budget_is_not_complete(tok, vocab):
    """{"type": "number"} with a small budget: 64 digits parse as a number, but generation did not stop."""
    mask = TokenMask(compile_schema({"type": "number"}), vocab, tok)
    proc = mask.processor()
    one = tok.encode("1")
    generated = []
    for _ in range(64):
        proc(generated, torch.zeros(tok.n_vocab))
        generated += one
    proc(generated, torch.zeros(tok.n_vocab))
    assert mask.done(proc.sid) and not proc.complete           # the grammar could end here, the model did not
    proc.on_step(type("Step", (), {"stop": True})())
    assert proc.complete


# ---------------------------------------------------------------- keywords: supported, ignored, refused
def test_annotations_are_ignored():
    g = compile_schema({"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://x/y", "id": "y",
                        "$comment": "c", "title": "t", "description": "d", "default": 3, "examples": [1],
                        "x-vendor": True, "type": "integer"})
    assert accepts(g, "3") and not accepts(g, '"3"')


@pytest.mark.parametrize("schema,keyword,where", [
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not", "$.a"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", "$"),
    ({"type": "string", "pattern": "(?=a)b"}, "pattern", "$"),
    ({"type": "string", "format": "hostname"}, "format", "$"),
    ({"$ref": "https://example.com/other.json"}, "$ref", "$"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf", "$"),
    ({"allOf": [{"type": "string", "format": "date"}, {"format": "email"}]}, "format", "$"),
])
def test_refusal_is_one_chinese_line_naming_keyword_and_location(schema, keyword, where):
    with pytest.raises(UserError) as e:
        compile_schema(schema)
    msg = str(e.value)
    assert f"'{keyword}'" in msg and f"位置 {where}" in msg and CJK.search(msg) and "\n" not in msg


@pytest.mark.parametrize("schema,good,bad", [
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["b"],
      "additionalProperties": False}, ['{"b":"x"}', '{"a":1,"b":""}'], ['{}', '{"a":1}', '{"b":"x","a":1}', '{"b":"x","c":1}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "boolean"}},
     ['{}', '{"a":1,"z":true}', '{"zz":false,"y":true}'], ['{"z":1}', '{"a":true}', '{"a":1,"a":2}']),
    ({"definitions": {"n": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/definitions/n"}},
                            "required": ["v"], "additionalProperties": False}}, "$ref": "#/definitions/n"},
     ['{"v":1}', '{"v":1,"next":{"v":2}}'], ['{"next":{"v":1}}', '{"v":1,"next":{}}']),
    ({"anyOf": [{"type": "object", "properties": {"k": {"const": "a"}, "n": {"type": "integer"}}, "required": ["k", "n"],
                 "additionalProperties": False},
                {"type": "object", "properties": {"k": {"const": "b"}, "s": {"type": "string"}}, "required": ["k", "s"],
                 "additionalProperties": False}]},
     ['{"k":"a","n":1}', '{"k":"b","s":""}'], ['{"k":"a","s":""}', '{"k":"c","n":1}']),
    ({"type": ["string", "null"], "maxLength": 3}, ['"abc"', "null", '"中文字"'], ['"abcd"', "1"]),
    ({"type": "integer", "exclusiveMinimum": 0, "maximum": 100}, ["1", "100", "42"], ["0", "101", "-1", "1.5"]),
    ({"type": "number", "minimum": -1.5, "exclusiveMaximum": 2}, ["-1.5", "1.99", "0", "-0.25"], ["-1.51", "2", "2.0", "1e1"]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, ["[1]", "[1,2]"], ["[]", "[1,2,3]"]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"a": {"minimum": 3}}}]}, ['{"a":3}'], ['{"a":2}', "{}"]),
    ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567e89b12d3a456426614174000"']),
    ({"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, ['"AB-123"'], ['"AB-12"', '"ab-123"', '"XAB-123"']),
    ({"type": "object", "patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False},
     ['{}', '{"x-a":1,"x-b":2}'], ['{"y":1}', '{"x-a":"s"}']),
])
def test_supported_keywords_byte_level(schema, good, bad):
    import jsonschema

    g = compile_schema(schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    for text in good:
        assert accepts(g, text) and cls(schema).is_valid(json.loads(text)), text
    for text in bad:
        assert not accepts(g, text), text


def test_recursion_is_bounded_by_the_stack_depth():
    tree = {"$defs": {"t": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/t"}}},
                            "additionalProperties": False}}, "$ref": "#/$defs/t"}
    nest = lambda d: "{}" if d == 0 else '{"c":[' + nest(d - 1) + "]}"   # noqa: E731
    g = compile_schema(tree)
    assert accepts(g, nest(5)) and not accepts(g, nest(60))
    assert accepts(Grammar(tree, max_stack=400), nest(60))


def test_one_of_is_noted_for_validation_after_generation():
    schema = {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}
    g = compile_schema(schema)
    assert accepts(g, "3") and any("oneOf" in n for n in g.notes)
    assert validate(schema, 3) and not validate(schema, -3)      # 3 matches both branches: reported afterwards


def test_validate_checks_formats():
    assert validate({"type": "string", "format": "date"}, "2023-02-30")
    assert validate({"type": "string", "format": "date"}, "2024-02-29") == []


# ---------------------------------------------------------------- token level
@pytest.fixture(scope="module")
def tok():
    from common.tokenizer import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok):
    return Vocab(tok)


NEW_FEATURES = {
    "optional": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
                  "required": ["b"], "additionalProperties": False}, ['{"b":"x"}', '{"a":12,"b":"hi","c":true}', '{"b":"","c":false}']),
    "any_of": ({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}, ['"ab"', "-12", "null"]),
    "ref": ({"$defs": {"p": {"type": "object", "properties": {"name": {"type": "string"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/p"}, "maxItems": 2}}, "required": ["name", "kids"],
        "additionalProperties": False}}, "$ref": "#/$defs/p"}, ['{"name":"a","kids":[]}', '{"name":"a","kids":[{"name":"b","kids":[]}]}']),
    "string_length": ({"type": "string", "minLength": 2, "maxLength": 5}, ['"ab"', '"abcde"', '"中文"']),
    "pattern": ({"type": "string", "pattern": "^[a-z]{2,4}-[0-9]+$"}, ['"ab-12"', '"xyz-0"']),
    "integer_range": ({"type": "integer", "minimum": -20, "maximum": 300}, ["-20", "0", "299", "7"]),
    "date": ({"type": "string", "format": "date"}, ['"2024-02-29"', '"1999-12-31"']),
}


@pytest.mark.parametrize("name", list(NEW_FEATURES))
def test_mask_equals_llguidance_on_new_features(name, tok, vocab):
    import llguidance
    import llguidance.tiktoken

    t07 = importlib.import_module("tests.test_07_structured_output")
    ll_tok = llguidance.tiktoken.lltokenizer_from_encoding(tok.enc, n_vocab=tok.n_vocab, eos_token=tok.im_end)
    index = t07.TokenIndex(tok)
    schema, docs = NEW_FEATURES[name]
    mask = TokenMask(compile_schema(schema), vocab, tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=t07.LL_OPTIONS)
    for doc in docs:
        ids = tok.encode(doc)
        m = llguidance.LLMatcher(ll_tok, grammar)
        assert not m.is_error(), m.get_error()
        sid = mask.start
        for i in range(len(ids) + 1):
            ours, ref = mask.allowed(sid).numpy(), t07.reference_allowed(m, index, tok.n_vocab)
            diff = np.nonzero(ours != ref)[0][:8]
            assert not len(diff), (doc, tok.decode(ids[:i]), [(tok.piece(int(t)), bool(ours[t])) for t in diff])
            if i < len(ids):
                sid = mask.advance(sid, ids[i])
                assert sid >= 0 and m.consume_token(ids[i]), (doc, i)
        assert mask.done(sid)


WALKS = {
    "optional_extra": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                        "tag": {"type": "string", "maxLength": 4}},
                       "required": ["id"], "additionalProperties": {"type": "boolean"}},
    "union_ref": {"$defs": {"leaf": {"type": ["string", "null"], "pattern": "^[a-c]*$"}},
                  "type": "array", "maxItems": 3, "items": {"anyOf": [{"$ref": "#/$defs/leaf"}, {"type": "number", "minimum": 0.5}]}},
    "formats": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}, "ip": {"type": "string", "format": "ipv4"}},
                "required": ["d", "ip"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", list(WALKS))
def test_random_constrained_walks_validate(name, tok, vocab):
    """Random logits (biased towards closing tokens) through the mask: every finished output validates."""
    schema = WALKS[name]
    mask = TokenMask(compile_schema(schema), vocab, tok)
    closing = torch.tensor([any(c in (tok.token_bytes(i) if i >= 17 else b"") for c in b'"]}')
                            for i in range(tok.n_vocab)], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    finished = 0
    for _ in range(8):
        proc, out = MaskProcessor(mask), []
        for _ in range(120):
            t = int(torch.argmax(proc(out, torch.randn(tok.n_vocab, generator=g) * 2 + 6 * closing)))
            if t == tok.im_end:
                proc.on_step(type("Step", (), {"stop": True})())
                break
            out.append(t)
        if proc.complete:
            finished += 1
            assert validate(schema, json.loads(tok.decode(out))) == [], tok.decode(out)
    assert finished >= 4


def test_state_is_shared_by_rows_and_masks_are_cached(tok, vocab):
    """Server-style use: one TokenMask, one integer state per batch row, the same state gives the same tensor."""
    mask = TokenMask(compile_schema(copy.deepcopy(NEW_FEATURES["optional"][0])), vocab, tok)
    rows = [mask.start, mask.start]
    rows[0] = mask.advance(rows[0], tok.encode('{"')[0])
    assert mask.allowed(rows[1]) is mask.allowed(mask.start) and rows[0] != rows[1]
