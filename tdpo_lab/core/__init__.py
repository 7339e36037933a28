"""The core: tensors, models and data, with no notion of a method, a cache or a run.

Log-probabilities and the exact per-position KL (:mod:`.logprobs`), the IMDb data and the batch collation
(:mod:`.data`), models (:mod:`.models`, :mod:`.smol`), sampling (:mod:`.generation`, :mod:`.kv_steps`),
evaluation (:mod:`.evaluate`), the one resumable training loop (:mod:`.loop`), saved model folders
(:mod:`.export`), JSON-lines logs (:mod:`.jsonl`), processes and devices (:mod:`.distributed`, :mod:`.utils`).
What the chapters use is importable from here.
"""

from tdpo_lab.core.data import (
    clean_text,
    collate_ids,
    collate_preference_batch,
    load_imdb,
    make_prefixes,
)
from tdpo_lab.core.evaluate import evaluate_policy, evaluate_samples, pair_seqkl
from tdpo_lab.core.generation import decode_response, encode_prompts, sample, sample_ids_fast
from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.core.logprobs import IGNORE_INDEX, TokenStats, token_stats
from tdpo_lab.core.loop import TrainingLoop, batch_schedule
from tdpo_lab.core.models import build_model, load_model
from tdpo_lab.core.smol import smol_missing
from tdpo_lab.core.utils import eval_mode, seed_everything, select_device, set_threads

__all__ = [
    "IGNORE_INDEX",
    "TokenStats",
    "TrainingLoop",
    "batch_schedule",
    "build_model",
    "clean_text",
    "collate_ids",
    "collate_preference_batch",
    "decode_response",
    "encode_prompts",
    "eval_mode",
    "evaluate_policy",
    "evaluate_samples",
    "load_imdb",
    "load_model",
    "make_prefixes",
    "pair_seqkl",
    "read_jsonl",
    "sample",
    "sample_ids_fast",
    "seed_everything",
    "select_device",
    "set_threads",
    "smol_missing",
    "token_stats",
]
