"""The cached stages as one graph: data -> tokenizer -> SFT -> pairs -> judge weights -> reference evaluation.

``STAGES`` declares each stage once (the Config fields it depends on, the stages upstream of it); a
:class:`Plan` computes a configuration's keys from the top down, each from its upstream keys, and hands
out the cache :class:`~tdpo_lab.stages.Entry` of every stage. The modules that build the products
(:mod:`tdpo_lab.tokenizer`, :mod:`tdpo_lab.sft`, :mod:`tdpo_lab.pairs`, :mod:`tdpo_lab.train`) ask a plan
for their entry instead of recomputing their predecessors' keys, and the data fingerprint under every key
is computed once per process (:func:`tdpo_lab.stages.split_fingerprint`). Training, evaluation and
``collect`` follow the last stage.

This module sits below the builders (they import it, never the reverse), so ``train_sft(cfg)``,
``build_pairs(cfg)`` and the other public functions work on their own with a Config.

``CHAPTERS`` says which products each notebook builds or uses; :func:`chapter_needs` derives from it the
order in which ``tdpo-lab reproduce`` may run the chapters side by side.
"""

from __future__ import annotations

import dataclasses

from tdpo_lab.config import LATE_FIELDS, Config
from tdpo_lab.data import CLEAN_TEXT_VERSION
from tdpo_lab.methods.attnpo_judge import JUDGE_KEY
from tdpo_lab.reward import CLASSIFIER_STAGE, reward_key
from tdpo_lab.stages import Entry, Stage, split_fingerprint
from tdpo_lab.user_pairs import user_pairs_key

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

SOURCES = ("train_data", "test_data")  # the IMDb splits: keyed by their fingerprints
STAGES: dict[str, Stage] = {
    "tokenizer": Stage(
        "tokenizer",
        fields=("tokenizer", "vocab_size", "max_train_reviews"),
        upstream=("train_data",),
        version=2,
        extra=CLEAN_TEXT_VERSION,
    ),
    "reward": CLASSIFIER_STAGE,  # keyed by tdpo_lab.reward (it is also used without a Config)
    "sft": Stage(
        "sft",
        fields=SFT_FIELDS,
        upstream=("train_data", "test_data", "tokenizer"),  # the test split gives the held-out loss
        version=3,  # 3: batches from tdpo_lab.loop.batch_schedule, the schedule preference training uses
        extra=CLEAN_TEXT_VERSION,
        # bf16/fp16 change the numbers; grad_accum_steps, like the number of processes, only splits the batch
        late=(("mixed_precision", LATE_FIELDS["mixed_precision"]),),
    ),
    "pairs": Stage("pairs", fields=PAIR_FIELDS, upstream=("train_data", "sft", "reward"), version=2),
    "judge": Stage(
        "attnpo",
        fields=("attn_layer", "attn_layer_mean", "attn_fix_sink"),
        upstream=("pairs",),
        version=2,
        extra=JUDGE_KEY,  # both judge texts (plain, chat) and the sink threshold: a new template, new weights
    ),
    "reference_eval": Stage(
        "eval_ref", fields=EVAL_FIELDS, upstream=("test_data", "sft", "pairs", "reward"), version=2
    ),
}


class Plan:
    """The stage keys and cache entries of one configuration, each key computed once from its upstream keys."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._keys: dict[str, str] = {}

    def key(self, name: str) -> str:
        """The key of stage (or data source) ``name``."""
        if name not in self._keys:
            data = self.cfg.data_path or None
            if name in SOURCES:
                self._keys[name] = split_fingerprint(name.removesuffix("_data"), data)
            elif name == "reward":
                self._keys[name] = reward_key(self.cfg.reward, data)
            elif name == "pairs" and self.cfg.pairs:  # your own pairs: keyed by their content and split
                self._keys[name] = user_pairs_key(self.cfg, self.key("sft"))
            elif name in STAGES:
                stage = STAGES[name]
                names = (*stage.fields, *(field for field, _ in stage.late))
                values = {field: getattr(self.cfg, field) for field in names}
                self._keys[name] = stage.key(values, {up: self.key(up) for up in stage.upstream})
            else:
                raise KeyError(f"unknown stage {name!r}; the stages are {[*SOURCES, *STAGES]}")
        return self._keys[name]

    def entry(self, name: str) -> Entry:
        """The cache entry of stage ``name``: ``<cfg.cache_path>/<stage folder>/<key>``."""
        return Entry(self.cfg.cache_path, STAGES[name].name, self.key(name))


def plan(cfg: Config) -> Plan:
    """A fresh :class:`Plan` of ``cfg`` (cheap: the data fingerprints behind it are kept per process)."""
    return Plan(cfg)


# --- the chapters ---------------------------------------------------------------------------------------
RUN_INPUTS = ("sft", "pairs", "reward", "reference_eval")  # what train() fetches before its first step
METHOD_INPUTS = {"attnpo": ("judge",)}


@dataclasses.dataclass(frozen=True)
class Chapter:
    """What a notebook's cells build and use. A product is a stage name or ``"run:<method>"``.

    ``builds``: products it builds itself (their inputs it waits for). ``uses``: products of earlier
    chapters it needs from its first cells. ``compares``: runs it trains, if missing, only in its last
    cells, to compare with: the run folder's lock is enough there, so it does not wait for them.
    ``after``: a scheduling choice with no product behind it.
    """

    builds: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    compares: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


CHAPTERS: dict[str, Chapter] = {
    "00": Chapter(builds=("train_data", "test_data", "tokenizer", "reward")),
    "01": Chapter(builds=("sft",)),
    "02": Chapter(builds=("pairs",)),
    "03": Chapter(),  # tensors only
    "04": Chapter(builds=("reference_eval", "run:dpo")),
    "05": Chapter(builds=("reference_eval", "run:tdpo1", "run:tdpo2"), uses=("run:dpo",)),
    "06": Chapter(builds=("reference_eval", "run:tidpo"), compares=("run:dpo",)),
    # 04-05 and 06-07 are two lanes of two chapters: with --jobs 2 they run side by side
    "07": Chapter(builds=("judge", "reference_eval", "run:attnpo"), compares=("run:dpo",), after=("06",)),
    "08": Chapter(uses=("run:dpo", "run:tdpo1", "run:tdpo2", "run:tidpo", "run:attnpo")),
}


def _inputs(product: str) -> tuple[str, ...]:
    if product.startswith("run:"):
        return RUN_INPUTS + METHOD_INPUTS.get(product.removeprefix("run:"), ())
    return STAGES[product].upstream if product in STAGES else ()


def chapter_needs(chapters: dict[str, Chapter] | None = None) -> dict[str, tuple[str, ...]]:
    """Which earlier chapters each chapter waits for, derived from ``CHAPTERS``.

    A chapter waits for the first chapter that builds each product it uses or that its own products are
    built from (all the way upstream), plus its ``after``; a chapter already implied by another is
    dropped. Gives the table ``tdpo-lab reproduce`` schedules by.
    """
    chapters = CHAPTERS if chapters is None else chapters
    order = sorted(chapters)
    owner: dict[str, str] = {}
    for name in order:
        for product in chapters[name].builds:
            owner.setdefault(product, name)
    needs: dict[str, tuple[str, ...]] = {}
    ancestors: dict[str, set[str]] = {}
    for name in order:
        chapter = chapters[name]
        wanted, stack = set(chapter.uses), [*chapter.builds, *chapter.uses]
        while stack:  # everything upstream of what it builds or uses
            for up in _inputs(stack.pop()):
                if up not in wanted:
                    wanted.add(up)
                    stack.append(up)
        wanted -= set(chapter.builds) | set(chapter.compares)
        direct = {owner[p] for p in wanted if p in owner and owner[p] < name} | set(chapter.after)
        ancestors[name] = direct.union(*(ancestors[d] for d in direct))
        implied = set().union(*(ancestors[d] for d in direct))
        needs[name] = tuple(sorted(direct - implied))
    return needs
