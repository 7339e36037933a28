"""One preference-training loop for the five methods: dpo, tdpo1, tdpo2, attnpo and tidpo.

The policy starts as a copy of pi_ref (the SFT model); pi_ref stays frozen. Each step collates a batch of
pairs (rows [:B] chosen, [B:] rejected), runs both models, computes exact token statistics with
:func:`tdpo_lab.logprobs.token_stats` and the method's loss with :func:`tdpo_lab.losses.preference_loss`.
AttentionPO's token weights are computed once per pair with pi_ref and cached; TI-DPO's weights are
recomputed from the current policy every step, and its triplet anchor is sampled from the policy.

Everything random is a function of (seed, step): the batch order, the TI-DPO anchors and the evaluation
samples. So a run killed mid-training and resumed from its checkpoint ends identical to one that was not.
Run folder layout: see :mod:`tdpo_lab.runs`.

Used by notebooks 04-07; the CLI's ``tdpo-lab run`` calls :func:`train`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from tdpo_lab.config import Config, result_fields
from tdpo_lab.data import clean_text, collate_preference_batch, collate_sequences, load_imdb, make_prefixes
from tdpo_lab.evaluate import evaluate_policy
from tdpo_lab.generation import sample
from tdpo_lab.importance import (
    JUDGE_TEMPLATE,
    SINK_MIN_LENGTH,
    align_weights,
    attention_weights,
    hybrid_weights,
    saliency_from_graph,
)
from tdpo_lab.logprobs import token_stats
from tdpo_lab.losses import left_align, preference_loss, triplet_loss
from tdpo_lab.models import load_model
from tdpo_lab.pairs import build_pairs, pairs_key, split_pairs
from tdpo_lab.reward import get_reward
from tdpo_lab.runs import RunDir, truncate_jsonl, write_env
from tdpo_lab.sft import load_reference, sft_key, train_sft
from tdpo_lab.utils import (
    atomic_path,
    exclusive_lock,
    load_training_state,
    progress_off,
    save_training_state,
    select_device,
    set_threads,
    write_json,
)

EVAL_PROMPT_SEED = 1234  # the held-out prefixes are the same for every run, so runs are comparable


class RunConfigMismatch(ValueError):
    """The run folder already holds a run with a different configuration."""


# --- inputs shared by every step ------------------------------------------------------------------
def evaluation_prompts(cfg: Config, tokenizer) -> list[str]:
    """Held-out review prefixes from the test split (fixed across runs and seeds)."""
    test = load_imdb("test", cfg.data_path or None)
    order = np.random.default_rng(EVAL_PROMPT_SEED).permutation(len(test))[: cfg.eval_prompts]
    texts = [clean_text(test[int(i)]["text"]) for i in order]
    return make_prefixes(
        texts,
        tokenizer,
        min_tokens=cfg.prefix_min_tokens,
        max_tokens=cfg.prefix_max_tokens,
        seed=EVAL_PROMPT_SEED,
    )


def attnpo_weights(
    cfg: Config, pairs: pd.DataFrame, *, progress: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AttentionPO weights of every pair of the cached pair table, computed once with pi_ref (cached).

    Returns one ``(w_chosen, w_rejected)`` per row of ``build_pairs(cfg)``, indexed by ``pair_id``.
    """
    key = cfg.key(
        "attn_layer",
        "attn_layer_mean",
        "attn_fix_sink",
        extra=[pairs_key(cfg), JUDGE_TEMPLATE, SINK_MIN_LENGTH],
    )
    path = cfg.cache_path / "attnpo" / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    judge, tokenizer = load_reference(cfg, attn_implementation="eager", progress=progress)
    weights = []
    rows = pairs[["prompt", "chosen", "rejected"]].itertuples(index=False)
    for prompt, chosen, rejected in tqdm(
        rows, total=len(pairs), desc="AttentionPO weights", disable=progress_off(progress)
    ):
        w_c, w_r = attention_weights(
            judge,
            tokenizer,
            prompt,
            chosen,
            rejected,
            layer=cfg.attn_layer,
            fix_sink=cfg.attn_fix_sink,
            layer_mean=cfg.attn_layer_mean,
        )
        weights.append((w_c.float(), w_r.float()))
    with atomic_path(path) as tmp:
        torch.save(weights, tmp)
    return weights


# --- one step ----------------------------------------------------------------------------------------
def _logits(model, batch: dict, device: torch.device) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits


def triplet_term(
    policy, reference, tokenizer, prompts: list[str], stats, cfg: Config, step_seed: int, device
):
    """TI-DPO's triplet loss (METHODS section 4): anchor sampled from the policy, features = log-ratios.

    Returns (loss, number of pairs skipped because the anchor came back empty).
    """
    anchors = sample(
        policy,
        tokenizer,
        prompts,
        num_samples=1,
        max_new_tokens=cfg.anchor_max_new_tokens,
        temperature=cfg.anchor_temperature,
        top_k=cfg.anchor_top_k,
        top_p=cfg.anchor_top_p,
        batch_size=len(prompts),
        seed=step_seed,
    )
    anchors = [group[0] for group in anchors]
    keep = [i for i, text in enumerate(anchors) if text.strip()]
    skipped = len(prompts) - len(keep)
    if not keep:
        return torch.zeros((), device=device), skipped
    batch = collate_sequences(tokenizer, [prompts[i] for i in keep], [anchors[i] for i in keep])
    with torch.no_grad():
        ref_logits = _logits(reference, batch, device)
    anchor = token_stats(_logits(policy, batch, device), ref_logits, batch["labels"].to(device))
    half = stats.logps.shape[0] // 2
    ratio = stats.logps - stats.ref_logps
    a, a_mask = left_align(anchor.logps - anchor.ref_logps, anchor.mask)
    w, w_mask = left_align(ratio[:half][keep], stats.mask[:half][keep])
    lo, lo_mask = left_align(ratio[half:][keep], stats.mask[half:][keep])
    return triplet_loss(a, a_mask, w, w_mask, lo, lo_mask, margin=cfg.triplet_margin), skipped


def compute_loss(
    policy,
    reference,
    tokenizer,
    rows: pd.DataFrame,
    cfg: Config,
    *,
    step_seed: int = 0,
    attn_weights: list | None = None,
    device: torch.device | None = None,
):
    """The loss of one batch of pairs for ``cfg.method``; returns (loss tensor, metrics dict).

    ``rows`` holds ``prompt, chosen, rejected`` (and ``pair_id`` for AttentionPO, indexing ``attn_weights``).
    """
    device = device or next(policy.parameters()).device
    prompts = list(rows["prompt"])
    batch = collate_preference_batch(
        tokenizer, prompts, list(rows["chosen"]), list(rows["rejected"]), max_length=cfg.n_positions
    )
    labels = batch["labels"].to(device)
    weights, policy_logits = None, None
    if cfg.method == "attnpo":
        if attn_weights is None:
            raise ValueError("method 'attnpo' needs attn_weights (see tdpo_lab.train.attnpo_weights)")
        chosen_w = [attn_weights[i][0] for i in rows["pair_id"]]
        rejected_w = [attn_weights[i][1] for i in rows["pair_id"]]
        weights = align_weights(batch, chosen_w, rejected_w).to(device)
    elif cfg.method == "tidpo":
        # one policy forward serves both the TI-DPO weights (gradient w.r.t. the input embeddings) and the loss
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        embeds = policy.get_input_embeddings()(input_ids)
        policy_logits = policy(inputs_embeds=embeds, attention_mask=attention_mask).logits
        saliency = saliency_from_graph(policy_logits, embeds, attention_mask, retain_graph=True)
        span = labels != -100 if cfg.importance_span == "response" else attention_mask.bool()
        token_w = hybrid_weights(saliency, span, lam=cfg.lam, sigma_div=cfg.sigma_div)
        weights = token_w[:, 1:]  # the weight of token t sits at shifted-label position t - 1
    with torch.no_grad():
        ref_logits = _logits(reference, batch, device)
    if policy_logits is None:
        policy_logits = _logits(policy, batch, device)
    stats = token_stats(policy_logits, ref_logits, labels, chunk_size=cfg.chunk_size or None)
    if weights is not None:
        weights = weights * stats.mask
    out = preference_loss(cfg.method, stats, beta=cfg.beta, alpha=cfg.alpha, weights=weights)
    loss, metrics = out.loss, dict(out.metrics)
    if cfg.method == "tidpo" and cfg.gamma > 0:
        trip, skipped = triplet_term(policy, reference, tokenizer, prompts, stats, cfg, step_seed, device)
        loss = loss + cfg.gamma * trip
        metrics.update({"triplet/loss": trip.item(), "triplet/skipped": skipped, "loss": loss.item()})
    return loss, metrics


# --- the loop ------------------------------------------------------------------------------------------
def _check_or_write_config(run_dir: Path, cfg: Config) -> None:
    path = run_dir / "config.json"
    if path.exists():
        saved, wanted = result_fields(json.loads(path.read_text())), result_fields(cfg.to_dict())
        diff = {
            k: (saved.get(k), wanted.get(k))
            for k in saved.keys() | wanted.keys()
            if saved.get(k) != wanted.get(k)
        }
        if diff:
            raise RunConfigMismatch(
                f"{run_dir} already holds a run with a different configuration {diff} (saved, requested); "
                "choose another run folder or delete this one"
            )
    else:
        write_json(path, cfg.to_dict())


def _batch_rows(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Pair indices of step ``step``: a seeded permutation per epoch (no state to save)."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[offset * batch_size : (offset + 1) * batch_size]


def reference_evaluation(cfg: Config, reference, tokenizer, reward, prompts, heldout) -> dict:
    """Evaluation of pi_ref itself (step 0 of every run), cached: it is the same for every method."""
    key = cfg.key(
        "seed",
        "eval_prompts",
        "eval_samples",
        "eval_max_new_tokens",
        "eval_topk",
        "eval_pairs",
        "reward",
        extra=[sft_key(cfg), pairs_key(cfg)],
    )
    path = cfg.cache_path / "eval_ref" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate_policy(
        reference, reference, tokenizer, reward, prompts, cfg, pairs=heldout, seed=cfg.seed
    )
    write_json(path, result)
    return result


def train(cfg: Config, run_dir: str | Path, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train ``cfg.method`` from pi_ref into ``run_dir`` (resuming if a checkpoint is there); return run_dir.

    Writes ``config.json``, ``env.json``, ``metrics.jsonl`` (every step), ``eval.jsonl`` (step 0, every
    ``eval_every`` steps and the last), ``checkpoint/state.pt`` and, at the end, ``policy/``.
    ``stop_after`` returns after that many steps of this call (for resumption tests). A second process asking
    for the same run folder waits for the first (a lock file), then finds the run finished.
    """
    with exclusive_lock(Path(run_dir) / ".lock"):
        return _train(cfg, run_dir, progress=progress, stop_after=stop_after)


def _train(cfg: Config, run_dir: str | Path, *, progress: bool, stop_after: int | None) -> Path:
    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    _check_or_write_config(run.path, cfg)
    write_env(run.path)
    set_threads(cfg.num_threads)
    device = select_device(cfg.device)
    ckpt_path = run.checkpoint_dir / "state.pt"
    if (run.path / "policy" / "config.json").exists():
        if progress:
            print(f"{run.path}: finished already (delete it to train again)")
        return run.path

    sft_folder = train_sft(cfg, progress=progress)
    reference, tokenizer = load_reference(cfg, progress=progress)
    reference.requires_grad_(False)
    policy = load_model(str(sft_folder)).to(device)
    policy.train()
    pairs = build_pairs(cfg, progress=progress)
    train_pairs, heldout = split_pairs(pairs, cfg)
    attn = attnpo_weights(cfg, pairs, progress=progress) if cfg.method == "attnpo" else None
    reward = get_reward(cfg)
    prompts = evaluation_prompts(cfg, tokenizer)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    step = 0
    if ckpt_path.exists():
        step = load_training_state(ckpt_path, policy, optimizer, scheduler, device)
        # lines written after the checkpoint (or cut off by the interruption) are redone
        for path in (run.metrics_path, run.eval_path):
            truncate_jsonl(path, step)
        if progress:
            print(f"{run.path}: resuming from step {step} of {cfg.train_steps}")
    else:
        run.metrics_path.unlink(missing_ok=True)
        run.eval_path.unlink(missing_ok=True)
        run.log_eval(0, reference_evaluation(cfg, reference, tokenizer, reward, prompts, heldout), cfg)

    bar = tqdm(
        total=cfg.train_steps,
        initial=step,
        desc=f"{cfg.method} beta={cfg.beta:g}",
        disable=progress_off(progress),
    )
    done_this_call = 0
    while step < cfg.train_steps:
        if stop_after is not None and done_this_call >= stop_after:
            bar.close()
            return run.path
        rows = train_pairs.iloc[_batch_rows(len(train_pairs), cfg.batch_size, step, cfg.seed)]
        started = time.perf_counter()
        loss, metrics = compute_loss(
            policy,
            reference,
            tokenizer,
            rows,
            cfg,
            step_seed=cfg.seed * 1_000_003 + step,
            attn_weights=attn,
            device=device,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        done_this_call += 1
        metrics.update(
            lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), seconds=time.perf_counter() - started
        )
        run.log_metrics(step, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
        if step % cfg.eval_every == 0 or step == cfg.train_steps:
            result = evaluate_policy(
                policy, reference, tokenizer, reward, prompts, cfg, pairs=heldout, seed=cfg.seed
            )
            run.log_eval(step, result, cfg)
            policy.train()
        if (step % cfg.checkpoint_every == 0 or step % cfg.eval_every == 0) and step < cfg.train_steps:
            save_training_state(ckpt_path, policy, optimizer, scheduler, step)
    bar.close()
    with atomic_path(run.path / "policy") as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # the finished policy replaces it
    return run.path
