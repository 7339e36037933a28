"""The five preference losses (DPO, TDPO1, TDPO2, AttentionPO, TI-DPO) and TI-DPO's triplet loss.

Pure functions of the per-token statistics from :func:`tdpo_lab.logprobs.token_stats`. Rows ``[:N/2]`` of a
batch are prompt+chosen (y_w), rows ``[N/2:]`` prompt+rejected (y_l) (METHODS.md section 1). With
r_t = log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t) and SeqKL = sum over response positions of
KL(pi_ref || pi_theta), every method is ``-log sigmoid(beta * z)`` with (METHODS.md section 3):

    dpo     z = sum_t r_t(y_w) - sum_t r_t(y_l)                                   DPO Eq. 7
    tdpo1   z = u' - (SeqKL(y_l) - SeqKL(y_w))                                    TDPO_1, Eq. 18
    tdpo2   z = u' - alpha (SeqKL(y_l) - sg(SeqKL(y_w)))                          TDPO_2, Eq. 20
    attnpo  z = sum_t w_t r_t(y_w) - sum_t w_t r_t(y_l)                           TwDPO (token-weighted DPO)
    tidpo   z = sum_t W_t r_t(y_w) - sum_t W_t r_t(y_l) - alpha (SeqKL(y_l) - sg(SeqKL(y_w)))

where u' is the DPO margin (the dpo z) and sg = stop-gradient. Papers: DPO arXiv 2305.18290 (Eq. 7);
TDPO arXiv 2404.11999 (the TDPO_1 and TDPO_2 objectives of section 4, Eq. 18 and 20); TI-DPO arXiv
2505.19653 (weighted loss Eq. 12 is the alpha = 0 case; the official code adds TDPO_2's KL term, which the
kit follows; triplet Eq. 13); TwDPO / AttentionPO arXiv 2605.21883.

Derived in notebooks/04_dpo_baseline.ipynb (DPO), 05_tdpo.ipynb (TDPO1/2), 06_ti_dpo.ipynb (TI-DPO and the
triplet loss) and 07_attention_po.ipynb (AttentionPO).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.config import METHODS
from tdpo_lab.logprobs import TokenStats

WEIGHTED = ("attnpo", "tidpo")
KL_METHODS = ("tdpo1", "tdpo2", "tidpo")


class LossOutput(NamedTuple):
    """``loss``: scalar mean over pairs; ``losses``: ``[B]`` per pair; ``metrics``: python floats (TRL names)."""

    loss: Tensor
    losses: Tensor
    metrics: dict[str, float]


def _check_stats(stats: TokenStats) -> tuple[int, int]:
    fields = ("logps", "ref_logps", "kl", "mask")
    if not all(isinstance(getattr(stats, f, None), Tensor) for f in fields):
        raise TypeError(f"stats must be a TokenStats (fields {fields}) from token_stats(), got {type(stats)}")
    shape = tuple(stats.logps.shape)
    if len(shape) != 2:
        raise ValueError(f"stats fields must be [N, T-1], got logps of shape {shape}")
    for f in fields[1:]:
        if tuple(getattr(stats, f).shape) != shape:
            raise ValueError(
                f"stats.{f} has shape {tuple(getattr(stats, f).shape)}, expected {shape} like logps"
            )
    n = shape[0]
    if n == 0 or n % 2:
        raise ValueError(
            f"a preference batch has an even number of rows N = 2B (chosen rows then rejected rows), got N = {n}"
        )
    return n // 2, shape[1]


def _check_scalar(name: str, value: float, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0 (it scales the implicit reward; typical 0.1), got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0 (0 switches the term off), got {value}")


def preference_loss(
    method: str, stats: TokenStats, *, beta: float = 0.1, alpha: float = 0.5, weights: Tensor | None = None
) -> LossOutput:
    """Per-pair preference loss ``-log sigmoid(beta * z)`` for one of the five methods, with metrics.

    ``stats``: :class:`TokenStats`, fields ``[N, T-1]``, N = 2B (rows ``[:B]`` chosen, ``[B:]`` rejected).
    ``weights``: ``[N, T-1]`` token weights aligned with ``stats`` (treated as constants: detached; only the
    masked positions are used), required for ``"attnpo"`` and ``"tidpo"`` and an error for the others.
    ``beta`` > 0 scales the margin; ``alpha`` >= 0 weighs the SeqKL term of ``"tdpo2"`` and ``"tidpo"``
    (``"tdpo1"`` has no alpha, as in the paper).

    The logit z per method (DPO Eq. 7; TDPO_1 Eq. 18, TDPO_2 Eq. 20 of arXiv 2404.11999; TI-DPO arXiv
    2505.19653 as in its official code; TwDPO arXiv 2605.21883), with u' the DPO margin:

        dpo:    u' = sum r_t(y_w) - sum r_t(y_l)
        tdpo1:  u' - (SeqKL_l - SeqKL_w)                 both KL terms carry gradient
        tdpo2:  u' - alpha (SeqKL_l - sg(SeqKL_w))       the chosen side's KL is a baseline, no gradient
        attnpo: sum w r(y_w) - sum w r(y_l)              weights multiply policy and reference alike
        tidpo:  weighted u' - alpha (SeqKL_l - sg(SeqKL_w))   (the triplet term is separate: triplet_loss)

    All-ones weights give exactly dpo (attnpo) and tdpo2 (tidpo); at pi_theta = pi_ref every loss is ln 2.

    Metrics (python floats, means over pairs): ``loss``; ``rewards/chosen|rejected`` = beta * (weighted) sum
    of r_t, the implicit DPO reward (detached), for every method so that runs compare;
    ``rewards/margins`` (chosen - rejected), ``rewards/accuracies`` (fraction chosen > rejected);
    ``logps/chosen|rejected`` (policy sequence log-probs, sum over the response); ``kl_seq/chosen|rejected``
    (SeqKL); and for tdpo1/tdpo2/tidpo ``token_reward/chosen|rejected|accuracies`` with the token-level
    reward R = beta * sum r_t + beta * SeqKL (METHODS.md section 2 step 5; what the TDPO code logs as rewards).

    Derived in notebooks/04_dpo_baseline.ipynb and 05_tdpo.ipynb (weighted forms: 06_ti_dpo.ipynb,
    07_attention_po.ipynb).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    b, width = _check_stats(stats)
    _check_scalar("beta", beta, positive=True)
    _check_scalar("alpha", alpha, positive=False)
    mask = stats.mask.bool()
    zero = torch.zeros((), dtype=stats.logps.dtype, device=stats.logps.device)
    # r_t on response positions only (where() rather than a product: 0 * inf would be NaN at masked slots)
    ratio = torch.where(mask, stats.logps - stats.ref_logps, zero)
    if method in WEIGHTED:
        if weights is None:
            raise ValueError(
                f"method {method!r} needs token weights [N, T-1] = [{2 * b}, {width}]; pass weights="
            )
        if not isinstance(weights, Tensor) or tuple(weights.shape) != (2 * b, width):
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights)
            raise ValueError(f"weights must be [N, T-1] = [{2 * b}, {width}] aligned with stats, got {got}")
        w = torch.where(mask, weights.detach().to(ratio.dtype), zero)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and >= 0 on response positions")
        ratio_sum = (w * ratio).sum(-1)
    else:
        if weights is not None:
            raise ValueError(f"method {method!r} takes no token weights (only {WEIGHTED} do); drop weights=")
        ratio_sum = ratio.sum(-1)
    seq_kl = torch.where(mask, stats.kl, zero).sum(-1)
    chosen, rejected = ratio_sum[:b], ratio_sum[b:]
    kl_w, kl_l = seq_kl[:b], seq_kl[b:]

    z = chosen - rejected  # u' (DPO Eq. 7 inside the sigmoid, before beta)
    if method == "tdpo1":
        z = z - (kl_l - kl_w)  # TDPO Eq. 18: -log sigma(u - delta), delta = beta (SeqKL_l - SeqKL_w)
    elif method in ("tdpo2", "tidpo"):
        z = z - alpha * (kl_l - kl_w.detach())  # TDPO Eq. 20: the chosen SeqKL behind a stop-gradient
    losses = -F.logsigmoid(beta * z)
    loss = losses.mean()

    with torch.no_grad():
        logps_seq = torch.where(mask, stats.logps, zero).sum(-1)
        rewards_w, rewards_l = beta * chosen, beta * rejected
        names = [
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "kl_seq/chosen",
            "kl_seq/rejected",
        ]
        values = [
            loss,
            rewards_w.mean(),
            rewards_l.mean(),
            (rewards_w - rewards_l).mean(),
            (rewards_w > rewards_l).to(loss.dtype).mean(),
            logps_seq[:b].mean(),
            logps_seq[b:].mean(),
            kl_w.mean(),
            kl_l.mean(),
        ]
        if method in KL_METHODS:
            # token-level reward R = beta sum r_t + beta SeqKL (METHODS section 2 step 5), unweighted
            plain = ratio.sum(-1)
            token_w = beta * (plain[:b] + kl_w)
            token_l = beta * (plain[b:] + kl_l)
            names += ["token_reward/chosen", "token_reward/rejected", "token_reward/accuracies"]
            values += [token_w.mean(), token_l.mean(), (token_w > token_l).to(loss.dtype).mean()]
        metrics = dict(
            zip(names, torch.stack([v.detach().to(loss.dtype) for v in values]).tolist(), strict=True)
        )
    return LossOutput(loss=loss, losses=losses, metrics=metrics)


def left_align(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's masked entries to the left, keeping their order: ``(aligned [N, L], mask [N, L])``.

    ``values`` and ``mask`` ``[N, T]``; L = the largest number of masked entries in a row. Entry j of row i
    is the j-th masked value of row i (response position j), zero past the row's count. Differentiable in
    ``values`` (a gather). Turns ``[N, T-1]`` log-ratios into response-position order for
    :func:`triplet_loss`. Derived in notebooks/06_ti_dpo.ipynb.
    """
    if not isinstance(values, Tensor) or not isinstance(mask, Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a [N, T] tensor, got {getattr(values, 'shape', type(values))}")
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    counts = mask.sum(1)
    length = int(counts.max()) if counts.numel() else 0
    # a stable sort of "not masked" puts masked entries first, in their original order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :length]
    aligned_mask = torch.arange(length, device=values.device)[None, :] < counts[:, None]
    gathered = values.gather(1, order)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(aligned_mask, gathered, zero), aligned_mask


def _sq_distance(a: Tensor, a_mask: Tensor, b: Tensor, b_mask: Tensor) -> Tensor:
    """sum_t (a_t - b_t)^2 over the positions present in both left-aligned sequences: ``[B]``."""
    length = min(a.shape[1], b.shape[1])
    both = a_mask[:, :length] & b_mask[:, :length]
    diff = torch.where(both, a[:, :length] - b[:, :length], torch.zeros((), dtype=a.dtype, device=a.device))
    return diff.pow(2).sum(1)


def triplet_loss(
    anchor_logratio: Tensor,
    anchor_mask: Tensor,
    chosen_logratio: Tensor,
    chosen_mask: Tensor,
    rejected_logratio: Tensor,
    rejected_mask: Tensor,
    *,
    margin: float,
) -> Tensor:
    """TI-DPO's triplet loss (arXiv 2505.19653 Eq. 13): mean over pairs of
    max(0, d(anchor, chosen) - d(anchor, rejected) + margin), d(a, b) = sum_t (a_t - b_t)^2.

    Inputs are per-token log-ratio sequences left-aligned by response position (see :func:`left_align`):
    anchor ``[B, L_a]``, chosen ``[B, L_w]``, rejected ``[B, L_l]`` with bool masks of the same shapes;
    lengths may differ, and each distance sums over the positions present in both sequences (both masks
    True). Returns a scalar; gradient flows to all three inputs (the anchor's log-ratios carry it in
    training, METHODS.md section 4). Derived in notebooks/06_ti_dpo.ipynb.
    """
    triples = (
        ("anchor", anchor_logratio, anchor_mask),
        ("chosen", chosen_logratio, chosen_mask),
        ("rejected", rejected_logratio, rejected_mask),
    )
    for name, values, mask in triples:
        if not isinstance(values, Tensor) or values.dim() != 2:
            raise ValueError(f"{name}_logratio must be [B, L], got {getattr(values, 'shape', type(values))}")
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(values.shape):
            got = getattr(mask, "shape", type(mask))
            raise ValueError(
                f"{name}_mask must have the shape of {name}_logratio {tuple(values.shape)}, got {got}"
            )
    sizes = {values.shape[0] for _, values, _ in triples}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"anchor, chosen and rejected must have the same number B >= 1 of rows, got {sizes}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    a, a_mask = anchor_logratio, anchor_mask.bool()
    d_pos = _sq_distance(a, a_mask, chosen_logratio, chosen_mask.bool())
    d_neg = _sq_distance(a, a_mask, rejected_logratio, rejected_mask.bool())
    return torch.clamp(d_pos - d_neg + margin, min=0.0).mean()
