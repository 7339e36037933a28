"""The frontier study: DPO, TDPO1 and TDPO2 each over its own beta grid and several seeds.

One beta per method compares curves that stop wherever their runs happened to stop: a method whose KL grows
slowly wins any comparison against one fast-drifting baseline. The DPO and TDPO papers trace each method's
frontier over several beta values; this module does the same (docs/methods.md section 6):

1. every (method, beta, seed) of the grid is trained (:mod:`tdpo_lab.fanout`);
2. each evaluation step of each (method, beta) is averaged over seeds (:func:`tdpo_lab.results.summarise`),
   giving *seed-mean checkpoints* with the standard error of that mean;
3. a method's frontier is the **upper envelope** of its seed-mean checkpoints over all its betas (never the
   best seed): the checkpoints no other checkpoint beats with at least as much reward for at most as much KL,
   joined by straight segments from the SFT point;
4. two methods are compared on their envelopes at KL budgets both reach, each difference with its standard
   error and a three-way verdict (:func:`tdpo_lab.results.verdict`).

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
from tdpo_lab.results import collect, summarise, verdict

# Chosen on the tiny profile (240 steps, seed 0) so that each method's final KLs span about 0.5-5 nats:
# DPO drifts fast at beta 0.1 (4.5 nats) and needs large betas to stay near 1 nat; TDPO2's SeqKL term holds
# it at 1.5 nats already at beta 0.1, so its grid reaches down to smaller betas instead.
FRONTIER_BETAS: dict[str, tuple[float, ...]] = {
    "dpo": (0.1, 0.3, 1.0, 3.0),
    "tdpo1": (0.1, 0.3, 1.0),
    "tdpo2": (0.03, 0.1, 0.3),
}
BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the largest KL both envelopes reach


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
    """The study's configurations, ``make(method=, beta=, seed=)`` for every grid point (alpha as profiled)."""
    return [make(method=m, beta=b, seed=s) for m, betas in grid.items() for b in betas for s in seeds]


# --- envelopes ----------------------------------------------------------------------------------------------


def seed_mean_checkpoints(summary: pd.DataFrame, method: str) -> pd.DataFrame:
    """Every (beta, alpha, step) of ``method`` in a :func:`~tdpo_lab.results.summarise` table, seed means."""
    rows = summary[summary["method"] == method]
    columns = ["beta", "alpha", "step", "n_seeds", "kl_seq", "kl_seq_se", "reward", "reward_se"]
    return rows[columns].reset_index(drop=True)


def upper_envelope(points: pd.DataFrame) -> pd.DataFrame:
    """The checkpoints not dominated by another (more reward for no more KL), in increasing KL.

    The SFT point (step 0, the same model for every setting) is kept once, as the envelope's start.
    """
    start = points[points["step"] == 0]
    rest = points[points["step"] != 0].sort_values(["kl_seq", "reward"], ascending=[True, False])
    kept = []
    if len(start):
        kept.append(start.iloc[[0]].assign(kl_seq=0.0, kl_seq_se=0.0))
    best = start["reward"].max() if len(start) else -np.inf
    for _, row in rest.iterrows():
        if row["reward"] > best:
            kept.append(row.to_frame().T)
            best = row["reward"]
    return pd.concat(kept, ignore_index=True).astype({"kl_seq": float, "reward": float, "reward_se": float})


def envelope_at(envelope: pd.DataFrame, budget: float) -> tuple[float, float]:
    """F(budget): the envelope's reward at KL = budget (straight segments between checkpoints) and its s.e."""
    kl = envelope["kl_seq"].to_numpy(dtype=float)
    if budget > kl.max() + 1e-12:
        raise ValueError(f"budget {budget:.3g} nats lies beyond the envelope's largest KL {kl.max():.3g}")
    reward = np.interp(budget, kl, envelope["reward"].to_numpy(dtype=float))
    se = np.interp(budget, kl, envelope["reward_se"].to_numpy(dtype=float))
    return float(reward), float(se)


def compare_envelopes(
    envelopes: Mapping[str, pd.DataFrame], method: str, base: str = "dpo", fractions=BUDGET_FRACTIONS
) -> pd.DataFrame:
    """``method`` against ``base`` at budgets ``fractions`` x the largest KL both reach: margins and verdicts."""
    k_star = min(envelopes[method]["kl_seq"].max(), envelopes[base]["kl_seq"].max())
    rows = []
    for fraction in fractions:
        budget = fraction * k_star
        r_m, se_m = envelope_at(envelopes[method], budget)
        r_b, se_b = envelope_at(envelopes[base], budget)
        diff, se = r_m - r_b, float(np.hypot(se_m, se_b))
        rows.append(
            {
                "method": method,
                "base": base,
                "budget": budget,
                "reward": r_m,
                "reward_se": se_m,
                "base_reward": r_b,
                "base_reward_se": se_b,
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


def frontier_study_plot(summary: pd.DataFrame, envelopes: Mapping[str, pd.DataFrame], ax=None):
    """Seed-mean checkpoints (faint, one marker per beta) and each method's envelope with error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5)) if ax is None else (ax.figure, ax)
    markers = ["o", "s", "^", "D", "v", "P"]
    for method, envelope in envelopes.items():
        color = method_color(method)
        points = seed_mean_checkpoints(summary, method)
        for i, (beta, rows) in enumerate(points[points["step"] > 0].groupby("beta")):
            ax.scatter(
                rows["kl_seq"],
                rows["reward"],
                color=color,
                alpha=0.35,
                marker=markers[i % len(markers)],
                s=22,
                label=f"{method_label(method)} β={beta:g} (checkpoints)",
            )
        ax.errorbar(
            envelope["kl_seq"],
            envelope["reward"],
            xerr=envelope["kl_seq_se"],
            yerr=envelope["reward_se"],
            color=color,
            linewidth=2,
            capsize=3,
            label=f"{method_label(method)} envelope",
        )
    ax.set_xlabel(r"sequence KL($\pi_\theta \,\|\, \pi_{\mathrm{ref}}$), nats")
    ax.set_ylabel("mean reward of samples (P(positive))")
    n = int(summary["n_seeds"].max())
    ax.set_title(f"Frontiers over β: upper envelopes of seed-mean checkpoints ({n} seeds, ±1 s.e.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    return fig


def write_study(root: str | os.PathLike, grid: Mapping[str, Sequence[float]], out: str | os.PathLike) -> Path:
    """Write ``frontier_study.md`` (the table, the envelopes, the verdicts) and ``frontier_study.png``."""
    import matplotlib

    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    from tdpo_lab.results import results_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = study_table(root, grid)
    summary = summarise(table)
    methods = [m for m in grid if m in set(summary["method"])]
    envelopes = {m: upper_envelope(seed_mean_checkpoints(summary, m)) for m in methods}
    fig = frontier_study_plot(summary, envelopes)
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
        comparison = compare_envelopes(envelopes, m)
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
    "compare_envelopes",
    "dominance_verdict",
    "envelope_at",
    "parse_betas",
    "seed_mean_checkpoints",
    "study_configs",
    "upper_envelope",
    "write_study",
]
