"""Checks for the graded exercises of notebooks/07_attention_po.ipynb (AttentionPO).

1. :func:`check_sink_fix`: the attention-sink fix, first weight = the mean, total preserved;
2. :func:`check_two_orders`: normalise each order, average, sink fix, scale to mean 1;
3. :func:`check_align_weights`: per-response weights onto the shifted label grid of a training batch.

Each computes the kit's value itself (:mod:`tdpo_lab.methods.attnpo_judge`) and lists the values that typical
mistakes give, so that a wrong answer is told which mistake it looks like.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tdpo_lab.course.grading import check_close, passed
from tdpo_lab.methods.attnpo_judge import (
    SINK_MIN_LENGTH,
    align_weights,
    attention_to_weights,
    fix_attention_sink,
)

__all__ = ["check_align_weights", "check_sink_fix", "check_two_orders"]


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().cpu()


# --- 1 · the attention-sink fix -----------------------------------------------------------------------


def check_sink_fix(mine, weights) -> None:
    """Graded exercise 1: ``mine`` = the sink fix of ``weights`` ``[n]``, n >= SINK_MIN_LENGTH."""
    w = _f64(weights)
    want = fix_attention_sink(w)
    n, total, rest = w.numel(), w.sum(), w[1:]
    mean = total / n

    def with_first(first, scale):
        return torch.cat([first.reshape(1), rest * scale])

    mistakes = {
        "the others not rescaled: they must share total - w'_1, so that the total stays the same": (
            with_first(mean, 1.0)
        ),
        "the others rescaled to the whole old total: they share total - w'_1, so the total grows by w'_1": (
            with_first(mean, total / rest.sum())
        ),
        "w'_1 = the mean of the other weights (j > 1): it is the mean over all n weights": (
            with_first(rest.mean(), (total - rest.mean()) / rest.sum())
        ),
        "the first weight set to 0: it becomes the mean weight": with_first(
            torch.zeros(()), total / rest.sum()
        ),
        "the fix applied to the last token: the sink is the first": fix_attention_sink(w.flip(0)).flip(0),
    }
    check_close(
        mine,
        want,
        name="fixed_mine",
        mistakes=mistakes,
        hint=f"w'_1 = sum(w) / n; w'_j = w_j (sum(w) - w'_1) / sum_(k>1) w_k; n = {n}",
    )
    if n < SINK_MIN_LENGTH:
        passed(f"a response of {n} < {SINK_MIN_LENGTH} tokens is left alone")
    else:
        passed(f"sink fix of {n} weights: first = the mean {float(mean):.4g}, total {float(total):.4g} kept")


# --- 2 · two orders, averaged -------------------------------------------------------------------------


def check_two_orders(mine, scores_first, scores_second, *, fix_sink: bool = True) -> None:
    """Graded exercise 2: ``mine`` = one response's weights ``[n]`` from its scores in the two orders."""
    a, b = _f64(scores_first), _f64(scores_second)
    want = attention_to_weights(a, b, fix_sink=fix_sink)
    n = a.numel()

    def fix(w):
        return fix_attention_sink(w) if fix_sink else w

    def mean_one(w):
        return w * (n / w.sum())

    mistakes = {
        "the raw scores averaged: normalise each order to sum 1 before averaging": mean_one(fix((a + b) / 2)),
        "only the first order used: average the two orders": mean_one(fix(a / a.sum())),
        "only the second order used: average the two orders": mean_one(fix(b / b.sum())),
        "weights that sum to 1: scale them to mean 1 (sum n)": fix((a / a.sum() + b / b.sum()) / 2),
    }
    if fix_sink and n >= SINK_MIN_LENGTH:
        mistakes["the sink fix left out (cfg.attn_fix_sink is on)"] = mean_one(
            (a / a.sum() + b / b.sum()) / 2
        )
        mistakes["the sink fix applied to each order before averaging: average first, then fix"] = mean_one(
            (fix(a / a.sum()) + fix(b / b.sum())) / 2
        )
    check_close(
        mine,
        want,
        name="w_chosen_mine",
        mistakes=mistakes,
        hint="normalise each order, average, sink fix, then scale to mean 1.",
    )
    passed(
        f"two orders of {n} scores averaged into weights of mean 1" + (" (sink fixed)" if fix_sink else "")
    )
    blind = [m.split(":")[0] for m, v in mistakes.items() if torch.allclose(v, want, rtol=1e-5, atol=1e-6)]
    if blind:  # a nearly flat judge (the fast configuration) gives both orders the same attention
        print(
            f"note: on these scores {len(blind)} of the typical mistakes give the same weights too ("
            + "; ".join(blind)
            + "): the judge's attention is nearly uniform here. Make sure your code follows the formula; "
            "the tiny and gpt2 profiles tell these apart."
        )


# --- 3 · onto the label grid --------------------------------------------------------------------------


def _place(
    batch: dict,
    chosen_weights: Sequence,
    rejected_weights: Sequence,
    *,
    shift: int = 1,
    eos: float | None = 1.0,
    fill: float = 0.0,
    swap: bool = False,
) -> torch.Tensor:
    """The weights on the input grid ``[2B, T]``, read off at ``[:, shift : shift + T - 1]``."""
    n_rows, n_pos = batch["labels"].shape
    n_pairs = n_rows // 2
    first, second = (rejected_weights, chosen_weights) if swap else (chosen_weights, rejected_weights)
    full = torch.full((n_rows, n_pos + 1), fill, dtype=torch.float32)
    for i in range(n_rows):
        p, r = int(batch["prompt_lengths"][i]), int(batch["response_lengths"][i])
        w = torch.as_tensor(first[i] if i < n_pairs else second[i - n_pairs], dtype=torch.float32)
        full[i, p : p + r - 1] = w
        full[i, p + r - 1] = fill if eos is None else eos
    return full[:, shift : shift + n_pos - 1]


def check_align_weights(mine, batch: dict, chosen_weights: Sequence, rejected_weights: Sequence) -> None:
    """Graded exercise 3: ``mine`` = the weights of a ``collate_preference_batch`` on its label grid."""
    want = align_weights(batch, chosen_weights, rejected_weights).cpu()
    args = (batch, chosen_weights, rejected_weights)

    def placed(**slip):  # evaluated only when needed; None where the slip cannot be placed (lengths differ)
        def value():
            try:
                return _place(*args, **slip)
            except (RuntimeError, ValueError, IndexError):
                return None

        return value

    mistakes = {
        "weights on the input grid: token j of the response sits at input index p + j, so at label position "
        "p + j - 1 (logits[:, :-1] predict labels[:, 1:])": placed(shift=0),
        "shifted one position too far: response token j goes to label position p + j - 1, not p + j - 2": (
            placed(shift=2)
        ),
        "the EOS left at weight 0: the appended EOS trains with weight 1": placed(eos=None),
        "chosen and rejected swapped: rows [:B] hold prompt + chosen, rows [B:] prompt + rejected": placed(
            swap=True
        ),
        "a grid that starts from ones: prompt and padding positions get weight 0": placed(fill=1.0),
    }
    check_close(
        mine,
        want,
        name="W_mine",
        mistakes=mistakes,
        hint="W_mine is [2B, T-1], the shape of labels[:, 1:].",
    )
    n_rows = want.shape[0]
    passed(f"weights of {n_rows // 2} pairs placed on the label grid [{n_rows}, {want.shape[1]}]")
