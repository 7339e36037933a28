"""Wall time of `tdpo-lab sweep --jobs N` on one small grid, and whether every N gives the same results.

    python benchmarks/bench_sweep_jobs.py --jobs 1,2            # the tiny profile, 4 points of 40 steps

Each N trains the same 4-point grid (DPO and TDPO2 at beta 0.1 and 0.3, seed 0) into a fresh folder; the cached
SFT model and pairs are shared (build them first, e.g. with one `tdpo-lab run`, so that no N pays for them).
Prints one row per N: wall seconds, speed-up over the first N, and whether the collected table equals the
first N's in every numeric column.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from tdpo_lab.cli import main

SMALL = ["train_steps=40", "eval_every=40", "eval_prompts=16", "eval_pairs=16"]


def run_grid(out: Path, jobs: int, profile: str) -> float:
    args = ["sweep", "--profile", profile, "--methods", "dpo,tdpo2", "--betas", "0.1,0.3", "--seeds", "0"]
    args += ["--jobs", str(jobs), "--quiet", "--out", str(out)]
    args += [a for s in SMALL for a in ("--set", s)]
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if main(args) != 0:
            raise SystemExit(f"the sweep with --jobs {jobs} failed")
    return time.perf_counter() - started


def numeric(table: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in table.columns if c != "path" and pd.api.types.is_numeric_dtype(table[c])]
    return table[columns].reset_index(drop=True)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="1,2", help="comma-separated values of --jobs to time")
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-jobs-"))
    rows, first = [], None
    try:
        for jobs in (int(j) for j in args.jobs.split(",")):
            seconds = run_grid(root / f"jobs{jobs}", jobs, args.profile)
            table = numeric(pd.read_csv(root / f"jobs{jobs}" / "runs.csv"))
            if first is None:
                first = (seconds, table)
            same = table.equals(first[1])
            rows.append((jobs, seconds, first[0] / seconds, same))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'--jobs':>6} | {'wall s':>7} | {'speed-up':>8} | same results")
    for jobs, seconds, speedup, same in rows:
        print(f"{jobs:>6} | {seconds:>7.1f} | {speedup:>7.2f}x | {same}")


if __name__ == "__main__":
    main_bench()
