"""Your own preference data in TRL's explicit-prompt format, and the kit's pairs written out in it.

A pair is three texts: ``prompt``, ``chosen`` and ``rejected``, where the responses continue the prompt
(TRL's convention: ``prompt + chosen`` is the whole chosen text, so a response usually starts with a space).
:func:`load_user_pairs` reads them from a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder (data
files, or one written by ``Dataset.save_to_disk``) or a hub dataset name, checks them and drops the rows
that cannot teach a preference, counting each reason. The config key ``pairs`` makes ``train()`` use them
instead of the IMDb pairs; the tokenizer, pi_ref and the models still come from the profile, and a seeded
share (``heldout_share``) of the prompts is held out for evaluation (:func:`split_user_pairs`).

:func:`export_pairs` goes the other way: the kit's IMDb pair table as a ``datasets.DatasetDict`` (``train``
and ``test`` splits) in the same column names, for TRL or any other trainer; a folder with both splits is read
back with its ``test`` split as the held-out pairs (:func:`held_out_split`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.core.data import DataError, DataNotFoundError
from tdpo_lab.core.hub import hub_status
from tdpo_lab.core.utils import stable_hash

__all__ = [
    "REQUIRED_COLUMNS",
    "UserPairs",
    "UserPairsError",
    "UserPairsWarning",
    "load_user_pairs",
    "user_pairs_for",
    "user_pairs_key",
]

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
SPLIT_COLUMN = "_split"  # set by _read_dataset for a DatasetDict with 'train' and 'test' splits
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
VERSION = 1  # of the checks and the split below: part of the pairs key, so a change never reuses caches
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

WHAT_TO_GIVE = (
    "Give a .jsonl, .json, .csv or .parquet file (or a folder of them, or one written by "
    "datasets.Dataset.save_to_disk, or a hub dataset name when online) with the text columns 'prompt', "
    "'chosen' and 'rejected': TRL's explicit-prompt preference format, prompt + chosen being the whole text."
)


class UserPairsError(DataError):
    """Your pairs cannot be used as they are (the message names the column, the rows and the fix)."""


class UserPairsWarning(UserWarning):
    """Some rows of your pairs were dropped (the message counts them by reason)."""


@dataclasses.dataclass(frozen=True)
class UserPairs:
    """Checked pairs: ``table`` has ``pair_id, prompt_id, prompt, chosen, rejected`` (ids count from 0), and
    ``heldout`` (bool) when the source was a DatasetDict with ``train`` and ``test`` splits (``test`` = True).

    ``rows_read``: rows in the source; ``dropped``: rows dropped per reason; ``fingerprint``: sha256 of the
    kept texts, in order (the same pairs give the same fingerprint whatever the file format).
    """

    table: pd.DataFrame
    source: str
    rows_read: int
    dropped: dict[str, int]
    fingerprint: str


# --- reading -----------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):  # a JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserPairsError(f"{path} is not valid JSON ({exc}). {WHAT_TO_GIVE}") from exc
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserPairsError(
                    f"{path}, line {number}, is not a JSON object ({exc.msg}): a JSON-lines file holds one "
                    "object per line"
                ) from exc
    bad = [i + 1 for i, row in enumerate(rows) if not isinstance(row, dict)]
    if bad:
        raise UserPairsError(f"{path}: rows {bad[:5]} are not JSON objects. {WHAT_TO_GIVE}")
    return rows


def _columns_from_rows(rows: list[dict]) -> dict[str, list]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}


def _read_file(path: Path) -> dict[str, list]:
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserPairsError(f"{path}: unknown file type {path.suffix!r}. {WHAT_TO_GIVE}")
    if kind == "json":
        return _columns_from_rows(_read_jsonl(path))
    if kind == "csv":
        # every cell as text: a CSV has no types, and an empty cell must stay "" (not NaN) to be reported
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return {name: df[name].tolist() for name in df.columns}
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_dataset(source: str, folder: Path | None) -> dict[str, list]:
    """A folder or hub name through the datasets library; a DatasetDict gives its 'train' split, and with a
    'test' split beside it both, marked in a ``_split`` column (the held-out pairs, what ``export-pairs`` writes)."""
    import datasets

    saved = ("dataset_info.json", "dataset_dict.json")  # what save_to_disk writes (Dataset, DatasetDict)
    if folder is not None and any((folder / name).is_file() for name in saved):
        ds = datasets.load_from_disk(str(folder))
    else:
        try:
            ds = datasets.load_dataset(str(folder) if folder is not None else source)
        except Exception as exc:  # noqa: BLE001 - re-raised with the source and what to give
            if folder is not None:
                what = f"from the folder {source!r}, datasets.load_dataset failed"
            else:
                what = (
                    f"{source!r} is no file or folder here (relative paths start from {os.getcwd()}), and "
                    "loading it as a hub dataset failed"
                )
            raise UserPairsError(
                f"could not load the pairs (config key pairs): {what} ({type(exc).__name__}: {exc}). "
                f"{WHAT_TO_GIVE}"
            ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if {"train", "test"} <= set(ds):  # a given held-out split is honoured, not split again
            columns = [c for c in ds["train"].column_names if c in ds["test"].column_names]
            out = {name: list(ds["train"][name]) + list(ds["test"][name]) for name in columns}
            out[SPLIT_COLUMN] = ["train"] * ds["train"].num_rows + ["test"] * ds["test"].num_rows
            return out
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserPairsError(
                f"the pairs {source!r} hold the splits {list(ds)} and none is 'train': save the split you "
                "want to train on alone (ds[split].save_to_disk(DIR)) and pass that folder"
            )
    return {name: ds[name] for name in ds.column_names}


def _read_source(source: str) -> dict[str, list]:
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        return _read_dataset(source, path)
    # a hub name is "name" or "owner/name"; anything else (a suffix, a leading ./ ~ /, deeper folders) is a path
    if (
        path.suffix.lower() in FILE_SUFFIXES
        or source.startswith((".", "~", "/"))
        or not _HUB_NAME.match(source)
    ):
        raise DataNotFoundError(
            f"the pairs file {str(path)!r} (config key pairs) does not exist: check the path (relative paths "
            f"start from {os.getcwd()}). {WHAT_TO_GIVE}"
        )
    import datasets

    reason = hub_status()
    if reason is not None and not datasets.config.HF_HUB_OFFLINE:
        raise DataNotFoundError(
            f"the pairs {source!r} (config key pairs) are not a file or folder here, and as a hub dataset "
            f"name they cannot be fetched ({reason}). {WHAT_TO_GIVE}"
        )
    return _read_dataset(source, None)


# --- checking --------------------------------------------------------------------------------------------
def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_columns(columns: dict[str, list], source: str) -> int:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        hint = ""
        if "prompt" in missing and {"chosen", "rejected"} <= set(columns):
            hint = (
                " (TRL's implicit-prompt format, the prompt inside chosen and rejected, is not read: split "
                "the shared beginning into a 'prompt' column)"
            )
        elif "messages" in columns:
            hint = " (a 'messages' column is a chat dataset, not preference pairs)"
        raise UserPairsError(
            f"the pairs {source!r} lack the column(s) {missing}{hint}; they have {sorted(columns)}. {WHAT_TO_GIVE}"
        )
    n_rows = len(columns["prompt"])
    for name in REQUIRED_COLUMNS:
        for i, value in enumerate(columns[name]):
            if isinstance(value, (list, tuple, dict, np.ndarray)):
                raise UserPairsError(
                    f"the pairs {source!r}, row {i + 1}: column {name!r} holds a list of messages (TRL's "
                    "conversational format), which the kit does not read: write each conversation out as "
                    "text first, e.g. prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, "
                    "add_generation_prompt=True) and chosen/rejected = the assistant reply's text"
                )
            if not (_is_missing(value) or isinstance(value, str)):
                raise UserPairsError(
                    f"the pairs {source!r}, row {i + 1}: column {name!r} holds a {type(value).__name__} "
                    f"({value!r}), not text. {WHAT_TO_GIVE}"
                )
    return n_rows


def _reason(prompt, chosen, rejected) -> str | None:
    """Why a row cannot teach a preference, or None; one reason per row, the first that applies."""
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if _is_missing(value) or not value.strip():
            return f"empty {name}"
    if chosen == rejected:  # no preference to learn; DPO's margin would be 0 for ever
        return "chosen equal to rejected"
    return None


def _describe(counts: dict[str, int], rows: dict[str, list[int]]) -> str:
    return "; ".join(
        f"{n} with {why} (rows {rows[why][:5]}{', ...' if n > 5 else ''})" for why, n in counts.items()
    )


def fingerprint_pairs(table: pd.DataFrame) -> str:
    """sha256 of the prompt/chosen/rejected texts in order (each with its byte length in front)."""
    digest = hashlib.sha256()
    for row in table[list(REQUIRED_COLUMNS)].itertuples(index=False):
        for text in row:
            blob = text.encode("utf-8")
            digest.update(len(blob).to_bytes(8, "little"))
            digest.update(blob)
    return digest.hexdigest()


def load_user_pairs(source: str | os.PathLike, *, strict: bool = False) -> UserPairs:
    """Read and check preference pairs in TRL's explicit-prompt format (see the module docstring).

    Errors (:class:`UserPairsError`, :class:`~tdpo_lab.core.data.DataNotFoundError` for a missing path): a missing
    column, conversational (list-of-messages) values, non-text values. Rows with an empty (or blank) text or
    with chosen equal to rejected are dropped with a :class:`UserPairsWarning` counting each reason (row
    numbers count from 1); with ``strict=True`` they are an error instead, and so is a source where no row
    is left. Texts are kept exactly as written (no stripping): a response continues its prompt.
    """
    source = str(source)
    if not source:
        raise UserPairsError(f"no pairs given (config key pairs is empty). {WHAT_TO_GIVE}")
    columns = _read_source(source)
    n_rows = _check_columns(columns, source)
    counts: dict[str, int] = {}
    where: dict[str, list[int]] = {}
    keep = []
    for i, row in enumerate(zip(*(columns[c] for c in REQUIRED_COLUMNS), strict=True)):
        why = _reason(*row)
        if why is None:
            keep.append(i)
        else:
            counts[why] = counts.get(why, 0) + 1
            where.setdefault(why, []).append(i + 1)
    if counts and (strict or not keep):
        lead = "no pair is left" if not keep else "invalid rows (strict=True)"
        raise UserPairsError(
            f"the pairs {source!r}: {lead}: of {n_rows} rows, {n_rows - len(keep)} cannot be trained on: "
            f"{_describe(counts, where)}. Every row needs a non-empty prompt, chosen and rejected, and chosen "
            "must differ from rejected"
        )
    if not keep:
        raise UserPairsError(f"the pairs {source!r} hold no rows. {WHAT_TO_GIVE}")
    if counts:
        warnings.warn(
            f"the pairs {source!r}: dropped {n_rows - len(keep)} of {n_rows} rows: {_describe(counts, where)}",
            UserPairsWarning,
            stacklevel=2,
        )
    table = pd.DataFrame({c: [columns[c][i] for i in keep] for c in REQUIRED_COLUMNS})
    first_seen = {p: k for k, p in enumerate(dict.fromkeys(table["prompt"]))}
    table.insert(0, "prompt_id", table["prompt"].map(first_seen).astype(np.int64))
    table.insert(0, "pair_id", np.arange(len(table), dtype=np.int64))  # AttentionPO's weights are keyed by it
    fingerprint = fingerprint_pairs(table)
    if SPLIT_COLUMN in columns:
        table["heldout"] = [columns[SPLIT_COLUMN][i] == "test" for i in keep]
        # the split is part of what a run trains on: the same texts split otherwise are other pairs
        flags = bytes(table["heldout"].astype(np.uint8).tolist())
        fingerprint = hashlib.sha256(fingerprint.encode() + b"split" + flags).hexdigest()
        if table["heldout"].all() or not table["heldout"].any():
            raise UserPairsError(
                f"the pairs {source!r}: after dropping rows, no pair is left in its "
                f"{'train' if table['heldout'].all() else 'test'} split; both splits need pairs"
            )
    return UserPairs(table, source, n_rows, counts, fingerprint)


_LOADED: dict[tuple, UserPairs] = {}


def _memo(source: str) -> tuple | None:
    """What identifies a version of the source without reading it: files' paths, sizes and times."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return ("hub", source)  # one version per process
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def user_pairs_for(cfg) -> UserPairs:
    """:func:`load_user_pairs` of ``cfg.pairs``, read once per process and version of the files."""
    memo = _memo(cfg.pairs)
    if memo not in _LOADED:
        _LOADED[memo] = load_user_pairs(cfg.pairs)
    return _LOADED[memo]


def user_pairs_key(cfg, sft_key: str) -> str:
    """The pipeline's ``pairs`` key for your pairs: their content, the split and pi_ref, never the file's name.

    So a changed file gets new caches downstream (AttentionPO weights, the reference evaluation) even at the
    same path, and the same pairs in another format or folder find them again. ``sft_key`` (pi_ref, its
    tokenizer and context) is in it as in the kit's pairs key: what is cached per pair is computed with them.
    """
    return stable_hash(
        {
            "user_pairs": user_pairs_for(cfg).fingerprint,
            "sft": sft_key,
            "heldout_share": cfg.heldout_share,
            "data_seed": cfg.data_seed,
            "version": VERSION,
        }
    )
