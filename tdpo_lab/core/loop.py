"""The one resumable training loop that SFT and preference training share, and its batch schedule.

Both trainers hand :class:`TrainingLoop` a model, its optimiser and scheduler, and a ``step_fn(step, part)``
that returns the loss of micro-batch ``part`` of the step and its metrics; the loop does the rest the same way
for both: the backward passes, gradient clipping, the optimiser and scheduler steps, one JSON line per step,
evaluations, atomic checkpoints and resuming from them, the progress bar, and ``stop_after`` (for resumption
tests). Given an ``accelerator`` (:mod:`tdpo_lab.core.distributed`) it runs as one of several processes: the
backward passes go through it (DDP, mixed precision), the metrics are averaged over the processes, and only
the main process logs, evaluates and writes checkpoints.

Resumption is exact because nothing random is carried between steps: the batch of step ``s`` is
:func:`batch_schedule` of (seed, s), and anything else a step samples is seeded from (seed, s) by the caller.
A resumed run drops the log lines written after its checkpoint (or cut off by the interruption) and redoes
those steps, so it ends identical to a run that was never interrupted (a test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tdpo_lab.core.jsonl import JsonlSteps
from tdpo_lab.core.lora import TrainableState
from tdpo_lab.core.utils import load_training_state, progress_off, save_training_state

StepFn = Callable[[int, int], tuple[torch.Tensor, dict]]  # (step, part) -> (loss of the part, metrics)


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

    ``log`` gets one record per step (``step``, the step's metrics, ``learning_rate`` (= ``lr``, the rate this step's update used), ``grad_norm``,
    ``seconds``, and whatever ``evaluate`` returned at that step) through its ``append``; the loop calls its
    ``clear()`` on a fresh start and ``truncate(step)`` on resume, so logs the caller writes beside it
    (evaluations) stay in step. A run folder (:class:`tdpo_lab.runs.rundir.RunDir`) is such a log, and
    :class:`tdpo_lab.core.jsonl.JsonlSteps` makes one of plain files (a sequence of paths is taken as that). A checkpoint is written every ``checkpoint_every`` steps and after every evaluation
    (so a resumed run never evaluates a step twice), never at the last step.

    A step is ``grad_accum_steps`` backward passes, ``step_fn(step, part)`` for part = 0, 1, ..., each loss
    divided by their number (every part has as many rows, so the gradient is the batch mean); the metrics of
    a step are the means of its parts' (and, with several processes, of every process's). ``model`` is the
    model as ``accelerator.prepare`` returned it (a DDP wrapper with several processes).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    checkpoint_path: Path
    log: object  # clear(), truncate(step), append(record): a RunDir or a JsonlSteps (or paths)
    eval_every: int
    checkpoint_every: int
    max_grad_norm: float = 1.0
    desc: str = "training"
    accelerator: object = None  # an accelerate.Accelerator; None: this process alone, plain torch
    grad_accum_steps: int = 1
    on_record: Callable[[dict], None] | None = None  # called with every line appended to log (trackers)

    trainable_only: bool = False  # checkpoints hold only the parameters that require grad (LoRA: the adapter)

    def __post_init__(self) -> None:
        if isinstance(self.log, (list, tuple)):
            self.log = JsonlSteps(*self.log)

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def raw_model(self) -> torch.nn.Module:
        """The model without its DDP wrapper: what checkpoints hold."""
        return self.model if self.accelerator is None else self.accelerator.unwrap_model(self.model)

    @property
    def _saved(self):
        """What a checkpoint holds of the model: all of it, or its trainable part (the frozen rest is pi_ref's)."""
        return TrainableState(self.raw_model) if self.trainable_only else self.raw_model

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
        this call are done first. With several processes the three run on the main process only (the others
        wait for it in the next step's gradient averaging).
        """
        step = self._start(on_start, progress and self.is_main, device)
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc=self.desc,
            disable=progress_off(progress) or not self.is_main,
        )
        try:
            for done in range(self.total_steps - step):
                if stop_after is not None and done >= stop_after:
                    return False
                step = self._step(step_fn, step, evaluate)
                bar.update(1)
                if postfix is not None and self.is_main:
                    bar.set_postfix(postfix(self._last))
        finally:
            bar.close()
        return True

    def _start(self, on_start, progress: bool, device) -> int:
        if self.checkpoint_path.exists():  # every process reads it; nothing writes it before the first step
            step = load_training_state(
                self.checkpoint_path,
                self._saved,
                self.optimizer,
                self.scheduler,
                device,
                scaler=self._scaler,
            )
            if not self.is_main:
                return step
            self.log.truncate(step)  # lines written after the checkpoint are redone
            if progress:
                print(
                    f"{self.desc}: resuming from step {step} of {self.total_steps} ({self.checkpoint_path})"
                )
            return step
        if not self.is_main:
            return 0
        self.log.clear()
        start = on_start() if on_start is not None else None
        if start is not None:
            self._append({"step": 0, **start})
        return 0

    @property
    def _scaler(self):
        """fp16's gradient scaler (its scale is part of the training state), else None."""
        return getattr(self.accelerator, "scaler", None)

    def _backward(self, step_fn: StepFn, step: int) -> dict:
        """The step's backward passes (gradients summed in ``.grad``); the mean of their metrics."""
        acc, parts = self.accelerator, self.grad_accum_steps
        metrics = []
        for part in range(parts):
            # DDP averages the gradients across processes once, in the last part's backward pass
            last = part == parts - 1
            sync = contextlib.nullcontext() if last or acc is None else acc.no_sync(self.model)
            with sync:
                with contextlib.nullcontext() if acc is None else acc.autocast():
                    loss, part_metrics = step_fn(step, part)
                if parts > 1:
                    loss = loss / parts
                if acc is None:
                    loss.backward()
                else:
                    acc.backward(loss)
            metrics.append(part_metrics)
        if parts == 1 and (acc is None or acc.num_processes == 1):
            return metrics[0]
        keys = list(metrics[0])
        values = torch.tensor([[float(m[k]) for k in keys] for m in metrics], dtype=torch.float64).mean(0)
        if acc is not None and acc.num_processes > 1:
            values = acc.reduce(values.to(acc.device), reduction="mean").cpu()
        return dict(zip(keys, values.tolist(), strict=True))

    def _append(self, record: dict) -> None:
        self.log.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def _step(self, step_fn: StepFn, step: int, evaluate) -> int:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self._backward(step_fn, step)
        if self.accelerator is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        else:  # unscales fp16 gradients first
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        used = self.scheduler.get_last_lr()[0]  # the rate this update uses (scheduler.step moves to the next)
        self.optimizer.step()
        self.scheduler.step()
        step += 1
        if not self.is_main:
            return step
        record = {
            "step": step,
            **metrics,
            "learning_rate": used,  # TRL's name, and TRL's meaning: the rate of this step's update
            "lr": used,  # the kit's first name, kept: chapter 01 reads it
            "grad_norm": float(grad_norm),
            "seconds": time.perf_counter() - started,
        }
        evaluated = step % self.eval_every == 0 or step == self.total_steps
        if evaluated and evaluate is not None:
            record.update(evaluate(step) or {})
        self._append(record)
        self._last = record
        if (step % self.checkpoint_every == 0 or evaluated) and step < self.total_steps:
            save_training_state(
                self.checkpoint_path,
                self._saved,
                self.optimizer,
                self.scheduler,
                step,
                scaler=self._scaler,
            )
        return step
