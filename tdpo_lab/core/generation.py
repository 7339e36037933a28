"""Sampling continuations from a causal LM: the one place the kit calls ``model.generate``.

Used for the preference pairs (samples from pi_ref), the TI-DPO triplet anchors and the evaluation
(samples from pi_theta). Two engines draw from the same distribution with the same seeding rules:

- :func:`sample` / :func:`sample_ids` call ``model.generate`` (pairs, evaluation);
- :func:`sample_fast` / :func:`sample_ids_fast` run a hand-written KV-cache loop (the TI-DPO anchor, drawn
  at every training step): one forward per new token (:mod:`tdpo_lab.core.kv_steps`: GPT-2's written out, other
  models through their own forward), then :func:`draw_tokens`, which filters and draws among the top-k
  candidates only. ``generate`` sorts the whole vocabulary for top-p and draws over all of it
  (``torch.multinomial`` makes one exponential variate per entry), about 2 ms per token on the tiny profile
  on top of its own bookkeeping; the loop takes about 2x less time per anchor (benchmarks/README.md).

Three things matter for the experiment and are handled here once:

- **Pure sampling means pure.** ``top_k=0`` and ``top_p=1.0`` are passed to ``generate`` explicitly.
  Without that, transformers fills an unset ``top_k`` with its global default 50
  (``GenerationConfig._get_default_generation_params`` in transformers 5.x), and the samples would no
  longer come from pi_theta: the KL estimate on them is then meaningless (docs/methods.md section 6).
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

from tdpo_lab.core.kv_steps import cached_steps
from tdpo_lab.core.sampling import draw_tokens as draw_tokens
from tdpo_lab.core.sampling import filter_logits as filter_logits
from tdpo_lab.core.utils import progress_off, stable_hash

__all__ = [
    "draw_tokens",
    "encode_prompts",
    "filter_logits",
    "sample",
    "sample_fast",
    "sample_ids",
    "sample_ids_fast",
]


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
    return _sample_rows(
        _generate_batch, model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_k, top_p,
        batch_size, seed, progress,
    )  # fmt: skip


def sample_ids_fast(
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
    """:func:`sample_ids` with the KV-cache loop instead of ``generate``: same arguments, result, seeding.

    Each batch of ``B`` left-padded rows ``[B, P]`` is run once through the model, then one ``[B, 1]``
    forward per new token reuses the cached keys and values (:func:`tdpo_lab.core.kv_steps.cached_steps`); tokens
    come from :func:`draw_tokens`. A row
    that has drawn EOS is fed EOS from then on and its later draws are discarded (rows never interact), and
    the loop stops once every row has drawn EOS. The law is that of :func:`sample_ids`, the draws are not:
    the same seed gives other samples than ``generate`` (the random numbers are laid out differently).
    """
    return _sample_rows(
        _cached_batch, model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_k, top_p,
        batch_size, seed, progress,
    )  # fmt: skip


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
    ids = _sample_rows(
        _generate_batch, model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_k, top_p,
        batch_size, seed, progress,
    )  # fmt: skip
    return _decode_all(tokenizer, ids)


def sample_fast(
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
    """:func:`sample` drawn with the KV-cache loop of :func:`sample_ids_fast`: texts ``[prompt][sample]``.

    >>> anchors = sample_fast(policy, tok, prompts, num_samples=1, max_new_tokens=32)  # doctest: +SKIP
    """
    ids = _sample_rows(
        _cached_batch, model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_k, top_p,
        batch_size, seed, progress,
    )  # fmt: skip
    return _decode_all(tokenizer, ids)


def decode_response(tokenizer, tokens: Sequence[int], eos_token_id: int | None = None) -> str:
    """Text of a sampled response: tokens before the first EOS, special tokens skipped."""
    eos = _eos_id(tokenizer) if eos_token_id is None else eos_token_id
    tokens = list(tokens)
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --- helpers ------------------------------------------------------------------------------------


@torch.no_grad()
def _sample_rows(
    draw, model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_k, top_p, batch_size, seed,
    progress,
) -> list[list[list[int]]]:  # fmt: skip
    """Shared driver of both engines: checks, batching, seeding, eval mode; ``draw`` fills one batch.

    ``draw(model, input_ids [B, P], attention_mask [B, P], max_new_tokens, temperature, top_k, top_p, eos)``
    returns the new tokens ``[B, n]`` (n <= max_new_tokens), anything after a row's first EOS being padding.
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
            for index, batch in enumerate(
                tqdm(batches, desc="sampling", disable=progress_off(progress), leave=None)
            ):
                input_ids, attention_mask = _left_pad([ids for _, ids in batch], eos, device)
                torch.manual_seed(_batch_seed(seed, index))
                new = draw(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos)
                for (prompt_index, _), tokens in zip(batch, new.tolist(), strict=True):
                    results[prompt_index].append(_cut_after_eos(tokens, eos))
    finally:
        model.train(was_training)
    return results


def _generate_batch(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos):
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
    return out[:, input_ids.shape[1] :]


def _cached_batch(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, eos):
    """The KV-cache loop of :func:`sample_ids_fast` on one left-padded batch ``[B, P]``: tokens ``[B, n]``."""
    rows, width = input_ids.shape
    # Left padding: positions count real tokens only, as generate derives them (the padding's own positions
    # are never attended to, 0 is as good as any). Passed explicitly: the model alone would number columns.
    positions = (attention_mask.cumsum(dim=-1) - 1).clamp_min(0)
    mask = attention_mask.new_ones((rows, width + max_new_tokens))  # step s sees the first width + s columns
    mask[:, :width] = attention_mask
    forward = cached_steps(model, mask)  # (ids [B, n], positions [B, n]) -> next-token logits [B, V]
    step_ids = input_ids
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, device=input_ids.device)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        token = draw_tokens(forward(step_ids, positions), temperature, top_k, top_p)  # [B]
        # A finished row keeps being fed EOS (its draw is discarded); the draw itself still happens, so the
        # random stream of the other rows does not depend on when a row ended.
        token = torch.where(done, eos_t, token)
        new.append(token)
        done |= token == eos
        if bool(done.all()):
            break
        step_ids = token[:, None]
        positions = positions[:, -1:] + 1
    return torch.stack(new, dim=1)


def _decode_all(tokenizer, ids: list[list[list[int]]]) -> list[list[str]]:
    eos = _eos_id(tokenizer)
    return [[decode_response(tokenizer, tokens, eos) for tokens in per_prompt] for per_prompt in ids]


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
