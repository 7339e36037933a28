"""The one resumable training loop that SFT and preference training share, and its batch schedule.

Both trainers hand :class:`TrainingLoop` a model, its optimiser and scheduler, and a ``step_fn(step)`` that
returns the batch loss and its metrics; the loop does the rest the same way for both: the backward pass,
gradient clipping, the optimiser and scheduler steps, one JSON line per step, evaluations, atomic
checkpoints and resuming from them, the progress bar, and ``stop_after`` (for resumption tests).

Resumption is exact because nothing random is carried between steps: the batch of step ``s`` is
:func:`batch_schedule` of (seed, s), and anything else a step samples is seeded from (seed, s) by the caller.
A resumed run drops the log lines written after its checkpoint (or cut off by the interruption) and redoes
those steps, so it ends identical to a run that was never interrupted (a test).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tdpo_lab.rundir import truncate_jsonl
from tdpo_lab.utils import append_jsonl, load_training_state, progress_off, save_training_state

StepFn = Callable[[int], tuple[torch.Tensor, dict]]


def batch_schedule(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the ``batch_size`` items of step ``step`` out of ``n``: a seeded permutation per epoch.

    A function of (n, batch_size, step, seed) only, so a resumed run needs no sampler state. Each epoch of
    ``n // batch_size`` steps visits every item at most once (the remainder of the permutation is skipped).
    """
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"need n > 0 items and batch_size > 0, got n={n}, batch_size={batch_size}")
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[offset * batch_size : (offset + 1) * batch_size]


@dataclasses.dataclass
class TrainingLoop:
    """One resumable loop of ``total_steps`` optimiser steps.

    ``logs[0]`` gets one JSON line per step (``step``, the step's metrics, ``learning_rate`` (= ``lr``), ``grad_norm``,
    ``seconds``, and whatever ``evaluate`` returned at that step); the other paths of ``logs`` are
    step-indexed logs the caller writes (evaluations) and that the loop clears on a fresh start and
    truncates on resume. A checkpoint is written every ``checkpoint_every`` steps and after every evaluation
    (so a resumed run never evaluates a step twice), never at the last step.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    checkpoint_path: Path
    logs: Sequence[Path]
    eval_every: int
    checkpoint_every: int
    max_grad_norm: float = 1.0
    desc: str = "training"
    on_record: Callable[[dict], None] | None = None  # called with every line written to logs[0] (trackers)

    def run(
        self,
        step_fn: StepFn,
        *,
        on_start: Callable[[], dict | None] | None = None,
        evaluate: Callable[[int], dict | None] | None = None,
        postfix: Callable[[dict], dict] | None = None,
        progress: bool = True,
        stop_after: int | None = None,
        device: torch.device | None = None,
    ) -> bool:
        """Train from the checkpoint (or from scratch) to ``total_steps``; True when finished.

        ``on_start()`` runs on a fresh start only; a dict it returns is logged as step 0. ``evaluate(step)``
        runs at every ``eval_every``-th step and the last; a dict it returns joins that step's line.
        ``postfix(record)`` gives the progress bar's postfix. Returns False when ``stop_after`` steps of
        this call are done first.
        """
        step = self._start(on_start, progress, device)
        bar = tqdm(total=self.total_steps, initial=step, desc=self.desc, disable=progress_off(progress))
        try:
            for done in range(self.total_steps - step):
                if stop_after is not None and done >= stop_after:
                    return False
                step = self._step(step_fn, step, evaluate)
                bar.update(1)
                if postfix is not None:
                    bar.set_postfix(postfix(self._last))
        finally:
            bar.close()
        return True

    def _start(self, on_start, progress: bool, device) -> int:
        if self.checkpoint_path.exists():
            step = load_training_state(
                self.checkpoint_path, self.model, self.optimizer, self.scheduler, device
            )
            for path in self.logs:  # lines written after the checkpoint are redone
                truncate_jsonl(path, step)
            if progress:
                print(
                    f"{self.desc}: resuming from step {step} of {self.total_steps} ({self.checkpoint_path})"
                )
            return step
        for path in self.logs:
            Path(path).unlink(missing_ok=True)
        start = on_start() if on_start is not None else None
        if start is not None:
            self._append({"step": 0, **start})
        return 0

    def _append(self, record: dict) -> None:
        append_jsonl(self.logs[0], record)
        if self.on_record is not None:
            self.on_record(record)

    def _step(self, step_fn: StepFn, step: int, evaluate) -> int:
        started = time.perf_counter()
        loss, metrics = step_fn(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        step += 1
        record = {
            "step": step,
            **metrics,
            "learning_rate": self.scheduler.get_last_lr()[0],  # TRL's name
            "lr": self.scheduler.get_last_lr()[0],  # the kit's first name, kept: chapter 01 reads it
            "grad_norm": float(grad_norm),
            "seconds": time.perf_counter() - started,
        }
        evaluated = step % self.eval_every == 0 or step == self.total_steps
        if evaluated and evaluate is not None:
            record.update(evaluate(step) or {})
        self._append(record)
        self._last = record
        if (step % self.checkpoint_every == 0 or evaluated) and step < self.total_steps:
            save_training_state(self.checkpoint_path, self.model, self.optimizer, self.scheduler, step)
        return step
