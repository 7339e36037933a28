"""Seconds per DPO training step: the kit's step against TRL's DPOTrainer step, on the same batches.

Both start from the profile's SFT model (pi_ref; trained or read from the cache) and train a copy of it on
the profile's exported pairs (``tdpo-lab export-pairs``: its ``train`` split), batch ``batch_size``, with the
same AdamW. A step is what each trainer does per optimiser step: the kit's
:func:`tdpo_lab.runs.train.compute_loss` (collation, both forwards, token statistics, loss) then backward, clipping
and the update; TRL's collator on the kit's tokens, ``DPOTrainer.compute_loss`` (its fused output layer), then
the same backward, clipping and update. The two alternate step by step on the same batch (interleaved: drift
in the machine's speed hits both alike); the table gives the median of ``--steps`` after ``--warmup``.

    python benchmarks/bench_trl_step.py --profile tiny --fast --steps 5 --warmup 1 --threads 1

Needs ``pip install "tdpo-lab[trl]"``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import datasets
import torch
from tdpo_lab.products import export_pairs
from trl import DPOConfig

from tdpo_lab.config import load_config
from tdpo_lab.core.loop import batch_schedule
from tdpo_lab.core.models import load_model
from tdpo_lab.integrations.trl import kit_tokenize
from tdpo_lab.products.sft import load_reference, train_sft
from tdpo_lab.runs.train import compute_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--pairs", default="", help="an export-pairs folder (default: export the profile's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    cfg = load_config(a.profile, fast=a.fast, method="dpo")
    folder = a.pairs or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"bench_trl_pairs_{a.profile}_{cfg.fast}"
    )
    if not a.pairs and not os.path.isdir(folder):
        export_pairs(cfg, folder, progress=False)
    train = datasets.load_from_disk(folder)["train"]
    rows = train.to_pandas()
    sft = train_sft(cfg, progress=False)
    reference, tokenizer = load_reference(cfg, progress=False)
    reference.requires_grad_(False)

    from trl import DPOTrainer  # the plain trainer: TRL's own loss and output layer

    class Pretokenised(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    tokens = kit_tokenize(train, tokenizer).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    kit_policy, trl_policy = load_model(str(sft)), load_model(str(sft))
    kit_opt = torch.optim.AdamW(kit_policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    trl_opt = torch.optim.AdamW(trl_policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    args = DPOConfig(
        output_dir=os.path.join(folder, "_trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=cfg.batch_size,
        beta=cfg.beta,
        max_length=cfg.n_positions,
    )
    trainer = Pretokenised(
        model=trl_policy,
        ref_model=reference,
        args=args,
        train_dataset=tokens,
        processing_class=tokenizer,
        optimizers=(trl_opt, torch.optim.lr_scheduler.LambdaLR(trl_opt, lambda s: 1.0)),
    )
    trl_policy.train()

    def kit_step(idx):
        kit_opt.zero_grad(set_to_none=True)
        loss, _ = compute_loss(kit_policy, reference, tokenizer, rows.iloc[idx], cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(kit_policy.parameters(), cfg.max_grad_norm)
        kit_opt.step()

    def trl_step(idx):
        trl_opt.zero_grad(set_to_none=True)
        inputs = trainer.data_collator([tokens[int(i)] for i in idx])
        loss = trainer.compute_loss(trl_policy, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trl_policy.parameters(), cfg.max_grad_norm)
        trl_opt.step()

    times = {"kit": [], "TRL": []}
    for step in range(a.warmup + a.steps):
        idx = batch_schedule(len(rows), cfg.batch_size, step, cfg.seed)
        for name, fn in (("kit", kit_step), ("TRL", trl_step)):
            start = time.perf_counter()
            fn(idx)
            if step >= a.warmup:
                times[name].append(time.perf_counter() - start)
    kit, trl = statistics.median(times["kit"]), statistics.median(times["TRL"])
    print(
        f"profile {a.profile}{' --fast' if a.fast else ''}, {len(rows)} training pairs, batch {cfg.batch_size}, "
        f"{a.threads} thread(s), load average {load:.2f} at start, median of {a.steps} interleaved steps "
        f"after {a.warmup} warm-up"
    )
    print("| trainer | s / step | vs TRL |\n|---|---|---|")
    print(f"| kit (`tdpo-lab run --method dpo`) | {kit:.3f} | {kit / trl:.2f}x |")
    print(f"| TRL 1.16 `DPOTrainer` | {trl:.3f} | 1.00x |")


if __name__ == "__main__":
    main()
