"""AttentionPO (TwDPO, Huang et al., "Token-weighted Direct Preference Optimization with Attention",
arXiv 2605.21883): DPO's margin with per-token weights read off a judge's attention.

    L = -log sigma(beta * (sum_t w_t r_t(y_w) - sum_t w_t r_t(y_l)))             (token-weighted DPO)

The weights multiply policy and reference log-probs alike and come from pi_ref prompted as a pairwise judge
(:mod:`tdpo_lab.methods.attnpo_judge`), computed once per pair before training and cached. All-ones weights
give DPO exactly. Derived in notebooks/07_attention_po.ipynb; docs/methods.md section 5.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from tdpo_lab.config import Knob
from tdpo_lab.core.utils import progress_off
from tdpo_lab.methods.attnpo_judge import JUDGE_KEY, align_weights, attention_weights
from tdpo_lab.methods.base import Method, MethodInput, PairTerms, StepContext


def attnpo_loss(terms: PairTerms, *, beta: float, **_judge_knobs) -> Tensor:
    return -F.logsigmoid(beta * terms.margin)  # terms carry the judge weights: sum w r(y_w) - sum w r(y_l)


def judge_weights(judge, tokenizer, pairs, knobs: dict, progress: bool = True) -> dict[str, Tensor]:
    """AttentionPO weights of every pair of the table, read off ``judge`` (pi_ref, eager attention).

    Returns tensors ``chosen.<i>`` and ``rejected.<i>`` for row ``i`` (its ``pair_id``): the cached input
    ``attnpo`` that the cache layer stores and :func:`judge_state` reads back.
    """
    tensors = {}
    rows = pairs[["prompt", "chosen", "rejected"]].itertuples(index=False)
    for i, (prompt, chosen, rejected) in enumerate(
        tqdm(rows, total=len(pairs), desc="AttentionPO weights", disable=progress_off(progress))
    ):
        w_c, w_r = attention_weights(
            judge,
            tokenizer,
            prompt,
            chosen,
            rejected,
            layer=knobs["attn_layer"],
            fix_sink=knobs["attn_fix_sink"],
            layer_mean=knobs["attn_layer_mean"],
        )
        # safetensors stores each tensor's own memory: no views into a larger attention tensor
        tensors[f"chosen.{i}"] = w_c.detach().float().cpu().contiguous().clone()
        tensors[f"rejected.{i}"] = w_r.detach().float().cpu().contiguous().clone()
    return tensors


def judge_state(cfg, pairs, inputs) -> list[tuple[Tensor, Tensor]]:
    """Once per run: ``(w_chosen, w_rejected)`` of every pair of the table, indexed by ``pair_id``."""
    tensors = inputs["attnpo"]
    if len(tensors) != 2 * len(pairs):
        raise ValueError(f"the judge weights hold {len(tensors) // 2} pairs, the pair table {len(pairs)}")
    return [(tensors[f"chosen.{i}"], tensors[f"rejected.{i}"]) for i in range(len(pairs))]


def cached_judge_weights(ctx: StepContext) -> tuple[Tensor, None]:
    """The batch's judge weights on the label grid ``[N, T-1]``, looked up by ``pair_id``."""
    if ctx.state is None:
        raise ValueError("method 'attnpo' needs its judge weights (the cached input 'attnpo') as state")
    chosen = [ctx.state[i][0] for i in ctx.rows["pair_id"]]
    rejected = [ctx.state[i][1] for i in ctx.rows["pair_id"]]
    return align_weights(ctx.batch, chosen, rejected).to(ctx.device), None


JUDGE_KNOBS = (
    Knob("attn_layer", int, -1, "the judge layer whose attention is read; -1 = the last"),
    Knob("attn_layer_mean", bool, False, "average the attention over all layers instead of reading one"),
    Knob("attn_fix_sink", bool, True, "spread the attention parked on the first token (the sink) uniformly"),
)

ATTNPO = Method(
    name="attnpo",
    label="AttentionPO",
    color="tab:purple",
    loss=attnpo_loss,
    knobs=JUDGE_KNOBS,
    token_weights="judge",
    paper="Huang et al., arXiv 2605.21883",
    # the judge weights: cached under <cache>/attnpo/<key>, keyed by the pair table, these knobs and both judge
    # texts (plain, chat) with the sink threshold (a new template gives new weights)
    inputs=(
        MethodInput(
            "attnpo",
            compute=judge_weights,
            knobs=tuple(k.name for k in JUDGE_KNOBS),
            version=2,
            extra=JUDGE_KEY,
            model_kwargs={"attn_implementation": "eager"},
        ),
    ),
    prepare=judge_state,
    step_weights=cached_judge_weights,
)
