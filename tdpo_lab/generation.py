"""Sampling continuations from a causal LM: the one place the kit calls ``model.generate``.

Used for the preference pairs (samples from pi_ref), the TI-DPO triplet anchors and the evaluation
(samples from pi_theta). Three things matter for the experiment and are handled here once:

- **Pure sampling means pure.** ``top_k=0`` and ``top_p=1.0`` are passed to ``generate`` explicitly.
  Without that, transformers fills an unset ``top_k`` with its global default 50
  (``GenerationConfig._get_default_generation_params`` in transformers 5.x), and the samples would no
  longer come from pi_theta: the KL estimate on them is then meaningless (METHODS section 6).
- **Left padding.** A batch of prompts of different lengths is padded on the left so that every row's new
  tokens start at the same column; ``generate`` derives the position ids from the attention mask.
  The padding is built here from the token ids, so the tokenizer (its ``padding_side`` included) is never
  modified, not even temporarily.
- **Reproducibility.** Before each batch the torch RNG is seeded from ``(seed, batch index)``, inside
  ``torch.random.fork_rng`` so the caller's random stream is left exactly as it was (a training loop that
  evaluates mid-run therefore stays reproducible). The same ``seed`` and ``batch_size`` give the same samples.

Prompts are tokenised with ``add_special_tokens=False`` (the kit's convention everywhere). A prompt that
tokenises to zero tokens (the empty string) gets EOS prepended as a BOS token: GPT-2 was trained with
``<|endoftext|>`` separating documents, so it is the natural "start of text" context, and ``generate``
cannot start from nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from tdpo_lab.utils import progress_off, stable_hash

__all__ = ["encode_prompts", "sample", "sample_ids"]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, ``add_special_tokens=False``; an empty prompt becomes ``[eos]`` (BOS).

    This is exactly the context :func:`sample_ids` conditions on, so callers that score the samples
    afterwards (evaluation) rebuild the same ``prompt ids + response ids`` rows from it.
    """
    _check_prompts(prompts)
    eos = _eos_id(tokenizer)
    if len(prompts) == 0:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    # Empty prompt: generate needs at least one context token; EOS doubles as GPT-2's BOS.
    return [list(ids) if len(ids) > 0 else [eos] for ids in encoded]


@torch.no_grad()
def sample_ids(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[list[list[int]]]:
    """Sample ``num_samples`` continuations per prompt and return their token ids.

    Result ``ids[i][j]`` is the list of new token ids of sample ``j`` of prompt ``i``: the tokens the model
    chose, up to and including the first EOS when one was sampled (the EOS is an action of the policy and
    its position counts in a sequence KL), at most ``max_new_tokens`` long, never empty.

    Rows are the prompts repeated ``num_samples`` times (prompt-major), cut into batches of ``batch_size``
    rows; the RNG is seeded per batch from ``(seed, batch index)``, so results depend on ``seed`` and
    ``batch_size`` and on nothing else. ``top_k=0`` and ``top_p=1.0`` mean no truncation: with
    ``temperature=1`` each token is drawn from pi(. | s_t) exactly.
    """
    _check_prompts(prompts)
    _check_sampling(num_samples, max_new_tokens, temperature, top_k, top_p, batch_size)
    eos = _eos_id(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    longest = max((len(ids) for ids in prompt_ids), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt has {longest} tokens and max_new_tokens={max_new_tokens}: together more than "
            f"the model's {limit} positions; shorten the prompts or lower max_new_tokens"
        )
    if not prompt_ids:
        return []

    rows = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(num_samples)]
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    device = next(model.parameters()).device
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()
    # fork_rng restores the caller's CPU (and this CUDA device's) RNG state when the block ends.
    fork_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    try:
        with torch.random.fork_rng(devices=fork_devices):
            for index, batch in enumerate(tqdm(batches, desc="sampling", disable=progress_off(progress))):
                input_ids, attention_mask = _left_pad([ids for _, ids in batch], eos, device)
                torch.manual_seed(_batch_seed(seed, index))
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    max_new_tokens=max_new_tokens,
                    # Every knob that changes the sampling distribution is passed explicitly, so neither
                    # transformers' global defaults (top_k=50) nor a checkpoint's generation_config apply.
                    temperature=float(temperature),
                    top_k=int(top_k),
                    top_p=float(top_p),
                    typical_p=1.0,
                    min_new_tokens=0,
                    repetition_penalty=1.0,
                    no_repeat_ngram_size=0,
                    num_beams=1,
                    num_return_sequences=1,
                    pad_token_id=eos,
                    eos_token_id=eos,
                )
                new = out[:, input_ids.shape[1] :].tolist()
                for (prompt_index, _), tokens in zip(batch, new, strict=True):
                    results[prompt_index].append(_cut_after_eos(tokens, eos))
    finally:
        model.train(was_training)
    return results


def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[list[str]]:
    """Sample ``num_samples`` continuations per prompt; return their texts (prompt excluded).

    ``texts[i][j]`` is sample ``j`` of prompt ``i``: the new tokens of :func:`sample_ids` cut at the first EOS
    and decoded with ``skip_special_tokens=True`` (no space clean-up, so ``prompt + text`` is what the model
    wrote). Same arguments and reproducibility as :func:`sample_ids`; pure sampling by default.

    >>> texts = sample(model, tok, ["This movie"], num_samples=4, max_new_tokens=48)  # doctest: +SKIP
    """
    ids = sample_ids(
        model,
        tokenizer,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    eos = _eos_id(tokenizer)
    return [[decode_response(tokenizer, tokens, eos) for tokens in per_prompt] for per_prompt in ids]


def decode_response(tokenizer, tokens: Sequence[int], eos_token_id: int | None = None) -> str:
    """Text of a sampled response: tokens before the first EOS, special tokens skipped."""
    eos = _eos_id(tokenizer) if eos_token_id is None else eos_token_id
    tokens = list(tokens)
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --- helpers ------------------------------------------------------------------------------------


def _batch_seed(seed: int, index: int) -> int:
    # A hash rather than seed + index: neighbouring seeds must not share batches (seed 0 batch 1 vs seed 1 batch 0).
    return int(stable_hash(["sample", int(seed), int(index)]), 16) % (2**63)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to one length: ``input_ids``, ``attention_mask`` both ``[B, P]``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_after_eos(tokens: list[int], eos: int) -> list[int]:
    # generate pads finished rows with pad = eos; everything after the first EOS is padding.
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token_id; the kit uses EOS to end responses and as padding: "
            "set tokenizer.eos_token (GPT-2: '<|endoftext|>')"
        )
    return int(eos)


def _check_prompts(prompts) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; wrap it: [prompt]")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(
            f"prompts must all be strings; got {bad[0]} (convert with str() or drop missing values)"
        )


def _check_sampling(num_samples, max_new_tokens, temperature, top_k, top_p, batch_size) -> None:
    checks = [
        (isinstance(num_samples, int) and num_samples >= 1, "num_samples", "an int >= 1", num_samples),
        (
            isinstance(max_new_tokens, int) and max_new_tokens >= 1,
            "max_new_tokens",
            "an int >= 1",
            max_new_tokens,
        ),
        (temperature > 0, "temperature", "> 0 (1.0 = the model's own distribution)", temperature),
        (isinstance(top_k, int) and top_k >= 0, "top_k", "an int >= 0 (0 = no top-k truncation)", top_k),
        (0 < top_p <= 1, "top_p", "in (0, 1] (1.0 = no nucleus truncation)", top_p),
        (isinstance(batch_size, int) and batch_size >= 1, "batch_size", "an int >= 1", batch_size),
    ]
    for ok, name, what, value in checks:
        if not ok:
            raise ValueError(f"{name} must be {what}, got {value!r}")
