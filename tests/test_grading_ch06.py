"""Chapter 06's checks: the solution passes, and each typical mistake is named (tdpo_lab.course.grading.ch06)."""

from __future__ import annotations

import pytest
import torch
from toy import make_model, make_tokenizer

from tdpo_lab.core.logprobs import TokenStats
from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch06 import (
    check_gaussian_prior,
    check_hybrid_weights,
    check_saliency,
    check_triplet_loss,
)
from tdpo_lab.methods.tidpo_importance import gaussian_prior

# --- graded exercise 1: gradient attribution -----------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_ids():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    ids = tokenizer("the plot made no sense but the music was nice", add_special_tokens=False)["input_ids"]
    return model, torch.tensor([ids])


def saliency(model, input_ids, *, position=-1, target="max", reduce="l1", backward=False):
    # the notebook's solution, with switches for the slips a student makes
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    row = logits[0, position]
    s = {"max": row.max(), "sum": row.sum(), "logsoftmax": torch.log_softmax(row, -1).max()}[target]
    if backward:
        s.backward()
        grad = embeds.grad
    else:
        (grad,) = torch.autograd.grad(s, embeds)
    return {
        "l1": grad.abs().sum(-1),
        "l2": grad.norm(dim=-1),
        "signed": grad.sum(-1),
        "mean": grad.abs().mean(-1),
    }[reduce]


def test_saliency_solution_passes(model_and_ids, capsys):
    model, ids = model_and_ids
    check_saliency(saliency(model, ids), model, ids)
    assert capsys.readouterr().out.startswith("correct: gradient attribution")


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"reduce": "l2"}, "L2 norm"),
        ({"reduce": "signed"}, "signed sum"),
        ({"reduce": "mean"}, "mean over the hidden size"),
        ({"position": 0}, "first position"),
        ({"target": "sum"}, "sum of all last-position logits"),
        ({"target": "logsoftmax"}, "log-probability"),
    ],
)
def test_saliency_mistakes_are_named(model_and_ids, slip, message):
    model, ids = model_and_ids
    with pytest.raises(ExerciseError, match=message):
        check_saliency(saliency(model, ids, **slip), model, ids)


def test_saliency_backward_leaves_grads_and_is_named(model_and_ids):
    model, ids = model_and_ids
    try:
        with pytest.raises(ExerciseError, match=r"parameters now hold a \.grad"):
            check_saliency(saliency(model, ids, backward=True), model, ids)
    finally:
        model.zero_grad(set_to_none=True)


def test_saliency_wrong_shape_says_both_shapes(model_and_ids):
    model, ids = model_and_ids
    with pytest.raises(ExerciseError, match=r"shape \(1, \d+, 32\).*hidden size"):
        check_saliency(torch.zeros(1, ids.shape[1], 32), model, ids)


# --- graded exercise 2: the Gaussian prior -------------------------------------------------------------


def prior(n, sigma_div, *, mu=None, start=0, sigma=None, half=0.5, normalise=True):
    t = torch.arange(start, start + n, dtype=torch.float64)
    mu = (n - 1) / 2 if mu is None else mu
    sigma = n / sigma_div if sigma is None else sigma
    p = torch.exp(-half * ((t - mu) / sigma) ** 2)
    return p / p.sum() if normalise else p


@pytest.mark.parametrize(("n", "sigma_div"), [(12, 4.0), (12, 8.0), (7, 4.0)])
def test_prior_solution_passes(n, sigma_div):
    check_gaussian_prior(prior(n, sigma_div), n, sigma_div)
    check_gaussian_prior(prior(n, sigma_div).float(), n, sigma_div)  # float32 is fine


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"normalise": False}, "unnormalised"),
        ({"mu": 6.0}, r"centre at n/2"),
        ({"start": 1}, "counted from 1"),
        ({"sigma": 4.0 / 12}, "upside down"),
        ({"sigma": 12 * 4.0}, r"n \* sigma_div"),
        ({"half": 1.0}, "1/2 in the exponent"),
    ],
)
def test_prior_mistakes_are_named(slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_gaussian_prior(prior(12, 4.0, **slip), 12, 4.0)


def test_prior_scaled_to_mean_one_is_named():
    with pytest.raises(ExerciseError, match="mean 1"):
        check_gaussian_prior(12 * prior(12, 4.0), 12, 4.0)


# --- graded exercise 3: the mix, mean 1 ----------------------------------------------------------------


SAL = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.3, 0.05, 2.5], dtype=torch.float64)


def mix(sal, lam, sigma_div, *, swap=False, raw=False, by_max=False, scale=True):
    n = len(sal)
    p = gaussian_prior(n, sigma_div)
    i = sal if raw else sal / (sal.max() if by_max else sal.sum())
    a, b = (1 - lam, lam) if swap else (lam, 1 - lam)
    mixed = a * i + b * p
    return n * mixed / mixed.sum() if scale else mixed / mixed.sum()


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.7, 1.0])
def test_mix_solution_passes(lam):
    check_hybrid_weights(mix(SAL, lam, 4.0), SAL, lam=lam, sigma_div=4.0)


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"scale": False}, "sum to 1"),
        ({"swap": True}, "swapped"),
        ({"raw": True}, "raw attribution"),
        ({"by_max": True}, "largest value"),
    ],
)
def test_mix_mistakes_are_named(slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_hybrid_weights(mix(SAL, 0.7, 4.0, **slip), SAL, lam=0.7, sigma_div=4.0)


def test_mix_without_prior_is_named():
    wrong = 0.7 * SAL / SAL.sum()
    with pytest.raises(ExerciseError, match="prior left out"):
        check_hybrid_weights(len(SAL) * wrong / wrong.sum(), SAL, lam=0.7, sigma_div=4.0)


# --- graded exercise 4: the triplet loss ---------------------------------------------------------------


def stats_of(rows, lengths, width, seed):
    # TokenStats with each row's response at positions 2..2+len (a prompt of 2 in front), log-ratios random
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for r, n in enumerate(lengths):
        mask[r, 2 : 2 + n] = True
    logps = torch.where(mask, -1.0 + torch.randn(rows, width, generator=g, dtype=torch.float64), 0.0)
    ref = torch.where(mask, -1.0 + 0.3 * torch.randn(rows, width, generator=g, dtype=torch.float64), 0.0)
    return TokenStats(logps.requires_grad_(True), ref, torch.zeros_like(ref), mask)


@pytest.fixture
def triplet_inputs():
    # B = 4 pairs; pair 2's anchor came back empty (skipped); lengths differ within every triple
    stats = stats_of(8, [5, 3, 4, 6, 4, 6, 2, 3], 9, seed=0)
    anchor = stats_of(3, [4, 2, 7], 10, seed=1)
    return anchor, stats, [0, 1, 3], 4


def triplet(anchor, stats, keep, B, margin, *, hinge=True, swap=False, total=False, sqrt=False, detach=False):
    # the notebook's loop, with switches for the slips a student makes
    def features(st, row):
        return (st.logps[row] - st.ref_logps[row])[st.mask[row]]

    per_pair = []
    for k, i in enumerate(keep):
        d, b, c = features(anchor, k), features(stats, i), features(stats, B + i)
        d = d.detach() if detach else d
        b, c = (c, b) if swap else (b, c)
        lb, lc = min(len(d), len(b)), min(len(d), len(c))
        d_pos, d_neg = ((d[:lb] - b[:lb]) ** 2).sum(), ((d[:lc] - c[:lc]) ** 2).sum()
        if sqrt:
            d_pos, d_neg = d_pos.sqrt(), d_neg.sqrt()
        z = d_pos - d_neg + margin
        per_pair.append(torch.clamp(z, min=0.0) if hinge else z)
    out = torch.stack(per_pair)
    return out.sum() if total else out.mean()


def test_triplet_inputs_exercise_both_sides_of_the_hinge(triplet_inputs):
    anchor, stats, keep, B = triplet_inputs
    z = [triplet(anchor, stats, [i], B, 0.5, hinge=False).item() for i in keep]
    assert min(z) < 0 < max(z)  # else "no hinge" could not be told apart


def test_triplet_solution_passes(triplet_inputs, capsys):
    anchor, stats, keep, B = triplet_inputs
    check_triplet_loss(triplet(anchor, stats, keep, B, 0.5), anchor, stats, keep, margin=0.5)
    assert "correct: triplet loss on 3 pairs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        ({"hinge": False}, "hinge left out"),
        ({"swap": True}, "chosen and rejected swapped"),
        ({"total": True}, "sum over pairs"),
        ({"sqrt": True}, "Euclidean"),
    ],
)
def test_triplet_mistakes_are_named(triplet_inputs, slip, message):
    anchor, stats, keep, B = triplet_inputs
    with pytest.raises(ExerciseError, match=message):
        check_triplet_loss(triplet(anchor, stats, keep, B, 0.5, **slip), anchor, stats, keep, margin=0.5)


def test_triplet_without_margin_is_named(triplet_inputs):
    anchor, stats, keep, B = triplet_inputs
    with pytest.raises(ExerciseError, match="margin left out"):
        check_triplet_loss(triplet(anchor, stats, keep, B, 0.0), anchor, stats, keep, margin=0.5)


def test_triplet_averaged_over_skipped_pairs_is_named(triplet_inputs):
    anchor, stats, keep, B = triplet_inputs
    wrong = triplet(anchor, stats, keep, B, 0.5, total=True) / B
    with pytest.raises(ExerciseError, match="all B pairs"):
        check_triplet_loss(wrong, anchor, stats, keep, margin=0.5)


def test_triplet_padded_positions_are_named(triplet_inputs):
    anchor, stats, keep, B = triplet_inputs
    zero = torch.zeros((), dtype=torch.float64)

    def padded(a, b):  # both sequences padded with zeros to the longer one
        n = max(len(a), len(b))
        return (
            (torch.cat([a, zero.repeat(n - len(a))]) - torch.cat([b, zero.repeat(n - len(b))])) ** 2
        ).sum()

    per_pair = []
    for k, i in enumerate(keep):
        d = (anchor.logps[k] - anchor.ref_logps[k])[anchor.mask[k]]
        b = (stats.logps[i] - stats.ref_logps[i])[stats.mask[i]]
        c = (stats.logps[B + i] - stats.ref_logps[B + i])[stats.mask[B + i]]
        per_pair.append(torch.clamp(padded(d, b) - padded(d, c) + 0.5, min=0.0))
    with pytest.raises(ExerciseError, match="past the shorter sequence"):
        check_triplet_loss(torch.stack(per_pair).mean(), anchor, stats, keep, margin=0.5)


def test_triplet_detached_anchor_is_named_by_its_gradient(triplet_inputs):
    anchor, stats, keep, B = triplet_inputs
    with pytest.raises(ExerciseError, match="anchor's log-ratios detached"):
        check_triplet_loss(triplet(anchor, stats, keep, B, 0.5, detach=True), anchor, stats, keep, margin=0.5)


def test_triplet_without_gradient_is_an_error(triplet_inputs):
    anchor, stats, keep, B = triplet_inputs
    value = triplet(anchor, stats, keep, B, 0.5).item()
    with pytest.raises(ExerciseError, match="carries no gradient"):
        check_triplet_loss(torch.tensor(value, dtype=torch.float64), anchor, stats, keep, margin=0.5)
    with pytest.raises(ExerciseError, match="carries no gradient"):
        check_triplet_loss(value, anchor, stats, keep, margin=0.5)
