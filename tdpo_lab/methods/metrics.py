"""The metrics a preference step logs, under TRL's names: implicit rewards, log-probs, SeqKL, logits."""

from __future__ import annotations

import torch
from torch import Tensor

from tdpo_lab.core.logprobs import IGNORE_INDEX


@torch.no_grad()
def logit_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """TRL's ``logits/chosen`` and ``logits/rejected``: the mean policy logit over response positions.

    ``logits`` ``[N, T, V]`` (rows ``[:N/2]`` chosen, ``[N/2:]`` rejected), ``labels`` ``[N, T]`` unshifted, -100
    off the response. As TRL's ``DPOTrainer`` computes them: the positions that predict a response token
    (``logits[:, :-1]`` where ``labels[:, 1:] != -100``), every vocabulary entry, pooled over the half-batch
    (one mean over all those positions and entries, not a mean of per-pair means). A drift of this number
    shows the logits' scale moving, which a log-softmax hides. Summed over the vocabulary first, in fp32, so
    no ``[positions, V]`` copy is made.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or logits.shape[0] % 2:
        raise ValueError(
            f"need logits [N, T, V] with N = 2B even and labels [N, T], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    b, vocab = logits.shape[0] // 2, logits.shape[-1]
    mask = labels[:, 1:] != IGNORE_INDEX
    sums = logits[:, :-1].sum(-1, dtype=torch.float32)  # [N, T-1]: each position's logits summed over V
    zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
    per_row = torch.where(mask, sums, zero).sum(-1)
    positions = mask.sum(-1).to(sums.dtype)
    out = {}
    for name, rows in (("logits/chosen", slice(0, b)), ("logits/rejected", slice(b, None))):
        out[name] = (per_row[rows].sum() / (positions[rows].sum().clamp(min=1) * vocab)).item()
    return out


@torch.no_grad()
def pair_metrics(terms, ratio, loss, beta: float, *, token_reward: bool) -> dict[str, float]:
    """The metrics every method logs (TRL's names), from a batch's per-pair sums ``terms`` (see
    :func:`tdpo_lab.methods.preference_loss`); ``token_reward``: also the TDPO family's token-level reward."""
    rewards_w, rewards_l = beta * terms.chosen, beta * terms.rejected
    values = {
        "loss": loss,
        "rewards/chosen": rewards_w.mean(),
        "rewards/rejected": rewards_l.mean(),
        "rewards/margins": (rewards_w - rewards_l).mean(),
        "rewards/accuracies": (rewards_w > rewards_l).to(loss.dtype).mean(),
        "logps/chosen": terms.logps_chosen.mean(),
        "logps/rejected": terms.logps_rejected.mean(),
        "kl_seq/chosen": terms.kl_chosen.mean(),
        "kl_seq/rejected": terms.kl_rejected.mean(),
    }
    if token_reward:
        # token-level reward R = beta sum r_t + beta SeqKL (docs/methods.md section 2 step 5), unweighted
        b, plain = terms.chosen.shape[0], ratio.sum(-1)
        token_w = beta * (plain[:b] + terms.kl_chosen)
        token_l = beta * (plain[b:] + terms.kl_rejected)
        values["token_reward/chosen"] = token_w.mean()
        values["token_reward/rejected"] = token_l.mean()
        values["token_reward/accuracies"] = (token_w > token_l).to(loss.dtype).mean()
    stacked = torch.stack([v.detach().to(loss.dtype) for v in values.values()]).tolist()
    return dict(zip(values, stacked, strict=True))
