"""Checks for the graded exercises of notebooks/01_sft_reference.ipynb (the SFT of pi_ref).

1. :func:`check_pack_blocks`: the token stream with EOS after every review, cut into blocks (``pack_blocks``);
2. :func:`check_lr_schedule`: linear warm-up, then cosine decay to 10% (the schedule the SFT trainer steps);
3. :func:`check_next_token_loss`: the mean next-token cross-entropy of a batch, with the one-position shift.

Each check computes the kit's value itself, on the small inputs the chapter already has, and names the
typical mistake a wrong value matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from tdpo_lab.config import Config
from tdpo_lab.core.logprobs import per_token_logps
from tdpo_lab.course.grading import ExerciseError, check_close, passed
from tdpo_lab.products.sft import _lr_lambda, pack_blocks

__all__ = ["check_lr_schedule", "check_next_token_loss", "check_pack_blocks"]


def _name_reshaped_mistake(mine: torch.Tensor, want: torch.Tensor, name: str, mistakes: Mapping) -> None:
    """Name a mistake whose value has another shape than the answer (``check_close`` stops at the shape)."""
    for mistake, wrong in mistakes.items():
        if wrong.shape != want.shape and mine.shape == wrong.shape and torch.equal(mine.long(), wrong):
            raise ExerciseError(f"{name} is not right: it looks like {mistake}.")


def _cut(stream: list[int], block_size: int) -> torch.Tensor:
    """Rows of ``block_size`` consecutive tokens, the tail dropped (the answer's layout, for the mistakes)."""
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def check_pack_blocks(mine, token_lists: list[list[int]], eos_id: int, block_size: int) -> None:
    """``mine``: ``token_lists`` joined with ``eos_id`` after each list and cut into ``[n, block_size]``."""
    want = pack_blocks(token_lists, eos_id, block_size)
    if isinstance(mine, torch.Tensor) and mine.is_floating_point():
        raise ExerciseError(
            f"mine holds {mine.dtype} numbers: token ids are integers (torch.long), the type an embedding "
            "table is indexed with; build the tensor from the list of ints (torch.tensor(stream))"
        )
    if not isinstance(mine, torch.Tensor):
        try:
            mine = torch.as_tensor(mine, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise ExerciseError(f"mine must be a tensor of token ids, got {type(mine).__name__}") from None
    stream = [tok for ids in token_lists for tok in (*ids, eos_id)]
    usable = len(stream) // block_size * block_size
    tail = len(stream) - usable
    padded = stream + [eos_id] * (-len(stream) % block_size)
    mistakes = {
        "the reviews joined without an EOS after each one (the model would never learn where a review ends)": (
            _cut([tok for ids in token_lists for tok in ids], block_size)
        ),
        "EOS put before each review instead of after it": _cut(
            [tok for ids in token_lists for tok in (eos_id, *ids)], block_size
        ),
        "the tail kept and padded to a full block: the tokens that do not fill a block are dropped": _cut(
            padded, block_size
        ),
        "the first tokens of the stream dropped instead of the tail at its end": _cut(
            stream[tail:], block_size
        ),
        "the stream laid into the blocks column by column (a transpose, or view(block_size, -1).T): "
        "each row must hold consecutive tokens": torch.tensor(stream[:usable], dtype=torch.long)
        .view(block_size, -1)
        .T.contiguous(),
    }
    _name_reshaped_mistake(mine.cpu(), want, "mine", mistakes)
    check_close(
        mine,
        want,
        name="mine",
        mistakes=mistakes,
        rtol=0,
        atol=0,
        hint="Write the stream out on paper: every review, then EOS; rows of block_size consecutive tokens.",
    )
    passed(
        f"{len(want)} blocks of {block_size} tokens, EOS after every review, the last {tail} token(s) dropped"
    )


def _schedule(cfg: Config, shape: Callable[[int], float]) -> torch.Tensor:
    """``cfg.sft_lr * shape(s)`` for s = 0..sft_steps (a mistake's schedule, or the trainer's)."""
    return torch.tensor([cfg.sft_lr * shape(s) for s in range(cfg.sft_steps + 1)], dtype=torch.float64)


def check_lr_schedule(lr_after: Callable[[int], float], cfg: Config) -> None:
    """``lr_after(s)``: the learning rate after ``s`` optimiser steps, for every s = 0..``cfg.sft_steps``.

    Compared with the trainer's own schedule: a ``LambdaLR`` over ``tdpo_lab.products.sft``'s multiplier, stepped as
    the training loop steps it (the rate of step s + 1's update, which the history logs at step s + 1).
    """
    if not callable(lr_after):
        raise ExerciseError(f"lr_after must be a function of the step s, got {type(lr_after).__name__}")
    W, S = cfg.sft_warmup_steps, cfg.sft_steps
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=cfg.sft_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(S):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    want = torch.tensor(rates, dtype=torch.float64)
    mine = torch.tensor([float(lr_after(s)) for s in range(S + 1)], dtype=torch.float64)

    def frac(s: int) -> float:  # progress through the decay, 0 at the end of the warm-up, 1 at the last step
        return min((s - W) / max(S - W, 1), 1.0)

    def warm(s: int, decay: Callable[[int], float]) -> float:
        return (s + 1) / W if s < W else decay(s)

    mistakes = {
        "a warm-up of s / W instead of (s + 1) / W: the first step would get learning rate 0": _schedule(
            cfg, lambda s: s / W if s < W else 0.1 + 0.45 * (1 + math.cos(math.pi * frac(s)))
        ),
        "a cosine that decays to 0 instead of to 10% of the peak": _schedule(
            cfg, lambda s: warm(s, lambda s: 0.5 * (1 + math.cos(math.pi * frac(s))))
        ),
        "0.1 + 0.5 (1 + cos): the decay must start at the peak, so 0.45 = 0.9 / 2 (the peak would be 1.1 "
        "sft_lr)": _schedule(cfg, lambda s: warm(s, lambda s: 0.1 + 0.5 * (1 + math.cos(math.pi * frac(s))))),
        "the cosine's progress counted from step 0 (s / S) instead of from the end of the warm-up": _schedule(
            cfg, lambda s: warm(s, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s / S, 1.0))))
        ),
        "cos(frac) without the factor pi: the cosine must run over half a period, from 1 to -1": _schedule(
            cfg, lambda s: warm(s, lambda s: 0.1 + 0.45 * (1 + math.cos(frac(s))))
        ),
        "a linear decay instead of a cosine": _schedule(cfg, lambda s: warm(s, lambda s: 1 - 0.9 * frac(s))),
        "no warm-up: the cosine from the first step": _schedule(
            cfg, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * max(frac(s), 0.0)))
        ),
        "the multiplier alone: multiply it by the peak rate cfg.sft_lr": want / cfg.sft_lr,
    }
    check_close(
        mine,
        want,
        name="lr_after(s) over s = 0..sft_steps",
        mistakes=mistakes,
        rtol=1e-9,
        atol=1e-15,
        hint="Check s < W (warm-up) and s >= W (decay) separately against the formula above.",
    )
    passed(
        "lr_after(s) is the trainer's learning rate at every step s"
    )  # the same line in every configuration


def check_next_token_loss(mine, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
    """``mine``: the mean over every block and position of -log p(token t + 1 | tokens <= t), a scalar.

    ``logits`` ``[N, T, V]`` from the model on ``input_ids`` ``[N, T]``; the kit's ``per_token_logps`` gives
    the per-position log-probabilities (``logits[:, t]`` predicts ``input_ids[:, t + 1]``).
    """
    logits = logits.detach().float()
    logps, _ = per_token_logps(logits, input_ids)  # [N, T-1], no position masked in a packed block
    want = -logps.mean()
    per_block = -logps.sum(-1).mean()

    def scored(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # z[n, t, ids[n, t]]
        return z.gather(-1, ids[..., None]).squeeze(-1)

    def log_softmax() -> (
        torch.Tensor
    ):  # [N, T, V]: computed only when a mistake needs it (a GPT-2 batch is big)
        return logits.log_softmax(-1)

    mistakes = {
        "no shift: logits[:, t] scored against token t instead of token t + 1": lambda: (
            -scored(log_softmax(), input_ids).mean()
        ),
        "the shift the wrong way round (logits[:, 1:] against input_ids[:, :-1])": lambda: (
            -scored(log_softmax()[:, 1:], input_ids[:, :-1]).mean()
        ),
        "the log-probability without its minus sign (a loss to minimise is -log p)": -want,
        "a sum over the positions and blocks instead of the mean": -logps.sum(),
        "each block's sum of -log p averaged over the blocks: the loss is a mean per token": per_block,
        "the raw logit of the next token, not its log-probability (subtract the log-sum-exp)": lambda: (
            -scored(logits[:, :-1], input_ids[:, 1:]).mean()
        ),
        "log base 2 (bits); the loss is in nats, the natural log": want / math.log(2),
        "the perplexity exp(loss), not the loss": want.exp(),
    }
    check_close(
        mine,
        want,
        name="mine",
        mistakes=mistakes,
        rtol=1e-5,
        atol=1e-5,
        hint="Position t predicts token t + 1: logits[:, :-1] go with input_ids[:, 1:].",
    )
    passed(f"mean next-token cross-entropy {want.item():.4f} nats over {logps.numel()} predicted tokens")
