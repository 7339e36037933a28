"""Seeds, devices, threads, hashing and atomic writes: the small things every stage shares."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so that a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def select_device(preference: str = "auto") -> torch.device:
    """The one place the kit picks a device: cuda when available (or asked for), else cpu.

    In a job of several processes (``torchrun`` and ``accelerate launch`` set ``LOCAL_RANK``) each process
    takes its own GPU, ``cuda:<LOCAL_RANK>``.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device='cuda' was requested but no CUDA GPU is visible; use device='auto' or 'cpu'"
        )
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(preference)


def set_threads(num_threads: int) -> None:
    """Fix torch's CPU thread count (0 leaves torch's default)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def stable_hash(obj: object, length: int = 16) -> str:
    """A short sha256 of a JSON-serialisable object (cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An interrupted write therefore never leaves a half-written file where a finished one is expected.
    Works for files and for directories (``save_pretrained`` targets).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            import shutil

            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        import shutil

        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def eval_mode(*models):
    """The models in eval mode for the block (no dropout noise); afterwards every submodule gets back its own
    flag (not just ``model.train(flag)``: a caller may have frozen parts in eval mode)."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, flag in modes:
            module.training = flag


def progress_off(progress: bool = True) -> bool:
    """tqdm's ``disable`` for a call with ``progress``: off when asked, or when ``TQDM_DISABLE`` is set (CI).

    An explicit ``disable=False`` would override tqdm's own reading of ``TQDM_DISABLE``, hence this helper.
    """
    return (not progress) or os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes"}


def save_training_state(
    path: str | os.PathLike, model, optimizer, scheduler, step: int, *, scaler=None
) -> None:
    """Checkpoint (model, optimiser, scheduler, step) atomically: a crash mid-write keeps the last one.

    ``scaler``: fp16's gradient scaler, whose scale is saved too (mixed_precision="fp16").
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class CheckpointError(RuntimeError):
    """A training checkpoint cannot be read (the message names the file and what to do)."""


def load_training_state(
    path: str | os.PathLike, model, optimizer, scheduler, device=None, *, scaler=None
) -> int:
    """Restore a :func:`save_training_state` checkpoint into the given objects; return its step.

    Read with ``weights_only=True``: tensors, numbers, strings and containers only, never arbitrary
    pickled objects (the state dicts of the model, AdamW and LambdaLR hold nothing else). A damaged
    file is a :class:`CheckpointError` naming it: deleting it restarts that training from step 0.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        step = int(state["step"])
    except Exception as exc:  # noqa: BLE001 - re-raised with the file and the remedy
        raise CheckpointError(
            f"the checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to start "
            "that training again from step 0"
        ) from exc
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return step


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` (a lock file) for the block; a second holder waits.

    Two notebooks (or a sweep and a notebook) that ask for the same run or cache entry at once would
    otherwise train it twice into one folder; with the lock the second waits and then finds it finished.
    POSIX only (``fcntl``); elsewhere the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
