"""The smallest configuration the end-to-end command-line tests train (seconds a run), as --set arguments."""

from __future__ import annotations

SMALL = {
    "max_train_reviews": 300,
    "vocab_size": 512,
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 32,
    "n_positions": 192,
    "sft_steps": 10,
    "sft_block_size": 48,
    "pair_prompts": 8,
    "samples_per_prompt": 3,
    "max_new_tokens": 8,
    "train_steps": 2,
    "batch_size": 2,
    "eval_every": 1,
    "eval_prompts": 2,
    "eval_samples": 2,
    "eval_max_new_tokens": 6,
    "eval_pairs": 2,
    "anchor_max_new_tokens": 4,
}


def small_cli_args(imdb_path, cache, **overrides) -> list[str]:
    """``--fast --quiet --set KEY=VALUE ...``: the data, a cache of the test's own, :data:`SMALL`, ``overrides``."""
    values = {"data_path": imdb_path, "cache_dir": cache, **SMALL, **overrides}
    return [
        "--fast",
        "--quiet",
        *[arg for key, value in values.items() for arg in ("--set", f"{key}={value}")],
    ]
