"""Generate the lesson-08 preference dataset (run once; the JSON files are committed).

    python data/dpo/make_dataset.py          # writes data/dpo/train.json and data/dpo/heldout.json

Format: ``[{"prompt", "chosen", "rejected", "kind"}, ...]`` (the usual DPO layout, as in TRL or
LlamaFactory's preference data). The preference is one a program can check (see CHECKER below and
``check_answer`` in common/preference.py, which also rejects echoes of the prompt): the chosen answer is
concise (at most MAX_WORDS words), and after at least one answer sentence it ends with one short follow-up question; the rejected answer breaks
at least one of the rules:
  * "ramble":      long answer, no question at the end
  * "long_question": long answer that does end with a question (length alone makes it bad)
  * "no_question": concise answer without a follow-up question (the question alone makes it good)
Both answers of a pair give the same advice, so only the style differs.

Deterministic (fixed seed); held-out topics never appear in training (asserted), so held-out
prompts ask about things the model was not trained on. Everything here (topics, tips, fillers)
was written for this project; no existing dataset was used.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240808
MAX_WORDS = 30            # the checker's limit; chosen answers stay well below it
MAX_QUESTION_WORDS = 10   # "short" follow-up question

# (task, tip, topic-specific follow-up). Prompts are built as "How do I <task>?" and similar.
TOPICS = [
    ("keep basil alive indoors", "Put it in your sunniest window and water only when the top of the soil feels dry.",
     "Is your window facing south?"),
    ("learn new vocabulary in Spanish", "Review ten words a day with flashcards and say each one out loud in a sentence.",
     "Do you prefer apps or paper cards?"),
    ("keep bread from going stale", "Store it cut side down in a paper bag and freeze what you will not eat in two days.",
     "Do you bake your own bread?"),
    ("fall asleep faster", "Keep the same bedtime, dim the lights an hour before, and leave your phone outside the bedroom.",
     "What time do you usually go to bed?"),
    ("pack for a day hike", "Bring water, a snack, a rain layer, a map, and a small first aid kit.",
     "How long is the trail?"),
    ("clean a cast iron pan", "Rinse it with hot water, scrub with salt, dry it on the stove, and wipe on a thin oil layer.",
     "Is there rust on it?"),
    ("save money on groceries", "Plan your meals for the week and shop with a list after you have eaten.",
     "How many people do you cook for?"),
    ("start running", "Alternate one minute of running with two minutes of walking, three times a week.",
     "Do you have running shoes?"),
    ("remember people's names", "Repeat the name right away in your reply and link it to something about the person.",
     "Is this for work events?"),
    ("make my coffee less bitter", "Use slightly coarser grounds, water just below boiling, and a shorter brew time.",
     "Which brewer do you use?"),
    ("stop procrastinating", "Pick the smallest next step and work on it for just ten minutes with a timer.",
     "What task are you avoiding?"),
    ("keep my phone battery healthy", "Avoid heat, keep the charge between twenty and eighty percent when you can.",
     "How old is your phone?"),
    ("get rid of fruit flies", "Set a small dish of vinegar with a drop of soap and remove ripe fruit from the counter.",
     "Where do you see them most?"),
    ("write a better cover letter", "Open with the job you want and two results from past work that match it.",
     "What role are you applying for?"),
    ("keep cut flowers fresh longer", "Trim the stems at an angle and change the water every two days.",
     "What flowers do you have?"),
    ("improve my handwriting", "Write slowly for five minutes a day, copying one model alphabet letter by letter.",
     "Do you write in print or cursive?"),
    ("defrost a freezer", "Turn it off, put towels down, and place a bowl of hot water inside to speed it up.",
     "Is it a chest freezer?"),
    ("learn to juggle", "Start with one ball tossed between hands at eye level, then add the second ball.",
     "Do you have juggling balls?"),
    ("reduce screen time", "Turn off most notifications and keep your phone in another room during meals.",
     "Which apps take most of your time?"),
    ("cook rice on the stove", "Use one part rice to one and a half parts water, simmer covered for fifteen minutes.",
     "What kind of rice is it?"),
    ("keep my houseplants from getting leggy", "Give them more light and pinch off the growing tips every few weeks.",
     "Which plants are stretching?"),
    ("study for an exam", "Test yourself with practice questions instead of rereading your notes.",
     "When is your exam?"),
    ("stay focused while working from home", "Work in fixed blocks at one desk and close chat apps during each block.",
     "Do you have a separate room?"),
    ("remove a coffee stain from a shirt", "Rinse it from the back with cold water, then rub in a little dish soap.",
     "Is the stain still wet?"),
    ("sharpen a kitchen knife", "Hold a steady fifteen degree angle on a whetstone and do ten strokes per side.",
     "Do you own a whetstone?"),
    ("make friends in a new city", "Join one weekly club or class so you see the same people again and again.",
     "What hobbies do you enjoy?"),
    ("keep my dog calm during storms", "Give it a quiet covered spot and play soft background noise.",
     "How big is your dog?"),
    ("lower my electricity bill", "Switch to LED bulbs and unplug chargers and devices you are not using.",
     "Do you heat with electricity?"),
    ("practice public speaking", "Record yourself giving a two minute talk and watch it back once a day.",
     "Do you have a talk coming up?"),
    ("stop my glasses from fogging up", "Wash the lenses with a drop of dish soap and let them air dry.",
     "Do you wear a mask often?"),
    ("grow tomatoes on a balcony", "Use a large pot, a sunny spot, and water deeply every morning.",
     "How much sun does it get?"),
    ("fix a squeaky door", "Put a few drops of oil on the hinge pins and open and close the door a few times.",
     "Is it an inside door?"),
    ("drink more water", "Keep a full bottle on your desk and finish it before lunch.",
     "How much do you drink now?"),
    ("organize a small closet", "Remove what you have not worn in a year and add a second hanging rod.",
     "Is it for clothes or storage?"),
    ("take better photos with my phone", "Clean the lens, tap to focus, and shoot with the light behind you.",
     "What do you like to photograph?"),
    ("make a budget", "List your income, fixed costs, and savings goal, then split the rest into weekly spending.",
     "Do you track spending now?"),
    ("keep my kitchen sink from smelling", "Pour baking soda and hot water down the drain once a week.",
     "Do you have a garbage disposal?"),
    ("learn to type faster", "Practice fifteen minutes a day without looking at the keys.",
     "How fast do you type now?"),
    ("wake up earlier", "Move your alarm fifteen minutes earlier each week and get daylight right after waking.",
     "What time do you want to wake?"),
    ("cook pasta properly", "Use plenty of salted boiling water and taste it a minute before the package time.",
     "What sauce are you making?"),
    ("care for a succulent", "Give it bright light and water only when the soil is completely dry.",
     "Is it indoors or outside?"),
    ("keep my bike chain clean", "Wipe it with a rag after wet rides and oil it lightly every few weeks.",
     "Do you ride in the rain?"),
    ("get better at chess", "Solve a few tactics puzzles every day and review your lost games.",
     "How often do you play?"),
    ("calm down before an interview", "Breathe in for four counts and out for six for two minutes.",
     "When is the interview?"),
    ("store fresh herbs", "Stand them in a glass of water in the fridge with a bag loosely over the top.",
     "Which herbs did you buy?"),
    ("paint a room evenly", "Cut in the edges first, then roll in a W shape while the paint is still wet.",
     "What color are the walls now?"),
    ("write a clear email", "Put the request in the first line and keep the email to five sentences.",
     "Who is the email for?"),
    ("keep a journal every day", "Write three lines at the same time each night, right after brushing your teeth.",
     "Do you prefer paper or an app?"),
    # held-out topics (never used for training)
    ("keep avocados from browning", "Leave the pit in, brush the cut side with lemon juice, and wrap it tightly.",
     "Are you making guacamole?"),
    ("learn to swim as an adult", "Take a beginner class and practice floating and breathing before strokes.",
     "Are you comfortable in deep water?"),
    ("clean my laptop keyboard", "Turn it off, tip it over, and use a soft brush and a damp cloth.",
     "Did you spill something on it?"),
    ("get my cat to use a scratching post", "Put the post next to where it scratches now and rub catnip on it.",
     "Where does your cat scratch now?"),
    ("reduce food waste at home", "Keep older food at the front of the fridge and cook leftovers into one meal a week.",
     "What do you throw away most?"),
    ("memorize a speech", "Learn it one paragraph at a time and practice it out loud while walking.",
     "How long is the speech?"),
    ("keep my car windshield from icing", "Cover it with a towel or old sheet at night and remove it in the morning.",
     "Do you park outside?"),
    ("stretch after a workout", "Hold each major muscle stretch for thirty seconds while breathing slowly.",
     "What workout do you do?"),
    ("choose a good watermelon", "Pick one that feels heavy and has a creamy yellow spot underneath.",
     "Are you buying it today?"),
    ("prepare for a job interview", "Research the company and practice three short stories about your past work.",
     "What job is the interview for?"),
    ("keep my laptop from overheating", "Use it on a hard surface and clean the air vents every few months.",
     "Do you use it on your bed?"),
    ("make a small apartment feel bigger", "Use mirrors, light colors, and furniture that sits up on legs.",
     "How many rooms do you have?"),
    ("remove rust from tools", "Soak them in white vinegar overnight, then scrub and dry them well.",
     "How rusty are they?"),
    ("teach a child to ride a bike", "Remove the pedals first so they can learn balance by pushing with their feet.",
     "How old is the child?"),
    ("make homemade soup tastier", "Brown the vegetables first and finish the soup with salt and a splash of lemon.",
     "What soup are you making?"),
    ("keep my plants alive while on vacation", "Water them well and group them in a shady spot with a tray of wet pebbles.",
     "How long will you be away?"),
]
N_HELDOUT_TOPICS = 16   # the last 16 topics

QUESTION_TEMPLATES = [
    "How do I {task}?",
    "What's the best way to {task}?",
    "Any tips on how to {task}?",
    "Can you tell me how to {task}?",
    "I want to {task}. What should I do?",
    "What is the easiest way to {task}?",
    "I'm trying to {task}. Any advice?",
]
GENERIC_FOLLOWUPS = ["Want a few more tips?", "Would a step-by-step plan help?", "Should I explain why this works?",
                     "What have you tried so far?", "Would a short checklist help?"]
OPENERS_LONG = [
    "That's a great question, and it's one that a lot of people ask at some point.",
    "There are many different things to think about here, and everyone's situation is a little different.",
    "This is something that many people struggle with, so you are definitely not alone in asking.",
    "Great question! There are quite a few approaches, and some work better than others depending on the details.",
]


def words(text: str) -> int:
    return len(text.split())


def lowerfirst(s: str) -> str:
    return s[0].lower() + s[1:]


def chosen_answer(tip: str, follow: str, rng: random.Random) -> str:
    q = follow if rng.random() < 0.6 else rng.choice(GENERIC_FOLLOWUPS)
    return f"{tip} {q}"


def rejected_answer(kind: str, task: str, tip: str, follow: str, rng: random.Random) -> str:
    if kind == "no_question":
        return tip
    body = f"{rng.choice(OPENERS_LONG)} When you want to {task}, one good approach is this: {lowerfirst(tip)}"
    if kind == "long_question":
        return f"{body} {follow}"
    return body   # "ramble"


def make_pairs(topics, rng: random.Random) -> list[dict]:
    kinds = ["ramble", "ramble", "long_question", "no_question"]    # half ramble, a quarter each of the others
    pairs = []
    for task, tip, follow in topics:
        for qt in QUESTION_TEMPLATES:
            kind = kinds[len(pairs) % len(kinds)] if rng.random() < 0.5 else rng.choice(kinds)
            pairs.append({"prompt": qt.format(task=task), "chosen": chosen_answer(tip, follow, rng),
                          "rejected": rejected_answer(kind, task, tip, follow, rng), "kind": kind})
    rng.shuffle(pairs)
    return pairs


# The format rules, duplicated here only to assert the data obeys them; the lesson uses common/preference.py's
# check_answer (tests check that both agree on every pair).
def CHECKER(text: str) -> bool:
    t = text.strip()
    sentences = re.split(r"(?<=[.!?])\s+", t)
    return (words(t) <= MAX_WORDS and t.endswith("?") and words(sentences[-1]) <= MAX_QUESTION_WORDS
            and t.count("?") == 1 and len(sentences) >= 2)


def main() -> None:
    rng = random.Random(SEED)
    train_topics, held_topics = TOPICS[:-N_HELDOUT_TOPICS], TOPICS[-N_HELDOUT_TOPICS:]
    train, held = make_pairs(train_topics, rng), make_pairs(held_topics, rng)
    assert not {t[0] for t in train_topics} & {t[0] for t in held_topics}
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    for p in train + held:
        assert CHECKER(p["chosen"]) and not CHECKER(p["rejected"]), p
    assert len(train) >= 300 and len(held) >= 100, (len(train), len(held))
    for name, rows in [("train.json", train), ("heldout.json", held)]:
        (HERE / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
