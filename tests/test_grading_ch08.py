"""Chapter 08's checks: the solution passes, and each typical mistake is named (tdpo_lab.course.grading.ch08)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch08 import check_frontier, check_standard_error, check_verdict, frontier_value

# --- graded exercise 1: the standard error over seeds --------------------------------------------------

SEEDS = np.array([0.612, 0.587, 0.655, 0.631])


def test_standard_error_solution_passes(capsys):
    check_standard_error(SEEDS.std(ddof=1) / math.sqrt(len(SEEDS)), SEEDS)
    check_standard_error(float(np.std(SEEDS, ddof=1) / np.sqrt(4)), list(SEEDS))  # a float, a list: fine
    assert capsys.readouterr().out.startswith("correct: standard error of the mean of 4 seeds")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (SEEDS.std() / 2, "ddof=0"),
        (SEEDS.std(ddof=1), "standard deviation of the seeds"),
        (SEEDS.std(), "ddof=0, not divided"),
        (SEEDS.std(ddof=1) / 4, "division by n"),
        (SEEDS.var(ddof=1) / 2, "variance"),
        (SEEDS.std(ddof=1) / math.sqrt(3), r"sqrt\(n - 1\)"),
    ],
)
def test_standard_error_mistakes_are_named(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_standard_error(wrong, SEEDS)


def test_standard_error_needs_two_seeds():
    with pytest.raises(ExerciseError, match="at least two"):
        check_standard_error(0.0, [0.6])


# --- graded exercise 2: the frontier function on one curve ---------------------------------------------

KL = np.array([0.0, 0.05, 0.21, 0.4])  # a chapter-like curve: the SFT point, then three evaluations
REWARD = np.array([0.48, 0.47, 0.55, 0.6])


def frontier(kl, reward, budget, *, crossings=True, strict=False, wrong_end=False, budget_ignored=False):
    # the notebook's solution, with switches for the slips a student makes
    if budget_ignored:
        return reward.max()
    best = reward[kl < budget].max() if strict else reward[kl <= budget].max()
    for j in range(1, len(kl)) if crossings else ():
        if min(kl[j - 1], kl[j]) < budget < max(kl[j - 1], kl[j]):
            frac = (budget - kl[j - 1]) / (kl[j] - kl[j - 1])
            if wrong_end:
                best = max(best, reward[j] + frac * (reward[j - 1] - reward[j]))
            else:
                best = max(best, reward[j - 1] + frac * (reward[j] - reward[j - 1]))
    return best


def test_frontier_solution_passes(capsys):
    check_frontier(frontier, KL, REWARD)
    out = capsys.readouterr().out
    assert (
        out.startswith("correct: F on 8 test budgets") and f"F(0.2) = {frontier(KL, REWARD, 0.2):.4f}" in out
    )


def test_reference_reads_the_crossing():
    # half-way between KL 0.05 and 0.21 (budget 0.13): 0.47 + 0.5 * (0.55 - 0.47) = 0.51 > every point within
    assert frontier_value(KL, REWARD, 0.13) == pytest.approx(0.51)
    assert frontier_value(KL, REWARD, 0.05) == pytest.approx(0.48)  # the SFT point is still the best there
    assert frontier_value(KL, REWARD, 5.0) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"crossings": False}, "only the evaluations read"),
        ({"strict": True}, "KL < budget"),
        ({"wrong_end": True}, "wrong end"),
        ({"budget_ignored": True}, "whole curve"),
    ],
)
def test_frontier_mistakes_are_named(slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_frontier(lambda k, r, b: frontier(k, r, b, **slip), KL, REWARD)


def test_frontier_last_point_within_is_named():
    with pytest.raises(ExerciseError, match="last evaluation within the budget"):
        check_frontier(lambda k, r, b: r[k <= b][-1], KL, REWARD)


def test_frontier_must_be_a_function():
    with pytest.raises(ExerciseError, match="must be a function"):
        check_frontier(0.5, KL, REWARD)


# --- graded exercise 3: the verdict --------------------------------------------------------------------


def verdict(diff, se):
    if diff > 2 * se:
        return "beyond 2 standard errors"
    if diff < -2 * se:
        return "opposite"
    return "within noise"


def test_verdict_solution_passes(capsys):
    check_verdict(verdict)
    assert capsys.readouterr().out.startswith("correct: verdicts on 12")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda d, s: "beyond 2 standard errors" if abs(d) > 2 * s else "within noise", "against the claim"),
        (
            lambda d, s: "beyond 2 standard errors" if d > s else ("opposite" if d < -s else "within noise"),
            "one standard error",
        ),
        (
            lambda d, s: (
                "beyond 2 standard errors" if d >= 2 * s else ("opposite" if d <= -2 * s else "within noise")
            ),
            r"exactly 2 s\.e\.",
        ),
        (
            lambda d, s: (
                "beyond 2 standard errors" if d > 2 * s else ("opposite" if d < 0 else "within noise")
            ),
            "every negative difference",
        ),
        (
            lambda d, s: (
                "beyond 2 standard errors"
                if d > 2 * s * s
                else ("opposite" if d < -2 * s * s else "within noise")
            ),
            "squared",
        ),
    ],
)
def test_verdict_mistakes_are_named(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_verdict(wrong)


def test_verdict_unknown_answer_lists_the_three():
    with pytest.raises(ExerciseError, match="beyond 2 standard errors.*within noise.*opposite"):
        check_verdict(lambda d, s: "beyond noise" if abs(d) > 2 * s else "within noise")


def test_verdict_must_be_a_function():
    with pytest.raises(ExerciseError, match="must be a function"):
        check_verdict("within noise")
