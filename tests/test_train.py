"""The shared training loop: schedule, data encoding, determinism, checkpoints, evaluation."""

import math
import re

import pytest
import torch

from minilora.inject import inject
from minilora.methods.lora import LoraConfig
from minilora.models import DecoderLM, Seq2SeqLM, get_config
from minilora.tasks import format_prompt, load_task
from minilora.tokenizer import load_tokenizer
from minilora.train import (
    IGNORE_INDEX,
    TrainConfig,
    collate,
    encode_examples,
    evaluate,
    exact_match,
    generate_answers,
    lm_chunks,
    lr_at,
    train,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return list(load_task("arithmetic", "train"))[:64]


def _tiny_decoder(vocab):
    return DecoderLM(get_config("decoder-tiny", vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    warm = [lr_at(s, cfg) for s in range(10)]
    assert warm == sorted(warm) and warm[-1] < 1.0
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, fix",
    [({"steps": 0}, "steps must be >= 1"), ({"lr": 0}, "lr must be > 0"), ({"warmup_steps": 5, "steps": 5}, "warmup_steps"),
     ({"batch_size": 0}, "batch_size"), ({"grad_clip": -1}, "grad_clip")],
)
def test_bad_train_config_names_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        TrainConfig(**kwargs)


def test_decoder_encoding_masks_the_prompt_and_ends_with_eos(tok, examples):
    row = encode_examples(examples[:1], tok)[0]
    prompt = tok.encode(format_prompt(examples[0]), add_bos=True)
    assert row["input_ids"][: len(prompt)] == prompt and row["input_ids"][0] == tok.bos_id
    assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = row["labels"][len(prompt):]
    assert answer[-1] == tok.eos_id and tok.decode(answer) == examples[0]["output"]


def test_seq2seq_encoding_puts_the_prompt_in_the_encoder(tok, examples):
    row = encode_examples(examples[:1], tok, kind="seq2seq")[0]
    assert tok.decode(row["input_ids"]) == format_prompt(examples[0])
    assert row["labels"] == tok.encode(examples[0]["output"], add_eos=True)


def test_too_long_example_names_max_len(tok, examples):
    with pytest.raises(ValueError, match="max_len"):
        encode_examples(examples[:1], tok, max_len=8)


def test_collate_pads_left_or_right_and_never_trains_on_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [8], "labels": [4]}]
    right = collate(rows, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    left = collate(rows, pad_id=0, left_pad=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_lm_chunks_pack_documents_into_equal_blocks(tok):
    blocks = lm_chunks(["one two three"] * 20, tok, block_size=16)
    assert blocks and all(len(b["input_ids"]) == 16 for b in blocks)
    with pytest.raises(ValueError, match="fewer than one block"):
        lm_chunks(["hi"], tok, block_size=10_000)


def test_training_is_deterministic_given_a_seed_and_lowers_the_loss(tok, examples):
    rows = encode_examples(examples, tok)
    cfg = TrainConfig(steps=12, batch_size=8, warmup_steps=2, lr=1e-2, log_every=4, progress=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = _tiny_decoder(tok.vocab_size)
        runs.append(train(model, rows, cfg, pad_id=tok.pad_id))
    assert runs[0].loss == runs[1].loss  # the same operations in the same process: the same bits
    assert runs[0].loss[-1] < runs[0].loss[0]
    assert runs[0].steps == [4, 8, 12]


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_does_not_change_training(tok, examples, lora):
    rows = encode_examples(examples, tok)
    losses = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = _tiny_decoder(tok.vocab_size)
        if lora:  # recomputation goes through FrozenLinearWithLora's forward again
            inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=1, log_every=1, gradient_checkpointing=ckpt, progress=False)
        losses.append(train(model, rows, cfg, pad_id=tok.pad_id).loss)
    # recomputation repeats the same operations; 1e-5 relative covers any fp32 reordering across 4 steps
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_train_refuses_a_fully_frozen_model(tok, examples):
    model = _tiny_decoder(tok.vocab_size).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, encode_examples(examples, tok), TrainConfig(steps=2, warmup_steps=0, progress=False))


def test_evaluate_reports_token_weighted_loss_and_perplexity(tok, examples):
    model = _tiny_decoder(tok.vocab_size).eval()
    rows = encode_examples(examples[:8], tok)
    batch = collate(rows, tok.pad_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    ).item()
    result = evaluate(model, rows, batch_size=3, pad_id=tok.pad_id)
    # other batches pad to other lengths, so fp32 sums run in another order: 1e-5 relative, not equality
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


class _Echo(torch.nn.Module):
    """A stand-in model whose greedy answer is a fixed token sequence, to test the scoring alone."""

    def __init__(self, answer_ids, seq2seq=False):
        super().__init__()
        self.answer_ids = answer_ids
        self.config = type("C", (), {"n_encoder_layers": 1 if seq2seq else 0})()

    def generate(self, input_ids, max_new_tokens, attention_mask=None, eos_token_id=None):
        start = torch.zeros(input_ids.shape[0], 1, dtype=torch.long) if self.config.n_encoder_layers else input_ids
        new = torch.tensor(self.answer_ids).repeat(input_ids.shape[0], 1)
        return torch.cat([start, new], dim=1)


@pytest.mark.parametrize("seq2seq", [False, True])
def test_exact_match_cuts_at_eos_and_compares_stripped_text(tok, seq2seq):
    examples = [{"instruction": "Say it.", "input": "x", "output": "43"}, {"instruction": "Say it.", "input": "y", "output": "44"}]
    model = _Echo(tok.encode(" 43") + [tok.eos_id] + tok.encode(" junk"), seq2seq=seq2seq)
    assert generate_answers(model, tok, examples) == ["43", "43"]
    assert exact_match(model, tok, examples) == 0.5


def test_seq2seq_model_trains_and_scores(tok):
    examples = list(load_task("num2words", "train"))[:32]
    rows = encode_examples(examples, tok, kind="seq2seq")
    model = Seq2SeqLM(get_config("seq2seq-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_encoder_layers=1,
                                 n_heads=2, d_ff=64))
    history = train(model, rows, TrainConfig(steps=6, batch_size=8, warmup_steps=1, lr=1e-2, log_every=3, progress=False))
    assert history.loss[-1] < history.loss[0]
    answers = generate_answers(model, tok, examples[:4], max_new_tokens=4)
    assert len(answers) == 4 and all(isinstance(a, str) and "<eos>" not in a for a in answers)


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tok, examples, tmp_path):
    rows = encode_examples(examples, tok)
    cfg = TrainConfig(steps=24, batch_size=4, lr=3e-3, warmup_steps=2, progress=False)

    def model():
        torch.manual_seed(0)
        return DecoderLM(get_config("decoder-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                    n_kv_heads=1, d_ff=64, dropout=0.1))  # dropout: the random state resumes too

    whole = model()
    expected = train(whole, rows, cfg, pad_id=tok.pad_id)

    class Interrupted(Exception):
        pass

    def stop_at_13(m, step):
        if step == 13:
            raise Interrupted

    path = tmp_path / "run.pt"
    with pytest.raises(Interrupted):
        train(model(), rows, cfg, pad_id=tok.pad_id, checkpoint=path, checkpoint_every=5, on_step=stop_at_13)
    assert torch.load(path, weights_only=True)["step"] == 10
    resumed = model()
    history = train(resumed, rows, cfg, pad_id=tok.pad_id, checkpoint=path, checkpoint_every=5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert history.steps == expected.steps and history.loss == expected.loss and history.lr == expected.lr
    assert history.wall_time_s > 0
    # a finished run's file resumes at the end: nothing more trains
    again = model()
    train(again, rows, cfg, pad_id=tok.pad_id, checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), again.state_dict().values()))


def test_resuming_under_another_config_or_data_is_refused_and_names_the_difference(tok, examples, tmp_path):
    rows = encode_examples(examples, tok)
    cfg = TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, progress=False)
    path = tmp_path / "run.pt"
    train(_tiny_decoder(tok.vocab_size), rows, cfg, pad_id=tok.pad_id, checkpoint=path)
    other = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"lr: 0.003 in the checkpoint, 0.001 now.*delete the file"):
        train(_tiny_decoder(tok.vocab_size), rows, other, pad_id=tok.pad_id, checkpoint=path)
    with pytest.raises(ValueError, match=r"written for 64 training rows, now there are 60"):
        train(_tiny_decoder(tok.vocab_size), rows[:60], cfg, pad_id=tok.pad_id, checkpoint=path)
    # progress is not part of the recipe: a run with the bar on resumes a run without it
    train(_tiny_decoder(tok.vocab_size), rows, TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=1), pad_id=tok.pad_id, checkpoint=path)


def test_a_checkpoint_holds_the_trainable_parameters_alone_and_refuses_a_model_with_others(tok, examples, tmp_path):
    rows = encode_examples(examples, tok)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=0, progress=False)

    def lora(targets):
        torch.manual_seed(0)
        return inject(_tiny_decoder(tok.vocab_size), LoraConfig(r=2, alpha=4, target_modules=targets))

    path = tmp_path / "run.pt"
    model = lora(["q_proj", "v_proj"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    train(model, rows, cfg, pad_id=tok.pad_id, checkpoint=path)
    saved = torch.load(path, weights_only=True)
    assert set(saved["model"]) == set(trainable) and all(".lora_" in n for n in trainable)  # no frozen base
    assert set(saved["optimizer"]["state"]) == set(trainable)
    for n, p in trainable.items():
        assert torch.equal(saved["model"][n], p.detach()), n
    other = lora(["q_proj", "k_proj"])
    before = {k: v.clone() for k, v in other.state_dict().items()}

    def listed(proj):  # the message's sorted list of one projection's LoRA matrices
        return re.escape(str([f"model.layers.0.self_attn.{proj}.lora_{m}.default.weight" for m in "AB"]))

    with pytest.raises(ValueError, match=f"missing from the file: {listed('k_proj')}; in the file, not trainable "
                                         f"here: {listed('v_proj')}.*delete the file"):
        train(other, rows, cfg, pad_id=tok.pad_id, checkpoint=path)
    after = other.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # refused before anything was loaded
