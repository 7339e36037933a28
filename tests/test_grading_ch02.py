"""The checks of chapter 02's graded exercises: the right answer passes, each typical mistake is named.

The samples table below has what the real one can have: a tie, an empty continuation and a whitespace-only
one. Every wrong answer is written the way a student would write it (not taken from the checker's own table
of mistakes), so a checker that stops recognising a mistake fails here.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch02 import check_gap_stats, check_rank_pairs, check_repaired
from tdpo_lab.products.pairs import PAIR_COLUMNS, rank_pairs

TEXTS = [
    [" a fine film", " dull", " great fun", " so bad"],
    [" loved it", "", " meh", " loved it too"],  # an empty continuation
    [" ok", " ok then", "  ", " awful"],  # a whitespace-only continuation
]
REWARDS = np.array([[0.9, 0.2, 0.95, 0.05], [0.8, 0.6, 0.4, 0.8], [0.5, 0.55, 0.3, 0.1]])  # a tie in prompt 1


@pytest.fixture
def samples():
    return pd.DataFrame(
        [
            (pid, f"prompt {pid}", text, REWARDS[pid, k])
            for pid, group in enumerate(TEXTS)
            for k, text in enumerate(group)
        ],
        columns=["prompt_id", "prompt", "text", "reward"],
    )


# ---------------------------------------------------------------- exercise 1: ranking


def ranking(samples, min_gap=0.0, *, pairs=itertools.combinations, strip=True, ties=False, swap=False):
    """The chapter's ranking as a student writes it, with one knob per typical slip."""
    rows = []
    for pid, group in samples.groupby("prompt_id", sort=True):
        for a, b in pairs(group.to_dict("records"), 2):
            gap = a["reward"] - b["reward"]
            empty = (
                (not a["text"].strip() or not b["text"].strip())
                if strip
                else (not a["text"] or not b["text"])
            )
            if empty or (gap == 0 and not ties) or abs(gap) < min_gap:
                continue
            win, lose = (a, b) if (gap > 0) != swap else (b, a)
            rows.append((pid, win["prompt"], win["text"], lose["text"], win["reward"], lose["reward"]))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def test_ranking_right(samples, capsys):
    check_rank_pairs(ranking(samples), samples)
    assert (
        capsys.readouterr().out
        == "correct: 11 ranked pairs from 3 prompts, ties and empty continuations dropped\n"
    )
    check_rank_pairs(ranking(samples, 0.3), samples, min_gap=0.3)
    shifted = samples.assign(prompt_id=samples["prompt_id"] + 10)  # ids need not start at 0
    check_rank_pairs(ranking(shifted), shifted)


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        (dict(ties=True), "ties kept"),
        (dict(strip=False), r"whitespace-only continuation counted as non-empty"),
        (dict(swap=True), "chosen and rejected swapped"),
        (dict(pairs=itertools.permutations), r"itertools\.permutations"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_ranking_mistakes_are_named(samples, slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_rank_pairs(ranking(samples, **slip), samples)


def test_ranking_more_mistakes_are_named(samples):
    no_empty_check = []
    for pid, group in samples.groupby("prompt_id", sort=True):
        for a, b in itertools.combinations(group.to_dict("records"), 2):
            if a["reward"] != b["reward"]:
                win, lose = (a, b) if a["reward"] > b["reward"] else (b, a)
                no_empty_check.append(
                    (pid, win["prompt"], win["text"], lose["text"], win["reward"], lose["reward"])
                )
    with pytest.raises(ExerciseError, match="empty continuation kept"):
        check_rank_pairs(pd.DataFrame(no_empty_check, columns=PAIR_COLUMNS), samples)

    with pytest.raises(ExerciseError, match="min_reward_gap ignored"):
        check_rank_pairs(ranking(samples), samples, min_gap=0.3)

    everything = []  # no groupby: pairs across prompts
    for a, b in itertools.combinations(samples.to_dict("records"), 2):
        gap = a["reward"] - b["reward"]
        if a["text"].strip() and b["text"].strip() and gap != 0:
            win, lose = (a, b) if gap > 0 else (b, a)
            everything.append(
                (win["prompt_id"], win["prompt"], win["text"], lose["text"], win["reward"], lose["reward"])
            )
    with pytest.raises(ExerciseError, match="samples of different prompts paired"):
        check_rank_pairs(pd.DataFrame(everything, columns=PAIR_COLUMNS), samples)

    right = ranking(samples)
    with pytest.raises(ExerciseError, match="right rows in another order"):
        check_rank_pairs(right.sort_values("reward_chosen", ignore_index=True), samples)
    with pytest.raises(ExerciseError, match=r"has columns \['prompt', 'prompt_id'"):
        check_rank_pairs(right[["prompt", "prompt_id", *PAIR_COLUMNS[2:]]], samples)
    with pytest.raises(ExerciseError, match="must be a pandas DataFrame"):
        check_rank_pairs(right.to_numpy(), samples)
    wrong_reward = right.copy()
    wrong_reward.loc[3, "reward_rejected"] += 0.01
    with pytest.raises(ExerciseError, match="at row 3 "):
        check_rank_pairs(wrong_reward, samples)


# ---------------------------------------------------------------- exercise 2: gap statistics


@pytest.fixture
def pairs():
    rewards = np.array(
        [[0.9, 0.6, 0.85, 0.1], [0.7, 0.69, 0.3, 0.2], [0.5, 0.45, 0.45, 0.35]]
    )  # a tie: 5 pairs
    texts = [[f"s{p}{k}" for k in range(4)] for p in range(3)]
    return rank_pairs([f"p{i}" for i in range(3)], texts, rewards)


def test_gap_stats_right(pairs, capsys):
    gaps = (pairs["reward_chosen"] - pairs["reward_rejected"]).to_numpy()
    check_gap_stats(gaps, gaps.mean(), (gaps > 0.1).mean(), pairs)
    assert capsys.readouterr().out.startswith(f"correct: {len(pairs)} gaps")
    series = pairs["reward_chosen"] - pairs["reward_rejected"]
    check_gap_stats(series, series.mean(), float((series > 0.1).mean()), pairs)  # pandas values are fine


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ("sign", "rejected minus chosen"),
        ("per_prompt", "mean of each prompt's mean gap"),
        ("median", "median gap"),
        ("sum", "sum of the gaps"),
        ("percent", "a percentage"),
        ("count", "number of pairs above 0.1"),
        ("complement", "at or below 0.1"),
        ("list", r"gap_mean has shape \(17,\)"),
    ],
)
def test_gap_stats_mistakes_are_named(pairs, wrong, message):
    gaps = (pairs["reward_chosen"] - pairs["reward_rejected"]).to_numpy()
    answer = {"gaps": gaps, "gap_mean": gaps.mean(), "share_above": (gaps > 0.1).mean()}
    answer.update(
        {
            "sign": {"gaps": pairs["reward_rejected"].to_numpy() - pairs["reward_chosen"].to_numpy()},
            "per_prompt": {"gap_mean": pairs.assign(g=gaps).groupby("prompt_id")["g"].mean().mean()},
            "median": {"gap_mean": np.median(gaps)},
            "sum": {"gap_mean": gaps.sum()},
            "percent": {"share_above": 100 * (gaps > 0.1).mean()},
            "count": {"share_above": (gaps > 0.1).sum()},
            "complement": {"share_above": (gaps <= 0.1).mean()},
            "list": {"gap_mean": gaps},
        }[wrong]
    )
    with pytest.raises(ExerciseError, match=message):
        check_gap_stats(answer["gaps"], answer["gap_mean"], answer["share_above"], pairs)


def test_gap_at_exactly_the_threshold(pairs):
    at = pairs.copy()
    at.loc[0, ["reward_chosen", "reward_rejected"]] = [0.1, 0.0]  # a gap of exactly 0.1: not above it
    gaps = (at["reward_chosen"] - at["reward_rejected"]).to_numpy()
    with pytest.raises(ExerciseError, match=r"gap >= 0\.1 instead of gap > 0\.1"):
        check_gap_stats(gaps, gaps.mean(), (gaps >= 0.1).mean(), at)


# ---------------------------------------------------------------- exercise 3: repairing inverted pairs


@pytest.fixture
def broken(pairs):
    table = pairs.copy()
    table.loc[len(table)] = [2, "p2", "same", "same too", 0.4, 0.4]  # a tie: not inverted
    for row in (1, 4):  # two pairs backwards, texts and rewards together
        table.loc[row, ["chosen", "rejected"]] = pairs.loc[row, ["rejected", "chosen"]].to_numpy()
        table.loc[row, ["reward_chosen", "reward_rejected"]] = pairs.loc[
            row, ["reward_rejected", "reward_chosen"]
        ].to_numpy()
    return table


def repair(broken, *, rows=lambda b: b["reward_chosen"] < b["reward_rejected"], texts=True, rewards=True):
    """The repair as a student writes it, with one knob per typical slip."""
    fixed = broken.copy()
    bad = rows(broken)
    if texts:
        fixed.loc[bad, ["chosen", "rejected"]] = broken.loc[bad, ["rejected", "chosen"]].to_numpy()
    if rewards:
        fixed.loc[bad, ["reward_chosen", "reward_rejected"]] = broken.loc[
            bad, ["reward_rejected", "reward_chosen"]
        ].to_numpy()
    return fixed


def test_repair_right(broken, pairs, capsys):
    fixed = repair(broken)
    check_repaired(fixed, broken)
    assert capsys.readouterr().out.startswith("correct: 2 inverted pair(s) repaired")
    pd.testing.assert_frame_equal(fixed.iloc[: len(pairs)], pairs)


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        (dict(texts=False), "only the rewards swapped back: the table passes assert_no_inverted"),
        (dict(rewards=False), "only the texts swapped back"),
        (dict(rows=lambda b: b["reward_chosen"] == b["reward_chosen"]), "every row swapped"),
        (
            dict(rows=lambda b: b["reward_chosen"] <= b["reward_rejected"]),
            r"ties swapped too \(<= instead of <\)",
        ),
        (dict(rows=lambda b: b["reward_chosen"] > b["reward_rejected"]), "not right at row 0 "),
    ],
    ids=lambda v: str(v)[:20],
)
def test_repair_mistakes_are_named(broken, slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_repaired(repair(broken, **slip), broken)


def test_repair_in_place_dropped_reordered_and_object_columns(broken):
    in_place = broken
    bad = in_place["reward_chosen"] < in_place["reward_rejected"]
    with pytest.raises(ExerciseError, match="modified in place"):
        check_repaired(in_place, broken)
    with pytest.raises(ExerciseError, match="no inverted pair left"):  # after an in-place repair
        check_repaired(repair(broken), repair(broken))
    with pytest.raises(ExerciseError, match="inverted rows dropped"):
        check_repaired(broken[~bad], broken)
    with pytest.raises(ExerciseError, match="another index"):
        check_repaired(repair(broken).reset_index(drop=True).set_axis(broken.index + 100), broken)
    as_objects = repair(broken).astype({"reward_chosen": object})
    with pytest.raises(ExerciseError, match="dtype object, expected float"):
        check_repaired(as_objects, broken)
