"""IMDb reviews in, tensors out: loading, cleaning, prompt prefixes and preference-batch collation.

The batch layout is the one of docs/methods.md section 1: for B preference pairs the collated batch has
N = 2B rows, rows ``[:B]`` are prompt + chosen and rows ``[B:]`` prompt + rejected, right-padded with
the EOS token, and ``labels`` equals ``input_ids`` with the prompt and the padding set to -100.

Without a local folder the data comes from the Hugging Face hub, asked only when
:func:`tdpo_lab.core.hub.hub_status` says it is reachable.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tdpo_lab.core.hub import hub_status
from tdpo_lab.core.logprobs import IGNORE_INDEX

IMDB_ENV_VAR = "TDPO_LAB_IMDB"
IMDB_HUB_NAME = "stanfordnlp/imdb"
SPLITS = ("train", "test")
LABEL_NAMES = ["neg", "pos"]
# Bump when clean_text changes its output: caches built on cleaned text (tokenizer, reward) key on it.
CLEAN_TEXT_VERSION = 1

HOW_TO_PROVIDE = (
    "Provide the IMDb data in one of two ways: (1) a folder holding train.parquet and test.parquet with "
    "the columns 'text' (string) and 'label' (0 = negative, 1 = positive), the schema of stanfordnlp/imdb, "
    f"passed as load_imdb(split, path=...) (config key data_path) or set in the environment variable "
    f"{IMDB_ENV_VAR}; or (2) leave both unset and make the Hugging Face hub reachable so that "
    f"{IMDB_HUB_NAME!r} can be downloaded."
)


class DataError(ValueError):
    """The data is missing, malformed, or a collation input is invalid."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data folder or split file does not exist (also a FileNotFoundError, so callers may catch either)."""


# --- loading --------------------------------------------------------------------------------------
def load_imdb(split: str, path: str | os.PathLike | None = None):
    """Load one IMDb split as a ``datasets.Dataset`` with features ``text: string``, ``label: ClassLabel``.

    Source, first that applies: ``path``; the folder in ``$TDPO_LAB_IMDB``; the hub's
    ``stanfordnlp/imdb``. Always through ``datasets.load_dataset`` (the ``parquet`` builder for a
    folder), so local and hub data share one code path. Labels: 0 = ``neg``, 1 = ``pos``.

    Raises :class:`DataError` (or its subclass :class:`DataNotFoundError`) naming the missing folder,
    file or column and both ways to provide the data.
    """
    if split not in SPLITS:
        raise DataError(f"unknown IMDb split {split!r}; choose one of {SPLITS}")
    if path is not None and str(path) != "":
        ds = _load_local(split, Path(path).expanduser(), origin="path=")
    elif os.environ.get(IMDB_ENV_VAR):
        ds = _load_local(split, Path(os.environ[IMDB_ENV_VAR]).expanduser(), origin=f"${IMDB_ENV_VAR}")
    else:
        ds = _load_hub(split)
    return _standardise(ds, where=f"IMDb split {split!r}")


def _load_local(split: str, folder: Path, origin: str):
    import datasets

    if not folder.exists():
        raise DataNotFoundError(
            f"the IMDb folder {str(folder)!r} (from {origin}) does not exist. {HOW_TO_PROVIDE}"
        )
    if not folder.is_dir():
        raise DataNotFoundError(f"{str(folder)!r} (from {origin}) is a file, not a folder. {HOW_TO_PROVIDE}")
    file = folder / f"{split}.parquet"
    if not file.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise DataNotFoundError(
            f"the IMDb folder {str(folder)!r} (from {origin}) has no split file {file.name!r} "
            f"(it holds: {present or 'nothing'}). {HOW_TO_PROVIDE}"
        )
    try:
        return datasets.load_dataset("parquet", data_files={split: str(file)}, split=split)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name and the remedy
        raise DataError(f"could not read {str(file)!r} as parquet ({exc}). {HOW_TO_PROVIDE}") from exc


def _load_hub(split: str):
    import datasets

    reason = hub_status()
    # datasets reads its offline switch at import time; with it on, a cached copy loads without network.
    if reason is not None and not datasets.config.HF_HUB_OFFLINE:
        raise DataNotFoundError(
            f"no IMDb path was given, {IMDB_ENV_VAR} is not set, and the Hugging Face hub cannot be used "
            f"({reason}). {HOW_TO_PROVIDE}"
        )
    try:
        return datasets.load_dataset(IMDB_HUB_NAME, split=split)
    except Exception as exc:  # noqa: BLE001 - wrapped so the user sees both ways to provide the data
        raise DataNotFoundError(
            f"no IMDb path was given, {IMDB_ENV_VAR} is not set, and loading {IMDB_HUB_NAME!r} from the "
            f"Hugging Face hub failed ({type(exc).__name__}: {exc}). {HOW_TO_PROVIDE}"
        ) from exc


def _standardise(ds, where: str):
    """Keep ``text``/``label``, check them, and give them the features of ``stanfordnlp/imdb``."""
    import datasets

    missing = [c for c in ("text", "label") if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where} is missing the column(s) {missing} (it has {ds.column_names}). {HOW_TO_PROVIDE}"
        )
    ds = ds.select_columns(["text", "label"])
    text_feature, label_feature = ds.features["text"], ds.features["label"]
    if not (isinstance(text_feature, datasets.Value) and text_feature.dtype in ("string", "large_string")):
        raise DataError(f"{where}: column 'text' must hold strings, found {text_feature}")
    if isinstance(label_feature, datasets.ClassLabel):
        if label_feature.names != LABEL_NAMES:  # other names: compare integer codes only
            ds = ds.cast_column("label", datasets.Value("int64"))
    elif not (isinstance(label_feature, datasets.Value) and "int" in label_feature.dtype):
        raise DataError(f"{where}: column 'label' must hold integers 0/1, found {label_feature}")
    labels = np.asarray(ds["label"])
    bad = sorted(set(np.unique(labels).tolist()) - {0, 1})
    if bad:
        raise DataError(f"{where}: column 'label' must be 0 (negative) or 1 (positive), found values {bad}")
    if any(t is None for t in ds["text"]):
        raise DataError(f"{where}: column 'text' has missing values")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=LABEL_NAMES)}
    )
    return ds.cast(features)


# --- text -----------------------------------------------------------------------------------------
_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_SPACES = re.compile(r"[^\S\n]+")  # whitespace runs that contain no newline
_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters other than \t \n \r


def clean_text(text: str) -> str:
    """Turn IMDb's HTML line breaks into newlines and normalise whitespace.

    ``<br />``, ``<br/>``, ``<br>``, ``<BR />`` become ``"\\n"`` (two in a row make a paragraph break);
    ``\\"`` becomes ``"`` (the offline sample, exported from R, escapes every double quote; the hub's
    copy does not); control characters are dropped; runs of spaces and tabs become one space; spaces
    next to a newline and blank lines beyond one are dropped; the ends are stripped.

    >>> clean_text("Great  film.<br /><br />Loved it. ")
    'Great film.\\n\\nLoved it.'
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_text expects a str, got {type(text).__name__}")
    text = _BR.sub("\n", text).replace('\\"', '"')
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _AROUND_NEWLINE.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def dataset_fingerprint(ds) -> str:
    """sha256 (hex) of a dataset's texts and labels, in order: the cache key of anything trained on it.

    Each text is hashed with its byte length in front, so that no two different datasets collide by
    moving characters across a text boundary.
    """
    try:
        texts, labels = ds["text"], ds["label"]
    except (KeyError, ValueError) as exc:
        raise DataError(f"dataset_fingerprint needs the columns 'text' and 'label' ({exc})") from exc
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        blob = text.encode("utf-8")
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)
        digest.update(int(label).to_bytes(8, "little", signed=True))
    return digest.hexdigest()


def make_prefixes(
    texts: Sequence[str], tokenizer, *, min_tokens: int = 2, max_tokens: int = 8, seed: int = 0
) -> list[str]:
    """Prompt prefixes as in the DPO/TDPO IMDb experiment: the first k tokens of each cleaned review.

    k ~ Uniform{min_tokens, ..., max_tokens}, one draw per text from ``numpy.random.default_rng(seed)``
    (all drawn up front, so one text never shifts another's k). The result is ``decode(ids[:k])`` of
    the cleaned text, which for a byte-level BPE is a literal prefix of that text. A review shorter
    than k tokens gives all of it. A cut inside a multi-byte UTF-8 character (byte-level tokens) is
    moved forward by up to 3 tokens to the end of that character, so a prefix is always valid text.
    """
    if not (isinstance(min_tokens, int) and isinstance(max_tokens, int) and 1 <= min_tokens <= max_tokens):
        raise DataError(f"need integers 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"texts[{i}] is a {type(text).__name__}, expected str")
    rng = np.random.default_rng(seed)
    ks = rng.integers(min_tokens, max_tokens + 1, size=len(texts))
    cleaned = [clean_text(t) for t in texts]
    if not cleaned:
        return []
    # whole reviews, longer than the model's context on purpose (only a prefix is kept): no too-long warning
    encoded = tokenizer(cleaned, add_special_tokens=False, verbose=False)["input_ids"]
    prefixes = []
    for i, (ids, k) in enumerate(zip(encoded, ks, strict=True)):
        if not ids:
            raise DataError(f"texts[{i}] is empty after cleaning: a prefix needs at least one token")
        k = int(k)
        prefix = tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False)
        # U+FFFD at the end means the last token ended mid-character: take the character's remaining bytes.
        extra = 0
        while prefix.endswith("\ufffd") and k + extra < len(ids) and extra < 3:
            extra += 1
            prefix = tokenizer.decode(ids[: k + extra], clean_up_tokenization_spaces=False)
        prefixes.append(prefix)
    return prefixes


# --- collation ------------------------------------------------------------------------------------
def _check_texts(name: str, values: Sequence[str]) -> list[str]:
    values = list(values) if not isinstance(values, str) else None
    if values is None:
        raise DataError(f"{name} must be a list of strings, got a single str")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{name}[{i}] is a {type(v).__name__}, expected str")
    return values


def collate_sequences(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], *, max_length: int | None = None
):
    """Tokenise prompt + response rows into right-padded tensors (evaluation, anchors, preference pairs).

    Each prompt and each response is tokenised on its own (``add_special_tokens=False``); the response
    gets the EOS token appended: row = prompt_ids + response_ids + [eos], padded on the right with eos.

    Returns a dict of ``torch.long`` tensors, N = len(prompts), T = the longest row:

    - ``input_ids`` ``[N, T]``; ``attention_mask`` ``[N, T]`` (1 on real tokens, 0 on padding);
    - ``labels`` ``[N, T]``: ``input_ids`` with prompt and padding positions set to -100, so that after
      the shift (``logits[:, :-1]`` predicts ``labels[:, 1:]``) only response tokens and the EOS count;
    - ``prompt_lengths`` ``[N]`` and ``response_lengths`` ``[N]`` (response tokens including the EOS).

    ``max_length`` caps each row at that many tokens by cutting the end of the response (a cut response
    loses its EOS: it did not end there); a prompt that leaves no room for one response token is an error.
    """
    prompts = _check_texts("prompts", prompts)
    responses = _check_texts("responses", responses)
    if not prompts:
        raise DataError("prompts is empty: collate at least one prompt/response row")
    if len(prompts) != len(responses):
        raise DataError(f"prompts and responses differ in length ({len(prompts)} vs {len(responses)})")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token: set tokenizer.eos_token (GPT-2: '<|endoftext|>')")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise DataError(
            f"max_length must be an int >= 2 (one prompt and one response token), got {max_length!r}"
        )
    for i, r in enumerate(responses):
        if r == "":
            raise DataError(
                f"responses[{i}] is empty: every response needs at least one token before the EOS"
            )
    # with max_length a long response is cut below, so the tokenizer's too-long warning would mislead
    verbose = max_length is None
    prompt_ids = tokenizer(prompts, add_special_tokens=False, verbose=verbose)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False, verbose=verbose)["input_ids"]

    kept_prompts, kept_responses = [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if not p:
            raise DataError(
                f"prompts[{i}] has no tokens: the first response token must be predicted from at least one "
                "prompt token (use tokenizer.eos_token as the prompt for unconditional text)"
            )
        r = list(r) + [eos]
        if max_length is not None:
            room = max_length - len(p)
            if room < 1:
                raise DataError(
                    f"prompts[{i}] has {len(p)} tokens, so max_length={max_length} leaves no room for a "
                    "response; raise max_length or shorten the prompt"
                )
            r = r[:room]
        kept_prompts.append(list(p))
        kept_responses.append(r)
    batch = collate_ids(kept_prompts, kept_responses, eos)
    batch["prompt_lengths"] = torch.tensor([len(p) for p in kept_prompts], dtype=torch.long)
    batch["response_lengths"] = torch.tensor([len(r) for r in kept_responses], dtype=torch.long)
    return batch


def collate_ids(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt ids + response ids`` rows from token ids as they are (nothing is tokenised).

    Returns ``input_ids``, ``attention_mask`` and ``labels`` ``[N, T]`` (``torch.long``) laid out as in
    :func:`collate_sequences`: ``pad_id`` on the right, ``labels`` = ``input_ids`` on the response and
    -100 on the prompt and the padding. Evaluation scores the exact ids a policy sampled this way
    (re-tokenising the decoded text could split it differently).
    """
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompt_ids, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = input_ids[i, len(prompt) : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_preference_batch(
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    max_length: int | None = None,
):
    """Stack B preference pairs into N = 2B rows: ``[:B]`` prompt + chosen, ``[B:]`` prompt + rejected.

    Same keys, shapes and rules as :func:`collate_sequences` with N = 2B (docs/methods.md section 1): both
    halves share one padded length T so that row i and row i + B are the two sides of pair i.
    """
    prompts = _check_texts("prompts", prompts)
    chosen = _check_texts("chosen", chosen)
    rejected = _check_texts("rejected", rejected)
    if not prompts:
        raise DataError("prompts is empty: a preference batch needs at least one pair")
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise DataError(
            f"prompts, chosen and rejected must have equal lengths, got {len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    for name, values in (("chosen", chosen), ("rejected", rejected)):
        for i, v in enumerate(values):
            if v == "":
                raise DataError(
                    f"{name}[{i}] is empty: every response needs at least one token before the EOS"
                )
    return collate_sequences(tokenizer, prompts + prompts, chosen + rejected, max_length=max_length)


# --- the source data --------------------------------------------------------------------------------
_FINGERPRINTS: dict[tuple, str] = {}


def split_fingerprint(split: str, data_path: str | os.PathLike | None = None) -> str:
    """``dataset_fingerprint`` of one IMDb split, computed once per process and version of its file.

    Every stage key starts from the data's fingerprint; hashing 25,000 reviews (and loading them) for
    each key would repeat the same work several times per call, so the result is kept, keyed on the
    parquet file's path, size and modification time (hub data: per process).
    """
    source = str(data_path or "") or os.environ.get(IMDB_ENV_VAR, "")
    memo: tuple | None = ("hub", split)
    if source:
        file = Path(source).expanduser() / f"{split}.parquet"
        try:
            stat = file.stat()
            memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        except OSError:
            memo = None  # load_imdb below raises the DataError that names the missing file
    if memo in _FINGERPRINTS:
        return _FINGERPRINTS[memo]
    fingerprint = dataset_fingerprint(load_imdb(split, source or None))
    if memo is not None:
        _FINGERPRINTS[memo] = fingerprint
    return fingerprint
