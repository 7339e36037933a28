"""A method's reward-vs-KL frontier without selection bias: a monotone fit over all its checkpoints.

The old estimate (:func:`tdpo_lab.runs.study.frontier_value`) is the upper envelope of a method's seed-mean
checkpoints: at each KL budget, the *largest* of many noisy points. A maximum of noisy values is biased
upward, the more so the more points it chooses from, so a method with a larger beta grid looks better; and
its error bar is that of the chosen point alone.

Here every checkpoint of every beta (and alpha) and every seed of a method is one point (KL, reward), each
the mean over the evaluation prompts of that run at that step. The frontier is the isotonic (monotone
non-decreasing) least-squares fit of reward on KL through all of them (scikit-learn's
``IsotonicRegression(increasing=True)``), read at KL budgets by straight lines between its knots, and never
beyond the KL range the points cover. The fit averages noisy points instead of choosing among them. What
it estimates is the method's mean reward at a KL over its grid; this is the frontier where the grid's
curves lie on one reward-vs-KL curve (as the study's curves do to within their noise), and below it
where one setting is better than another at the same KL. The band comes from :mod:`tdpo_lab.runs.bootstrap`
(seeds, and prompts within them, resampled; the fit redone on each replicate).

:func:`envelope_overstatement` tabulates, budget by budget, how far the old envelope lies above the fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.isotonic import isotonic_regression

from tdpo_lab.runs.bootstrap import N_BOOT, bootstrap, checkpoint_arrays
from tdpo_lab.runs.results import summarise
from tdpo_lab.runs.study import frontier_value, method_curves

__all__ = [
    "envelope_overstatement",
    "frontier_data",
    "isotonic_at",
    "isotonic_frontier",
    "kl_range",
]


def isotonic_at(kl: np.ndarray, reward: np.ndarray, budgets: Sequence[float]) -> np.ndarray:
    """The monotone fit of ``reward`` on ``kl`` (any shape, flattened together) read at ``budgets``.

    What ``IsotonicRegression(increasing=True, out_of_bounds="nan").fit(kl, reward).predict(budgets)`` gives
    (tied KLs pooled into their mean, pool-adjacent-violators, straight lines between knots), built from
    scikit-learn's ``isotonic_regression`` directly: the bootstrap refits thousands of times and the class's
    checks cost ten times the fit. Returns ``[len(budgets)]``; NaN outside [min KL, max KL] (no extrapolation).
    """
    x, y = np.asarray(kl, dtype=float).ravel(), np.asarray(reward, dtype=float).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(
            f"need at least two (KL, reward) points of the same shape, got {x.shape} and {y.shape}"
        )
    knots, where = np.unique(x, return_inverse=True)
    if len(knots) < 2:
        raise ValueError("every point has the same KL: no frontier to fit")
    weight = np.bincount(where).astype(float)
    fit = isotonic_regression(np.bincount(where, weights=y) / weight, sample_weight=weight, increasing=True)
    return np.interp(np.asarray(budgets, dtype=float), knots, fit, left=np.nan, right=np.nan)


def frontier_data(table: pd.DataFrame, method: str, prefix: str = "") -> tuple[dict, dict]:
    """A method's per-prompt reward and KL as bootstrap data: ``({prefix+'kl', prefix+'reward'}, clusters)``.

    ``table``: :func:`tdpo_lab.runs.results.collect` with ``per_prompt=True``; every checkpoint (beta, alpha,
    step) of ``method`` with every seed, arrays ``[C, S, U]`` over the evaluation prompts.
    """
    rows = table[table["method"] == method]
    if rows.empty:
        raise ValueError(f"no runs of {method!r} in the table; it has {sorted(table['method'].unique())}")
    _, kl, _, prompts = checkpoint_arrays(rows, "kl_seq_per_prompt")
    _, reward, _, prompts_r = checkpoint_arrays(rows, "reward_per_prompt")
    if list(prompts) != list(prompts_r):
        raise ValueError("reward and KL were logged on different prompts")
    data = {prefix + "kl": ("prompts", kl), prefix + "reward": ("prompts", reward)}
    return data, {"prompts": prompts}


def kl_range(table: pd.DataFrame, method: str) -> tuple[float, float]:
    """(smallest, largest) KL of a method's (checkpoint, seed) points: where its fit is defined."""
    kl = table.loc[table["method"] == method, "kl_seq"].to_numpy(dtype=float)
    return float(kl.min()), float(kl.max())


def isotonic_frontier(
    table: pd.DataFrame,
    method: str,
    budgets: Sequence[float],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.9,
) -> pd.DataFrame:
    """The monotone frontier of ``method`` at ``budgets``, with its bootstrap standard error and band.

    Columns: ``budget``, ``reward`` (the fit on the data), ``reward_se``, ``lo``/``hi`` (percentile band
    at ``level``), ``n_points`` (the (checkpoint, seed) points fitted). NaN where the budget is outside the
    method's KL range.
    """
    data, clusters = frontier_data(table, method)
    budgets = np.asarray(budgets, dtype=float)
    result = bootstrap(
        lambda d: isotonic_at(d["kl"], d["reward"], budgets), data, clusters, n_boot=n_boot, seed=seed
    )
    lo, hi = result.interval(level)
    return pd.DataFrame(
        {
            "budget": budgets,
            "reward": result.estimate,
            "reward_se": result.se,
            "lo": lo,
            "hi": hi,
            "n_points": data["kl"][1].shape[0] * data["kl"][1].shape[1],
        }
    )


def envelope_overstatement(
    table: pd.DataFrame, method: str, budgets: Sequence[float], **kwargs
) -> pd.DataFrame:
    """How far the old upper envelope (max over seed-mean checkpoints) lies above the monotone fit.

    Columns: ``budget``, ``envelope`` and ``envelope_se`` (:func:`tdpo_lab.runs.study.frontier_value`, its
    error bar that of the chosen point), ``isotonic`` and ``isotonic_se`` (:func:`isotonic_frontier`),
    ``overstatement`` = envelope - isotonic. ``kwargs`` go to :func:`isotonic_frontier`.
    """
    curves = method_curves(summarise(table[table["method"] == method]), method)
    fit = isotonic_frontier(table, method, budgets, **kwargs)
    envelope = [frontier_value(curves, float(k)) for k in fit["budget"]]
    return pd.DataFrame(
        {
            "method": method,
            "budget": fit["budget"],
            "envelope": [float(e["reward"]) for e in envelope],
            "envelope_se": [float(e["reward_se"]) for e in envelope],
            "isotonic": fit["reward"],
            "isotonic_se": fit["reward_se"],
            "overstatement": [float(e["reward"]) for e in envelope] - fit["reward"],
        }
    )
