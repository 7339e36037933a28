"""An evaluation's samples summarised (means with standard errors, per-prompt values, distinct-n), and the checks
of its inputs (held-out pairs, a reward model)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def aggregate_samples(samples: pd.DataFrame) -> dict:
    """The evaluation numbers of a :func:`evaluate_samples` table (python floats / ints).

    - ``reward``, ``kl_seq``, ``kl_logratio``: means over samples; ``reward_stderr`` and ``kl_seq_stderr``:
      standard errors of those means computed over the per-prompt means (samples of one prompt share
      their prefix, so they are not independent; with a single prompt, over its samples; NaN for one sample).
    - ``entropy``: sum of all per-position entropies / number of positions (a per-token mean, nats).
    - ``distinct2``, ``distinct4``: :func:`distinct_n` over every sample's ``token_ids``.
    - ``response_tokens``: mean scored positions per sample; ``n_samples``, ``n_prompts``.
    """
    needed = ("prompt_id", "reward", "kl_seq", "kl_logratio", "entropy_sum", "n_tokens", "token_ids")
    missing = [c for c in needed if c not in samples.columns]
    if missing:
        raise ValueError(f"samples table lacks columns {missing}; build it with evaluate_samples")
    if len(samples) == 0:
        raise ValueError("samples table is empty: nothing to aggregate")
    return {
        "reward": float(samples["reward"].mean()),
        "reward_stderr": _stderr_by_prompt(samples, "reward"),
        "kl_seq": float(samples["kl_seq"].mean()),
        "kl_seq_stderr": _stderr_by_prompt(samples, "kl_seq"),
        "kl_logratio": float(samples["kl_logratio"].mean()),
        "entropy": float(samples["entropy_sum"].sum() / samples["n_tokens"].sum()),
        "distinct2": distinct_n(samples["token_ids"], 2),
        "distinct4": distinct_n(samples["token_ids"], 4),
        "response_tokens": float(samples["n_tokens"].mean()),
        "n_samples": int(len(samples)),
        "n_prompts": int(samples["prompt_id"].nunique()),
    }


def per_prompt_values(samples: pd.DataFrame) -> dict:
    """Per-prompt values of a :func:`evaluate_samples` table, for error bars that resample prompts.

    ``prompt_ids`` (sorted, the order of the other lists), ``reward_per_prompt`` and ``kl_seq_per_prompt``
    (means over that prompt's samples), ``entropy_per_prompt`` (that prompt's per-token entropy, pooled over
    its samples as ``entropy`` is over all of them): lists of python floats (6 significant digits), one per
    prompt.
    """
    groups = samples.groupby("prompt_id", sort=True)
    entropy = groups["entropy_sum"].sum() / groups["n_tokens"].sum()
    return {
        "prompt_ids": [int(i) for i in groups.size().index],
        "reward_per_prompt": rounded(groups["reward"].mean()),
        "kl_seq_per_prompt": rounded(groups["kl_seq"].mean()),
        "entropy_per_prompt": rounded(entropy),
    }


def rounded(values) -> list[float]:
    # 6 significant digits: far below any prompt-to-prompt spread, and half the bytes of a committed store
    return [float(f"{float(v):.6g}") for v in values]


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: number of unique n-grams / total number of n-grams, pooled over all sequences.

    n-grams never cross from one sequence into the next. A corpus with no n-gram at all (every sequence
    shorter than n) gives 0.0. Example: [[1, 2, 1, 2]] has bigrams (1,2), (2,1), (1,2): distinct-2 = 2/3.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    unique: set[tuple] = set()
    for seq in sequences:
        seq = tuple(seq)
        grams = [seq[i : i + n] for i in range(len(seq) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def _stderr_by_prompt(samples: pd.DataFrame, column: str) -> float:
    per_prompt = samples.groupby("prompt_id")[column].mean()
    values = per_prompt if len(per_prompt) >= 2 else samples[column]
    if len(values) < 2:
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def check_pairs(pairs) -> None:
    if not isinstance(pairs, pd.DataFrame):
        raise TypeError(
            f"pairs must be a pandas DataFrame with columns {PAIR_COLUMNS}, got {type(pairs).__name__}"
        )
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(
            f"pairs lacks column(s) {missing}; it needs {list(PAIR_COLUMNS)} (see tdpo_lab.products.pairs)"
        )
    if len(pairs) == 0:
        raise ValueError("pairs is empty; pass held-out pairs or pairs=None to skip the SeqKL numbers")


def check_reward(reward) -> None:
    if not callable(getattr(reward, "score", None)):
        raise TypeError(
            f"reward must have a score(texts) -> array method (tdpo_lab.products.reward.load_reward), got {type(reward).__name__}"
        )


def score(reward, texts: list[str]) -> np.ndarray:
    scores = np.asarray(reward.score(texts), dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(texts):
        raise ValueError(f"reward.score returned {scores.shape[0]} scores for {len(texts)} texts")
    return scores
