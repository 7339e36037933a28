"""Synthetic runs with a known frontier and known noise: per-prompt results tables and run folders.

Each method has settings (betas) that move at their own speed along the method's true frontier
f(k) = base + gain * (1 - exp(-k / scale)); a (setting, step, seed) point sits at KL k = speed * step, its
prompts' rewards are f(k) + a seed effect + a prompt effect (shared by every run, as the kit's fixed prompts
are) + noise. Held-out SeqKL: chosen k, rejected k * rho (the method's imbalance), per pair, with noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

STEPS = (0, 40, 80, 120, 160, 200, 240)


def true_frontier(k, base=0.5, gain=0.2, scale=2.0):
    return base + gain * (1.0 - np.exp(-np.asarray(k, dtype=float) / scale))


def synthetic_table(
    methods: dict,
    *,
    seeds=(0, 1, 2),
    n_prompts=16,
    n_pairs=12,
    sd_seed=0.01,
    sd_prompt=0.05,
    sd_noise=0.05,
    rng_seed=0,
) -> pd.DataFrame:
    """Rows like ``collect(root, per_prompt=True)``: ``methods[name] = dict(speeds=[...], gain=, rho=)``."""
    rng = np.random.default_rng(rng_seed)
    prompt_effect = rng.normal(0, sd_prompt, n_prompts)
    prompt_kl = np.exp(0.3 * rng.normal(size=n_prompts))
    prompt_kl /= prompt_kl.mean()
    pair_prompts = np.repeat(np.arange(n_pairs // 3), 3)[:n_pairs]
    rows = []
    for method, spec in methods.items():
        for beta, speed in zip(spec.get("betas", range(len(spec["speeds"]))), spec["speeds"], strict=True):
            for seed in seeds:
                for step in STEPS:
                    k = speed * step / 40.0
                    kl = k * prompt_kl * (1 + 0.05 * rng.normal(size=n_prompts))
                    reward = (
                        true_frontier(k, gain=spec.get("gain", 0.2))
                        + (rng.normal(0, sd_seed) if step else 0.0)
                        + prompt_effect
                        + rng.normal(0, sd_noise, n_prompts)
                    )
                    chosen = k * (1 + 0.1 * rng.normal(size=n_pairs)) if step else np.zeros(n_pairs)
                    rho = spec.get("rho", 1.0)
                    rho = rho(k) if callable(rho) else rho
                    rejected = chosen * rho * (1 + 0.02 * rng.normal(size=n_pairs))
                    rows.append(
                        {
                            "run": f"{method}_beta{beta:g}_seed{seed}",
                            "method": method,
                            "beta": float(beta),
                            "alpha": 0.5,
                            "seed": seed,
                            "profile": "tiny",
                            "setting": f"{method}{beta:g}",
                            "step": step,
                            "reward": float(reward.mean()),
                            "kl_seq": float(kl.mean()),
                            "kl_seq_chosen": float(chosen.mean()),
                            "kl_seq_rejected": float(rejected.mean()),
                            "prompt_ids": list(range(n_prompts)),
                            "reward_per_prompt": [float(v) for v in reward],
                            "kl_seq_per_prompt": [float(v) for v in kl],
                            "kl_seq_chosen_per_pair": [float(v) for v in chosen],
                            "kl_seq_rejected_per_pair": [float(v) for v in rejected],
                            "pair_prompt_ids": [int(v) for v in pair_prompts],
                        }
                    )
    return pd.DataFrame(rows)


def write_run_folders(table: pd.DataFrame, root: Path, *, finished: bool = True) -> Path:
    """One run folder per run of ``table`` (config.json, eval.jsonl; ``policy/config.json`` when finished)."""
    for run, rows in table.groupby("run"):
        folder = Path(root) / run
        folder.mkdir(parents=True, exist_ok=True)
        first = rows.iloc[0]
        config = {
            k: first[k].item() if hasattr(first[k], "item") else first[k]
            for k in ("method", "beta", "alpha", "seed", "profile")
        }
        config["train_steps"] = 240
        (folder / "config.json").write_text(json.dumps(config))
        keep = [c for c in rows.columns if c not in ("run", "profile", "setting")]
        lines = [json.dumps({k: _plain(v) for k, v in r.items()}) for r in rows[keep].to_dict("records")]
        (folder / "eval.jsonl").write_text("\n".join(lines) + "\n")
        if finished:
            (folder / "policy").mkdir(exist_ok=True)
            (folder / "policy" / "config.json").write_text("{}")
    return Path(root)


def _plain(value):
    return value.item() if hasattr(value, "item") else value
