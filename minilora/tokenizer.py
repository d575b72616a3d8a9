"""A byte-level BPE tokenizer for the minilora world, trained with Hugging Face ``tokenizers``.

    text --split digits--> " 4" "0" "4" ...  --byte-level--> "Ġ4" "0" "4"  --BPE merges--> ids

- Byte-level pre-tokenisation (as in GPT-2) maps every byte to a visible character, so any
  string encodes without <unk> and ``decode(encode(s)) == s`` exactly, spaces and newlines included.
- Digits are split one by one (a leading space may stay attached to the first), so 404 is three
  tokens rather than one of a thousand number tokens: arithmetic and number-to-words then work
  digit by digit, as they would on paper.
- Special tokens have fixed ids: <pad>=0 <bos>=1 <eos>=2 <unk>=3 <sep>=4. ``encode`` never adds
  them unless asked, and text that spells one literally (e.g. "<eos>") is read as that token.
- Trained on data/corpus/pretrain.txt plus every task's train split (prompt and answer), vocab 2048.
  Training is single-pass and order-fixed, and the written JSON is byte-identical across runs
  (tests/test_tokenizer.py retrains and compares).

``python -m minilora.tokenizer`` trains and writes data/tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from minilora.tasks import FIRST_GENERATORS, TASKS, data_dir, full_text, generate_all, generate_splits

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<sep>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID = range(5)
VOCAB_SIZE = 2048


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids and calls the library uses."""

    def __init__(self, backend):
        self.backend = backend
        for token, expected in zip(SPECIAL_TOKENS, range(5)):
            got = backend.token_to_id(token)
            if got != expected:
                raise ValueError(f"special token {token} has id {got}, expected {expected}; "
                                 "retrain with `python -m minilora.tokenizer`")

    pad_id, bos_id, eos_id, unk_id, sep_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [BOS_ID] * add_bos + ids + [EOS_ID] * add_eos

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [[BOS_ID] * add_bos + e.ids + [EOS_ID] * add_eos for e in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special: bool = True) -> list[str]:
        return [self.decode(ids, skip_special) for ids in batch]

    def tokens(self, text: str) -> list[str]:
        """The token strings of ``text`` (byte-level: a leading space shows as "Ġ")."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # pretty=True gives a stable, diff-friendly file; newline-terminated for git
        text = self.backend.to_str(pretty=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run `python -m minilora.tokenizer` to train it")
        return cls(Backend.from_file(str(path)))


def default_path() -> Path:
    return data_dir() / "tokenizer.json"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The committed tokenizer (data/tokenizer.json, or $MINILORA_DATA/tokenizer.json)."""
    return Tokenizer.load(path if path is not None else default_path())


def training_texts() -> list[str]:
    """Corpus documents, then each task's train examples as full prompt + answer, in a fixed order.

    Regenerated in memory from the seeds (well under a second), so training does not depend on what happens to be
    on disk. Four families are drawn as the task files were when the tokenizer was trained (``tasks.FIRST_GENERATORS``:
    multi-step stories and programs, longer passages, letter answers); today's tasks use the same words and digits,
    so the committed tokenizer and every base stay as they are."""
    splits, corpus = generate_all()
    for name, generators in FIRST_GENERATORS.items():
        splits[name] = generate_splits(name, **generators)
    return corpus + [full_text(e, name) for name in TASKS for e in splits[name]["train"]]


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (default: corpus + task train splits)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever <unk>
        show_progress=False,
    )
    backend.train_from_iterator(list(texts if texts is not None else training_texts()), trainer=trainer)
    return Tokenizer(backend)


def main() -> None:
    path = default_path()
    tok = train_tokenizer()
    tok.save(path)
    print(f"{path}  vocab {tok.vocab_size}  {path.stat().st_size:,d} bytes")


if __name__ == "__main__":
    main()
