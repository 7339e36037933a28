"""TI-DPO (Yang et al., arXiv 2505.19653): token-importance weights on TDPO2's logit, plus a triplet loss.

    L = -log sigma(beta * (sum_t W_t r_t(y_w) - sum_t W_t r_t(y_l) - alpha (SeqKL(y_l) - sg(SeqKL(y_w)))))
        + gamma * triplet                                                       (weighted loss Eq. 12 at
                                                                                 alpha = 0; triplet Eq. 13)

The paper's weighted loss (Eq. 12) is the alpha = 0 case; the official code adds TDPO2's KL term, which the
kit follows. W_t comes from the current policy at every step (:mod:`tdpo_lab.methods.tidpo_importance`), a
constant for the loss. The triplet term pulls the log-ratios of an anchor sampled from the policy towards
the chosen response's and away from the rejected one's. Derived in notebooks/06_ti_dpo.ipynb;
docs/methods.md section 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.data import collate_sequences
from tdpo_lab.generation import sample_fast
from tdpo_lab.logprobs import TokenStats, token_stats
from tdpo_lab.methods.base import Method, PairTerms, StepContext
from tdpo_lab.methods.tdpo2 import tdpo2_logit
from tdpo_lab.methods.tidpo_importance import hybrid_weights, saliency_from_graph


def tidpo_loss(terms: PairTerms, *, beta: float, alpha: float) -> Tensor:
    # the weighted margin (terms.chosen/rejected carry W_t) inside TDPO2's logit, Eq. 20 with Eq. 12's weights
    return -F.logsigmoid(beta * tdpo2_logit(terms, alpha))


def saliency_weights(ctx: StepContext) -> tuple[Tensor, Tensor]:
    """TI-DPO's weights ``[N, T-1]`` read off the policy's own forward pass, and that pass's logits.

    One forward serves both: the saliency is the gradient of the logits w.r.t. the input embeddings
    (kept in the graph, ``retain_graph``), and the same logits then give the loss.
    """
    input_ids = ctx.batch["input_ids"].to(ctx.device)
    attention_mask = ctx.batch["attention_mask"].to(ctx.device)
    embeds = ctx.policy.get_input_embeddings()(input_ids)
    out = ctx.policy(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True)
    head = ctx.policy.get_output_embeddings()
    saliency = saliency_from_graph(
        out.hidden_states[-1], embeds, attention_mask, retain_graph=True, head=head
    )
    span = ctx.labels != -100 if ctx.cfg.importance_span == "response" else attention_mask.bool()
    weights = hybrid_weights(saliency, span, lam=ctx.cfg.lam, sigma_div=ctx.cfg.sigma_div)
    return weights[:, 1:], out.logits  # the weight of token t sits at shifted-label position t - 1


def triplet_extra_loss(ctx: StepContext, stats) -> tuple[Tensor, dict] | None:
    """gamma * triplet loss, with its metrics; nothing when gamma = 0."""
    if ctx.cfg.gamma <= 0:
        return None
    prompts = list(ctx.rows["prompt"])
    trip, skipped = triplet_term(
        ctx.policy, ctx.reference, ctx.tokenizer, prompts, stats, ctx.cfg, ctx.step_seed, ctx.device
    )
    return ctx.cfg.gamma * trip, {"triplet/loss": trip.item(), "triplet/skipped": skipped}


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
    training, docs/methods.md section 4). Derived in notebooks/06_ti_dpo.ipynb.
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


def triplet_term(
    policy, reference, tokenizer, prompts: list[str], stats: TokenStats, cfg, step_seed: int, device
) -> tuple[Tensor, int]:
    """TI-DPO's triplet loss (docs/methods.md section 4): anchor sampled from the policy, features = log-ratios.

    Returns (loss, number of pairs skipped because the anchor came back empty).
    """
    # The KV-cache sampler, not generate: the same law, a fraction of the per-token overhead, and the anchor
    # is drawn at every step (benchmarks/README.md, "train step").
    anchors = sample_fast(
        policy,
        tokenizer,
        prompts,
        num_samples=1,
        max_new_tokens=cfg.anchor_max_new_tokens,
        temperature=cfg.anchor_temperature,
        top_k=cfg.anchor_top_k,
        top_p=cfg.anchor_top_p,
        batch_size=len(prompts),
        seed=step_seed,
    )
    anchors = [group[0] for group in anchors]
    keep = [i for i, text in enumerate(anchors) if text.strip()]
    skipped = len(prompts) - len(keep)
    if not keep:
        return torch.zeros((), device=device), skipped
    batch = collate_sequences(tokenizer, [prompts[i] for i in keep], [anchors[i] for i in keep])
    with torch.no_grad():
        ref_logits = _logits(reference, batch, device)
    anchor = token_stats(_logits(policy, batch, device), ref_logits, batch["labels"].to(device))
    half = stats.logps.shape[0] // 2
    ratio = stats.logps - stats.ref_logps
    a, a_mask = left_align(anchor.logps - anchor.ref_logps, anchor.mask)
    w, w_mask = left_align(ratio[:half][keep], stats.mask[:half][keep])
    lo, lo_mask = left_align(ratio[half:][keep], stats.mask[half:][keep])
    return triplet_loss(a, a_mask, w, w_mask, lo, lo_mask, margin=cfg.triplet_margin), skipped


def _logits(model, batch: dict, device) -> Tensor:
    return model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits


TIDPO = Method(
    name="tidpo",
    label="TI-DPO",
    color="tab:red",
    loss=tidpo_loss,
    knobs={
        "alpha": 0.5,  # TDPO2's KL weight (the official code's TDPO2 term)
        "gamma": 0.1,  # triplet weight (paper; shipped YAML 0.001)
        "lam": 0.7,  # gradient/prior mix (paper; shipped config 0.2)
        "sigma_div": 4.0,  # prior sigma = n / sigma_div (paper 4; config 8)
        "triplet_margin": 0.001,
        "importance_span": "response",  # "response" (kit) or "full" (official code)
        "anchor_max_new_tokens": 32,
        "anchor_temperature": 0.8,
        "anchor_top_k": 50,
        "anchor_top_p": 0.95,
    },
    uses_seq_kl=True,
    token_weights="saliency",
    paper="Yang et al., arXiv 2505.19653",
    step_weights=saliency_weights,
    extra_loss=triplet_extra_loss,
)
