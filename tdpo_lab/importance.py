"""Token weights for the weighted preference losses: TI-DPO's hybrid importance and AttentionPO's attention.

Two ways of saying which response tokens matter, both producing one weight per token, normalised so that
uniform importance gives weight 1 everywhere (then the weighted losses reduce to the unweighted ones):

- :func:`gradient_importance` (TI-DPO, Yang et al., arXiv 2505.19653, Eqs. 5-7 of the ICLR 2026 version):
  the L1 norm of the gradient of the largest last-position logit with respect to each input embedding,
  mixed with a Gaussian prior over the span. Recomputed from the current policy at every step; a constant
  for the loss. METHODS.md section 4. Derived in notebooks/06_ti_dpo.ipynb.
- :func:`attention_weights` (AttentionPO / TwDPO, Huang et al., arXiv 2605.21883): the frozen reference
  model is asked, in plain text, which of two continuations is better; the attention of the last token of
  that question on each continuation's tokens becomes its weights. Computed once per pair. METHODS.md
  section 5. Derived in notebooks/07_attention_po.ipynb.

Both are re-implementations from the papers' descriptions; no code of the official repositories
(gracefulning/TIDPO, HCY123902/AttentionPO) is used.

Grids. A batch row has T input positions; per-token loss tensors have T-1 positions aligned with the shifted
labels: the label at position t-1 is the token at index t (``logits[:, :-1]`` predicts ``labels[:, 1:]``).
:func:`gradient_importance` returns weights on the input grid ``[N, T]``; :func:`shift_to_labels` moves them
to the label grid ``[N, T-1]``. :func:`align_weights` puts AttentionPO's per-response weights directly onto
the label grid of a ``collate_preference_batch`` output.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "JUDGE_TEMPLATE",
    "SINK_MIN_LENGTH",
    "align_weights",
    "attention_weights",
    "attention_to_weights",
    "fix_attention_sink",
    "gaussian_prior",
    "gradient_importance",
    "gradient_saliency",
    "hybrid_weights",
    "judge_text",
    "shift_to_labels",
]

# The AttentionPO judge prompt, adapted to a base language model without a chat template (GPT-2). The
# official prompt (HCY123902/AttentionPO) is an instruction for chat models with tagged answer blocks; this
# is a plain-text adaptation, not a replication. Each slot is filled by :func:`judge_text`, which places a
# text starting with whitespace right after the colon and any other text on the next line, so that every
# response is tokenised in the judge text exactly as on its own (byte-level BPE never merges across the
# colon/whitespace or newline/non-whitespace boundary this creates). The query is the last token ("Answer:").
JUDGE_TEMPLATE = (
    "Here is the opening of a movie review, followed by two possible continuations of it, A and B.\n"
    "Review opening:{prompt}\n"
    "Continuation A:{answer_a}\n"
    "Continuation B:{answer_b}\n"
    "Which continuation is more positive and fluent, A or B? Answer:"
)

# The attention-sink fix is applied only to responses of at least this many tokens (METHODS section 5.5).
SINK_MIN_LENGTH = 5

_SLOTS = ("{prompt}", "{answer_a}", "{answer_b}")
_ASCII_SPACE = " \t\n\r\x0b\x0c"


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (no dropout) and restore each one's own flag afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # Restore per module, not just model.train(flag): a caller may have frozen parts in eval mode.
        for module, flag in modes:
            module.training = flag


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _abbrev(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width // 2] + " ... " + text[-width // 2 :])


# ---------------------------------------------------------------------------------------------------------
# TI-DPO: gradient attribution + Gaussian prior
# ---------------------------------------------------------------------------------------------------------


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
    with _eval_mode(model), torch.enable_grad():
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=attention_mask)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise TypeError("the model's output has no .logits; gradient_saliency needs a causal LM output.")
        return saliency_from_graph(logits, embeds, attention_mask)


def saliency_from_graph(
    logits: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor, *, retain_graph: bool = False
) -> torch.Tensor:
    """TI-DPO attribution from a forward pass already made with ``inputs_embeds=embeds``: ``[N, T]``, no grad.

    The training loop runs the policy once with ``inputs_embeds`` and reads both the loss and the weights off
    that one graph (``retain_graph=True`` keeps it for the loss's backward), which saves TI-DPO a forward
    pass per step. Only ``embeds`` receives this gradient; parameters are untouched. Equal to
    :func:`gradient_saliency` when the model has no dropout.
    """
    n_rows, n_pos = attention_mask.shape
    real = attention_mask.bool()
    positions = torch.arange(n_pos, device=logits.device).expand(n_rows, n_pos)
    # The last real position of each row (works for right or left padding).
    last = torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1).values
    target = logits[torch.arange(n_rows, device=logits.device), last].max(dim=-1).values  # Eq. 5, [N]
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

    W = span-normalised mix of lam * I_norm + (1 - lam) * Gaussian prior (arXiv 2505.19653 Eqs. 5-7; METHODS.md
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


# ---------------------------------------------------------------------------------------------------------
# AttentionPO: attention of a self-judging prompt
# ---------------------------------------------------------------------------------------------------------


def _slot(text: str) -> str:
    # Text starting with whitespace goes right after the colon (":" never merges with whitespace); anything
    # else goes on its own line ("\n" merges only with whitespace). Either way the text's first BPE
    # pre-token starts exactly where the text starts, as when it is tokenised alone.
    return text if text[:1] and text[0] in _ASCII_SPACE else "\n" + text


def judge_text(
    prompt: str, answer_a: str, answer_b: str, *, template: str = JUDGE_TEMPLATE
) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Fill the judge template; return the text and the character spans ``[start, end)`` of both answers.

    The template needs ``{prompt}``, ``{answer_a}`` and ``{answer_b}`` once each, in this order; no other
    braces are interpreted (answers may contain braces). See :data:`JUDGE_TEMPLATE` for how slots are filled.
    """
    where = [template.find(slot) for slot in _SLOTS]
    if any(i < 0 for i in where) or any(template.count(s) != 1 for s in _SLOTS) or where != sorted(where):
        raise ValueError(
            "the judge template must contain {prompt}, {answer_a} and {answer_b} exactly once each, in this "
            f"order; got {_abbrev(template, 120)}."
        )
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    length = 0
    for slot, pos, value in zip(_SLOTS, where, (prompt, answer_a, answer_b), strict=True):
        literal = template[cursor:pos]
        filled = _slot(value) if value else ""
        pieces += [literal, filled]
        length += len(literal)
        start = length + len(filled) - len(value)
        length += len(filled)
        spans.append((start, length))
        cursor = pos + len(slot)
    pieces.append(template[cursor:])
    return "".join(pieces), spans[1], spans[2]


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode_judge(tokenizer, prompt: str, answer_a: str, answer_b: str, template: str, max_len: int | None):
    """Tokenise the judge text; drop prompt tokens from the left until it fits ``max_len``."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    drop = 0
    while True:
        kept = tokenizer.decode(p_ids[drop:], clean_up_tokenization_spaces=False) if drop else prompt
        text, span_a, span_b = judge_text(kept, answer_a, answer_b, template=template)
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        n_tokens = len(enc["input_ids"])
        if max_len is None or n_tokens <= max_len:
            if drop:
                warnings.warn(
                    f"judge text longer than the model's {max_len} positions: dropped the first {drop} prompt "
                    "tokens (the responses are kept whole).",
                    stacklevel=3,
                )
            return text, span_a, span_b, enc
        if drop >= len(p_ids):
            raise ValueError(
                f"the judge text needs {n_tokens} tokens even with the whole prompt removed, more than the judge "
                f"model's {max_len} positions: shorten the responses (max_new_tokens), use a shorter template, "
                "or a judge model with more positions."
            )
        drop = min(len(p_ids), drop + n_tokens - max_len)


def _locate(enc, span: tuple[int, int], expected: list[int], which: str, response: str) -> torch.Tensor:
    """Indices of the judge tokens covering ``span`` (via the offset mapping), checked against ``expected``."""
    start, end = span
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    straddle = [i for i, (a, b) in enumerate(offsets) if a < start < b or a < end < b]
    # A token is inside when its offsets lie within [start, end]. Zero-width offsets come from tokenizers that
    # trim whitespace off offsets (ByteLevel trim_offsets=True): a space-only token then sits at the end of its
    # spaces, so one at start belongs before the span and one in (start, end] inside it. The id comparison
    # below is the real check; this only has to find the candidates.
    inside = [i for i, (a, b) in enumerate(offsets) if start <= a and b <= end and (b > a or a > start)]
    contiguous = inside == list(range(inside[0], inside[-1] + 1)) if inside else False
    got = [ids[i] for i in inside]
    if straddle or not contiguous or got != expected:
        raise ValueError(
            f"cannot locate the {which} response {_abbrev(response)} in the judge text: its judge tokens {got} "
            f"differ from tokenizer(response, add_special_tokens=False) = {expected}"
            + (" (a token crosses the response boundary)" if straddle else "")
            + ". AttentionPO weights must map one-to-one onto the training tokens; use a GPT-2-style byte-level "
            "BPE tokenizer without add_prefix_space (the judge template relies on its pre-tokenisation), or "
            "drop this pair."
        )
    return torch.tensor(inside, dtype=torch.long)


def _last_token_attention(
    judge_model: torch.nn.Module, input_ids: list[int], layer: int, layer_mean: bool
) -> torch.Tensor:
    """Head-averaged attention row of the last token: ``[L]`` (float64, CPU)."""
    device = _model_device(judge_model)
    with _eval_mode(judge_model), torch.no_grad():
        out = judge_model(input_ids=torch.tensor([input_ids], device=device), output_attentions=True)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError(
            "the judge model returned no attention weights: load it with attn_implementation='eager' "
            "(tdpo_lab.models.load_model(name, attn_implementation='eager')); SDPA/flash attention do not "
            "return them."
        )
    n_layers = len(attentions)
    if layer_mean:
        rows = torch.stack([a[0, :, -1, :].double() for a in attentions]).mean(dim=0)  # [H, L]
    else:
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer={layer} is out of range for a judge with {n_layers} layers.")
        rows = attentions[layer][0, :, -1, :].double()  # [H, L]
    return rows.mean(dim=0).cpu()


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    total = scores.sum()
    if total > 0:
        return scores / total
    return torch.full_like(scores, 1.0 / scores.numel())


def fix_attention_sink(weights: torch.Tensor, *, min_length: int = SINK_MIN_LENGTH) -> torch.Tensor:
    """Attention-sink fix: the first token's weight becomes the mean weight; the rest keep the total.

    For ``n >= min_length``: w_1' = (sum w) / n and w_j' = w_j * (sum w - w_1') / (sum_{j>1} w_j) for j > 1
    (uniform over j > 1 if those are all 0), so sum w' = sum w. Shorter inputs are returned unchanged.
    METHODS.md section 5, step 5. ``weights``: ``[n]``, non-negative.
    """
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D [n], got {tuple(weights.shape)}.")
    n = weights.numel()
    if n < min_length:
        return weights.clone()
    total = weights.sum()
    first = total / n
    rest = weights[1:]
    rest_sum = rest.sum()
    if rest_sum > 0:
        rest = rest * ((total - first) / rest_sum)
    else:
        rest = torch.full_like(rest, (total - first).item() / (n - 1))
    return torch.cat([first.reshape(1), rest])


def attention_to_weights(
    scores_first: torch.Tensor, scores_second: torch.Tensor, *, fix_sink: bool = True
) -> torch.Tensor:
    """One response's weights from its attention scores in the two judge orders; they sum to n.

    Each order's scores are normalised to sum 1 (uniform if they sum to 0), the two are averaged, the sink
    fix is applied (:func:`fix_attention_sink`, if ``fix_sink``), and the result is scaled to sum n (mean 1).
    METHODS.md section 5, steps 4-6. Inputs ``[n]`` each; returns ``[n]`` float64.
    """
    a = torch.as_tensor(scores_first, dtype=torch.float64)
    b = torch.as_tensor(scores_second, dtype=torch.float64)
    if a.dim() != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"scores must be two non-empty [n] tensors of equal length, got {tuple(a.shape)}, {tuple(b.shape)}."
        )
    if bool((a < 0).any() | (b < 0).any()) or not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise ValueError("attention scores must be finite and non-negative.")
    w = (_normalise(a) + _normalise(b)) / 2
    if fix_sink:
        w = fix_attention_sink(w)
    return w * (w.numel() / w.sum())


def attention_weights(
    judge_model: torch.nn.Module,
    tokenizer,
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    layer: int = -1,
    fix_sink: bool = True,
    layer_mean: bool = False,
    template: str = JUDGE_TEMPLATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionPO token weights of the chosen and the rejected response (METHODS.md section 5).

    Two forward passes of the judge text (:data:`JUDGE_TEMPLATE`): A = chosen, B = rejected, then swapped.
    In each, the query is the last token of the judge text; its attention row is taken from layer ``layer``
    (or averaged over all layers with ``layer_mean``), averaged over heads, and read at each response's
    tokens, located through the tokenizer's offset mapping from the known character spans of the responses.
    Per response: :func:`attention_to_weights` (normalise each order, average, sink fix, scale to sum n).

    The judge tokens of each response must equal ``tokenizer(response, add_special_tokens=False)`` (the
    training tokenisation); this is verified and a mismatch raises ``ValueError`` naming the response. A
    judge text longer than the model's positions has its prompt truncated from the left (with a warning);
    the responses are never truncated (``ValueError`` if they alone do not fit). The judge model must return
    attentions: load it with ``attn_implementation="eager"``.

    Args:
        judge_model: frozen causal LM (pi_ref); run without gradient in eval mode (its mode is restored).
        tokenizer: fast tokenizer (offset mappings).
        prompt, chosen, rejected: texts; responses must be non-empty.
        layer: which layer's attention (-1 = last).
        fix_sink: apply the attention-sink fix (responses of >= 5 tokens).
        layer_mean: average the attention over all layers instead of ``layer``.
        template: judge template (see :func:`judge_text`).

    Returns:
        ``(w_chosen, w_rejected)``: 1-D float32 tensors (CPU), one weight per token of the response's own
        tokenisation, each summing to its length.

    Derived in notebooks/07_attention_po.ipynb.
    """
    for which, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text:
            raise ValueError(
                f"the {which} response is empty (or not a string): AttentionPO needs >= 1 token."
            )
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "attention_weights needs a fast tokenizer (offset mappings); load a PreTrainedTokenizerFast."
        )
    expected = {
        name: tokenizer(text, add_special_tokens=False)["input_ids"]
        for name, text in (("chosen", chosen), ("rejected", rejected))
    }
    for name, ids in expected.items():
        if not ids:
            raise ValueError(
                f"the {name} response {_abbrev(chosen if name == 'chosen' else rejected)} has no tokens."
            )
    max_len = _max_positions(judge_model)

    scores: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for first, second in (("chosen", "rejected"), ("rejected", "chosen")):
        texts = {"chosen": chosen, "rejected": rejected}
        _, span_a, span_b, enc = _encode_judge(
            tokenizer, prompt, texts[first], texts[second], template, max_len
        )
        idx_a = _locate(enc, span_a, expected[first], first, texts[first])
        idx_b = _locate(enc, span_b, expected[second], second, texts[second])
        row = _last_token_attention(judge_model, list(enc["input_ids"]), layer, layer_mean)
        scores[first].append(row[idx_a])
        scores[second].append(row[idx_b])

    w_chosen = attention_to_weights(*scores["chosen"], fix_sink=fix_sink)
    w_rejected = attention_to_weights(*scores["rejected"], fix_sink=fix_sink)
    return w_chosen.float(), w_rejected.float()


def align_weights(batch: dict, chosen_weights: Sequence, rejected_weights: Sequence) -> torch.Tensor:
    """Put per-response weights onto the shifted label grid of a ``collate_preference_batch`` output.

    Row i < B takes ``chosen_weights[i]``, row B + i takes ``rejected_weights[i]``. With p = prompt length and
    r = response length (response tokens plus the appended EOS), response token j sits at input index p + j
    and its weight goes to label position p + j - 1; the EOS (index p + r - 1) gets weight 1; prompt and
    padding get 0. Each weight vector must have r - 1 entries (one per token of the response's own
    tokenisation). With all-ones weights the result equals ``(labels[:, 1:] != -100).float()``.

    Args:
        batch: dict with ``input_ids``, ``labels`` ``[2B, T]``, ``prompt_lengths``, ``response_lengths`` ``[2B]``.
        chosen_weights, rejected_weights: B sequences (tensors or lists) of weights each.

    Returns:
        ``[2B, T-1]`` float32 tensor on the device of ``batch["labels"]``.
    """
    missing = [k for k in ("input_ids", "labels", "prompt_lengths", "response_lengths") if k not in batch]
    if missing:
        raise KeyError(f"align_weights needs a collate_preference_batch output; the batch lacks {missing}.")
    labels = batch["labels"]
    n_rows, n_pos = labels.shape
    n_pairs = n_rows // 2
    if n_rows % 2 or len(chosen_weights) != n_pairs or len(rejected_weights) != n_pairs:
        raise ValueError(
            f"the batch has {n_rows} rows (B = {n_rows / 2} pairs) but got {len(chosen_weights)} chosen and "
            f"{len(rejected_weights)} rejected weight vectors; pass one per pair, in batch order."
        )
    prompt_lengths = batch["prompt_lengths"].tolist()
    response_lengths = batch["response_lengths"].tolist()
    full = torch.zeros(n_rows, n_pos, dtype=torch.float32)
    for i in range(n_rows):
        which, k = ("chosen", i) if i < n_pairs else ("rejected", i - n_pairs)
        w = torch.as_tensor((chosen_weights if i < n_pairs else rejected_weights)[k], dtype=torch.float32)
        p, r = int(prompt_lengths[i]), int(response_lengths[i])
        if w.dim() != 1 or w.numel() != r - 1:
            raise ValueError(
                f"{which} weights of pair {k} (batch row {i}) have shape {tuple(w.shape)} but the response has "
                f"{r - 1} tokens (+1 EOS) in the batch; the weights must come from the same text, tokenised on "
                "its own, and the batch must not truncate responses (max_length)."
            )
        if p < 1 or p + r > n_pos:
            raise ValueError(
                f"batch row {i}: prompt length {p} and response length {r} do not fit T = {n_pos} (the prompt "
                "needs at least one token so that the first response token has a label position)."
            )
        full[i, p : p + r - 1] = w
        full[i, p + r - 1] = 1.0  # the appended EOS is trained with weight 1
    out = full[:, 1:]
    # The rows written must be exactly the label mask; anything else means the batch layout is not the kit's.
    written = torch.zeros(n_rows, n_pos, dtype=torch.bool)
    for i in range(n_rows):
        written[i, prompt_lengths[i] : prompt_lengths[i] + response_lengths[i]] = True
    if not torch.equal(written[:, 1:], (labels[:, 1:] != -100).cpu()):
        raise ValueError(
            "prompt_lengths/response_lengths do not match the labels' response positions (labels != -100); "
            "pass the batch exactly as collate_preference_batch returns it."
        )
    return out.to(labels.device)
