"""Supervised fine-tuning of the reference policy pi_ref on IMDb review text.

The tiny profile trains a small GPT-2 from scratch; the gpt2 profile fine-tunes the hub's ``gpt2``.
Reviews are cleaned, tokenised, joined with EOS and packed into fixed-length blocks (the standard
causal-LM recipe). Training is cached by a key over everything it depends on and resumable: a
checkpoint (model, optimiser, scheduler, step) is written atomically every ``sft_checkpoint_every``
steps, and the batch of step ``s`` depends only on (seed, s), so a resumed run equals an uninterrupted one.

Derived and run in notebooks/01_sft_reference.ipynb.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tdpo_lab.config import Config
from tdpo_lab.data import clean_text, dataset_fingerprint, load_imdb
from tdpo_lab.models import build_model, load_model
from tdpo_lab.runs import read_jsonl_tolerant, truncate_jsonl
from tdpo_lab.tokenizer import get_tokenizer
from tdpo_lab.utils import (
    append_jsonl,
    atomic_path,
    exclusive_lock,
    load_training_state,
    progress_off,
    save_training_state,
    seed_everything,
    select_device,
    set_threads,
)

# Everything the SFT model depends on; changing any of these trains a new model.
SFT_FIELDS = (
    "profile",
    "seed",
    "data_path",
    "max_train_reviews",
    "tokenizer",
    "vocab_size",
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "sft_steps",
    "sft_batch_size",
    "sft_block_size",
    "sft_lr",
    "sft_warmup_steps",
    "sft_weight_decay",
)


def sft_key(cfg: Config) -> str:
    """Cache key of the SFT model: its config fields plus the fingerprint of the training data."""
    train = load_imdb("train", cfg.data_path or None)
    return cfg.key(*SFT_FIELDS, extra=dataset_fingerprint(train))


def sft_dir(cfg: Config) -> Path:
    """The folder of the SFT stage: ``model/`` when finished, ``checkpoint.pt`` while training."""
    return cfg.cache_path / "sft" / sft_key(cfg)


def pack_blocks(token_lists: list[list[int]], eos_id: int, block_size: int) -> torch.Tensor:
    """Join token lists with EOS after each and cut the stream into ``[num_blocks, block_size]``.

    The tail shorter than one block is dropped.
    """
    stream = [tok for ids in token_lists for tok in (*ids, eos_id)]
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"not enough text for one block of {block_size} tokens ({len(stream)} tokens in all)"
        )
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def _texts(cfg: Config, split: str) -> list[str]:
    ds = load_imdb(split, cfg.data_path or None)
    texts = [clean_text(t) for t in ds["text"]]
    if split == "train" and cfg.max_train_reviews:
        texts = texts[: cfg.max_train_reviews]
    return texts


def _batch_indices(num_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Block indices of step ``step``: a seeded permutation per epoch, so a step's batch needs no state."""
    per_epoch = max(num_blocks // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_blocks, generator=gen)
    return perm[offset * batch_size : (offset + 1) * batch_size]


def _lr_lambda(cfg: Config):
    def schedule(step: int) -> float:
        # linear warm-up, then cosine decay to 10% (nanoGPT's recipe)
        if step < cfg.sft_warmup_steps:
            return (step + 1) / cfg.sft_warmup_steps
        progress = (step - cfg.sft_warmup_steps) / max(cfg.sft_steps - cfg.sft_warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return schedule


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) on held-out blocks."""
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        losses.append(model(input_ids=batch, labels=batch).loss.item())
    model.train(was_training)
    return float(sum(losses) / len(losses))


def train_sft(cfg: Config, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train (or fetch from the cache) the SFT model pi_ref and return its ``save_pretrained`` folder.

    ``stop_after`` ends the call after that many steps without finishing (used to test resumption).
    The training history (step, train_loss, lr, eval_loss) is in ``<folder>/../history.jsonl``.
    """
    root = sft_dir(cfg)
    final = root / "model"
    if (final / "config.json").exists():
        return final
    with exclusive_lock(root / ".lock"):  # a second process waits, then finds the model done
        if (final / "config.json").exists():
            return final
        return _train_sft(cfg, root, progress=progress, stop_after=stop_after)


def _train_sft(cfg: Config, root: Path, *, progress: bool, stop_after: int | None) -> Path:
    final = root / "model"
    root.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.num_threads)
    device = select_device(cfg.device)
    tokenizer = get_tokenizer(cfg)
    eos = tokenizer.eos_token_id
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    train_blocks = pack_blocks(encode(_texts(cfg, "train")), eos, cfg.sft_block_size)
    test_texts = _texts(cfg, "test")[: max(cfg.sft_eval_batches * cfg.sft_batch_size * 2, 16)]
    eval_blocks = pack_blocks(encode(test_texts), eos, cfg.sft_block_size)
    eval_blocks = eval_blocks[: cfg.sft_eval_batches * cfg.sft_batch_size]

    seed_everything(cfg.seed)
    model = build_model(cfg, tokenizer).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.sft_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.sft_lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    history_path = root / "history.jsonl"
    ckpt_path = root / "checkpoint.pt"
    step = 0
    if ckpt_path.exists():
        step = load_training_state(ckpt_path, model, optimizer, scheduler, device)
        truncate_jsonl(history_path, step)
        print(f"SFT: resuming from step {step} of {cfg.sft_steps} ({ckpt_path})")
    else:
        history_path.unlink(missing_ok=True)
        append_jsonl(
            history_path,
            {"step": 0, "eval_loss": heldout_loss(model, eval_blocks, cfg.sft_batch_size, device)},
        )

    model.train()
    bar = tqdm(total=cfg.sft_steps, initial=step, desc="SFT", disable=progress_off(progress))
    start_time, tokens = time.perf_counter(), 0
    steps_this_call = 0
    while step < cfg.sft_steps:
        if stop_after is not None and steps_this_call >= stop_after:
            bar.close()
            return final
        batch = train_blocks[_batch_indices(len(train_blocks), cfg.sft_batch_size, step, cfg.seed)].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        steps_this_call += 1
        tokens += batch.numel()
        record = {"step": step, "train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_steps:
            record["eval_loss"] = heldout_loss(model, eval_blocks, cfg.sft_batch_size, device)
        append_jsonl(history_path, record)
        bar.update(1)
        bar.set_postfix(
            loss=f"{record['train_loss']:.3f}", tok_s=f"{tokens / (time.perf_counter() - start_time):.0f}"
        )
        if step % cfg.sft_checkpoint_every == 0 and step < cfg.sft_steps:
            save_training_state(ckpt_path, model, optimizer, scheduler, step)
    bar.close()
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    ckpt_path.unlink(missing_ok=True)
    return final


def sft_history(cfg: Config) -> list[dict]:
    """The SFT training history (one dict per step; ``eval_loss`` at evaluation steps)."""
    return read_jsonl_tolerant(sft_dir(cfg) / "history.jsonl")[0]


def load_reference(cfg: Config, *, attn_implementation: str | None = None, progress: bool = True):
    """The SFT model (trained first if not cached) and its tokenizer, on the configured device, eval mode."""
    from transformers import AutoTokenizer

    folder = train_sft(cfg, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(str(folder), attn_implementation=attn_implementation).to(select_device(cfg.device))
    model.eval()
    return model, tokenizer
