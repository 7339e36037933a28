"""The results store: the summaries of finished runs, small enough to commit (``results/<profile>/``).

Run folders hold weights and checkpoints and live in a cache that does not outlive a machine. The store keeps,
for each finished run, what the tables, figures and verdicts read, under the run's own folder name::

    results/tiny/<run_name>/
        config.json          as in the run folder
        env.json             as in the run folder, without its package list (kept: versions, device, commit)
        eval.jsonl           as in the run folder: the means and the per-prompt / per-pair values
        metrics.jsonl.gz     the per-step training log, gzip (deterministic bytes: no time stamp, no name)
        samples.jsonl        the few samples each evaluation kept
        stored.json          written last: the run is stored whole (its last step and the files' sha256)

never ``policy/`` or ``checkpoint/``. :func:`tdpo_lab.runs.results.collect` and the frontier study's report read a
store exactly like a tree of run folders (:func:`tdpo_lab.runs.rundir.read_jsonl_tolerant` reads the ``.gz``).
A sweep or study given a store skips every configuration whose run is stored already (:func:`pending`), so
a study stopped at the end of one session resumes in the next at run granularity.

``tdpo-lab store RUN_ROOT... --into results/tiny`` calls :func:`store_runs`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from tdpo_lab.core.utils import atomic_path, write_json
from tdpo_lab.runs.rundir import RunDir

__all__ = ["MARKER", "is_stored", "pending", "store_run", "store_runs", "stored_names"]

MARKER = "stored.json"
_PLAIN = (RunDir.CONFIG, RunDir.EVAL, RunDir.SAMPLES)


def store_run(run_dir: str | os.PathLike, into: str | os.PathLike) -> Path:
    """Copy one finished run's summary into ``into/<its folder name>``; returns that folder.

    Raises ValueError for a folder that is not a kit run, or not finished (no ``policy/``): a store holds
    only finished runs, so that being stored means being done. The folder is replaced whole (atomic), so
    storing the same run again gives the same bytes.
    """
    run = RunDir(run_dir)
    if not _is_run(run):
        raise ValueError(
            f"{run.path} is not a run folder (no config.json with a 'method'); pass a run folder"
        )
    if not run.is_finished:
        raise ValueError(f"{run.path} is not finished (no policy/): finish or resume it before storing it")
    target = Path(into) / run.path.name
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        for name in _PLAIN:
            if (run.path / name).exists():
                shutil.copyfile(run.path / name, tmp / name)
        if run.env_path.exists():
            env = json.loads(run.env_path.read_text())
            env.pop("packages", None)  # ~5 kB a run; the lock files of the checkout pin them
            write_json(tmp / RunDir.ENV, env)
        if run.metrics_path.exists():
            packed = gzip.compress(run.metrics_path.read_bytes(), compresslevel=9, mtime=0)
            (tmp / (RunDir.METRICS + ".gz")).write_bytes(packed)
        evals = run.evals()
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())}
        marker = {
            "run": run.path.name,
            "last_step": evals[-1]["step"] if evals else None,
            "evaluations": len(evals),
            "files": files,
        }
        write_json(tmp / MARKER, marker)
    return target


def store_runs(roots: Sequence[str | os.PathLike], into: str | os.PathLike) -> dict[str, list[str]]:
    """Store every finished run folder under each of ``roots`` (a root may be one run folder).

    Returns ``{"stored": [names], "unfinished": [paths]}``; unfinished runs are left out (and listed).
    Two finished runs of the same name from different roots are the same configuration; the later wins.
    """
    stored, unfinished = [], []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; pass the folder that holds the run folders")
        for config_path in sorted(root.rglob(RunDir.CONFIG)):
            run = RunDir(config_path.parent)
            if not _is_run(run) or (run.path / MARKER).exists():
                continue  # a saved model's config.json, or a store inside the root
            if run.is_finished:
                stored.append(store_run(run.path, into).name)
            else:
                unfinished.append(str(run.path))
    return {"stored": stored, "unfinished": unfinished}


def stored_names(into: str | os.PathLike) -> set[str]:
    """The folder names of the runs stored whole in ``into`` (those with their ``stored.json``)."""
    into = Path(into)
    if not into.exists():
        return set()
    return {p.parent.name for p in into.glob(f"*/{MARKER}")}


def is_stored(into: str | os.PathLike, name: str) -> bool:
    """Whether the run folder ``name`` is stored whole in ``into``."""
    return (Path(into) / name / MARKER).exists()


def pending(configs: Sequence, outs: Sequence[Path], into: str | os.PathLike | None) -> tuple[list, list]:
    """The (configs, outs) whose run is not stored in ``into`` yet (all of them when ``into`` is None).

    A stored run is finished by construction, so a sweep resumes at run granularity from the store alone.
    """
    if into is None:
        return list(configs), list(outs)
    done = stored_names(into)
    kept = [(c, o) for c, o in zip(configs, outs, strict=True) if Path(o).name not in done]
    return [c for c, _ in kept], [o for _, o in kept]


def _is_run(run: RunDir) -> bool:
    try:
        config = json.loads(run.config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "method" in config
