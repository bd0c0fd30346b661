"""Generate the shipped task sets of lesson 07 (run once; the .jsonl files are committed).

    python data/structured/make_tasks.py          # rewrites the three .jsonl files, same seed = same files

Provenance: every message below is built from the hand-written templates in this file with a
seeded random generator (SEED); expected values are known by construction, not labelled by a model.
  support_tasks.jsonl  customer-support messages -> {intent, order_id, urgent, items}
  review_tasks.jsonl   product reviews -> {product, rating, sentiment, price{amount, currency}, recommend}
  agent_tasks.jsonl    questions for the tool-using agent; "expect" is a string the final answer must
                       contain (search facts come from data/rag/questions_en.jsonl, lesson 03's set;
                       "{year}" is filled in with the current year at run time)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 7
HERE = Path(__file__).resolve().parent
PRODUCTS = ["wireless mouse", "USB-C cable", "coffee mug", "yoga mat", "desk lamp", "phone case",
            "water bottle", "backpack", "keyboard", "headphones", "notebook", "umbrella"]
URGENT = ["This is urgent, please help today.", "I need this fixed ASAP!", "Please respond immediately."]
CALM = ["No rush, thanks.", "Thank you for your help.", "Whenever you have time."]
TEMPLATES = {  # intent -> message templates; {order} is "order #12345", {items} a product phrase
    "refund": ["I want my money back for the {items} from {order}.",
               "Please refund the {items} in {order}, it arrived broken."],
    "cancel_order": ["Please cancel {order}, I ordered the {items} by mistake.",
                     "I no longer need the {items}. Cancel {order} please."],
    "track_order": ["Where is my {items}? I placed {order} last week.",
                    "Can you tell me when {order} with the {items} will arrive?"],
    "change_address": ["I moved. Please ship {order} with the {items} to my new address.",
                       "Can I change the delivery address for {order}? It has the {items}."],
    "product_question": ["Does the {items} work with a Mac? Asking before I buy.",
                         "Is the {items} waterproof?"],
    "complaint": ["The {items} from {order} stopped working after two days. Very disappointed.",
                  "Your courier threw my {items} over the fence. {order} was a mess."],
}


def support_tasks(rng: random.Random, n: int = 60) -> list[dict]:
    intents = list(TEMPLATES)
    out = []
    for i in range(n):
        intent = intents[i % len(intents)]
        text = rng.choice(TEMPLATES[intent])
        items = rng.sample(PRODUCTS, rng.choice([1, 1, 2]))
        order_id = rng.randint(10000, 99999) if "{order}" in text else None
        urgent = rng.random() < 0.4
        msg = text.format(order=f"order #{order_id}", items=" and the ".join(items))
        msg += " " + rng.choice(URGENT if urgent else CALM)
        out.append({"id": f"support-{i:02d}", "message": msg,
                    "expected": {"intent": intent, "order_id": order_id, "urgent": urgent, "items": items}})
    return out


REVIEW_TEMPLATES = {
    "positive": ["I bought the {p} for {price} and I love it. {stars} stars.",
                 "Great {p}! Worth every cent of {price}. Rating: {stars}/5."],
    "negative": ["The {p} broke after a week. Paid {price} for nothing. {stars} star.",
                 "Terrible {p}, {price} wasted. I give it {stars} out of 5."],
    "neutral": ["The {p} is okay for {price}. Nothing special, {stars} stars.",
                "Average {p}. It cost {price}. {stars}/5."],
}
CURRENCIES = {"USD": "${:.2f}", "EUR": "{:.2f} euros", "GBP": "£{:.2f}"}


def review_tasks(rng: random.Random, n: int = 24) -> list[dict]:
    out = []
    for i in range(n):
        sentiment = ["positive", "negative", "neutral"][i % 3]
        stars = {"positive": rng.choice([4, 5]), "negative": 1, "neutral": 3}[sentiment]
        product, currency = rng.choice(PRODUCTS), rng.choice(sorted(CURRENCIES))
        amount = round(rng.randint(5, 120) + rng.choice([0, 0.5, 0.99]), 2)
        text = rng.choice(REVIEW_TEMPLATES[sentiment]).format(
            p=product, price=CURRENCIES[currency].format(amount), stars=stars)
        out.append({"id": f"review-{i:02d}", "message": text,
                    "expected": {"product": product, "rating": stars, "sentiment": sentiment,
                                 "price": {"amount": amount, "currency": currency},
                                 "recommend": sentiment == "positive"}})
    return out


def agent_tasks(rng: random.Random) -> list[dict]:
    out = []
    for a, b, op in [(17, 23, "*"), (1250, 348, "-"), (96, 12, "/"), (45, 78, "+")]:
        value = {"*": a * b, "-": a - b, "/": a / b, "+": a + b}[op]
        value = int(value) if float(value).is_integer() else value
        word = {"*": "times", "-": "minus", "/": "divided by", "+": "plus"}[op]
        out.append({"id": f"calc-{len(out)}", "question": f"What is {a} {word} {b}?", "tool": "calculator",
                    "expect": str(value)})
    rag = [json.loads(line) for line in (HERE.parent / "rag" / "questions_en.jsonl").read_text().splitlines() if line]
    for q in rng.sample(rag, 3):
        out.append({"id": f"search-{len(out)}", "question": q["question"], "tool": "search", "expect": q["answer"]})
    out.append({"id": f"time-{len(out)}", "question": "What year is it now?", "tool": "current_time", "expect": "{year}"})
    return out


def main() -> None:
    rng = random.Random(SEED)
    for name, rows in [("support_tasks", support_tasks(rng)), ("review_tasks", review_tasks(rng)),
                       ("agent_tasks", agent_tasks(rng))]:
        path = HERE / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path.name}: {len(rows)} tasks")


if __name__ == "__main__":
    main()
