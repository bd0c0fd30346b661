"""JSON Schema → 逐字节语法 → token 掩码（第 7 课的约束解码，服务端也可以直接用）。

用法（一个 schema 编译一次；每一行生成各自拿一个整数状态往前走）：

    grammar = compile_schema(schema)            # 不支持的关键字：抛出 UserError，一行中文，指出关键字和位置
    vocab = Vocab(tokenizer)                    # 词表字节前缀树，整个进程建一次
    mask = TokenMask(grammar, vocab, tokenizer)
    sid = mask.start
    allowed = mask.allowed(sid)                 # bool[vocab]：哪些 token 能让文档继续合法
    sid = mask.advance(sid, token)              # -1 = 这个 token 让文档非法
    mask.done(sid)                              # 文档已经完整（语法到了可接受状态）
    errors = validate(schema, json.loads(text)) # 生成之后再用 jsonschema 核实（见下面"生成后校验"）

状态是整数、缓存只增不改，所以一个引擎线程里多行各自持有一个 sid 就行（不需要锁）。

本文件分六部分，第 7 课的讲义（docs/07_structured_output.md）逐一讲解：
  1. 读 schema：注释类关键字忽略，$ref 展开，allOf 合并，不支持的关键字报错；
  2. 编译成"节点"：每个节点描述一个位置上允许的值（联合、字符串、数字、候选字面量、数组、对象）；
  3. 逐字节状态机：状态 = 一组"栈"（frozenset），即栈上的 NFA——anyOf、可选属性这类"看第一个字节
     分不出走哪条路"的地方，几条路同时走，哪条死了就丢掉；
  4. 词表前缀树 + 掩码（三个提速技巧：前缀树剪枝、字符串内部快速通道、按状态缓存）；
  5. MaskProcessor：接到生成循环上；"完整" = 语法到了可接受状态 *且* 生成自己停了下来；
  6. 生成后校验（jsonschema + format 检查）。

输出的 JSON 形状（"表面语法"）是固定的：紧凑（没有空白），属性按 schema 里 properties 的顺序出现
（可选属性可以跳过），然后是 required 里有但 properties 里没写的属性，最后是额外属性
（additionalProperties / patternProperties 允许时）；字符串转义只用 \\" \\\\ \\b \\f \\n \\r \\t。
"""
from __future__ import annotations

import itertools
import json
import math
import re
import time
from fractions import Fraction

import torch

from common.errors import UserError
from common.regex_automaton import FORMATS, Regex, RegexError

# ============================================================== 1. 读 schema
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
SUPPORTED = {"type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
             "items", "prefixItems", "additionalItems", "minItems", "maxItems", "minLength", "maxLength", "pattern",
             "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf", "oneOf", "allOf", "$ref"}
# 会约束取值、但本模块没有实现的关键字：一律报错（绝不悄悄忽略）。不在这两张表里的键（title、description、
# $id、$schema、$comment、default、examples、definitions/$defs 以及各家自定义的 x-... 等）是注释，验证器也不看，忽略。
UNSUPPORTED = {"not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "propertyNames",
               "minProperties", "maxProperties", "uniqueItems", "contains", "minContains", "maxContains", "multipleOf",
               "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef", "contentSchema"}
# JSON Schema 规范里定义、但这里没有实现的 format：报错。规范以外的 format（如 OpenAPI 的 int32）验证器不检查，忽略。
SPEC_FORMATS = {"date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4",
                "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
                "relative-json-pointer", "regex"}
OBJECT_KW = {"properties", "required", "additionalProperties", "patternProperties"}
ARRAY_KW = {"items", "prefixItems", "additionalItems", "minItems", "maxItems"}
STRING_KW = {"minLength", "maxLength", "pattern", "format"}
NUMBER_KW = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
MAX_STACK = 48          # 栈最多这么多帧（约 15 层嵌套）：$ref 递归时状态才有限，更深的展开直接剪掉
MAX_COMPILE_DEPTH = 120  # 编译时 schema 嵌套（含 $ref 展开）的层数上限
MAX_PATTERN_PROPS = 4   # patternProperties 最多几条（一个键同时匹配几条时要合并它们的 schema）


def refuse(keyword: str, path: str, why: str = "") -> UserError:
    return UserError(f"不支持的 JSON Schema 关键字 {keyword!r}（位置 {path}）{'：' + why if why else ''}。")


def check_keywords(s: dict, path: str) -> None:
    for key, value in s.items():
        if key in UNSUPPORTED and not (key == "uniqueItems" and value is False) \
                and not (key == "minProperties" and value == 0):
            raise refuse(key, path, "本模块不实现它（约束取值的关键字不会被悄悄忽略）")
    if s.get("format") in SPEC_FORMATS and s["format"] not in FORMATS:
        raise refuse("format", path, f"format {s['format']!r} 没有实现（支持 {', '.join(sorted(FORMATS))}）")


def merge(a: dict, b: dict, path: str) -> dict:
    """两个 schema 的"与"（allOf / anyOf 分支和外层 / $ref 和它旁边的关键字）合成一个。能合并的规则：
    type 取交集、required 取并集、properties 逐个属性再"与"、下界取大、上界取小、enum 取交集、
    pattern 变成"都要匹配"的列表、items/additionalProperties 再"与"、两个 anyOf 分配成分支。
    别的关键字两边不同就报错。"""
    out = dict(a)
    for k, v in b.items():
        if k not in out or out[k] == v:
            out[k] = v
        elif k == "type":
            ta = [out[k]] if isinstance(out[k], str) else list(out[k])
            tb = [v] if isinstance(v, str) else list(v)
            both = [t for t in ta if t in tb or (t == "integer" and "number" in tb)]
            both += ["integer" for t in tb if t == "integer" and "number" in ta and "integer" not in both]
            out[k] = both
        elif k == "required":
            out[k] = list(dict.fromkeys(list(out[k]) + list(v)))
        elif k == "properties":
            props = dict(out[k])
            for name, sub in v.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[k] = props
        elif k in ("minimum", "minLength", "minItems", "exclusiveMinimum") and not isinstance(v, bool):
            out[k] = max(out[k], v)
        elif k in ("maximum", "maxLength", "maxItems", "exclusiveMaximum") and not isinstance(v, bool):
            out[k] = min(out[k], v)
        elif k == "enum":
            out[k] = [x for x in out[k] if x in v]
        elif k == "const":
            out["enum"] = []                              # 两个不同的 const：没有值能同时等于两者
        elif k == "pattern":
            out[k] = (out[k] if isinstance(out[k], list) else [out[k]]) + [v]
        elif k in ("items", "additionalItems", "additionalProperties"):
            out[k] = {"allOf": [out[k], v]}
        elif k in ("anyOf", "oneOf"):                     # 两个 anyOf 相遇：把第二个放进第一个的每个分支
            out[k] = [{"allOf": [branch, {k: v}]} for branch in out[k]]
        elif k in SUPPORTED or k in UNSUPPORTED:
            raise refuse(k, path, f"allOf / $ref 里两处的 {k} 不同，无法合并")
    for x, y in ((a, b), (b, a)):                         # x 限制了额外属性，y 却声明了 x 没声明的属性：含义无法合并
        if (x.get("additionalProperties", True) is not True or x.get("patternProperties")) and \
                set(y.get("properties", {})) - set(x.get("properties", {})):
            raise refuse("additionalProperties", path, "allOf 两边的属性表不同，额外属性的含义无法合并")
        tuple_y = y.get("prefixItems", y.get("items") if isinstance(y.get("items"), list) else None)
        tuple_x = x.get("prefixItems", x.get("items") if isinstance(x.get("items"), list) else None)
        if tuple_y is not None and tuple_x != tuple_y and ("items" in x or "additionalItems" in x):
            raise refuse("items", path, "allOf 两边的元组（prefixItems）不同，items 管哪些元素无法合并")
    return out


# ============================================================== 2. 编译成节点
class Grammar:
    """schema → 节点表 + 起始状态。节点是小字典，kind 之一：
      union   alts=[节点号...]                       几个分支任选其一（anyOf/oneOf、type 列表、$ref）
      string  plain=True 或 lo/hi/regexes            字符串（长度按字符数；regexes 全部要匹配）
      number  integer, bounds                        数字（bounds 为空：普通 JSON 数字；否则逐字节检查范围）
      choice  options={字节串}                        几个固定的 JSON 文本（enum、const、true/false、null）
      array   prefix=[节点号], rest=节点号或 None, lo, hi
      object  props=[(键的 JSON 字节, 节点号, 必需?)], patterns=[(正则, schema)], extra=节点号或 None"""

    def __init__(self, schema, max_stack: int = MAX_STACK, infer_types: bool = True):
        import jsonschema

        self.root, self.max_stack, self.infer_types = schema, max_stack, infer_types
        self.nodes: list[dict] = []
        self.refs: dict[str, int] = {}
        self.memo: dict[int, tuple] = {}
        self.split_cache: dict[tuple, tuple] = {}   # Vocab.string_split 对带约束字符串帧的结果（帧里的节点号只在本语法有效）
        self.notes: list[str] = []             # 语法保证不了、要靠生成后校验的地方（oneOf 的"恰好一个"）
        cls = jsonschema.validators.validator_for(schema if isinstance(schema, dict) else {},
                                                  default=jsonschema.Draft202012Validator)
        self.validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
        self._any = None
        self.start = frozenset({(("V", self.node(schema, "$")),)})

    def add(self, node: dict) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def union(self, alts: list[int]) -> int:
        return alts[0] if len(alts) == 1 else self.add({"kind": "union", "alts": alts})

    def node(self, s, path: str) -> int:
        """一个（子）schema → 节点号。"""
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_COMPILE_DEPTH:
                raise refuse("$ref", path, f"展开后嵌套超过 {MAX_COMPILE_DEPTH} 层（$ref 和别的关键字一起反复引用自己？）")
            if not isinstance(s, dict) or s == {}:
                return self._node(s, path)
            if id(s) not in self.memo:                 # 同一个 schema 对象只编译一次；先占位，递归引用会指回这里
                nid = self.add({"kind": "union", "alts": []})
                self.memo[id(s)] = (nid, s)            # 留住 s，它的 id 才不会被别的对象重用
                self.nodes[nid]["alts"] = [self._node(s, path)]
            return self.memo[id(s)][0]
        finally:
            self._depth -= 1

    def _node(self, s, path: str) -> int:
        if s is True or s == {}:
            return self.any_node()
        if s is False:
            return self.add({"kind": "union", "alts": []})            # 没有任何值合法
        if not isinstance(s, dict):
            raise UserError(f"schema 的 {path} 应该是一个对象（{{...}}）或 true/false，收到 {type(s).__name__}。")
        check_keywords(s, path)
        if "$ref" in s and not (set(s) & (SUPPORTED - {"$ref"})):
            return self.ref_node(s["$ref"], path)                     # 只有 $ref：共用一个节点（递归就靠它）
        s = self.flatten(s, path)
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self.union_node(s, key, path)
        types = self.types(s, path)
        if "enum" in s or "const" in s:
            return self.choice_node(s, types, path)
        return self.union([self.type_node(t, s, path) for t in types])

    # ---------- $ref：JSON 指针，只在同一个文档里
    def ref_node(self, ref, path: str) -> int:
        if ref not in self.refs:
            nid = self.refs[ref] = self.add({"kind": "union", "alts": []})   # 先占位：递归引用会指回这里
            self.nodes[nid]["alts"] = [self.node(self.resolve(ref, path), ref)]
        return self.refs[ref]

    def resolve(self, ref, path: str):
        if not isinstance(ref, str) or not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
            raise refuse("$ref", path, f"只支持同一文档里的 JSON 指针（#/definitions/x、#/$defs/x、#），收到 {ref!r}")
        target = self.root
        for part in ref[2:].split("/") if len(ref) > 1 else ():
            part = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), part)
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise refuse("$ref", path, f"{ref!r} 指向的位置不存在")
        return target

    def flatten(self, s: dict, path: str, depth: int = 0) -> dict:
        """把 $ref（带别的关键字时）和 allOf 展开合并成一个字典。"""
        if depth > 16:
            raise refuse("allOf", path, "allOf / $ref 嵌套太深（可能是自己引用自己）")
        out = {k: v for k, v in s.items() if k not in ("$ref", "allOf")}
        parts = ([self.resolve(s["$ref"], path)] if "$ref" in s else []) + list(s.get("allOf", []))
        for i, part in enumerate(parts):
            if part is True:
                continue
            if part is False:
                return {"type": []}
            if not isinstance(part, dict):
                raise UserError(f"schema 的 {path}.allOf[{i}] 应该是一个对象，收到 {type(part).__name__}。")
            check_keywords(part, f"{path}.allOf[{i}]")
            out = merge(out, self.flatten(part, f"{path}.allOf[{i}]", depth + 1), path)
        return out

    def union_node(self, s: dict, key: str, path: str) -> int:
        rest = {k: v for k, v in s.items() if k != key}
        branches = s[key]
        if not isinstance(branches, list) or not branches:
            raise UserError(f"schema 的 {path}.{key} 应该是非空列表。")
        nid = self.add({"kind": "union", "alts": []})
        plain = not (set(rest) & SUPPORTED)            # 外层没有别的约束：分支原样编译（$ref 分支共用节点）
        self.nodes[nid]["alts"] = [self.node(b if plain else merge(rest, b, path) if isinstance(b, dict) else
                                             (rest if b else False), f"{path}.{key}[{i}]")
                                   for i, b in enumerate(branches)]
        if key == "oneOf":
            self.notes.append(f"{path}.oneOf：语法按 anyOf 生成，\"恰好一个分支成立\"由生成后的 jsonschema 校验核实")
        return nid

    def types(self, s: dict, path: str) -> list[str]:
        """允许的类型。没写 type 时按出现的关键字推断（只有 properties → object……），什么都没有 = 任意类型。
        推断比 schema 本身严（schema 其实也接受别的类型），但生成时模型不会把"该是对象的地方"写成字符串；
        infer_types=False 时不推断（测试用它核对"合法的都接受"）。"""
        t = s.get("type")
        if t is None and self.infer_types:
            fam = [name for name, kws in (("object", OBJECT_KW), ("array", ARRAY_KW), ("string", STRING_KW),
                                          ("number", NUMBER_KW)) if set(s) & kws]
            t = fam or list(TYPES)
        t = list(TYPES) if t is None else t
        t = [t] if isinstance(t, str) else list(t)
        if any(x not in TYPES for x in t):
            raise UserError(f"{path} 的 type 必须是 {' / '.join(TYPES)} 之一（或它们的列表），收到 {t!r}。")
        return [x for x in dict.fromkeys(t) if not (x == "integer" and "number" in t)]

    def choice_node(self, s: dict, types, path: str) -> int:
        """enum / const：候选值先用 jsonschema 对**整个** schema 过一遍（type、minLength……都算），
        只留下真正合法的——{"type": "string", "enum": [..., null]} 里的 null 就这样被去掉。"""
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list):
            raise UserError(f"schema 的 {path}.enum 应该是列表。")
        here = self.validator.evolve(schema={k: v for k, v in s.items() if k not in ("enum", "const")})
        keep = [v for v in values if here.is_valid(v) and ("enum" not in s or v in s["enum"])
                and ("const" not in s or v == s["const"])]
        opts = {json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode() for v in keep}
        return self.add({"kind": "choice", "options": opts})

    def any_node(self) -> int:
        """任意 JSON 值（{}、true、没写 type 也没写别的）。自己引用自己，深度靠 MAX_STACK 截断。"""
        if self._any is None:
            self._any = nid = self.add({"kind": "union", "alts": []})
            self.nodes[nid]["alts"] = [self.type_node(t, {}, "$any") for t in TYPES if t != "integer"]
        return self._any

    # ---------- 每种类型一个节点
    def type_node(self, t: str, s: dict, path: str) -> int:
        if t == "null":
            return self.add({"kind": "choice", "options": {b"null"}})
        if t == "boolean":
            return self.add({"kind": "choice", "options": {b"true", b"false"}})
        if t == "string":
            return self.string_node(s, path)
        if t in ("integer", "number"):
            return self.number_node(t == "integer", s, path)
        if t == "array":
            return self.array_node(s, path)
        return self.object_node(s, path)

    def string_node(self, s: dict, path: str) -> int:
        pats = s.get("pattern", [])
        pats = [pats] if isinstance(pats, str) else list(pats)
        fmt = s.get("format")
        try:
            regexes = tuple(Regex(p) for p in pats) + ((Regex(FORMATS[fmt]),) if fmt in FORMATS else ())
        except RegexError as e:
            raise refuse("pattern", path, str(e)) from None
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if not regexes and lo == 0 and hi is None:
            return self.add({"kind": "string", "plain": True})
        return self.add({"kind": "string", "plain": False, "lo": lo, "hi": hi, "regexes": regexes,
                         "cap": max(lo, hi or 0)})

    def number_node(self, integer: bool, s: dict, path: str) -> int:
        """bounds = [(比较, 界)]，和 jsonschema 用同一种 Python 比较；draft-04 的布尔 exclusiveMaximum 也认。"""
        bounds = []
        for key, op, strict_key in (("minimum", ">=", "exclusiveMinimum"), ("maximum", "<=", "exclusiveMaximum")):
            if key in s:
                bounds.append((op[0] if s.get(strict_key) is True else op, s[key]))
            if strict_key in s and not isinstance(s[strict_key], bool):
                bounds.append((op[0], s[strict_key]))
        for _, v in bounds:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"schema 的 {path} 里的数值范围应该是有限的数字，收到 {v!r}。")
        return self.add({"kind": "number", "integer": integer, "bounds": tuple(bounds)})

    def array_node(self, s: dict, path: str) -> int:
        items = s.get("items", True)
        if isinstance(items, list):                                   # draft-07 的元组写法
            prefix, rest = items, s.get("additionalItems", True)
        else:
            prefix, rest = s.get("prefixItems", []), items
        nid = self.add({"kind": "array", "prefix": [], "rest": None, "lo": s.get("minItems", 0), "hi": s.get("maxItems")})
        node = self.nodes[nid]
        node["prefix"] = [self.node(p, f"{path}[{i}]") for i, p in enumerate(prefix)]
        node["rest"] = None if rest is False else self.node(rest, f"{path}[]")
        hi = node["hi"]
        node["cap"] = hi if hi is not None else max(len(prefix), node["lo"], 1)
        return nid

    def object_node(self, s: dict, path: str) -> int:
        props, req = s.get("properties", {}), list(s.get("required", []))
        if not isinstance(props, dict) or not isinstance(req, list):
            raise UserError(f"schema 的 {path}：properties 应该是对象，required 应该是列表。")
        pats = s.get("patternProperties", {})
        if len(pats) > MAX_PATTERN_PROPS:
            raise refuse("patternProperties", path, f"最多支持 {MAX_PATTERN_PROPS} 条")
        try:
            patterns = [(Regex(p), sub) for p, sub in pats.items()]
        except RegexError as e:
            raise refuse("patternProperties", path, str(e)) from None
        extra_schema = s.get("additionalProperties", True)
        nid = self.add({"kind": "object", "props": [], "names": set(props) | set(req), "patterns": patterns})
        node = self.nodes[nid]
        entries = [(k, props[k]) for k in props] + [(k, extra_schema) for k in req if k not in props]
        for k, sub in entries:                          # 声明的属性若匹配某条 patternProperties，两边都要满足
            matched = [p for r, p in patterns if r.search(k)]
            if k not in props and matched:
                sub = True
            sub = {"allOf": [sub] + matched} if matched else sub
            key = json.dumps(k, ensure_ascii=False).encode()
            node["props"].append((key, self.node(sub, f"{path}.{k}"), k in req))
        node["required_from"] = [any(r for _, _, r in node["props"][i:]) for i in range(len(node["props"]) + 1)]
        node["extra"] = None if extra_schema is False else self.node(extra_schema, f"{path}.*")
        node["by_match"] = {m: self.node(patterns[m[0]][1] if len(m) == 1 else {"allOf": [patterns[i][1] for i in m]},
                                         f"{path}.patternProperties")
                            for n in range(1, len(patterns) + 1) for m in itertools.combinations(range(len(patterns)), n)}
        node["open"] = node["extra"] is not None or bool(patterns)
        return nid

    # ============================================================== 3. 逐字节状态机
    # 帧（栈顶在最后）：
    #   ("L", 字节串)            接下来必须逐字出现这些字节
    #   ("V", 节点号)            这里开始一个值：看第一个字节展开成那种值的帧（可能有好几种展开 = 分叉）
    #   ("S",) ("E",) ("U", n, lo, hi)   普通字符串内部 / 刚读到反斜杠 / 还差 n 个 UTF-8 续字节
    #   ("T", 节点号, 字符数, 正则状态元组, 未完成的字符)   带长度或 pattern/format 的字符串内部
    #   ("N", 是否整数, 子状态)  不带范围的 JSON 数字小状态机
    #   ("D", 节点号, 已写的文字)  带范围的数字：每读一个字节都检查"还能不能落在范围里"
    #   ("C", 节点号, 已匹配字节)  在候选字面量里逐字节匹配
    #   ("A", 节点号, 已开始的元素数)   数组
    #   ("O", 节点号, 下一个可写的属性序号, 是否还没写过属性)   对象
    #   ("K", 节点号, 键的前缀或 None, 正则状态元组, 未完成的字符)   额外属性的键（不能和声明过的属性重名）
    def step(self, state: frozenset, b: int):
        """读入字节 b 后的新状态（frozenset of 栈）；None = 所有路都死了；"context" 见 Vocab.string_split。"""
        out = set()
        for stack in state:
            r = self._step_stack(stack, b)
            if r == "context":
                return r
            out |= r
        return frozenset(out) if out else None

    def _step_stack(self, stack: tuple, b: int):
        results, todo, seen = set(), [stack], set()
        while todo:
            st = todo.pop()
            if not st or st in seen:
                continue                                   # 栈空 = 文档已完整，后面不能再有字节
            seen.add(st)
            alts = self._frame(st[-1], b)
            if alts == "context":
                return alts
            for consumed, repl in alts:
                new = st[:-1] + repl
                if len(new) > self.max_stack:
                    continue                               # 太深：这条路剪掉（递归 schema 的深度上限）
                (results.add if consumed else todo.append)(new)
        return results

    def _frame(self, f, b):
        """一帧如何处理字节 b：[(是否吃掉了它, 替换这一帧的新帧), ...]，空列表 = 这条路死了。
        没吃掉 = 这一帧已结束（或展开了），把同一个字节交给新的栈顶。"""
        k = f[0]
        if k == "L":
            return [(True, (("L", f[1][1:]),) if len(f[1]) > 1 else ())] if b == f[1][0] else []
        if k in "SEU":
            return plain_string_step(f, b)
        if k == "V":
            return self._expand(f[1], b)
        if k == "T":
            return self._constrained_string(f, b)
        if k == "K":
            return self._extra_key(f, b)
        if k == "N":
            table, accepting = NUM[f[2]]
            c = chr(b) if chr(b) in "-+.0" else "d" if 0x31 <= b <= 0x39 else "e" if b in b"eE" else None
            nxt = table.get(c)
            if nxt is not None and not (f[1] and c in (".", "e")):
                return [(True, (("N", f[1], nxt),))]
            return [(False, ())] if accepting else []
        if k == "D":
            return self._bounded_number(f, b)
        if k == "C":
            opts, m = self.nodes[f[1]]["options"], f[2] + bytes([b])
            if any(o.startswith(m) for o in opts):
                longer = any(len(o) > len(m) and o.startswith(m) for o in opts)
                return [(True, (("C", f[1], m),) if longer else ())]
            return [(False, ())] if f[2] in opts else []
        if k == "A":
            return self._array(f, b)
        if k == "O":
            return self._object(f, b)
        return "context"                               # "X"：预计算时垫在最底下的哨兵帧

    def _expand(self, nid: int, b: int) -> list:
        """值的开头：按节点种类展开（不吃字节）。联合节点展开成每个分支——这就是"分叉"。"""
        node = self.nodes[nid]
        kind = node["kind"]
        if kind == "union":
            return [(False, (("V", a),)) for a in node["alts"]]
        if kind == "choice":
            return [(False, (("C", nid, b""),))] if any(o[0] == b for o in node["options"]) else []
        if kind == "string":
            if b != 0x22:
                return []
            inner = STR if node["plain"] else ("T", nid, 0, tuple(r.start for r in node["regexes"]), None)
            return [(True, (inner,))]
        if kind == "number":
            if b not in b"-0123456789":
                return []
            return [(False, (("D", nid, ""),) if node["bounds"] else (("N", node["integer"], "start"),))]
        if kind == "array":
            return [(True, (("A", nid, 0),))] if b == ord("[") else []
        return [(True, (("O", nid, 0, True),))] if b == ord("{") else []

    def _constrained_string(self, f, b) -> list:
        _, nid, count, rstates, pend = f
        node = self.nodes[nid]
        r = string_char(pend, b, keep_codepoint=bool(node["regexes"]))
        if r is None:
            return []
        if r == "end":
            ok = count >= node["lo"] and all(rx.accepts(s) for rx, s in zip(node["regexes"], rstates))
            return [(True, ())] if ok else []
        if node["hi"] is not None and count >= node["hi"]:
            return []                                  # 已经到 maxLength，不能再开始一个字符
        if r[0] == "pend":                             # 写到一半的字符：它能补全成的字符里，得有正则接受的
            if not all(any(rx.can_read(s, lo, hi) for lo, hi in pending_chars(r[1]))
                       for rx, s in zip(node["regexes"], rstates)):
                return []
            return [(True, (("T", nid, count, rstates, r[1]),))]
        new = tuple(rx.step(s, r[1]) for rx, s in zip(node["regexes"], rstates))
        if any(s < 0 for s in new):
            return []
        return [(True, (("T", nid, min(count + 1, node["cap"]), new, None),))]

    def _bounded_number(self, f, b) -> list:
        _, nid, text = f
        node = self.nodes[nid]
        new = text + chr(b)
        syntax = INT_PREFIX if node["integer"] else NUM_PREFIX
        if syntax.fullmatch(new) and feasible(new, node):
            return [(True, (("D", nid, new),))]
        return [(False, ())] if number_done(text, node) else []

    def _array(self, f, b) -> list:
        _, nid, count = f
        node = self.nodes[nid]
        out = []
        if b == ord("]") and count >= node["lo"]:
            out.append((True, ()))
        item = node["prefix"][count] if count < len(node["prefix"]) else node["rest"]
        if item is not None and (node["hi"] is None or count < node["hi"]):
            nxt = ("A", nid, min(count + 1, node["cap"]))
            if count == 0:
                out.append((False, (nxt, ("V", item))))
            elif b == ord(","):
                out.append((True, (nxt, ("V", item))))
        return out

    def _object(self, f, b) -> list:
        """对象：属性按 props 的顺序，可选的可以跳过（必需的不能跳），最后可以是额外属性。"""
        _, nid, i, first = f
        node = self.nodes[nid]
        props, sep = node["props"], b"" if first else b","
        out = []
        if b == ord("}") and not node["required_from"][i]:
            out.append((True, ()))
        if b != (0x22 if first else ord(",")):
            return out
        for j in range(i, len(props)):
            key, vid, required = props[j]
            out.append((False, (("O", nid, j + 1, False), ("V", vid), ("L", sep + key + b":"))))
            if required:
                break
        if node["open"] and not node["required_from"][i]:
            key = ("K", nid, "", tuple(r.start for r, _ in node["patterns"]), None)
            out.append((False, (("O", nid, len(props), False), key, ("L", sep + b'"'))))
        return out

    def _extra_key(self, f, b) -> list:
        _, nid, prefix, rstates, pend = f
        node = self.nodes[nid]
        r = string_char(pend, b, keep_codepoint=True)
        if r is None:
            return []
        if r == "end":
            if prefix is not None and prefix in node["names"]:
                return []                              # 和声明过的属性重名：不行
            matched = tuple(i for i, (rx, _) in enumerate(node["patterns"]) if rx.accepts(rstates[i]))
            value = node["by_match"][matched] if matched else node["extra"]
            return [(True, (("V", value), ("L", b":")))] if value is not None else []
        if r[0] == "pend":
            return [(True, (("K", nid, prefix, rstates, r[1]),))]
        if prefix is not None:
            prefix += chr(r[1])
            prefix = prefix if any(n.startswith(prefix) for n in node["names"]) else None
        new = tuple(rx.step(s, r[1]) if s >= 0 else -1 for (rx, _), s in zip(node["patterns"], rstates))
        if node["extra"] is None and all(s < 0 for s in new):
            return []                                  # 只允许匹配 patternProperties 的键，而哪条都匹配不上了
        return [(True, (("K", nid, prefix, new, None),))]

    def done(self, state: frozenset) -> bool:
        """文档已完整：某一条路的栈只剩"可以在这里结束"的帧。"""
        return any(all(self._can_end(f) for f in stack) for stack in state)

    def _can_end(self, f) -> bool:
        if f[0] == "N":
            return NUM[f[2]][1]
        if f[0] == "C":
            return f[2] in self.nodes[f[1]]["options"]
        if f[0] == "D":
            return number_done(f[2], self.nodes[f[1]])
        return False


def compile_schema(schema) -> Grammar:
    return Grammar(schema)


# ---------- 字符串内部：一个字节一个字节地拼出字符
ESCAPES = {ord(c): cp for c, cp in zip('"\\bfnrt', (0x22, 0x5C, 8, 12, 10, 13, 9))}   # 允许的转义（不含 \u 和 \/）
STR, ESC = ("S",), ("E",)


def utf8_lead(b: int):
    """UTF-8 首字节 -> (还差几个续字节, 下一个续字节的下限, 上限)。严格 UTF-8：排除过长编码和代理区。"""
    if 0xC2 <= b <= 0xDF:
        return 1, 0x80, 0xBF
    if 0xE0 <= b <= 0xEF:
        return 2, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF
    if 0xF0 <= b <= 0xF4:
        return 3, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF
    return None


def plain_string_step(f, b) -> list:
    """普通字符串（没有长度、pattern 限制）：引号结束，反斜杠转义，控制字符和 DEL 非法，多字节 UTF-8 逐字节检查。"""
    if f[0] == "S":
        if b == 0x22:
            return [(True, ())]
        if b == 0x5C:
            return [(True, (ESC,))]
        if 0x20 <= b < 0x7F:
            return [(True, (f,))]
        lead = utf8_lead(b)
        return [(True, (("U",) + lead,))] if lead else []
    if f[0] == "E":
        return [(True, (STR,))] if b in ESCAPES else []
    _, n, lo, hi = f
    return [(True, (("U", n - 1, 0x80, 0xBF),) if n > 1 else (STR,))] if lo <= b <= hi else []


def pending_chars(pend) -> list[tuple[int, int]]:
    """写到一半的字符（刚读到反斜杠 / 多字节 UTF-8 的前几个字节）最终可能是哪些码点：若干个区间。"""
    if pend == "E":
        return [(cp, cp) for cp in ESCAPES.values()]
    _, n, lo, hi, acc = pend
    shift = 6 * (n - 1)
    return [((acc << 6 | (lo & 0x3F)) << shift, (acc << 6 | (hi & 0x3F)) << shift | ((1 << shift) - 1))]


def string_char(pend, b: int, keep_codepoint: bool):
    """带约束的字符串里读一个字节：返回 "end"（结束引号）、("pend", 新的未完成字符)、("char", 码点) 或 None。
    pend：None、"E"（刚读到反斜杠）或 ("U", 还差几个续字节, 下限, 上限, 已拼出的位)。"""
    if pend is None:
        if b == 0x22:
            return "end"
        if b == 0x5C:
            return "pend", "E"
        if 0x20 <= b < 0x7F:
            return "char", b
        lead = utf8_lead(b)
        bits = b & (0x1F if b < 0xE0 else 0x0F if b < 0xF0 else 0x07)
        return ("pend", ("U",) + lead + (bits if keep_codepoint else 0,)) if lead else None
    if pend == "E":
        return ("char", ESCAPES[b]) if b in ESCAPES else None
    _, n, lo, hi, acc = pend
    if not lo <= b <= hi:
        return None
    acc = (acc << 6 | (b & 0x3F)) if keep_codepoint else 0
    return ("char", acc) if n == 1 else ("pend", ("U", n - 1, 0x80, 0xBF, acc))


# ---------- 数字
NUM = {  # 不带范围的 JSON 数字：状态 -> {字符类别: 下一状态}；带 * 的状态可以在这里结束
    "start": {"-": "minus", "0": "zero", "d": "int"}, "minus": {"0": "zero", "d": "int"},
    "zero*": {".": "dot", "e": "exp"}, "int*": {"0": "int", "d": "int", ".": "dot", "e": "exp"},
    "dot": {"0": "frac", "d": "frac"}, "frac*": {"0": "frac", "d": "frac", "e": "exp"},
    "exp": {"+": "sign", "-": "sign", "0": "expd", "d": "expd"}, "sign": {"0": "expd", "d": "expd"},
    "expd*": {"0": "expd", "d": "expd"}}
NUM = {k.rstrip("*"): (v, k.endswith("*")) for k, v in NUM.items()}
NUM_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)?")     # 带范围的数字：不用指数，方便算范围
INT_PREFIX = re.compile(r"-?(?:0|[1-9][0-9]*)?")
OPS = {">=": lambda x, v: x >= v, ">": lambda x, v: x > v, "<=": lambda x, v: x <= v, "<": lambda x, v: x < v}


def number_done(text: str, node: dict) -> bool:
    """写到这里能结束吗：语法上完整，且 json.loads 出来的值满足每个界（和 jsonschema 的比较完全一样）。"""
    if text in ("", "-") or text.endswith("."):
        return False
    value = json.loads(text)
    return all(OPS[op](value, v) for op, v in node["bounds"])


def feasible(text: str, node: dict) -> bool:
    """以 text 开头的数字里，还有没有落在范围里的？text 的所有写法的取值是若干个区间，逐个和范围求交。"""
    lo, lo_open, hi, hi_open = -math.inf, False, math.inf, False
    for op, v in node["bounds"]:
        v = Fraction(v)
        if op[0] == ">" and (v > lo or (v == lo and op == ">")):
            lo, lo_open = v, op == ">"
        if op[0] == "<" and (v < hi or (v == hi and op == "<")):
            hi, hi_open = v, op == "<"
    neg = text.startswith("-")
    if neg:                                            # 负数：把范围翻过来，只考虑绝对值
        lo, lo_open, hi, hi_open = -hi, hi_open, -lo, lo_open
    return any(_meets(a, b, b_open, lo, lo_open, hi, hi_open)
               for a, b, b_open in _magnitudes(text.lstrip("-"), node["integer"], hi))


def _magnitudes(q: str, integer: bool, hi):
    """绝对值部分 q 的所有补全的取值区间 [a, b)（b_open=True）或 [a, b]。"""
    if q == "":
        yield Fraction(0), math.inf, False
    elif "." in q:
        whole, frac = q.split(".")
        a = Fraction(whole + "." + (frac or "0"))
        yield a, a + Fraction(1, 10 ** len(frac)), True
    elif q == "0":
        yield Fraction(0), (Fraction(0) if integer else Fraction(1)), not integer
    else:
        d, j = int(q), 0
        while True:                                    # q, q?, q??, ...：第 j 个区间是 [d·10^j, (d+1)·10^j)
            a = Fraction(d * 10 ** j)
            yield a, (a + 10 ** j - 1 if integer else Fraction((d + 1) * 10 ** j)), not integer
            if a > hi or j > 400:
                return
            j += 1


def _meets(a, b, b_open, lo, lo_open, hi, hi_open) -> bool:
    left_ok = b > lo or (b == lo and not b_open and not lo_open)
    right_ok = a < hi or (a == hi and not hi_open)
    return left_ok and right_ok


# ============================================================== 4. 词表字节前缀树 + 掩码
class Vocab:
    """词表里所有 token 的字节前缀树（trie）。技巧一：一边沿树往下走一边推进状态机，某个字节让状态机死掉，
    整棵子树（所有以这串字节开头的 token）一次剪掉，不用逐个 token 检查。"""

    def __init__(self, tokenizer):
        self.n, self.eos = tokenizer.n_vocab, tokenizer.im_end
        special = set(tokenizer.special_tokens.values())
        self.children: list[dict[int, int]] = [{}]
        self.token_at: list[int] = [-1]
        for t in range(self.n):
            if t in special:
                continue                  # 特殊 token 永远不许出现在 JSON 里（结束符另外处理）
            node = 0
            for b in tokenizer.token_bytes(t):
                nxt = self.children[node].get(b)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][b] = nxt
                    self.children.append({})
                    self.token_at.append(-1)
                node = nxt
            self.token_at[node] = t
        self._split: dict[tuple, tuple] = {}

    def string_split(self, grammar: Grammar, top: tuple):
        """技巧二：字符串内部几乎所有 token 都合法，逐个走太慢。把栈顶的字符串帧单独拿出来，下面垫一个哨兵帧 X，
        走一遍整棵树：没碰到哨兵就走完的 token 与栈的其余部分无关（永远合法），碰到哨兵的（含引号、要离开字符串的）
        才需要结合具体状态再判断。同一个字符串帧算一次终身复用。"""
        cache = grammar.split_cache if top[0] in "TK" else self._split   # 带约束的帧含节点号：存在各自的语法里
        if top not in cache:
            free, ctx, todo = [], [], [(0, frozenset({(("X",), top)}))]
            while todo:
                node, st = todo.pop()
                for b, child in self.children[node].items():
                    nst = grammar.step(st, b)
                    if nst is None:
                        continue
                    if nst == "context":
                        ctx += self.tokens_below(child)
                        continue
                    if self.token_at[child] >= 0:
                        free.append(self.token_at[child])
                    todo.append((child, nst))
            mask = torch.zeros(self.n, dtype=torch.bool)
            mask[free] = True
            cache[top] = (mask, ctx)
        return cache[top]

    def tokens_below(self, node: int) -> list[int]:
        out, todo = [], [node]
        while todo:
            n = todo.pop()
            out += [self.token_at[n]] if self.token_at[n] >= 0 else []
            todo += self.children[n].values()
        return out


class TokenMask:
    """一个 schema 的掩码：状态编号、状态转移缓存、每个状态的"允许 token"缓存。技巧三：同一个状态第二次出现时，
    掩码直接从缓存取——每步只剩一次查表和一次 masked_fill。"""

    def __init__(self, grammar: Grammar, vocab: Vocab, tokenizer):
        self.g, self.vocab, self.tok = grammar, vocab, tokenizer
        self.states, self.ids = [], {}
        self.trans: dict[tuple[int, int], int] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.blocked: dict[int, torch.Tensor] = {}
        self.start = self._id(grammar.start)

    def _id(self, state) -> int:
        if state not in self.ids:
            self.ids[state] = len(self.states)
            self.states.append(state)
        return self.ids[state]

    def next(self, sid: int, b: int) -> int:
        key = (sid, b)
        if key not in self.trans:
            nst = self.g.step(self.states[sid], b)
            self.trans[key] = -1 if nst is None else self._id(nst)
        return self.trans[key]

    def advance(self, sid: int, token: int) -> int:
        for b in self.tok.token_bytes(token):
            sid = self.next(sid, b) if sid >= 0 else -1
        return sid

    def done(self, sid: int) -> bool:
        return sid >= 0 and self.g.done(self.states[sid])

    def allowed(self, sid: int) -> torch.Tensor:
        """布尔向量 [vocab]：在状态 sid 下哪些 token 能让文档继续合法。"""
        if sid in self.masks:
            return self.masks[sid]
        state = self.states[sid]
        stack = next(iter(state)) if len(state) == 1 else ()
        if stack and stack[-1][0] in "SUETK":             # 在字符串里（只有一条路）：用预计算的"无关 token"集合
            free, ctx = self.vocab.string_split(self.g, stack[-1])
            mask = free.clone()
            mask[[t for t in ctx if self.advance(sid, t) >= 0]] = True
        else:                                             # 其他状态：沿前缀树走，死掉就剪枝
            ok, todo = [], [(0, sid)]
            while todo:
                node, s = todo.pop()
                for b, child in self.vocab.children[node].items():
                    ns = self.next(s, b)
                    if ns >= 0:
                        if self.vocab.token_at[child] >= 0:
                            ok.append(self.vocab.token_at[child])
                        todo.append((child, ns))
            mask = torch.zeros(self.vocab.n, dtype=torch.bool)
            mask[ok] = True
        # 文档完整后只剩结束符；走进死胡同（约束互相矛盾，没有 token 能继续）时也只放行结束符，结果记为"没写完"
        mask[self.vocab.eos] = self.g.done(state) or not mask.any()
        self.masks[sid] = mask
        self.blocked[sid] = ~mask                         # 每步直接用"被禁止"的那份，省一次取反
        return mask

    def processor(self):
        return MaskProcessor(self)


JsonMask = TokenMask


# ============================================================== 5. 接到生成循环上
class MaskProcessor:
    """common/generate.generate 的 logits_processor：跟踪已生成的 token，屏蔽非法 token。
    生成循环在模型选了结束符时调用 stop()（见 on_step），所以 complete = 语法完整 *且* 自己停下；
    被 --max-new-tokens 截断的值（哪怕碰巧能解析，比如一个 64 位的数字）不算完整。"""

    def __init__(self, mask: TokenMask):
        self.m, self.sid, self.seen, self.seconds = mask, mask.start, 0, []
        self.stopped = False

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        for t in generated[self.seen:]:
            self.sid = self.m.advance(self.sid, t)
        self.seen = len(generated)
        if self.sid < 0:
            raise RuntimeError("constrained decoding reached an invalid state")
        if self.sid not in self.m.blocked:
            self.m.allowed(self.sid)
        out = logits.masked_fill(self.m.blocked[self.sid], float("-inf"))
        self.seconds.append(time.perf_counter() - t0)
        return out

    def on_step(self, step) -> None:
        """传给生成循环的 on_step：记下"模型自己选了结束符"。"""
        if step.stop:
            self.stopped = True

    @property
    def complete(self) -> bool:
        return self.stopped and self.m.done(self.sid)


# ============================================================== 6. 生成后校验
def validate(schema, instance) -> list[str]:
    """用 jsonschema（带 format 检查）核实一份生成结果；返回错误信息列表（空 = 合法）。
    语法保证不了的只有 oneOf 的"恰好一个"（Grammar.notes 会列出位置）；其余是双保险。"""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    v = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in v.iter_errors(instance)]
