import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.tasks import SPLITS, TASKS, data_dir, format_prompt
from minilora.tokenizer import (SPECIAL_TOKENS, VOCAB_SIZE, Tokenizer, load_tokenizer,
                                train_tokenizer)

DATA = data_dir()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def all_examples():
    for name in TASKS:
        for split in SPLITS:
            with open(DATA / "tasks" / name / f"{split}.jsonl", encoding="utf-8") as f:
                for line in f:
                    yield name, json.loads(line)


def corpus_lines():
    return (DATA / "corpus" / "pretrain.txt").read_text(encoding="utf-8").split("\n")[:-1]


def test_special_token_ids_are_fixed(tok):
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.sep_id) == (0, 1, 2, 3, 4)
    assert 261 < tok.vocab_size <= VOCAB_SIZE  # 5 specials + 256 bytes + merges


def test_retraining_writes_a_byte_identical_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_tokenizer().save(path)
    assert path.read_bytes() == (DATA / "tokenizer.json").read_bytes()


def test_round_trip_is_exact_on_every_corpus_line_and_task_example(tok):
    texts = corpus_lines()
    for name, example in all_examples():
        texts += [format_prompt(example), example["output"], example["input"]]
    texts.append("\n".join(corpus_lines()[:50]) + "\n")  # newlines and document boundaries too
    ids = tok.encode_batch(texts)
    assert all(tok.unk_id not in seq for seq in ids)
    assert [tok.decode(seq) for seq in ids] == texts


WORLD_WORDS = sorted(set(re.findall(r"[A-Za-z]+", " ".join(corpus_lines()[:2000]))))
world_text = st.lists(
    st.one_of(st.sampled_from(WORLD_WORDS), st.sampled_from(list(" \n\t.,?:;-'()=+*/0123456789")),
              st.integers(0, 2100).map(str)),
    max_size=40,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(world_text)
def test_round_trip_on_text_from_the_world_vocabulary(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60).filter(lambda s: "<" not in s))
def test_round_trip_on_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_bos_eos_and_skipping_special_tokens(tok):
    ids = tok.encode("The blorf hums.", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "The blorf hums."
    assert tok.decode(ids, skip_special=False) == "<bos>The blorf hums.<eos>"
    assert tok.encode_batch(["a b", "x = 3"], add_eos=True) == [tok.encode("a b", add_eos=True),
                                                                tok.encode("x = 3", add_eos=True)]


def test_digits_are_single_tokens(tok):
    assert tok.tokens("Mia has 404 apples") == ["Mia", "Ġhas", "Ġ4", "0", "4", "Ġapples"]


def test_prompts_and_answers_fit_the_tiny_models(tok):
    for name, example in all_examples():
        assert len(tok.encode(format_prompt(example))) <= 96, example
        assert len(tok.encode(example["output"])) <= 12, example
    assert max(len(ids) for ids in tok.encode_batch(corpus_lines())) < 256


def test_save_and_load_round_trip(tok, tmp_path, monkeypatch):
    tok.save(tmp_path / "tokenizer.json")
    monkeypatch.setenv("MINILORA_DATA", str(tmp_path))
    again = load_tokenizer()
    assert again.encode("Mia has 23 shells.") == tok.encode("Mia has 23 shells.")
    assert isinstance(again, Tokenizer)
    with pytest.raises(FileNotFoundError, match="python -m minilora.tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
