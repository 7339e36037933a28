"""Evaluation of a policy on held-out prompts: reward, KL to the reference, diversity (docs/methods.md section 6).

One evaluation point of the reward-vs-KL frontier:

- M samples per held-out prefix from pi_theta with **pure sampling** (temperature 1, no top-k, no top-p):
  the KL below is an expectation under pi_theta, so the samples must come from pi_theta itself.
- ``reward``: mean ground-truth reward ``reward.score(prompt + continuation)`` (the classifier reads the
  whole text), with ``reward_stderr``.
- ``kl_seq``: the exact sequence KL on those samples, summed over response positions t,

      KL_seq(y) = sum_t KL(pi_theta(.|s_t) || pi_ref(.|s_t)),   s_t = (x, y_<t),

  whose mean over y ~ pi_theta is KL(pi_theta(.|x) || pi_ref(.|x)) (chain rule), with lower variance than
  ``kl_logratio`` = mean of sum_t [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)], the plain Monte-Carlo
  estimate of the same quantity (reported beside it). Note the direction: this is KL(pi_theta || pi_ref),
  the one the RL objective penalises; TDPO's SeqKL (below and in :mod:`tdpo_lab.core.logprobs`) is the other.
- ``entropy``: mean per-token entropy H(pi_theta(.|s_t)) over all sampled response positions;
  ``distinct2``/``distinct4``: unique n-grams / total n-grams over all samples' tokens.
- With held-out pairs: ``kl_seq_chosen``/``kl_seq_rejected`` = mean TDPO SeqKL(x, y) =
  sum_t KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the response positions of y (docs/methods.md section 1).

Response positions include the EOS when the policy sampled it (ending the text is one of its actions);
a sample cut at ``max_new_tokens`` has no EOS. Derived in notebooks/04_dpo_baseline.ipynb (reward and KL);
the frontier of these points is drawn in notebooks/08_frontier_and_results.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tdpo_lab.core.data import collate_ids, collate_preference_batch
from tdpo_lab.core.eval_summary import (
    aggregate_samples,
    check_pairs,
    check_reward,
    distinct_n,
    per_prompt_values,
    rounded,
    score,
)
from tdpo_lab.core.generation import decode_response, encode_prompts, sample, sample_ids
from tdpo_lab.core.logprobs import token_stats
from tdpo_lab.core.utils import eval_mode, progress_off

__all__ = [
    "aggregate_samples",
    "distinct_n",
    "evaluate_policy",
    "evaluate_samples",
    "pair_seqkl",
    "per_prompt_values",
    "response_stats",
]


# --- per-position statistics -------------------------------------------------------------------


@torch.no_grad()
def response_stats(
    policy,
    reference,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Per-row sums over response positions of the exact per-position statistics; no gradient.

    Inputs ``[N, T]`` (right-padded; ``labels`` = ``input_ids`` with prompt and padding -100). With the
    kit's shift (``logits[:, :-1]`` predicts ``labels[:, 1:]``), p = pi_theta(.|s_t), q = pi_ref(.|s_t)
    computed as ``log_softmax`` in fp32, ``chunk_size`` response positions at a time (so at most a few
    ``[chunk_size, V]`` fp32 tensors exist beside the models' logits). Returns ``[N]`` float64 CPU tensors:

    - ``logratio``: sum_t log p(y_t) - log q(y_t)
    - ``kl_policy_ref``: sum_t KL(p || q) = sum_t sum_v p(v) (log p(v) - log q(v))   (evaluation KL)
    - ``entropy``: sum_t H(p) = -sum_t sum_v p(v) log p(v)
    - ``n_tokens``: number of response positions

    Identical models give exactly 0 for the KL and the log-ratio (the same floats are subtracted). TDPO's
    SeqKL, the other direction, comes from :func:`tdpo_lab.core.logprobs.token_stats` (see :func:`pair_seqkl`).
    """
    if not (input_ids.shape == attention_mask.shape == labels.shape) or input_ids.dim() != 2:
        raise ValueError(
            "input_ids, attention_mask and labels must all be [N, T] with the same shape; got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_rows = input_ids.shape[0]
    mask = labels[:, 1:] != -100
    rows = mask.nonzero()[:, 0].cpu()
    targets = labels[:, 1:][mask]
    # Keep only the response positions of each model's logits: [P, V] instead of [N, T, V].
    pol = _model_logits(policy, input_ids, attention_mask)[:, :-1][mask.to(_device(policy))]
    ref = _model_logits(reference, input_ids, attention_mask)[:, :-1][mask.to(_device(reference))]
    ref = ref.to(pol.device)
    targets = targets.to(pol.device)

    per_position = {k: [] for k in ("logratio", "kl_policy_ref", "entropy")}
    for start in range(0, pol.shape[0], chunk_size):
        logp = F.log_softmax(pol[start : start + chunk_size].float(), dim=-1)
        logq = F.log_softmax(ref[start : start + chunk_size].float(), dim=-1)
        tgt = targets[start : start + chunk_size, None]
        p = logp.exp()
        # where(p > 0): a probability that underflowed to 0 contributes 0, never 0 * inf = NaN.
        per_position["kl_policy_ref"].append(torch.where(p > 0, p * (logp - logq), 0.0).sum(-1))
        per_position["entropy"].append(torch.where(p > 0, -p * logp, 0.0).sum(-1))
        per_position["logratio"].append((logp.gather(-1, tgt) - logq.gather(-1, tgt)).squeeze(-1))

    out = {}
    for key, parts in per_position.items():
        values = torch.cat(parts).double().cpu() if parts else torch.zeros(0, dtype=torch.float64)
        out[key] = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, values)
    out["n_tokens"] = mask.sum(1).cpu()
    return out


# --- samples from the policy -------------------------------------------------------------------


@torch.no_grad()
def evaluate_samples(
    policy,
    reference,
    tokenizer,
    reward,
    prompts: Sequence[str],
    cfg,
    *,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Sample ``cfg.eval_samples`` continuations per prompt from ``policy`` (pure sampling) and score each.

    One row per sample (prompt-major), columns: ``prompt_id``, ``sample_id``, ``prompt``, ``continuation``
    (text, EOS cut), ``token_ids`` (response ids without the EOS), ``ended`` (EOS sampled), ``n_tokens``
    (scored positions = len(token_ids) + ended), ``reward``, ``kl_seq`` (exact sum_t KL(pi_theta || pi_ref)),
    ``kl_logratio`` (sum_t log-ratio), ``entropy_sum`` (sum_t H(pi_theta(.|s_t))), ``entropy`` (its mean).

    Samples come from :func:`tdpo_lab.core.generation.sample_ids` with temperature 1, top_k 0, top_p 1,
    ``cfg.eval_max_new_tokens`` new tokens, batches of ``cfg.sample_batch_size`` and ``seed``; so
    ``sample(policy, ..., seed=seed, batch_size=cfg.sample_batch_size)`` yields the same texts.
    Both models are put in eval mode and restored to their previous mode afterwards.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_samples needs at least one prompt; pass the held-out prefixes")
    check_reward(reward)
    eos = tokenizer.eos_token_id
    with eval_mode(policy, reference):
        responses = sample_ids(
            policy,
            tokenizer,
            prompts,
            num_samples=cfg.eval_samples,
            max_new_tokens=cfg.eval_max_new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            batch_size=cfg.sample_batch_size,
            seed=seed,
            progress=progress,
        )
        prompt_ids = encode_prompts(tokenizer, prompts)
        records = []
        for i, (prompt, context, per_prompt) in enumerate(zip(prompts, prompt_ids, responses, strict=True)):
            for j, tokens in enumerate(per_prompt):
                ended = bool(tokens) and tokens[-1] == eos
                records.append(
                    {
                        "prompt_id": i,
                        "sample_id": j,
                        "prompt": prompt,
                        "continuation": decode_response(tokenizer, tokens, eos),
                        "token_ids": tokens[:-1] if ended else list(tokens),
                        "ended": ended,
                        "_context": context,
                        "_response": tokens,
                    }
                )
        texts = [r["prompt"] + r["continuation"] for r in records]
        rewards = score(reward, texts)

        stats = {k: [] for k in ("kl_policy_ref", "logratio", "entropy", "n_tokens")}
        size = cfg.sample_batch_size
        starts = range(0, len(records), size)
        for start in tqdm(starts, desc="scoring samples", disable=progress_off(progress), leave=None):
            chunk = records[start : start + size]
            batch = collate_ids([r["_context"] for r in chunk], [r["_response"] for r in chunk], eos)
            out = response_stats(policy, reference, **batch)
            for key in stats:
                stats[key].append(out[key])

    table = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in records])
    table["n_tokens"] = torch.cat(stats["n_tokens"]).numpy().astype(np.int64)
    table["reward"] = rewards
    table["kl_seq"] = torch.cat(stats["kl_policy_ref"]).numpy()
    table["kl_logratio"] = torch.cat(stats["logratio"]).numpy()
    table["entropy_sum"] = torch.cat(stats["entropy"]).numpy()
    table["entropy"] = table["entropy_sum"] / table["n_tokens"]
    return table


# --- held-out pairs ------------------------------------------------------------------------------


@torch.no_grad()
def pair_seqkl(
    policy,
    reference,
    tokenizer,
    pairs: pd.DataFrame,
    *,
    batch_size: int = 32,
    progress: bool = False,
    beta: float | None = None,
    per_pair: bool = False,
) -> dict:
    """Mean TDPO SeqKL of held-out chosen and rejected responses: ``kl_seq_chosen``, ``kl_seq_rejected``.

    SeqKL(x, y) = sum over the response positions of prompt+y (+EOS) of KL(pi_ref(.|s_t) || pi_theta(.|s_t))
    (docs/methods.md section 1), from :func:`tdpo_lab.core.logprobs.token_stats` (the training losses' own KL), on batches
    of ``batch_size`` pairs collated exactly like the training batches
    (:func:`tdpo_lab.core.data.collate_preference_batch`; responses longer than the model's context are cut). Under DPO
    the rejected side is expected to grow faster than the chosen one (TDPO's claim, docs/methods.md section 6).

    With ``beta``, also the held-out preference numbers of DPO's implicit reward beta * sum_t r_t (r_t the
    log-ratio, unweighted for every method so that runs compare): ``pair_accuracy``, the share of pairs whose
    margin beta * (sum r_t(chosen) - sum r_t(rejected)) is > 0 (a tie counts as wrong, as TRL's
    ``rewards/accuracies``: 0.0 at pi_theta = pi_ref), and ``pair_margin``, the mean margin.

    With ``per_pair``, also each pair's values in row order, for error bars that resample pairs:
    ``kl_seq_chosen_per_pair``, ``kl_seq_rejected_per_pair`` and ``pair_prompt_ids`` (the pair's
    ``prompt_id`` column, else an index of its distinct prompt texts: pairs of one prompt are resampled together);
    values to 6 significant digits.
    """
    check_pairs(pairs)
    chosen, rejected, margins = [], [], []
    with eval_mode(policy, reference):
        starts = range(0, len(pairs), batch_size)
        for start in tqdm(starts, desc="pair SeqKL", disable=progress_off(progress), leave=None):
            rows = pairs.iloc[start : start + batch_size]
            batch = collate_preference_batch(
                tokenizer,
                list(rows["prompt"]),
                list(rows["chosen"]),
                list(rows["rejected"]),
                max_length=_max_positions(policy),
            )
            device = _device(policy)
            policy_logits = _model_logits(policy, batch["input_ids"], batch["attention_mask"])
            ref_logits = _model_logits(reference, batch["input_ids"], batch["attention_mask"])
            stats = token_stats(policy_logits, ref_logits.to(device), batch["labels"].to(device))
            seqkl = stats.kl.double().sum(1).cpu()
            half = len(rows)
            chosen.append(seqkl[:half])
            rejected.append(seqkl[half:])
            ratio = stats.log_ratio.double().sum(1).cpu()  # zero off the response positions
            margins.append(ratio[:half] - ratio[half:])
    result = {
        "kl_seq_chosen": float(torch.cat(chosen).mean()),
        "kl_seq_rejected": float(torch.cat(rejected).mean()),
    }
    if beta is not None:
        margin = beta * torch.cat(margins)
        result["pair_accuracy"] = float((margin > 0).double().mean())
        result["pair_margin"] = float(margin.mean())
    if per_pair:
        if "prompt_id" in pairs.columns:
            prompt_ids = [int(i) for i in pairs["prompt_id"]]
        else:
            prompt_ids = [int(i) for i in pd.factorize(pairs["prompt"])[0]]
        result["kl_seq_chosen_per_pair"] = rounded(torch.cat(chosen))
        result["kl_seq_rejected_per_pair"] = rounded(torch.cat(rejected))
        result["pair_prompt_ids"] = prompt_ids
    return result


# --- the evaluation point ----------------------------------------------------------------------


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    reward,
    prompts: Sequence[str],
    cfg,
    *,
    pairs: pd.DataFrame | None = None,
    seed: int = 0,
    progress: bool = False,
    pair_beta: float | None = None,
    per_prompt: bool = False,
    keep_samples: int = 0,
) -> dict:
    """One point of the reward-vs-KL frontier: a dict of python numbers (JSON-ready, one eval.jsonl line).

    Keys: those of :func:`aggregate_samples` (``reward``, ``reward_stderr``, ``kl_seq``, ``kl_seq_stderr``,
    ``kl_logratio``, ``entropy``, ``distinct2``, ``distinct4``, ``response_tokens``, ``n_samples``,
    ``n_prompts``) on ``cfg.eval_samples`` pure samples per prompt; plus ``kl_seq_chosen`` and
    ``kl_seq_rejected`` (:func:`pair_seqkl`) when ``pairs`` (columns prompt, chosen, rejected; every row is
    used) is given; plus ``reward_topk`` (mean reward of samples with top-k = ``cfg.eval_topk``, a secondary
    number with no KL beside it) when ``cfg.eval_topk > 0``. Batches of ``cfg.sample_batch_size`` rows.

    Evaluating pi_ref against itself gives ``kl_seq == kl_logratio == 0`` exactly. ``progress``: bars for the
    sampling and scoring; they stay when the evaluation stands alone and vanish once done under a training bar.

    Your own pairs (:mod:`tdpo_lab.products.user_pairs`): ``reward=None`` (no reward model) skips the samples and
    reports only the held-out pairs, and ``pair_beta`` adds ``pair_accuracy`` and ``pair_margin``
    (:func:`pair_seqkl`).

    ``per_prompt``: also the per-prompt lists of :func:`per_prompt_values` and the per-pair lists of
    :func:`pair_seqkl` (what the runs log, for the bootstrap of :mod:`tdpo_lab.runs.bootstrap`). ``keep_samples``:
    also ``samples``, the first sample of each of the first that many prompts, as dicts of prompt_id, sample_id, prompt,
    continuation, reward, kl_seq (a run writes them to its ``samples.jsonl``, not to ``eval.jsonl``).
    """
    result = {}
    if reward is not None:
        samples = evaluate_samples(
            policy, reference, tokenizer, reward, prompts, cfg, seed=seed, progress=progress
        )
        result = aggregate_samples(samples)
        if per_prompt:
            result.update(per_prompt_values(samples))
        if keep_samples > 0:
            shown = samples[samples["sample_id"] == 0].head(keep_samples)
            keys = ("prompt_id", "sample_id", "prompt", "continuation", "reward", "kl_seq")
            result["samples"] = [
                {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                for row in shown[list(keys)].to_dict("records")
            ]
    elif pairs is None:
        raise ValueError("nothing to evaluate: no reward model (reward=None) and no held-out pairs")
    if pairs is not None:
        batch_size = max(1, cfg.sample_batch_size // 2)  # two rows (chosen, rejected) per pair
        result.update(
            pair_seqkl(
                policy,
                reference,
                tokenizer,
                pairs,
                batch_size=batch_size,
                progress=progress,
                beta=pair_beta,
                per_pair=per_prompt,
            )
        )
    if cfg.eval_topk > 0 and reward is not None:
        texts = sample(
            policy,
            tokenizer,
            list(prompts),
            num_samples=cfg.eval_samples,
            max_new_tokens=cfg.eval_max_new_tokens,
            top_k=cfg.eval_topk,
            batch_size=cfg.sample_batch_size,
            seed=seed + 1,  # independent of the pure samples
            progress=progress,
        )
        full = [p + t for p, per_prompt in zip(prompts, texts, strict=True) for t in per_prompt]
        result["reward_topk"] = float(np.mean(score(reward, full)))
    return result


# --- helpers ------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _model_logits(model, input_ids, attention_mask) -> torch.Tensor:
    device = _device(model)
    return model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    ).logits
