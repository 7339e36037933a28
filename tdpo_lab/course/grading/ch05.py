"""Checks for the graded exercises of notebooks/05_tdpo.ipynb (TDPO1 and TDPO2).

Each checker recomputes the package's value from the same inputs, compares it with the student's and, when they
differ, names the mistake the student's value looks like (:mod:`tdpo_lab.course.grading`):

1. :func:`check_kl_per_position`: the per-position KL(pi_ref || pi_theta) on the response, from logits and labels;
2. :func:`check_tdpo1_loss`: TDPO1's per-pair loss, in value and in gradient;
3. :func:`check_tdpo2_loss`: TDPO2's per-pair loss, whose stop-gradient only the gradient can show;
4. :func:`check_token_reward`: the token-level reward R = beta (sum_t r_t + SeqKL) of every row.

Rows ``[:B]`` of a batch are prompt + chosen, rows ``[B:]`` prompt + rejected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.core.logprobs import IGNORE_INDEX, TokenStats, token_stats
from tdpo_lab.course.grading import check_close, check_grad, num_pairs, passed
from tdpo_lab.course.grading.core_pieces import check_kl_estimators  # the exercises that build the core
from tdpo_lab.methods import preference_loss

__all__ = [
    "check_kl_estimators",
    "check_kl_per_position",
    "check_tdpo1_loss",
    "check_tdpo2_loss",
    "check_token_reward",
]

# Mistakes shared by the two losses, phrased to follow "it looks like ...".
KL_SIGN = (
    "the KL gap has the wrong sign: the logit subtracts (K_l - K_w), the rejected response's SeqKL minus the "
    "chosen one's"
)
NO_KL = "the KL term is missing: that is DPO's loss -log sigma(beta u')"
NO_MINUS = "the minus sign in front of log sigma is missing: the loss is -log sigma(beta z)"
SEQKL_MEAN = (
    "the SeqKLs are averaged over each response instead of summed: SeqKL is the sum of the per-position KLs"
)


def _terms(stats: TokenStats, *, detach: bool = True) -> dict[str, Tensor]:
    """u' [B], the SeqKLs K_w, K_l [B] and their per-token means, from ``stats`` (the package's sums)."""
    b = num_pairs(stats)
    mask = stats.mask.bool()
    logps, ref, kl = (t.detach() if detach else t for t in (stats.logps, stats.ref_logps, stats.kl))
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    ratio = torch.where(mask, logps - ref, zero).sum(-1)
    seqkl = torch.where(mask, kl, zero).sum(-1)
    mean_kl = seqkl / mask.sum(-1).clamp(min=1).to(seqkl.dtype)
    return {
        "u": ratio[:b] - ratio[b:],
        "K_w": seqkl[:b],
        "K_l": seqkl[b:],
        "K_w mean": mean_kl[:b],
        "K_l mean": mean_kl[b:],
        "ratio": ratio,
        "seqkl": seqkl,
    }


def _grad(losses: Tensor, wrt: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(losses.sum(), wrt, retain_graph=True, allow_unused=True)
    return torch.zeros_like(wrt) if g is None else g


def check_kl_per_position(kl_mine, pol_logits: Tensor, ref_logits: Tensor, labels: Tensor) -> None:
    """Graded exercise 1: ``kl_mine`` [2B, T-1] is KL(pi_ref(.|s_t) || pi_theta(.|s_t)) on response positions.

    Position t is the state that ``logits[:, t]`` describes and ``labels[:, t + 1]`` is scored at; off the
    response the value is 0. Compared with ``token_stats(pol_logits, ref_logits, labels).kl`` in value and,
    when ``pol_logits`` carries gradient, in gradient with respect to it.
    """
    want = token_stats(pol_logits, ref_logits, labels).kl
    dtype = torch.float64 if pol_logits.dtype == torch.float64 else torch.float32
    on_response = labels[:, 1:] != IGNORE_INDEX
    ln2 = math.log(2.0)

    @torch.no_grad()
    def kl(first: Tensor, second: Tensor, positions: Tensor, shift: int = 0) -> Tensor:
        """sum_v p_first (log p_first - log p_second) at the states logits[:, shift : T - 1 + shift]."""
        end = first.shape[1] - 1 + shift
        a = F.log_softmax(first[:, shift:end].to(dtype), -1)
        b = F.log_softmax(second[:, shift:end].to(dtype), -1)
        return torch.where(positions, (a.exp() * (a - b)).sum(-1), 0.0)

    every = torch.ones_like(on_response)
    mistakes = {
        "the direction is reversed, KL(pi_theta || pi_ref): TDPO's SeqKL weighs the log-ratio with p_ref, "
        "sum_v p_ref (log p_ref - log p_theta)": lambda: kl(pol_logits, ref_logits, on_response),
        "the sign is flipped: sum_v p_ref (log p_theta - log p_ref) is minus the KL, and a KL is never "
        "negative": lambda: -want,
        "the mask is missing: prompt and padding positions are no part of the response and must be 0": (
            lambda: kl(ref_logits, pol_logits, every)
        ),
        "the mask is not shifted: logits[:, t] predicts labels[:, t + 1], so the response positions are "
        "labels[:, 1:] != -100, not labels[:, :-1] != -100": (
            lambda: kl(ref_logits, pol_logits, labels[:, :-1] != IGNORE_INDEX)
        ),
        "the logits are shifted the wrong way (logits[:, 1:] instead of logits[:, :-1]): position t must come "
        "from logits[:, t], the state that predicts labels[:, t + 1]": (
            lambda: kl(ref_logits, pol_logits, on_response, shift=1)
        ),
        "the KL is in bits (log base 2): the kit measures it in nats, with natural logarithms": lambda: (
            want / ln2
        ),
    }
    hint = (
        "At every response position: sum over the vocabulary of p_ref * (log p_ref - log p_theta), with "
        "log_softmax of logits[:, :-1]; 0 where labels[:, 1:] == -100."
    )
    # float32 sums over a 50,257-word vocabulary: agree with token_stats' logit form to about 1e-6 absolute
    check_close(kl_mine, want, name="kl_mine", mistakes=mistakes, rtol=1e-5, atol=1e-5, hint=hint)
    if pol_logits.requires_grad:
        check_grad(
            kl_mine, want, pol_logits, name="kl_mine", hint="build it from pol_logits with torch operations"
        )
    passed("the per-position KL(pi_ref || pi_theta) on the response positions, in value and gradient")


def check_tdpo1_loss(mine, stats: TokenStats, *, beta: float, wrt: Tensor | None = None) -> None:
    """Graded exercise 2: ``mine`` [B] is TDPO1's per-pair loss ``-log sigma(beta (u' - (K_l - K_w)))``.

    Compared with ``preference_loss("tdpo1", stats, beta=beta).losses``; with ``wrt`` (the policy logits
    ``stats`` was computed from) also in gradient, where a stop-gradient would show. Not with respect to
    ``stats.kl`` or ``stats.logps``: a plain sum over the time axis also reaches their masked positions,
    which are constants.
    """
    want = preference_loss("tdpo1", stats, beta=beta).losses
    t = _terms(stats)
    u, k_w, k_l = t["u"], t["K_w"], t["K_l"]
    mistakes = {
        KL_SIGN: -F.logsigmoid(beta * (u - (k_w - k_l))),
        NO_KL: -F.logsigmoid(beta * u),
        "beta scales the margin only: beta multiplies the whole logit u' - (K_l - K_w)": (
            -F.logsigmoid(beta * u - (k_l - k_w))
        ),
        NO_MINUS: F.logsigmoid(beta * (u - (k_l - k_w))),
        SEQKL_MEAN: -F.logsigmoid(beta * (u - (t["K_l mean"] - t["K_w mean"]))),
    }
    hint = "Per pair: -log sigma(beta * (u' - (K_l - K_w))), both SeqKLs differentiable."
    check_close(mine, want, name="tdpo1_mine", mistakes=mistakes, hint=hint)
    if wrt is not None:
        live = _terms(stats, detach=False)
        u, k_w, k_l = live["u"], live["K_w"], live["K_l"]
        grad_mistakes = {
            "a .detach() on the chosen SeqKL K_w: that is TDPO2's stop-gradient (at alpha = 1); TDPO1 lets the "
            "gradient flow through both SeqKLs": lambda: _grad(
                -F.logsigmoid(beta * (u - (k_l - k_w.detach()))), wrt
            ),
            "a .detach() on the rejected SeqKL K_l: TDPO1 lets the gradient flow through both SeqKLs": (
                lambda: _grad(-F.logsigmoid(beta * (u - (k_l.detach() - k_w))), wrt)
            ),
            "the whole KL term is detached: its value is there, but no gradient flows through K_w and K_l "
            "(DPO's gradient, reweighted)": lambda: _grad(
                -F.logsigmoid(beta * (u - (k_l - k_w).detach())), wrt
            ),
        }
        check_grad(mine, want, wrt, name="tdpo1_mine", mistakes=grad_mistakes, hint=hint)
    passed(
        "TDPO1's per-pair loss -log sigma(beta (u' - (K_l - K_w)))"
        + (", in value and gradient" if wrt is not None else "")
    )


def check_tdpo2_loss(mine, stats: TokenStats, *, beta: float, alpha: float, wrt: Tensor) -> None:
    """Graded exercise 3: ``mine`` [B] is TDPO2's per-pair loss ``-log sigma(beta (u' - alpha (K_l - sg K_w)))``.

    The stop-gradient sg (``.detach()``) changes no value, so the check compares the gradient with respect to
    ``wrt`` (the policy logits ``stats`` was computed from) with that of ``preference_loss("tdpo2", ...)``.
    """
    want = preference_loss("tdpo2", stats, beta=beta, alpha=alpha).losses
    t = _terms(stats)
    u, k_w, k_l = t["u"], t["K_w"], t["K_l"]
    mistakes = {
        "alpha is missing (that is TDPO1's value): TDPO2 weighs the KL gap with alpha": (
            -F.logsigmoid(beta * (u - (k_l - k_w)))
        ),
        KL_SIGN: -F.logsigmoid(beta * (u - alpha * (k_w - k_l))),
        NO_KL: -F.logsigmoid(beta * u),
        "alpha multiplies the whole logit instead of the KL gap": -F.logsigmoid(
            beta * alpha * (u - (k_l - k_w))
        ),
        "beta scales the margin only: beta multiplies the whole logit u' - alpha (K_l - K_w)": (
            -F.logsigmoid(beta * u - alpha * (k_l - k_w))
        ),
        NO_MINUS: F.logsigmoid(beta * (u - alpha * (k_l - k_w))),
        SEQKL_MEAN: -F.logsigmoid(beta * (u - alpha * (t["K_l mean"] - t["K_w mean"]))),
    }
    hint = "Per pair: -log sigma(beta * (u' - alpha * (K_l - sg(K_w)))), sg = .detach()."
    check_close(mine, want, name="tdpo2_mine", mistakes=mistakes, hint=hint)
    live = _terms(stats, detach=False)
    u, k_w, k_l = live["u"], live["K_w"], live["K_l"]
    grad_mistakes = {
        "the .detach() on the chosen SeqKL K_w is missing: the values agree, but without the stop-gradient the "
        "chosen-side KL term pushes pi_theta away from pi_ref on the chosen responses (TDPO Eq. 20 has sg(K_w))": (
            lambda: _grad(-F.logsigmoid(beta * (u - alpha * (k_l - k_w))), wrt)
        ),
        "the .detach() is on the rejected SeqKL K_l instead of the chosen K_w": (
            lambda: _grad(-F.logsigmoid(beta * (u - alpha * (k_l.detach() - k_w))), wrt)
        ),
        "both SeqKLs are detached: then the KL term carries no gradient at all (DPO's gradient, reweighted)": (
            lambda: _grad(-F.logsigmoid(beta * (u - alpha * (k_l - k_w).detach())), wrt)
        ),
        "the margin u' is detached: only the KL term carries gradient": (
            lambda: _grad(-F.logsigmoid(beta * (u.detach() - alpha * (k_l - k_w.detach()))), wrt)
        ),
    }
    check_grad(mine, want, wrt, name="tdpo2_mine", mistakes=grad_mistakes, hint=hint)
    passed("TDPO2's per-pair loss with the stop-gradient on the chosen SeqKL, in value and gradient")


def check_token_reward(r_mine, stats: TokenStats, *, beta: float, alpha: float | None = None) -> None:
    """Graded exercise 4: ``r_mine`` [2B] is the token-level reward R = beta (sum_t r_t + SeqKL) of every row.

    The package logs its means over the chosen and the rejected rows as ``token_reward/chosen|rejected``; this
    recomputes R per row the same way and checks the means against those metrics. ``alpha`` (optional) only
    lets the check recognise an alpha where none belongs.
    """
    b = num_pairs(stats)
    t = _terms(stats)
    ratio, seqkl = t["ratio"], t["seqkl"]
    want = beta * (ratio + seqkl)
    logged = preference_loss("tdpo1", stats, beta=beta).metrics
    for side, rows in (("chosen", want[:b]), ("rejected", want[b:])):
        if not math.isclose(logged[f"token_reward/{side}"], rows.mean().item(), rel_tol=1e-5, abs_tol=1e-6):
            raise RuntimeError(f"the checker disagrees with the package's token_reward/{side}: report this")
    mistakes = {
        "the SeqKL is subtracted: R adds beta * SeqKL to the implicit reward (chapter 03: R = beta sum_t r_t "
        "+ beta SeqKL)": beta * (ratio - seqkl),
        "it is DPO's implicit reward beta * sum_t r_t alone: the token-level reward adds beta * SeqKL": beta
        * ratio,
        "beta scales the log-ratios only: R = beta * (sum_t r_t + SeqKL), beta multiplies the SeqKL too": (
            beta * ratio + seqkl
        ),
        "beta is missing: R = beta * (sum_t r_t + SeqKL)": ratio + seqkl,
    }
    if alpha is not None and not math.isclose(alpha, 1.0):
        mistakes["alpha weighs the SeqKL: R has no alpha, for TDPO1 and TDPO2 alike"] = beta * (
            ratio + alpha * seqkl
        )
    hint = "Per row (chosen rows, then rejected rows): beta * (sum_t r_t + SeqKL)."
    check_close(r_mine, want, name="R_mine", mistakes=mistakes, hint=hint)
    passed("the token-level reward R = beta (sum_t r_t + SeqKL) of every row")
