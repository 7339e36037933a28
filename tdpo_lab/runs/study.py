"""The frontier study: DPO, TDPO1 and TDPO2 each over its own beta grid and several seeds.

One beta per method compares curves that stop wherever their runs happened to stop: a method whose KL grows
slowly wins any comparison against one fast-drifting baseline. The DPO and TDPO papers trace each method's
frontier over several beta values; this module does the same (docs/methods.md section 6):

1. every (method, beta, seed) of the grid is trained (:mod:`tdpo_lab.runs.fanout`);
2. each evaluation step of each (method, beta) is averaged over seeds (:func:`tdpo_lab.runs.results.summarise`),
   giving *seed-mean checkpoints* with the standard error of that mean;
3. a method's frontier is the **upper envelope** of its seed-mean checkpoints over all its betas (never the
   best seed): F(k), the highest reward on any of its curves (checkpoints joined in step order) at KL <= k;
4. two methods are compared on their envelopes at KL budgets both reach, each difference with its standard
   error and a three-way verdict (:func:`tdpo_lab.runs.results.verdict`).

``tdpo-lab frontier-study`` runs all of it and writes ``frontier_study.md`` and ``frontier_study.png``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.config import Config, ConfigError
from tdpo_lab.methods import method_color, method_label, method_names
from tdpo_lab.runs.results import collect, results_markdown, summarise, verdict

# Chosen on the tiny profile (240 steps) so that the methods' KLs cover about 0.5-5 nats: DPO and TDPO1 drift
# fast at beta 0.1 (4.5-5 nats) and stop near 1 nat however large beta gets (1.1 nats at 3.0, their earlier
# checkpoints reach lower); TDPO2's SeqKL term holds it at 1.5 nats already at beta 0.1 and at 1.8 at 0.03, so
# its grid reaches down to smaller betas instead.
FRONTIER_BETAS: dict[str, tuple[float, ...]] = {
    "dpo": (0.1, 0.3, 1.0, 3.0),
    "tdpo1": (0.1, 0.3, 1.0),
    "tdpo2": (0.01, 0.03, 0.1, 0.3),
}
BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the largest KL both envelopes reach

# The retrained tiny study (issue 18; plan and time estimate in benchmarks/README.md, "The retrained tiny
# study"): every method at three settings or more, TDPO2 also over alpha (the KL term's weight relative to the
# margin) so that its curves can reach DPO's KLs; three seeds, an evaluation every STUDY_EVAL_EVERY steps.
# Per method: "beta" values, and "alpha" values where the method reads alpha (None: the profile's alpha).
STUDY_GRID: dict[str, dict[str, tuple[float, ...] | None]] = {
    "dpo": {"beta": (0.1, 0.3, 1.0, 3.0), "alpha": None},
    "tdpo1": {"beta": (0.1, 0.3, 1.0), "alpha": None},
    "tdpo2": {"beta": (0.03, 0.1, 0.3), "alpha": (0.1, 0.25, 0.5)},
    "attnpo": {"beta": (0.1, 0.3, 1.0), "alpha": None},
    "tidpo": {"beta": (0.1, 0.3, 1.0), "alpha": None},
    "ipo": {"beta": (0.1, 0.3, 1.0), "alpha": None},
}
STUDY_SEEDS = (0, 1, 2)
STUDY_EVAL_EVERY = 40  # a new config value for these runs: new run names (the old study's runs keep theirs)
# SeqKL pairs on 64 IMDb test prefixes, one pair each (tdpo_lab.products.eval_pairs), not ~11 training prompts
STUDY_EVAL_PAIR_SOURCE = "test"
STUDY_FIXED = {
    "eval_every": STUDY_EVAL_EVERY,
    "eval_pair_source": STUDY_EVAL_PAIR_SOURCE,
}  # every study run's


def parse_betas(text: str) -> dict[str, tuple[float, ...]]:
    """``'dpo=0.1,0.3;tdpo2=0.03,0.1'`` -> per-method grids; empty text -> :data:`FRONTIER_BETAS`."""
    if not text.strip():
        return dict(FRONTIER_BETAS)
    grid: dict[str, tuple[float, ...]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"--betas expects METHOD=B1,B2,... separated by ';', got {part!r}")
        method, values = (s.strip() for s in part.split("=", 1))
        if method not in method_names():
            raise ConfigError(
                f"unknown method {method!r} in --betas; choose from {', '.join(method_names())}"
            )
        try:
            grid[method] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--betas: {values!r} is not a comma-separated list of numbers") from None
        if not grid[method]:
            raise ConfigError(f"--betas: no beta value for {method}")
    if "dpo" not in grid:
        raise ConfigError("--betas must include dpo: every verdict of the study is against DPO")
    return grid


def study_configs(
    make: Callable[..., Config], grid: Mapping[str, Sequence[float]], seeds: Sequence[int]
) -> list[Config]:
    """The study's configurations, ``make(method=, beta=, seed=)`` for every grid point (alpha as profiled).

    Seed by seed: a study stopped half-way (the end of a session) leaves whole grids of its first seeds,
    which already give every envelope, rather than every seed of its first methods only.
    """
    return [make(method=m, beta=b, seed=s) for s in seeds for m, betas in grid.items() for b in betas]


def grid_configs(
    make: Callable[..., Config],
    grid: Mapping[str, Mapping[str, Sequence[float] | None]] | None = None,
    seeds: Sequence[int] = STUDY_SEEDS,
    **fixed,
) -> list[Config]:
    """``make(method=, beta=, [alpha=,] seed=, **fixed)`` for every point of ``grid`` (default
    :data:`STUDY_GRID`), seed by seed like :func:`study_configs`; alpha only where the grid gives one."""
    grid = STUDY_GRID if grid is None else grid
    configs = []
    for s in seeds:
        for method, knobs in grid.items():
            for alpha in knobs.get("alpha") or (None,):
                extra = {} if alpha is None else {"alpha": alpha}
                configs += [make(method=method, beta=b, seed=s, **extra, **fixed) for b in knobs["beta"]]
    return configs


# --- envelopes ---------------------------------------------------------------------------------------------


def method_curves(summary: pd.DataFrame, method: str) -> list[pd.DataFrame]:
    """One curve per (beta, alpha) of ``method``: its seed-mean checkpoints in step order.

    ``reward_se`` is the standard error of the mean over seeds (each seed's value being its mean over
    samples); with a single seed there is none, and ``reward_se`` falls back to the standard error over
    prompts of that one run (``se_source`` says which).
    """
    rows = summary[summary["method"] == method]
    curves = []
    for _, curve in rows.groupby(["beta", "alpha"], dropna=False):
        curve = curve.sort_values("step").copy()
        several = curve["n_seeds"] > 1
        if "reward_stderr" in curve.columns:
            curve["reward_se"] = np.where(several, curve["reward_se"], curve["reward_stderr"])
        curve["se_source"] = np.where(several, "seeds", "prompts (one seed)")
        curves.append(curve.reset_index(drop=True))
    return curves


def frontier_value(curves: Sequence[pd.DataFrame], budget: float) -> pd.Series:
    """F(budget): the highest reward on any curve at KL <= budget, reading along straight segments.

    The running maximum over a method's checkpoints and the points where a segment between two consecutive
    checkpoints crosses KL = budget: the upper envelope of all its curves, a non-decreasing function of the
    budget. Returns the reward, the KL and the beta where it is reached, and its standard error (interpolated
    like the reward on a segment).
    """
    best = {"reward": -np.inf, "kl_seq": np.nan, "reward_se": np.nan, "beta": np.nan}
    for curve in curves:
        kl, reward, se = (curve[c].to_numpy(dtype=float) for c in ("kl_seq", "reward", "reward_se"))
        candidates = [(kl[i], reward[i], se[i]) for i in range(len(kl)) if kl[i] <= budget]
        for i in range(len(kl) - 1):
            lo, hi = sorted((kl[i], kl[i + 1]))
            if lo < budget < hi:
                t = (budget - kl[i]) / (kl[i + 1] - kl[i])
                candidates.append(
                    (budget, reward[i] + t * (reward[i + 1] - reward[i]), se[i] + t * (se[i + 1] - se[i]))
                )
        for kl_c, r_c, se_c in candidates:
            if r_c > best["reward"]:
                best = {
                    "reward": r_c,
                    "kl_seq": kl_c,
                    "reward_se": se_c,
                    "beta": float(curve["beta"].iloc[0]),
                }
    return pd.Series(best)


def envelope(curves: Sequence[pd.DataFrame], points: int = 200) -> pd.DataFrame:
    """F(k) on ``points`` budgets from 0 to the largest KL of the curves (for drawing the envelope)."""
    top = max(float(c["kl_seq"].max()) for c in curves)
    budgets = np.unique(
        np.concatenate([np.linspace(0.0, top, points), *[c["kl_seq"].to_numpy(float) for c in curves]])
    )
    rows = [frontier_value(curves, k).rename({"kl_seq": "kl_reached"}) for k in budgets]
    return pd.DataFrame(rows).assign(budget=budgets)


def compare_frontiers(
    curves: Mapping[str, Sequence[pd.DataFrame]], method: str, base: str = "dpo", fractions=BUDGET_FRACTIONS
) -> pd.DataFrame:
    """``method`` against ``base`` at budgets ``fractions`` x the largest KL both reach: margins and verdicts."""
    k_star = min(max(float(c["kl_seq"].max()) for c in curves[m]) for m in (method, base))
    rows = []
    for fraction in fractions:
        budget = fraction * k_star
        mine, theirs = frontier_value(curves[method], budget), frontier_value(curves[base], budget)
        diff, se = mine["reward"] - theirs["reward"], float(np.hypot(mine["reward_se"], theirs["reward_se"]))
        rows.append(
            {
                "method": method,
                "base": base,
                "budget": budget,
                "reward": mine["reward"],
                "reward_se": mine["reward_se"],
                "base_reward": theirs["reward"],
                "base_reward_se": theirs["reward_se"],
                "margin": diff,
                "margin_se": se,
                "verdict": verdict(diff, se),
            }
        )
    return pd.DataFrame(rows)


def dominance_verdict(comparison: pd.DataFrame) -> str:
    """One verdict over a comparison's budgets: beyond 2 s.e. at every one, opposite at any, else noise."""
    verdicts = set(comparison["verdict"])
    if "opposite" in verdicts:
        return "opposite"
    if verdicts == {"beyond 2 standard errors"}:
        return "beyond 2 standard errors"
    return "within noise"


# --- the report ---------------------------------------------------------------------------------------------


def study_table(root: str | os.PathLike, grid: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """The collected runs of the study's grid under ``root`` (other runs there are left out)."""
    table = collect(root)
    keep = np.zeros(len(table), dtype=bool)
    for method, betas in grid.items():
        keep |= (table["method"] == method).to_numpy() & np.isin(
            np.round(table["beta"].to_numpy(dtype=float), 9), np.round(betas, 9)
        )
    table = table[keep].reset_index(drop=True)
    if table.empty:
        raise SystemExit(f"no finished evaluations of the study's grid under {root}: train it first")
    return table


def frontier_study_plot(summary: pd.DataFrame, methods: Sequence[str], ax=None):
    """Each method's seed-mean curves (thin, one marker per beta) and its envelope F(k) with a ±1 s.e. band."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2)) if ax is None else (ax.figure, ax)
    markers = ["o", "s", "^", "D", "v", "P"]
    for method in methods:
        color = method_color(method)
        curves = method_curves(summary, method)
        for i, curve in enumerate(curves):
            beta = float(curve["beta"].iloc[0])
            ax.errorbar(
                curve["kl_seq"],
                curve["reward"],
                xerr=curve["kl_seq_se"],
                yerr=curve["reward_se"],
                color=color,
                alpha=0.45,
                linewidth=0.8,
                marker=markers[i % len(markers)],
                markersize=4,
                capsize=2,
                label=f"{method_label(method)} β={beta:g}",
            )
        line = envelope(curves)
        ax.plot(
            line["budget"],
            line["reward"],
            color=color,
            linewidth=2.4,
            label=f"{method_label(method)} envelope",
        )
        ax.fill_between(
            line["budget"],
            line["reward"] - line["reward_se"],
            line["reward"] + line["reward_se"],
            color=color,
            alpha=0.15,
            linewidth=0,
        )
    ax.set_xlabel(r"sequence KL($\pi_\theta \,\|\, \pi_{\mathrm{ref}}$), nats")
    ax.set_ylabel("mean reward of samples (P(positive))")
    n = int(summary["n_seeds"].max())
    ax.set_title(f"Frontiers over β: upper envelopes of seed-mean checkpoints ({n} seed(s), ±1 s.e.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    return fig


def write_study(root: str | os.PathLike, grid: Mapping[str, Sequence[float]], out: str | os.PathLike) -> Path:
    """Write ``frontier_study.md`` (the table, the envelopes, the verdicts) and ``frontier_study.png``."""
    import matplotlib

    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = study_table(root, grid)
    summary = summarise(table)
    methods = [m for m in grid if m in set(summary["method"])]
    curves = {m: method_curves(summary, m) for m in methods}
    fig = frontier_study_plot(summary, methods)
    fig.savefig(out / "frontier_study.png", dpi=120, bbox_inches="tight")
    lines = [
        "# Frontier study",
        "",
        f"Runs under `{Path(root).name}`: "
        + "; ".join(f"{method_label(m)} β ∈ {list(grid[m])}" for m in methods)
        + f"; seeds {sorted(int(s) for s in table['seed'].unique())}.",
        "",
        "## Final evaluation of every setting (mean ± standard error over seeds)",
        "",
        results_markdown(summary, last_step_only=True),
        "## Envelopes against DPO",
        "",
        "Margin = F_method(k) − F_DPO(k) at KL budget k (fractions of the largest KL both envelopes reach), ± the",
        'standard error of the difference of two seed means. With 3 seeds, "beyond 2 standard errors" is',
        "suggestive, not decisive.",
        "",
        "| method | budget k (nats) | F_method(k) | F_DPO(k) | margin | verdict |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for m in methods:
        if m == "dpo":
            continue
        comparison = compare_frontiers(curves, m)
        verdicts[m] = dominance_verdict(comparison)
        for row in comparison.itertuples():
            lines.append(
                f"| {method_label(m)} | {row.budget:.2f} | {row.reward:.3f} ± {row.reward_se:.3f} | "
                f"{row.base_reward:.3f} ± {row.base_reward_se:.3f} | {row.margin:+.3f} ± {row.margin_se:.3f} | "
                f"{row.verdict} |"
            )
    lines += [
        "",
        "**Does the method's envelope dominate DPO's?** (beyond 2 s.e. at every budget / opposite at any)",
        "",
    ]
    lines += [f"- {method_label(m)}: {v}" for m, v in verdicts.items()]
    path = out / "frontier_study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = [
    "FRONTIER_BETAS",
    "STUDY_GRID",
    "grid_configs",
    "compare_frontiers",
    "dominance_verdict",
    "envelope",
    "frontier_value",
    "method_curves",
    "parse_betas",
    "study_configs",
    "write_study",
]
