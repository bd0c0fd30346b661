"""Tests for common/regex_automaton.py: the regex -> character automaton behind `pattern` and `format`.

Reference: Python's `re.search` on random strings over a small alphabet (with re.ASCII, and `$` written as
`\\Z`, the two engines agree on this subset for these characters: no \\r, no non-ASCII spaces).
"""
from __future__ import annotations

import random
import re

import pytest

from common.regex_automaton import FORMATS, Regex, RegexError

PATTERNS = ["a+", "^a+$", "^(ab|c)*$", "^[a-c]{2,3}$", "b{2}", "^\\d+(\\.\\d+)?$", "^[^ab]*$", "x|^a", "^\\w+-\\s?\\W$",
            "^(?:a|b)+?c$", "^.{0,3}$", "^[\\d_-]+$", "^a*b*$", "(?<name>ab)c", "^\\x41\\u0062$", "^[.]$", "^a{2,}$", "", "^$"]
ALPHABET = "abcAB12_- .\n中"


def python_search(pattern: str, text: str) -> bool:
    py = pattern[:-1] + "\\Z" if pattern.endswith("$") else pattern
    py = re.sub(r"\(\?<(\w+)>", r"(?P<\1>", py)
    return re.search(py, text, re.ASCII) is not None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_python_re_on_random_strings(pattern):
    rng = random.Random(pattern)
    r = Regex(pattern)
    texts = ["", "a", "ab", "abc", "aa", "c", "1.5", "12", "x-", "a_- ", "AB", "Ab"]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))) for _ in range(400)]
    for t in texts:
        assert r.search(t) == python_search(pattern, t), (pattern, t)


@pytest.mark.parametrize("pattern,construct", [("(?=a)", "前瞻"), ("(?!a)", "前瞻"), ("(a)\\1", "\\1"), ("\\bword", "\\b"),
                                               ("\\p{L}", "\\p"), ("a^b", "^"), ("a$b", "$"), ("(ab", ")"), ("[ab", "]"),
                                               ("*a", "量词"), ("a{5,2}", "重复"), ("a{1001}", "重复")])
def test_outside_the_subset_is_a_clear_error(pattern, construct):
    with pytest.raises(RegexError) as e:
        Regex(pattern)
    assert construct in str(e.value) and repr(pattern) in str(e.value)


@pytest.mark.parametrize("fmt,good,bad", [
    ("date", ["2024-02-29", "2000-02-29", "1999-12-31"], ["2023-02-29", "1900-02-29", "2024-04-31", "2024-13-01", "24-01-01"]),
    ("time", ["23:59:59Z", "08:30:06.283185+01:30"], ["24:00:00Z", "12:00:00", "12:60:00Z"]),
    ("date-time", ["1963-06-19T08:30:06.283185Z", "1963-06-19t08:30:06z"], ["1963-06-19T08:30:06", "1963-06-19 08:30:06Z"]),
    ("email", ["joe.bloggs@example.com", "a+b@x.io"], ["2962", ".a@x.io", "a..b@x.io", "a@x", "a@-x.io"]),
    ("uuid", ["2EB8AA08-AA98-11EA-B4AA-73B441D16380"], ["2eb8aa08-aa98-11ea-b4aa-73b441d1638", "2eb8aa08aa9811eab4aa73b441d16380"]),
    ("ipv4", ["192.168.0.1", "0.0.0.0"], ["256.1.1.1", "1.1.1", "01.1.1.1", "1.1.1.1.1"]),
    ("uri", ["http://foo.bar/?baz=qux#quux", "https://example.com:8080/a%20b"], ["//foo.bar", "http://a b", "http://x/%zz", "x"]),
])
def test_format_regexes(fmt, good, bad):
    r = Regex(FORMATS[fmt])
    assert all(r.search(g) for g in good) and not any(r.search(b) for b in bad)


def test_states_are_small_integers_and_cached():
    r = Regex("^[a-z]+@[a-z]+$")
    s = r.step(r.start, ord("a"))
    assert s == r.step(r.start, ord("b")) and r.step(s, ord("@")) >= 0 and r.step(r.start, ord("@")) == -1
    assert r.can_read(r.start, ord("a"), ord("z")) and not r.can_read(r.start, 0x4E00, 0x9FFF)
