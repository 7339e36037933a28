"""Train many configurations at once: ``tdpo-lab sweep --jobs N`` and the frontier study.

Each point runs in its own process (``spawn``: a fresh torch per worker), one thread each on a CPU and one
GPU each where there are GPUs (``CUDA_VISIBLE_DEVICES`` is set before the worker imports torch). Finished
points are skipped by :func:`tdpo_lab.runs.train.train` itself, and the cached stages (SFT model, pairs) are
built once under their locks, so workers that ask for them together wait for the first one instead of
building them twice. A failing point is reported and the others go on.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from tdpo_lab.config import Config
from tdpo_lab.methods import load_plugin
from tdpo_lab.runs.train import train


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a core dependency
        return 0


def _init_worker(gpus, plugins: Sequence[str] = ()) -> None:
    # runs in the fresh process before it trains: pin it to one GPU of the queue, and register the methods of
    # --plugin modules as the parent did (entry-point plugins load with tdpo_lab.methods by themselves)
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    for module in plugins:
        load_plugin(module)


def _train_one(cfg_dict: dict, out: str, progress: bool) -> float:
    started = time.perf_counter()
    train(Config(**cfg_dict), out, progress=progress)
    return time.perf_counter() - started


def train_points(
    configs: Sequence[Config],
    outs: Sequence[Path],
    *,
    jobs: int = 1,
    progress: bool = True,
    plugins: Sequence[str] = (),
    on_finished: Callable[[Path], None] | None = None,
) -> list[tuple[str, BaseException]]:
    """Train ``configs[i]`` into ``outs[i]``, ``jobs`` at a time; returns the (run name, error) of failures.

    ``plugins``: modules that register methods (``--plugin``), imported in every worker process too.
    ``on_finished(out)`` runs in this process as soon as each run finishes (a results store keeps it at once, so
    a study stopped half-way loses no finished run).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    failures: list[tuple[str, BaseException]] = []
    total = len(configs)
    if jobs == 1 or total <= 1:
        for i, (cfg, out) in enumerate(zip(configs, outs, strict=True), 1):
            print(f"[{i}/{total}] {Path(out).name}", flush=True)
            try:
                train(cfg, out, progress=progress)
                if on_finished is not None:
                    on_finished(Path(out))
            except Exception as exc:  # one failing point must not stop the others
                failures.append((Path(out).name, exc))
                traceback.print_exc()
        return failures

    context = multiprocessing.get_context("spawn")
    gpus = _gpu_count()
    queue = None
    if gpus:
        jobs = min(jobs, gpus)  # one point per GPU
        queue = context.Manager().Queue()
        for index in range(jobs):
            queue.put(index)
    print(f"{total} points, {jobs} at a time ({f'one per GPU of {gpus}' if gpus else 'one CPU thread each'})")
    with futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(queue, tuple(plugins))
    ) as pool:
        by_name = {Path(out).name: Path(out) for out in outs}
        pending = {
            pool.submit(_train_one, cfg.to_dict(), str(out), False): Path(out).name
            for cfg, out in zip(configs, outs, strict=True)
        }
        for done, future in enumerate(futures.as_completed(pending), 1):
            name = pending[future]
            try:
                seconds = future.result()
                print(f"[{done}/{total}] {name} finished ({seconds / 60:.1f} min)", flush=True)
                if on_finished is not None:
                    on_finished(by_name[name])
            except Exception as exc:  # noqa: BLE001 - reported with the others at the end
                failures.append((name, exc))
                print(f"[{done}/{total}] {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
    return failures
