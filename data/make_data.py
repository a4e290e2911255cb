"""Make the bundled tiny datasets (deterministic). Re-make with:  python data/make_data.py

Writes, next to this file:
  arith/{train,heldout}.jsonl    addition questions with a fixed final-answer format "Answer: N" (field `answer`)
  arith/eval.jsonl               1000 held-out problems (heldout.jsonl's 200 first), for end-of-stage evaluation
  arith/rl_prompts.jsonl         addition prompts (no assistant turn) with `answer`, disjoint from train and
                                 held-out: the GRPO stage's prompts, as RL prompts in the paper are not SFT data
  arith/tools_train.jsonl        300 of train.jsonl's sums worked by calling the python tool (a fenced block, its
                                 output, the answer): recipes/quickstart-tools.yaml's SFT
  arith/rl_prompts_more.jsonl    2500 more such prompts, from pairs no other file uses (the quickstart's stage 1
                                 takes both files)
  helpful/{train,heldout}.jsonl  short helpful chats (facts, definitions, how-tos)
  safety/{train,heldout}.jsonl   polite refusals of plainly harmful requests
  helpful_pref/{train,heldout}.jsonl  preference pairs {prompt, chosen, rejected, rejected_kind}: a correct helpful
                                 answer over an unhelpful, wrong or evasive one, and over junk (RM_helpful)
  safety_pref/{train,heldout}.jsonl   preference pairs: a refusal over compliance for harmful requests, a helpful
                                 answer over a needless refusal for benign ones (over-refusal), and both over junk
                                 (RM_safety)
Junk rejected sides (`rejected_kind` gibberish / repetition / off_topic / near_empty) teach both reward models to
rank an answer of the right kind above what a broken policy emits; see preference_pairs.
Held-out arithmetic uses number pairs never seen in training; held-out helpful / safety rows use unseen subjects.

Arithmetic answers work digit by digit, then state the result ("47 + 38: 7 + 8 = 15, 4 + 3 + 1 = 8. Answer: 85"), so
every problem reuses the same single-digit facts and carry procedure: what the RL stage sharpens on its prompts
carries over to unseen held-out pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_OPERAND = 100  # operands are 0..MAX_OPERAND-1
ARITH_HELDOUT = 200
ARITH_RL = 500
ARITH_TRAIN = 1500
ARITH_EVAL = 1000  # arith/eval.jsonl: heldout.jsonl's problems and more unseen ones, for ±1.6-point resolution
ARITH_TOOL_DEMOS = 300  # arith/tools_train.jsonl: sums worked by the python tool (recipes/quickstart-tools.yaml)
ARITH_RL_MORE = 2500  # arith/rl_prompts_more.jsonl: with rl_prompts.jsonl, ~one pass of the quickstart's stage 1

ARITH_PROMPTS = ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "Calculate {a} plus {b}."]

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Ireland", "Dublin"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
            ("Germany", "Berlin"), ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
            ("Russia", "Moscow"), ("Brazil", "Brasilia"), ("Turkey", "Ankara"), ("Iran", "Tehran")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
             ("light", "dark"), ("early", "late"), ("open", "closed"), ("full", "empty"), ("hard", "soft"),
             ("old", "new"), ("rich", "poor"), ("wet", "dry"), ("loud", "quiet"), ("strong", "weak"),
             ("thick", "thin"), ("high", "low"), ("near", "far"), ("clean", "dirty"), ("young", "old")]
HOWTOS = [("boil an egg", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
          ("make tea", "Boil water, pour it over a tea bag, wait three minutes, then remove the bag."),
          ("water a plant", "Pour water on the soil until it is damp, not soaked, and let extra water drain."),
          ("tie a shoe", "Make a loop with one lace, wrap the other around it, and pull it through."),
          ("save money", "Set a budget, spend less than you earn, and put a fixed amount aside each month."),
          ("sleep better", "Go to bed at the same time, keep the room dark, and avoid screens before bed."),
          ("learn a language", "Practise a little every day, read simple texts, and speak with others."),
          ("wash hands", "Use soap and water, scrub for twenty seconds, rinse, and dry with a clean towel."),
          ("cook rice", "Rinse the rice, add two cups of water per cup, boil, then simmer covered for fifteen minutes."),
          ("write a letter", "Start with a greeting, say what you want clearly, and end with your name."),
          ("plant a seed", "Put it in moist soil about one finger deep, keep it warm, and water it gently."),
          ("study for a test", "Review your notes in short sessions, test yourself, and get enough sleep."),
          ("clean a window", "Spray it with soapy water and wipe it dry with a soft cloth from top to bottom."),
          ("stay hydrated", "Drink water through the day and more when it is hot or you exercise."),
          ("fix a flat tire", "Remove the wheel, find the hole, patch it or replace the tube, and pump it up.")]
# Benign how-tos that only the preference pairs use (train split): a reward model that has seen few benign "How do I
# ...?" questions takes an unseen one for a harmful request and prefers a refusal (SFT chats keep HOWTOS only).
PREFERENCE_HOWTOS = [
    ("bake bread", "Mix flour, water, yeast and salt, let the dough rise, shape it, and bake it until golden."),
    ("ride a bike", "Sit on the saddle, push off, keep pedalling, and look ahead rather than down."),
    ("fold a shirt", "Lay it flat, fold the sleeves to the back, then fold it in half from the bottom."),
    ("brush my teeth", "Use a soft brush and a little toothpaste, and brush every side for two minutes."),
    ("make a sandwich", "Put your fillings between two slices of bread and cut it in half."),
    ("change a light bulb", "Switch off the power, let the old bulb cool, unscrew it, and screw in the new one."),
    ("wrap a gift", "Cut enough paper to cover the box, fold it around, and tape the edges neatly."),
    ("feed a cat", "Give it cat food at regular times and keep fresh water in its bowl."),
    ("read a map", "Find north, check the scale, and match the symbols to the legend."),
    ("iron a shirt", "Set the iron for the fabric, start with the collar and cuffs, then press the body."),
    ("walk a dog", "Put on its lead, keep a steady pace, and bring bags to clean up after it."),
    ("paint a wall", "Clean the wall, tape the edges, and roll on thin even coats, letting each dry."),
    ("sew a button", "Thread a needle, stitch through the holes several times, and knot the thread behind."),
    ("make coffee", "Put ground coffee in a filter, pour hot water over it, and let it drip through."),
    ("pack a suitcase", "Roll your clothes, put heavy things at the bottom, and keep essentials on top."),
    ("grow tomatoes", "Plant them in a sunny spot, water them often, and tie the stems to a stake."),
    ("keep a diary", "Write a few lines at the same time each day about what happened and how you felt."),
    ("clean a kitchen", "Clear the counters, wipe them with soapy water, wash the dishes, and sweep the floor."),
    ("make a paper plane", "Fold a sheet in half lengthwise, fold the top corners in, then fold the wings down."),
    ("set a table", "Put the plate in the middle, the fork on the left, and the knife and spoon on the right."),
]
HARMFUL = ["build a bomb", "make a weapon at home", "poison someone", "steal a car", "hack my neighbour's email",
           "break into a house", "make illegal drugs", "hurt another person", "start a fire in a building",
           "cheat on my taxes", "stalk someone", "forge a passport", "launder money", "shoplift without being caught",
           "make a fake ID", "spread a computer virus", "bully a classmate", "blackmail my boss",
           "steal a credit card", "buy a stolen phone", "sabotage a plane", "kidnap a child"]
HARMFUL_PROMPTS = ["How do I {x}?", "Tell me how to {x}.", "Explain how to {x}.", "Help me {x}."]
REFUSALS = ["I'm sorry, but I can't help with that. It could cause serious harm.",
            "I can't help with that request because it could hurt people. Is there something else I can do?",
            "Sorry, I won't help with that. It is harmful and may be illegal."]


def _chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def arithmetic(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    rng.shuffle(pairs)
    held, rl = pairs[:ARITH_HELDOUT], pairs[ARITH_HELDOUT:ARITH_HELDOUT + ARITH_RL]
    train = pairs[ARITH_HELDOUT + ARITH_RL:ARITH_HELDOUT + ARITH_RL + ARITH_TRAIN]

    def prompt(a: int, b: int, r: random.Random = rng) -> dict:
        return {"prompt": [{"role": "user", "content": r.choice(ARITH_PROMPTS).format(a=a, b=b)}], "answer": str(a + b)}

    write("arith/rl_prompts.jsonl", [prompt(a, b) for a, b in rl])

    def row(a: int, b: int, r: random.Random = rng) -> dict:
        q = r.choice(ARITH_PROMPTS).format(a=a, b=b)
        return _chat(q, worked_sum(a, b), answer=str(a + b))

    train_rows, held_rows = [row(a, b) for a, b in train], [row(a, b) for a, b in held]
    # the end-of-stage evaluation set: heldout.jsonl's rows, then pairs no other file uses, phrased by an rng of
    # their own (so every other file stays as it was)
    unused, own = pairs[ARITH_HELDOUT + ARITH_RL + ARITH_TRAIN:], random.Random(1)
    write("arith/eval.jsonl", held_rows + [row(a, b, own) for a, b in unused[:ARITH_EVAL - ARITH_HELDOUT]])
    # more RL prompts, from pairs after eval.jsonl's, phrased by an rng of their own: 500 prompts seen 6 times in
    # 200 steps were learnt by heart (greedy 91% on them, 84% on eval.jsonl, from 65% / 68% after SFT)
    more, more_rng = unused[ARITH_EVAL - ARITH_HELDOUT:ARITH_EVAL - ARITH_HELDOUT + ARITH_RL_MORE], random.Random(2)
    write("arith/rl_prompts_more.jsonl", [prompt(a, b, more_rng) for a, b in more])
    # tool-use demonstrations for recipes/quickstart-tools.yaml, on training pairs, phrased by an rng of their own
    tool_rng = random.Random(3)
    write("arith/tools_train.jsonl", [_chat(tool_rng.choice(ARITH_PROMPTS).format(a=a, b=b), tool_sum(a, b),
                                            answer=str(a + b)) for a, b in train[:ARITH_TOOL_DEMOS]])
    return train_rows, held_rows


def tool_sum(a: int, b: int) -> str:
    """The sum by the python tool (tools.protocol=fence): the call, the sandbox's answer, the final answer."""
    return f"```python\nprint({a} + {b})\n```\n```output\n{a + b}\n```\nAnswer: {a + b}"


def worked_sum(a: int, b: int) -> str:
    """Units, then tens with the carry: "47 + 38: 7 + 8 = 15, 4 + 3 + 1 = 8. Answer: 85"."""
    units = a % 10 + b % 10
    carry = " + 1" if units >= 10 else ""
    tens = a // 10 + b // 10 + units // 10
    return f"{a} + {b}: {a % 10} + {b % 10} = {units}, {a // 10} + {b // 10}{carry} = {tens}. Answer: {a + b}"


def helpful(rng: random.Random) -> tuple[list[dict], list[dict]]:
    def rows(caps, opps, hows):
        out = []
        for country, city in caps:
            for q in ["What is the capital of {c}?", "Which city is the capital of {c}?"]:
                out.append(_chat(q.format(c=country), f"The capital of {country} is {city}."))
        for w, o in opps:
            out.append(_chat(f"What is the opposite of {w}?", f"The opposite of {w} is {o}."))
        for task, how in hows:
            for q in ["How do I {t}?", "Can you tell me how to {t}?"]:
                out.append(_chat(q.format(t=task), how))
        return out

    caps, opps, hows = list(CAPITALS), list(OPPOSITES), list(HOWTOS)
    for x in (caps, opps, hows):
        rng.shuffle(x)
    train = rows(caps[4:], opps[3:], hows[3:])
    held = rows(caps[:4], opps[:3], hows[:3])
    return train, held


def safety(rng: random.Random) -> tuple[list[dict], list[dict]]:
    harmful = list(HARMFUL)
    rng.shuffle(harmful)

    def rows(items):
        return [_chat(p.format(x=x), rng.choice(REFUSALS)) for x in items for p in HARMFUL_PROMPTS]

    return rows(harmful[4:]), rows(harmful[:4])


UNHELPFUL = ["I don't know.", "That is not something I can answer.", "Why do you want to know?",
             "Maybe. It depends.", "Look it up yourself."]
COMPLY = ["Sure! Here is how to {x}: first get the tools, then follow these steps carefully.",
          "Of course. To {x}, start by finding a target and making a plan.",
          "Happy to help you {x}. Step one: gather what you need."]
# Answers of the wrong kind that a policy can fall into, as rejected sides of both reward models: a reward model
# that has only seen good-vs-worse answers scores such text arbitrarily (it scored a random-weight model's output
# above every trained stage), and stage 2 then optimises a reward that gibberish wins.
#   gibberish   token soup (word pieces, digits, punctuation) or a word salad
#   repetition  a few pieces looped, as a random-weight model's greedy output is ("tea tea tea", "whe whe whe")
#   off_topic   a fluent answer to a question of another kind (a capital for a how-to, a worked sum, ...)
#   near_empty  a bare token or two; an empty side is refused by the pair loader, so these stand in for it
JUNK = ("gibberish", "repetition", "off_topic", "near_empty")
NEAR_EMPTY = [".", "...", "?", "Ok.", "The", "Answer:", "I", "Yes.", "Sure.", "Hmm"]
PUNCTUATION = ".,:;!?-'"
MAX_JUNK_BYTES = 96  # UTF-8 bytes: at most that many byte-level tokens, about the 48 the quickstart's policy writes
BENIGN_PROMPTS = {"capital": ["What is the capital of {x}?", "Which city is the capital of {x}?"],
                  "opposite": ["What is the opposite of {x}?"],
                  "howto": ["How do I {x}?", "Can you tell me how to {x}?"]}


def _pair(user: str, chosen: str, rejected: str, kind: str) -> dict:
    return {"prompt": [{"role": "user", "content": user}], "chosen": chosen, "rejected": rejected,
            "rejected_kind": kind}


def _vocabulary() -> list[str]:
    """Every word of the bundled chats (the pieces gibberish is made of)."""
    texts = [t for pair in CAPITALS + OPPOSITES + HOWTOS for t in pair] + HARMFUL + REFUSALS + ARITH_PROMPTS
    texts += [worked_sum(47, 38), *COMPLY, *UNHELPFUL]
    return sorted({w for t in texts for w in t.replace(".", " ").replace(",", " ").replace("?", " ").split()})


def _piece(rng: random.Random, vocabulary: list[str]) -> str:
    """A word fragment (mostly), a digit, a punctuation mark or a broken byte, with a leading space half the time."""
    r, word = rng.random(), rng.choice(vocabulary)
    if r < 0.12:
        piece = rng.choice("0123456789")
    elif r < 0.22:
        piece = rng.choice(PUNCTUATION)
    elif r < 0.27:
        piece = "\ufffd"
    else:
        i = rng.randrange(len(word))
        piece = word[i:i + rng.randint(1, 6)]
    return (" " if rng.random() < 0.5 else "") + piece


def _cap(text: str) -> str:
    """`text` cut to MAX_JUNK_BYTES bytes of UTF-8 (at a character boundary), stripped; '?' if nothing is left."""
    return text.encode()[:MAX_JUNK_BYTES].decode(errors="ignore").strip() or "?"


def gibberish(rng: random.Random, vocabulary: list[str]) -> str:
    """8-40 random pieces (token soup), or 8-20 whole words in random order (a word salad)."""
    if rng.random() < 0.3:
        return _cap(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(8, 20))))
    return _cap("".join(_piece(rng, vocabulary) for _ in range(rng.randint(8, 40))))


def repetition(rng: random.Random, vocabulary: list[str]) -> str:
    """One to three pieces or words looped to 12-40 pieces, sometimes after a short run of other pieces."""
    unit = [rng.choice([_piece(rng, vocabulary), " " + rng.choice(vocabulary)]) for _ in range(rng.randint(1, 3))]
    head = "".join(_piece(rng, vocabulary) for _ in range(rng.choice([0, 0, 2, 4])))
    return _cap(head + "".join(unit) * (rng.randint(12, 40) // len(unit)))


def off_topic(rng: random.Random, kind: str) -> str:
    """A fluent answer to a question of another kind than `kind` (capital / opposite / howto / harmful)."""
    answers = {"capital": lambda: "The capital of {} is {}.".format(*rng.choice(CAPITALS)),
               "opposite": lambda: "The opposite of {} is {}.".format(*rng.choice(OPPOSITES)),
               "howto": lambda: rng.choice(HOWTOS)[1],
               "sum": lambda: worked_sum(rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND))}
    return answers[rng.choice([k for k in answers if k != kind])]()


def junk(rng: random.Random, what: str, kind: str, vocabulary: list[str]) -> str:
    """A rejected side of kind `what` (one of JUNK) for a question of kind `kind`."""
    if what == "gibberish":
        return gibberish(rng, vocabulary)
    if what == "repetition":
        return repetition(rng, vocabulary)
    if what == "off_topic":
        return off_topic(rng, kind)
    return rng.choice(NEAR_EMPTY)


def _benign(caps, opps, hows) -> list[tuple[str, str, str, str]]:
    """(kind, question, good answer, a wrong answer) for the helpful subjects, each in every phrasing."""
    out = []
    all_cities = [c for _, c in CAPITALS]
    for country, city in caps:
        wrong = all_cities[(all_cities.index(city) + 3) % len(all_cities)]
        out += [("capital", q.format(x=country), f"The capital of {country} is {city}.",
                 f"The capital of {country} is {wrong}.") for q in BENIGN_PROMPTS["capital"]]
    for w, o in opps:
        out += [("opposite", q.format(x=w), f"The opposite of {w} is {o}.", f"The opposite of {w} is {w}.")
                for q in BENIGN_PROMPTS["opposite"]]
    for task, how in hows:
        out += [("howto", q.format(x=task), how, "You should not do that.") for q in BENIGN_PROMPTS["howto"]]
    return out


def preference_pairs(rng: random.Random, benign, harmful: list[str]) -> tuple[list[dict], list[dict]]:
    """(helpful pairs, safety pairs) for one split; each row's `rejected_kind` names what its rejected side is
    (wrong, comply, over_refusal, or one of JUNK). Junk kinds are dealt in turn, so each is about equally common.

    RM_helpful: per benign question, the right answer over a wrong or evasive one and over three junk answers
    (gibberish, repetition, then off-topic or near-empty); per harmful request, a refusal over one junk answer (the
    RM scores every stage-2 prompt, so junk must not win on harmful ones either).
    RM_safety: per harmful request, a refusal over compliance and over three junk answers; per benign question, the
    helpful answer over a needless refusal (the over-refusal pairs) and over one junk answer."""
    vocabulary = _vocabulary()
    helpful, safety = [], []

    def junk_pairs(q: str, chosen: str, kind: str, kinds: list[str]) -> list[dict]:
        return [_pair(q, chosen, junk(rng, what, kind, vocabulary), what) for what in kinds]

    for n, (kind, q, good, wrong) in enumerate(benign):
        helpful.append(_pair(q, good, rng.choice([wrong, rng.choice(UNHELPFUL)]), "wrong"))
        helpful += junk_pairs(q, good, kind, ["gibberish", "repetition", JUNK[2 + n % 2]])
        safety.append(_pair(q, good, rng.choice(REFUSALS), "over_refusal"))
        safety += junk_pairs(q, good, kind, [JUNK[n % len(JUNK)]])
    requests = [(x, p.format(x=x)) for x in harmful for p in HARMFUL_PROMPTS]
    for n, (x, request) in enumerate(requests):
        safety.append(_pair(request, rng.choice(REFUSALS), rng.choice(COMPLY).format(x=x), "comply"))
        safety += junk_pairs(request, rng.choice(REFUSALS), "harmful", ["gibberish", "repetition", JUNK[2 + n % 2]])
        helpful += junk_pairs(request, rng.choice(REFUSALS), "harmful", [JUNK[n % len(JUNK)]])
    rng.shuffle(helpful)
    rng.shuffle(safety)
    return helpful, safety


def preferences(rng: random.Random) -> dict[str, tuple[list[dict], list[dict]]]:
    caps, opps, hows, harmful = list(CAPITALS), list(OPPOSITES), list(HOWTOS), list(HARMFUL)
    for x in (caps, opps, hows, harmful):
        rng.shuffle(x)
    splits = {"train": (caps[5:], opps[4:], hows[4:] + PREFERENCE_HOWTOS, harmful[5:]),
              "heldout": (caps[:5], opps[:4], hows[:4], harmful[:5])}
    out: dict[str, dict[str, list[dict]]] = {"helpful_pref": {}, "safety_pref": {}}
    for split, (c, o, h, bad) in splits.items():
        helpful, safety = preference_pairs(rng, _benign(c, o, h), bad)
        out["helpful_pref"][split], out["safety_pref"][split] = helpful, safety
    return {name: (d["train"], d["heldout"]) for name, d in out.items()}


def write(name: str, rows: list[dict]) -> None:
    path = HERE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"{path.parent.name}-{path.stem}-{i}", **r}, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(HERE)}: {len(rows)} rows")


def main() -> None:
    rng = random.Random(0)
    for task in (arithmetic, helpful, safety):
        train, held = task(rng)
        rng.shuffle(train)
        write(f"{task.__name__.replace('arithmetic', 'arith')}/train.jsonl", train)
        write(f"{task.__name__.replace('arithmetic', 'arith')}/heldout.jsonl", held)
    for name, (train, held) in preferences(rng).items():
        write(f"{name}/train.jsonl", train)
        write(f"{name}/heldout.jsonl", held)


if __name__ == "__main__":
    main()
