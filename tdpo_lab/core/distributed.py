"""Training on one process or many: the ``Accelerator`` of a training and what only the main process does.

SFT and preference training run under a Hugging Face ``accelerate.Accelerator``: it puts the model on this
process's device, wraps it in DistributedDataParallel (DDP) when the job was started with more than one
process (``accelerate launch`` or ``torchrun``), and applies ``cfg.mixed_precision``. The batch sizes of the
config are global: at step s each of the W processes takes its own slice of the batch
:func:`tdpo_lab.core.loop.batch_schedule` gives for (seed, s), cut into ``cfg.grad_accum_steps`` micro-batches
(:func:`rank_rows`), and DDP averages the gradients. Every slice has the same number of rows and every loss
is a mean over rows, so the average of the W x A slice means is the mean over the whole batch: the same
update as one process, up to the order of float additions (tests/test_distributed.py).

What touches the disk happens on the main process only: the run folder's lock, its logs, checkpoints and the
saved model, the evaluations, and the cached products other than the SFT model (tokenizer, reward, pairs,
judge weights), which it builds first while the others wait (``main_process_first``) and then read. The SFT
model trains on every process like the preference policy (:func:`tdpo_lab.cache.store.fetch_together`).

On one process with ``mixed_precision="no"`` nothing of this changes a number: no DDP wrapper, the loss is
not divided, the optimiser step is torch's own.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings

import numpy as np

PROCESS_GROUP_TIMEOUT_S = 2 * 3600  # how long a process waits at a barrier for the others


def accelerator_for(cfg):
    """The ``Accelerator`` of a training under ``cfg``: device (``cfg.device``), DDP across processes, precision.

    accelerate keeps one global state per process; a notebook that trained in fp32 and now asks for bf16 gets
    that state rebuilt (one process only: a multi-process job has to be launched again to change it).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device='cuda' was requested but no CUDA GPU is visible; use device='auto' or 'cpu'"
        )
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != cfg.mixed_precision:
        warnings.warn(
            f"accelerate launch asked for mixed precision {launched!r}, the config says {cfg.mixed_precision!r}: "
            "the config wins (set it with --set mixed_precision=...)",
            stacklevel=2,
        )
    # cpu=True also where no GPU is visible: without it accelerate runs every process of a job alone
    # (DistributedType.NO) instead of together over gloo (MULTI_CPU)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    # The others wait at a barrier while the main process samples the pairs or evaluates: longer than the
    # 10 minutes NCCL allows by default on a large model.
    wait = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    # bf16 on a CPU is the kit's own autocast around the forward passes (tdpo_lab.core.precision): accelerate's would
    # wrap the whole step and patch the policy's forward, so the evaluations would run in bf16 too
    precision = "no" if cpu and cfg.mixed_precision == "bf16" else cfg.mixed_precision
    kwargs = {"cpu": cpu, "mixed_precision": precision, "kwargs_handlers": [wait]}
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()  # one process: nothing else holds the old state's process group
        return Accelerator(**kwargs)


def device_of(accelerator):
    """The accelerator's device, with accelerate's ``cpu:0`` of a multi-CPU job as plain ``cpu``.

    ``torch.load(map_location="cpu:0")`` fails (no storage location of that name), a checkpoint needs "cpu".
    """
    import torch

    device = accelerator.device
    return torch.device("cpu") if device.type == "cpu" else device


def rank_rows(indices: np.ndarray, *, rank: int, world_size: int, parts: int, part: int) -> np.ndarray:
    """Micro-batch ``part`` of process ``rank``: the step's batch cut into ``world_size * parts`` equal slices.

    Process r takes the contiguous slices ``r * parts ... r * parts + parts - 1``, one per backward pass. With
    one process and one part this is the whole batch, unchanged.
    """
    check_split(len(indices), world_size, parts)
    size = len(indices) // (world_size * parts)
    start = (rank * parts + part) * size
    return indices[start : start + size]


def check_split(batch_size: int, world_size: int, parts: int, name: str = "batch_size") -> None:
    """A ``ValueError`` that says what to change when a global batch cannot be split evenly."""
    if batch_size % (world_size * parts):
        raise ValueError(
            f"{name}={batch_size} is the global batch of a step and must split evenly over {world_size} "
            f"process(es) x {parts} accumulation step(s): choose {name} a multiple of {world_size * parts}, or "
            "change grad_accum_steps or the number of processes"
        )


@contextlib.contextmanager
def main_process_lock(accelerator, lock):
    """Hold ``lock`` (a lock context manager) on the main process only, for the block, with every process in it.

    The others wait at a barrier until the main process holds the lock. Taking it on every process would
    deadlock: the first holder would wait in DDP for processes that wait for the lock.
    """
    if accelerator.num_processes == 1:
        with lock:
            yield
        return
    with lock if accelerator.is_main_process else contextlib.nullcontext():
        accelerator.wait_for_everyone()
        yield
        accelerator.wait_for_everyone()


def broadcast(accelerator, value):
    """The main process's ``value`` (any picklable object), on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def world_size() -> int:
    """The number of processes of this job: torch.distributed's when it is set up, else ``WORLD_SIZE`` or 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
