"""Seconds per training step of each method on the tiny profile, as a ratio to DPO's.

Same model (the tiny profile's architecture, 8,192-entry vocabulary), same batches of pairs for every
method; AttentionPO's weights are computed beforehand (as the training loop caches them), TI-DPO pays for
its gradient attribution and its triplet anchor every step. Methods are timed round-robin, so drift in
the machine's speed hits all of them alike; the table reports the median over steps. A last line times
the TI-DPO anchor's draw alone, on the first batch's prompts, round-robin: ``generate``
(:func:`tdpo_lab.core.generation.sample_ids`), the KV-cache loop through the model's own forward
(:class:`tdpo_lab.core.kv_steps.ModelSteps`) and the loop the training step uses
(:func:`tdpo_lab.core.generation.sample_ids_fast`, with :class:`tdpo_lab.core.kv_steps.GPT2Steps` on GPT-2).

    python benchmarks/bench_train_step.py --steps 10 --warmup 2 --threads 1
    python benchmarks/bench_train_step.py --steps 10 --warmup 2 --threads 1 --precision fp32,bf16 --eval-repeats 1

``--precision fp32,bf16`` times every method in both precisions on the same batches, alternating which runs
first, in one run (bf16: forward passes under CPU autocast, statistics and losses in fp32,
:mod:`tdpo_lab.core.precision`); ``--eval-repeats`` adds one ``evaluate_policy`` per precision. The table states
the 1-minute load average at the start and the end.

Targets on the 2-core development machine: TDPO2 <= 1.15x DPO, AttentionPO <= 1.05x, TI-DPO <= 1.8x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import numpy as np
import pandas as pd
import torch

from tdpo_lab.config import load_config
from tdpo_lab.core.data import clean_text, load_imdb, make_prefixes
from tdpo_lab.core.evaluate import evaluate_policy
from tdpo_lab.core.generation import sample_ids, sample_ids_fast
from tdpo_lab.core.kv_steps import GPT2Steps
from tdpo_lab.core.models import build_model
from tdpo_lab.core.precision import forward_autocast, native_bf16
from tdpo_lab.core.utils import seed_everything
from tdpo_lab.methods import method_names
from tdpo_lab.methods.attnpo_judge import attention_weights
from tdpo_lab.products import evaluation_prompts, get_reward
from tdpo_lab.products.tokenizer import get_tokenizer
from tdpo_lab.runs.train import compute_loss

TARGETS = {"dpo": 1.0, "tdpo1": None, "tdpo2": 1.15, "attnpo": 1.05, "tidpo": 1.8}


def synthetic_pairs(tokenizer, cfg, n: int, split: str = "train") -> pd.DataFrame:
    """Pairs of real review text: a 2-8 token prefix and two continuations of about max_new_tokens tokens."""
    reviews = load_imdb(split, cfg.data_path or None)
    texts = [clean_text(t) for t in reviews["text"][: 2 * n]]
    prompts = make_prefixes(texts[:n], tokenizer, seed=0)

    def continuation(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][8 : 8 + cfg.max_new_tokens]
        return tokenizer.decode(ids)

    return pd.DataFrame(
        {
            "prompt": prompts,
            "chosen": [continuation(t) for t in texts[:n]],
            "rejected": [continuation(t) for t in texts[n:]],
            "pair_id": np.arange(n),
        }
    )


def model_steps_only(*args, **kwargs):
    """:func:`sample_ids_fast` with the model's own forward at every step (no :class:`GPT2Steps`)."""
    with mock.patch.object(GPT2Steps, "applies", staticmethod(lambda model: False)):
        return sample_ids_fast(*args, **kwargs)


def anchor_times(policy, tokenizer, prompts: list[str], cfg, repeats: int) -> dict[str, float]:
    """Median seconds of one TI-DPO anchor draw (``len(prompts)`` rows, ``cfg.anchor_*``) per sampler."""
    kwargs = dict(
        num_samples=1,
        max_new_tokens=cfg.anchor_max_new_tokens,
        temperature=cfg.anchor_temperature,
        top_k=cfg.anchor_top_k,
        top_p=cfg.anchor_top_p,
        batch_size=len(prompts),
    )
    samplers = {"generate": sample_ids, "model forward": model_steps_only, "training": sample_ids_fast}
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for rep in range(repeats + 1):  # the first round warms all up and is not counted
        for name, fn in samplers.items():
            started = time.perf_counter()
            fn(policy, tokenizer, prompts, seed=rep, **kwargs)
            if rep > 0:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # --precision name -> Config.mixed_precision


def load_line() -> str:
    return "1-minute load average {:.2f} (5-min {:.2f}, 15-min {:.2f})".format(*os.getloadavg())


def step_times(policy, reference, tokenizer, pairs, attn, cfg, args, precisions) -> dict:
    """Seconds of every timed step per (method, precision): round-robin, precisions alternating per step."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)  # lr 0: every method sees the same model
    times: dict[tuple[str, str], list[float]] = {(m, p): [] for m in method_names() for p in precisions}
    for step in range(args.warmup + args.steps):
        rows = pairs.iloc[step * args.batch_size : (step + 1) * args.batch_size]
        order = precisions if step % 2 == 0 else precisions[::-1]  # neither always runs first
        for method in method_names():
            for precision in order:
                mcfg = cfg.replace(method=method, mixed_precision=PRECISIONS[precision])
                started = time.perf_counter()
                state = attn if method == "attnpo" else None  # the per-pair state only AttentionPO reads
                loss, _ = compute_loss(policy, reference, tokenizer, rows, mcfg, step_seed=step, state=state)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()
                if step >= args.warmup:
                    times[method, precision].append(time.perf_counter() - started)
    return times


def evaluation_times(policy, reference, tokenizer, cfg, precisions, repeats: int) -> dict[str, float]:
    """Median seconds of one ``evaluate_policy`` (the profile's prompts and samples) per precision.

    "bf16" times it under the CPU autocast the training step uses (what a bf16 evaluation would cost); the
    kit evaluates in fp32 in every precision.
    """
    if repeats <= 0:
        return {}
    reward = get_reward(cfg)
    prompts = evaluation_prompts(cfg, tokenizer)
    heldout = synthetic_pairs(tokenizer, cfg, cfg.eval_pairs, split="test")
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for rep in range(repeats):
        for precision in precisions if rep % 2 == 0 else precisions[::-1]:
            pcfg = cfg.replace(mixed_precision=PRECISIONS[precision])
            started = time.perf_counter()
            with forward_autocast(pcfg, "cpu"):
                evaluate_policy(policy, reference, tokenizer, reward, prompts, cfg, pairs=heldout, seed=rep)
            times[precision].append(time.perf_counter() - started)
    return {p: statistics.median(v) for p, v in times.items()}


def sft_times(cfg, tokenizer, precisions, steps: int) -> dict[str, float]:
    """Median seconds of one SFT step (``sft_batch_size`` blocks of ``sft_block_size`` tokens, AdamW) per precision."""
    model = build_model(cfg, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for step in range(steps + 1):  # the first round warms up and is not counted
        batch = torch.randint(len(tokenizer), (cfg.sft_batch_size, cfg.sft_block_size), generator=gen)
        for precision in precisions if step % 2 == 0 else precisions[::-1]:
            pcfg = cfg.replace(mixed_precision=PRECISIONS[precision])
            started = time.perf_counter()
            with forward_autocast(pcfg, "cpu"):
                loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step > 0:
                times[precision].append(time.perf_counter() - started)
    return {p: statistics.median(v) for p, v in times.items()} if steps > 0 else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (interleaved)")
    parser.add_argument("--eval-repeats", type=int, default=0, help="timed evaluations per precision")
    parser.add_argument(
        "--eval-prompts", type=int, default=0, help="prompts per evaluation (0: the profile's)"
    )
    parser.add_argument("--sft-steps", type=int, default=0, help="timed SFT steps per precision")
    parser.add_argument("--anchor-repeats", type=int, default=10, help="timed anchor draws per sampler")
    args = parser.parse_args()
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        parser.error(
            f"--precision takes a comma-separated list of {list(PRECISIONS)}, got {args.precision!r}"
        )
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", fast=False, batch_size=args.batch_size)
    seed_everything(0)
    tokenizer = get_tokenizer(cfg)
    reference = build_model(cfg, tokenizer).eval().requires_grad_(False)
    policy = build_model(cfg, tokenizer)
    policy.load_state_dict(reference.state_dict())
    judge = build_model(cfg, tokenizer, attn_implementation="eager")
    judge.load_state_dict(reference.state_dict())
    judge.eval()
    n = args.batch_size * (args.steps + args.warmup)
    pairs = synthetic_pairs(tokenizer, cfg, n)
    attn = [attention_weights(judge, tokenizer, r.prompt, r.chosen, r.rejected) for r in pairs.itertuples()]

    print(
        f"CPU: torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {native_bf16()}"
    )
    load_start = load_line()
    times = step_times(policy, reference, tokenizer, pairs, attn, cfg, args, precisions)
    ecfg = cfg.replace(eval_prompts=args.eval_prompts) if args.eval_prompts else cfg
    evals = evaluation_times(policy, reference, tokenizer, ecfg, precisions, args.eval_repeats)
    sft = sft_times(cfg, tokenizer, precisions, args.sft_steps)
    load_end = load_line()

    print(
        f"tiny profile: {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {len(tokenizer)}, "
        f"{args.batch_size} pairs per step, {args.steps} timed steps, torch threads {args.threads}, "
        f"precisions {precisions} interleaved\nat start: {load_start}\nat end:   {load_end}\n"
    )
    base = {p: statistics.median(times["dpo", p]) for p in precisions}
    head = " | ".join(f"{p} s/step | {p} x DPO" for p in precisions)
    ratio = [f"{precisions[1]}/{precisions[0]}"] if len(precisions) > 1 else []
    print(f"| method | {head} | {' | '.join(ratio + ['target'])} |")
    print("|---" * (2 + 2 * len(precisions) + len(ratio)) + "|")
    for method in method_names():
        meds = {p: statistics.median(times[method, p]) for p in precisions}
        cells = " | ".join(f"{meds[p]:.3f} | {meds[p] / base[p]:.2f}" for p in precisions)
        extra = [f"{meds[precisions[1]] / meds[precisions[0]]:.2f}"] if ratio else []
        target = TARGETS.get(method)
        mark = ""
        if target is not None:
            met = all(meds[p] / base[p] <= target for p in precisions)
            mark = f"<= {target:.2f} " + ("ok" if met else "MISSED")
        print(f"| {method} | {cells} | {' | '.join([*extra, mark])} |")
    if evals:
        print(
            f"\none evaluation ({ecfg.eval_prompts} prompts x {cfg.eval_samples} samples of {cfg.max_new_tokens} "
            f"tokens, {cfg.eval_pairs} held-out pairs), median of {args.eval_repeats}: "
            + ", ".join(f"{p} {t:.1f} s" for p, t in evals.items())
        )
    if sft:
        print(
            f"\none SFT step ({cfg.sft_batch_size} blocks x {cfg.sft_block_size} tokens, AdamW), median of "
            f"{args.sft_steps}: " + ", ".join(f"{p} {t:.3f} s" for p, t in sft.items())
        )
    if args.anchor_repeats <= 0:
        return
    prompts = list(pairs["prompt"][: args.batch_size])
    slow, own, fast = anchor_times(policy, tokenizer, prompts, cfg, args.anchor_repeats).values()
    print(
        f"\nTI-DPO anchor, {len(prompts)} prompts x {cfg.anchor_max_new_tokens} new tokens (median of "
        f"{args.anchor_repeats}): generate {slow:.3f} s, KV-cache loop through the model's forward {own:.3f} s, "
        f"as trained ({'GPT2Steps' if GPT2Steps.applies(policy) else 'model forward'}) {fast:.3f} s "
        f"({slow / fast:.1f}x faster than generate)"
    )


if __name__ == "__main__":
    main()
