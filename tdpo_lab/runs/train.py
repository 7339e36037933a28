"""One preference-training loop for the five methods: dpo, tdpo1, tdpo2, attnpo and tidpo.

The policy starts as a copy of pi_ref (the SFT model); pi_ref stays frozen. Each step collates a batch of
pairs (rows [:B] chosen, [B:] rejected), runs both models, computes exact token statistics with
:func:`tdpo_lab.core.logprobs.token_stats` and the method's loss with :func:`tdpo_lab.methods.preference_loss`.
AttentionPO's token weights are computed once per pair with pi_ref and cached; TI-DPO's weights are
recomputed from the current policy every step, and its triplet anchor is sampled from the policy.

Everything random is a function of (seed, step): the batch order, the TI-DPO anchors and the evaluation
samples. So a run killed mid-training and resumed from its checkpoint ends identical to one that was not.
Run folder layout: see :mod:`tdpo_lab.runs.rundir`. Several processes (``accelerate launch -m tdpo_lab.cli run``)
train one run together, each on its slice of every batch (:mod:`tdpo_lab.core.distributed`).

Used by notebooks 04-07; the CLI's ``tdpo-lab run`` calls :func:`train`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from tdpo_lab.cache.plan import Plan
from tdpo_lab.cache.store import fetch
from tdpo_lab.config import Config
from tdpo_lab.core.data import collate_preference_batch
from tdpo_lab.core.distributed import accelerator_for, check_split, device_of, main_process_lock, rank_rows
from tdpo_lab.core.evaluate import evaluate_policy
from tdpo_lab.core.logprobs import token_stats
from tdpo_lab.core.loop import TrainingLoop, batch_schedule
from tdpo_lab.core.lora import attach_lora
from tdpo_lab.core.models import load_model
from tdpo_lab.core.precision import forward_autocast, fp32_logits, warn_if_emulated
from tdpo_lab.core.utils import (
    set_threads,
    write_json,
)
from tdpo_lab.methods import StepContext, get_method, logit_metrics, preference_loss
from tdpo_lab.products.method_inputs import method_state
from tdpo_lab.products.pairs_source import pairs_source
from tdpo_lab.products.sft import load_reference, train_sft
from tdpo_lab.runs.rundir import RunDir
from tdpo_lab.runs.trackers import open_tracker

KEEP_SAMPLES = 4  # samples per evaluation kept in a run's samples.jsonl (to read, not to compute with)

REFERENCE_EVAL_FILE = "reference_eval.json"


# --- one step ----------------------------------------------------------------------------------------
def _logits(model, batch: dict, device: torch.device) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits


def compute_loss(
    policy,
    reference,
    tokenizer,
    rows: pd.DataFrame,
    cfg: Config,
    *,
    step_seed: int = 0,
    state=None,
    device: torch.device | None = None,
):
    """The loss of one batch of pairs for ``cfg.method``; returns (loss tensor, metrics dict).

    ``rows`` holds ``prompt, chosen, rejected`` (and ``pair_id``, which indexes a method's per-pair
    ``state``: a method's ``prepare`` of its cached inputs, :func:`tdpo_lab.products.method_inputs.method_state`). The registered method
    (:mod:`tdpo_lab.methods`) supplies the token weights, the loss and any extra term.
    """
    method = get_method(cfg.method)
    device = device or next(policy.parameters()).device
    batch = collate_preference_batch(
        tokenizer,
        list(rows["prompt"]),
        list(rows["chosen"]),
        list(rows["rejected"]),
        max_length=cfg.n_positions,
    )
    labels = batch["labels"].to(device)
    ctx = StepContext(policy, reference, tokenizer, rows, batch, labels, cfg, device, step_seed, state)
    with forward_autocast(
        cfg, device
    ):  # bf16 on a CPU (tdpo_lab.core.precision); the statistics below in fp32
        weights, policy_logits = method.step_weights(ctx) if method.step_weights else (None, None)
        if policy_logits is None:
            policy_logits = _logits(policy, batch, device)
        if method.needs_reference:
            with torch.no_grad():
                ref_logits = fp32_logits(_logits(reference, batch, device))
        else:  # scored against itself: r_t = 0 and SeqKL = 0, the loss reads the policy's log-probs
            ref_logits = None
    policy_logits = fp32_logits(policy_logits)
    if ref_logits is None:
        ref_logits = policy_logits.detach()
    stats = token_stats(policy_logits, ref_logits, labels, chunk_size=cfg.chunk_size or None)
    if weights is not None:
        weights = weights * stats.mask
    out = preference_loss(method, stats, beta=cfg.beta, weights=weights, **method.knob_values(cfg))
    loss, metrics = out.loss, dict(out.metrics)
    metrics.update(logit_metrics(policy_logits, labels))  # TRL's logits/chosen|rejected
    with forward_autocast(cfg, device):  # TI-DPO's anchor: drawn and scored like the batch
        extra = method.extra_loss(ctx, stats) if method.extra_loss else None
    if extra is not None:
        term, extra_metrics = extra
        loss = loss + term
        metrics.update(extra_metrics, loss=loss.item())
    return loss, metrics


# --- the loop ------------------------------------------------------------------------------------------
def _evaluate(policy, reference, tokenizer, reward, prompts, heldout, cfg: Config, *, progress: bool) -> dict:
    """One evaluation of ``policy`` as every run records it: its seed's samples and the held-out pairs."""
    return evaluate_policy(
        policy,
        reference,
        tokenizer,
        reward,
        prompts,
        cfg,
        pairs=heldout,
        seed=cfg.seed,
        **_pair_beta(cfg),
        progress=progress,
        per_prompt=True,  # per-prompt and per-pair values: error bars that resample prompts
        keep_samples=KEEP_SAMPLES,
    )


def reference_evaluation(
    cfg: Config,
    reference,
    tokenizer,
    reward,
    prompts,
    heldout,
    *,
    plan: Plan | None = None,
    progress: bool = False,
) -> dict:
    """Evaluation of pi_ref itself (step 0 of every run), cached: it is the same for every method."""

    def build(folder: Path) -> None:
        result = _evaluate(reference, reference, tokenizer, reward, prompts, heldout, cfg, progress=progress)
        write_json(folder / REFERENCE_EVAL_FILE, result)

    def load(folder: Path) -> dict:
        result = json.loads((folder / REFERENCE_EVAL_FILE).read_text())
        # one built by an older kit has only means: it is rebuilt (with a warning), not logged without them
        wanted = {"prompt_ids": reward is not None, "pair_prompt_ids": heldout is not None}
        missing = [k for k, needed in wanted.items() if needed and k not in result]
        if missing:
            raise ValueError(f"it lacks the per-prompt values {missing} (built by an older tdpo_lab)")
        return result

    return fetch(
        (plan or Plan(cfg)).entry("eval_ref"),
        build,
        load,
        what="reference evaluation cache",
    )


def _pair_beta(cfg: Config) -> dict:
    # your own pairs are evaluated by their held-out preference accuracy (the kit's runs keep their numbers)
    return {"pair_beta": cfg.beta} if cfg.pairs else {}


def train(cfg: Config, run_dir: str | Path, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train ``cfg.method`` from pi_ref into ``run_dir`` (resuming if a checkpoint is there); return run_dir.

    Writes ``config.json``, ``env.json``, ``metrics.jsonl`` (every step), ``eval.jsonl`` (step 0, every
    ``eval_every`` steps and the last), ``checkpoint/state.pt`` and, at the end, ``policy/``.
    ``stop_after`` returns after that many steps of this call (for resumption tests). A second process asking
    for the same run folder waits for the first (a lock file), then finds the run finished. In a job of several
    processes every process calls it; the main process holds the lock and writes the folder.
    """
    pairs_source(cfg)  # your own pairs: a bad file fails before any run folder is made
    accelerator = accelerator_for(cfg)
    with main_process_lock(accelerator, RunDir(run_dir).lock()):
        return _train(cfg, run_dir, accelerator, progress=progress, stop_after=stop_after)


def _train(cfg: Config, run_dir: str | Path, acc, *, progress: bool, stop_after: int | None) -> Path:
    main = acc.is_main_process
    # RunDir.open refuses a folder that holds a run of another configuration, and writes env.json
    run = RunDir.open(run_dir, cfg) if main else RunDir(run_dir)
    source = pairs_source(cfg)
    if main:  # ... or one trained on another version of your pairs file
        run.check_pairs(source.record(), cfg.pairs)
    acc.wait_for_everyone()
    set_threads(cfg.num_threads)
    device = device_of(acc)
    warn_if_emulated(cfg, device)
    progress = progress and main
    if run.is_finished:
        if progress:
            print(f"{run.path}: finished already (delete it to train again)")
        return run.path
    check_split(cfg.batch_size, acc.num_processes, cfg.grad_accum_steps, "batch_size")

    # before any work, so a missing package fails at once; the main process writes the run's files
    tracker = open_tracker(cfg.report_to if main else "", run.path)
    plan = Plan(cfg)  # the stage keys of this configuration, computed once for every product below
    sft_folder = train_sft(cfg, progress=progress, plan=plan, accelerator=acc)  # every process trains
    with acc.main_process_first():  # cached products: built by the main process, then read by the others
        reference, tokenizer = load_reference(cfg, progress=progress, plan=plan)
        # reward None where your own pairs have none; reward and prompts on the main process only
        pairs, train_pairs, heldout, reward, prompts = source.training_inputs(
            tokenizer, plan=plan, main=main, progress=progress
        )
        state = method_state(cfg, pairs, plan=plan, progress=progress)
    lora = None
    if (
        cfg.lora_r
    ):  # one copy of the weights: the policy trains an adapter, pi_ref is the adapter switched off
        lora = attach_lora(reference.to(device), cfg)
        policy, reference = lora.policy, lora.reference
    else:
        reference = reference.to(device).requires_grad_(False)
        policy = load_model(str(sft_folder)).to(device)
    policy.train()

    trainable = [p for p in policy.parameters() if p.requires_grad]  # all of them, or LoRA's adapter
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    raw_policy = policy  # generation, evaluation and saving use the model itself, not its DDP wrapper
    policy, optimizer = acc.prepare(policy, optimizer)
    loop = TrainingLoop(
        policy,
        optimizer,
        scheduler,
        total_steps=cfg.train_steps,
        checkpoint_path=run.checkpoint_path,
        log=run,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        max_grad_norm=cfg.max_grad_norm,
        desc=f"{cfg.method} beta={cfg.beta:g}",
        accelerator=acc,
        grad_accum_steps=cfg.grad_accum_steps,
        on_record=tracker.log_metrics,
        trainable_only=lora is not None,
    )

    def step_fn(step: int, part: int):
        idx = batch_schedule(len(train_pairs), cfg.batch_size, step, cfg.seed)
        idx = rank_rows(
            idx, rank=acc.process_index, world_size=acc.num_processes, parts=cfg.grad_accum_steps, part=part
        )
        # What a step samples (TI-DPO's anchors) depends on (seed, step) and on which slice of the batch this
        # is (one slice: the whole batch, the seed of one process). So anchors differ with the number of slices.
        slice_ = acc.process_index * cfg.grad_accum_steps + part
        seed = cfg.seed * 1_000_003 + step + slice_ * 2**40
        return compute_loss(
            policy,
            reference,
            tokenizer,
            train_pairs.iloc[idx],
            cfg,
            step_seed=seed,
            state=state,
            device=device,
        )

    def log_reference_evaluation() -> None:  # step 0: pi_theta = pi_ref, the same for every method (cached)
        result = reference_evaluation(
            cfg, reference, tokenizer, reward, prompts, heldout, plan=plan, progress=progress
        )
        tracker.log_eval(run.log_eval(0, result, cfg))

    def evaluate(step: int) -> None:
        result = _evaluate(raw_policy, reference, tokenizer, reward, prompts, heldout, cfg, progress=progress)
        tracker.log_eval(run.log_eval(step, result, cfg))
        raw_policy.train()

    finished = loop.run(
        step_fn,
        on_start=log_reference_evaluation,
        evaluate=evaluate,
        postfix=lambda r: {"loss": f"{r['loss']:.4f}", "acc": f"{r['rewards/accuracies']:.2f}"},
        progress=progress,
        stop_after=stop_after,
        device=device,
    )
    tracker.close()  # it flushed every record: a run that raises before this loses nothing
    if not finished:
        return run.path
    if main:
        run.save_policy(
            lora.merged() if lora is not None else raw_policy, tokenizer
        )  # LoRA: merged, a plain model
    acc.wait_for_everyone()
    return run.path
