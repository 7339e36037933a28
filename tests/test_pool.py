"""The main job's pool of runs (tdpo_lab.course.pool): which runs, in which order, without training any."""

from __future__ import annotations

import json

import pytest

from tdpo_lab.config import load_config
from tdpo_lab.course.chapters import NOTEBOOKS, notebooks_dir
from tdpo_lab.course.pool import STEP_COST, chapter_defaults, chapter_runs, plan_runs
from tdpo_lab.methods import method_names
from tdpo_lab.runs.rundir import run_name

CHAPTER_METHODS = ["dpo", "tdpo1", "tdpo2", "attnpo", "tidpo"]


def _plan(names, seeds, tmp_path, fast=False):
    source = notebooks_dir()
    return plan_runs([source / n for n in names], profile="tiny", fast=fast, seeds=seeds, run_root=tmp_path)


def test_main_job_plans_every_method_and_seed_once_longest_first(tmp_path):
    runs = _plan(NOTEBOOKS, [0, 1, 2], tmp_path)
    got = [(r.cfg.method, r.cfg.seed) for r in runs]
    assert sorted(got) == sorted((m, s) for m in CHAPTER_METHODS for s in (0, 1, 2))  # 15, none twice
    costs = [r.cost for r in runs]
    assert costs == sorted(costs, reverse=True)
    assert [m for m, _ in got[:3]] == ["tidpo"] * 3  # the slowest step first
    for r in runs:  # the folder and config each chapter builds for itself (chapter 08's own assertion)
        cfg = load_config("tiny", fast=False, method=r.cfg.method, beta=0.1, alpha=0.5, seed=r.cfg.seed)
        assert r.cfg == cfg
        assert r.out == tmp_path / run_name(cfg)
        assert r.cost == pytest.approx(cfg.train_steps * STEP_COST[r.cfg.method])
    seed0_dpo = next(r for r in runs if (r.cfg.method, r.cfg.seed) == ("dpo", 0))
    assert set(seed0_dpo.chapters) == {"04", "05", "06", "07", "08"}
    assert next(r for r in runs if (r.cfg.method, r.cfg.seed) == ("tidpo", 2)).chapters == ("08",)


def test_plan_follows_the_selected_chapters_and_seeds(tmp_path):
    assert _plan(["00_setup_and_data.ipynb", "01_sft_reference.ipynb"], [0, 1, 2], tmp_path) == []
    only04 = _plan(["04_dpo_baseline.ipynb"], [0, 1, 2], tmp_path)
    assert [(r.cfg.method, r.cfg.seed) for r in only04] == [("dpo", 0)]
    # chapters 04-07 show seed 0 whatever the job's seeds; 05 and 08 average the job's seeds
    runs = _plan(NOTEBOOKS, [1, 2], tmp_path, fast=True)
    got = {(r.cfg.method, r.cfg.seed) for r in runs}
    assert {s for m, s in got if m in ("attnpo", "tidpo")} == {0, 1, 2}
    assert ("tdpo1", 0) in got and ("tdpo2", 2) in got
    assert all(r.cfg.fast for r in runs)


def test_chapter_defaults_reads_the_parameters_cell_only(tmp_path):
    nb = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": ["beta = 9.0\n"]},
            {
                "cell_type": "code",
                "metadata": {"tags": ["parameters"]},
                "source": ["beta = 0.3  # note\n", "seeds = None\n", "methods = ['dpo']\n", "x = f(1)\n"],
            },
        ]
    }
    path = tmp_path / "05_x.ipynb"
    path.write_text(json.dumps(nb))
    assert chapter_defaults(path) == {"beta": 0.3, "seeds": None, "methods": ["dpo"]}
    assert chapter_runs("05", {"seeds": None}, [3]) == [("tdpo1", 3), ("tdpo2", 3), ("dpo", 3)]
    assert chapter_runs("05", {"seed": 0, "seeds": None}, [0, 3])[:2] == [("tdpo1", 0), ("tdpo1", 3)]
    assert chapter_runs("99", {}, [0]) == []


def test_chapter_methods_are_registered():
    defaults = chapter_defaults(notebooks_dir() / "08_frontier_and_results.ipynb")
    assert defaults["methods"] == CHAPTER_METHODS
    assert set(CHAPTER_METHODS) <= set(method_names())
