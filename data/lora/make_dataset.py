"""Generate the lesson-05 customer-support intent dataset (run once; the JSON files are committed).

    python data/lora/make_dataset.py          # writes data/lora/train.json and data/lora/eval.json

Deterministic (fixed seed). Every intent has its own message templates; a few templates per
intent are reserved for the held-out set, so evaluation messages use phrasings the model never
saw in training (not just new slot values). Format: Alpaca / LlamaFactory
``[{"instruction", "input", "output"}, ...]``. Written for this project (see README.md).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240605
N_TRAIN_PER_INTENT = 32   # 8 intents -> 256 training examples
N_EVAL_PER_INTENT = 8     # 8 intents -> 64 held-out examples
N_EVAL_TEMPLATES = 3      # the last 3 templates of each intent are used only for evaluation

INTENTS = ["refund", "shipping_status", "cancel_order", "change_address",
           "product_question", "complaint", "account_login", "payment_issue"]
INSTRUCTION = ("Classify the support message. Intents: " + ", ".join(INTENTS) + ". "
               "Reply as: intent: <intent> | order: <number or none>")

SLOTS = {
    "item": ["blender", "pair of running shoes", "phone case", "desk lamp", "winter jacket", "coffee maker",
             "backpack", "set of headphones", "yoga mat", "kettle", "laptop stand", "wool sweater",
             "water bottle", "toaster", "gaming mouse", "bath towel set", "smart watch", "frying pan"],
    "days": ["three days", "a week", "ten days", "two weeks", "five days", "over a month"],
    "city": ["Denver", "Leeds", "Austin", "Toronto", "Dublin", "Seattle", "Melbourne", "Boston", "Cardiff"],
    "street": ["12 Oak Street", "45 Maple Avenue", "7 River Road", "230 King Street", "18 Elm Close",
               "99 Harbor Drive", "5 Station Lane"],
    "pay": ["credit card", "PayPal", "debit card", "gift card", "Apple Pay", "bank transfer"],
    "defect": ["arrived broken", "stopped working after two days", "is the wrong size", "came with a crack",
               "is missing parts", "smells like burnt plastic", "does not match the photo"],
    "question": ["is it dishwasher safe", "does it come in black", "what is the warranty", "is it waterproof",
                 "does it work with iPhone", "how much does it weigh", "is it machine washable",
                 "what size should I pick"],
    "name": ["Sam", "Maria", "Tom", "Priya", "Alex", "Chen", "Fatima", "Lucas"],
}

# Templates: "{order}" is replaced by an order number (so the answer has it); without it the answer is "none".
TEMPLATES = {
    "refund": [
        "I want my money back for the {item}, order {order}.",
        "Please refund order {order}, the {item} {defect}.",
        "Can I get a refund for the {item}? It {defect}.",
        "How do I return the {item} and get refunded?",
        "I returned the {item} {days} ago and still no refund for order #{order}.",
        "Refund please. Order number {order}.",
        "The {item} {defect}, I'd like a full refund.",
        "Hi, this is {name}. I need a refund on order {order}.",
        "Where is my refund for the {item}? I sent it back {days} ago.",
        "Could you give me my money back? I don't want the {item} anymore.",
        # held-out phrasings
        "Order {order}: the {item} {defect}, so please reimburse me.",
        "I'd like to return the {item} for my money back.",
        "Still waiting for the reimbursement on #{order}, it has been {days}.",
    ],
    "shipping_status": [
        "Where is my order {order}?",
        "My {item} hasn't arrived yet, it's been {days}.",
        "Can you track order #{order} for me?",
        "When will the {item} be delivered to {city}?",
        "Order {order} still says processing after {days}. When does it ship?",
        "Has my package shipped yet?",
        "Hi, it's {name}. Any update on the delivery of order {order}?",
        "The tracking page for my {item} hasn't changed in {days}.",
        "Is my {item} on the way? I ordered it {days} ago.",
        "What's the delivery date for order number {order}?",
        # held-out phrasings
        "How long until #{order} gets here?",
        "I'm still waiting for my {item} to show up in {city}.",
        "Could you check where parcel {order} is right now?",
    ],
    "cancel_order": [
        "Please cancel order {order}.",
        "I want to cancel my order for the {item}.",
        "Cancel #{order}, I ordered it by mistake.",
        "Can I still cancel the {item} before it ships?",
        "Hi, {name} here. Please cancel order number {order}, I found it cheaper elsewhere.",
        "I changed my mind about the {item}, please cancel it.",
        "Stop order {order}, I don't need it anymore.",
        "How do I cancel an order I placed an hour ago?",
        "Please don't ship the {item}, I want to cancel.",
        "I need to cancel order {order} right away.",
        # held-out phrasings
        "Scrap my purchase of the {item}, I no longer want it.",
        "Please call off order #{order} before it leaves the warehouse.",
        "I placed {order} twice by accident, cancel one of them please.",
    ],
    "change_address": [
        "I need to change the delivery address for order {order}.",
        "Please ship the {item} to {street}, {city} instead.",
        "I moved to {city}. Can you update the address on order #{order}?",
        "Wrong address on my order, it should be {street}.",
        "Hi, this is {name}. Please send order {order} to {street} instead.",
        "Can I change where my {item} is delivered?",
        "Update my shipping address to {street}, {city} please.",
        "The address on order number {order} is old, please fix it.",
        "Can you redirect my package to my office in {city}?",
        "I typed the wrong street for the {item}, it should be {street}.",
        # held-out phrasings
        "Deliver #{order} to {street} rather than my old place.",
        "My new home is {street}, {city}; please use that for the {item}.",
        "Is it too late to send order {order} somewhere else?",
    ],
    "product_question": [
        "Quick question about the {item}: {question}?",
        "Before I buy the {item}, {question}?",
        "Hi, {name} here. {question} for the {item}?",
        "I'm thinking about the {item}. {question}?",
        "Does the {item} come with batteries?",
        "Can you tell me if the {item} is in stock?",
        "About the {item}, {question}?",
        "What colors does the {item} come in?",
        "Is the {item} good for a beginner?",
        "Is there a bigger version of the {item}?",
        # held-out phrasings
        "I have a question before ordering the {item}: {question}?",
        "How does the {item} compare to the cheaper model?",
        "Would the {item} make a good gift, and {question}?",
    ],
    "complaint": [
        "Your service is terrible, nobody answered my emails for {days}.",
        "I'm very unhappy with how I was treated on the phone.",
        "This is the third time my order {order} was messed up. Awful.",
        "The driver threw my {item} over the fence. Unacceptable.",
        "Hi, I'm {name} and I want to complain about your rude staff.",
        "I waited {days} for a reply. Worst customer service ever.",
        "Really disappointed with the packaging of order {order}, everything was a mess.",
        "Your support agent hung up on me. I want to file a complaint.",
        "I'm fed up with the constant delays from your company.",
        "The quality of your products has gone downhill, very disappointing.",
        # held-out phrasings
        "I am absolutely furious about how order {order} was handled.",
        "Nobody on your team seems to care about customers anymore.",
        "The way your staff spoke to me in the {city} store was shocking.",
    ],
    "account_login": [
        "I can't log in to my account.",
        "I forgot my password, how do I reset it?",
        "The password reset email never arrives.",
        "My account is locked after too many attempts.",
        "Hi, {name} here. The app keeps saying my password is wrong.",
        "I don't get the verification code when I sign in.",
        "How do I change the email I use to log in?",
        "Login page just spins and never loads.",
        "Someone else may have accessed my account, I can't sign in now.",
        "The two-factor code is not accepted when I log in.",
        # held-out phrasings
        "Every time I try to sign in it tells me my account does not exist.",
        "I am stuck on the login screen and cannot get into my profile.",
        "The reset link says it expired, so I still can't access my account.",
    ],
    "payment_issue": [
        "My {pay} was charged twice for order {order}.",
        "The payment for the {item} keeps failing.",
        "Why was I charged for order #{order} when it was cancelled?",
        "My {pay} was declined at checkout.",
        "Hi, this is {name}. I see an extra charge on my {pay}.",
        "I paid with {pay} but the order says unpaid.",
        "Can I pay for the {item} with {pay}?",
        "The checkout page gives an error when I enter my {pay} details.",
        "You charged me the wrong amount for order {order}.",
        "My {pay} was billed but I never got a confirmation.",
        # held-out phrasings
        "There are two identical charges on my {pay} statement for #{order}.",
        "Checkout rejects my {pay} even though it has money on it.",
        "I was billed more than the listed price for the {item}.",
    ],
}


OPENERS = ["", "", "", "Hi. ", "Hello, ", "Hey there. ", "Good morning. ", "Excuse me, "]
CLOSERS = ["", "", "", " Thanks.", " Please help.", " Thank you in advance.", " Any ideas?", " This is urgent."]


def fill(template: str, rng: random.Random) -> tuple[str, str]:
    """Fill the slots of one template; return (message, order number or 'none')."""
    order = str(rng.randint(10000, 99999)) if "{order}" in template else "none"
    values = {k: rng.choice(v) for k, v in SLOTS.items()}
    text = template.format(order=order, **values)
    opener = rng.choice(OPENERS)
    text = opener + (text[0].lower() + text[1:] if opener.endswith(", ") and not text.startswith("I") else text)
    text = text[0].upper() + text[1:] + rng.choice(CLOSERS)
    return text, order


def generate(templates: list[str], n: int, rng: random.Random, taken: set[str]) -> list[tuple[str, str]]:
    """n distinct messages, cycling over the templates so that each one is used about equally."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 10000:
            raise RuntimeError("not enough distinct messages; add templates or slot values")
        msg, order = fill(templates[tries % len(templates)], rng)
        if msg not in taken:
            taken.add(msg)
            out.append((msg, order))
    return out


def main() -> None:
    rng = random.Random(SEED)
    taken: set[str] = set()
    train, evals = [], []
    for intent in INTENTS:
        tpl = TEMPLATES[intent]
        for split, templates, n in [(train, tpl[:-N_EVAL_TEMPLATES], N_TRAIN_PER_INTENT),
                                    (evals, tpl[-N_EVAL_TEMPLATES:], N_EVAL_PER_INTENT)]:
            for msg, order in generate(templates, n, rng, taken):
                split.append({"instruction": INSTRUCTION, "input": msg, "output": f"intent: {intent} | order: {order}"})
    rng.shuffle(train)
    rng.shuffle(evals)
    assert not {e["input"] for e in train} & {e["input"] for e in evals}
    for name, rows in [("train.json", train), ("eval.json", evals)]:
        (HERE / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
