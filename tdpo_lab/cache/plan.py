"""The cached stages as one graph: data -> tokenizer -> SFT -> pairs -> method inputs -> reference evaluation.

``STAGES`` declares each stage once (the Config fields it depends on, the stages upstream of it); a
:class:`Plan` computes a configuration's keys from the top down, each from its upstream keys, and hands
out the cache :class:`~tdpo_lab.cache.store.Entry` of every stage. A stage's name is its cache folder
(``<cache>/<name>/<key>``).

The plan knows no product: the modules that build them (:mod:`tdpo_lab.products`) register what the plan
cannot derive from fields alone with :func:`register_stage` (the reward's key, the pairs' key when they come
from your own file), and a method's cached inputs (AttentionPO's judge weights, a plugin's own) are stages
declared by the method itself (:class:`tdpo_lab.methods.MethodInput`), read from the method registry. The
data fingerprint under every key is computed once per process (:func:`tdpo_lab.core.data.split_fingerprint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tdpo_lab.cache.store import Entry, Stage
from tdpo_lab.config import LATE_FIELDS, Config
from tdpo_lab.core.data import CLEAN_TEXT_VERSION, split_fingerprint
from tdpo_lab.methods import MethodInput, get_method, method_names

SFT_FIELDS = (
    "profile",
    "data_seed",
    "data_path",
    "max_train_reviews",
    "tokenizer",
    "vocab_size",
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "sft_steps",
    "sft_batch_size",
    "sft_block_size",
    "sft_lr",
    "sft_warmup_steps",
    "sft_weight_decay",
)
# The samples depend on the batch size (one RNG seed per batch), so it is part of the key.
PAIR_FIELDS = (
    "data_seed",
    "pair_prompts",
    "samples_per_prompt",
    "max_new_tokens",
    "min_reward_gap",
    "reward",
    "prefix_min_tokens",
    "prefix_max_tokens",
    "sample_batch_size",
)
EVAL_FIELDS = (
    "seed",
    "eval_prompts",
    "eval_samples",
    "eval_max_new_tokens",
    "eval_topk",
    "eval_pairs",
    "reward",
    "prefix_min_tokens",
    "prefix_max_tokens",
    "sample_batch_size",
)

# The evaluation pairs from IMDb test prefixes (config eval_pair_source="test"; tdpo_lab.products.eval_pairs):
# sampled from pi_ref and ranked by the reward exactly as the training pairs are, on prompts none trained on.
EVAL_PAIR_FIELDS = (
    "eval_pairs",
    "samples_per_prompt",
    "max_new_tokens",
    "min_reward_gap",
    "reward",
    "prefix_min_tokens",
    "prefix_max_tokens",
    "sample_batch_size",
)

SOURCES = ("train_data", "test_data")  # the IMDb splits: keyed by their fingerprints
STAGES: dict[str, Stage] = {
    "tokenizer": Stage(
        "tokenizer",
        fields=("tokenizer", "vocab_size", "max_train_reviews"),
        upstream=("train_data",),
        version=2,
        extra=CLEAN_TEXT_VERSION,
    ),
    "sft": Stage(
        "sft",
        fields=SFT_FIELDS,
        upstream=("train_data", "test_data", "tokenizer"),  # the test split gives the held-out loss
        version=3,  # 3: batches from tdpo_lab.core.loop.batch_schedule, the schedule preference training uses
        extra=CLEAN_TEXT_VERSION,
        # bf16/fp16 change the numbers; grad_accum_steps, like the number of processes, only splits the batch
        late=(("mixed_precision", LATE_FIELDS["mixed_precision"]),),
    ),
    "pairs": Stage("pairs", fields=PAIR_FIELDS, upstream=("train_data", "sft", "reward"), version=2),
    "eval_pairs": Stage(
        "eval_pairs", fields=EVAL_PAIR_FIELDS, upstream=("test_data", "sft", "reward", "pairs")
    ),
    "eval_ref": Stage(
        "eval_ref",
        fields=EVAL_FIELDS,
        upstream=("test_data", "sft", "pairs", "reward"),
        version=2,
        # the held-out pairs' source, added later: the reference evaluations built before keep their keys
        late=(("eval_pair_source", LATE_FIELDS["eval_pair_source"]),),
    ),
}
RUN_INPUTS = ("sft", "pairs", "reward", "eval_ref")  # what a training run fetches before its first step

# A stage whose key is not a hash of its fields: stage name -> key(plan) (None: the stage's own key)
KeyFunction = Callable[["Plan"], "str | None"]
_KEYS: dict[str, KeyFunction] = {}


def _eval_ref_key(plan: Plan) -> str | None:
    """eval_ref's key, over the evaluation pairs' key too when it evaluates them (None: its usual key)."""
    if plan.cfg.eval_pair_source == LATE_FIELDS["eval_pair_source"]:
        return None
    st = STAGES["eval_ref"]
    return plan._stage_key(dataclasses.replace(st, upstream=(*st.upstream, "eval_pairs")))


def register_stage(stage: Stage, key: KeyFunction | None = None) -> None:
    """Add (or redefine) a product's stage; ``key(plan)`` computes its key where fields alone cannot."""
    STAGES[stage.name] = stage
    if key is not None:
        _KEYS[stage.name] = key


def method_input(name: str) -> MethodInput | None:
    """The registered method input called ``name`` (its stage), or None."""
    for method in method_names():
        for item in get_method(method).inputs:
            if item.name == name:
                return item
    return None


def input_stage(item: MethodInput) -> Stage:
    """A method input's stage: keyed by the pair table, the method's knobs it names, its version and extra."""
    return Stage(item.name, fields=item.knobs, upstream=("pairs",), version=item.version, extra=item.extra)


def stage(name: str) -> Stage:
    """The stage called ``name``: a registered product or a registered method's input."""
    if name in STAGES:
        return STAGES[name]
    item = method_input(name)
    if item is None:
        known = [*SOURCES, *STAGES, *(i.name for m in method_names() for i in get_method(m).inputs)]
        raise KeyError(f"unknown stage {name!r}; the stages are {known}")
    return input_stage(item)


def run_inputs(method: str) -> tuple[str, ...]:
    """The stages a run of ``method`` fetches: every run's, then the method's own inputs."""
    return RUN_INPUTS + tuple(item.name for item in get_method(method).inputs)


_KEYS["eval_ref"] = _eval_ref_key


class Plan:
    """The stage keys and cache entries of one configuration, each key computed once from its upstream keys."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._keys: dict[str, str] = {}

    def key(self, name: str) -> str:
        """The key of stage (or data source) ``name``."""
        if name not in self._keys:
            if name in SOURCES:
                self._keys[name] = split_fingerprint(name.removesuffix("_data"), self.cfg.data_path or None)
            else:
                special = _KEYS[name](self) if name in _KEYS else None
                self._keys[name] = special if special is not None else self._stage_key(stage(name))
        return self._keys[name]

    def _stage_key(self, st: Stage) -> str:
        names = (*st.fields, *(field for field, _ in st.late))
        values = {field: getattr(self.cfg, field) for field in names}
        return st.key(values, {up: self.key(up) for up in st.upstream})

    def entry(self, name: str) -> Entry:
        """The cache entry of stage ``name``: ``<cfg.cache_path>/<name>/<key>``."""
        return Entry(self.cfg.cache_path, stage(name).name, self.key(name))
