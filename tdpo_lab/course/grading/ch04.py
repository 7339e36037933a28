"""Checks for the graded exercises of notebooks/04_dpo_baseline.ipynb (the DPO baseline).

Each checker recomputes the package's value from the same inputs, compares it with the student's and, when they
differ, names the mistake the student's value looks like (:mod:`tdpo_lab.course.grading`):

1. :func:`check_dpo_loss`: the per-pair DPO loss ``-log sigma(beta h)`` from a batch's :class:`TokenStats`;
2. :func:`check_dpo_token_gradient`: its gradient with respect to every token's log-probability, by hand;
3. :func:`check_reward_accuracy`: TRL's ``rewards/accuracies`` as a function (ties do not count);
4. :func:`check_ipo_loss`: IPO's per-pair loss ``(h - 1/(2 tau))^2``.

Rows ``[:B]`` of a batch are prompt + chosen, rows ``[B:]`` prompt + rejected (:func:`tdpo_lab.core.data.collate_preference_batch`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.core.logprobs import TokenStats
from tdpo_lab.course.grading import ExerciseError, check_close, check_grad, num_pairs, passed
from tdpo_lab.course.grading.core_pieces import (
    check_collation,
    check_preference_step,
    check_sequence_logps,
)  # the exercises that build the core
from tdpo_lab.methods import preference_loss

__all__ = [
    "check_collation",
    "check_dpo_loss",
    "check_dpo_token_gradient",
    "check_ipo_loss",
    "check_preference_step",
    "check_reward_accuracy",
    "check_sequence_logps",
]

# Mistakes shared by several exercises, phrased to follow "it looks like ...".
SWAPPED = "the margin is taken the wrong way round (rejected minus chosen); h is chosen minus rejected"
NO_REFERENCE = (
    "log pi_ref is missing: the margin is built from the log-ratios r_t = log pi_theta - log pi_ref, "
    "not from log pi_theta alone"
)
LENGTH_MEAN = (
    "the log-ratios are averaged over each response instead of summed (a length-normalised margin); "
    "the implicit reward sums them over the response tokens"
)
NEIGHBOURS = (
    "chosen and rejected are paired as neighbouring rows (0 with 1, 2 with 3, ...): rows [:B] are the chosen "
    "responses and row B + i is the rejected response of pair i"
)


def _row_sums(stats: TokenStats, values: Tensor) -> Tensor:
    """Per-row sums of ``values`` [N, T-1] over the response positions, detached: [N]."""
    values = values.detach()
    return torch.where(
        stats.mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)
    ).sum(-1)


def _views(stats: TokenStats) -> dict[str, Tensor]:
    """The per-row quantities the mistakes are made of (detached, [2B] each)."""
    ratio = _row_sums(stats, stats.logps - stats.ref_logps)
    length = stats.mask.sum(-1).clamp(min=1).to(ratio.dtype)
    return {"sum": ratio, "mean": ratio / length, "policy": _row_sums(stats, stats.logps)}


def _margin(rows: Tensor, pairing: str = "halves") -> Tensor:
    """Chosen minus rejected per pair: row i against row B + i, or (a mistake) row 2i against row 2i + 1."""
    b = rows.shape[0] // 2
    return rows[:b] - rows[b:] if pairing == "halves" else rows[0::2] - rows[1::2]


def check_dpo_loss(mine, stats: TokenStats, beta: float, *, wrt: Tensor | None = None) -> None:
    """Graded exercise 1: ``mine`` [B] is the per-pair DPO loss ``-log sigma(beta h)`` of ``stats``.

    Compares the value with ``preference_loss("dpo", stats, beta=beta).losses`` and, given ``wrt`` (the policy
    logits ``stats`` was computed from), the gradient with respect to it. Not with respect to ``stats.logps``:
    a plain sum over the time axis also reaches the masked positions, whose log-probabilities are constants.
    """
    num_pairs(stats)
    want = preference_loss("dpo", stats, beta=beta).losses
    rows = _views(stats)
    h = _margin(rows["sum"])
    mistakes = {
        SWAPPED: -F.logsigmoid(-beta * h),
        "the minus sign in front of log sigma is missing: log sigma(beta h) is the log-likelihood of the "
        "preferences, the loss is its negative": F.logsigmoid(beta * h),
        "beta is missing: the loss is -log sigma(beta h), not -log sigma(h)": -F.logsigmoid(h),
        "the margin is divided by beta instead of multiplied by it": -F.logsigmoid(h / beta),
        NO_REFERENCE: -F.logsigmoid(beta * _margin(rows["policy"])),
        LENGTH_MEAN: -F.logsigmoid(beta * _margin(rows["mean"])),
        NEIGHBOURS: -F.logsigmoid(beta * _margin(rows["sum"], "neighbours")),
    }
    hint = (
        "Per pair i: h_i = sum_t r_t(row i) - sum_t r_t(row B + i) with r_t = log pi_theta - log pi_ref, "
        "and loss_i = -log sigma(beta h_i)."
    )
    check_close(mine, want, name="mine", mistakes=mistakes, hint=hint)
    if wrt is not None:
        check_grad(mine, want, wrt, name="mine", hint=hint)
    passed(
        "the per-pair DPO loss -log sigma(beta h)" + (", in value and gradient" if wrt is not None else "")
    )


def check_dpo_token_gradient(g_hand, stats: TokenStats, beta: float) -> None:
    """Graded exercise 2: ``g_hand`` [2B, T-1] is d(sum of the per-pair DPO losses) / d ``stats.logps``.

    The reference is autograd through ``preference_loss("dpo", ...)`` on a detached copy of ``stats``.
    """
    b = num_pairs(stats)
    logps = stats.logps.detach().clone().requires_grad_()
    fresh = TokenStats(logps, stats.ref_logps.detach(), stats.kl.detach(), stats.mask)
    (want,) = torch.autograd.grad(preference_loss("dpo", fresh, beta=beta).losses.sum(), logps)
    mask = stats.mask.to(want.dtype)
    w = torch.sigmoid(-beta * _margin(_views(stats)["sum"])).to(want.dtype)  # sigma(-beta h), [B]

    def spread(chosen: Tensor, rejected: Tensor) -> Tensor:
        """Per-pair values on every response position of the pair's chosen and rejected rows."""
        return torch.cat([chosen, rejected])[:, None] * mask

    length = stats.mask.sum(-1).clamp(min=1).to(want.dtype)
    mistakes = {
        "the two sides have swapped signs (chosen rows +beta w, rejected rows -beta w): that is the direction of "
        "steepest ascent; the loss falls as a chosen token's log-probability rises, so its gradient there is "
        "negative": -want,
        "the mask is missing: prompt and padding positions belong to no response, their gradient is 0": (
            torch.cat([-beta * w, beta * w])[:, None].expand_as(want)
        ),
        "the weight is sigma(+beta h) instead of sigma(-beta h): it must be largest for the pairs ranked the "
        "wrong way round (h < 0)": spread(-beta * (1 - w), beta * (1 - w)),
        "beta is missing: d/dh [-log sigma(beta h)] = -beta sigma(-beta h), the chain rule brings out a beta": (
            spread(-w, w)
        ),
        "it is the gradient of the mean over pairs (divided by B); the exercise asks for the gradient of the "
        "sum of the per-pair losses": want / b,
        "it is divided by the response length: a summed margin gives every response token the same, full "
        "weight": want / length[:, None],
        "every pair has the weight sigma(0) = 1/2 of the start: the weight depends on each pair's own "
        "margin h": spread(torch.full_like(w, -beta / 2), torch.full_like(w, beta / 2)),
    }
    hint = (
        "Chosen row i, response position t: -beta sigma(-beta h_i); rejected row B + i: +beta sigma(-beta h_i); "
        "0 off the response."
    )
    check_close(g_hand, want, name="g_hand", mistakes=mistakes, hint=hint)
    passed(
        "d loss / d log pi_theta(y_t|s_t) = -/+ beta sigma(-beta h) on every chosen/rejected response token"
    )


def _synthetic_batch(dtype: torch.dtype, device) -> TokenStats:
    """Five pairs on which every mistake of :func:`check_reward_accuracy` gives its own accuracy.

    Sums of r_t, chosen vs rejected: 2 vs 1.5, 1 vs 1 (a tie), -1 vs 1.5, 1.5 vs 1, 0.5 vs 0.25: accuracy 3/5.
    Ties counted: 4/5; reversed: 1/5; a count: 3; per-token means (0 of 5: the response lengths differ);
    neighbouring rows: 2/5; the policy's log-probabilities alone (log pi_ref is -1 per chosen token, -3 per
    rejected one): 5/5. Dyadic numbers, so the tie is exact in any order of summation.
    """
    # columns: the prompt (masked), then up to three response positions; rows: 5 chosen, then 5 rejected
    r = [
        [0, 1.0, 1.0, 0],
        [0, 0.5, 0.5, 0],
        [0, -1.0, 0, 0],
        [0, 0.5, 0.5, 0.5],
        [0, 0.25, 0.25, 0],
        [0, 1.5, 0, 0],
        [0, 0.5, 0.5, 0],
        [0, 0.75, 0.75, 0],
        [0, 1.0, 0, 0],
        [0, 0.25, 0, 0],
    ]
    lengths = [2, 2, 1, 3, 2, 1, 2, 2, 1, 1]
    mask = torch.zeros(10, 4, dtype=torch.bool, device=device)
    for row, n in enumerate(lengths):
        mask[row, 1 : 1 + n] = True
    per_token_ref = torch.tensor([-1.0] * 5 + [-3.0] * 5, dtype=dtype, device=device)[:, None]
    ref = torch.where(mask, per_token_ref, 0.0)
    logps = torch.where(mask, ref + torch.tensor(r, dtype=dtype, device=device), 0.0)
    return TokenStats(logps, ref, torch.zeros_like(logps), mask)


def _one_number(value, where: str) -> Tensor:
    if isinstance(value, Tensor):
        value = value.detach().cpu()
    try:
        number = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ExerciseError(
            f"reward_accuracy returned a {type(value).__name__} on {where}; it must return one number"
        ) from None
    if number.numel() != 1:
        raise ExerciseError(
            f"reward_accuracy returned shape {tuple(number.shape)} on {where}; it must return one number, the "
            "fraction of pairs ranked right (the mean of the per-pair 0/1 outcomes)"
        )
    return number.reshape(())


def check_reward_accuracy(reward_accuracy: Callable, stats: TokenStats, beta: float) -> None:
    """Graded exercise 3: ``reward_accuracy(stats, beta)`` is TRL's ``rewards/accuracies`` for any batch.

    Called on three batches: ``stats``, the start pi_theta = pi_ref built from it (every pair tied) and a small
    synthetic batch with its own number of pairs; compared with ``preference_loss(...).metrics``.
    """
    if not callable(reward_accuracy):
        raise ExerciseError("reward_accuracy must be a function: def reward_accuracy(stats, beta): ...")
    num_pairs(stats)
    plain = TokenStats(*(t.detach() for t in stats))
    batches = {
        "section 1's batch": plain,
        "the start pi_theta = pi_ref (every pair tied)": plain._replace(
            logps=plain.ref_logps.clone(), kl=torch.zeros_like(plain.kl)
        ),
        "a synthetic batch of 5 pairs": _synthetic_batch(plain.logps.dtype, plain.logps.device),
    }
    values = []
    for where, batch in batches.items():
        try:
            values.append(_one_number(reward_accuracy(batch, beta), where))
        except (NotImplementedError, ExerciseError):
            raise
        except Exception as error:
            raise ExerciseError(
                f"reward_accuracy(stats, beta) raised {type(error).__name__} on {where}: {error}. It must work "
                "for any batch: take the number of pairs from stats (half its rows), not from the notebook's B"
            ) from error
    mine = torch.stack(values)
    want = torch.tensor(
        [preference_loss("dpo", s, beta=beta).metrics["rewards/accuracies"] for s in batches.values()],
        dtype=torch.float64,
    )

    def over_batches(view: str, rank=torch.gt, pairing: str = "halves", count: bool = False) -> Tensor:
        out = []
        for batch in batches.values():
            right = rank(_margin(beta * _views(batch)[view], pairing), 0).to(torch.float64)
            out.append(right.sum() if count else right.mean())
        return torch.stack(out).cpu()

    mistakes = {
        "ties count as right (>= instead of >): at the start every pair is tied, and the accuracy there is 0, "
        "not 1": lambda: over_batches("sum", torch.ge),
        "the comparison is the wrong way round (rejected above chosen)": lambda: over_batches(
            "sum", torch.lt
        ),
        "it counts the pairs ranked right instead of taking their fraction (a sum where a mean is meant)": (
            lambda: over_batches("sum", count=True)
        ),
        "log pi_ref is missing: the implicit reward is beta * sum_t (log pi_theta - log pi_ref), not the "
        "policy's log-probability alone": lambda: over_batches("policy"),
        LENGTH_MEAN: lambda: over_batches("mean"),
        NEIGHBOURS: lambda: over_batches("sum", pairing="neighbours"),
    }
    hint = (
        "The three values are reward_accuracy on (0) section 1's batch, (1) the start, where every pair is "
        "tied, (2) a synthetic batch of 5 pairs."
    )
    check_close(
        mine, want, name="reward_accuracy(stats, beta) on the three batches", mistakes=mistakes, hint=hint
    )
    passed("the implicit-reward accuracy, strict ranking, on three batches (ties count as wrong)")


def check_ipo_loss(mine, stats: TokenStats, tau: float, *, wrt: Tensor | None = None) -> None:
    """Graded exercise 4: ``mine`` [B] is IPO's per-pair loss ``(h - 1/(2 tau))^2`` (IPO Eq. 17) of ``stats``.

    ``tau`` is the kit's ``beta``; compared with ``preference_loss("ipo", stats, beta=tau).losses`` and, given
    ``wrt`` (the policy logits), in gradient.
    """
    num_pairs(stats)
    want = preference_loss("ipo", stats, beta=tau).losses
    rows = _views(stats)
    h = _margin(rows["sum"])
    target = 1 / (2 * tau)
    mistakes = {
        "the target is 1/tau: IPO's target margin is 1/(2 tau)": (h - 1 / tau) ** 2,
        f"{SWAPPED}, or the target is added instead of subtracted": (h + target) ** 2,
        "tau multiplies the margin, (tau h - 1/2)^2, which is tau^2 times IPO's loss: IPO's h enters unscaled, "
        "tau only sets the target": (tau * h - 0.5) ** 2,
        "the square is missing": h - target,
        "it is an absolute value, not a square": (h - target).abs(),
        "it is TRL's length-averaged margin (the mean log-ratio of each response): the kit's ipo, like the "
        "paper, sums over the response": (_margin(rows["mean"]) - target) ** 2,
        NO_REFERENCE: (_margin(rows["policy"]) - target) ** 2,
        "it is DPO's loss -log sigma(tau h), not IPO's": -F.logsigmoid(tau * h),
    }
    hint = "Per pair i: (h_i - 1/(2 tau))^2 with h_i = sum_t r_t(row i) - sum_t r_t(row B + i)."
    check_close(mine, want, name="ipo_mine", mistakes=mistakes, hint=hint)
    if wrt is not None:
        check_grad(mine, want, wrt, name="ipo_mine", hint=hint)
    passed(f"IPO's per-pair loss (h - 1/(2 tau))^2, target margin {target:g} nats")
