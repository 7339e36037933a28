"""AttentionPO's judge weights (TwDPO, Huang et al., "Token-weighted Direct Preference Optimization with
Attention", arXiv 2605.21883).

The frozen reference model is asked which of two continuations is better (in plain text, or through its own
chat template when it has one: :mod:`tdpo_lab.methods.attnpo_prompt`); the attention of the last token of that
question on each continuation's tokens becomes its weights (:func:`attention_weights`), with the attention-sink
fix (:func:`fix_attention_sink`). Computed once per pair before training.
Normalised so that uniform attention gives weight 1 everywhere (the loss then reduces to DPO's).
docs/methods.md section 5. Derived in notebooks/07_attention_po.ipynb.

A re-implementation from the paper's description; no code of the official repository is used.
:func:`align_weights` puts the per-response weights onto the label grid ``[N, T-1]`` of a
``collate_preference_batch`` output.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from tdpo_lab.core.logprobs import IGNORE_INDEX
from tdpo_lab.methods._common import abbrev, eval_mode, model_device
from tdpo_lab.methods.attnpo_prompt import CHAT_JUDGE_TEMPLATE, JUDGE_TEMPLATE, judge_prompt, judge_text

__all__ = [
    "CHAT_JUDGE_TEMPLATE",
    "JUDGE_KEY",
    "JUDGE_TEMPLATE",
    "SINK_MIN_LENGTH",
    "align_weights",
    "attention_to_weights",
    "attention_weights",
    "fix_attention_sink",
    "judge_text",
]

# The attention-sink fix is applied only to responses of at least this many tokens (docs/methods.md section 5.5).
SINK_MIN_LENGTH = 5

# What the judge weights depend on besides the pairs and the judge knobs: both judge texts (which one is used
# follows from the tokenizer, itself part of the pairs' key upstream) and the sink threshold. The pipeline's
# "judge" stage key covers it, so a change of either template builds new weights.
JUDGE_KEY = (JUDGE_TEMPLATE, CHAT_JUDGE_TEMPLATE, SINK_MIN_LENGTH)


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode_judge(
    tokenizer, prompt: str, answer_a: str, answer_b: str, template: str | None, chat: bool | None, max_len
):
    """Tokenise the judge text (:func:`judge_prompt`); drop prompt tokens from the left until it fits ``max_len``."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    drop = 0
    while True:
        kept = tokenizer.decode(p_ids[drop:], clean_up_tokenization_spaces=False) if drop else prompt
        text, span_a, span_b, special = judge_prompt(
            tokenizer, kept, answer_a, answer_b, template=template, chat=chat
        )
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
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
            f"cannot locate the {which} response {abbrev(response)} in the judge text: its judge tokens {got} "
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
    device = model_device(judge_model)
    with eval_mode(judge_model), torch.no_grad():
        out = judge_model(input_ids=torch.tensor([input_ids], device=device), output_attentions=True)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError(
            "the judge model returned no attention weights: load it with attn_implementation='eager' "
            "(tdpo_lab.core.models.load_model(name, attn_implementation='eager')); SDPA/flash attention do not "
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
    docs/methods.md section 5, step 5. ``weights``: ``[n]``, non-negative.
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
    docs/methods.md section 5, steps 4-6. Inputs ``[n]`` each; returns ``[n]`` float64.
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
    template: str | None = None,
    chat: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionPO token weights of the chosen and the rejected response (docs/methods.md section 5).

    Two forward passes of the judge text: A = chosen, B = rejected, then swapped. The text is
    :data:`JUDGE_TEMPLATE` in plain text, or, for a tokenizer with a chat template, :data:`CHAT_JUDGE_TEMPLATE`
    as the user turn of that template followed by the assistant's generation prompt (the model judges itself,
    as the paper intends; :func:`~tdpo_lab.methods.attnpo_prompt.judge_prompt`). In each, the query is the last
    token of the judge text; its attention row is taken from layer ``layer``
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
        template: judge template (see :func:`judge_text`); ``None`` = the default of the form used.
        chat: ``None`` = through the chat template when the tokenizer has one; ``True``/``False`` force it.

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
                f"the {name} response {abbrev(chosen if name == 'chosen' else rejected)} has no tokens."
            )
    max_len = _max_positions(judge_model)

    scores: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for first, second in (("chosen", "rejected"), ("rejected", "chosen")):
        texts = {"chosen": chosen, "rejected": rejected}
        _, span_a, span_b, enc = _encode_judge(
            tokenizer, prompt, texts[first], texts[second], template, chat, max_len
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
    if not torch.equal(written[:, 1:], (labels[:, 1:] != IGNORE_INDEX).cpu()):
        raise ValueError(
            "prompt_lengths/response_lengths do not match the labels' response positions (labels != -100); "
            "pass the batch exactly as collate_preference_batch returns it."
        )
    return out.to(labels.device)
