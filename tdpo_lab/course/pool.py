"""The main job's runs as one pool: ``tdpo-lab reproduce`` trains them all before executing the chapters.

Executed one after another, the chapters leave a core idle for long stretches (SFT alone, a chapter that
trains the seeds the others left). So ``reproduce`` first plans every run the selected chapters train
(:func:`plan_runs`: the chapters' own parameter defaults, the job's seeds, the same ``load_config`` call and
run folder as the chapters), builds the shared stages with every thread while nothing else runs
(:func:`prepare_stages`: SFT model, reward, pairs, AttentionPO's judge weights), then trains the runs
``jobs`` at a time, longest first (:func:`tdpo_lab.runs.fanout.train_points`). The chapters then find their runs
finished. A chapter executed alone (papermill, Colab) still trains what it needs: nothing here is required.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tdpo_lab.config import Config, load_config
from tdpo_lab.course.schedule import CHAPTERS
from tdpo_lab.methods import method_rank
from tdpo_lab.products import attnpo_weights, build_pairs, get_reward, train_sft
from tdpo_lab.runs import RunDir, run_name, train_points

# Seconds per training step relative to DPO's, tiny profile, one thread (benchmarks/README.md, "train step"):
# what orders the pool, longest first. A method not listed counts as DPO.
STEP_COST = {"dpo": 1.0, "tdpo1": 1.02, "tdpo2": 1.02, "attnpo": 1.02, "tidpo": 1.8}


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of the pool: its config, its folder and its estimated cost (steps x relative step cost)."""

    cfg: Config
    out: Path
    cost: float
    chapters: tuple[str, ...]  # the chapters that read it (numbers, e.g. ("05", "08"))


def chapter_defaults(path: str | os.PathLike) -> dict:
    """The literal values of a notebook's ``parameters`` cell (the cell tagged ``parameters``), by name.

    Assignments whose value is not a Python literal are left out. A notebook without such a cell gives {}.
    """
    nb = json.loads(Path(path).read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell.get("source", []))
            out = {}
            for node in ast.parse(source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                    if isinstance(target, ast.Name):
                        try:
                            out[target.id] = ast.literal_eval(node.value)
                        except ValueError:
                            continue
            return out
    return {}


def chapter_runs(number: str, defaults: dict, seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(method, seed) of every run chapter ``number`` trains with its parameter ``defaults``.

    The methods are the runs :data:`tdpo_lab.cache.plan.CHAPTERS` says the chapter builds, uses or compares;
    a chapter with a ``seeds`` parameter trains them for every one of the job's ``seeds`` (and its ``seed``,
    the run it shows), the others for their ``seed`` only.
    """
    chapter = CHAPTERS.get(number)
    if chapter is None:
        return []
    products = (*chapter.builds, *chapter.uses, *chapter.compares)
    methods = [p.removeprefix("run:") for p in products if p.startswith("run:")]
    own = [int(defaults.get("seed", 0))]
    if "seeds" in defaults:  # the job's seeds, and the chapter's own ``seed`` where it has one
        own = own if "seed" in defaults else []
        run_seeds = [*own, *(int(s) for s in seeds)]
    else:
        run_seeds = own
    return [(m, s) for m in methods for s in dict.fromkeys(run_seeds)]


def plan_runs(
    chapters: Sequence[str | os.PathLike], *, profile: str, fast: bool, seeds: Sequence[int], run_root
) -> list[PlannedRun]:
    """Every run the ``chapters`` (notebook paths) train, once each, longest first.

    Each run's config is the one its chapters build (``load_config(profile, fast=fast, method=..., beta=...,
    alpha=..., seed=...)`` with the chapter's ``beta``/``alpha`` defaults) and its folder
    ``run_root/run_name(cfg)``, as the chapters resolve it with ``run_root`` given. Order: estimated cost
    (``train_steps x`` :data:`STEP_COST`) descending, then the registry's method order, then the seed.
    """
    planned: dict[Path, PlannedRun] = {}
    for path in chapters:
        number = Path(path).name[:2]
        defaults = chapter_defaults(path)
        for method, seed in chapter_runs(number, defaults, seeds):
            cfg = load_config(
                profile,
                fast=fast,
                method=method,
                beta=defaults.get("beta", 0.1),
                alpha=defaults.get("alpha", 0.5),
                seed=seed,
            )
            out = Path(run_root) / run_name(cfg)
            if out in planned:
                old = planned[out]
                if old.cfg != cfg:
                    raise ValueError(f"two chapters plan different configs for one run folder {out}")
                planned[out] = dataclasses.replace(old, chapters=(*old.chapters, number))
                continue
            cost = cfg.train_steps * STEP_COST.get(method, 1.0)
            planned[out] = PlannedRun(cfg, out, cost, (number,))
    return sorted(
        planned.values(), key=lambda r: (-r.cost, method_rank(r.cfg.method), r.cfg.seed, r.out.name)
    )


def prepare_stages(runs: Sequence[PlannedRun], *, threads: int, progress: bool = False) -> None:
    """Build the stages the runs share (SFT model, reward, pairs, judge weights) with ``threads`` threads.

    ``num_threads`` is a runtime field: the stage keys, hence the cached products the runs read, are those
    of the runs' own configs.
    """
    seen = set()
    for run in runs:
        cfg = run.cfg.replace(num_threads=threads)
        shared = cfg.replace(method="dpo", seed=0).to_dict()  # SFT, reward, pairs: not per method or seed
        key = json.dumps(shared, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            train_sft(cfg, progress=progress)
            get_reward(cfg)
            build_pairs(cfg, progress=progress)
        if cfg.method == "attnpo" and ("judge", key) not in seen:
            seen.add(("judge", key))
            attnpo_weights(cfg, build_pairs(cfg, progress=False), progress=progress)


def train_pool(
    runs: Sequence[PlannedRun], *, jobs: int, progress: bool = False
) -> list[tuple[str, BaseException]]:
    """Prepare the shared stages, then train the unfinished ``runs`` ``jobs`` at a time; returns the failures."""
    todo = [r for r in runs if not RunDir(r.out).is_finished]
    if not todo:
        return []
    threads = max(1, min(jobs, os.cpu_count() or 1))
    prepare_stages(todo, threads=threads, progress=progress)
    return train_points([r.cfg for r in todo], [r.out for r in todo], jobs=jobs, progress=progress)
