"""Checks for the graded exercises of notebooks/06_ti_dpo.ipynb (TI-DPO).

1. :func:`check_saliency`: gradient attribution I_t = || d max_v f_v / d e_t ||_1 (Yang et al., Eqs. 5-6);
2. :func:`check_gaussian_prior`: the Gaussian prior over a span (Eq. 7's prior);
3. :func:`check_hybrid_weights`: lam * I / sum I + (1 - lam) * P, scaled to mean 1 over the span (Eq. 7);
4. :func:`check_triplet_loss`: the triplet loss on left-aligned log-ratio features (Eq. 13).

Each computes the kit's value itself (:mod:`tdpo_lab.methods.tidpo_importance`, :mod:`tdpo_lab.methods.tidpo`)
and lists the values that typical mistakes give, so that a wrong answer is told which mistake it looks like.
"""

from __future__ import annotations

import torch

from tdpo_lab.course.grading import ExerciseError, check_close, check_grad, passed
from tdpo_lab.course.grading.core_pieces import check_weighted_margin  # the exercises that build the core
from tdpo_lab.methods.tidpo import left_align, triplet_loss
from tdpo_lab.methods.tidpo_importance import gaussian_prior, gradient_saliency, hybrid_weights

__all__ = [
    "check_gaussian_prior",
    "check_hybrid_weights",
    "check_saliency",
    "check_triplet_loss",
    "check_weighted_margin",
]


# --- 1 · gradient attribution -------------------------------------------------------------------------


def _embedding_grad(model, input_ids: torch.Tensor, target) -> torch.Tensor:
    """d target(logits) / d embeddings, ``[N, T, d]``: the attribution recipe with another target."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds).logits
            (grad,) = torch.autograd.grad(target(logits), embeds)
    finally:
        model.train(was_training)
    return grad.detach()


def check_saliency(mine, model, input_ids: torch.Tensor) -> None:
    """Graded exercise 1: ``mine`` = I_t for every token of ``input_ids`` ``[1, T]``, as ``[1, T]``."""
    want = gradient_saliency(model, input_ids, torch.ones_like(input_ids))
    last_max = lambda logits: logits[:, -1].max(-1).values.sum()  # noqa: E731
    mistakes = {
        "the L2 norm of the gradient: I_t is its L1 norm, the sum of absolute values over the hidden size": (
            lambda: _embedding_grad(model, input_ids, last_max).norm(dim=-1)
        ),
        "the signed sum of the gradient: take absolute values before summing (.abs().sum(-1))": (
            lambda: _embedding_grad(model, input_ids, last_max).sum(-1)
        ),
        "a mean over the hidden size: the L1 norm sums": (
            lambda: _embedding_grad(model, input_ids, last_max).abs().mean(-1)
        ),
        "the target read at the first position: s is the largest logit at the last position (logits[0, -1])": (
            lambda: _embedding_grad(model, input_ids, lambda lg: lg[:, 0].max(-1).values.sum()).abs().sum(-1)
        ),
        "the sum of all last-position logits as the target: s is the largest one (.max())": (
            lambda: _embedding_grad(model, input_ids, lambda lg: lg[:, -1].sum()).abs().sum(-1)
        ),
        "the largest log-probability (after log_softmax) as the target: s is the raw logit": (
            lambda: (
                _embedding_grad(
                    model, input_ids, lambda lg: torch.log_softmax(lg[:, -1].float(), -1).max(-1).values.sum()
                )
                .abs()
                .sum(-1)
            )
        ),
    }
    check_close(
        mine,
        want,
        name="saliency_mine",
        mistakes=mistakes,
        rtol=1e-4,
        atol=1e-6,
        hint="I_t is one number per token: the L1 norm over the hidden size (dim -1) of d s / d e_t.",
    )
    if any(p.grad is not None for p in model.parameters()):
        raise ExerciseError(
            "saliency_mine is right, but the model's parameters now hold a .grad: .backward() fills every "
            "leaf's .grad; torch.autograd.grad(target, embeds) returns the one gradient needed and touches "
            "nothing else (reset with model.zero_grad(set_to_none=True))"
        )
    passed(f"gradient attribution of {want.shape[1]} tokens (Eqs. 5-6)")


# --- 2 · the Gaussian prior ---------------------------------------------------------------------------


def _bump(n: int, mu: float, sigma: float, *, start: int = 0, half: float = 0.5) -> torch.Tensor:
    t = torch.arange(start, start + n, dtype=torch.float64)
    return torch.exp(-half * ((t - mu) / sigma) ** 2)


def check_gaussian_prior(mine, n: int, sigma_div: float) -> None:
    """Graded exercise 2: ``mine`` = P(t), t = 0..n-1, mu = (n-1)/2, sigma = n / sigma_div, summing to 1."""
    want = gaussian_prior(n, sigma_div)
    mu, sigma = (n - 1) / 2, n / sigma_div

    def normed(p: torch.Tensor) -> torch.Tensor:
        return p / p.sum()

    mistakes = {
        "the prior left unnormalised: divide by its sum so that P sums to 1 over the span": _bump(
            n, mu, sigma
        ),
        "the prior scaled to mean 1 (sum n): P itself sums to 1 (section 4 scales the mix)": n * want,
        "the centre at n/2: positions run 0..n-1, so mu = (n - 1)/2": normed(_bump(n, n / 2, sigma)),
        "positions counted from 1: t runs 0..n-1 (torch.arange(n))": normed(_bump(n, mu, sigma, start=1)),
        "sigma = sigma_div / n upside down: sigma = n / sigma_div": normed(_bump(n, mu, sigma_div / n)),
        "sigma = n * sigma_div: sigma = n / sigma_div": normed(_bump(n, mu, n * sigma_div)),
        "the 1/2 in the exponent left out: exp(-(1/2) ((t - mu) / sigma)^2)": normed(
            _bump(n, mu, sigma, half=1.0)
        ),
    }
    check_close(mine, want, name="P_mine", mistakes=mistakes)
    passed(f"Gaussian prior over a span of {n} tokens, sigma = n/{sigma_div:g}")


# --- 3 · the mix, mean 1 ------------------------------------------------------------------------------


def check_hybrid_weights(mine, saliency_span: torch.Tensor, *, lam: float, sigma_div: float) -> None:
    """Graded exercise 3: ``mine`` = the weights ``[n]`` of one span from its attribution ``[n]``."""
    sal = torch.as_tensor(saliency_span, dtype=torch.float64).detach().cpu().reshape(-1)
    n = sal.numel()
    want = hybrid_weights(sal[None], torch.ones(1, n, dtype=torch.bool), lam=lam, sigma_div=sigma_div)[0]
    prior = gaussian_prior(n, sigma_div)

    def mean_one(w: torch.Tensor) -> torch.Tensor:
        return n * w / w.sum()

    i_norm = sal / sal.sum()
    mixed = lam * i_norm + (1 - lam) * prior
    mistakes = {
        "weights that sum to 1: scale the mix to mean 1 over the span (n * W / sum W)": mixed / mixed.sum(),
        "lam and 1 - lam swapped: lam weighs the attribution, 1 - lam the prior": mean_one(
            (1 - lam) * i_norm + lam * prior
        ),
        "the raw attribution mixed in: normalise it over the span first (I / sum I)": mean_one(
            lam * sal + (1 - lam) * prior
        ),
        "the attribution normalised by its largest value: Eq. 7 divides by its sum": mean_one(
            lam * sal / sal.max() + (1 - lam) * prior
        ),
        "the prior left out: W mixes lam * I_norm with (1 - lam) * P": mean_one(lam * i_norm),
    }
    check_close(
        mine,
        want,
        name="W_mine",
        mistakes=mistakes,
        hint="W_mine holds one weight per span token, [n]; it should average 1.",
    )
    passed(f"hybrid weights on a span of {n} tokens, lam = {lam:g}: mean 1")


# --- 4 · the triplet loss -----------------------------------------------------------------------------


def _features(stats, rows) -> tuple[torch.Tensor, torch.Tensor]:
    return left_align((stats.logps - stats.ref_logps)[rows], stats.mask[rows])


def _pair_distances(a, a_mask, b, b_mask, kind: str) -> torch.Tensor:
    """Per-row distances between left-aligned sequences, the right one (``"sq"``) or a typical slip."""
    length = min(a.shape[1], b.shape[1])
    both = a_mask[:, :length] & b_mask[:, :length]
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    if kind == "padded":  # a missing position read as a log-ratio of 0
        width = max(a.shape[1], b.shape[1])
        pa = torch.nn.functional.pad(torch.where(a_mask, a, zero), (0, width - a.shape[1]))
        pb = torch.nn.functional.pad(torch.where(b_mask, b, zero), (0, width - b.shape[1]))
        return (pa - pb).pow(2).sum(1)
    sq = torch.where(both, a[:, :length] - b[:, :length], zero).pow(2)
    if kind == "mean":
        return sq.sum(1) / both.sum(1).clamp_min(1)
    total = sq.sum(1)
    return total.sqrt() if kind == "sqrt" else total


def check_triplet_loss(mine, anchor_stats, stats, keep, *, margin: float) -> None:
    """Graded exercise 4: ``mine`` = the triplet loss (a scalar carrying gradient) of the pairs ``keep``.

    ``anchor_stats``: :class:`~tdpo_lab.core.logprobs.TokenStats` of the anchors, row k = pair ``keep[k]``;
    ``stats``: of the preference batch, rows ``[:B]`` prompt + chosen, ``[B:]`` prompt + rejected.
    """
    keep = [int(i) for i in keep]
    if not keep:
        raise ExerciseError("no pair has an anchor: there is nothing to check (sample the anchors again)")
    n_pairs = stats.mask.shape[0] // 2
    a, a_mask = _features(anchor_stats, list(range(len(keep))))
    w, w_mask = _features(stats, keep)
    l_, l_mask = _features(stats, [n_pairs + i for i in keep])
    want = triplet_loss(a, a_mask, w, w_mask, l_, l_mask, margin=margin)

    def loss(kind="sq", *, swap=False, hinge=True, m=margin, reduce="mean"):
        d_pos = _pair_distances(a, a_mask, w, w_mask, kind)
        d_neg = _pair_distances(a, a_mask, l_, l_mask, kind)
        z = (d_neg - d_pos if swap else d_pos - d_neg) + m
        z = torch.clamp(z, min=0.0) if hinge else z
        return z.sum() if reduce == "sum" else z.mean()

    mistakes = {
        "the hinge left out: each pair contributes max(0, d_pos - d_neg + m)": lambda: loss(hinge=False),
        "chosen and rejected swapped: the anchor should end up closer to the chosen response": (
            lambda: loss(swap=True)
        ),
        "the margin left out: + m inside the hinge": lambda: loss(m=0.0),
        "a sum over pairs: the loss averages them": lambda: loss(reduce="sum"),
        "an average over all B pairs: pairs whose anchor came back empty are skipped, not counted as 0": (
            lambda: loss(reduce="sum") / n_pairs
        ),
        "Euclidean distances (a square root): Eq. 13 sums squared differences": lambda: loss("sqrt"),
        "a mean over positions: the distance sums (d_t - b_t)^2 over them": lambda: loss("mean"),
        "positions past the shorter sequence counted as log-ratio 0: sum only where both exist": (
            lambda: loss("padded")
        ),
    }
    check_close(mine, want, name="triplet_mine", mistakes=mistakes, rtol=1e-4, atol=1e-6)
    if anchor_stats.logps.requires_grad:  # a float (.item()) is an error here: the loss must train the policy
        check_grad(
            mine,
            want,
            anchor_stats.logps,
            name="triplet_mine (with respect to the anchor's log-probabilities)",
            mistakes={
                "the anchor's log-ratios detached: the sampling has no gradient, but the anchor's log-ratios "
                "do, and they are what moves the policy's own samples": torch.zeros_like(anchor_stats.logps),
            },
        )
    passed(f"triplet loss on {len(keep)} pairs, margin {margin:g} (Eq. 13)")
