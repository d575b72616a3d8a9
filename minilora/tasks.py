"""Procedural instruction tasks and the pretraining corpus, all deterministic from a seed.

Every task draws from one small world: two dozen people, a handful of objects and places, a
made-up bestiary, a calendar and a toy language. The whole world fits in a few hundred distinct
words, so a 2048-entry BPE covers it compactly and a ~1M-parameter model can learn it.

Two kinds of text come out of the same world:

- ``data/corpus/pretrain.txt``: plain prose, one document per line. It states the facts of the
  bestiary, tells short stories with quantities and their totals, spells numbers as words, writes
  dates in several formats, walks through small programs and gives toy-language sentences next to
  their English. It never uses the instruction format, so a base pretrained on it knows the world
  but not the tasks.
- ``data/tasks/<task>/{train,validation,test}.jsonl``: Alpaca-style ``{"instruction", "input",
  "output"}`` examples. Fine-tuning teaches the format and the mapping.

=============  =========================================================  ======================
task           example input -> output                                    train / valid / test
=============  =========================================================  ======================
arithmetic     "Mia has 23 shells. She finds 15 more shells. How many      2000 / 200 / 200
               shells does Mia have now?" -> "38"
facts          "Where does the blorf live?\\nA. cave\\nB. marsh\\n..." -> "marsh"  2000 / 200 / 200
expressions    "x = 3; y = x + 4; print(y * 2)" -> "14"                    2000 / 200 / 200
reading        "Leo bought a red kite at the market. Ada met ...\\nQuestion:  2000 / 200 / 200
               What did Leo buy?" -> "a red kite"
num2words      "342" -> "three hundred forty-two"                         599 / 200 / 200
dates          "2021-03-07" -> "7 March 2021" (any pair of four formats)  2000 / 200 / 200
translate      "the big cat sees the dog" -> "miro gra tabu ko vani"       2000 / 200 / 200
=============  =========================================================  ======================

num2words has only 999 distinct inputs, so its train split holds the 599 numbers left after
validation and test take theirs.

Splits never share an input. The corpus comes from a different random stream and additionally
skips every world record (a story's numbers, a program, a passage, a date, a sentence) that a
validation or test example was built from, so test answers cannot be memorised verbatim. The
bestiary and the number words are shared on purpose: they are the knowledge pretraining supplies.

Regenerate everything with ``python -m minilora.tasks``; the files come out byte-identical.
"""

from __future__ import annotations

import difflib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

SEED = 1234
CORPUS_SEED = 98765  # a separate stream, so corpus text and task splits do not coincide
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
FIELDS = ("instruction", "input", "output")


def data_dir() -> Path:
    """The data/ folder next to the package, or $MINILORA_DATA when set."""
    override = os.environ.get("MINILORA_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "data"


# ----------------------------------------------------------------------------------------------
# The world

SHE = ["Anna", "Cara", "Eva", "Gita", "Iris", "Kira", "Lily", "Mia", "Nora", "Pia", "Rosa", "Zoe"]
HE = ["Ben", "Dan", "Finn", "Hugo", "Jack", "Leo", "Max", "Noah", "Omar", "Ravi", "Sam", "Tom"]
PEOPLE = SHE + HE
OBJECTS = ["apples", "pears", "plums", "books", "coins", "shells", "stamps", "marbles",
           "cards", "pens", "eggs", "stones", "cups", "beads"]
PLACES = ["the market", "the library", "the park", "the school", "the station", "the harbor",
          "the farm", "the museum", "the bakery", "the garden"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ITEMS = ["kite", "ball", "box", "map", "hat", "lamp", "book", "cup", "bag", "bell"]
ITEM_ADJECTIVES = ["red", "blue", "green", "yellow", "old", "new", "small", "big"]


def pronoun(name: str) -> str:
    return "She" if name in SHE else "He"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# The bestiary: made-up animals whose properties are drawn once from a fixed seed.
CREATURES = ["blorf", "tavik", "mippet", "zorlan", "quib", "fennet", "glimmox", "drabbit",
             "snorvel", "puxie", "wembat", "trillow", "gorsk", "yarnel", "plonk", "vesper",
             "kobbin", "lumox", "frizzle", "norg", "tupple", "skarn", "welkin", "dribble"]
PROPERTIES = {
    "color": ["red", "blue", "green", "yellow", "brown", "white", "black", "grey"],
    "home": ["forest", "desert", "river", "cave", "mountain", "marsh", "meadow", "island"],
    "food": ["seeds", "leaves", "fish", "berries", "insects", "roots", "grass", "mushrooms"],
    "legs": ["two", "four", "six", "eight"],
    "sound": ["hums", "chirps", "growls", "whistles", "clicks", "hisses"],
    "size": ["tiny", "small", "large", "huge"],
}
QUESTIONS = {
    "color": "What color is the {c}?",
    "home": "Where does the {c} live?",
    "food": "What does the {c} eat?",
    "legs": "How many legs does the {c} have?",
    "sound": "What sound does the {c} make?",
    "size": "How big is the {c}?",
}


def _build_bestiary(seed: int = 7) -> dict[str, dict[str, str]]:
    rng = random.Random(seed)
    return {c: {p: rng.choice(values) for p, values in PROPERTIES.items()} for c in CREATURES}


BESTIARY = _build_bestiary()

# The toy language: a fixed lexicon and three word-order rules (verb last, adjective after its
# noun, the object marked by "ko"); "in the X" becomes "X pa" at the front, "does not" is "ne".
TOY_NOUNS = {"cat": "miro", "dog": "tabu", "bird": "pilo", "fish": "sena", "horse": "kavo",
             "cow": "muna", "girl": "lina", "boy": "beko", "man": "dano", "woman": "fema",
             "child": "ninu", "teacher": "soro"}
TOY_VERBS = {"sees": "vani", "likes": "lomu", "helps": "hesa", "follows": "sipa",
             "finds": "toku", "calls": "rula", "hears": "odi", "feeds": "paki"}
TOY_ADJECTIVES = {"big": "gra", "small": "pik", "old": "veta", "young": "juni",
                  "happy": "felo", "red": "rusa", "brown": "bruno", "quick": "zipi"}
TOY_PLACES = {"garden": "gardo", "house": "domo", "forest": "silvo", "river": "rivo",
              "market": "bazo", "school": "skola"}
TOY_GRAMMAR = {"object": "ko", "in": "pa", "not": "ne"}

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
YEARS = (1990, 2029)


def number_to_words(n: int) -> str:
    """0..999 in English words: 42 -> "forty-two", 305 -> "three hundred five"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words covers 0..999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    rest = n % 100
    return ONES[n // 100] + " hundred" + (" " + number_to_words(rest) if rest else "")


# ----------------------------------------------------------------------------------------------
# Task families. Each family samples a world record, renders it as an example, and (for the
# corpus) as prose. Records are hashable so the corpus can skip the ones held out for evaluation.

@dataclass(frozen=True)
class Task:
    """One task family. Calling it draws an example: ``TASKS["dates"](rng)``."""

    name: str
    sample: Callable[[random.Random], Hashable]
    render: Callable[[Hashable, random.Random], dict]
    preamble: str
    instructions: tuple[str, ...]
    shared_world: bool = False  # True: the corpus may state the same records (facts, numbers)

    def __call__(self, rng: random.Random) -> dict:
        return self.render(self.sample(rng), rng)

    def template(self) -> str:
        return self.preamble + "\n\n" + ALPACA_BODY


ALPACA_BODY = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _example(instruction: str, input: str, output: str) -> dict:
    return {"instruction": instruction, "input": input, "output": output}


# arithmetic ------------------------------------------------------------------------------------
ARITHMETIC_INSTRUCTIONS = (
    "Solve the word problem and give the number.",
    "Read the problem and answer with a single number.",
    "How many are there? Answer with the number only.",
)


ONE_STEP = ("gain", "loss", "together", "compare")
TWO_STEP = ("gain_loss", "loss_gain")
ARITHMETIC_RANGES = (30, 20)  # the largest x and y of the task's problems (data/README.md: why)


def sample_arithmetic(rng: random.Random) -> tuple:
    """The task's problems: one addition or subtraction, x in [2, 30], y in [2, 20]; z is always 0.

    The corpus states the harder problems of ``sample_story_arithmetic`` in prose; the task asks only for one step."""
    kind = rng.choice(ONE_STEP)
    a, b = rng.sample(PEOPLE, 2)
    obj = rng.choice(OBJECTS)
    while True:
        x, y = rng.randint(2, ARITHMETIC_RANGES[0]), rng.randint(2, ARITHMETIC_RANGES[1])
        answer = x + y if kind in ("gain", "together") else x - y
        if answer >= 0:
            return (kind, a, b, obj, x, y, 0, answer)


def sample_story_arithmetic(rng: random.Random) -> tuple:
    """The corpus's stories: one or two steps, x in [2, 60], y in [2, 40], z in [2, 30], answers below 100."""
    kind = rng.choice(ONE_STEP + TWO_STEP)
    a, b = rng.sample(PEOPLE, 2)
    obj = rng.choice(OBJECTS)
    while True:
        x, y, z = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 30)
        answer = {"gain": x + y, "loss": x - y, "together": x + y, "compare": x - y,
                  "gain_loss": x + y - z, "loss_gain": x - y + z}[kind]
        # keep every intermediate count non-negative, not only the answer
        if 0 <= answer < 100 and (kind != "loss_gain" or x >= y):
            return (kind, a, b, obj, x, y, z, answer)


def _story(record: tuple, past: bool) -> tuple[str, str]:
    """The problem's statements, and a question about the result."""
    kind, a, b, obj, x, y, z, _ = record
    p = pronoun(a)
    has, finds, gives, buys, loses = (("had", "found", "gave", "bought", "lost") if past else
                                      ("has", "finds", "gives", "buys", "loses"))
    if kind == "gain":
        text = f"{a} {has} {x} {obj}. {p} {buys} {y} more {obj}."
    elif kind == "loss":
        text = f"{a} {has} {x} {obj}. {p} {gives} {y} {obj} to {b}."
    elif kind in ("together", "compare"):
        text = f"{a} {has} {x} {obj} and {b} {has} {y} {obj}."
    elif kind == "gain_loss":
        text = f"{a} {has} {x} {obj}. {p} {finds} {y} more {obj} and then {loses} {z} {obj}."
    else:
        text = f"{a} {has} {x} {obj}. {p} {gives} {y} {obj} to {b} and then {buys} {z} more {obj}."
    if kind == "together":
        question = f"How many {obj} do {a} and {b} have together?"
    elif kind == "compare":
        question = f"How many more {obj} does {a} have than {b}?"
    else:
        question = f"How many {obj} does {a} have now?"
    return text, question


def render_arithmetic(record: tuple, rng: random.Random) -> dict:
    text, question = _story(record, past=False)
    return _example(rng.choice(ARITHMETIC_INSTRUCTIONS), f"{text} {question}", str(record[-1]))


def prose_arithmetic(record: tuple, rng: random.Random) -> str:
    kind, a, b, obj, x, y, z, answer = record
    text, _ = _story(record, past=True)
    n = rng.choice([str(answer), number_to_words(answer)])
    if kind == "together":
        return f"{text} Together they had {n} {obj}."
    if kind == "compare":
        return f"{text} So {a} had {n} more {obj} than {b}."
    return f"{text} In the end {a} had {n} {obj}."


# facts ---------------------------------------------------------------------------------------
FACTS_INSTRUCTIONS = (
    "Answer the question with the correct option.",
    "Choose the correct answer and reply with it.",
)
# The first version of the task answered with the option's letter, which decoder-base learned only to chance under
# LoRA (data/README.md); the committed tokenizer was trained on it (FIRST_GENERATORS).
LETTER_INSTRUCTIONS = (
    "Answer the question with the letter of the correct option.",
    "Choose the correct answer. Reply with its letter.",
)
LETTERS = "ABCD"


def sample_facts(rng: random.Random) -> tuple:
    creature = rng.choice(CREATURES)
    prop = rng.choice(list(PROPERTIES))
    truth = BESTIARY[creature][prop]
    options = rng.sample([v for v in PROPERTIES[prop] if v != truth], 3) + [truth]
    rng.shuffle(options)
    return (creature, prop, tuple(options))


def _facts_input(record: tuple) -> str:
    creature, prop, options = record
    return "\n".join([QUESTIONS[prop].format(c=creature)] + [f"{ch}. {o}" for ch, o in zip(LETTERS, options)])


def render_facts(record: tuple, rng: random.Random) -> dict:
    """The answer is the correct option itself ("brown"), chosen among the four listed."""
    creature, prop, _ = record
    return _example(rng.choice(FACTS_INSTRUCTIONS), _facts_input(record), BESTIARY[creature][prop])


def render_facts_by_letter(record: tuple, rng: random.Random) -> dict:
    """The first version: the answer is the correct option's letter ("D")."""
    creature, prop, options = record
    answer = LETTERS[options.index(BESTIARY[creature][prop])]
    return _example(rng.choice(LETTER_INSTRUCTIONS), _facts_input(record), answer)


def fact_sentences(creature: str, rng: random.Random) -> list[str]:
    """Everything known about one creature, each fact in one of a few phrasings."""
    f = BESTIARY[creature]
    c = creature
    options = {
        "color": [f"The {c} is {f['color']}.", f"A {c} has {f['color']} fur.",
                  f"The color of the {c} is {f['color']}."],
        "home": [f"The {c} lives in the {f['home']}.", f"You can find the {c} in the {f['home']}.",
                 f"The home of the {c} is the {f['home']}."],
        "food": [f"The {c} eats {f['food']}.", f"A {c} feeds on {f['food']}.",
                 f"The food of the {c} is {f['food']}."],
        "legs": [f"The {c} has {f['legs']} legs.", f"A {c} walks on {f['legs']} legs."],
        "sound": [f"The {c} {f['sound']}.", f"When it is happy, the {c} {f['sound']}."],
        "size": [f"The {c} is {f['size']}.", f"A {c} is a {f['size']} animal."],
    }
    props = list(options)
    rng.shuffle(props)
    return [rng.choice(options[p]) for p in props]


# expressions -----------------------------------------------------------------------------------
EXPRESSIONS_INSTRUCTIONS = (
    "What does this program print?",
    "Run the code in your head and give the printed value.",
)
VARIABLES = ["a", "b", "c", "n", "x", "y", "z"]


def _binary(rng: random.Random, env: dict[str, int]) -> tuple[str, int]:
    """A term "u op v" over known variables and small constants, with its value."""
    names = list(env)
    left = rng.choice(names)
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        right = str(rng.randint(2, 4))
    elif len(names) > 1 and rng.random() < 0.5:
        right = rng.choice([v for v in names if v != left])
    else:
        right = str(rng.randint(1, 9))
    lv, rv = env[left], env[right] if right in env else int(right)
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]
    return f"{left} {op} {right}", value


def sample_expressions(rng: random.Random) -> tuple:
    """The task's programs: one variable set to 10-24 and one operation, printed directly or through a second variable.

    ``x = 17; print(x * 3)`` or ``x = 17; y = x - 4; print(y)``. The corpus traces the longer programs of
    ``sample_program``, which set two or three variables, each constant below 10, and print a term: no task program
    is in it, not even as the tail of a longer one."""
    name = rng.choice(VARIABLES)
    env = {name: rng.randint(10, 24)}
    term, value = _binary(rng, env)
    if rng.random() < 0.5:
        return (f"{name} = {env[name]}", f"print({term})", value)
    other = rng.choice([v for v in VARIABLES if v != name])
    return (f"{name} = {env[name]}", f"{other} = {term}", f"print({other})", value)


def sample_program(rng: random.Random) -> tuple:
    """The corpus's programs as a tuple of statements: two or three assignments, then a print of a term."""
    while True:
        names = rng.sample(VARIABLES, 3)
        env = {names[0]: rng.randint(1, 9)}
        statements = [f"{names[0]} = {env[names[0]]}"]
        for name in names[1:rng.randint(2, 3)]:
            if rng.random() < 0.3:
                env[name] = rng.randint(1, 9)
                statements.append(f"{name} = {env[name]}")
            else:
                term, env[name] = _binary(rng, env)
                statements.append(f"{name} = {term}")
        term, value = _binary(rng, env)
        statements.append(f"print({term})")
        if all(-20 <= v <= 99 for v in env.values()) and -20 <= value <= 99:
            return tuple(statements) + (value,)


def render_expressions(record: tuple, rng: random.Random) -> dict:
    *statements, value = record
    return _example(rng.choice(EXPRESSIONS_INSTRUCTIONS), "; ".join(statements), str(value))


def prose_expressions(record: tuple, rng: random.Random) -> str:
    *statements, value = record
    env: dict[str, int] = {}
    steps = []
    for s in statements[:-1]:
        name, expr = s.split(" = ")
        env[name] = _evaluate(expr, env)
        is_constant = len(expr.split()) == 1
        steps.append(f"{s} sets {name} to {env[name]}" if is_constant
                     else f"after {s}, {name} holds {env[name]}")
    printed = statements[-1]
    if rng.random() < 0.5:
        return f"The program {'; '.join(statements)} prints {value}."
    return f"In this program, {'; '.join(steps)}; and {printed} prints {value}."


def _evaluate(expr: str, env: dict[str, int]) -> int:
    parts = expr.split()
    value = lambda tok: env[tok] if tok in env else int(tok)  # noqa: E731
    if len(parts) == 1:
        return value(parts[0])
    left, op, right = parts
    return {"+": value(left) + value(right), "-": value(left) - value(right),
            "*": value(left) * value(right)}[op]


# reading -------------------------------------------------------------------------------------
READING_INSTRUCTIONS = (
    "Answer the question with words from the passage.",
    "Answer with a short span copied from the passage.",
)


def _reading_sentence(kind: str, rng: random.Random, people: list[str]) -> tuple[str, list]:
    """One sentence and the questions it answers, as (question, answer span) pairs."""
    p = people.pop()
    place, day = rng.choice(PLACES), rng.choice(DAYS)
    item = f"{rng.choice(ITEM_ADJECTIVES)} {rng.choice(ITEMS)}"
    if kind == "went":
        return (f"{p} went to {place} on {day}.",
                [(f"Where did {p} go on {day}?", place), (f"On which day did {p} go to {place}?", day)])
    if kind == "bought":
        return (f"{p} bought {with_article(item)} at {place}.",
                [(f"What did {p} buy?", with_article(item)), (f"Where did {p} buy the {item}?", place)])
    q = people.pop()
    if kind == "gave":
        return (f"{p} gave {with_article(item)} to {q}.",
                [(f"Who got the {item} from {p}?", q), (f"What did {p} give to {q}?", with_article(item))])
    if kind == "met":
        return (f"{p} met {q} at {place} on {day}.",
                [(f"Who did {p} meet at {place}?", q), (f"Where did {p} meet {q}?", place)])
    n, obj = rng.randint(2, 30), rng.choice(OBJECTS)
    return (f"{p} and {q} collected {n} {obj}.",
            [(f"How many {obj} did {p} and {q} collect?", str(n)), (f"Who collected {obj} with {p}?", q)])


def _passage(rng: random.Random, fewest: int, most: int) -> tuple:
    people = rng.sample(PEOPLE, 8)  # every person appears once, so every answer is unique
    kinds = rng.sample(["went", "bought", "gave", "met", "collected"], rng.randint(fewest, most))
    sentences, questions = [], []
    for kind in kinds:
        sentence, qa = _reading_sentence(kind, rng, people)
        sentences.append(sentence)
        questions += qa
    question, answer = rng.choice(questions)
    return (" ".join(sentences), question, answer)


def sample_reading(rng: random.Random) -> tuple:
    """The task's passages: one or two sentences (the span to copy is one of two to four candidates)."""
    return _passage(rng, 1, 2)


def sample_long_reading(rng: random.Random) -> tuple:
    """The corpus's passages, and the task's first version: two to four sentences (data/README.md says why the
    task became shorter)."""
    return _passage(rng, 2, 4)


def render_reading(record: tuple, rng: random.Random) -> dict:
    passage, question, answer = record
    return _example(rng.choice(READING_INSTRUCTIONS), f"{passage}\nQuestion: {question}", answer)


# num2words -----------------------------------------------------------------------------------
NUM2WORDS_INSTRUCTIONS = (
    "Write the number in words.",
    "Spell out this number in English words.",
)


def sample_num2words(rng: random.Random) -> int:
    return rng.randint(1, 999)


def render_num2words(n: int, rng: random.Random) -> dict:
    return _example(rng.choice(NUM2WORDS_INSTRUCTIONS), str(n), number_to_words(n))


# dates ---------------------------------------------------------------------------------------
DATE_FORMATS = {
    "iso": "YYYY-MM-DD",
    "dmy": "day month year",
    "mdy": "month day, year",
    "slash": "DD/MM/YYYY",
}


def format_date(date: tuple[int, int, int], fmt: str) -> str:
    y, m, d = date
    return {"iso": f"{y:04d}-{m:02d}-{d:02d}", "dmy": f"{d} {MONTHS[m - 1]} {y}",
            "mdy": f"{MONTHS[m - 1]} {d}, {y}", "slash": f"{d:02d}/{m:02d}/{y:04d}"}[fmt]


def sample_date(rng: random.Random) -> tuple[int, int, int]:
    y, m = rng.randint(*YEARS), rng.randint(1, 12)
    leap = m == 2 and y % 4 == 0  # every year in 1990..2029 divisible by 4 is a leap year
    return (y, m, rng.randint(1, MONTH_DAYS[m - 1] + leap))


def sample_dates(rng: random.Random) -> tuple:
    source, target = rng.sample(list(DATE_FORMATS), 2)
    return (sample_date(rng), source, target)


# One instruction per target format and phrasing, written out so the instruction alone names the
# task (format_prompt uses that to pick the template).
DATES_INSTRUCTIONS = tuple(
    phrasing.format(name)
    for name in DATE_FORMATS.values()
    for phrasing in ("Rewrite the date in the format {}.", "Convert this date to {} form.")
)


def render_dates(record: tuple, rng: random.Random) -> dict:
    date, source, target = record
    phrasing = rng.randrange(2)
    instruction = DATES_INSTRUCTIONS[2 * list(DATE_FORMATS).index(target) + phrasing]
    return _example(instruction, format_date(date, source), format_date(date, target))


# translate -----------------------------------------------------------------------------------
TRANSLATE_INSTRUCTIONS = (
    "Translate the sentence into the toy language.",
    "Give the toy language version of this English sentence.",
)


def sample_translate(rng: random.Random) -> tuple:
    def noun_phrase():
        adjective = rng.choice(list(TOY_ADJECTIVES)) if rng.random() < 0.5 else None
        return (adjective, rng.choice(list(TOY_NOUNS)))

    subject, obj = noun_phrase(), noun_phrase()
    while obj[1] == subject[1]:
        obj = noun_phrase()
    place = rng.choice(list(TOY_PLACES)) if rng.random() < 0.4 else None
    return (subject, rng.choice(list(TOY_VERBS)), obj, rng.random() < 0.25, place)


def english_sentence(record: tuple) -> str:
    subject, verb, obj, negated, place = record
    np = lambda a, n: "the " + (f"{a} " if a else "") + n  # noqa: E731
    verb_phrase = f"does not {verb[:-1]}" if negated else verb  # every verb here is base + "s"
    return " ".join([np(*subject), verb_phrase, np(*obj)] + ([f"in the {place}"] if place else []))


def toy_sentence(record: tuple) -> str:
    subject, verb, obj, negated, place = record
    np = lambda a, n: TOY_NOUNS[n] + (f" {TOY_ADJECTIVES[a]}" if a else "")  # noqa: E731
    words = ([TOY_PLACES[place], TOY_GRAMMAR["in"]] if place else []) + [np(*subject), np(*obj), "ko"]
    return " ".join(words + (["ne"] if negated else []) + [TOY_VERBS[verb]])


def render_translate(record: tuple, rng: random.Random) -> dict:
    return _example(rng.choice(TRANSLATE_INSTRUCTIONS), english_sentence(record), toy_sentence(record))


# registry ------------------------------------------------------------------------------------
TASKS: dict[str, Task] = {
    t.name: t for t in [
        Task("arithmetic", sample_arithmetic, render_arithmetic,
             "Below is a short math word problem.", ARITHMETIC_INSTRUCTIONS),
        Task("facts", sample_facts, render_facts,
             "Below is a question about the animals of the world.", FACTS_INSTRUCTIONS, True),
        Task("expressions", sample_expressions, render_expressions,
             "Below is a small program.", EXPRESSIONS_INSTRUCTIONS),
        Task("reading", sample_reading, render_reading,
             "Below is a short passage with a question.", READING_INSTRUCTIONS),
        Task("num2words", sample_num2words, render_num2words,
             "Below is a number.", NUM2WORDS_INSTRUCTIONS, True),
        Task("dates", sample_dates, render_dates,
             "Below is a date.", DATES_INSTRUCTIONS),
        Task("translate", sample_translate, render_translate,
             "Below is an English sentence.", TRANSLATE_INSTRUCTIONS),
    ]
}
# Families the lessons use with each architecture; any task works with either.
DECODER_TASKS = ["arithmetic", "facts", "expressions", "reading"]
SEQ2SEQ_TASKS = ["num2words", "dates", "translate"]

TEMPLATES = {name: t.template() for name, t in TASKS.items()}
_TASK_OF_INSTRUCTION = {ins: t.name for t in TASKS.values() for ins in t.instructions}


def get_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def format_prompt(example: dict, task: str | None = None) -> str:
    """The Alpaca-style prompt for an example, ending with "### Response:\\n" (no output).

    The task's template is found from the instruction when ``task`` is not given."""
    name = task or _TASK_OF_INSTRUCTION.get(example["instruction"])
    template = get_task(name).template() if name else ALPACA_BODY
    return template.format(instruction=example["instruction"], input=example["input"])


def full_text(example: dict, task: str | None = None) -> str:
    """Prompt followed by the answer: what a decoder is fine-tuned on."""
    return format_prompt(example, task) + example["output"]


def seq2seq_pair(example: dict, task: str | None = None) -> tuple[str, str]:
    """(encoder source, decoder target) for an encoder-decoder model."""
    return format_prompt(example, task), example["output"]


# ----------------------------------------------------------------------------------------------
# Splits

def generate_splits(name: str, seed: int = SEED, sizes: dict[str, int] | None = None,
                    sample: Callable[[random.Random], Hashable] | None = None,
                    render: Callable[[Hashable, random.Random], dict] | None = None) -> dict:
    """{"test": [...], "validation": [...], "train": [...]} with no input shared between splits.

    Test is filled first, then validation, then train, so a family with few distinct inputs
    (num2words) keeps full evaluation splits and a smaller train split. Also returns the world
    records behind validation and test under "held_out" for the corpus to avoid. ``sample`` and ``render`` replace
    the family's (the tokenizer's training text uses the first versions, FIRST_GENERATORS)."""
    task = get_task(name)
    sample, render = sample or task.sample, render or task.render
    sizes = sizes or SPLIT_SIZES
    rng = random.Random(f"{seed}/{name}")  # str seeds are hashed with sha512: stable across runs
    order = ["test", "validation", "train"]
    out: dict = {split: [] for split in order}
    held_out: set = set()
    seen: set[str] = set()
    draws, max_draws = 0, 50 * sum(sizes.values())
    for split in order:
        while len(out[split]) < sizes[split] and draws < max_draws:
            draws += 1
            record = sample(rng)
            example = render(record, rng)
            if example["input"] in seen:
                continue
            seen.add(example["input"])
            out[split].append(example)
            if split != "train":
                held_out.add(_world_key(name, record))
    out["held_out"] = held_out
    return out


def _world_key(name: str, record) -> Hashable:
    """What the corpus must not repeat from an evaluation example."""
    if name == "dates":
        return ("dates", record[0])
    if name == "reading":
        return ("reading", record[0])
    if name == "arithmetic" and record[0] in ONE_STEP:  # z plays no part in a one-step story
        return ("arithmetic", record[:6] + (0,) + record[7:])
    return (name, record)


# ----------------------------------------------------------------------------------------------
# Pretraining corpus: one document per line, plain prose, no instruction format.

# The corpus draws its stories, programs and passages from wider samplers than the tasks' (data/README.md says why).
CORPUS_SAMPLERS = {"arithmetic": sample_story_arithmetic, "expressions": sample_program, "reading": sample_long_reading}
# What the task files held when the committed tokenizer was trained: generate_splits keyword arguments per family,
# for tokenizer.training_texts, so that the tokenizer (and every base) is reproduced byte for byte.
FIRST_GENERATORS = {"arithmetic": {"sample": sample_story_arithmetic}, "expressions": {"sample": sample_program},
                    "reading": {"sample": sample_long_reading}, "facts": {"render": render_facts_by_letter}}


def _fresh(rng: random.Random, name: str, held_out: set):
    """A world record of this family that no evaluation example was built from."""
    sample = CORPUS_SAMPLERS.get(name, TASKS[name].sample)
    while True:
        record = sample(rng)
        if _world_key(name, record) not in held_out:
            return record


def doc_facts(rng: random.Random, held_out: set) -> str:
    creatures = rng.sample(CREATURES, rng.randint(1, 2))
    out = []
    for c in creatures:
        out += fact_sentences(c, rng)
    if len(creatures) == 2 and rng.random() < 0.5:
        a, b = creatures
        out.append(f"The {a} lives in the {BESTIARY[a]['home']}, but the {b} lives in the "
                   f"{BESTIARY[b]['home']}.")
    return " ".join(out)


def doc_stories(rng: random.Random, held_out: set) -> str:
    return " ".join(prose_arithmetic(_fresh(rng, "arithmetic", held_out), rng)
                    for _ in range(rng.randint(2, 4)))


def doc_numbers(rng: random.Random, held_out: set) -> str:
    out = []
    for _ in range(rng.randint(4, 7)):
        n, obj, p = rng.randint(1, 999), rng.choice(OBJECTS + ["birds", "trees", "people"]), rng.choice(PEOPLE)
        w = number_to_words(n)
        out.append(rng.choice([
            f"There were {w} {obj}, that is {n}.",
            f"{p} counted {n} {obj}, which is {w} {obj}.",
            f"The number {n} is written {w}.",
            f"{w.capitalize()} is the same as {n}.",
            f"{p} wrote {n} in words: {w}.",
        ]))
    return " ".join(out)


def doc_dates(rng: random.Random, held_out: set) -> str:
    out = []
    for _ in range(rng.randint(3, 5)):
        date, a, b = _fresh(rng, "dates", held_out)
        p, place = rng.choice(PEOPLE), rng.choice(PLACES)
        da, db = format_date(date, a), format_date(date, b)
        out.append(rng.choice([
            f"{p} went to {place} on {da}, which is {db}.",
            f"The date {da} can also be written as {db}.",
            f"On {da} ({db}) {p} visited {place}.",
            f"{da} and {db} are the same day.",
        ]))
    return " ".join(out)


def doc_programs(rng: random.Random, held_out: set) -> str:
    return " ".join(prose_expressions(_fresh(rng, "expressions", held_out), rng)
                    for _ in range(rng.randint(2, 4)))


def doc_passages(rng: random.Random, held_out: set) -> str:
    passage, _, _ = _fresh(rng, "reading", held_out)
    return passage


def doc_toy(rng: random.Random, held_out: set) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.random()
        if kind < 0.25:
            table = rng.choice([TOY_NOUNS, TOY_VERBS, TOY_ADJECTIVES, TOY_PLACES])
            english = rng.choice(list(table))
            out.append(f"In the toy language, the word for {english} is {table[english]}.")
        else:
            record = _fresh(rng, "translate", held_out)
            out.append(rng.choice([
                f"In the toy language, '{english_sentence(record)}' is '{toy_sentence(record)}'.",
                f"'{toy_sentence(record)}' means '{english_sentence(record)}' in the toy language.",
            ]))
    if rng.random() < 0.2:
        out.append(rng.choice([
            "In the toy language the verb comes last.",
            "In the toy language an adjective follows its noun.",
            "In the toy language the word ko comes after the object.",
            "In the toy language ne before the verb means not.",
        ]))
    return " ".join(out)


CORPUS_MIX = {doc_facts: 1400, doc_stories: 1400, doc_numbers: 1000, doc_dates: 900,
              doc_programs: 1300, doc_passages: 1400, doc_toy: 1400}


# The decoder-base corpus adds, to the corpus above, the reasoning the four decoder tasks need, written out in
# prose: totals worked step by step, sums on their own, programs traced value by value, passages followed by
# questions and their answers, and quizzes whose options are named by letter. Still never the instruction format.
BASE_CORPUS_SEED = 24680


def _say(n: int, rng: random.Random) -> str:
    return rng.choice([str(n), str(n), number_to_words(n)]) if 0 <= n < 100 else str(n)


def doc_worked_stories(rng: random.Random, held_out: set) -> str:
    out = []
    for _ in range(rng.randint(2, 3)):
        record = _fresh(rng, "arithmetic", held_out)
        kind, a, b, obj, x, y, z, answer = record
        text, question = _story(record, past=rng.random() < 0.5)
        first = x + y if kind in ("gain", "together", "gain_loss") else x - y
        op1 = "plus" if kind in ("gain", "together", "gain_loss") else "minus"
        work = f"{x} {op1} {y} is {first}"
        if kind in ("gain_loss", "loss_gain"):
            op2 = "minus" if kind == "gain_loss" else "plus"
            work += f", and {first} {op2} {z} is {answer}"
        out.append(rng.choice([f"{text} {question} {work}, so the answer is {answer}.",
                               f"{text} {work.capitalize()}. {question} {answer}."]))
    return " ".join(out)


def doc_sums(rng: random.Random, held_out: set) -> str:
    out = []
    for _ in range(rng.randint(5, 9)):
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5 and x + y < 100:
            out.append(rng.choice([f"{x} + {y} = {x + y}.", f"{x} plus {y} is {x + y}.", f"{x} and {y} make {x + y}."]))
        elif x >= y:
            out.append(rng.choice([f"{x} - {y} = {x - y}.", f"{x} minus {y} is {x - y}.",
                                   f"Take {y} from {x} and {x - y} are left."]))
        else:
            m = rng.randint(2, 4)
            v = rng.randint(-20, 24)
            out.append(f"{v} * {m} = {v * m}.")
    return " ".join(out)


def doc_traces(rng: random.Random, held_out: set) -> str:
    *statements, value = _fresh(rng, "expressions", held_out)
    env: dict[str, int] = {}
    lines = []
    for s in statements[:-1]:
        name, expr = s.split(" = ")
        env[name] = _evaluate(expr, env)
        if len(expr.split()) == 1:
            lines.append(f"{name} is {env[name]}.")
        else:
            left, op, right = expr.split()
            numbers = " ".join(str(env[t]) if t in env else t for t in (left, op, right))
            lines.append(f"{name} is {expr}, which is {numbers} = {env[name]}.")
    term = statements[-1][len("print("):-1]
    left, op, right = term.split()
    numbers = " ".join(str(env[t]) if t in env else t for t in (left, op, right))
    return (f"Let us run {'; '.join(statements)}. " + " ".join(lines) +
            f" Then {term} is {numbers} = {value}, so it prints {value}.")


def doc_passage_questions(rng: random.Random, held_out: set) -> str:
    out = []
    for _ in range(rng.randint(1, 2)):
        passage, question, answer = _fresh(rng, "reading", held_out)
        out.append(rng.choice([f"{passage} {question} {answer}.", f"{passage} {question} The answer is {answer}.",
                               f"Read this: {passage} Then {question[0].lower() + question[1:]} It is {answer}."]))
    return " ".join(out)


def doc_quizzes(rng: random.Random, held_out: set) -> str:
    out = []
    for _ in range(rng.randint(1, 3)):
        record = _fresh(rng, "facts", held_out)
        creature, prop, options = record
        truth = BESTIARY[creature][prop]
        letter = LETTERS[options.index(truth)]
        listed = ", ".join(f"{ch}. {o}" for ch, o in zip(LETTERS, options))
        out.append(rng.choice([f"Quiz: {QUESTIONS[prop].format(c=creature)} {listed}. The answer is {letter}, {truth}.",
                               f"{QUESTIONS[prop].format(c=creature)} The choices are {listed}. It is {truth}, so {letter}."]))
    return " ".join(out)


BASE_CORPUS_MIX = {doc_worked_stories: 5000, doc_sums: 3000, doc_traces: 6000, doc_passage_questions: 5000,
                   doc_quizzes: 3000}


def build_base_corpus(seed: int = BASE_CORPUS_SEED) -> list[str]:
    """data/corpus/pretrain.txt's documents and the reasoning documents of BASE_CORPUS_MIX, shuffled together.

    The added documents skip every world record behind a validation or test example of any task (facts
    included: a quiz never repeats an evaluation question with its options in the same order)."""
    held_out = set()
    for name in TASKS:
        held_out |= generate_splits(name)["held_out"]
    rng = random.Random(f"{seed}/base-corpus")
    docs = [make(rng, held_out) for make, count in BASE_CORPUS_MIX.items() for _ in range(count)]
    docs += load_corpus()
    rng.shuffle(docs)
    return docs


def build_corpus(held_out: set, seed: int = CORPUS_SEED) -> list[str]:
    """Documents (one per line in pretrain.txt) from every part of the world, interleaved."""
    rng = random.Random(f"{seed}/corpus")
    docs = [make(rng, held_out) for make, count in CORPUS_MIX.items() for _ in range(count)]
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------------
# Files

def _dumps(example: dict) -> str:
    return json.dumps({k: example[k] for k in FIELDS}, sort_keys=False, ensure_ascii=False)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))


def generate_all(seed: int = SEED, corpus_seed: int = CORPUS_SEED) -> tuple[dict, list[str]]:
    """({task: {split: examples}}, corpus documents): everything ``python -m minilora.tasks`` writes."""
    splits, held_out = {}, set()
    for name in TASKS:
        splits[name] = generate_splits(name, seed)
        held = splits[name].pop("held_out")
        if not TASKS[name].shared_world:
            held_out |= held
    return splits, build_corpus(held_out, corpus_seed)


def write_all(root: Path | None = None, seed: int = SEED, corpus_seed: int = CORPUS_SEED) -> dict:
    """Write data/tasks/*/*.jsonl and data/corpus/pretrain.txt under ``root``; returns their paths."""
    root = Path(root) if root is not None else data_dir()
    splits, corpus = generate_all(seed, corpus_seed)
    written = {}
    for name in TASKS:
        for split in SPLITS:
            path = root / "tasks" / name / f"{split}.jsonl"
            _write_lines(path, [_dumps(e) for e in splits[name][split]])
            written[(name, split)] = path
    written["corpus"] = root / "corpus" / "pretrain.txt"
    _write_lines(written["corpus"], corpus)
    for path, lines in _folder_readmes(splits, corpus).items():
        _write_lines(root / path, lines)
        written[path] = root / path
    return written


def _folder_readmes(splits: dict, corpus: list[str]) -> dict[str, list[str]]:
    """A short README for each generated folder, listing its files (data/README.md has the full story)."""
    def header(up: str) -> list[str]:
        return ["", f"Generated by `python -m minilora.tasks`; do not edit by hand. See {up}README.md.", ""]

    readmes = {"tasks/README.md": ["# data/tasks", *header("../"),
                                   "| folder | prompt preamble | train / validation / test |", "|---|---|---|"]}
    for name, task in TASKS.items():
        sizes = " / ".join(str(len(splits[name][s])) for s in SPLITS)
        readmes["tasks/README.md"].append(f"| {name} | {task.preamble} | {sizes} |")
        example = splits[name]["test"][0]
        readmes[f"tasks/{name}/README.md"] = [
            f"# data/tasks/{name}", *header("../../"),
            "| file | examples |", "|---|---|",
            *[f"| {s}.jsonl | {len(splits[name][s])} |" for s in SPLITS],
            "", "One test example:", "", "```json", _dumps(example), "```",
        ]
    readmes["corpus/README.md"] = [
        "# data/corpus", *header("../"),
        f"- pretrain.txt: {len(corpus)} plain-prose documents, one per line, for pretraining the base models.",
    ]
    return readmes


def task_path(name: str, split: str = "train", root: Path | None = None) -> Path:
    get_task(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return (Path(root) if root is not None else data_dir()) / "tasks" / name / f"{split}.jsonl"


def validate_jsonl(path: Path) -> int:
    """Check every line is a JSON object with string instruction/input/output; returns the count."""
    count = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                raise ValueError(f"{where}: empty line (each line must be one JSON object)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in FIELDS if k not in row]
            if missing:
                raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}; "
                                 f"each line needs {', '.join(FIELDS)}")
            wrong = [k for k in FIELDS if not isinstance(row[k], str)]
            if wrong:
                raise ValueError(f"{where}: value of {', '.join(map(repr, wrong))} must be a string")
            count += 1
    return count


def load_jsonl(path: str | Path):
    """A validated JSONL file of examples as a datasets.Dataset."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `python -m minilora.tasks` to generate it")
    validate_jsonl(path)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.load_dataset("json", data_files=str(path), split="train")


def load_task(name: str, split: str = "train", root: str | Path | None = None):
    """data/tasks/<name>/<split>.jsonl as a datasets.Dataset with columns instruction, input, output."""
    return load_jsonl(task_path(name, split, root))


def load_corpus(root: str | Path | None = None) -> list[str]:
    """The pretraining documents of data/corpus/pretrain.txt, one string per document (line)."""
    path = (Path(root) if root is not None else data_dir()) / "corpus" / "pretrain.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `python -m minilora.tasks` to generate it")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def main() -> None:
    for key, path in write_all().items():
        print(f"{path}  {path.stat().st_size:>9,d} bytes")


if __name__ == "__main__":
    main()
