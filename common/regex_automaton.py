"""正则表达式 → 字符自动机（JSON Schema 的 pattern 和 format 用它）。

第 7 课的语法逐字节工作；字符串里的 `pattern` 却是对"解码后的字符"说话的。这里把正则编译成
一个**按字符（Unicode 码点）前进**的自动机，语法那边负责把字节拼成字符（UTF-8、转义），再一个字符
一个字符地喂进来。三步：

  1. 解析：正则文本 → 语法树（只支持下面列出的子集，其余一律报错，绝不悄悄忽略）；
  2. Thompson 构造：语法树 → NFA（状态 + "读一个字符类" / "不读字符的分叉" 两种边）；
  3. 惰性子集构造：NFA 状态集合（frozenset）就是 DFA 状态，第一次用到时才算，编号缓存。

支持的子集（ECMAScript 语法，不带标志）：
  字面字符；`.`（除换行 \\n \\r \\u2028 \\u2029 以外的任意字符）；字符类 `[abc]` `[a-z]` `[^...]`；
  转义 `\\d \\D \\w \\W \\s \\S \\t \\n \\r \\f \\v \\0 \\xHH \\uHHHH` 和标点的转义（`\\.` `\\-` `\\/` ...）；
  分组 `(...)` `(?:...)` `(?<名字>...)`；选择 `|`；量词 `* + ? {n} {n,} {n,m}`（后面可带 `?`，
  非贪婪不改变"能不能匹配"，按同样处理）；`^` 只能出现在（顶层某个分支的）开头，`$` 只能在结尾。
不支持（报错）：反向引用 `\\1`、前瞻/后顾 `(?=` `(?!` `(?<=` `(?<!`、单词边界 `\\b \\B`、
Unicode 属性 `\\p{..}`、`\\c`、出现在中间的 `^ $`、重复次数超过 REPEAT_LIMIT。

JSON Schema 的 pattern 是"搜索"语义：`"a+"` 只要求字符串里**某处**有 a。没有 `^` 的分支前面
补一个"任意字符串"，没有 `$` 的分支后面补一个。
"""
from __future__ import annotations

import bisect

MAX_CP = 0x10FFFF
REPEAT_LIMIT = 1000
ANY = ((0, MAX_CP),)
DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
         (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
DOT = ((0, 0x09), (0x0B, 0x0C), (0x0E, 0x2027), (0x202A, MAX_CP))
SIMPLE_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}


class RegexError(ValueError):
    """The pattern uses syntax outside the supported subset (message in Chinese, names the construct)."""


# ---------------------------------------------------------------- 字符类 = 有序、不重叠的闭区间元组
def normalize(ranges) -> tuple:
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def complement(ranges) -> tuple:
    out, nxt = [], 0
    for lo, hi in normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return tuple(out)


def contains(ranges: tuple, cp: int) -> bool:
    i = bisect.bisect_right(ranges, (cp, MAX_CP + 1)) - 1
    return i >= 0 and ranges[i][0] <= cp <= ranges[i][1]


# ---------------------------------------------------------------- 1. 解析：文本 → 语法树
# 语法树节点：("set", 区间元组) ("cat", [..]) ("alt", [..]) ("rep", 子树, 最少, 最多或 None) ("bol",) ("eol",)
class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def error(self, what: str):
        raise RegexError(f"正则 {self.s!r} 第 {self.i} 个字符处：{what}")

    def peek(self, k: int = 0):
        return self.s[self.i + k] if self.i + k < len(self.s) else None

    def parse(self):
        tree = self.alt()
        if self.i < len(self.s):
            self.error(f"多余的 {self.s[self.i]!r}（括号不配对？）")
        return tree

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            items.append(self.repeat())
        return ("cat", items)

    def repeat(self):
        atom = self.atom()
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and (counted := self._counted()):
                lo, hi = counted
            else:
                return atom
            if atom[0] in ("bol", "eol"):
                self.error("不能给 ^ 或 $ 加量词")
            if self.peek() == "?":            # 非贪婪：匹配的集合不变
                self.i += 1
            atom = ("rep", atom, lo, hi)

    def _counted(self):
        """`{n}` `{n,}` `{n,m}`；不是这种形状的 `{` 按 ECMAScript 的宽松规则当普通字符（返回 None）。"""
        j = self.s.find("}", self.i)
        body = self.s[self.i + 1:j] if j > 0 else ""
        parts = body.split(",")
        if j < 0 or len(parts) > 2 or not parts[0].isdigit() or (len(parts) == 2 and parts[1] and not parts[1].isdigit()):
            return None
        lo = int(parts[0])
        hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
        if max(lo, hi or 0) > REPEAT_LIMIT or (hi is not None and hi < lo):
            self.error(f"重复次数 {{{body}}} 不支持（上限 {REPEAT_LIMIT}，且 n ≤ m）")
        self.i = j + 1
        return lo, hi

    def atom(self):
        c = self.peek()
        self.i += 1
        if c == "(":
            if self.peek() == "?":
                nxt = self.peek(1)
                if nxt == ":":
                    self.i += 2
                elif nxt == "<" and self.peek(2) not in ("=", "!"):
                    j = self.s.find(">", self.i)
                    self.i = j + 1 if j > 0 else self.error("命名分组没有 >")
                else:
                    self.error("不支持前瞻/后顾 (?= (?! (?<= (?<!")
            inner = self.alt()
            if self.peek() != ")":
                self.error("缺少 )")
            self.i += 1
            return inner
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", DOT)
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in ("*", "+", "?"):
            self.error(f"量词 {c} 前面没有东西")
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool) -> tuple:
        c = self.peek()
        if c is None:
            self.error("正则以反斜杠结尾")
        self.i += 1
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c in classes:
            return classes[c]
        if c.lower() in classes:
            return complement(classes[c.lower()])
        if c == "b" and in_class:
            return ((8, 8),)
        if c in SIMPLE_ESCAPES and not (c == "0" and (self.peek() or "").isdigit()):
            return ((SIMPLE_ESCAPES[c],) * 2,)
        if c in ("x", "u"):
            n = 2 if c == "x" else 4
            digits = self.s[self.i:self.i + n]
            if len(digits) == n and all(d in "0123456789abcdefABCDEF" for d in digits):
                self.i += n
                return ((int(digits, 16),) * 2,)
            self.error(f"\\{c} 后面要跟 {n} 个十六进制数字")
        if c.isalnum() or c == "_":
            self.error(f"不支持的转义 \\{c}（反向引用、\\b 单词边界、\\p 属性等不在支持的子集里）")
        return ((ord(c), ord(c)),)

    def char_class(self) -> tuple:
        negate = self.peek() == "^"
        self.i += negate
        ranges, first = [], True
        while True:
            c = self.peek()
            if c is None:
                self.error("字符类缺少 ]")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self._class_item()
            if self.peek() == "-" and self.peek(1) not in (None, "]"):
                self.i += 1
                hi = self._class_item()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1] or hi[0][0] < lo[0][0]:
                    self.error("字符类里的范围不对")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges += lo
        return complement(ranges) if negate else normalize(ranges)

    def _class_item(self) -> tuple:
        c = self.peek()
        self.i += 1
        if c == "\\":
            return self.escape(in_class=True)
        return ((ord(c), ord(c)),)


# ---------------------------------------------------------------- 2. Thompson 构造：语法树 → NFA
class _Nfa:
    """状态 i 的出边：chars[i] = (区间元组, 目标) 或 None；eps[i] = 不读字符就能到的状态列表。"""

    def __init__(self):
        self.chars: list = []
        self.eps: list[list[int]] = []

    def new(self) -> int:
        self.chars.append(None)
        self.eps.append([])
        return len(self.eps) - 1

    def build(self, tree, start: int) -> int:
        """从 start 出发接上 tree 的片段，返回片段的出口状态。"""
        kind = tree[0]
        if kind == "set":
            end = self.new()
            self.chars[start] = (tree[1], end)
            return end
        if kind == "cat":
            for item in tree[1]:
                start = self.build(item, start)
            return start
        if kind == "alt":
            end = self.new()
            for branch in tree[1]:
                s = self.new()
                self.eps[start].append(s)
                self.eps[self.build(branch, s)].append(end)
            return end
        if kind == "rep":
            _, sub, lo, hi = tree
            for _ in range(lo):
                s = self.new()
                self.eps[start].append(s)
                start = self.build(sub, s)
            if hi is None:                    # 星号：循环
                loop, end = self.new(), self.new()
                self.eps[start] += [loop]
                self.eps[loop].append(end)
                s = self.new()
                self.eps[loop].append(s)
                self.eps[self.build(sub, s)].append(loop)
                return end
            end = self.new()
            for _ in range(hi - lo):          # 最多再来 hi-lo 次，每次都可以提前结束
                self.eps[start].append(end)
                s = self.new()
                self.eps[start].append(s)
                start = self.build(sub, s)
            self.eps[start].append(end)
            return end
        raise RegexError("^ 只能出现在（顶层分支的）开头，$ 只能出现在结尾")


def _strip_anchors(branch):
    """顶层分支 → (去掉锚点后的树, 是否以 ^ 开头, 是否以 $ 结尾)。锚点在别处 → 报错（在 build 里）。"""
    items = list(branch[1]) if branch[0] == "cat" else [branch]
    bol = bool(items) and items[0] == ("bol",)
    items = items[1:] if bol else items
    eol = bool(items) and items[-1] == ("eol",)
    items = items[:-1] if eol else items
    return ("cat", items), bol, eol


# ---------------------------------------------------------------- 3. 惰性 DFA
class Regex:
    """一个正则的字符自动机。DFA 状态用整数编号：start、step(状态, 码点) -> 新状态或 -1、accepts(状态)。"""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise RegexError(f"正则应该是字符串，收到 {type(pattern).__name__}")
        self.pattern = pattern
        tree = _Parser(pattern).parse()
        self.nfa = nfa = _Nfa()
        begin, self.accept = nfa.new(), nfa.new()
        for branch in (tree[1] if tree[0] == "alt" else [tree]):
            body, bol, eol = _strip_anchors(branch)
            s = nfa.new()
            nfa.eps[begin].append(s)
            if not bol:
                s = nfa.build(("rep", ("set", ANY), 0, None), s)
            try:
                s = nfa.build(body, s)
            except RegexError as e:
                raise RegexError(f"正则 {pattern!r}：{e}") from None
            if not eol:
                s = nfa.build(("rep", ("set", ANY), 0, None), s)
            nfa.eps[s].append(self.accept)
        self.sets: list[frozenset] = []
        self.ids: dict[frozenset, int] = {}
        self.trans: dict[tuple[int, int], int] = {}
        self.start = self._id(self._closure({begin}))

    def _closure(self, states) -> frozenset:
        todo, seen = list(states), set(states)
        while todo:
            for t in self.nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def _id(self, s: frozenset) -> int:
        if not s:
            return -1
        if s not in self.ids:
            self.ids[s] = len(self.sets)
            self.sets.append(s)
        return self.ids[s]

    def step(self, state: int, cp: int) -> int:
        key = (state, cp)
        if key not in self.trans:
            nxt = {e[1] for q in self.sets[state] if (e := self.nfa.chars[q]) and contains(e[0], cp)}
            self.trans[key] = self._id(self._closure(nxt)) if nxt else -1
        return self.trans[key]

    def can_read(self, state: int, lo: int, hi: int) -> bool:
        """从 state 出发，能不能读进 [lo, hi] 里的某个字符（字符串里写到一半的多字节字符/转义用它判断还有没有出路）。"""
        for q in self.sets[state]:
            e = self.nfa.chars[q]
            if e and any(a <= hi and lo <= b for a, b in e[0]):
                return True
        return False

    def accepts(self, state: int) -> bool:
        return state >= 0 and self.accept in self.sets[state]

    def search(self, text: str) -> bool:
        """JSON Schema 语义下 text 是否匹配（测试用）。"""
        s = self.start
        for ch in text:
            s = self.step(s, ord(ch))
            if s < 0:
                return False
        return self.accepts(s)


# ---------------------------------------------------------------- 常见 format → 正则（都比 RFC 更严或一样严）
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_DATE = (r"(?:[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         r"|02-(?:0[1-9]|1[0-9]|2[0-8]))|" + _LEAP_YEAR + r"-02-29)")
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PCHAR = r"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
FORMATS = {
    "date": "^" + _DATE + "$",
    "time": "^" + _TIME + "$",
    "date-time": "^" + _DATE + "[Tt]" + _TIME + "$",
    "email": "^" + _ATOM + r"(?:\." + _ATOM + ")*@" + _LABEL + r"(?:\." + _LABEL + ")+$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "ipv4": "^" + _OCTET + r"(?:\." + _OCTET + "){3}$",
    "uri": (r"^[A-Za-z][A-Za-z0-9+.-]*://" + _LABEL + r"(?:\." + _LABEL + r")*(?::[0-9]{1,5})?"
            r"(?:/" + _PCHAR + "*)*" + r"(?:\?(?:" + _PCHAR + r"|[/?])*)?(?:#(?:" + _PCHAR + r"|[/?])*)?$"),
}
