"""Checks for the graded exercises of notebooks/08_frontier_and_results.ipynb (the frontier and the results).

1. :func:`check_standard_error`: the standard error of a mean over seeds, as :func:`tdpo_lab.runs.results.summarise`
   computes it (std with ddof=1, divided by sqrt(n));
2. :func:`check_frontier`: a function F(k), the best reward on one curve of (KL, reward) points within a KL
   budget k, reading along the segments that cross the budget line (the chapter's definition, section 2);
3. :func:`check_verdict`: the three-way verdict on a difference and its standard error.

The chapter's ``best_within`` reads F over all of a method's curves; :func:`frontier_value` here is the same
reading for one curve, the reference the check compares with.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from tdpo_lab.course.grading import ExerciseError, check_close, passed
from tdpo_lab.runs.results import summarise

__all__ = ["VERDICTS", "check_frontier", "check_standard_error", "check_verdict", "frontier_value"]


# --- 1 · the standard error over seeds ----------------------------------------------------------------


def check_standard_error(mine, values) -> None:
    """Graded exercise 1: ``mine`` = the standard error of the mean of ``values`` (one per seed)."""
    x = np.asarray(values, dtype=float).reshape(-1)
    if x.size < 2:
        raise ExerciseError("a standard error over seeds needs at least two seeds' values")
    table = pd.DataFrame(
        {"method": "dpo", "beta": 0.1, "alpha": 0.5, "step": 0, "seed": range(x.size), "reward": x}
    )
    want = torch.tensor(float(summarise(table)["reward_se"].iloc[0]), dtype=torch.float64)
    n = x.size
    mistakes = {
        "numpy's default ddof=0 (dividing by n): the sample standard deviation divides by n - 1, "
        "np.std(x, ddof=1)": x.std() / math.sqrt(n),
        "the standard deviation of the seeds: the standard error of their mean divides it by sqrt(n)": (
            x.std(ddof=1)
        ),
        "the standard deviation with ddof=0, not divided by sqrt(n)": x.std(),
        "a division by n: the standard error divides the standard deviation by sqrt(n)": x.std(ddof=1) / n,
        "the variance in place of the standard deviation: take its square root": x.var(ddof=1) / math.sqrt(n),
        "a division by sqrt(n - 1): the n - 1 belongs inside the standard deviation (ddof=1)": (
            x.std(ddof=1) / math.sqrt(n - 1)
        ),
    }
    check_close(mine, want, name="se_mine", mistakes=mistakes, rtol=1e-6, atol=1e-12)
    passed(f"standard error of the mean of {n} seeds: {float(want):.4g}")


# --- 2 · the frontier function on one curve -----------------------------------------------------------


def frontier_value(kl, reward, budget: float, *, strict: bool = False, wrong_end: bool = False) -> float:
    """F(k): the highest reward on the curve joining ``(kl[i], reward[i])`` in order, at KL <= ``budget``.

    Candidates are the evaluations with KL <= budget and, for every segment that crosses the budget line
    (one end below, the other above), the point on it at KL = budget. ``-inf`` if there is none.
    ``strict`` and ``wrong_end`` give two typical slips (KL < budget; interpolating from the wrong end).
    """
    kl, reward = np.asarray(kl, dtype=float), np.asarray(reward, dtype=float)
    within = kl < budget if strict else kl <= budget
    candidates = list(reward[within])
    for i in range(len(kl) - 1):
        lo, hi = sorted((kl[i], kl[i + 1]))
        if lo < budget < hi:
            t = (budget - kl[i]) / (kl[i + 1] - kl[i])
            if wrong_end:
                candidates.append(reward[i + 1] + t * (reward[i] - reward[i + 1]))
            else:
                candidates.append(reward[i] + t * (reward[i + 1] - reward[i]))
    return max(candidates, default=-math.inf)


# (kl, reward) curves in step order and budgets that tell the usual slips apart: a budget between evaluations
# (a crossing above the best point within it), one exactly at an evaluation, one past the curve's end; a curve
# whose KL goes back (a segment that crosses the budget line from the right); a curve whose best point within
# the budget is not its last one there
_CURVES = [
    ([0.0, 0.2, 0.5, 1.0], [0.50, 0.55, 0.70, 0.72], [0.35, 0.5, 0.75, 2.0]),
    ([0.0, 0.4, 0.3, 0.9], [0.50, 0.80, 0.60, 0.65], [0.35, 0.3, 0.1]),
    ([0.0, 0.1, 0.25, 0.6], [0.50, 0.70, 0.60, 0.62], [0.3]),
]


def check_frontier(frontier, kl, reward) -> None:
    """Graded exercise 2: ``frontier(kl, reward, budget)`` = F(budget) on the curve ``kl``, ``reward`` (arrays,
    in step order). Checked on small curves made to tell the usual slips apart, then read on the chapter's
    curve ``kl``, ``reward`` at half its largest KL.
    """
    if not callable(frontier):
        raise ExerciseError(
            f"frontier must be a function frontier(kl, reward, budget), got {type(frontier).__name__}"
        )
    real = (np.asarray(kl, dtype=float), np.asarray(reward, dtype=float))
    cases = [(np.asarray(k), np.asarray(r), b) for k, r, budgets in _CURVES for b in budgets]
    cases.append((*real, 0.5 * float(real[0].max())))

    def over_cases(rule) -> torch.Tensor:
        return torch.tensor([float(rule(k, r, b)) for k, r, b in cases], dtype=torch.float64)

    mine = over_cases(frontier)
    want = over_cases(frontier_value)

    def last_within(k, r, b):
        inside = r[k <= b]
        return inside[-1] if inside.size else -math.inf

    mistakes = {
        "only the evaluations read: where a segment crosses the budget line, the point on it at KL = budget "
        "counts too": over_cases(lambda k, r, b: r[k <= b].max() if (k <= b).any() else -math.inf),
        "the highest reward of the whole curve: only points with KL <= budget count": over_cases(
            lambda k, r, b: r.max()
        ),
        "the last evaluation within the budget: F is the highest reward within it": over_cases(last_within),
        "KL < budget: an evaluation exactly at the budget counts (KL <= budget)": over_cases(
            lambda k, r, b: frontier_value(k, r, b, strict=True)
        ),
        "the crossing point interpolated from the wrong end: r_(j-1) + t (r_j - r_(j-1)) with "
        "t = (budget - KL_(j-1)) / (KL_j - KL_(j-1))": over_cases(
            lambda k, r, b: frontier_value(k, r, b, wrong_end=True)
        ),
    }
    wrong = [
        f"budget {b:g} on the curve with KL {k.tolist()}"
        for (k, _, b), a, w in zip(cases, mine.tolist(), want.tolist(), strict=True)
        if not math.isclose(a, w, rel_tol=1e-9, abs_tol=1e-12)
    ]
    check_close(
        mine,
        want,
        name="frontier(...)",
        mistakes=mistakes,
        rtol=1e-9,
        atol=1e-12,
        hint=f"wrong for {wrong[0]}" if wrong else "",
    )
    passed(
        f"F on {len(cases) - 1} test budgets; on the chapter's curve F({cases[-1][2]:.4g}) = {float(want[-1]):.4f}"
    )


# --- 3 · the verdict ----------------------------------------------------------------------------------

VERDICTS = ("beyond 2 standard errors", "within noise", "opposite")
_CODE = {"beyond 2 standard errors": 1.0, "within noise": 0.0, "opposite": -1.0}
# (difference, standard error): both sides of each threshold, exactly 2 s.e. (binary-exact numbers), zero
_CASES = [
    (1.0, 0.25),
    (0.75, 0.25),
    (0.5, 0.25),
    (0.3, 0.25),
    (0.0, 0.25),
    (-0.3, 0.25),
    (-0.5, 0.25),
    (-0.75, 0.25),
    (0.2, 0.05),
    (-0.2, 0.05),
    (0.0625, 0.0625),
    (-0.0625, 0.0625),
]


def _codes(rule) -> torch.Tensor:
    return torch.tensor([rule(d, s) for d, s in _CASES], dtype=torch.float64)


def check_verdict(verdict) -> None:
    """Graded exercise 3: ``verdict(diff, se)`` returns one of :data:`VERDICTS` for a difference in the claimed
    direction (positive supports the claim): beyond 2 s.e. (diff > 2 se), opposite (diff < -2 se), else noise.
    """
    if not callable(verdict):
        raise ExerciseError(f"verdict must be a function verdict(diff, se), got {type(verdict).__name__}")
    got = []
    for diff, se in _CASES:
        answer = verdict(diff, se)
        if answer not in _CODE:
            raise ExerciseError(
                f"verdict({diff}, {se}) returned {answer!r}; it must return one of {list(VERDICTS)}"
            )
        got.append(_CODE[answer])
    mine = torch.tensor(got, dtype=torch.float64)

    def sign(x):
        return float(x > 0) - float(x < 0)

    want = _codes(lambda d, s: sign(d) if abs(d) > 2 * s else 0.0)
    mistakes = {
        "'beyond' for any |diff| > 2 se: a difference that large against the claim is 'opposite'": _codes(
            lambda d, s: 1.0 if abs(d) > 2 * s else 0.0
        ),
        "one standard error as the threshold: noise reaches out to 2 s.e.": _codes(
            lambda d, s: sign(d) if abs(d) > s else 0.0
        ),
        "a difference of exactly 2 s.e. called beyond noise: it must exceed 2 s.e. (>, not >=)": _codes(
            lambda d, s: sign(d) if abs(d) >= 2 * s else 0.0
        ),
        "every negative difference called 'opposite': within 2 s.e. it is noise either way": _codes(
            lambda d, s: 1.0 if d > 2 * s else (-1.0 if d < 0 else 0.0)
        ),
        "the difference compared with 2 se squared (a variance): compare it with 2 se": _codes(
            lambda d, s: sign(d) if abs(d) > 2 * s * s else 0.0
        ),
    }
    wrong = [f"verdict({d}, {s})" for (d, s), a, b in zip(_CASES, got, want.tolist(), strict=True) if a != b]
    check_close(
        mine,
        want,
        name="the verdicts",
        mistakes=mistakes,
        hint=f"wrong for {', '.join(wrong[:4])}" + (" ..." if len(wrong) > 4 else ""),
    )
    passed(f"verdicts on {len(_CASES)} (difference, s.e.) cases")
