"""The results table over many run folders: collect, average over seeds, print as Markdown.

:func:`collect` turns a tree of run folders (:mod:`tdpo_lab.runs.rundir`) into one table (a row per run and
evaluation step), :func:`summarise` averages seeds, :func:`results_markdown` prints the summary. The figures
drawn from these tables are in :mod:`tdpo_lab.runs.plots`; both are discussed in
notebooks/08_frontier_and_results.ipynb.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.config import result_fields
from tdpo_lab.core.jsonl import dedupe_steps, read_jsonl_tolerant
from tdpo_lab.core.utils import stable_hash
from tdpo_lab.methods import method_label, method_rank, reads_knob
from tdpo_lab.runs.rundir import RunDir

__all__ = [
    "collect",
    "results_markdown",
    "setting_key",
    "summarise",
    "verdict",
]

# --- the table ------------------------------------------------------------------------------------------
CONFIG_COLUMNS = ("method", "beta", "alpha", "seed", "profile")
SETTING = ["method", "beta", "alpha"]


def collect(
    root: str | os.PathLike, *, config_columns: Sequence[str] = CONFIG_COLUMNS, per_prompt: bool = False
) -> pd.DataFrame:
    """One row per (run, evaluation step) over every run folder under ``root`` (``root`` itself may be one).

    A run folder is a directory whose ``config.json`` is a kit config (it has a ``method`` key; the
    Hugging Face ``config.json`` of saved models in ``policy/`` or ``checkpoint/`` is not). Columns: ``run``
    (the folder relative to ``root``), ``config_columns`` from config.json (method, beta, alpha, seed,
    profile), ``step``, then every key of the evaluation records, and ``path``. Folders without any
    evaluation are skipped with one warning that counts them; unreadable lines are skipped with a warning.
    ``root`` may also be a results store (:mod:`tdpo_lab.runs.store`): it holds the same files.

    List values of the records (per prompt and per held-out pair: ``reward_per_prompt``, ``prompt_ids``, ...)
    become columns of lists only with ``per_prompt`` (for :mod:`tdpo_lab.runs.bootstrap`); otherwise they are left out.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass the folder that holds the run folders")
    rows: list[dict] = []
    skipped: list[str] = []
    bad_lines = 0
    for config_path in sorted(root.rglob(RunDir.CONFIG)):
        run = RunDir(config_path.parent)
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if not isinstance(config, dict) or "method" not in config:
            continue  # a saved model's config.json, not a run
        name = run.path.relative_to(root).as_posix() if run.path != root else root.name
        # Not run.evals(): its per-file warnings would repeat what the one summary warning below says.
        records, bad = read_jsonl_tolerant(run.eval_path)
        bad_lines += bad
        records = dedupe_steps(records)
        if not records:
            skipped.append(name)
            continue
        for record in records:
            row = {"run": name}
            for key in config_columns:
                row[key] = config.get(key, record.get(key))
            row["setting"] = setting_key(config)
            row["step"] = record.get("step")
            row.update(
                {k: v for k, v in record.items() if k not in row and (per_prompt or not isinstance(v, list))}
            )
            row["path"] = str(run.path)
            rows.append(row)
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"collect: skipped {len(skipped)} run folder(s) without evaluations: {shown}", stacklevel=2
        )
    if bad_lines:
        warnings.warn(
            f"collect: skipped {bad_lines} unreadable eval.jsonl line(s) (interrupted runs?)", stacklevel=2
        )
    columns = ["run", *config_columns, "setting", "step"]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=[*columns, "path"])
    rest = [c for c in table.columns if c not in columns and c != "path"]
    table = table[[*columns, *rest, "path"]]
    return _sorted(table, ["method", "beta", "alpha", "seed", "step"])


def setting_key(config: dict) -> str:
    """A short key of everything in a run's config but its seed: runs that share it differ only by seed."""
    return stable_hash({k: v for k, v in result_fields(config).items() if k != "seed"}, 6)


def summarise(
    table: pd.DataFrame, *, by: Sequence[str] = ("method", "beta", "alpha", "setting", "step")
) -> pd.DataFrame:
    """Mean and standard error over seeds (rows) per (method, beta, alpha, setting, step).

    ``setting`` (from :func:`collect`) keys everything but the seed, so runs that differ in anything else
    (steps, lr, profile, ...) are never averaged as if they were seeds. A group holding the same seed twice
    is an error.

    For every numeric metric m: column ``m`` is the mean over the group's rows and ``m_se`` =
    std(ddof=1) / sqrt(n) the standard error of that mean (0.0 for a single seed); within-run standard
    errors (``*_stderr`` columns) are averaged and get no ``_se``. ``n_seeds`` = rows in the group.
    """
    by = [c for c in by if c != "setting" or "setting" in table.columns]
    missing = [c for c in by if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; build it with tdpo_lab.runs.results.collect")
    skip = set(by) | {"seed", "run", "path"}
    metrics = [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])]
    groups = table.groupby(by, dropna=False, sort=True)
    if "seed" in table.columns and (groups["seed"].nunique() < groups.size()).any():
        raise ValueError(
            "summarise: some (method, beta, alpha, setting, step) groups hold the same seed twice; "
            "collect each sweep from its own folder"
        )
    mean = groups[metrics].mean()
    count = groups.size()
    out = pd.DataFrame(index=mean.index)
    out["n_seeds"] = count
    for m in metrics:
        out[m] = mean[m]
        if not m.endswith("_stderr"):
            se = groups[m].std(ddof=1) / np.sqrt(groups[m].count())
            out[f"{m}_se"] = se.fillna(0.0)
    return _sorted(out.reset_index(), [c for c in ("method", "beta", "alpha", "step") if c in by] or by)


def results_markdown(summary: pd.DataFrame, *, last_step_only: bool = False, digits: int = 3) -> str:
    """A Markdown table of :func:`summarise` output (a raw :func:`collect` table is summarised first).

    One row per (method, beta, alpha, step), ``mean ± standard error over seeds`` where there are several
    seeds. ``last_step_only``: keep only the final evaluation of each setting.
    """
    if "n_seeds" not in summary.columns:
        summary = summarise(summary)
    if summary.empty:
        return "_no evaluations_\n"
    if last_step_only:
        last = summary.groupby(SETTING, dropna=False)["step"].transform("max")
        summary = summary[summary["step"] == last]
    columns = [
        ("reward", "reward"),
        ("kl_seq", "KL(π_θ‖π_ref) nats"),
        ("kl_logratio", "log-ratio KL nats"),
        ("entropy", "entropy nats/token"),
        ("distinct2", "distinct-2"),
        ("distinct4", "distinct-4"),
        ("kl_seq_chosen", "SeqKL chosen"),
        ("kl_seq_rejected", "SeqKL rejected"),
        ("reward_topk", "reward (top-k)"),
        ("pair_accuracy", "held-out pair accuracy"),
    ]
    columns = [(key, title) for key, title in columns if key in summary.columns]
    header = ["method", "β", "α", "step", "seeds", *[title for _, title in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        cells = [
            method_label(row["method"]),
            _fmt(row["beta"], digits),
            _fmt(row["alpha"], digits) if reads_knob(row["method"], "alpha") else "–",
            str(int(row["step"])),
            str(int(row["n_seeds"])),
        ]
        for key, _ in columns:
            value = _fmt(row[key], digits)
            se = row.get(f"{key}_se")
            if row["n_seeds"] > 1 and se is not None and np.isfinite(se):
                value += f" ± {_fmt(se, digits)}"
            cells.append(value)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(diff: float, se: float) -> str:
    """Three-way verdict on a difference in a claim's direction (positive supports it) and its s.e.

    "beyond 2 standard errors" when ``diff > 2 se``, "opposite" when ``diff < -2 se``, else "within noise".
    With a handful of seeds the standard error is itself uncertain: beyond 2 s.e. is suggestive, not decisive.
    """
    if not (np.isfinite(se) and se > 0):
        raise ValueError(
            f"a verdict needs a positive, finite standard error; got {se!r} (one seed? run more)"
        )
    if diff > 2 * se:
        return "beyond 2 standard errors"
    if diff < -2 * se:
        return "opposite"
    return "within noise"


# --- helpers ------------------------------------------------------------------------------------------


def _sorted(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows ordered by ``columns``, methods in the kit's order rather than alphabetically."""
    columns = [c for c in columns if c in table.columns]
    key = lambda col: col.map(method_rank) if col.name == "method" else col  # noqa: E731
    return table.sort_values(columns, key=key, kind="stable").reset_index(drop=True)


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"
