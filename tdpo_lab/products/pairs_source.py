"""Where a run's preference pairs come from: one interface, two implementations.

- :class:`ImdbPairs`: the kit's pairs, sampled from pi_ref on IMDb prefixes and ranked by the reward
  (:mod:`tdpo_lab.products.pairs`), with held-out prompts for the SeqKL curves (training prompts, or with
  ``eval_pair_source="test"`` one pair on each of ``eval_pairs`` test prefixes: :mod:`.eval_pairs`);
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
from tdpo_lab.products.eval_pairs import EVAL_PROMPT_SEED as EVAL_PROMPT_SEED  # re-exported
from tdpo_lab.products.eval_pairs import build_eval_pairs, heldout_prefixes
from tdpo_lab.products.pairs import build_pairs, split_pairs
from tdpo_lab.products.reward import get_reward
from tdpo_lab.products.user_pairs import UserPairsError, user_pairs_for, user_pairs_key


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
    return heldout_prefixes(cfg, tokenizer, cfg.eval_prompts)


# --- your own pairs: split, fitted to the context, their prompts ------------------------------------------
def split_user_pairs(table: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training pairs, held-out pairs): a seeded ``share`` of the prompts, with all their pairs, held out.

    Whole prompts, as the kit's own split does, so no held-out prompt is ever trained on; with one pair per
    prompt the held-out pairs are exactly ``round(share * n)`` (at least 1, at most n - 1). The held-out
    table comes in the seeded order (evaluation takes its first ``eval_pairs`` rows).
    """
    if not 0.0 < share < 1.0:
        raise UserPairsError(f"heldout_share must be in (0, 1), got {share!r}")
    prompt_ids = np.sort(table["prompt_id"].unique())
    if len(prompt_ids) < 2:
        raise UserPairsError(
            f"all {len(table)} pairs share one prompt: the held-out pairs are whole prompts, so at least two "
            "different prompts are needed (one to train on, one to evaluate)"
        )
    n_held = min(max(round(share * len(prompt_ids)), 1), len(prompt_ids) - 1)
    order = np.random.default_rng(seed).permutation(prompt_ids)
    rank = {int(pid): k for k, pid in enumerate(order[:n_held])}
    is_held = table["prompt_id"].isin(rank)
    heldout = table[is_held].copy()
    heldout["_rank"] = heldout["prompt_id"].map(rank)
    heldout = heldout.sort_values(["_rank", "pair_id"], kind="stable").drop(columns="_rank")
    return table[~is_held].reset_index(drop=True), heldout.reset_index(drop=True)


def held_out_split(table: pd.DataFrame, cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training pairs, held-out pairs): the source's own ``test`` split when it has one (a ``heldout``
    column, in the source's order), else :func:`split_user_pairs` with ``heldout_share`` and ``data_seed``."""
    if "heldout" not in table:
        return split_user_pairs(table, cfg.heldout_share, cfg.data_seed)
    held = table["heldout"].astype(bool)
    return table[~held].reset_index(drop=True), table[held].reset_index(drop=True)


def fit_to_context(table: pd.DataFrame, tokenizer, max_length: int, *, verbose: bool = True) -> pd.DataFrame:
    """Prompts longer than half of ``max_length`` tokens keep their last half (TRL's ``keep_end``).

    Tokenised as the training batches are (prompt and response each on its own, no special tokens). A
    prompt is cut at its start, so the response still follows the text right before it; responses that do
    not fit after their prompt are cut at their end by the collation (:func:`tdpo_lab.core.data.collate_sequences`:
    they lose their EOS). Prints one note with both counts when anything is cut.
    """
    room = max(max_length // 2, 1)
    prompts = list(table["prompt"])
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    cut = 0
    for i, p in enumerate(ids):
        if len(p) <= room:
            continue
        keep = list(p[-room:])
        text = ""
        while keep:  # a cut inside a multi-byte character decodes to U+FFFD: start at the next token
            text = tokenizer.decode(keep, clean_up_tokenization_spaces=False).lstrip("\ufffd")
            if text and len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= room:
                break
            keep = keep[1:]
        prompts[i], cut = text, cut + 1
    table = table.assign(prompt=prompts)
    lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    long_responses = 0
    for side in ("chosen", "rejected"):
        resp = tokenizer(list(table[side]), add_special_tokens=False)["input_ids"]
        long_responses += sum(p + len(r) + 1 > max_length for p, r in zip(lengths, resp, strict=True))
    if verbose and (cut or long_responses):
        print(
            f"pairs: the model reads {max_length} positions (config key n_positions): {cut} prompt(s) longer "
            f"than {room} tokens keep their last {room}; {long_responses} response(s) are cut where the "
            "positions end (they lose their EOS)"
        )
    return table


def heldout_prompts(heldout: pd.DataFrame, cfg) -> list[str]:
    """The held-out prompts (each once, seeded order), at most ``cfg.eval_prompts``: what a reward scores."""
    return list(dict.fromkeys(heldout["prompt"]))[: cfg.eval_prompts]


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
        if self.cfg.eval_pair_source == "test":  # the same training pairs, evaluated on IMDb test prefixes
            heldout = build_eval_pairs(self.cfg, progress=progress, plan=plan)
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
        train, heldout = held_out_split(pairs, cfg)
        if progress:
            how = "its test split" if "heldout" in pairs else f"heldout_share={cfg.heldout_share:g}"
            print(
                f"pairs: {len(pairs)} from {cfg.pairs!r} ({self.data.rows_read - len(pairs)} rows dropped): "
                f"{len(train)} to train on, {len(heldout)} held out ({how}), "
                f"{min(len(heldout), cfg.eval_pairs)} of them evaluated (eval_pairs={cfg.eval_pairs})"
            )
        heldout = heldout.head(cfg.eval_pairs).reset_index(drop=True)
        reward = None if cfg.reward == NO_REWARD else get_reward(cfg)
        return TrainingInputs(pairs, train, heldout, reward, heldout_prompts(heldout, cfg))


def pairs_source(cfg: Config) -> ImdbPairs | FilePairs:
    """The source of ``cfg``'s pairs: your file when config key ``pairs`` is set, else the kit's IMDb pairs."""
    return FilePairs(cfg) if cfg.pairs else ImdbPairs(cfg)


register_stage(STAGES["pairs"], key=lambda plan: pairs_source(plan.cfg).key(plan))
