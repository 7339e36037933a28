"""The checks of chapter 05's graded exercises pass the right answer and name each typical mistake."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tdpo_lab.core.logprobs import token_stats
from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch05 import (
    check_kl_per_position,
    check_tdpo1_loss,
    check_tdpo2_loss,
    check_token_reward,
)

B, T, V = 3, 8, 11  # pairs, sequence length, vocabulary
BETA, ALPHA = 0.1, 0.5


@pytest.fixture
def batch():
    """A chapter-05-like batch on random logits: ragged prompts and padding, the policy near the reference."""
    gen = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)
    pol_logits = (
        ref_logits + 2.0 * torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)
    ).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :2] = -100  # the prompt
    labels[1, 2] = -100  # a longer prompt
    labels[0, 6:] = -100  # padding
    labels[4, 5:] = -100
    return pol_logits, ref_logits, labels, token_stats(pol_logits, ref_logits, labels)


# --- graded exercise 1: the per-position KL ------------------------------------------------------------------
def kl_solution(
    pol, ref, labels, *, reverse=False, flip=False, no_mask=False, mask_unshifted=False, shift=0, bits=False
):
    end = pol.shape[1] - 1 + shift
    lp_ref = F.log_softmax(ref[:, shift:end], -1)
    lp_pol = F.log_softmax(pol[:, shift:end], -1)
    first, second = (lp_pol, lp_ref) if reverse else (lp_ref, lp_pol)
    kl = (first.exp() * (first - second)).sum(-1) * (-1 if flip else 1) / (math.log(2) if bits else 1)
    if no_mask:
        return kl
    on_response = (labels[:, :-1] if mask_unshifted else labels[:, 1:]) != -100
    return torch.where(on_response, kl, 0.0)


def test_kl_passes_the_solution(batch, capsys):
    pol, ref, labels, _ = batch
    check_kl_per_position(kl_solution(pol, ref, labels), pol, ref, labels)
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"reverse": True}, r"the direction is reversed, KL\(pi_theta \|\| pi_ref\)"),
        ({"flip": True}, "the sign is flipped"),
        ({"no_mask": True}, "the mask is missing"),
        ({"mask_unshifted": True}, "the mask is not shifted"),
        ({"shift": 1}, "the logits are shifted the wrong way"),
        ({"bits": True}, "log base 2"),
    ],
)
def test_kl_names_the_mistake(batch, mistake, message):
    pol, ref, labels, _ = batch
    with pytest.raises(ExerciseError, match=message):
        check_kl_per_position(kl_solution(pol, ref, labels, **mistake), pol, ref, labels)


def test_kl_without_gradient_or_summed_is_named(batch):
    pol, ref, labels, _ = batch
    with pytest.raises(ExerciseError, match="carries no gradient"):
        check_kl_per_position(kl_solution(pol.detach(), ref, labels), pol, ref, labels)
    with pytest.raises(ExerciseError, match=r"shape \(6,\), expected \(6, 7\)"):  # SeqKL, not per position
        check_kl_per_position(kl_solution(pol, ref, labels).sum(-1), pol, ref, labels)


# --- graded exercises 2 and 3: TDPO1 and TDPO2 ----------------------------------------------------------------
def pair_terms(stats, *, mean_kl=False):
    ratio = (stats.logps - stats.ref_logps).sum(-1)
    seqkl = stats.kl.sum(-1) / (stats.mask.sum(-1) if mean_kl else 1)
    return ratio[:B] - ratio[B:], seqkl[:B], seqkl[B:]


def tdpo1_solution(
    stats, beta, *, sign=1, no_kl=False, beta_on_margin=False, no_minus=False, mean_kl=False, detach=""
):
    u, k_w, k_l = pair_terms(stats, mean_kl=mean_kl)
    k_w = k_w.detach() if "w" in detach else k_w
    k_l = k_l.detach() if "l" in detach else k_l
    gap = 0 * k_l if no_kl else sign * (k_l - k_w)
    logit = beta * u - gap if beta_on_margin else beta * (u - gap)
    return F.logsigmoid(logit) if no_minus else -F.logsigmoid(logit)


def test_tdpo1_passes_the_solution(batch, capsys):
    pol, _, _, stats = batch
    check_tdpo1_loss(tdpo1_solution(stats, BETA), stats, beta=BETA, wrt=pol)
    assert "in value and gradient" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"sign": -1}, "the KL gap has the wrong sign"),
        ({"no_kl": True}, "the KL term is missing"),
        ({"beta_on_margin": True}, "beta scales the margin only"),
        ({"no_minus": True}, "minus sign in front of log sigma"),
        ({"mean_kl": True}, "averaged over each response"),
        ({"detach": "w"}, r"the gradient of tdpo1_mine .* a \.detach\(\) on the chosen SeqKL K_w"),
        ({"detach": "l"}, r"a \.detach\(\) on the rejected SeqKL K_l"),
        ({"detach": "wl"}, "the whole KL term is detached"),
    ],
)
def test_tdpo1_names_the_mistake(batch, mistake, message):
    pol, _, _, stats = batch
    with pytest.raises(ExerciseError, match=message):
        check_tdpo1_loss(tdpo1_solution(stats, BETA, **mistake), stats, beta=BETA, wrt=pol)


def tdpo2_solution(stats, beta, alpha, *, detach="w", **mistake):
    u, k_w, k_l = pair_terms(stats, mean_kl=mistake.get("mean_kl", False))
    k_w = k_w.detach() if "w" in detach else k_w
    k_l = k_l.detach() if "l" in detach else k_l
    u = u.detach() if "u" in detach else u
    if mistake.get("no_alpha"):
        alpha = 1.0
    gap = alpha * mistake.get("sign", 1) * (k_l - k_w)
    if mistake.get("no_kl"):
        logit = beta * u
    elif mistake.get("alpha_on_logit"):
        logit = beta * alpha * (u - (k_l - k_w))
    elif mistake.get("beta_on_margin"):
        logit = beta * u - gap
    else:
        logit = beta * (u - gap)
    return F.logsigmoid(logit) if mistake.get("no_minus") else -F.logsigmoid(logit)


def test_tdpo2_passes_the_solution(batch, capsys):
    pol, _, _, stats = batch
    check_tdpo2_loss(tdpo2_solution(stats, BETA, ALPHA), stats, beta=BETA, alpha=ALPHA, wrt=pol)
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"no_alpha": True}, "alpha is missing"),
        ({"sign": -1}, "the KL gap has the wrong sign"),
        ({"no_kl": True}, "the KL term is missing"),
        ({"alpha_on_logit": True}, "alpha multiplies the whole logit"),
        ({"beta_on_margin": True}, "beta scales the margin only"),
        ({"no_minus": True}, "minus sign in front of log sigma"),
        ({"mean_kl": True}, "averaged over each response"),
        # the stop-gradient: same values, different gradients
        (
            {"detach": ""},
            r"the gradient of tdpo2_mine .* the \.detach\(\) on the chosen SeqKL K_w is missing",
        ),
        ({"detach": "l"}, r"the \.detach\(\) is on the rejected SeqKL K_l instead"),
        ({"detach": "wl"}, "both SeqKLs are detached"),
        ({"detach": "wu"}, "the margin u' is detached"),
    ],
)
def test_tdpo2_names_the_mistake(batch, mistake, message):
    pol, _, _, stats = batch
    with pytest.raises(ExerciseError, match=message):
        check_tdpo2_loss(
            tdpo2_solution(stats, BETA, ALPHA, **mistake), stats, beta=BETA, alpha=ALPHA, wrt=pol
        )


def test_tdpo2_missing_detach_changes_no_value(batch):
    """Why the check needs the gradient: with and without the stop-gradient the losses are equal."""
    _, _, _, stats = batch
    torch.testing.assert_close(
        tdpo2_solution(stats, BETA, ALPHA, detach=""), tdpo2_solution(stats, BETA, ALPHA)
    )


# --- graded exercise 4: the token-level reward ---------------------------------------------------------------
def reward_solution(stats, beta, *, kl_sign=1, kl_scale=1.0, no_kl=False, beta_on_ratio=False, no_beta=False):
    ratio = (stats.logps - stats.ref_logps).sum(-1)
    seqkl = 0 * ratio if no_kl else kl_sign * kl_scale * stats.kl.sum(-1)
    if no_beta:
        return ratio + seqkl
    return beta * ratio + seqkl if beta_on_ratio else beta * (ratio + seqkl)


def test_token_reward_passes_the_solution(batch, capsys):
    _, _, _, stats = batch
    check_token_reward(reward_solution(stats, BETA).detach(), stats, beta=BETA, alpha=ALPHA)
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ({"kl_sign": -1}, "the SeqKL is subtracted"),
        ({"no_kl": True}, "DPO's implicit reward"),
        ({"beta_on_ratio": True}, "beta scales the log-ratios only"),
        ({"no_beta": True}, "beta is missing"),
        ({"kl_scale": ALPHA}, "alpha weighs the SeqKL"),
    ],
)
def test_token_reward_names_the_mistake(batch, mistake, message):
    _, _, _, stats = batch
    with pytest.raises(ExerciseError, match=message):
        check_token_reward(reward_solution(stats, BETA, **mistake), stats, beta=BETA, alpha=ALPHA)


def test_token_reward_per_pair_is_a_shape_error(batch):
    _, _, _, stats = batch
    r = reward_solution(stats, BETA)
    with pytest.raises(ExerciseError, match=r"shape \(3,\), expected \(6,\)"):
        check_token_reward(r[:B] - r[B:], stats, beta=BETA)
