"""Training and evaluation loops shared by every lesson.

One loop serves pretraining, full fine-tuning and every adapter method: it optimises whatever
parameters have ``requires_grad=True``, so freezing the base (done by ``inject``) is all it takes to
train an adapter instead of the whole model.

    encode_examples   instruction examples -> token ids + labels (loss on the response only)
    lm_chunks         a plain-text corpus -> fixed-length blocks for language-model pretraining
    train             AdamW, linear warmup + cosine decay, gradient clipping, optional gradient checkpointing,
                      checkpoints that resume, and under torchrun DistributedDataParallel over the trainable
                      parameters (python -m minilora.train is the command line: __main__.py)
    evaluate          mean loss and perplexity on held-out examples
    exact_match       generate an answer for each prompt and compare it with the reference text

Everything is deterministic given ``TrainConfig.seed`` on a fixed machine and thread count.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding positions)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10  # record the running loss every N steps
    progress: bool = True  # tqdm bar; lessons turn it off so validated output stays stable

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    wall_time_s: float = field(default=0.0, compare=False)  # seconds in the loop, summed over resumed runs

    @property
    def final_loss(self) -> float:
        return self.loss[-1]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


# ----------------------------------------------------------------------------- data


def encode_examples(examples, tokenizer, kind: str = "decoder", max_len: int = 256) -> list[dict]:
    """Turn instruction examples into token ids.

    decoder:  input_ids = <bos> prompt output <eos>, labels = IGNORE on the prompt, ids on the response,
              so the loss teaches the answer and not the question.
    seq2seq:  input_ids = prompt <eos> (encoder), labels = output <eos> (decoder targets).
    """
    from minilora.tasks import format_prompt

    if kind not in ("decoder", "seq2seq"):
        raise ValueError(f"kind must be 'decoder' or 'seq2seq', got {kind!r}")
    encoded = []
    for ex in examples:
        prompt = tokenizer.encode(format_prompt(ex), add_bos=(kind == "decoder"))
        answer = tokenizer.encode(ex["output"], add_eos=True)
        if kind == "decoder":
            ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        else:
            ids, labels = prompt + [tokenizer.eos_id], answer
        if len(ids) > max_len or len(labels) > max_len:
            raise ValueError(
                f"example has {max(len(ids), len(labels))} tokens, more than max_len={max_len}; "
                "raise max_len (up to the model's max_seq_len) or shorten the example"
            )
        encoded.append({"input_ids": ids, "labels": labels})
    return encoded


def lm_chunks(texts, tokenizer, block_size: int) -> list[dict]:
    """Pack documents (each wrapped in <bos> ... <eos>) into contiguous blocks of ``block_size`` tokens."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_bos=True, add_eos=True)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return [
        {"input_ids": stream[i * block_size : (i + 1) * block_size]} for i in range(n_blocks)
    ]


def collate(rows: list[dict], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of rows to a batch; labels pad with IGNORE_INDEX so padding never enters the loss."""
    out = {}
    for key in rows[0]:
        pad = IGNORE_INDEX if key == "labels" else pad_id
        width = max(len(r[key]) for r in rows)
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            seq = torch.tensor(r[key], dtype=torch.long)
            span = slice(width - len(seq), width) if left_pad else slice(0, len(seq))
            batch[i, span] = seq
            mask[i, span] = 1
        out[key] = batch
        if key == "input_ids":
            out["attention_mask"] = mask
    return out


def _batches(rows: list[dict], batch_size: int, pad_id: int, generator: torch.Generator):
    """Endless shuffled batches; each epoch is a fresh permutation drawn from ``generator``."""
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([rows[i] for i in order[start : start + batch_size]], pad_id)


def _device(model) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "n_encoder_layers", 0))


def _model_inputs(model, batch: dict) -> dict:
    batch = {k: v.to(_device(model)) for k, v in batch.items()}
    if "labels" not in batch:  # plain language modelling: predict every next token
        batch = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)}
    if not _is_seq2seq(model):
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    return batch


# ----------------------------------------------------------------------------- loops


def train(model, rows: list[dict], cfg: TrainConfig, pad_id: int = 0, extra_loss=None, on_step=None,
          checkpoint: str | Path | None = None, checkpoint_every: int = 500, shard: bool = False) -> History:
    """Optimise the trainable parameters of ``model`` on ``rows`` (from encode_examples or lm_chunks).

    Hooks for methods that need more than the task loss (AdaLoRA's RankAllocator provides both):
      extra_loss(model) -> tensor   added to the loss before backward (e.g. a regulariser); the history
                                    records the task loss alone
      on_step(model, step)          after optimizer step ``step`` (1, 2, ..., cfg.steps), while the
                                    gradients of that step are still there

    Resuming (long pretraining runs): with ``checkpoint`` set, the trainable parameters (by name), their optimizer
    state, the schedule, random state, position in the data and history are written there every
    ``checkpoint_every`` steps and at the end, and a run that finds the file continues from it, so an interrupted run
    loses at most ``checkpoint_every`` steps and ends with the weights of an uninterrupted one. The frozen base is
    not written (an adapter's file stays the adapter's size): the resuming run must build the same base itself, as
    the command line does from the same base, preset and seed. A file written under a different TrainConfig, for
    other data or for other trainable parameters is refused, naming the differing fields or parameters, before
    anything is loaded. The file is read with ``torch.load(weights_only=True)``: no pickle runs.

    Under torchrun (a process group initialised, world size W > 1) every process runs this with the same rows and
    seed, so all draw the same global batches; each computes its W-th share of the rows, and
    DistributedDataParallel averages the gradients of the trainable parameters only (the frozen base is never
    synchronised). Each share's loss is scaled by W times its share of the batch's loss tokens, so the averaged
    gradient is the gradient of the whole batch's loss, as on one process (equal up to summation order when
    nothing random differs: no dropout). Only rank 0 writes the checkpoint; every process reads it to resume.

    With ``shard=True`` (torchrun only) the model is sharded instead with FSDP2 (`fully_shard` on every decoder or
    encoder layer, then on the whole model): each process keeps 1/W of every weight, frozen base included, and
    gathers a layer's weights just for its forward and backward. The model stays sharded afterwards (its state dict
    holds DTensors; `full_tensor()` gathers one). A checkpoint is the same single file: every process takes part in
    gathering the trainable parameters and their optimizer state whole, rank 0 writes them, and on resume every
    process reads the file and keeps its own shard.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if shard:  # before the optimizer is built: sharding replaces the parameters
        if world == 1:
            raise ValueError("shard=True needs torchrun (a process group of 2 or more); run without shard on one "
                             "process.")
        from torch.distributed.fsdp import fully_shard

        for layer in _blocks(model):
            fully_shard(layer)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; inject an adapter or unfreeze some weights")
    if len(rows) < cfg.batch_size:
        raise ValueError(f"only {len(rows)} training rows for batch_size={cfg.batch_size}; lower the batch size")
    rank = dist.get_rank() if world > 1 else 0
    if cfg.batch_size % world:
        raise ValueError(f"the global batch size {cfg.batch_size} does not divide over {world} processes; use a "
                         f"multiple of {world}.")
    torch.manual_seed(cfg.seed)  # dropout masks
    generator = torch.Generator().manual_seed(cfg.seed)  # data order
    # Decay matrices only; norms, biases and 1-D adapter vectors (IA3, DoRA magnitudes) are left alone.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.gradient_checkpointing

    history, running, first = History(), [], 0
    batches = _batches(rows, cfg.batch_size, pad_id, generator)
    if checkpoint is not None and Path(checkpoint).exists():
        first, running = _resume(Path(checkpoint), model, optimizer, scheduler, history, cfg, len(rows))
        for _ in range(first):  # replay the data order up to where the run stopped
            next(batches)
    runner = model
    if world > 1 and not shard:  # registers and all-reduces only parameters that require a gradient: the adapter's
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model)
    model.train()
    started = time.perf_counter() - history.wall_time_s
    bar = tqdm(range(first, cfg.steps), disable=not cfg.progress, desc="train", initial=first, total=cfg.steps)
    tokens, t0 = 0, time.perf_counter()
    for step in bar:
        inputs = _model_inputs(model, next(batches))
        tokens += int(inputs["attention_mask"].sum())
        scale = 1.0
        if world > 1:
            inputs, scale = _share(model, inputs, rank, world)
        out = runner(**inputs)
        loss = out.loss * scale if world > 1 else out.loss
        (loss + extra_loss(model) if extra_loss is not None else loss).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(model, step + 1)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        running.append(out.loss.item() if world == 1 else _batch_loss(loss.detach(), world))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.steps.append(step + 1)
            history.loss.append(sum(running) / len(running))
            history.lr.append(optimizer.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            running = []
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
            history.wall_time_s = time.perf_counter() - started
            _save_checkpoint(Path(checkpoint), step + 1, model, optimizer, scheduler, history, running, cfg, len(rows),
                             rank)
            if world > 1:
                dist.barrier()  # no process reads a checkpoint that is still being written
    history.wall_time_s = time.perf_counter() - started
    model.eval()
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = False
    return history


def _blocks(model) -> list:
    """The transformer layers FSDP2 shards one by one: a DecoderLM's, or a Seq2SeqLM's encoder and decoder layers."""
    stacks = [getattr(model, name, None) for name in ("model", "encoder", "decoder")]
    return [layer for s in stacks if isinstance(s, torch.nn.Module) for layer in getattr(s, "layers", [])]


def _loss_tokens(model, labels: torch.Tensor) -> int:
    """The positions a batch's loss averages over (the decoder predicts token t + 1 from t)."""
    return int((labels != IGNORE_INDEX).sum() if _is_seq2seq(model) else (labels[:, 1:] != IGNORE_INDEX).sum())


def _share(model, inputs: dict, rank: int, world: int) -> tuple[dict, float]:
    """This process's rows of a global batch, and the factor W * n_share / n_batch (loss tokens) for its loss."""
    n = inputs["input_ids"].shape[0] // world
    share = {k: v[rank * n:(rank + 1) * n] for k, v in inputs.items()}
    return share, world * _loss_tokens(model, share["labels"]) / _loss_tokens(model, inputs["labels"])


def _batch_loss(scaled: torch.Tensor, world: int) -> float:
    """The whole batch's loss from each process's scaled share: their sum over W."""
    total = scaled.clone()
    dist.all_reduce(total)
    return total.item() / world


def _resumable_fields(cfg: TrainConfig) -> dict:
    """The TrainConfig fields that shape the weights (progress and logging do not)."""
    d = asdict(cfg)
    d.pop("progress")
    d["betas"] = list(d["betas"])
    return d


def _trainable_names(model) -> set[str]:
    """The names a checkpoint holds: the trainable parameters (a tied weight under its first name only)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, step, model, optimizer, scheduler, history, running, cfg, n_rows, rank) -> None:
    """Every process calls this: gathering sharded (FSDP2) tensors takes them all. Rank 0 alone writes the file."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    # Whole tensors on rank 0's CPU (the other processes get empty dicts); the optimizer state is keyed by parameter
    # name, so it loads into an optimizer over a rebuilt model.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return
    trainable = _trainable_names(model)
    state = {
        "step": step, "config": _resumable_fields(cfg), "n_rows": n_rows,
        # the state dict keeps buffers (frozen too, e.g. QLoRA's codes) and a tied weight's second name: dropped
        "model": {k: v for k, v in weights.items() if k in trainable},
        "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "running": list(running),
        "history": {"steps": history.steps, "loss": history.loss, "lr": history.lr, "wall_time_s": history.wall_time_s},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interruption while writing leaves the previous checkpoint


def _resume(path: Path, model, optimizer, scheduler, history, cfg, n_rows) -> tuple[int, list[float]]:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = torch.load(path, weights_only=True)
    saved, now = state["config"], _resumable_fields(cfg)
    differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in differing)
        raise ValueError(f"{path} was written by a run with a different TrainConfig ({detail}); "
                         "use the same config to resume, or delete the file to start afresh")
    if state["n_rows"] != n_rows:
        raise ValueError(f"{path} was written for {state['n_rows']} training rows, now there are {n_rows}; "
                         "resume on the same data, or delete the file to start afresh")
    in_file, trainable = set(state["model"]), _trainable_names(model)
    if in_file != trainable:
        missing, unexpected = sorted(trainable - in_file), sorted(in_file - trainable)
        raise ValueError(f"{path} holds other trainable parameters than this model has (missing from the file: "
                         f"{missing}; in the file, not trainable here: {unexpected}); resume with the same model and "
                         "adapter, or delete the file to start afresh")
    # Every process holds the whole file and keeps its own shard of each tensor. Not strict: the names were checked
    # above, the frozen parameters keep the values the run rebuilt, and a trainable parameter that never had a
    # gradient has no optimizer state.
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    h = state["history"]
    history.steps, history.loss, history.lr, history.wall_time_s = h["steps"], h["loss"], h["lr"], h["wall_time_s"]
    return state["step"], list(state["running"])


@torch.no_grad()
def evaluate(model, rows: list[dict], batch_size: int = 32, pad_id: int = 0) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = _model_inputs(model, collate(rows[start : start + batch_size], pad_id))
        # The decoder loss shifts labels by one inside the model; the seq2seq loss does not.
        labels = batch["labels"] if _is_seq2seq(model) else batch["labels"][:, 1:]
        n_tokens = int((labels != IGNORE_INDEX).sum())
        total += model(**batch).loss.item() * n_tokens
        count += n_tokens
    model.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate_answers(model, tokenizer, examples, max_new_tokens: int = 24, batch_size: int = 32,
                     generate=None) -> list[str]:
    """Greedy answers for instruction examples (decoder: continue the prompt; seq2seq: decode from the prompt).
    `generate(input_ids, max_new_tokens, attention_mask=..., eos_token_id=...)` replaces model.generate, e.g. a
    mixture's (methods/mixture.py)."""
    from minilora.tasks import format_prompt

    seq2seq = _is_seq2seq(model)
    device = _device(model)
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        # seq2seq: the prompt is the encoder input; decoder: the prompt is left-padded and continued
        prompts = [tokenizer.encode(format_prompt(ex), add_bos=not seq2seq, add_eos=seq2seq) for ex in chunk]
        batch = collate([{"input_ids": p} for p in prompts], tokenizer.pad_id, left_pad=not seq2seq)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = (generate or model.generate)(input_ids, max_new_tokens, attention_mask=mask, eos_token_id=tokenizer.eos_id)
        new = out[:, 1:] if seq2seq else out[:, input_ids.shape[1]:]  # drop decoder_start / the prompt
        for row in new.tolist():
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            answers.append(tokenizer.decode(row).strip())
    model.train(was_training)
    return answers


def exact_match(model, tokenizer, examples, max_new_tokens: int = 24, batch_size: int = 32, generate=None) -> float:
    """Fraction of examples whose greedy answer equals the reference output exactly (after strip)."""
    examples = list(examples)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, generate)
    hits = sum(a == ex["output"].strip() for a, ex in zip(answers, examples))
    return hits / max(1, len(examples))
