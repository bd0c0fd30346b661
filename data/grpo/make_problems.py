"""第 09 课任务 B 的题目：两位数的加减法，答案唯一，能用程序核对。

固定随机种子，运行 `python data/grpo/make_problems.py` 得到逐字节相同的 train.json / heldout.json。
训练题和留出题不重复（按 (a, 运算, b) 去重）。
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 9
N_TRAIN, N_HELDOUT = 256, 64
# 答案格式：把算式写完整。基座模型自己常这么写（在训练题上采样时约 10% 是这个格式），"Answer: <数字>" 它从来不写
TEMPLATE = "What is {a} {op} {b}? Reply with just the equation: {a} {op} {b} = <number>"


def problem(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-")
    if op == "-" and b > a:              # 只出非负的答案
        a, b = b, a
    return {"prompt": TEMPLATE.format(a=a, op=op, b=b), "a": a, "op": op, "b": b,
            "answer": a + b if op == "+" else a - b}


def make() -> tuple[list[dict], list[dict]]:
    rng, seen, rows = random.Random(SEED), set(), []
    while len(rows) < N_TRAIN + N_HELDOUT:
        p = problem(rng)
        key = (p["a"], p["op"], p["b"])
        if key not in seen:
            seen.add(key)
            rows.append(p)
    return rows[:N_TRAIN], rows[N_TRAIN:]


def main() -> None:
    train, held = make()
    for name, rows in (("train.json", train), ("heldout.json", held)):
        (HERE / name).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{name}: {len(rows)} 题")


if __name__ == "__main__":
    main()
