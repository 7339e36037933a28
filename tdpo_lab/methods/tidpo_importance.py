"""TI-DPO's token importance (Yang et al., arXiv 2505.19653, Eqs. 5-7 of the ICLR 2026 version).

The L1 norm of the gradient of the largest last-position logit with respect to each input embedding
(:func:`gradient_saliency`), mixed with a Gaussian prior over the span (:func:`gaussian_prior`,
:func:`hybrid_weights`). Recomputed from the current policy at every step; a constant for the loss.
Weights are normalised so that uniform importance gives weight 1 everywhere (the weighted loss then reduces
to TDPO2's). docs/methods.md section 4. Derived in notebooks/06_ti_dpo.ipynb.

A re-implementation from the paper's description; no code of the official repository is used.

Grids: a batch row has T input positions; per-token loss tensors have T-1 positions aligned with the shifted
labels (the label at position t-1 is the token at index t). :func:`gradient_importance` returns weights on
the input grid ``[N, T]``; :func:`shift_to_labels` moves them to the label grid ``[N, T-1]``.
"""

from __future__ import annotations

import torch

from tdpo_lab.core.kv_steps import gpt2_block_from_attention
from tdpo_lab.methods._common import eval_mode

__all__ = [
    "gaussian_prior",
    "gradient_importance",
    "gradient_saliency",
    "hybrid_weights",
    "saliency_from_graph",
    "saliency_from_last_block",
    "shift_to_labels",
]


def gaussian_prior(n: int, sigma_div: float = 4.0, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """TI-DPO's positional prior over a span of ``n`` tokens, normalised to sum 1.

    P(t) = exp(-0.5 ((t - mu) / sigma)^2), t = 0..n-1, mu = (n-1)/2, sigma = n / sigma_div, then P / sum P
    (arXiv 2505.19653, Gaussian prior of Eq. 7; the paper takes sigma = n/4, the shipped config n/8).

    Returns a ``[n]`` tensor. ``n = 1`` gives ``[1.0]``.
    """
    if n < 1:
        raise ValueError(f"gaussian_prior needs a span of at least one token, got n={n}.")
    if not sigma_div > 0:
        raise ValueError(f"sigma_div must be > 0 (sigma = n / sigma_div), got {sigma_div}.")
    t = torch.arange(n, dtype=dtype)
    mu = (n - 1) / 2
    sigma = n / sigma_div
    p = torch.exp(-0.5 * ((t - mu) / sigma) ** 2)
    return p / p.sum()


def gradient_saliency(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Raw TI-DPO attribution I_t = || d target / d e_t ||_1 for every input position.

    target = max_v logits[last real position, v] (arXiv 2505.19653 Eq. 5), I_t = L1 norm over the hidden size
    of its gradient with respect to the input embedding e_t (Eq. 6). The model runs with
    ``inputs_embeds`` = its own embeddings of ``input_ids``, detached and requiring grad, in eval mode (its
    previous train/eval flags are restored afterwards). Only the embeddings receive a gradient
    (``torch.autograd.grad``): the model's parameters never accumulate ``.grad``.

    Rows are independent (no cross-row interaction in a transformer in eval mode), so one backward pass of
    the sum of the per-row targets gives every row's gradient at once.

    Args:
        model: a causal LM with ``get_input_embeddings()`` and ``model(inputs_embeds=, attention_mask=).logits``.
        input_ids: ``[N, T]`` token ids.
        attention_mask: ``[N, T]`` 1 on real tokens, 0 on padding; each row needs at least one real token.

    Returns:
        ``[N, T]`` float32 tensor (no grad), 0 is possible anywhere (e.g. positions after the target).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, T]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    real = attention_mask.bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError(
            "every row of attention_mask needs at least one real token (a 1); found an empty row."
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "gradient_saliency needs autograd but torch.inference_mode() is active; call it outside "
            "inference_mode (torch.no_grad() is fine: it is overridden locally)."
        )
    with eval_mode(model), torch.enable_grad():
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=attention_mask)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise TypeError("the model's output has no .logits; gradient_saliency needs a causal LM output.")
        return saliency_from_graph(logits, embeds, attention_mask)


def saliency_from_graph(
    logits: torch.Tensor,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    retain_graph: bool = False,
    head: torch.nn.Module | None = None,
) -> torch.Tensor:
    """TI-DPO attribution from a forward pass already made with ``inputs_embeds=embeds``: ``[N, T]``, no grad.

    The training loop runs the policy once with ``inputs_embeds`` and reads both the loss and the weights off
    that one graph (``retain_graph=True`` keeps it for the loss's backward), which saves TI-DPO a forward
    pass per step. Only ``embeds`` receives this gradient; parameters are untouched. Equal to
    :func:`gradient_saliency` when the model has no dropout.

    ``head``: the model's output layer (``get_output_embeddings()``). When given, ``logits`` is the final
    hidden state ``[N, T, d]`` and only the last position of each row goes through ``head``: the same
    target and the same gradient, without pushing a dense, almost all-zero ``[N, T, V]`` gradient back
    through the output layer (a third of the attribution's cost on the tiny profile).
    """
    n_rows = attention_mask.shape[0]
    at_last = logits[torch.arange(n_rows, device=logits.device), _last_positions(attention_mask)]
    if head is not None:
        at_last = head(at_last)
    return _saliency(at_last, embeds, retain_graph)


def saliency_from_last_block(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    block_input: torch.Tensor,
    qkv: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    retain_graph: bool = False,
) -> torch.Tensor:
    """:func:`saliency_from_graph` for a plain GPT-2: the target re-derived at each row's last position only.

    ``block_input`` ``[N, T, d]``: the input of the model's last block in the forward made with
    ``inputs_embeds=embeds`` (``hidden_states[-2]``); ``qkv`` ``[N, T, 3d]``: that block's ``c_attn`` output in
    the same forward. The target reads the last block's output at one position per row, so the block's
    attention output, MLP and final layer norm are run again at those positions alone
    (:func:`tdpo_lab.core.kv_steps.gpt2_block_from_attention`), and the gradient goes back through them and
    ``c_attn`` instead of through the block at every position: the same target and gradient, about a sixth
    less of the attribution's cost on the tiny profile. For a model that :class:`tdpo_lab.core.kv_steps.GPT2Steps`
    applies to, without active dropout.
    """
    rows, _, d = block_input.shape
    heads = model.config.n_head
    index = torch.arange(rows, device=block_input.device)
    last = _last_positions(attention_mask)
    q = qkv[index, last, :d].view(rows, heads, 1, -1)  # [N, heads, 1, d_head]
    k, v = (
        part.reshape(rows, -1, heads, d // heads).transpose(1, 2) for part in qkv[..., d:].split(d, dim=-1)
    )
    columns = torch.arange(attention_mask.shape[1], device=block_input.device)
    attend = ((columns <= last[:, None]) & attention_mask.bool())[
        :, None, None, :
    ]  # what the causal mask lets in
    x = gpt2_block_from_attention(model.transformer.h[-1], block_input[index, last][:, None], q, k, v, attend)
    final = model.transformer.ln_f(x[:, 0])
    return _saliency(model.get_output_embeddings()(final), embeds, retain_graph)


def _last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # The last real position of each row (works for right or left padding): [N].
    n_rows, n_pos = attention_mask.shape
    positions = torch.arange(n_pos, device=attention_mask.device).expand(n_rows, n_pos)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def _saliency(logits_at_last: torch.Tensor, embeds: torch.Tensor, retain_graph: bool) -> torch.Tensor:
    target = logits_at_last.max(dim=-1).values  # Eq. 5, [N]
    (grad,) = torch.autograd.grad(target.sum(), embeds, retain_graph=retain_graph)
    saliency = grad.detach().abs().sum(dim=-1).float()  # Eq. 6, [N, T]
    if not bool(torch.isfinite(saliency).all()):
        raise FloatingPointError(
            "the embedding gradient contains NaN or inf; check the model's logits (fp16 overflow?) before "
            "computing TI-DPO weights."
        )
    return saliency


def hybrid_weights(
    saliency: torch.Tensor, span_mask: torch.Tensor, *, lam: float = 0.7, sigma_div: float = 4.0
) -> torch.Tensor:
    """Mix attribution and Gaussian prior on each row's span; mean 1 on the span, 0 off it.

    On a span of n tokens (``span_mask`` True; t = rank of the position within the span, 0..n-1):
    I_norm = I / sum_span I, P = :func:`gaussian_prior` (n, sigma_div), W = lam I_norm + (1 - lam) P
    (arXiv 2505.19653 Eq. 7), then W * n / sum W so the weights average 1 over the span. A span of length 1
    gets weight 1; a span whose attribution is all zero falls back to the prior (W = P). Rows with an empty
    span are all zero.

    Args:
        saliency: ``[N, T]`` non-negative attribution (:func:`gradient_saliency`).
        span_mask: ``[N, T]`` bool, the positions that receive weights (kit default: the response tokens).
        lam: mix in [0, 1]; 1 = attribution only, 0 = prior only.
        sigma_div: prior sigma = n / sigma_div.

    Returns:
        ``[N, T]`` float32 weights.
    """
    if saliency.dim() != 2 or span_mask.shape != saliency.shape:
        raise ValueError(
            f"saliency and span_mask must both be [N, T]; got {tuple(saliency.shape)} and {tuple(span_mask.shape)}."
        )
    if span_mask.dtype != torch.bool:
        raise TypeError(f"span_mask must be a bool tensor, got {span_mask.dtype}; pass e.g. labels != -100.")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (the attribution/prior mix), got {lam}.")
    if not sigma_div > 0:
        raise ValueError(f"sigma_div must be > 0 (sigma = n / sigma_div), got {sigma_div}.")
    if bool((saliency < 0).any()) or not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency must be finite and non-negative (an L1 norm of gradients).")

    span = span_mask
    s64 = torch.where(span, saliency.double(), torch.zeros((), dtype=torch.float64, device=saliency.device))
    n = span.sum(dim=1, keepdim=True)  # [N, 1]
    n64 = n.double()
    rank = (span.long().cumsum(dim=1) - 1).double()  # position within the span, 0..n-1
    mu = (n64 - 1) / 2
    sigma = (n64 / sigma_div).clamp_min(1e-12)  # clamp only guards empty rows (n = 0), masked below
    prior = torch.where(span, torch.exp(-0.5 * ((rank - mu) / sigma) ** 2), torch.zeros_like(s64))
    prior = prior / prior.sum(dim=1, keepdim=True).clamp_min(1e-300)

    total = s64.sum(dim=1, keepdim=True)
    use_grad = (total > 0) & (n > 1)  # fallbacks: span of length <= 1, or all-zero gradient -> prior
    i_norm = s64 / total.clamp_min(1e-300)
    mixed = torch.where(use_grad, lam * i_norm + (1 - lam) * prior, prior)
    # Both terms sum to 1, so mixed sums to 1; renormalising explicitly keeps the mean exactly 1.
    weights = mixed * n64 / mixed.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return torch.where(span, weights, torch.zeros_like(weights)).float()


def gradient_importance(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    span_mask: torch.Tensor,
    *,
    lam: float = 0.7,
    sigma_div: float = 4.0,
) -> torch.Tensor:
    """TI-DPO's hybrid token weights on the input grid: mean 1 over each row's span, 0 elsewhere.

    W = span-normalised mix of lam * I_norm + (1 - lam) * Gaussian prior (arXiv 2505.19653 Eqs. 5-7; docs/methods.md
    section 4): :func:`gradient_saliency` then :func:`hybrid_weights`. The result carries no gradient, the
    model's parameters receive none, and the model's train/eval mode is restored.

    To weight the per-token losses, move the result to the label grid with :func:`shift_to_labels`
    (weight of token t -> label position t-1). With ``span_mask = labels != -100`` (response tokens including
    the EOS), ``shift_to_labels(W)`` is non-zero exactly on ``TokenStats.mask`` and averages 1 there.

    Args:
        model: causal LM (see :func:`gradient_saliency`).
        input_ids, attention_mask: ``[N, T]``.
        span_mask: ``[N, T]`` bool, within the real tokens.
        lam: attribution/prior mix (paper 0.7, shipped config 0.2).
        sigma_div: prior sigma = n / sigma_div (paper 4, shipped config 8).

    Returns:
        ``[N, T]`` float32 tensor on ``input_ids.device``.

    Derived in notebooks/06_ti_dpo.ipynb.
    """
    if span_mask.shape != input_ids.shape:
        raise ValueError(
            f"span_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(span_mask.shape)}."
        )
    if span_mask.dtype != torch.bool:
        raise TypeError(f"span_mask must be a bool tensor, got {span_mask.dtype}; pass e.g. labels != -100.")
    if bool((span_mask & ~attention_mask.bool()).any()):
        raise ValueError(
            "span_mask marks padding positions (attention_mask 0); the span must lie on real tokens."
        )
    saliency = gradient_saliency(model, input_ids, attention_mask)
    return hybrid_weights(saliency, span_mask.to(saliency.device), lam=lam, sigma_div=sigma_div)


def shift_to_labels(weights: torch.Tensor) -> torch.Tensor:
    """Move per-token weights from the input grid ``[N, T]`` to the shifted label grid ``[N, T-1]``.

    The label at position t-1 is the token at index t (``logits[:, :-1]`` predicts ``labels[:, 1:]``), so the
    weight of token t lands on position t-1: ``weights[:, 1:]``. The weight of token 0 has no label position and
    is dropped (with a response span it is always 0, since a prompt token comes first).
    """
    if weights.dim() != 2 or weights.shape[1] < 2:
        raise ValueError(f"weights must be [N, T] with T >= 2, got {tuple(weights.shape)}.")
    return weights[:, 1:]
