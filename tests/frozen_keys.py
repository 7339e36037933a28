"""The run-folder names and cache keys of a fixed set of configurations, recorded so a refactor cannot move them.

``python tests/frozen_keys.py`` rewrites ``tests/data/frozen_keys.json`` (``--golden``: also each method's fast run in
``tests/data/golden/<method>/``) (do it only when a change of key is
intended, and say so in the commit); ``tests/test_frozen_keys.py`` recomputes and compares. Cache keys depend
on the IMDb sample's fingerprint, so they are recorded against ``../shared/data/imdb``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RECORD = Path(__file__).resolve().parent / "data" / "frozen_keys.json"
STAGE_NAMES = ("tokenizer", "reward", "sft", "pairs", "attnpo", "eval_ref")


def configurations() -> list[tuple[str, dict]]:
    """(profile, overrides) pairs: every method's default, the published study grid, seeds, fast, other profiles."""
    out: list[tuple[str, dict]] = []
    for fast in (False, True):
        for method in ("dpo", "tdpo1", "tdpo2", "attnpo", "tidpo", "ipo"):
            for seed in (0, 1, 2):
                out.append(("tiny", {"fast": fast, "method": method, "seed": seed}))
    grid = {"dpo": (0.1, 0.3, 1.0, 3.0), "tdpo1": (0.1, 0.3, 1.0), "tdpo2": (0.01, 0.03, 0.1, 0.3)}
    for method, betas in grid.items():
        for beta in betas:
            out.append(("tiny", {"fast": False, "method": method, "beta": beta, "seed": 1}))
    out += [
        ("tiny", {"fast": False, "method": "tdpo2", "alpha": 0.25}),
        ("tiny", {"fast": False, "method": "tidpo", "gamma": 0.2, "lam": 0.5}),
        ("tiny", {"fast": False, "method": "attnpo", "attn_fix_sink": False}),
        ("tiny", {"fast": False, "method": "dpo", "data_seed": 1}),
        ("tiny", {"fast": False, "method": "dpo", "mixed_precision": "bf16"}),
        ("tiny", {"fast": False, "method": "dpo", "lr": 1e-4, "train_steps": 100}),
        ("gpt2", {"fast": False, "method": "tdpo2"}),
        ("gpt2", {"fast": True, "method": "dpo"}),
        ("smol", {"fast": False, "method": "attnpo"}),
        ("smol", {"fast": True, "method": "tdpo2"}),
    ]
    return out


def compute() -> list[dict]:
    from tdpo_lab import load_config  # the public surface
    from tdpo_lab.cache import Plan
    from tdpo_lab.runs import run_name

    rows = []
    for profile, overrides in configurations():
        overrides = dict(overrides)
        fast = overrides.pop("fast")
        cfg = load_config(profile, fast=fast, **overrides)
        plan = Plan(cfg)
        keys = {}
        for stage in STAGE_NAMES:
            keys[stage] = plan.key(stage)
        rows.append(
            {
                "profile": profile,
                "fast": fast,
                "overrides": overrides,
                "run_name": run_name(cfg),
                "keys": keys,
            }
        )
    return rows


def record_golden() -> None:
    """Each method's fast run (metrics.jsonl, eval.jsonl) into tests/data/golden/<method>/, from a fresh cache."""
    import shutil
    import tempfile

    from tdpo_lab import load_config, method_names
    from tdpo_lab.runs import train

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TDPO_LAB_CACHE"] = str(Path(tmp) / "cache")
        for method in method_names():
            run = train(load_config("tiny", fast=True, method=method), Path(tmp) / method, progress=False)
            folder = RECORD.parent / "golden" / method
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "eval.jsonl"):
                shutil.copyfile(run / name, folder / name)


if __name__ == "__main__":
    os.environ.setdefault(
        "TDPO_LAB_IMDB", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb")
    )
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "--golden" in sys.argv:  # each method's fast run too (a change of numbers on purpose)
        record_golden()
    rows = compute()
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(rows)} configurations to {RECORD}", file=sys.stderr)
