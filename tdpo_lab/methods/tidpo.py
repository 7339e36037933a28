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

from tdpo_lab.config import Knob
from tdpo_lab.core.data import collate_ids
from tdpo_lab.core.generation import decode_response, encode_prompts, sample_ids_fast
from tdpo_lab.core.kv_steps import GPT2Steps
from tdpo_lab.core.logprobs import IGNORE_INDEX, TokenStats
from tdpo_lab.methods._common import unwrap
from tdpo_lab.methods.base import Method, PairTerms, StepContext
from tdpo_lab.methods.tdpo2 import ALPHA, tdpo2_logit
from tdpo_lab.methods.tidpo_importance import hybrid_weights, saliency_from_graph, saliency_from_last_block


def tidpo_loss(terms: PairTerms, *, beta: float, alpha: float, **_step_knobs) -> Tensor:
    # the weighted margin (terms.chosen/rejected carry W_t) inside TDPO2's logit, Eq. 20 with Eq. 12's weights
    return -F.logsigmoid(beta * tdpo2_logit(terms, alpha))


def saliency_weights(ctx: StepContext) -> tuple[Tensor, Tensor]:
    """TI-DPO's weights ``[N, T-1]`` read off the policy's own forward pass, and that pass's logits.

    One forward serves both: the saliency is the gradient of the logits w.r.t. the input embeddings
    (kept in the graph, ``retain_graph``), and the same logits then give the loss. On a plain GPT-2 the
    target is re-derived from the last block's input at the last positions only
    (:func:`saliency_from_last_block`); otherwise read off the final hidden state (:func:`saliency_from_graph`).
    The forward pass goes through ``ctx.policy`` (a DDP wrapper in a multi-process job), its parts are read
    off the model itself.
    """
    policy = unwrap(ctx.policy)
    input_ids = ctx.batch["input_ids"].to(ctx.device)
    attention_mask = ctx.batch["attention_mask"].to(ctx.device)
    embeds = policy.get_input_embeddings()(input_ids)
    if not embeds.requires_grad:  # a frozen embedding (LoRA): the saliency still differentiates w.r.t. it
        embeds.requires_grad_(True)
    qkv: list[Tensor] = []  # the last block's c_attn output, kept by a hook during the forward
    hook = None
    if GPT2Steps.applies(policy) and not (policy.training and _has_dropout(policy)):
        hook = policy.transformer.h[-1].attn.c_attn.register_forward_hook(
            lambda m, args, out: qkv.append(out)
        )
    try:
        out = ctx.policy(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        if hook is not None:
            hook.remove()
    if qkv:
        saliency = saliency_from_last_block(
            policy, embeds, out.hidden_states[-2], qkv[0], attention_mask, retain_graph=True
        )
    else:
        head = policy.get_output_embeddings()
        saliency = saliency_from_graph(
            out.hidden_states[-1], embeds, attention_mask, retain_graph=True, head=head
        )
    span = ctx.labels != IGNORE_INDEX if ctx.cfg.importance_span == "response" else attention_mask.bool()
    weights = hybrid_weights(saliency, span, lam=ctx.cfg.lam, sigma_div=ctx.cfg.sigma_div)
    return weights[:, 1:], out.logits  # the weight of token t sits at shifted-label position t - 1


def _has_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def triplet_extra_loss(ctx: StepContext, stats) -> tuple[Tensor, dict] | None:
    """gamma * triplet loss, with its metrics; nothing when gamma = 0."""
    if ctx.cfg.gamma <= 0:
        return None
    prompts = list(ctx.rows["prompt"])
    trip, skipped = triplet_term(  # samples from and reads parts of the model itself, not its DDP wrapper
        unwrap(ctx.policy), ctx.reference, ctx.tokenizer, prompts, stats, ctx.cfg, ctx.step_seed, ctx.device
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

    Returns (loss, number of pairs skipped because the anchor came back empty: nothing but whitespace before
    its EOS, e.g. EOS as its first token).

    The anchor is scored on the very tokens the policy drew: each row is the prompt's ids as the sampler
    saw them (:func:`tdpo_lab.core.generation.encode_prompts`), the drawn tokens before the first EOS, then EOS
    (appended, as for every response in the kit, when the anchor ran to ``anchor_max_new_tokens``). Decoding
    the draw and tokenising the text again would not always give these ids back. Its features are
    ``log pi_theta - log pi_ref`` of those tokens (:func:`response_logratios`); the exact KL that
    :func:`tdpo_lab.core.logprobs.token_stats` adds is not needed here.
    """
    eos = tokenizer.eos_token_id
    # The KV-cache sampler, not generate: the same law, a fraction of the per-token overhead, and the anchor
    # is drawn at every step (benchmarks/README.md, "train step").
    drawn = sample_ids_fast(
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
    keep, responses = [], []
    for i, (tokens,) in enumerate(drawn):
        body = tokens[: tokens.index(eos)] if eos in tokens else tokens
        if decode_response(tokenizer, body, eos).strip():  # the text an anchor shows; empty = skipped
            keep.append(i)
            responses.append(body + [eos])
    skipped = len(prompts) - len(keep)
    if not keep:
        return torch.zeros((), device=device), skipped
    prompt_ids = encode_prompts(tokenizer, [prompts[i] for i in keep])
    a, a_mask = response_logratios(policy, reference, collate_ids(prompt_ids, responses, eos), device)
    half = stats.logps.shape[0] // 2
    ratio = stats.logps - stats.ref_logps
    w, w_mask = left_align(ratio[:half][keep], stats.mask[:half][keep])
    lo, lo_mask = left_align(ratio[half:][keep], stats.mask[half:][keep])
    return triplet_loss(a, a_mask, w, w_mask, lo, lo_mask, margin=cfg.triplet_margin), skipped


def response_logratios(policy, reference, batch: dict, device) -> tuple[Tensor, Tensor]:
    """log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t) of each row's response tokens, left-aligned: ``[N, L]``, mask.

    ``batch``: right-padded ``input_ids``, ``attention_mask``, ``labels`` ``[N, T]`` (-100 off the response,
    :func:`tdpo_lab.core.data.collate_ids`). The features :func:`triplet_loss` takes: equal to :func:`left_align`
    of :func:`tdpo_lab.core.logprobs.token_stats`' ``log_ratio`` and mask on the same batch, without the KL over the
    vocabulary, and the output layer runs only at the positions that predict a response token (not at the
    prompt, the last token or the padding). Gradient flows to the policy only.
    """
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    shifted = batch["labels"][:, 1:].to(device)
    mask = shifted != IGNORE_INDEX  # [N, T-1]: position t predicts labels[:, t + 1]
    targets = shifted[mask]
    with torch.no_grad():
        ref = _response_logps(reference, input_ids, attention_mask, mask, targets)
    ratio = _response_logps(policy, input_ids, attention_mask, mask, targets) - ref  # [R], row-major
    counts = mask.sum(dim=1)
    aligned = torch.arange(int(counts.max()), device=device)[None, :] < counts[:, None]
    # mask's True entries in row-major order are each row's response positions in order: row i's j-th
    # value lands at column j, which is left_align's layout
    return ratio.new_zeros(aligned.shape).masked_scatter(aligned, ratio), aligned


def _response_logps(
    model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, targets: Tensor
) -> Tensor:
    """log pi(y_t|s_t) at the ``[N, T-1]`` ``mask`` positions (row-major), ``[R]``: fp32 (fp64 for fp64).

    The model's logits are its output layer applied to its base model's last hidden state (GPT-2; the
    saliency reads them the same way, :func:`saliency_weights`), so only the rows that are needed go
    through the output layer.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][mask])  # [R, V]
    z = logits.double() if logits.dtype == torch.float64 else logits.float()
    return -F.cross_entropy(z, targets, reduction="none")  # z[y] - logsumexp(z), one fused kernel each way


TIDPO = Method(
    name="tidpo",
    label="TI-DPO",
    color="tab:red",
    loss=tidpo_loss,
    knobs=(
        ALPHA,  # the official code's TDPO2 term
        Knob("gamma", float, 0.1, "triplet weight (paper; shipped YAML 0.001)", lambda v: v >= 0, ">= 0"),
        Knob(
            "lam",
            float,
            0.7,
            "gradient/prior mix (paper; shipped config 0.2)",
            lambda v: 0 <= v <= 1,
            "in [0, 1]",
        ),
        Knob(
            "sigma_div", float, 4.0, "prior sigma = n / sigma_div (paper 4; config 8)", lambda v: v > 0, "> 0"
        ),
        Knob("triplet_margin", float, 0.001, "the triplet loss's margin"),
        Knob(
            "importance_span",
            str,
            "response",
            "tokens the importance is normalised over: 'response' (kit) or 'full' (official code)",
            lambda v: v in ("response", "full"),
            "'response' or 'full'",
        ),
        Knob("anchor_max_new_tokens", int, 32, "length of the sampled anchor", lambda v: v > 0, "> 0"),
        Knob("anchor_temperature", float, 0.8, "the anchor's sampling temperature", lambda v: v > 0, "> 0"),
        Knob("anchor_top_k", int, 50, "the anchor's top-k (0 = off)", lambda v: v >= 0, ">= 0"),
        Knob("anchor_top_p", float, 0.95, "the anchor's top-p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ),
    uses_seq_kl=True,
    token_weights="saliency",
    paper="Yang et al., arXiv 2505.19653",
    step_weights=saliency_weights,
    extra_loss=triplet_extra_loss,
)
