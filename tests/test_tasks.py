import json
import os
import random
import re
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

from minilora import tasks
from minilora.tasks import (BESTIARY, DECODER_TASKS, SEQ2SEQ_TASKS, SPLITS, TASKS, data_dir,
                            format_prompt, full_text, generate_splits, load_task, number_to_words)

DATA = data_dir()


def read_split(name, split):
    with open(DATA / "tasks" / name / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_task_registry_has_the_seven_families():
    assert list(TASKS) == ["arithmetic", "facts", "expressions", "reading", "num2words", "dates", "translate"]
    assert sorted(DECODER_TASKS + SEQ2SEQ_TASKS) == sorted(TASKS)


def test_regenerating_gives_byte_identical_files(tmp_path):
    written = tasks.write_all(tmp_path)
    for key, path in written.items():
        committed = DATA / path.relative_to(tmp_path)
        assert path.read_bytes() == committed.read_bytes(), f"{committed} differs from a fresh run"


def test_command_line_regeneration_does_not_depend_on_python_hash_seed(tmp_path):
    env = {**os.environ, "MINILORA_DATA": str(tmp_path), "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "minilora.tasks"], env=env, check=True, capture_output=True)
    for name in ["facts", "translate"]:
        for split in SPLITS:
            rel = Path("tasks") / name / f"{split}.jsonl"
            assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes()
    rel = Path("corpus") / "pretrain.txt"
    assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes()


@pytest.mark.parametrize("name", list(TASKS))
def test_generator_is_deterministic_from_seed(name):
    draw = lambda seed: [TASKS[name](random.Random(seed)) for _ in range(20)]  # noqa: E731
    assert draw(3) == draw(3)
    assert [e["input"] for e in draw(3)] != [e["input"] for e in draw(4)]
    example = draw(3)[0]
    assert list(example) == ["instruction", "input", "output"]
    assert all(isinstance(v, str) and v for v in example.values())


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_have_their_sizes_and_share_no_input(name):
    inputs = {split: [e["input"] for e in read_split(name, split)] for split in SPLITS}
    expected = {"train": 599 if name == "num2words" else 2000, "validation": 200, "test": 200}
    assert {s: len(v) for s, v in inputs.items()} == expected
    every = inputs["train"] + inputs["validation"] + inputs["test"]
    assert len(set(every)) == len(every)


@pytest.mark.parametrize("name", list(TASKS))
def test_prompt_ends_with_response_header_and_never_contains_the_output(name):
    for example in read_split(name, "test"):
        prompt = format_prompt(example)
        assert prompt.endswith("### Response:\n")
        assert prompt.startswith(TASKS[name].preamble)  # the template was inferred from the instruction
        assert prompt == format_prompt(example, task=name)
        assert format_prompt({**example, "output": "SENTINEL"}) == prompt
        assert full_text(example) == prompt + example["output"]
        assert prompt.count("### Instruction:") == 1 and prompt.count("### Input:") == 1


def test_instructions_name_their_task_uniquely():
    seen = [ins for t in TASKS.values() for ins in t.instructions]
    assert len(seen) == len(set(seen))
    generic = format_prompt({"instruction": "Do something else.", "input": "x", "output": "y"})
    assert generic.startswith("### Instruction:\nDo something else.")


def test_answers_are_correct():
    for e in read_split("arithmetic", "test"):
        assert 0 <= int(e["output"]) < 100
        numbers = [int(n) for n in re.findall(r"\d+", e["input"])]
        assert all(n < 100 for n in numbers)
    for e in read_split("facts", "test"):
        question, *options = e["input"].split("\n")
        creature = re.search(r"the (\w+)", question).group(1)
        assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "] and len(set(options)) == 4
        assert e["output"] in [o[3:] for o in options] and e["output"] in BESTIARY[creature].values()
    for e in read_split("expressions", "test"):
        out = StringIO()
        with redirect_stdout(out):
            exec(e["input"].replace("; ", "\n"), {})
        assert out.getvalue() == e["output"] + "\n"
    for e in read_split("reading", "test"):
        passage = e["input"].split("\nQuestion: ")[0]
        assert e["output"] in passage and 1 <= passage.count(".") <= 2  # one or two sentences
    for e in read_split("num2words", "train"):
        assert e["output"] == number_to_words(int(e["input"]))
    assert [number_to_words(n) for n in (7, 13, 40, 42, 100, 305, 999)] == [
        "seven", "thirteen", "forty", "forty-two", "one hundred", "three hundred five",
        "nine hundred ninety-nine"]


def test_dates_and_translation_examples():
    assert tasks.format_date((2021, 3, 7), "dmy") == "7 March 2021"
    assert tasks.format_date((2021, 3, 7), "iso") == "2021-03-07"
    assert tasks.format_date((2021, 3, 7), "mdy") == "March 7, 2021"
    assert tasks.format_date((2021, 3, 7), "slash") == "07/03/2021"
    record = (("big", "cat"), "sees", (None, "dog"), False, "garden")
    assert tasks.english_sentence(record) == "the big cat sees the dog in the garden"
    assert tasks.toy_sentence(record) == "gardo pa miro gra tabu ko vani"
    negated = ((None, "girl"), "hears", ("old", "fish"), True, None)
    assert tasks.english_sentence(negated) == "the girl does not hear the old fish"
    assert tasks.toy_sentence(negated) == "lina sena veta ko ne odi"


def test_load_task_returns_a_dataset_with_the_three_columns():
    ds = load_task("dates", "validation")
    assert ds.column_names == ["instruction", "input", "output"]
    assert len(ds) == 200
    assert ds[0] == read_split("dates", "validation")[0]


def test_unknown_task_and_split_are_explained():
    with pytest.raises(ValueError, match=r"Did you mean 'arithmetic'\?"):
        load_task("arithmetc")
    with pytest.raises(ValueError, match="unknown split"):
        load_task("facts", "dev")


@pytest.mark.parametrize("bad_line, message", [
    ('{"instruction": "a", "input": "b"', "not valid JSON"),
    ('{"instruction": "a", "input": "b"}', "missing key(s) 'output'"),
    ('["a", "b", "c"]', "expected a JSON object"),
    ('{"instruction": "a", "input": 3, "output": "c"}', "'input' must be a string"),
    ("", "empty line"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"instruction": "a", "input": "b", "output": "c"})
    path = tmp_path / "tasks" / "facts" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_task("facts", "train", root=tmp_path)
    assert f"{path}:3:" in str(info.value) and message in str(info.value)


def test_data_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILORA_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="python -m minilora.tasks"):
        load_task("facts")


def corpus_lines():
    lines = tasks.load_corpus()
    assert lines == (DATA / "corpus" / "pretrain.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return lines


def test_corpus_is_plain_prose_one_document_per_line():
    lines = corpus_lines()
    assert 5000 < len(lines) and all(line.strip() == line and line for line in lines)
    text = "\n".join(lines)
    assert "###" not in text and "Instruction" not in text and "Response:" not in text
    assert 1_000_000 < len(text.encode("utf-8")) < 3_000_000


def test_corpus_states_every_fact_and_skips_held_out_records():
    text = "\n".join(corpus_lines())
    for creature, facts in BESTIARY.items():
        assert f"The {creature} lives in the {facts['home']}." in text
    programs = {e["input"] for s in ("validation", "test") for e in read_split("expressions", s)}
    passages = {e["input"].split("\nQuestion: ")[0] for s in ("validation", "test")
                for e in read_split("reading", s)}
    sentences = {e["input"] for s in ("validation", "test") for e in read_split("translate", s)}
    for line in corpus_lines():
        assert not any(f"The program {p} prints" in line for p in programs)
        assert line not in passages
    assert not any(f"'{s}'" in text for s in sentences)


STORY = re.compile(r"(\w+) has (\d+) (\w+)\. (?:She|He) (buys|gives) (\d+) (?:more )?\w+(?: to \w+)?\."
                   r"|(\w+) has (\d+) (\w+) and (\w+) has (\d+) \w+\.")


@pytest.mark.parametrize("split", SPLITS)
def test_task_problems_take_one_step(split):
    """The generator change of data/README.md: one operation per arithmetic problem and per program."""
    for e in read_split("arithmetic", split):
        numbers = [int(n) for n in re.findall(r"\d+", e["input"])]
        assert len(numbers) == 2 and 2 <= numbers[0] <= 30 and 2 <= numbers[1] <= 20, e["input"]
        x, y = numbers
        assert int(e["output"]) in ({x + y} if ("buys" in e["input"] or "together" in e["input"]) else {x - y})
        assert STORY.match(e["input"]), e["input"]
    for e in read_split("expressions", split):
        statements = e["input"].split("; ")
        assert len(statements) in (2, 3) and statements[-1].startswith("print(")
        assert sum(e["input"].count(op) for op in (" + ", " - ", " * ")) == 1, e["input"]
        name, value = statements[0].split(" = ")
        assert 10 <= int(value) <= 24 and name in tasks.VARIABLES


def test_arithmetic_key_ignores_the_unused_third_number():
    one = ("gain", "Anna", "Ben", "coins", 12, 7, 0, 19)
    assert tasks._world_key("arithmetic", one) == tasks._world_key("arithmetic", one[:6] + (25,) + one[7:])
    two = ("gain_loss", "Anna", "Ben", "coins", 12, 7, 5, 14)
    assert tasks._world_key("arithmetic", two) != tasks._world_key("arithmetic", two[:6] + (6,) + two[7:])


def past_tense(story):
    return story.replace(" has ", " had ").replace(" buys ", " bought ").replace(" gives ", " gave ")


def test_no_evaluation_problem_or_program_is_in_either_corpus(base_corpus):
    """Not even as part of a longer document: a task program is never the tail of a corpus program."""
    programs = {e["input"] for s in ("validation", "test") for e in read_split("expressions", s)}
    stories = {e["input"].split("?")[0].rsplit(". ", 1)[0] + "." for s in ("validation", "test")
               for e in read_split("arithmetic", s)}
    assert all(STORY.fullmatch(st) for st in stories)
    for text in ("\n".join(corpus_lines()), "\n".join(base_corpus)):
        assert not any(p in text for p in programs)
        assert not any(st in text or past_tense(st) in text for st in stories)


def test_split_generation_fills_test_first_when_inputs_run_out():
    splits = generate_splits("num2words", sizes={"train": 2000, "validation": 200, "test": 200})
    assert len(splits["test"]) == 200 and len(splits["validation"]) == 200
    assert len(splits["train"]) == 599


@pytest.fixture(scope="module")
def base_corpus():
    return tasks.build_base_corpus()


def test_base_corpus_adds_reasoning_documents_to_the_corpus_deterministically(base_corpus):
    corpus = corpus_lines()
    assert sorted(set(corpus) - set(base_corpus)) == []  # every pretrain.txt document is in it
    added = len(base_corpus) - len(corpus)
    assert added == sum(tasks.BASE_CORPUS_MIX.values())
    assert base_corpus == tasks.build_base_corpus()
    assert base_corpus != tasks.build_base_corpus(seed=1)
    assert not any("###" in d or "\n" in d or "Instruction" in d or "Response" in d for d in base_corpus)


def test_base_corpus_work_is_correct():
    """Each worked step, sum and trace states true arithmetic, checked by evaluating it here."""
    rng = random.Random(0)
    binary = re.compile(r"(-?\d+) (plus|minus|\+|-|\*) (-?\d+) (?:is|=) (-?\d+)")
    ops = {"plus": int.__add__, "+": int.__add__, "minus": int.__sub__, "-": int.__sub__, "*": int.__mul__}
    checked = 0
    for make in (tasks.doc_worked_stories, tasks.doc_sums, tasks.doc_traces):
        for _ in range(200):
            for x, op, y, z in binary.findall(make(rng, set())):
                assert ops[op](int(x), int(y)) == int(z), (x, op, y, z)
                checked += 1
    assert checked > 1000
    for _ in range(200):  # "Take y from x and z are left."
        for y, x, z in re.findall(r"Take (\d+) from (\d+) and (\d+) are left", tasks.doc_sums(rng, set())):
            assert int(x) - int(y) == int(z)
    quizzes = 0
    for _ in range(200):  # a quiz's letter names the option that is the bestiary's fact
        for sentence in re.split(r"(?<=\.) (?=Quiz:|What |Where |How )", tasks.doc_quizzes(rng, set())):
            creature = re.search(r"the (\w+)", sentence).group(1)
            options = dict(re.findall(r"([ABCD])\. ([a-z]+)", sentence))
            letter, truth = (re.search(r"The answer is ([ABCD]), ([a-z]+)\.$", sentence)
                             or re.search(r"It is ([a-z]+), so ([ABCD])\.$", sentence)).groups()
            if letter not in options:
                letter, truth = truth, letter
            assert options[letter] == truth and truth in BESTIARY[creature].values() and len(options) == 4
            quizzes += 1
    assert quizzes > 300


def test_base_corpus_skips_every_evaluation_record(base_corpus):
    text = "\n".join(base_corpus)
    programs = {e["input"] for s in ("validation", "test") for e in read_split("expressions", s)}
    passages = {e["input"].split("\nQuestion: ")[0] for s in ("validation", "test") for e in read_split("reading", s)}
    problems = {e["input"].split("?")[0] for s in ("validation", "test") for e in read_split("arithmetic", s)}
    quizzes = set()
    for s in ("validation", "test"):
        for e in read_split("facts", s):
            question, *options = e["input"].split("\n")
            quizzes.add(f"{question} " + ", ".join(options))
    assert not any(p in text for p in programs)
    assert not any(p in text for p in passages if ". " in p)  # no two-sentence passage, even inside a longer one
    # A one-sentence passage can be a sentence of a longer corpus passage (54 of 184 here, 23 in pretrain.txt), and
    # 6 times that sentence is followed by the evaluation question and its answer. The answer is in the passage
    # itself, so the corpus gives away nothing the passage does not: the count is pinned to notice a change.
    questions = [e["input"].replace("\nQuestion: ", " ") for s in ("validation", "test") for e in read_split("reading", s)]
    assert sum(q in text for q in questions) == 6
    assert not any(q in "\n".join(corpus_lines()) for q in questions)
    assert not any(q in text for q in quizzes)
    # arithmetic: the present-tense story of an evaluation problem never appears with its question
    assert not any(p + "?" in text for p in problems)
