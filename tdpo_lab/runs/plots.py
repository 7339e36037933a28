"""The figures every chapter shares: reward-vs-KL frontier, SeqKL curves, a run's training curves.

:func:`frontier_plot` and :func:`seqkl_plot` draw a :func:`tdpo_lab.runs.results.collect` table (seeds averaged
by :func:`tdpo_lab.runs.results.summarise`), :func:`metrics_plot` one run folder's ``metrics.jsonl``. One fixed
colour per method (the method registry, :func:`tdpo_lab.methods.method_color`) so that every figure of the kit agrees. The
frontier and SeqKL figures are discussed in notebooks/08_frontier_and_results.ipynb.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.methods import method_color, method_label, method_rank, reads_knob
from tdpo_lab.runs.results import SETTING, summarise
from tdpo_lab.runs.rundir import RunDir

__all__ = ["frontier_plot", "metrics_plot", "save_figure", "seqkl_plot"]

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_LINESTYLES = ["-", "--", ":", "-."]


def frontier_plot(table: pd.DataFrame, ax=None, *, show_errorbars: bool = True):
    """Reward (y) against sequence KL(pi_theta || pi_ref) (x): one curve per (method, beta, alpha).

    Each curve joins a setting's evaluations in step order, starting from the SFT model (step 0, marked
    once with a black star at the mean of all step-0 points). Colour = method (its registered colour);
    marker and line style tell a method's settings apart. With several seeds the points are the seed means
    and the bars their standard errors (both axes). Returns the Figure.
    """
    plt = _pyplot()
    _require(table, ["reward", "kl_seq"], "frontier_plot")
    summary = summarise(table)
    fig, ax = _axes(plt, ax)
    for (method, beta, alpha), group, style in _settings(summary):
        group = group.sort_values("step")
        color = method_color(method)
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
        color = method_color(method)
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
    "logits/": "mean logit over response positions",
    "kl_seq/": "SeqKL, nats",
    "token_reward/": "token-level reward, nats",
    "grad_norm": "L2 norm",
    "learning_rate": "learning rate",
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
    color = method_color(method)
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
    fig.suptitle(f"{run.path.name}: training metrics ({method_label(method) if method else 'run'})")
    fig.tight_layout()
    return fig


def save_figure(fig, figures_dir: str | os.PathLike | None, name: str) -> Path | None:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` when a folder is given (papermill runs pass one)."""
    if not figures_dir:
        return None
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# --- helpers ------------------------------------------------------------------------------------------


def _pyplot():
    # Imported on first use: importing this module must not pick a matplotlib backend (the CLI and the
    # tests choose Agg before the first figure).
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
    for setting in sorted(groups, key=lambda s: (method_rank(s[0]), s[1:])):
        group = groups[setting]
        index = seen.get(setting[0], 0)
        seen[setting[0]] = index + 1
        style = {
            "marker": _MARKERS[index % len(_MARKERS)],
            "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
        }
        yield setting, group, style


def _setting_label(method, beta, alpha) -> str:
    label = f"{method_label(method)} β={beta:g}"
    if reads_knob(method, "alpha") and alpha is not None and np.isfinite(alpha):
        label += f" α={alpha:g}"
    return label


def _require(table: pd.DataFrame, columns: list[str], who: str) -> None:
    needed = ["method", "beta", "alpha", "step", *columns]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(
            f"{who}: the table lacks column(s) {missing}; build it with tdpo_lab.runs.results.collect"
        )
    if table.empty:
        raise ValueError(f"{who}: the table is empty; no run under the collected folder has evaluations")


def _unit(key: str) -> str:
    if key in _UNITS:
        return _UNITS[key]
    for prefix, unit in _UNITS.items():
        if prefix.endswith("/") and key.startswith(prefix):
            return unit
    return key
