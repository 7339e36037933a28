"""Run folders, the results table over many runs, and the figures every chapter shares.

A run folder (one per method, hyper-parameters and seed) holds::

    config.json     the Config of the run (Config.to_dict())
    env.json        python / torch / transformers versions, device, git commit, hostname, time (write_env)
    metrics.jsonl   one line per training step (METHODS section 3 names: loss, rewards/margins, ...)
    eval.jsonl      one line per evaluation step: step, method, beta, alpha, seed and the keys of
                    tdpo_lab.evaluate.evaluate_policy (reward, kl_seq, kl_logratio, entropy, ...)
    checkpoint/     resumable training state

:func:`collect` turns a tree of run folders into one table (a row per run and evaluation step),
:func:`summarise` averages seeds, and :func:`frontier_plot` / :func:`seqkl_plot` / :func:`metrics_plot` draw
the figures with one fixed colour per method (:data:`METHOD_COLORS`) so that every figure of the kit agrees.
The frontier and SeqKL figures are discussed in notebooks/08_frontier_and_results.ipynb.

JSON lines are read tolerantly: an interrupted run can leave a truncated last line, which is skipped with a
warning; if a step was evaluated twice (a resumed run), the last record of that step wins.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.config import result_fields
from tdpo_lab.utils import append_jsonl, atomic_path, stable_hash, write_json

__all__ = [
    "save_figure",
    "run_name",
    "default_run_root",
    "resolve_run_dir",
    "setting_key",
    "truncate_jsonl",
    "METHOD_COLORS",
    "METHOD_NAMES",
    "RunDir",
    "collect",
    "frontier_plot",
    "metrics_plot",
    "read_jsonl_tolerant",
    "results_markdown",
    "seqkl_plot",
    "summarise",
    "write_env",
]

# One colour per method, used by every figure of the kit (tab10 colours, colour-blind friendly order).
METHOD_COLORS: dict[str, str] = {
    "sft": "black",
    "dpo": "tab:blue",
    "tdpo1": "tab:orange",
    "tdpo2": "tab:green",
    "attnpo": "tab:purple",
    "tidpo": "tab:red",
}
METHOD_NAMES: dict[str, str] = {
    "sft": "SFT",
    "dpo": "DPO",
    "tdpo1": "TDPO1",
    "tdpo2": "TDPO2",
    "attnpo": "AttentionPO",
    "tidpo": "TI-DPO",
}
# alpha only changes these losses (METHODS section 3); elsewhere it is not shown in labels.
ALPHA_METHODS = ("tdpo2", "tidpo")  # methods with an alpha knob (TDPO1's KL term has none)
CONFIG_COLUMNS = ("method", "beta", "alpha", "seed", "profile")
SETTING = ["method", "beta", "alpha"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_LINESTYLES = ["-", "--", ":", "-."]


# --- one run folder ------------------------------------------------------------------------------


class RunDir:
    """Paths and writers of one run folder (see the module docstring for the layout).

    >>> run = RunDir.create("runs/tdpo2-b0.1-s0", cfg)  # doctest: +SKIP
    >>> run.log_eval(0, evaluate_policy(...), cfg)      # doctest: +SKIP
    """

    CONFIG = "config.json"
    ENV = "env.json"
    METRICS = "metrics.jsonl"
    EVAL = "eval.jsonl"
    CHECKPOINT = "checkpoint"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, path: str | os.PathLike, cfg) -> RunDir:
        """Make the folder, write ``config.json`` (from a Config or a dict) and ``env.json``."""
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)
        write_env(run.path)
        return run

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def env_path(self) -> Path:
        return self.path / self.ENV

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def eval_path(self) -> Path:
        return self.path / self.EVAL

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINT

    def write_config(self, cfg) -> None:
        write_json(self.config_path, _config_dict(cfg))

    def config(self) -> dict:
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.config_path} does not exist: is {self.path} a run folder?")
        return json.loads(self.config_path.read_text())

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Append one training step to ``metrics.jsonl`` (flushed: survives a crash)."""
        append_jsonl(self.metrics_path, {"step": int(step), **_plain(metrics)})

    def log_eval(self, step: int, result: dict, cfg=None) -> dict:
        """Append one evaluation to ``eval.jsonl``: step, method, beta, alpha, seed, then ``result``.

        ``cfg`` defaults to this folder's ``config.json``. Returns the record written.
        """
        config = _config_dict(cfg) if cfg is not None else self.config()
        record = {"step": int(step), **{k: config.get(k) for k in ("method", "beta", "alpha", "seed")}}
        record.update(_plain(result))
        append_jsonl(self.eval_path, record)
        return record

    def metrics(self) -> list[dict]:
        return _dedupe_steps(read_jsonl_tolerant(self.metrics_path, warn=True)[0])

    def evals(self) -> list[dict]:
        return _dedupe_steps(read_jsonl_tolerant(self.eval_path, warn=True)[0])


def read_jsonl_tolerant(path: str | os.PathLike, *, warn: bool = False) -> tuple[list[dict], int]:
    """Records of a JSON-lines file and the number of lines skipped because they do not parse.

    A run killed while writing leaves a truncated last line (and a resumed run may append after it); such
    lines are skipped rather than failing the whole table. A missing file gives ``([], 0)``.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad and warn:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s) (an interrupted write?)", stacklevel=2)
    return records, bad


def write_env(run_dir: str | os.PathLike) -> dict:
    """Write ``env.json`` into ``run_dir`` and return it.

    Keys: ``python``, ``platform``, ``torch``, ``transformers``, ``numpy``, ``tdpo_lab`` (versions),
    ``device`` ("cpu" or "cuda: <GPU name>"), ``cuda`` (torch's CUDA version or null), ``num_threads``,
    ``git_commit`` (``git rev-parse HEAD`` of the kit's source tree, "unknown" outside a git checkout),
    ``hostname``, ``time`` (UTC, ISO 8601).
    """
    import torch
    import transformers

    import tdpo_lab

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        device = "cpu"
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "tdpo_lab": getattr(tdpo_lab, "__version__", "unknown"),
        "device": device,
        "cuda": torch.version.cuda,
        "num_threads": torch.get_num_threads(),
        "git_commit": _git_commit(Path(tdpo_lab.__file__).resolve().parent),
        "hostname": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / RunDir.ENV, env)
    return env


# --- many runs -------------------------------------------------------------------------------------


def collect(root: str | os.PathLike, *, config_columns: Sequence[str] = CONFIG_COLUMNS) -> pd.DataFrame:
    """One row per (run, evaluation step) over every run folder under ``root`` (``root`` itself may be one).

    A run folder is a directory whose ``config.json`` is a kit config (it has a ``method`` key; the
    Hugging Face ``config.json`` of saved models in ``policy/`` or ``checkpoint/`` is not). Columns: ``run``
    (the folder relative to ``root``), ``config_columns`` from config.json (method, beta, alpha, seed,
    profile), ``step``, then every key of the evaluation records, and ``path``. Folders without any
    evaluation are skipped with one warning that counts them; unreadable lines are skipped with a warning.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass the folder that holds the run folders")
    rows: list[dict] = []
    skipped: list[str] = []
    bad_lines = 0
    for config_path in sorted(root.rglob(RunDir.CONFIG)):
        run_path = config_path.parent
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if not isinstance(config, dict) or "method" not in config:
            continue  # a saved model's config.json, not a run
        name = run_path.relative_to(root).as_posix() if run_path != root else root.name
        records, bad = read_jsonl_tolerant(run_path / RunDir.EVAL)
        bad_lines += bad
        records = _dedupe_steps(records)
        if not records:
            skipped.append(name)
            continue
        for record in records:
            row = {"run": name}
            for key in config_columns:
                row[key] = config.get(key, record.get(key))
            row["setting"] = setting_key(config)
            row["step"] = record.get("step")
            row.update({k: v for k, v in record.items() if k not in row})
            row["path"] = str(run_path)
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
        raise ValueError(f"table lacks column(s) {missing}; build it with tdpo_lab.runs.collect")
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
    ]
    columns = [(key, title) for key, title in columns if key in summary.columns]
    header = ["method", "β", "α", "step", "seeds", *[title for _, title in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        cells = [
            METHOD_NAMES.get(row["method"], str(row["method"])),
            _fmt(row["beta"], digits),
            _fmt(row["alpha"], digits) if row["method"] in ALPHA_METHODS else "–",
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


# --- figures -------------------------------------------------------------------------------------


def frontier_plot(table: pd.DataFrame, ax=None, *, show_errorbars: bool = True):
    """Reward (y) against sequence KL(pi_theta || pi_ref) (x): one curve per (method, beta, alpha).

    Each curve joins a setting's evaluations in step order, starting from the SFT model (step 0, marked
    once with a black star at the mean of all step-0 points). Colour = method (:data:`METHOD_COLORS`);
    marker and line style tell a method's settings apart. With several seeds the points are the seed means
    and the bars their standard errors (both axes). Returns the Figure.
    """
    plt = _pyplot()
    _require(table, ["reward", "kl_seq"], "frontier_plot")
    summary = summarise(table)
    fig, ax = _axes(plt, ax)
    for (method, beta, alpha), group, style in _settings(summary):
        group = group.sort_values("step")
        color = METHOD_COLORS.get(method, "gray")
        ax.plot(
            group["kl_seq"], group["reward"], color=color, label=_setting_label(method, beta, alpha), **style
        )
        if show_errorbars and (group["n_seeds"] > 1).any():
            ax.errorbar(
                group["kl_seq"],
                group["reward"],
                xerr=group["kl_seq_se"],
                yerr=group["reward_se"],
                fmt="none",
                ecolor=color,
                alpha=0.6,
                capsize=2,
            )
    start = table[table["step"] == 0]
    if len(start):
        ax.plot(
            [start["kl_seq"].mean()],
            [start["reward"].mean()],
            marker="*",
            markersize=14,
            color="black",
            linestyle="none",
            zorder=5,
            label="SFT π_ref (step 0)",
        )
    ax.set_xlabel(r"sequence KL($\pi_\theta \,\|\, \pi_{\mathrm{ref}}$), nats")
    ax.set_ylabel("mean reward of samples (P(positive))")
    ax.set_title("Reward vs KL frontier (higher and further left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def seqkl_plot(table: pd.DataFrame, ax=None):
    """TDPO's SeqKL of held-out chosen (solid) and rejected (dashed) responses against the training step.

    SeqKL(x, y) = sum_t KL(pi_ref(.|s_t) || pi_theta(.|s_t)), one pair of lines per (method, beta, alpha);
    a band of one standard error over seeds where there are several. Returns the Figure.
    """
    plt = _pyplot()
    _require(table, ["kl_seq_chosen", "kl_seq_rejected"], "seqkl_plot (evaluate with pairs=...)")
    summary = summarise(table.dropna(subset=["kl_seq_chosen", "kl_seq_rejected"]))
    fig, ax = _axes(plt, ax)
    for (method, beta, alpha), group, style in _settings(summary):
        group = group.sort_values("step")
        color = METHOD_COLORS.get(method, "gray")
        label = _setting_label(method, beta, alpha)
        for side, linestyle in (("chosen", "-"), ("rejected", "--")):
            key = f"kl_seq_{side}"
            ax.plot(
                group["step"],
                group[key],
                color=color,
                linestyle=linestyle,
                marker=style["marker"],
                label=f"{label}, {side}",
            )
            if (group["n_seeds"] > 1).any():
                ax.fill_between(
                    group["step"],
                    group[key] - group[f"{key}_se"],
                    group[key] + group[f"{key}_se"],
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
    ax.set_xlabel("training step")
    ax.set_ylabel(r"SeqKL $= \sum_t \mathrm{KL}(\pi_{\mathrm{ref}} \,\|\, \pi_\theta)$, nats")
    ax.set_title("SeqKL of held-out chosen (solid) and rejected (dashed) responses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


DEFAULT_METRIC_KEYS: tuple = (
    "loss",
    ("rewards/chosen", "rewards/rejected"),
    "rewards/accuracies",
    ("kl_seq/chosen", "kl_seq/rejected"),
)
_UNITS = {
    "loss": "nats",
    "rewards/": "implicit reward (β · log-ratio, nats)",
    "rewards/accuracies": "fraction of pairs",
    "logps/": "log-probability, nats",
    "kl_seq/": "SeqKL, nats",
    "token_reward/": "token-level reward, nats",
    "grad_norm": "L2 norm",
    "lr": "learning rate",
    "seconds": "seconds per step",
}


def metrics_plot(run_dir: str | os.PathLike, keys: Iterable = DEFAULT_METRIC_KEYS):
    """Training curves of one run from its ``metrics.jsonl``: one panel per entry of ``keys``.

    An entry is a metric name or a tuple of names drawn on the same panel (solid, dashed, ...), e.g.
    ``("kl_seq/chosen", "kl_seq/rejected")``. Names absent from the file are left out; if none is present
    the error lists the names that are. Colour = the run's method. Returns the Figure.
    """
    plt = _pyplot()
    run = RunDir(run_dir)
    records = run.metrics()
    if not records:
        raise FileNotFoundError(f"{run.metrics_path} is missing or empty: has this run trained any step?")
    frame = pd.DataFrame(records).sort_values("step")
    panels = [[k] if isinstance(k, str) else list(k) for k in keys]
    panels = [[k for k in panel if k in frame.columns] for panel in panels]
    panels = [panel for panel in panels if panel]
    if not panels:
        available = sorted(c for c in frame.columns if c != "step")
        raise ValueError(f"none of the requested metrics are in {run.metrics_path}; it has {available}")
    method = run.config().get("method", "") if run.config_path.exists() else ""
    color = METHOD_COLORS.get(method, "tab:gray")
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for key, linestyle in zip(panel, _LINESTYLES * 4, strict=False):
            ax.plot(frame["step"], frame[key], color=color, linestyle=linestyle, label=key)
        ax.set_xlabel("training step")
        ax.set_ylabel(_unit(panel[0]))
        ax.set_title(" vs ".join(panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{run.path.name}: training metrics ({METHOD_NAMES.get(method, method or 'run')})")
    fig.tight_layout()
    return fig


# --- helpers ------------------------------------------------------------------------------------


def _pyplot():
    # Imported on first use: training processes import this module (write_env) without drawing anything.
    import matplotlib.pyplot as plt

    return plt


def _axes(plt, ax):
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 5))
        return fig, ax
    return ax.figure, ax


def _settings(summary: pd.DataFrame):
    """(setting, rows, style) per (method, beta, alpha); style differs between a method's settings."""
    seen: dict[str, int] = {}
    groups = dict(list(summary.groupby(SETTING, dropna=False, sort=True)))
    for setting in sorted(groups, key=lambda s: (_method_rank(s[0]), s[1:])):
        group = groups[setting]
        index = seen.get(setting[0], 0)
        seen[setting[0]] = index + 1
        style = {
            "marker": _MARKERS[index % len(_MARKERS)],
            "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
        }
        yield setting, group, style


def _method_rank(method) -> tuple:
    # The kit's order (dpo, tdpo1, tdpo2, attnpo, tidpo), unknown names after it alphabetically.
    order = list(METHOD_NAMES)
    return (order.index(method), "") if method in order else (len(order), str(method))


def _sorted(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows ordered by ``columns``, methods in the kit's order rather than alphabetically."""
    columns = [c for c in columns if c in table.columns]
    key = lambda col: col.map(_method_rank) if col.name == "method" else col  # noqa: E731
    return table.sort_values(columns, key=key, kind="stable").reset_index(drop=True)


def _setting_label(method, beta, alpha) -> str:
    label = f"{METHOD_NAMES.get(method, method)} β={beta:g}"
    if method in ALPHA_METHODS and alpha is not None and np.isfinite(alpha):
        label += f" α={alpha:g}"
    return label


def _require(table: pd.DataFrame, columns: list[str], who: str) -> None:
    needed = ["method", "beta", "alpha", "step", *columns]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{who}: the table lacks column(s) {missing}; build it with tdpo_lab.runs.collect")
    if table.empty:
        raise ValueError(f"{who}: the table is empty; no run under the collected folder has evaluations")


def _unit(key: str) -> str:
    if key in _UNITS:
        return _UNITS[key]
    for prefix, unit in _UNITS.items():
        if prefix.endswith("/") and key.startswith(prefix):
            return unit
    return key


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _dedupe_steps(records: list[dict]) -> list[dict]:
    """Keep the last record of each step (a resumed run may repeat steps), in step order."""
    by_step: dict = {}
    unnumbered = []
    for record in records:
        if "step" in record:
            by_step[record["step"]] = record
        else:
            unnumbered.append(record)
    return [by_step[s] for s in sorted(by_step)] + unnumbered


def _config_dict(cfg) -> dict:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if isinstance(cfg, dict):
        return dict(cfg)
    raise TypeError(f"cfg must be a tdpo_lab Config or a dict, got {type(cfg).__name__}")


def _plain(values: dict) -> dict:
    """Python numbers for JSON (numpy / torch scalars -> float / int)."""
    out = {}
    for key, value in values.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        out[key] = value
    return out


def _git_commit(where: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def save_figure(fig, figures_dir: str | os.PathLike | None, name: str) -> Path | None:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` when a folder is given (papermill runs pass one)."""
    if not figures_dir:
        return None
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def run_name(cfg) -> str:
    """A run's folder name: method, its conservativeness knobs, seed, and a short key of the rest.

    The key covers every other config field, so two runs that differ in anything (steps, lr, ...) never
    share a folder, and the same configuration always finds its finished run again.
    """
    name = f"{cfg.method}_beta{cfg.beta:g}"
    if cfg.method in ALPHA_METHODS:
        name += f"_alpha{cfg.alpha:g}"
    return f"{name}_seed{cfg.seed}_{stable_hash(result_fields(cfg.to_dict()), 6)}"


def default_run_root(cfg) -> Path:
    """Where notebooks keep runs when no folder is given: under the cache, per profile and size."""
    return cfg.cache_path / "runs" / f"{cfg.profile}{'-fast' if cfg.fast else ''}"


def resolve_run_dir(
    cfg, run_dir: str | os.PathLike | None = None, run_root: str | os.PathLike | None = None
) -> Path:
    """``run_dir`` if given, else ``<run_root or default_run_root(cfg)>/<run_name(cfg)>``."""
    if run_dir:
        return Path(run_dir)
    return Path(run_root or default_run_root(cfg)) / run_name(cfg)


def truncate_jsonl(path: str | os.PathLike, step: int) -> None:
    """Keep only the records of a step-indexed JSON-lines log with ``step <= step`` (atomic rewrite).

    A resumed run redoes everything after its checkpoint, so lines written after it (or cut off by the
    interruption) are dropped first and never appear twice.
    """
    path = Path(path)
    kept = [r for r in read_jsonl_tolerant(path)[0] if r.get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
