"""The kit's IMDb pairs written out for other tools: a ``datasets.DatasetDict`` with TRL's column names.

``tdpo-lab export-pairs`` writes ``train`` (the pairs training uses) and ``test`` (every held-out pair), so
``DPOTrainer(train_dataset=ds["train"], eval_dataset=ds["test"])`` is right by default, and ``--set pairs=``
reads the folder back with its ``test`` split (:mod:`tdpo_lab.products.user_pairs`).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from tdpo_lab.core.data import DataError
from tdpo_lab.core.hub import hub_status
from tdpo_lab.products.pairs import build_pairs, split_pairs
from tdpo_lab.products.user_pairs import REQUIRED_COLUMNS, UserPairsError


def ends_inside_word(prompt: str, response: str) -> bool:
    """True when ``prompt + response`` joins two letters or digits ("Go" + "ue came"): the prompt ends inside
    a word. The kit tokenises prompt and response apart, TRL tokenises the joined text, so the two differ there."""
    return bool(prompt) and bool(response) and prompt[-1].isalnum() and response[0].isalnum()


def boundary_count(table) -> int:
    """How many pairs (rows with ``prompt``, ``chosen``, ``rejected``) have a response that continues its prompt
    inside a word (:func:`ends_inside_word`, either response)."""
    rows = zip(table["prompt"], table["chosen"], table["rejected"], strict=True)
    return sum(ends_inside_word(p, c) or ends_inside_word(p, r) for p, c, r in rows)


def pairs_dataset(table: pd.DataFrame, heldout):
    """The pair table as a ``DatasetDict``: ``train`` = the rows with ``heldout`` False, ``test`` = the others.

    Columns ``prompt``, ``chosen``, ``rejected`` first (TRL's names), then the table's other columns and
    ``heldout``; so ``DPOTrainer(train_dataset=ds["train"], eval_dataset=ds["test"])`` never trains on a
    held-out pair.
    """
    import datasets

    table = table.assign(heldout=np.asarray(heldout, dtype=bool))
    ordered = [*REQUIRED_COLUMNS, *(c for c in table.columns if c not in REQUIRED_COLUMNS)]
    split = {
        name: datasets.Dataset.from_pandas(
            table.loc[table["heldout"] == held, ordered].reset_index(drop=True), preserve_index=False
        )
        for name, held in (("train", False), ("test", True))
    }
    return datasets.DatasetDict(split)


def export_pairs(cfg, out: str | os.PathLike, *, push_to_hub: str | None = None, progress: bool = True):
    """Write the kit's IMDb pairs of ``cfg`` (built, or read from the cache) as a ``datasets.DatasetDict``.

    Splits: ``train`` (the pairs training uses) and ``test`` (every pair of the prompts training holds out for
    the SeqKL curves). Columns: ``prompt``, ``chosen``, ``rejected`` (TRL's names) and the kit's ``prompt_id``,
    ``pair_id`` (the row of the whole table), ``reward_chosen``, ``reward_rejected`` and ``heldout`` (True in
    ``test``). ``save_to_disk(out)``; then ``push_to_hub(push_to_hub)`` when a name is given and the hub is
    reachable (else an error saying the folder is written and how to push it later). Returns the DatasetDict;
    ``load_user_pairs(out)`` (config key ``pairs``) reads it back, its ``test`` split as the held-out pairs.
    """
    if cfg.pairs:
        raise UserPairsError(
            f"export-pairs writes the kit's IMDb pairs, but config key pairs is set ({cfg.pairs!r}): unset it"
        )
    table = build_pairs(cfg, progress=progress)
    trained, _ = split_pairs(table, cfg)
    table = table.assign(pair_id=np.arange(len(table), dtype=np.int64))
    ds = pairs_dataset(table, ~table["pair_id"].isin(set(trained["pair_id"])))
    ds.save_to_disk(str(out))
    if push_to_hub:
        reason = hub_status()
        if reason is not None:
            raise DataError(
                f"cannot push to the hub ({reason}); the pairs are saved in {str(out)!r}: push them later, "
                f"online, with datasets.load_from_disk({str(out)!r}).push_to_hub({push_to_hub!r})"
            )
        ds.push_to_hub(push_to_hub)
    return ds
