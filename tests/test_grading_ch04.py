"""The checks of chapter 04's graded exercises pass the right answer and name each typical mistake."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdpo_lab.core.logprobs import token_stats
from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch04 import (
    check_dpo_loss,
    check_dpo_token_gradient,
    check_ipo_loss,
    check_reward_accuracy,
)

B, T, V = 3, 8, 11  # pairs, sequence length, vocabulary
BETA = 0.1


def make_batch(seed: int = 0):
    """A chapter-04-like batch on random logits: ragged prompts and padding, the policy near the reference."""
    gen = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)
    pol_logits = (
        ref_logits + 2.0 * torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)
    ).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :2] = -100  # the prompt
    labels[1, 2] = -100  # a longer prompt
    labels[0, 6:] = -100  # padding
    labels[4, 5:] = -100
    return token_stats(pol_logits, ref_logits, labels), pol_logits


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def stats(batch):
    return batch[0]


# --- graded exercise 1: the DPO loss -------------------------------------------------------------------------
def dpo_solution(
    stats, beta, *, swap=False, no_minus=False, no_beta=False, no_ref=False, mean=False, pairing="halves"
):
    values = stats.logps if no_ref else stats.logps - stats.ref_logps
    rows = values.sum(-1) / (stats.mask.sum(-1) if mean else 1)
    h = rows[:B] - rows[B:] if pairing == "halves" else rows[0::2] - rows[1::2]
    h = -h if swap else h
    loss = F.logsigmoid((1 if no_beta else beta) * h)
    return loss if no_minus else -loss


def test_dpo_loss_passes_the_solution(batch, capsys):
    stats, logits = batch
    check_dpo_loss(dpo_solution(stats, BETA), stats, BETA, wrt=logits)
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"swap": True}, "wrong way round"),
        ({"no_minus": True}, "minus sign in front of log sigma is missing"),
        ({"no_beta": True}, "beta is missing"),
        ({"no_ref": True}, "log pi_ref is missing"),
        ({"mean": True}, "averaged over each response"),
        ({"pairing": "neighbours"}, "neighbouring rows"),
    ],
)
def test_dpo_loss_names_the_mistake(stats, mistake, message):
    with pytest.raises(ExerciseError, match=message):
        check_dpo_loss(dpo_solution(stats, BETA, **mistake), stats, BETA)


def test_dpo_loss_shape_and_gradient_mistakes(batch):
    stats, logits = batch
    with pytest.raises(ExerciseError, match=r"shape \(\), expected \(3,\)"):
        check_dpo_loss(dpo_solution(stats, BETA).mean(), stats, BETA)  # the mean over pairs: one number
    with pytest.raises(ExerciseError, match="carries no gradient"):
        check_dpo_loss(dpo_solution(stats, BETA).detach(), stats, BETA, wrt=logits)
    with pytest.raises(ExerciseError, match="beta is missing"):  # a plain number, still compared
        check_dpo_loss(dpo_solution(stats, BETA, no_beta=True).tolist(), stats, BETA)


# --- graded exercise 2: the gradient by hand -------------------------------------------------------------------
def gradient_solution(
    stats,
    beta,
    *,
    swap=False,
    no_mask=False,
    plus=False,
    no_beta=False,
    per_b=False,
    per_len=False,
    half=False,
):
    rows = (stats.logps - stats.ref_logps).detach().sum(-1)
    h = rows[:B] - rows[B:]
    w = torch.sigmoid((beta if plus else -beta) * h)
    w = torch.full_like(w, 0.5) if half else w
    scale = 1.0 if no_beta else beta
    per_row = torch.cat([-scale * w, scale * w]) * (-1 if swap else 1)
    g = per_row[:, None] * (torch.ones_like(stats.logps) if no_mask else stats.mask)
    g = g / B if per_b else g
    return g / stats.mask.sum(-1, keepdim=True) if per_len else g


def test_token_gradient_passes_the_solution(stats, capsys):
    check_dpo_token_gradient(gradient_solution(stats, BETA), stats, BETA)
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"swap": True}, "swapped signs"),
        ({"no_mask": True}, "the mask is missing"),
        ({"plus": True}, r"sigma\(\+beta h\) instead of sigma\(-beta h\)"),
        ({"no_beta": True}, "beta is missing"),
        ({"per_b": True}, "mean over pairs"),
        ({"per_len": True}, "divided by the response length"),
        ({"half": True}, "sigma\\(0\\) = 1/2"),
    ],
)
def test_token_gradient_names_the_mistake(stats, mistake, message):
    with pytest.raises(ExerciseError, match=message):
        check_dpo_token_gradient(gradient_solution(stats, BETA, **mistake), stats, BETA)


# --- graded exercise 3: the implicit-reward accuracy ----------------------------------------------------------
def accuracy_solution(
    *, rank=torch.gt, no_ref=False, mean=False, count=False, pairing="halves", fixed_b=None
):
    def reward_accuracy(stats, beta):
        b = fixed_b or stats.logps.shape[0] // 2
        values = stats.logps if no_ref else stats.logps - stats.ref_logps
        reward = beta * values.sum(-1) / (stats.mask.sum(-1) if mean else 1)
        chosen, rejected = (reward[:b], reward[b:]) if pairing == "halves" else (reward[0::2], reward[1::2])
        right = rank(chosen, rejected).float()
        return right.sum() if count else right.mean()

    return reward_accuracy


def test_reward_accuracy_passes_the_solution(stats, capsys):
    check_reward_accuracy(accuracy_solution(), stats, BETA)
    assert capsys.readouterr().out.startswith("correct:")
    # a python float is a number too
    check_reward_accuracy(lambda s, beta: accuracy_solution()(s, beta).item(), stats, BETA)


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"rank": torch.ge}, "ties count as right"),
        ({"rank": torch.lt}, "wrong way round"),
        ({"count": True}, "counts the pairs"),
        ({"no_ref": True}, "log pi_ref is missing"),
        ({"mean": True}, "averaged over each response"),
        ({"pairing": "neighbours"}, "neighbouring rows"),
        ({"fixed_b": B}, "take the number of pairs from stats"),  # the notebook's B, not the batch's
    ],
)
def test_reward_accuracy_names_the_mistake(stats, mistake, message):
    with pytest.raises(ExerciseError, match=message):
        check_reward_accuracy(accuracy_solution(**mistake), stats, BETA)


def test_reward_accuracy_wants_one_number_and_lets_the_stub_through(stats):
    def per_pair(stats, beta):
        reward = (stats.logps - stats.ref_logps).sum(-1)
        return reward[: len(reward) // 2] > reward[len(reward) // 2 :]

    with pytest.raises(ExerciseError, match="must return one number"):
        check_reward_accuracy(per_pair, stats, BETA)

    def stub(stats, beta):
        raise NotImplementedError("write the lines of this exercise")

    with pytest.raises(NotImplementedError):  # the student notebook's stub surfaces as itself
        check_reward_accuracy(stub, stats, BETA)


# --- graded exercise 4: IPO's loss ---------------------------------------------------------------------------
def ipo_solution(
    stats,
    tau,
    *,
    target=None,
    swap=False,
    scaled=False,
    no_square=False,
    absolute=False,
    mean=False,
    no_ref=False,
    dpo=False,
):
    values = stats.logps if no_ref else stats.logps - stats.ref_logps
    rows = values.sum(-1) / (stats.mask.sum(-1) if mean else 1)
    h = rows[:B] - rows[B:]
    h = -h if swap else h
    if dpo:
        return -F.logsigmoid(tau * h)
    gap = (tau * h - 0.5) if scaled else h - (target if target is not None else 1 / (2 * tau))
    if no_square:
        return gap
    return gap.abs() if absolute else gap**2


def test_ipo_loss_passes_the_solution(batch, capsys):
    stats, logits = batch
    check_ipo_loss(ipo_solution(stats, BETA), stats, BETA, wrt=logits)
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"target": 1 / BETA}, "the target is 1/tau"),
        ({"swap": True}, "wrong way round"),
        ({"scaled": True}, "tau multiplies the margin"),
        ({"no_square": True}, "the square is missing"),
        ({"absolute": True}, "absolute value"),
        ({"mean": True}, "length-averaged margin"),
        ({"no_ref": True}, "log pi_ref is missing"),
        ({"dpo": True}, "DPO's loss"),
    ],
)
def test_ipo_loss_names_the_mistake(stats, mistake, message):
    with pytest.raises(ExerciseError, match=message):
        check_ipo_loss(ipo_solution(stats, BETA, **mistake), stats, BETA)


def test_an_unknown_mistake_says_where_the_values_differ(stats):
    with pytest.raises(ExerciseError, match=r"largest difference is .* at index \(\d,\)"):
        check_ipo_loss(
            ipo_solution(stats, BETA) + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), stats, BETA
        )
