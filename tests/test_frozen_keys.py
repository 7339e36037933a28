"""Run-folder names and cache keys stay what they were when recorded (tests/frozen_keys.py), and the same seed
gives the same numbers: each method's fast run equals its recorded metrics.jsonl and eval.jsonl.

A change that moves a key or a number on purpose re-records them in the same commit and says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import frozen_keys
import pytest

from tdpo_lab import load_config
from tdpo_lab.core import read_jsonl
from tdpo_lab.runs import train

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
TIMING = {"seconds"}  # wall-clock fields: never compared


def test_run_names_and_cache_keys_are_unchanged(imdb_path, monkeypatch):
    monkeypatch.setenv("TDPO_LAB_IMDB", str(imdb_path))
    saved = json.loads(frozen_keys.RECORD.read_text())
    now = frozen_keys.compute()
    assert len(now) == len(saved)
    moved = [
        f"{old['profile']} {old['overrides']}: {old['run_name']} -> {new['run_name']}, "
        + ", ".join(
            f"{k} {old['keys'][k]} -> {new['keys'][k]}"
            for k in old["keys"]
            if old["keys"][k] != new["keys"][k]
        )
        for old, new in zip(saved, now, strict=True)
        if old != new
    ]
    assert not moved, (
        "run names or cache keys moved (re-record with python tests/frozen_keys.py if intended):\n"
        + "\n".join(moved)
    )


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-7)
    return a == b


def _compare(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], f"{what}: other steps"
    for g, w in zip(got, want, strict=True):
        keys = (set(g) | set(w)) - TIMING
        diff = {k: (g.get(k), w.get(k)) for k in sorted(keys) if not _close(g.get(k), w.get(k))}
        assert not diff, f"{what}, step {w['step']}: (now, recorded) {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(p.name for p in GOLDEN.iterdir()))
def test_same_seed_same_numbers(method, imdb_path, tmp_path):
    cfg = load_config("tiny", fast=True, method=method)
    run = train(cfg, tmp_path / method, progress=False)
    _compare(
        read_jsonl(run / "metrics.jsonl"), read_jsonl(GOLDEN / method / "metrics.jsonl"), f"{method} metrics"
    )
    _compare(read_jsonl(run / "eval.jsonl"), read_jsonl(GOLDEN / method / "eval.jsonl"), f"{method} eval")
