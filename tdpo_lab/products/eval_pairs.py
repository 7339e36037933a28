"""Evaluation pairs from IMDb test prefixes: the chosen/rejected SeqKL curves on many prompts none trained on.

The training pairs' own held-out split (:func:`tdpo_lab.products.pairs.split_pairs`) keeps at most a fifth of
the training prompts, and all K(K-1)/2 pairs of each: 64 pairs come from about 11 prompts, too few for error
bars that resample prompts. With config ``eval_pair_source="test"`` the held-out pairs come from here instead:

- the prompts are the held-out IMDb **test** prefixes the reward evaluation scores (the same seeded order, so
  the first ``eval_prompts`` of them are those prompts, with the same ``prompt_id``), plus a spare quarter,
  less any whose text is also a training pair's prompt (short prefixes such as "This movie is" recur);
- each gets ``samples_per_prompt`` continuations from pi_ref, scored by the reward and ranked by
  :func:`~tdpo_lab.products.pairs.rank_pairs` exactly as the training pairs are;
- each prompt keeps ONE of its ranked pairs, drawn uniformly (a training pair is any of them), and the first
  ``eval_pairs`` prompts that have a pair give the set: ``eval_pairs`` pairs from as many distinct prompts.

The training pairs are unchanged (the same split as before), so a run with ``eval_pair_source="test"``
trains exactly as one without it and differs only in the pairs its SeqKL curves are measured on. The table
is the cached stage ``eval_pairs`` (:data:`tdpo_lab.cache.plan.STAGES`), keyed by the SFT model, the reward,
the test split, the training pairs and its fields; the reference evaluation's key covers it when it is used.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.cache.plan import Plan
from tdpo_lab.cache.store import fetch
from tdpo_lab.config import Config
from tdpo_lab.core.data import clean_text, load_imdb, make_prefixes
from tdpo_lab.core.utils import atomic_path, set_threads
from tdpo_lab.products.pairs import build_pairs, read_pair_table, sample_and_rank
from tdpo_lab.products.sft import load_reference

EVAL_PROMPT_SEED = 1234  # the held-out IMDb prefixes are the same for every run, so runs are comparable
SPARE_PROMPTS = 0.25  # prompts sampled beyond eval_pairs, for those whose samples give no pair (ties, empty)
EVAL_PAIRS_FILE = "eval_pairs.parquet"


def heldout_prefixes(cfg: Config, tokenizer, n: int) -> list[str]:
    """The first ``n`` held-out review prefixes of the IMDb test split, in their fixed seeded order.

    A longer list starts with a shorter one (the order and each prefix's length are drawn per review), so
    ``heldout_prefixes(cfg, tok, cfg.eval_prompts)`` are the first prompts of any longer call.
    """
    test = load_imdb("test", cfg.data_path or None)
    if n > len(test):
        raise ValueError(f"{n} test prefixes asked for, but the test split has {len(test)} reviews")
    order = np.random.default_rng(EVAL_PROMPT_SEED).permutation(len(test))[:n]
    texts = [clean_text(test[int(i)]["text"]) for i in order]
    return make_prefixes(
        texts,
        tokenizer,
        min_tokens=cfg.prefix_min_tokens,
        max_tokens=cfg.prefix_max_tokens,
        seed=EVAL_PROMPT_SEED,
    )


def eval_pair_prompt_count(n_pairs: int) -> int:
    """How many test prefixes are sampled for ``n_pairs`` evaluation pairs (one pair per prompt)."""
    return math.ceil(n_pairs * (1.0 + SPARE_PROMPTS))


def one_pair_per_prompt(ranked: pd.DataFrame, n_pairs: int, seed: int = EVAL_PROMPT_SEED) -> pd.DataFrame:
    """One pair per prompt, drawn uniformly from that prompt's ranked pairs; the first ``n_pairs`` prompts.

    ``ranked``: a :func:`~tdpo_lab.products.pairs.rank_pairs` table. Prompts come in ``prompt_id`` order
    (the seeded order of the test prefixes); the draw is seeded, one uniform number per prompt. Returns at
    most ``n_pairs`` rows, each of a different prompt.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    rng = np.random.default_rng(seed)
    rows = []
    for _, group in ranked.groupby("prompt_id", sort=True):
        if len(rows) == n_pairs:
            break
        rows.append(group.index[int(rng.integers(len(group)))])
    return ranked.loc[rows].reset_index(drop=True)


def build_eval_pairs(cfg: Config, *, progress: bool = True, plan: Plan | None = None) -> pd.DataFrame:
    """The evaluation pair table of ``cfg`` (cached stage ``eval_pairs``): ``eval_pairs`` pairs, one per test
    prompt, with the columns of the training pairs (``prompt_id``: the prompt's place among the test prefixes).

    Warns when fewer than ``eval_pairs`` prompts gave a pair (every sample of the others tied or empty).
    """
    plan = plan or Plan(cfg)
    return fetch(
        plan.entry("eval_pairs"),
        lambda folder: _sample_eval_pairs(cfg, folder, progress=progress, plan=plan),
        _read_eval_pairs,
        what="evaluation pair cache",
    )


def _read_eval_pairs(folder: Path) -> pd.DataFrame:
    return read_pair_table(folder / EVAL_PAIRS_FILE)


def _sample_eval_pairs(cfg: Config, folder: Path, *, progress: bool, plan: Plan) -> None:
    set_threads(cfg.num_threads)
    model, tokenizer = load_reference(cfg, progress=progress, plan=plan)
    prompts = heldout_prefixes(cfg, tokenizer, eval_pair_prompt_count(cfg.eval_pairs))
    # a short prefix ("This movie is") can also be a training prompt: such a prompt is not held out, so skip it
    trained = set(build_pairs(cfg, progress=progress, plan=plan)["prompt"])
    kept = np.array([i for i, p in enumerate(prompts) if p not in trained], dtype=np.int64)
    prompts = [prompts[i] for i in kept]
    # seeded per batch: the same pairs for every run on this pi_ref
    _, _, ranked = sample_and_rank(cfg, model, tokenizer, prompts, seed=EVAL_PROMPT_SEED, progress=progress)
    # prompt_id: the prompt's place among the test prefixes, as in the reward evaluation
    ranked["prompt_id"] = kept[ranked["prompt_id"].to_numpy(dtype=np.int64)]
    df = one_pair_per_prompt(ranked, cfg.eval_pairs)
    if len(df) < cfg.eval_pairs:
        warnings.warn(
            f"only {len(df)} of {len(prompts)} test prefixes gave a ranked pair (eval_pairs={cfg.eval_pairs}): "
            "the others' samples all tied or were empty; lower min_reward_gap or raise samples_per_prompt",
            stacklevel=3,
        )
    if df.empty:
        raise ValueError("no evaluation pair: every test prefix's samples tied or were empty")
    with atomic_path(folder / EVAL_PAIRS_FILE) as tmp:
        df.to_parquet(tmp)
