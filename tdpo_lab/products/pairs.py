"""Preference pairs for the controlled-sentiment task (DPO paper section 6, reused by TDPO).

For each review prefix, sample K continuations from pi_ref, score prefix + continuation with the reward
model, and keep all K(K-1)/2 ranked pairs with chosen = the higher reward. The table is cached as
parquet under a key over everything it depends on (the SFT model, the reward, the data, the seed and the
sampling settings), so a change of any of them builds new pairs and never reuses stale ones.

Derived and run in notebooks/02_preference_pairs.ipynb.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.cache.plan import PAIR_FIELDS as PAIR_FIELDS  # re-exported: what the pair key covers
from tdpo_lab.cache.plan import Plan
from tdpo_lab.cache.store import fetch
from tdpo_lab.config import Config
from tdpo_lab.core.data import clean_text, load_imdb, make_prefixes
from tdpo_lab.core.generation import sample
from tdpo_lab.core.utils import atomic_path, set_threads
from tdpo_lab.products.reward import get_reward
from tdpo_lab.products.sft import load_reference

PAIR_COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected"]
PAIRS_FILE, SAMPLES_FILE = "pairs.parquet", "pairs.samples.parquet"  # the files of the pipeline's pairs stage


class InvertedPairError(AssertionError):
    """A pair's chosen response has a lower reward than its rejected one."""


def assert_no_inverted(df: pd.DataFrame) -> None:
    """Fail loudly if any pair has reward_chosen < reward_rejected (a public reproduction got this backwards)."""
    missing = {"reward_chosen", "reward_rejected"} - set(df.columns)
    if missing:
        raise KeyError(
            f"pair table lacks column(s) {sorted(missing)}; build it with tdpo_lab.products.pairs.build_pairs"
        )
    bad = df.index[df["reward_chosen"] < df["reward_rejected"]]
    if len(bad):
        raise InvertedPairError(
            f"{len(bad)} of {len(df)} pairs are inverted (reward_chosen < reward_rejected), first rows "
            f"{list(bad[:5])}: chosen must be the higher-reward response; swap the columns of those rows"
        )


def rank_pairs(
    prompts: list[str], samples: list[list[str]], rewards: np.ndarray, *, min_gap: float = 0.0
) -> pd.DataFrame:
    """All ranked pairs per prompt: ``rewards`` is ``[num_prompts, K]``; ties and gaps below ``min_gap`` dropped.

    Empty continuations (a sample that stopped at once) cannot be trained on and take part in no pair.
    """
    rows = []
    for pid, (prompt, texts) in enumerate(zip(prompts, samples, strict=True)):
        for i, j in itertools.combinations(range(len(texts)), 2):
            if not texts[i].strip() or not texts[j].strip():
                continue
            gap = float(rewards[pid, i] - rewards[pid, j])
            if gap == 0.0 or abs(gap) < min_gap:  # a tie states no preference
                continue
            hi, lo = (i, j) if gap > 0 else (j, i)
            rows.append((pid, prompt, texts[hi], texts[lo], float(rewards[pid, hi]), float(rewards[pid, lo])))
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    assert_no_inverted(df)
    return df


def pairs_path(cfg: Config, *, plan: Plan | None = None) -> Path:
    """The cached pair table; every sample with its reward sits beside it (``.samples.parquet``)."""
    return (plan or Plan(cfg)).entry("pairs").folder / PAIRS_FILE


def build_pairs(cfg: Config, *, progress: bool = True, plan: Plan | None = None) -> pd.DataFrame:
    """Sample, score and rank preference pairs (cached parquet). Also stores every sample's reward.

    Returns the pair table; ``samples_table(cfg)`` gives the per-sample rewards (for histograms). A
    damaged cache entry is rebuilt with a warning naming the file.
    """
    plan = plan or Plan(cfg)
    return fetch(
        plan.entry("pairs"),
        lambda folder: _sample_pairs(cfg, folder, progress=progress, plan=plan),
        _read_pairs,
        what="pair table cache",
    )


def read_pair_table(path: Path) -> pd.DataFrame:
    """A cached pair table, checked: no pair whose chosen reward is below its rejected one."""
    df = pd.read_parquet(path)
    assert_no_inverted(df)
    return df


def _read_pairs(folder: Path) -> pd.DataFrame:
    return read_pair_table(folder / PAIRS_FILE)


def sample_and_rank(cfg: Config, model, tokenizer, prompts: list[str], *, seed: int, progress: bool):
    """``samples_per_prompt`` continuations of each prompt from ``model``, scored by the reward and ranked into
    pairs: ``(samples, rewards [P, K], pairs)``. Seeded per batch from ``seed``."""
    samples = sample(
        model,
        tokenizer,
        prompts,
        num_samples=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.sample_batch_size,
        seed=seed,
        progress=progress,
    )
    flat = [p + s for p, group in zip(prompts, samples, strict=True) for s in group]
    rewards = get_reward(cfg).score(flat).reshape(len(prompts), cfg.samples_per_prompt)
    return samples, rewards, rank_pairs(prompts, samples, rewards, min_gap=cfg.min_reward_gap)


def _sample_pairs(cfg: Config, folder: Path, *, progress: bool, plan: Plan) -> None:
    """Write the pair table and the samples table of ``cfg`` into ``folder``."""
    if cfg.pairs:  # the pipeline's pairs key is then your data's: never file sampled IMDb pairs under it
        raise ValueError(
            f"config key pairs is set ({cfg.pairs!r}): your pairs come from tdpo_lab.products.user_pairs.user_pairs_for; "
            "build_pairs samples the kit's IMDb pairs, so unset pairs to build those"
        )

    set_threads(cfg.num_threads)
    model, tokenizer = load_reference(cfg, progress=progress, plan=plan)
    train = load_imdb("train", cfg.data_path or None)
    order = np.random.default_rng(cfg.data_seed).permutation(len(train))[: cfg.pair_prompts]
    texts = [clean_text(train[int(i)]["text"]) for i in order]
    prompts = make_prefixes(
        texts,
        tokenizer,
        min_tokens=cfg.prefix_min_tokens,
        max_tokens=cfg.prefix_max_tokens,
        seed=cfg.data_seed,
    )
    samples, rewards, df = sample_and_rank(
        cfg, model, tokenizer, prompts, seed=cfg.data_seed, progress=progress
    )
    sample_rows = pd.DataFrame(
        [
            (pid, p, s, float(rewards[pid, k]))
            for pid, (p, group) in enumerate(zip(prompts, samples, strict=True))
            for k, s in enumerate(group)
        ],
        columns=["prompt_id", "prompt", "text", "reward"],
    )
    with atomic_path(folder / SAMPLES_FILE) as tmp:
        sample_rows.to_parquet(tmp)
    with atomic_path(folder / PAIRS_FILE) as tmp:
        df.to_parquet(tmp)


def samples_table(cfg: Config, *, plan: Plan | None = None) -> pd.DataFrame:
    """Every sampled continuation with its reward (built with the pairs by :func:`build_pairs`)."""
    plan = plan or Plan(cfg)
    return fetch(
        plan.entry("pairs"),
        lambda folder: _sample_pairs(cfg, folder, progress=True, plan=plan),
        lambda folder: pd.read_parquet(folder / SAMPLES_FILE),
        what="pair table cache",
    )


def split_pairs(df: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole prompts for the chosen/rejected SeqKL curves: (train pairs, held-out pairs).

    The held-out prompts are the last ones (prompt ids are already a seeded shuffle of the reviews), about
    ``cfg.eval_pairs`` pairs; the training pairs never share a prompt with them.
    """
    per_prompt = max(cfg.samples_per_prompt * (cfg.samples_per_prompt - 1) // 2, 1)
    n_prompts = df["prompt_id"].nunique()
    held = min(max(int(np.ceil(cfg.eval_pairs / per_prompt)), 1), max(n_prompts // 5, 1))
    held_ids = set(sorted(df["prompt_id"].unique())[-held:])
    df = df.assign(pair_id=np.arange(len(df)))  # row of the cached table: keys the AttentionPO weights
    is_held = df["prompt_id"].isin(held_ids)
    train, heldout = df[~is_held].reset_index(drop=True), df[is_held].reset_index(drop=True)
    if len(train) == 0:
        raise ValueError("no training pairs left after holding out evaluation prompts: raise pair_prompts")
    return train, heldout.head(cfg.eval_pairs).reset_index(drop=True)


def pair_report(df: pd.DataFrame, samples: pd.DataFrame | None = None, *, bins: int = 20) -> dict:
    """Summary numbers and histogram data: reward distribution of samples, reward gaps of pairs."""
    gaps = (df["reward_chosen"] - df["reward_rejected"]).to_numpy()
    report = {
        "pairs": len(df),
        "prompts": int(df["prompt_id"].nunique()),
        "gap_mean": float(gaps.mean()) if len(gaps) else float("nan"),
        "gap_above_0.1": float((gaps > 0.1).mean()) if len(gaps) else float("nan"),
        "gap_hist": np.histogram(gaps, bins=bins, range=(0.0, 1.0)),
    }
    if samples is not None:
        report["reward_mean"] = float(samples["reward"].mean())
        report["reward_hist"] = np.histogram(samples["reward"], bins=bins, range=(0.0, 1.0))
    return report
