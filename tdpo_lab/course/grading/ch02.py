"""Checks for the graded exercises of notebooks/02_preference_pairs.ipynb (sample, score, rank).

1. :func:`check_rank_pairs`: every ranked pair of each prompt's samples, ties and empty continuations dropped
   (``tdpo_lab.products.pairs.rank_pairs``);
2. :func:`check_gap_stats`: the reward gap of every pair, their mean and the share above 0.1 (``pair_report``);
3. :func:`check_repaired`: a table with inverted pairs repaired, texts and rewards swapped together.

Exercises 1 and 3 produce tables; they are compared column by column here (``check_close`` compares
tensors), and a wrong table is matched against the tables that typical mistakes produce, as ``check_close``
does for numbers. Exercise 2 goes through ``check_close``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch

from tdpo_lab.course.grading import ExerciseError, check_close, passed
from tdpo_lab.products.pairs import (
    PAIR_COLUMNS,
    InvertedPairError,
    assert_no_inverted,
    pair_report,
    rank_pairs,
)

__all__ = ["check_gap_stats", "check_rank_pairs", "check_repaired"]

REWARDS = ["reward_chosen", "reward_rejected"]


def _f64(value, name: str = "value") -> torch.Tensor:
    """``value`` (a number, an array, a Series) as a float64 tensor, the form ``check_close`` compares."""
    try:
        return torch.tensor(np.array(value, dtype=float), dtype=torch.float64)
    except (TypeError, ValueError):
        raise ExerciseError(
            f"{name} must be a number or an array of numbers, got {type(value).__name__}"
        ) from None


def _same(mine: pd.DataFrame, want: pd.DataFrame) -> bool:
    """Same columns and rows in the same order: texts and ids equal, rewards within 1e-9 (index ignored)."""
    if list(mine.columns) != list(want.columns) or len(mine) != len(want):
        return False
    for column in want.columns:
        a, b = mine[column].to_numpy(), want[column].to_numpy()
        if column in REWARDS:
            try:
                if not np.allclose(a.astype(float), b.astype(float), rtol=0, atol=1e-9):
                    return False
            except (TypeError, ValueError):  # not numbers at all
                return False
        elif not all(x == y for x, y in zip(a.tolist(), b.tolist(), strict=True)):
            return False
    return True


def _check_table(
    mine,
    want: pd.DataFrame,
    *,
    name: str,
    mistakes: Mapping[str, pd.DataFrame | Callable[[], pd.DataFrame]],
    by_length: Mapping[str, Callable[[], int]] | None = None,
    hint: str = "",
) -> None:
    """Raise :class:`ExerciseError` unless ``mine`` has ``want``'s columns and rows; name a matching mistake.

    ``mistakes`` map a mistake to the table it gives; ``by_length`` to the number of rows it gives, for
    mistakes whose rows cannot be pinned down (a length that differs from the answer's names the mistake).
    """
    if not isinstance(mine, pd.DataFrame):
        raise ExerciseError(f"{name} must be a pandas DataFrame, got {type(mine).__name__}")
    if list(mine.columns) != list(want.columns):
        raise ExerciseError(
            f"{name} has columns {list(mine.columns)}, expected {list(want.columns)} (in this order)"
        )
    if _same(mine, want):
        return
    for mistake, value in mistakes.items():
        wrong = value() if callable(value) else value
        if wrong is not None and _same(mine, wrong):
            raise ExerciseError(f"{name} is not right: it looks like {mistake}.")
    if len(mine) != len(want):
        for mistake, rows in (by_length or {}).items():
            if len(mine) == rows():
                raise ExerciseError(f"{name} is not right: it looks like {mistake}.")
        raise ExerciseError(f"{name} has {len(mine)} rows, expected {len(want)}. {hint}")
    key = list(want.columns)
    if _same(mine.sort_values(key, ignore_index=True), want.sort_values(key, ignore_index=True)):
        raise ExerciseError(
            f"{name} has the right rows in another order: go through the prompts by prompt_id and, within a "
            "prompt, through the pairs (j, k), j < k, in the table order of its samples "
            "(itertools.combinations); later chapters refer to a pair by its row"
        )
    row = next(
        i
        for i in range(len(want))
        if not _same(mine.iloc[i : i + 1].reset_index(drop=True), want.iloc[i : i + 1].reset_index(drop=True))
    )
    raise ExerciseError(
        f"{name} is not right at row {row} (the first that differs): yours {mine.iloc[row].to_dict()}, "
        f"expected {want.iloc[row].to_dict()}. {hint}"
    )


def _rank(samples: pd.DataFrame, min_gap: float, **mistake) -> pd.DataFrame:
    """The ranking with one typical mistake switched on (the mistakes' tables; the answer is ``rank_pairs``)."""
    groups = [("all", samples)] if mistake.get("across_prompts") else samples.groupby("prompt_id", sort=True)
    pairs = itertools.permutations if mistake.get("permutations") else itertools.combinations
    rows = []
    for _, group in groups:
        for a, b in pairs(group.to_dict("records"), 2):
            gap = a["reward"] - b["reward"]
            empty = (lambda t: not t) if mistake.get("no_strip") else (lambda t: not t.strip())
            if not mistake.get("keep_empty") and (empty(a["text"]) or empty(b["text"])):
                continue
            if (gap == 0 and not mistake.get("keep_ties")) or (
                abs(gap) < min_gap and not mistake.get("ignore_min_gap")
            ):
                continue
            win, lose = (a, b) if (gap > 0) != bool(mistake.get("swap")) else (b, a)
            rows.append(
                (a["prompt_id"], win["prompt"], win["text"], lose["text"], win["reward"], lose["reward"])
            )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _count_all_pairs(samples: pd.DataFrame, min_gap: float) -> int:
    """How many pairs a ranking over all samples at once (prompts ignored) keeps; vectorised, it is big."""
    r = samples.loc[samples["text"].str.strip() != "", "reward"].to_numpy(dtype=float)
    gap = np.abs(r[:, None] - r[None, :])[np.triu_indices(len(r), k=1)]
    return int(((gap > 0) & (gap >= min_gap)).sum())


def check_rank_pairs(mine, samples: pd.DataFrame, min_gap: float = 0.0) -> None:
    """``mine``: the pair table of ``samples`` (columns prompt_id, prompt, text, reward; K rows per prompt).

    The answer is the kit's ``rank_pairs`` on the same samples, with each prompt's id as in ``samples``.
    """
    ids = sorted(samples["prompt_id"].unique())
    groups = [samples[samples["prompt_id"] == pid] for pid in ids]
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got sizes {sorted(sizes)}")
    want = rank_pairs(
        [g["prompt"].iloc[0] for g in groups],
        [g["text"].tolist() for g in groups],
        np.stack([g["reward"].to_numpy(dtype=float) for g in groups]),
        min_gap=min_gap,
    )
    want["prompt_id"] = [ids[i] for i in want["prompt_id"]]  # rank_pairs numbers the prompts 0, 1, ...
    mistakes = {
        "ties kept: two equal rewards state no preference, so such a pair is dropped": lambda: _rank(
            samples, min_gap, keep_ties=True
        ),
        "pairs with an empty continuation kept: a sample that stopped at once has nothing to train on": (
            lambda: _rank(samples, min_gap, keep_empty=True)
        ),
        "a whitespace-only continuation counted as non-empty: test text.strip(), not text": lambda: _rank(
            samples, min_gap, no_strip=True
        ),
        "chosen and rejected swapped: the chosen response is the one with the higher reward": lambda: _rank(
            samples, min_gap, swap=True
        ),
        "every ordered pair (itertools.permutations), so each pair appears twice; "
        "use unordered pairs (itertools.combinations)": lambda: _rank(samples, min_gap, permutations=True),
        f"min_reward_gap ignored: pairs with a gap below {min_gap} are dropped": lambda: _rank(
            samples, min_gap, ignore_min_gap=True
        ),
    }
    _check_table(
        mine,
        want,
        name="mine",
        mistakes=mistakes,
        by_length={
            "samples of different prompts paired: a pair compares two continuations of the same prompt": (
                lambda: _count_all_pairs(samples, min_gap)
            )
        },
        hint="Compare your first wrong row with the rule above: which condition should have dropped or "
        "ordered it?",
    )
    passed(f"{len(want)} ranked pairs from {len(ids)} prompts, ties and empty continuations dropped")


def check_gap_stats(gaps, gap_mean, share_above, pairs: pd.DataFrame) -> None:
    """``gaps``: r_w - r_l per row of ``pairs``; ``gap_mean``: their mean; ``share_above``: the fraction > 0.1.

    The mean and the fraction are the kit's ``pair_report``.
    """
    report = pair_report(pairs)
    chosen, rejected = (pairs[c].to_numpy(dtype=float) for c in REWARDS)
    want = chosen - rejected
    assert np.isclose(want.mean(), report["gap_mean"])  # the report's gaps are these
    check_close(
        _f64(gaps, "gaps"),
        _f64(want),
        name="gaps",
        mistakes={
            "rejected minus chosen: the gap r_w - r_l of a pair is never negative": _f64(-want),
            "each pair's mean reward, not the difference of its two rewards": _f64((chosen + rejected) / 2),
        },
        hint="One number per row of the pair table, in the table's order.",
    )
    per_prompt = pairs.assign(gap=want).groupby("prompt_id")["gap"].mean()
    check_close(
        _f64(gap_mean, "gap_mean"),
        _f64(report["gap_mean"]),
        name="gap_mean",
        mistakes={
            "the mean of each prompt's mean gap: a prompt with few pairs would weigh as much as one with many": (
                _f64(per_prompt.mean())
            ),
            "the median gap, not the mean": _f64(np.median(want)),
            "the sum of the gaps, not their mean": _f64(want.sum()),
            "the mean of rejected minus chosen (the sign flipped)": _f64(-want.mean()),
        },
    )
    share = report["gap_above_0.1"]
    check_close(
        _f64(share_above, "share_above"),
        _f64(share),
        name="share_above",
        mistakes={
            "a percentage: the share is a fraction between 0 and 1": _f64(100 * share),
            "the number of pairs above 0.1, not their fraction": _f64(float((want > 0.1).sum())),
            "the share at or below 0.1 (the complement)": _f64(1 - share),
            "gap >= 0.1 instead of gap > 0.1": _f64(float((want >= 0.1).mean())),
        },
    )
    passed(f"{len(want)} gaps, mean {report['gap_mean']:.3f}, {share:.0%} of them above 0.1")


def check_repaired(fixed, broken: pd.DataFrame) -> None:
    """``fixed``: a copy of ``broken`` in which every inverted pair has chosen and rejected swapped back.

    Texts and rewards move together; rows that are not inverted (ties included) stay as they are, and so
    does the index. The repaired table must pass the kit's ``assert_no_inverted``.
    """
    if fixed is broken:
        raise ExerciseError(
            "fixed is broken itself, modified in place: the broken table is gone too; start from a copy "
            "(broken.copy())"
        )
    inverted = broken["reward_chosen"] < broken["reward_rejected"]
    if not inverted.any():
        raise ExerciseError(
            "broken has no inverted pair left, so there is nothing to check: an earlier attempt probably "
            "repaired it in place; run the cell that builds broken again, then this exercise"
        )
    want = _swap(broken, inverted)
    assert_no_inverted(want)
    mistakes = {
        "only the rewards swapped back: the table passes assert_no_inverted, yet the texts are still backwards. "
        "The assertion sees the rewards only; such a table would train the policy towards the wrong sentiment "
        "without any error": _swap(broken, inverted, columns=REWARDS),
        "only the texts swapped back, the rewards still inverted: move each reward with its text": _swap(
            broken, inverted, columns=["chosen", "rejected"]
        ),
        "every row swapped, not only the inverted ones (reward_chosen < reward_rejected)": _swap(
            broken, pd.Series(True, index=broken.index)
        ),
        "ties swapped too (<= instead of <): a tie is not inverted": _swap(
            broken, broken["reward_chosen"] <= broken["reward_rejected"]
        ),
        "the inverted rows dropped instead of repaired: repair them, every pair is data": broken[~inverted],
    }
    _check_table(fixed, want, name="fixed", mistakes=mistakes, hint="Swap the inverted rows only.")
    for column in REWARDS:
        if not pd.api.types.is_float_dtype(fixed[column]):
            raise ExerciseError(
                f"fixed[{column!r}] has dtype {fixed[column].dtype}, expected float: assign the texts and the "
                "rewards in two statements, so that no column is turned into objects"
            )
    if not fixed.index.equals(broken.index):
        raise ExerciseError(
            "fixed has the right rows but another index: keep broken's index (no reset_index or sort), so a "
            "row label still names the same pair"
        )
    try:
        assert_no_inverted(fixed)
    except InvertedPairError as err:  # the table comparison above rules this out; kept as the kit's word
        raise ExerciseError(f"fixed still fails the kit's check: {err}") from None
    passed(
        f"{int(inverted.sum())} inverted pair(s) repaired, texts and rewards together; the other rows untouched"
    )


def _swap(broken: pd.DataFrame, rows: pd.Series, columns: list[str] | None = None) -> pd.DataFrame:
    """``broken`` with chosen and rejected exchanged on ``rows`` (only in ``columns`` when given)."""
    out = broken.copy()
    for a, b in (("chosen", "rejected"), tuple(REWARDS)):
        if columns is None or a in columns:
            out.loc[rows, [a, b]] = broken.loc[rows, [b, a]].to_numpy()
    return out
