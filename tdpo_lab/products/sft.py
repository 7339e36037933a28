"""Supervised fine-tuning of the reference policy pi_ref on IMDb review text.

The tiny profile trains a small GPT-2 from scratch; the gpt2 profile fine-tunes the hub's ``gpt2``; the smol
profile (``sft_steps=0``) takes SmolLM2-135M-Instruct as it is: zero steps save the loaded model unchanged (with
its held-out loss as step 0 of the history), so the stage is also the cache of the dequantised GGUF model.
Reviews are cleaned, tokenised, joined with EOS and packed into fixed-length blocks (the standard
causal-LM recipe). Training is cached by a key over everything it depends on and resumable: a
checkpoint (model, optimiser, scheduler, step) is written atomically every ``sft_checkpoint_every``
steps, and the batch of step ``s`` depends only on (data_seed, s), so a resumed run equals an uninterrupted one.
In a job of several processes every process trains (DDP, each on its slice of the batch;
:mod:`tdpo_lab.core.distributed`) and the main process writes.

Derived and run in notebooks/01_sft_reference.ipynb.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tdpo_lab.cache.plan import SFT_FIELDS as SFT_FIELDS  # re-exported: notebook 01 prints it
from tdpo_lab.cache.plan import Plan
from tdpo_lab.cache.store import CacheError, fetch, fetch_together
from tdpo_lab.config import Config
from tdpo_lab.core.data import clean_text, load_imdb
from tdpo_lab.core.distributed import accelerator_for, check_split, device_of, rank_rows
from tdpo_lab.core.export import save_model
from tdpo_lab.core.jsonl import JsonlSteps, read_jsonl_tolerant
from tdpo_lab.core.loop import TrainingLoop, batch_schedule
from tdpo_lab.core.models import build_model, load_model
from tdpo_lab.core.precision import forward_autocast, warn_if_emulated
from tdpo_lab.core.utils import (
    seed_everything,
    select_device,
    set_threads,
)
from tdpo_lab.products.tokenizer import get_tokenizer


def sft_key(cfg: Config, *, plan: Plan | None = None) -> str:
    """Cache key of the SFT model (the pipeline's ``sft`` stage): ``SFT_FIELDS``, the tokenizer and the data."""
    return (plan or Plan(cfg)).key("sft")


def sft_dir(cfg: Config, *, plan: Plan | None = None) -> Path:
    """The folder of the SFT stage: ``model/`` and ``history.jsonl`` when finished, ``checkpoint.pt`` while training."""
    return (plan or Plan(cfg)).entry("sft").folder


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


def train_sft(
    cfg: Config,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    plan: Plan | None = None,
    accelerator=None,
) -> Path:
    """Train (or fetch from the cache) the SFT model pi_ref and return its ``save_pretrained`` folder.

    ``stop_after`` ends the call after that many steps without finishing (used to test resumption).
    The training history (step, train_loss, learning_rate = lr, eval_loss) is in ``<folder>/../history.jsonl``. The
    stage is locked (a second process waits, then finds the model done) and checked against its manifest
    on every call: a damaged model is retrained with a warning naming the file.

    In a job of several processes every process calls it with the job's ``accelerator``
    (:func:`tdpo_lab.core.distributed.accelerator_for`) and trains its share; without one, the model must be
    cached already there (a call inside ``main_process_first`` only reads it).
    """
    entry = (plan or Plan(cfg)).entry("sft")
    together = accelerator is not None and accelerator.num_processes > 1

    def build(folder: Path) -> bool:
        acc = accelerator or accelerator_for(cfg)
        if acc.num_processes > 1 and not together:
            raise RuntimeError(
                "train_sft: the SFT model is not cached and this job has several processes: call "
                "train_sft(cfg, accelerator=accelerator_for(cfg)) on every process first"
            )
        done = _train_sft(cfg, folder, acc, progress=progress, stop_after=stop_after)
        return (done / "config.json").is_file()  # False: stopped early, the checkpoint waits to be resumed

    if together:
        fetch_together(accelerator, entry, build, _model_folder, what="SFT model cache")
    else:
        fetch(entry, build, _model_folder, what="SFT model cache")
    return entry.folder / "model"


def _model_folder(folder: Path) -> Path:
    if not (folder / "model" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'model' / 'config.json'} is missing")
    return folder / "model"


def _train_sft(cfg: Config, root: Path, acc, *, progress: bool, stop_after: int | None) -> Path:
    final = root / "model"
    root.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.num_threads)
    device = device_of(acc)
    warn_if_emulated(cfg, device)
    check_split(cfg.sft_batch_size, acc.num_processes, cfg.grad_accum_steps, "sft_batch_size")
    with acc.main_process_first():  # built once, then read by the others
        tokenizer = get_tokenizer(cfg)
    eos = tokenizer.eos_token_id
    # whole reviews, longer than the context on purpose (packing cuts them): no too-long warning
    encode = lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    # sft_steps=0: pi_ref is the model as built or loaded (a pretrained one as shipped), saved with its held-out loss
    train_blocks = (
        pack_blocks(encode(_texts(cfg, "train")), eos, cfg.sft_block_size) if cfg.sft_steps else None
    )
    test_texts = _texts(cfg, "test")[: max(cfg.sft_eval_batches * cfg.sft_batch_size * 2, 16)]
    eval_blocks = pack_blocks(encode(test_texts), eos, cfg.sft_block_size)
    eval_blocks = eval_blocks[: cfg.sft_eval_batches * cfg.sft_batch_size]

    seed_everything(cfg.data_seed)
    model = build_model(cfg, tokenizer).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.sft_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.sft_lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    raw = model
    model, optimizer = acc.prepare(model, optimizer)  # DDP across processes, mixed precision
    loop = TrainingLoop(
        model,
        optimizer,
        scheduler,
        total_steps=cfg.sft_steps,
        checkpoint_path=root / "checkpoint.pt",
        log=JsonlSteps(root / "history.jsonl"),
        eval_every=cfg.sft_eval_every,
        checkpoint_every=cfg.sft_checkpoint_every,
        max_grad_norm=1.0,
        desc="SFT",
        accelerator=acc,
        grad_accum_steps=cfg.grad_accum_steps,
    )
    started, tokens = time.perf_counter(), [0]

    def step_fn(step: int, part: int):
        idx = batch_schedule(len(train_blocks), cfg.sft_batch_size, step, cfg.data_seed)
        idx = rank_rows(
            idx, rank=acc.process_index, world_size=acc.num_processes, parts=cfg.grad_accum_steps, part=part
        )
        batch = train_blocks[torch.as_tensor(idx)].to(device)
        tokens[0] += batch.numel() * acc.num_processes
        # every block has sft_block_size tokens, so the mean over a slice's tokens averages to the batch's
        with forward_autocast(cfg, device):  # bf16 on a CPU; transformers' loss upcasts the logits to fp32
            loss = model(input_ids=batch, labels=batch).loss
        return loss, {"train_loss": loss.item()}

    def held_out(step: int = 0) -> dict:  # the main process only (the loop's evaluations)
        return {"eval_loss": heldout_loss(raw, eval_blocks, cfg.sft_batch_size, device)}

    model.train()
    finished = loop.run(
        step_fn,
        on_start=held_out,
        evaluate=held_out,
        postfix=lambda r: {
            "loss": f"{r['train_loss']:.3f}",
            "tok_s": f"{tokens[0] / (time.perf_counter() - started):.0f}",
        },
        progress=progress,
        stop_after=stop_after,
        device=device,
    )
    if not finished:
        return final
    if acc.is_main_process:
        save_model(raw, tokenizer, final, cfg, kind="sft", metrics=_card_metrics(root / "history.jsonl"))
        loop.checkpoint_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    return final


def _card_metrics(history: Path) -> dict:
    """The SFT model card's metrics: held-out loss before and after training, last training loss."""
    rows = read_jsonl_tolerant(history)[0]
    evals = [r for r in rows if "eval_loss" in r]
    columns = {f"step {r['step']}": {"eval_loss": r["eval_loss"]} for r in evals[:1] + evals[-1:]}
    if rows and "train_loss" in rows[-1]:
        columns.setdefault(f"step {rows[-1]['step']}", {})["train_loss"] = rows[-1]["train_loss"]
    return columns


def sft_history(cfg: Config) -> list[dict]:
    """The SFT training history (one dict per step; ``eval_loss`` at evaluation steps).

    While training, the rows written so far; once finished, the checked copy of the stage (a damaged one
    is a :class:`~tdpo_lab.cache.store.CacheError` that says how to rebuild it).
    """
    entry = Plan(cfg).entry("sft")
    if entry.sealed and (problem := entry.problem()) is not None:
        raise CacheError(f"SFT model cache: {problem}. Run train_sft(cfg) to rebuild it")
    return read_jsonl_tolerant(entry.folder / "history.jsonl")[0]


def load_reference(
    cfg: Config, *, attn_implementation: str | None = None, progress: bool = True, plan: Plan | None = None
):
    """The SFT model (trained first if not cached) and its tokenizer, on the configured device, eval mode."""
    from transformers import AutoTokenizer

    folder = train_sft(cfg, progress=progress, plan=plan)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(str(folder), attn_implementation=attn_implementation).to(select_device(cfg.device))
    model.eval()
    return model, tokenizer
