"""Chapter 07's checks: the solution passes, and each typical mistake is named (tdpo_lab.course.grading.ch07)."""

from __future__ import annotations

import pytest
import torch
from toy import make_tokenizer

from tdpo_lab.core.data import collate_preference_batch
from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch07 import check_align_weights, check_sink_fix, check_two_orders
from tdpo_lab.methods.attnpo_judge import fix_attention_sink

# --- graded exercise 1: the attention-sink fix ---------------------------------------------------------

SINK = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1, 0.3], dtype=torch.float64)  # total 1.3: a slip cannot hide


def sink_fix(w, *, first="mean", rescale="rest"):
    # the notebook's solution, with switches for the slips a student makes
    total = w.sum()
    w1 = {"mean": total / len(w), "others": w[1:].mean(), "zero": torch.zeros((), dtype=w.dtype)}[first]
    scale = {"rest": (total - w1) / w[1:].sum(), "total": total / w[1:].sum(), "none": 1.0}[rescale]
    return torch.cat([w1[None], w[1:] * scale])


def test_sink_fix_solution_passes(capsys):
    check_sink_fix(sink_fix(SINK), SINK)
    assert capsys.readouterr().out.startswith("correct: sink fix of 6 weights")


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"rescale": "none"}, "not rescaled"),
        ({"rescale": "total"}, "whole old total"),
        ({"first": "others"}, r"mean of the other weights"),
        ({"first": "zero"}, "set to 0"),
    ],
)
def test_sink_fix_mistakes_are_named(slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_sink_fix(sink_fix(SINK, **slip), SINK)


def test_sink_fix_at_the_wrong_end_is_named():
    with pytest.raises(ExerciseError, match="last token"):
        check_sink_fix(sink_fix(SINK.flip(0)).flip(0), SINK)


def test_short_response_is_left_alone(capsys):
    short = SINK[:4]
    check_sink_fix(short.clone(), short)
    assert "left alone" in capsys.readouterr().out
    with pytest.raises(ExerciseError):
        check_sink_fix(sink_fix(short), short)


# --- graded exercise 2: two orders, averaged -----------------------------------------------------------

FIRST = torch.tensor([0.09, 0.01, 0.02, 0.015, 0.03, 0.005, 0.02], dtype=torch.float64)
SECOND = torch.tensor([0.05, 0.04, 0.01, 0.06, 0.02, 0.03, 0.09], dtype=torch.float64)


def two_orders(a, b, *, fix=True, normalise=True, orders="both", scale=True, fix_each=False):
    # the notebook's solution, with switches for the slips a student makes
    if normalise:
        a, b = a / a.sum(), b / b.sum()
    if fix_each:
        a, b = fix_attention_sink(a), fix_attention_sink(b)
    avg = {"both": (a + b) / 2, "first": a, "second": b}[orders]
    if fix and not fix_each:
        avg = fix_attention_sink(avg)
    return avg * len(avg) / avg.sum() if scale else avg


@pytest.mark.parametrize("fix_sink", [True, False])
def test_two_orders_solution_passes(fix_sink, capsys):
    check_two_orders(two_orders(FIRST, SECOND, fix=fix_sink), FIRST, SECOND, fix_sink=fix_sink)
    out = capsys.readouterr().out
    assert out.startswith("correct: two orders of 7 scores") and "note:" not in out


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"normalise": False}, "raw scores averaged"),
        ({"orders": "first"}, "only the first order"),
        ({"orders": "second"}, "only the second order"),
        ({"scale": False}, "sum to 1"),
        ({"fix_each": True}, "each order before averaging"),
        ({"fix": False}, "sink fix left out"),
    ],
)
def test_two_orders_mistakes_are_named(slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_two_orders(two_orders(FIRST, SECOND, **slip), FIRST, SECOND, fix_sink=True)


def test_two_orders_says_when_flat_scores_cannot_tell_mistakes_apart(capsys):
    flat = torch.full((7,), 0.01, dtype=torch.float64)
    check_two_orders(two_orders(flat, flat), flat, flat, fix_sink=True)
    assert "note: on these scores" in capsys.readouterr().out


# --- graded exercise 3: onto the label grid ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def batch_and_weights(tokenizer, chosen, rejected):
    prompts = ["this movie", "the plot"]
    big = collate_preference_batch(tokenizer, prompts, chosen, rejected)
    g = torch.Generator().manual_seed(0)

    def weights(text):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return 0.5 + torch.rand(n, generator=g)

    return big, [weights(t) for t in chosen], [weights(t) for t in rejected]


def align(big, chosen_w, rejected_w, *, offset=1, eos=1.0, start=0.0, swap=False):
    # the notebook's solution (offset 1: label position p + j - 1), with switches for the slips
    B = len(chosen_w)
    if swap:
        chosen_w, rejected_w = rejected_w, chosen_w
    W = torch.full((2 * B, big["input_ids"].shape[1] + 1), start)
    for i in range(2 * B):
        p, r = int(big["prompt_lengths"][i]), int(big["response_lengths"][i])
        w = chosen_w[i] if i < B else rejected_w[i - B]
        W[i, p - offset + 1 : p + r - offset] = w
        W[i, p + r - offset] = eos
    return W[:, 1 : big["input_ids"].shape[1]]


CHOSEN = [" was great and the acting was excellent", " made no sense"]
REJECTED = [" was boring", " was nice but the music was slow from the start"]


def test_align_solution_passes(tokenizer, capsys):
    big, cw, rw = batch_and_weights(tokenizer, CHOSEN, REJECTED)
    check_align_weights(align(big, cw, rw), big, cw, rw)
    assert capsys.readouterr().out.startswith("correct: weights of 2 pairs placed on the label grid")


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"offset": 0}, "input grid"),
        ({"offset": 2}, "one position too far"),
        ({"eos": 0.0}, "EOS left at weight 0"),
        ({"start": 1.0}, "starts from ones"),
    ],
)
def test_align_mistakes_are_named(tokenizer, slip, message):
    big, cw, rw = batch_and_weights(tokenizer, CHOSEN, REJECTED)
    with pytest.raises(ExerciseError, match=message):
        check_align_weights(align(big, cw, rw, **slip), big, cw, rw)


def test_align_swapped_sides_are_named(tokenizer):
    same = [" the plot", " the music"]  # equal token counts, so the swap can be placed at all
    big, cw, rw = batch_and_weights(tokenizer, same, same[::-1])
    with pytest.raises(ExerciseError, match="chosen and rejected swapped"):
        check_align_weights(align(big, cw, rw, swap=True), big, cw, rw)


def test_align_wrong_shape_says_both_shapes(tokenizer):
    big, cw, rw = batch_and_weights(tokenizer, CHOSEN, REJECTED)
    wrong = align(big, cw, rw)[:, :-1]
    with pytest.raises(ExerciseError, match="has shape"):
        check_align_weights(wrong, big, cw, rw)
