"""AttentionPO (TwDPO, Huang et al., "Token-weighted Direct Preference Optimization with Attention",
arXiv 2605.21883): DPO's margin with per-token weights read off a judge's attention.

    L = -log sigma(beta * (sum_t w_t r_t(y_w) - sum_t w_t r_t(y_l)))             (token-weighted DPO)

The weights multiply policy and reference log-probs alike and come from pi_ref prompted as a pairwise judge
(:mod:`tdpo_lab.methods.attnpo_judge`), computed once per pair before training and cached. All-ones weights
give DPO exactly. Derived in notebooks/07_attention_po.ipynb; docs/methods.md section 5.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from tdpo_lab.methods.attnpo_judge import align_weights, attention_weights
from tdpo_lab.methods.base import Method, PairTerms, StepContext
from tdpo_lab.utils import atomic_path, progress_off


def attnpo_loss(terms: PairTerms, *, beta: float, alpha: float = 0.0) -> Tensor:
    return -F.logsigmoid(beta * terms.margin)  # terms carry the judge weights: sum w r(y_w) - sum w r(y_l)


JUDGE_FILE = "weights.safetensors"  # the AttentionPO judge-weights stage: tensors chosen.<i>, rejected.<i>


def attnpo_weights(
    cfg, pairs, *, progress: bool = True, plan=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AttentionPO weights of every pair of the cached pair table, computed once with pi_ref (cached).

    Returns one ``(w_chosen, w_rejected)`` per row of ``build_pairs(cfg)``, indexed by ``pair_id``. Stored
    as safetensors in the pipeline's ``judge`` stage; a damaged file is recomputed with a warning naming it.
    """
    # the stage layer sits above the method registry (config reads the registry): imported on use
    from tdpo_lab.pipeline import Plan
    from tdpo_lab.sft import load_reference
    from tdpo_lab.stages import fetch

    plan = plan or Plan(cfg)

    def build(folder: Path) -> None:
        judge, tokenizer = load_reference(cfg, attn_implementation="eager", progress=progress, plan=plan)
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
                layer=cfg.attn_layer,
                fix_sink=cfg.attn_fix_sink,
                layer_mean=cfg.attn_layer_mean,
            )
            # safetensors stores each tensor's own memory: no views into a larger attention tensor
            tensors[f"chosen.{i}"] = w_c.detach().float().cpu().contiguous().clone()
            tensors[f"rejected.{i}"] = w_r.detach().float().cpu().contiguous().clone()
        with atomic_path(folder / JUDGE_FILE) as tmp:
            save_file(tensors, str(tmp))

    def read(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # from bytes, not load_file: its tensors would map the file, and a file damaged in place under a
        # mapping kills the process with SIGBUS instead of raising
        tensors = load_safetensors((folder / JUDGE_FILE).read_bytes())
        if len(tensors) != 2 * len(pairs):
            raise ValueError(f"{folder / JUDGE_FILE} holds {len(tensors) // 2} pairs, the table {len(pairs)}")
        return [(tensors[f"chosen.{i}"], tensors[f"rejected.{i}"]) for i in range(len(pairs))]

    return fetch(plan.entry("judge"), build, read, what="AttentionPO judge-weights cache")


def judge_weights_for_run(cfg, pairs, progress: bool = True):
    """Once per run: the judge weights of every pair of the pair table (a cached stage)."""
    return attnpo_weights(cfg, pairs, progress=progress)


def cached_judge_weights(ctx: StepContext) -> tuple[Tensor, None]:
    """The batch's judge weights on the label grid ``[N, T-1]``, looked up by ``pair_id``."""
    if ctx.state is None:
        raise ValueError(
            "method 'attnpo' needs its judge weights (tdpo_lab.methods.attnpo.attnpo_weights) as state"
        )
    chosen = [ctx.state[i][0] for i in ctx.rows["pair_id"]]
    rejected = [ctx.state[i][1] for i in ctx.rows["pair_id"]]
    return align_weights(ctx.batch, chosen, rejected).to(ctx.device), None


ATTNPO = Method(
    name="attnpo",
    label="AttentionPO",
    color="tab:purple",
    loss=attnpo_loss,
    knobs={
        "attn_layer": -1,  # judge layer; -1 = last
        "attn_layer_mean": False,  # average attention over all layers instead of one
        "attn_fix_sink": True,
    },
    token_weights="judge",
    paper="Huang et al., arXiv 2605.21883",
    prepare=judge_weights_for_run,
    step_weights=cached_judge_weights,
)
