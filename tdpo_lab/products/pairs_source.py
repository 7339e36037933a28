"""Where a run's preference pairs come from: one interface, two implementations.

- :class:`ImdbPairs`: the kit's pairs, sampled from pi_ref on IMDb prefixes and ranked by the reward
  (:mod:`tdpo_lab.products.pairs`), with held-out prompts for the SeqKL curves;
- :class:`FilePairs`: your own ``prompt``/``chosen``/``rejected`` file, folder or hub dataset (config key
  ``pairs``; :mod:`tdpo_lab.products.user_pairs`), split by ``heldout_share``.

:func:`pairs_source` picks one from the config. Each gives the ``pairs`` stage's cache key, the record a run
folder keeps of the pairs it was trained on, and the training inputs as one :class:`TrainingInputs`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from tdpo_lab.cache.plan import STAGES, Plan, register_stage
from tdpo_lab.config import NO_REWARD, Config
from tdpo_lab.core.data import clean_text, load_imdb, make_prefixes
from tdpo_lab.products.pairs import build_pairs, split_pairs
from tdpo_lab.products.reward import get_reward
from tdpo_lab.products.user_pairs import (
    evaluation_prompts as heldout_prompts,
)
from tdpo_lab.products.user_pairs import (
    fit_to_context,
    split_user_pairs,
    user_pairs_for,
    user_pairs_key,
)

EVAL_PROMPT_SEED = 1234  # the held-out IMDb prefixes are the same for every run, so runs are comparable


class TrainingInputs(NamedTuple):
    """What a training run reads: every pair (``pair_id`` = row), the pairs it trains on, the held-out pairs
    of the SeqKL curves, the reward (None where there is none) and the prompts whose samples it scores."""

    pairs: pd.DataFrame
    train: pd.DataFrame
    heldout: pd.DataFrame
    reward: Any
    prompts: list[str] | None


def evaluation_prompts(cfg: Config, tokenizer) -> list[str]:
    """Held-out review prefixes from the IMDb test split (fixed across runs and seeds)."""
    test = load_imdb("test", cfg.data_path or None)
    order = np.random.default_rng(EVAL_PROMPT_SEED).permutation(len(test))[: cfg.eval_prompts]
    texts = [clean_text(test[int(i)]["text"]) for i in order]
    return make_prefixes(
        texts,
        tokenizer,
        min_tokens=cfg.prefix_min_tokens,
        max_tokens=cfg.prefix_max_tokens,
        seed=EVAL_PROMPT_SEED,
    )


class ImdbPairs:
    """The kit's IMDb pairs of ``cfg`` (the ``pairs`` stage keyed by its fields, the SFT model, the reward)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def key(self, plan: Plan) -> str | None:
        return None  # the stage's own key

    def record(self) -> dict | None:
        return None  # the run's config already names everything its pairs depend on

    def training_inputs(
        self, tokenizer, *, plan: Plan, main: bool = True, progress: bool = True
    ) -> TrainingInputs:
        pairs = build_pairs(self.cfg, progress=progress, plan=plan)
        train, heldout = split_pairs(pairs, self.cfg)
        # evaluations run on the main process only
        reward = get_reward(self.cfg) if main else None
        prompts = evaluation_prompts(self.cfg, tokenizer) if main else None
        return TrainingInputs(pairs, train, heldout, reward, prompts)


class FilePairs:
    """Your own pairs (config key ``pairs``): keyed by their content and split, never the file's name."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.data = user_pairs_for(cfg)  # a bad file fails here, before any run folder is made

    def key(self, plan: Plan) -> str:
        return user_pairs_key(self.cfg, plan.key("sft"))

    def record(self) -> dict:
        """What a run folder keeps (``pairs.json``) so a file changed in place never resumes an old run."""
        return {
            "source": self.data.source,
            "fingerprint": self.data.fingerprint,
            "rows_read": self.data.rows_read,
            "pairs": len(self.data.table),
            "dropped": self.data.dropped,
            "heldout_share": self.cfg.heldout_share,
        }

    def training_inputs(
        self, tokenizer, *, plan: Plan, main: bool = True, progress: bool = True
    ) -> TrainingInputs:
        """The pairs fitted to ``n_positions``; the held-out pairs cut to the first ``eval_pairs`` (in seeded
        order; the rest are still never trained on); the reward, or None for ``reward="none"``."""
        cfg = self.cfg
        pairs = fit_to_context(self.data.table, tokenizer, cfg.n_positions, verbose=progress)
        train, heldout = split_user_pairs(pairs, cfg.heldout_share, cfg.data_seed)
        if progress:
            print(
                f"pairs: {len(pairs)} from {cfg.pairs!r} ({self.data.rows_read - len(pairs)} rows dropped): "
                f"{len(train)} to train on, {len(heldout)} held out (heldout_share={cfg.heldout_share:g}), "
                f"{min(len(heldout), cfg.eval_pairs)} of them evaluated (eval_pairs={cfg.eval_pairs})"
            )
        heldout = heldout.head(cfg.eval_pairs).reset_index(drop=True)
        reward = None if cfg.reward == NO_REWARD else get_reward(cfg)
        return TrainingInputs(pairs, train, heldout, reward, heldout_prompts(heldout, cfg))


def pairs_source(cfg: Config) -> ImdbPairs | FilePairs:
    """The source of ``cfg``'s pairs: your file when config key ``pairs`` is set, else the kit's IMDb pairs."""
    return FilePairs(cfg) if cfg.pairs else ImdbPairs(cfg)


register_stage(STAGES["pairs"], key=lambda plan: pairs_source(plan.cfg).key(plan))
