"""第 7 课：结构化输出——让 135M 的小模型也只能写出合法 JSON（约束解码），再让它调用工具。

你将学到（--quick 约半分钟；完整一课 84 条抽取任务，2 核 CPU 上要十几分钟以上）：
  1. 只靠提示词要 JSON 有多不可靠：在 ≥ 50 条英文客服消息（和第二种形状的商品评论）上
     测出"能解析""符合 schema""字段正确"的比例；
  2. 约束解码：把 JSON Schema 子集编译成一个逐字节的状态机，每一步把"会让 JSON 变非法"的
     token 的 logits 设为 -inf，再照常采样。解析率和 schema 合格率必然是 100%，并测出这张
     掩码每个 token 要多花多少时间（毫秒，以及相对一次普通解码步的比例）；
  3. 函数调用与智能体循环：计算器、第 3 课知识库检索、当前时间三个工具，模型在约束下选工具、
     写参数，程序执行后把观察结果喂回去，直到给出答案或到达步数上限；
  4. --schema 文件 --prompt 文本：为你自己的 schema 生成一个受约束的回答。
默认离线使用本地模型 SmolLM2-135M-Instruct（只懂英文，所以任务和提示词都是英文）；
配置了 API 时，改用 API 自带的 response_format / tools（OpenAI 的同一思路），打印同样的轨迹。
示例：
  python 07_structured_output.py --quick
  python 07_structured_output.py --schema data/structured/review.schema.json --prompt "Review: great lamp, 12 dollars, 5 stars"
"""
from __future__ import annotations

import ast
import datetime
import json
import operator
import statistics
import time
from pathlib import Path

from common.cli import (add_knob, course_parser, existing_file, int_list, non_negative_float, positive_int, probability,
                        setup_run)
from common.client import client_from_args
from common.errors import read_json, require, run_cli
from common.json_schema import Grammar, JsonMask, MaskProcessor, Vocab, validate  # noqa: F401  (测试从本课取这几个名字)
from common.outputs import REPO_ROOT, save_results

NAME = "07_structured_output"
DATA = REPO_ROOT / "data" / "structured"

# ============================================================== 1+2. schema -> 逐字节语法 -> token 掩码（在 common/json_schema.py）
# 约束解码的全部机器放在 common/json_schema.py（正则部分在 common/regex_automaton.py），服务端也能直接用；
# 本课只调用它，讲义 docs/07_structured_output.md 第 2 节带着例子逐段讲。读代码的顺序：
#   1. 读 schema：title/description/$id/default 等注释忽略；$ref 展开；allOf 合并；不支持的关键字报一行中文。
#   2. 编译成节点：联合（anyOf/oneOf/type 列表）、字符串（长度、pattern、format）、数字（范围）、候选字面量
#      （enum/const，先用 jsonschema 对整个 schema 过滤）、数组、对象（可选属性、额外属性）。
#   3. 逐字节状态机：状态 = 一组"栈"（frozenset）。anyOf 的两个对象、可选属性这类"看第一个字节分不出走哪条路"
#      的地方，几条路同时往前走，死掉的丢掉；$ref 递归时栈最多 MAX_STACK 帧，更深的展开剪掉。
#   4. Vocab（词表字节前缀树）+ JsonMask（= TokenMask）：前缀树剪枝、字符串内部快速通道、按状态缓存。
#   5. MaskProcessor：接到生成循环上；complete = 语法到了可接受状态 *且* 模型自己选了结束符。
#   6. validate：生成之后再用 jsonschema（带 format 检查）核实一遍。


# ============================================================== 3. 抽取任务：只靠提示词 vs 约束解码
SETS = {  # 任务集 -> (schema 文件, 任务文件, 给模型的字段说明)
    "support": ("support.schema.json", "support_tasks.jsonl",
                "intent (one of refund, cancel_order, track_order, change_address, product_question, complaint), "
                "order_id (the order number as an integer, or null), urgent (true or false), "
                "items (list of product names)",
                'Message: My order #55120 with the desk lamp never came. Please hurry!\n'
                'JSON: {"intent":"track_order","order_id":55120,"urgent":true,"items":["desk lamp"]}'),
    "review": ("review.schema.json", "review_tasks.jsonl",
               "product (string), rating (integer 1-5), sentiment (positive, negative or neutral), "
               "price (object with amount as a number and currency USD, EUR or GBP), recommend (true or false)",
               'Message: Lovely umbrella, paid $12.00. 5 stars.\n'
               'JSON: {"product":"umbrella","rating":5,"sentiment":"positive",'
               '"price":{"amount":12.0,"currency":"USD"},"recommend":true}'),
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def extraction_messages(message: str, fields: str, example: str) -> list[dict]:
    return [{"role": "system", "content": "You extract data from text. Reply with one JSON object only."},
            {"role": "user", "content": f"Extract these fields as JSON: {fields}.\n\n{example}\n\nMessage: {message}\nJSON:"}]


def parse_json(text: str):
    """只靠提示词时尽量宽容：去掉前后废话，取第一个 { 到最后一个 } 之间的部分。"""
    a, b = text.find("{"), text.rfind("}")
    try:
        return json.loads(text[a:b + 1]) if 0 <= a < b else None
    except ValueError:
        return None


def norm(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return v.strip().lower()
    if isinstance(v, list):
        return sorted(map(str, map(norm, v)))
    return {k: norm(x) for k, x in v.items()} if isinstance(v, dict) else v


def score(obj, expected: dict, validator) -> dict:
    ok = obj is not None and validator.is_valid(obj)
    right = [isinstance(obj, dict) and k in obj and norm(obj[k]) == norm(v) for k, v in expected.items()]
    return {"parsed": obj is not None, "valid": ok, "fields": right}


def generate_local(lm, prompt_ids, max_new, args, processor=None) -> tuple[str, list[float]]:
    """common/generate.py 的那一个生成循环；只靠提示词时，第一个完整的 {...} 一出现就停（像停止词）。
    有掩码时，每一步也告诉 processor"这一步是不是结束符"：只有模型自己停下，输出才算写完。"""
    steps: list[float] = []
    toks, depth = [], 0

    def on_step(s):
        if s.index > 0:
            steps.append(s.seconds)
        if processor is not None:
            processor.on_step(s)
    for t in lm.generate(prompt_ids, max_new, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         on_step=on_step, logits_processor=processor):
        toks.append(t)
        piece = lm.tokenizer.token_bytes(t)
        depth += piece.count(b"{") - piece.count(b"}")
        if processor is None and depth <= 0 and b"}" in piece:
            break
    return lm.tokenizer.decode(toks), steps


def run_extraction(name: str, tasks, lm, vocab, args, oa=None) -> dict:
    """同一批任务跑两遍：只靠提示词，再加上掩码。返回比例和计时。"""
    import jsonschema
    from tqdm import tqdm

    schema_file, _, fields, example = SETS[name]
    schema = json.loads((DATA / schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    mask = JsonMask(Grammar(schema), vocab, lm.tokenizer) if lm else None
    out = {m: {"rows": [], "step_s": [], "mask_s": [], "incomplete": 0} for m in ("prompt_only", "constrained")}
    for t in tqdm(tasks, desc=f"{name} 任务", unit="条", leave=False):
        msgs = extraction_messages(t["message"], fields, example)
        for mode in out:
            if oa is not None:
                text, complete = api_extract(oa, msgs, schema if mode == "constrained" else None, args)
                steps, proc = [], None
            else:
                proc = mask.processor() if mode == "constrained" else None
                text, steps = generate_local(lm, lm.tokenizer.apply_chat_template(msgs), args.max_new_tokens, args, proc)
                complete = proc.complete if proc else True
            obj = json.loads(text) if mode == "constrained" and complete and oa is None else parse_json(text)
            out[mode]["rows"].append(dict(score(obj, t["expected"], validator), id=t["id"], output=text))
            out[mode]["step_s"] += steps
            out[mode]["mask_s"] += proc.seconds[1:] if proc else []
            out[mode]["incomplete"] += not complete
    return summarize(out, mask)


def summarize(out: dict, mask) -> dict:
    res = {}
    for mode, o in out.items():
        rows = o["rows"]
        fields = [f for r in rows for f in r["fields"]]
        res[mode] = {"tasks": len(rows), "parse_rate": sum(r["parsed"] for r in rows) / len(rows),
                     "schema_valid_rate": sum(r["valid"] for r in rows) / len(rows),
                     "field_accuracy": sum(fields) / len(fields), "incomplete_at_token_limit": o["incomplete"],
                     "step_ms_mean": 1000 * statistics.mean(o["step_s"]) if o["step_s"] else None,
                     "mask_ms_mean": 1000 * statistics.mean(o["mask_s"]) if o["mask_s"] else None,
                     "mask_ms_median": 1000 * statistics.median(o["mask_s"]) if o["mask_s"] else None,
                     "examples": [r["output"] for r in rows[:2]],
                     "outputs": [{"id": r["id"], "output": r["output"], "fields_right": r["fields"]} for r in rows]}
    if mask is not None:
        res["mask_states"] = len(mask.masks)
    return res


# ============================================================== 4. 工具 + 智能体循环
TOOLS = [
    {"name": "calculator", "description": "Use for any arithmetic: evaluates an expression such as 17 * 23.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"],
                    "additionalProperties": False}},
    {"name": "search", "description": "Use for company policy questions: searches the employee handbook.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
                    "additionalProperties": False}},
    {"name": "current_time", "description": "Use for questions about today's date, the year or the time.",
     "parameters": {"type": "object", "properties": {}, "required": [], "additionalProperties": False}},
    {"name": "final_answer", "description": "Give the final answer to the user.",
     "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
                    "additionalProperties": False}},
]
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
       ast.UAdd: operator.pos}


def calculate(expression: str) -> float | int:
    """安全的算术：只解析数字和 + - * / // % ** 括号（用 ast 遍历语法树，绝不 eval 任意代码）。"""
    def ev(n):
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in OPS:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Pow) and abs(b) > 100:
                raise ValueError("exponent too large")
            return OPS[type(n.op)](a, b)
        if isinstance(n, ast.UnaryOp) and type(n.op) in OPS:
            return OPS[type(n.op)](ev(n.operand))
        raise ValueError(f"not allowed: {type(n).__name__}")
    value = ev(ast.parse(expression.replace("^", "**"), mode="eval").body)
    return int(value) if isinstance(value, float) and value.is_integer() else value


class Toolbox:
    """工具的 Python 实现。知识库（第 3 课的检索器，common/retrieval.py）第一次搜索时才加载。"""

    def __init__(self, retriever: str = "hybrid"):
        self.retriever, self.kb = retriever, None

    def run(self, name: str, args: dict) -> str:
        try:
            if name == "calculator":
                return str(calculate(args["expression"]))
            if name == "current_time":
                return datetime.datetime.now().strftime("%A %Y-%m-%d %H:%M")
            if name == "search":
                if self.kb is None:
                    from common.retrieval import load_knowledge_base
                    self.kb = load_knowledge_base(lang="en", chunk_size=128, overlap=32)
                hits = self.kb.search(args["query"], k=2, retriever=self.retriever)
                return " | ".join(h.text.replace("\n", " ")[:300] for h in hits) or "no results"
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as e:
            return f"error: {e}"
        return f"error: unknown tool {name}"


def agent_loop(question: str, policy, toolbox: Toolbox, max_steps: int, printer=print) -> dict:
    """计划 → 行动 → 观察，直到 final_answer 或步数上限。policy(messages) -> (thought, tool, args)。
    工具参数在交给 Python 之前先用 jsonschema 校验：约束解码保证它合法，这里是"信任但核实"。"""
    import jsonschema

    params = {t["name"]: t["parameters"] for t in TOOLS}
    messages = [{"role": "user", "content": question}]
    trace = {"question": question, "steps": [], "answer": None, "stopped": "step_limit", "args_valid": True}
    for i in range(max_steps):
        try:
            thought, tool, args = policy(messages)
        except Incomplete as e:               # 到了 --max-new-tokens 还没写完：如实记录
            trace["stopped"] = "incomplete"
            printer(f"  第 {i + 1} 步  {len(str(e))} 个字符内没写完 JSON，停止。")
            break
        valid = tool in params and jsonschema.Draft202012Validator(params[tool]).is_valid(args)
        trace["args_valid"] &= valid
        printer(f"  第 {i + 1} 步  想法：{thought}\n         工具：{tool}  参数：{json.dumps(args, ensure_ascii=False)}")
        if not valid:
            obs = "error: arguments do not match the tool's schema"
        elif tool == "final_answer":
            trace.update(answer=args["answer"], stopped="answer")
            printer(f"         回答：{args['answer']}")
            trace["steps"].append({"thought": thought, "tool": tool, "arguments": args})
            break
        else:
            obs = toolbox.run(tool, args)
        printer(f"         观察：{clip(obs, 160)}")
        trace["steps"].append({"thought": thought, "tool": tool, "arguments": args, "observation": obs})
        messages += [{"role": "assistant", "content": json.dumps({"thought": thought, "tool": tool, "arguments": args})},
                     {"role": "user", "content": f"Observation: {obs}\nIf this answers the question, call final_answer."}]
    return trace


class Incomplete(Exception):
    """The token budget ended before the constrained JSON was complete."""


AGENT_SYSTEM = ("You answer questions by calling tools, one JSON step at a time. Tools:\n"
                + "\n".join(f"- {t['name']}: {t['description']}" for t in TOOLS)
                + "\nFirst call a tool to get facts, then call final_answer with the answer. Example:\n"
                'Question: What is 2 plus 3?\n{"thought":"I need to add.","tool":"calculator","arguments":{"expression":"2 + 3"}}\n'
                'Observation: 5\n{"thought":"I know the result.","tool":"final_answer","arguments":{"answer":"5"}}')


class LocalPolicy:
    """本地模型选工具：先在 {"thought":..,"tool":<枚举>} 的约束下生成，再按所选工具的参数 schema 生成参数
    ——程序根据第一段的结果切换第二段的语法，这就是"函数调用"在底层的样子。"""

    def __init__(self, lm, vocab, args):
        self.lm, self.vocab, self.args, self.masks = lm, vocab, args, {}
        names = [t["name"] for t in TOOLS]
        self.choice = {"type": "object", "properties": {"thought": {"type": "string"}, "tool": {"enum": names}},
                       "required": ["thought", "tool"], "additionalProperties": False}
        self.mask_s: list[float] = []

    def _constrained(self, schema: dict, prompt_ids: list[int]) -> dict:
        key = json.dumps(schema, sort_keys=True)
        if key not in self.masks:
            self.masks[key] = JsonMask(Grammar(schema), self.vocab, self.lm.tokenizer)
        proc = self.masks[key].processor()
        text, _ = generate_local(self.lm, prompt_ids, self.args.max_new_tokens, self.args, proc)
        self.mask_s += proc.seconds
        if not proc.complete:
            raise Incomplete(text)
        return json.loads(text)

    def __call__(self, messages):
        tok = self.lm.tokenizer
        ids = tok.apply_chat_template([{"role": "system", "content": AGENT_SYSTEM}] + messages)
        step = self._constrained(self.choice, ids)
        head = json.dumps(step, separators=(",", ":"))[:-1] + ',"arguments":'
        params = next(t["parameters"] for t in TOOLS if t["name"] == step["tool"])
        return step["thought"], step["tool"], self._constrained(params, ids + tok.encode(head))


# ============================================================== 5. API：同一思路，服务端来做
def api_extract(oa, messages, schema, args) -> tuple[str, bool]:
    """schema=None：只靠提示词；否则用 response_format 的 json_schema（strict）让服务端做约束解码。"""
    kw = {"response_format": {"type": "json_schema", "json_schema": {
        "name": schema.get("title", "answer"), "schema": {k: v for k, v in schema.items() if k != "title"},
        "strict": True}}} if schema else {}
    r = oa(messages=messages, max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, **kw)
    return r.choices[0].message.content or "", r.choices[0].finish_reason == "stop"


class ApiPolicy:
    """API 的原生 tools：服务端按每个工具的 parameters schema 生成 arguments（tool_calls）。"""

    def __init__(self, oa, args):
        self.oa, self.args = oa, args
        self.tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                        "parameters": t["parameters"], "strict": True}} for t in TOOLS]

    def __call__(self, messages):
        r = self.oa(messages=[{"role": "system", "content": AGENT_SYSTEM}] + messages, tools=self.tools,
                           tool_choice="required", max_tokens=self.args.max_new_tokens, temperature=self.args.temperature)
        msg = r.choices[0].message
        if not msg.tool_calls:
            return msg.content or "", "final_answer", {"answer": msg.content or ""}
        call = msg.tool_calls[0].function
        try:
            args = json.loads(call.arguments)
        except ValueError:
            args = {"_unparsed": call.arguments}
        return msg.content or "", call.name, args


# ============================================================== 6. 主流程
def parse_args(argv=None):
    p = course_parser(NAME, __doc__, groups=("backend", "local"))
    add_knob(p, "--max-new-tokens", type=positive_int, default=96, quick=64, help="每次生成最多多少个新 token")
    add_knob(p, "--tasks", type=int_list, default=None, quick=(1, 1),
             help="每个任务集最多跑几条：一个数（两个任务集都用它）或 support,review 两个数（不填 = 全部：60 和 24）")
    add_knob(p, "--agent-tasks", type=positive_int, default=None, quick=2, help="智能体任务条数（不填 = 全部）")
    add_knob(p, "--max-steps", type=positive_int, default=4, quick=2, help="智能体最多走几步，到了就停")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="采样温度（0 = 贪心；掩码之后照常采样）")
    p.add_argument("--top-p", type=probability, default=1.0, help="top-p 采样（掩码之后）")
    p.add_argument("--retriever", choices=("bm25", "dense", "hybrid"), default="hybrid", help="search 工具用第 3 课的哪种检索")
    p.add_argument("--schema", type=existing_file, default=None, help="你自己的 JSON Schema 文件：只生成一个受约束的回答")
    p.add_argument("--prompt", default=None, help="配合 --schema：给模型的英文提示")
    args = p.parse_args(argv)
    if (args.schema is None) != (args.prompt is None):
        p.error("--schema 和 --prompt 需要一起使用")
    return args


def build_vocab(tokenizer) -> Vocab:
    t0 = time.perf_counter()
    vocab = Vocab(tokenizer)
    print(f"[准备] 词表字节前缀树：{vocab.n} 个 token、{len(vocab.children)} 个节点，用时 {time.perf_counter() - t0:.1f} s")
    return vocab


def one_schema(args, client) -> dict:
    """--schema/--prompt：为用户的 schema 生成一个回答（不支持的关键字会在编译时报出中文错误），
    写完后再用 jsonschema 校验一遍并报告。"""
    schema = read_json(args.schema, "schema 文件", "请检查 --schema。")
    grammar = Grammar(schema)
    messages = [{"role": "user", "content": args.prompt + "\nAnswer with JSON."}]
    if client.backend == "openai":
        text, complete = api_extract(chat_api(client), messages, schema, args)
    else:
        lm = client.local()
        proc = JsonMask(grammar, build_vocab(lm.tokenizer), lm.tokenizer).processor()
        text, _ = generate_local(lm, lm.tokenizer.apply_chat_template(messages), args.max_new_tokens, args, proc)
        complete = proc.complete
    print(text)
    errors = None
    if not complete:
        print(f"（{args.max_new_tokens} 个 token 内没有写完：加大 --max-new-tokens）")
    else:
        try:
            errors = validate(schema, json.loads(text))
        except ValueError:
            errors = ["不是合法的 JSON"]
        print("jsonschema 校验：" + ("通过" if not errors else "不通过——" + "；".join(errors[:3])))
        for note in grammar.notes:
            print(f"  （{note}）")
    return {"schema": str(args.schema), "output": text, "complete": complete,
            "schema_valid": None if errors is None else not errors, "validation_errors": errors or []}


def chat_api(client):
    """openai SDK 的 chat.completions.create，绑定好模型名（common/client.py 的 LLMClient.openai）。"""
    import functools
    return functools.partial(client.openai.chat.completions.create, model=client.model_name)


def clip(text: str, n: int, quote: bool = False) -> str:
    """屏幕上只显示前 n 个字符左右：在词边界处截断，并明说截断了（省略号 + 全长），免得看起来像写坏了。
    quote=True 时用 repr 显示（看得见换行和引号）。"""
    show = repr if quote else str
    if len(text) <= n:
        return show(text)
    cut = text[:n]
    cut = cut[:cut.rfind(" ")] if " " in cut[n // 2:] else cut
    return f"{show(cut)}…（共 {len(text)} 个字符，只显示开头；完整内容在 results.json）"


def print_table(name: str, res: dict) -> None:
    print(f"\n  [{name}] {res['prompt_only']['tasks']} 条任务      能解析   符合 schema   字段正确   没写完")
    for mode, label in (("prompt_only", "只靠提示词"), ("constrained", "约束解码  ")):
        r = res[mode]
        print(f"    {label}          {r['parse_rate']:6.0%}   {r['schema_valid_rate']:9.0%}   "
              f"{r['field_accuracy']:8.0%}   {r['incomplete_at_token_limit']:4d}")
    print(f"    例（只靠提示词）：{clip(res['prompt_only']['examples'][0], 110, quote=True)}")
    print(f"    例（约束解码）  ：{clip(res['constrained']['examples'][0], 110, quote=True)}")


def mask_overhead(sets: dict) -> dict:
    """掩码每个 token 的耗时（生成循环里实测）与不加约束的一次解码步（同一次运行实测）之比。"""
    mask_ms = [r["constrained"]["mask_ms_mean"] for r in sets.values() if r["constrained"]["mask_ms_mean"]]
    step_ms = [r["prompt_only"]["step_ms_mean"] for r in sets.values() if r["prompt_only"]["step_ms_mean"]]
    if not mask_ms or not step_ms:
        return {}
    m, s = statistics.mean(mask_ms), statistics.mean(step_ms)
    print(f"\n  掩码开销：每个 token {m:.2f} ms（中位数 {statistics.mean(r['constrained']['mask_ms_median'] for r in sets.values()):.2f} ms，"
          f"含首次遇到新状态时的建表），不加约束的一步解码 {s:.1f} ms → 多花 {m / s:.1%}"
          f"（{'掩码只是查表加 masked_fill，比一次模型前向便宜得多' if m / s < 0.1 else '比一次前向的十分之一还贵：多半是第一次遇到新状态时走一遍词表 trie 建表，或者机器很忙'}）")
    return {"mask_ms_per_token": m, "unconstrained_step_ms": s, "overhead_ratio": m / s}


def run_agent(args, client, vocab, n: int | None) -> dict:
    tasks = read_jsonl(DATA / "agent_tasks.jsonl")[:n]
    year = str(datetime.date.today().year)
    policy = ApiPolicy(chat_api(client), args) if client.backend == "openai" else LocalPolicy(client.local(), vocab, args)
    toolbox, traces = Toolbox(args.retriever), []
    for t in tasks:
        print(f"\n  问题：{t['question']}")
        tr = agent_loop(t["question"], policy, toolbox, args.max_steps)
        expect = t["expect"].replace("{year}", year)
        tr["success"] = tr["answer"] is not None and expect.lower() in tr["answer"].lower()
        tr["used_expected_tool"] = any(s["tool"] == t["tool"] for s in tr["steps"])
        print(f"  → {'答对' if tr['success'] else '没答对'}（期望答案里含 {expect!r}；停止原因：{tr['stopped']}）")
        traces.append(tr)
    k = sum(t["success"] for t in traces)
    print(f"\n  智能体：{k}/{len(traces)} 题答对；{sum(t['used_expected_tool'] for t in traces)}/{len(traces)} 题用上了该用的工具")
    return {"tasks": len(traces), "success": k, "success_rate": k / len(traces),
            "used_expected_tool": sum(t["used_expected_tool"] for t in traces),
            "args_schema_valid": all(t["args_valid"] for t in traces), "traces": traces}


def plot(sets: dict, path: Path) -> None:
    from common.plots import legend_outside, new_figure, save_figure

    fig, axes = new_figure(len(sets), 1, (4.6 * len(sets) + 2.2, 3.9))
    axes = axes if isinstance(axes, (list, tuple)) or hasattr(axes, "__len__") else [axes]
    keys = ("parse_rate", "schema_valid_rate", "field_accuracy")
    modes = {"prompt_only": ("prompt only", "C1"), "constrained": ("constrained decoding", "C0")}  # 各面板同色同义
    for ax, (name, res) in zip(axes, sets.items()):
        for j, (mode, (label, colour)) in enumerate(modes.items()):
            bars = ax.bar([i + 0.38 * j for i in range(3)], [res[mode][k] for k in keys], width=0.38, label=label,
                          color=colour)
            ax.bar_label(bars, labels=[f"{res[mode][k]:.0%}" for k in keys], fontsize=8, padding=1)
        ax.set_xticks([i + 0.19 for i in range(3)], ["parses", "schema-valid", "fields right\n(valid ≠ correct)"])
        ax.set_ylim(0, 1.12)
        ax.set(xlabel="what was checked in each JSON output", ylabel="share of tasks")
        n = res["prompt_only"]["tasks"]
        ax.set_title(f"{name} ({n} task{'' if n == 1 else 's'})")
    legend_outside(axes[-1])
    print(f"  图：{save_figure(fig, path)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_run(args)
    client = client_from_args(args)
    if args.schema:
        save_results(args.out_dir, {"single": one_schema(args, client)}, merge=True)
        return 0
    local = client.backend != "openai"
    vocab = build_vocab(client.local().tokenizer) if local else None
    print("\n=== 1+2. 只靠提示词 vs 约束解码（同样的提示词、同样的贪心解码，只差一张掩码）===")
    sets = {}
    for i, (name, (_, task_file, _, _)) in enumerate(SETS.items()):
        tasks = read_jsonl(DATA / task_file)[:args.tasks and args.tasks[min(i, len(args.tasks) - 1)]]
        sets[name] = run_extraction(name, tasks, client.local() if local else None, vocab, args,
                                    None if local else chat_api(client))
        print_table(name, sets[name])
    overhead = mask_overhead(sets) if local else {}
    print(f"\n=== 3. 函数调用与智能体循环（最多 {args.max_steps} 步）===")
    agent = run_agent(args, client, vocab, args.agent_tasks)
    results = {"backend": client.backend, "model": client.model_name, "quick": args.quick, "seed": args.seed,
               "max_new_tokens": args.max_new_tokens, "tasks": sets, "mask_overhead": overhead, "agent": agent}
    print()
    plot(sets, args.out_dir / "structured_output.png")
    print(f"  结果：{save_results(args.out_dir, results)}")
    check(sets, agent, local)
    return 0


def check(sets: dict, agent: dict, local: bool) -> None:
    """自检：本地约束解码写完的每一份输出都必须能解析并符合 schema；送进工具的参数都必须合法。"""
    if not local:
        return
    for name, res in sets.items():
        c = res["constrained"]
        complete = c["tasks"] - c["incomplete_at_token_limit"]
        require(round(c["schema_valid_rate"] * c["tasks"]) == complete and round(c["parse_rate"] * c["tasks"]) == complete,
                f"{name} 的约束输出里有写完却不合法的 JSON——掩码有错。")
    require(agent["args_schema_valid"], "有工具参数不符合它的 schema——掩码有错。")
    print("  自检通过：约束解码写完的输出 100% 能解析、100% 符合 schema；工具参数 100% 合法。")


if __name__ == "__main__":
    run_cli(main)
