"""TRL's own DPOTrainer and the kit's DPO run agree: a few steps on the same tokens, initial weights, batch order,
optimiser and schedule give the same losses, rewards, log-probs and logged learning rates."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "trl", reason="trl is not installed: pip install 'tdpo-lab[trl]' to run the TRL parity test"
)

import datasets  # noqa: E402
import pandas as pd  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from tdpo_lab.config import load_config  # noqa: E402
from tdpo_lab.core.jsonl import read_jsonl  # noqa: E402
from tdpo_lab.core.loop import TrainingLoop, batch_schedule  # noqa: E402
from tdpo_lab.core.models import load_model  # noqa: E402
from tdpo_lab.runs.train import compute_loss  # noqa: E402

STEPS, BATCH, WARMUP, LR, SEED = 4, 2, 3, 5e-3, 0
PAIRS = pd.DataFrame(
    {
        "prompt": ["This movie was", "I watched it", "The acting is", "Honestly the plot", "Its music", "Go"],
        "chosen": [
            " wonderful.",
            " twice, and loved it.",
            " warm and real.",
            " works.",
            " soars.",
            "ue came, great",
        ],
        "rejected": [
            " a mess.",
            " once, sadly.",
            " wooden.",
            " drags on and on.",
            " grates.",
            " away, it is bad",
        ],
    }
).assign(pair_id=range(6))


def kit_rate(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)  # train.py's warm-up: the update of step s uses (s+1)/W


class OrderedDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on pre-tokenised pairs, in the dataset's order (the kit's batch order, laid out in advance)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_ids / chosen_ids / rejected_ids already: the kit's tokens

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


def _kit_tokens(tokenizer, rows: pd.DataFrame) -> datasets.Dataset:
    """Prompt and response tokenised apart, the EOS after the response: collate_preference_batch's rows."""

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    return datasets.Dataset.from_dict(
        {
            "prompt_ids": [ids(p) for p in rows["prompt"]],
            "chosen_ids": [[*ids(c), eos] for c in rows["chosen"]],
            "rejected_ids": [[*ids(r), eos] for r in rows["rejected"]],
        }
    )


def test_trl_dpo_trainer_equals_the_kits_dpo_run(tiny_model, tiny_tokenizer, tmp_path):
    folder = tmp_path / "init"
    tiny_model().save_pretrained(folder)  # one set of initial weights for both runs and both references
    cfg = load_config("tiny", fast=True, method="dpo", beta=0.1, n_positions=64, batch_size=BATCH, lr=LR)

    # the kit: its own step function and loop
    policy, reference = load_model(str(folder)), load_model(str(folder)).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    loop = TrainingLoop(
        policy,
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, kit_rate),
        total_steps=STEPS,
        checkpoint_path=tmp_path / "kit" / "state.pt",
        log=[tmp_path / "kit" / "metrics.jsonl"],
        eval_every=1000,
        checkpoint_every=1000,
        max_grad_norm=1.0,
    )
    (tmp_path / "kit").mkdir()

    def step_fn(step, part):
        rows = PAIRS.iloc[batch_schedule(len(PAIRS), BATCH, step, SEED)]
        return compute_loss(policy, reference, tiny_tokenizer, rows, cfg)

    assert loop.run(step_fn, progress=False)
    kit = read_jsonl(tmp_path / "kit" / "metrics.jsonl")

    # TRL: the same batches in order, the same optimiser, the kit's schedule handed over
    order = [i for s in range(STEPS) for i in batch_schedule(len(PAIRS), BATCH, s, SEED)]
    policy = load_model(str(folder))
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="no",
        beta=0.1,
        max_length=64,
        max_grad_norm=1.0,
    )
    trainer = OrderedDPOTrainer(
        model=policy,
        ref_model=load_model(str(folder)),
        args=args,
        train_dataset=_kit_tokens(tiny_tokenizer, PAIRS.iloc[order]),
        processing_class=tiny_tokenizer,
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, kit_rate)),
    )
    trainer.losses = []
    trainer.train()
    trl = [r for r in trainer.state.log_history if "rewards/chosen" in r]

    assert len(trl) == len(kit) == STEPS
    eps32 = torch.finfo(torch.float32).eps
    for step, (a, b) in enumerate(zip(kit, trl, strict=True)):
        assert trainer.losses[step] == pytest.approx(a["loss"], rel=0, abs=64 * eps32 * 10), step
        # float32 sums of the log-probs of a response: rounding grows with their size, and the weights drift
        # apart by float32 rounding each step (TRL's output layer is computed in tiles)
        size = max(abs(a["logps/chosen"]), abs(a["logps/rejected"]), 1.0)
        for key in (
            "logps/chosen",
            "logps/rejected",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
        ):
            assert b[key] == pytest.approx(a[key], rel=0, abs=1024 * eps32 * size), (step, key)
        assert b["rewards/accuracies"] == a["rewards/accuracies"]
        # both log the rate their update used: (s+1)/W of the target at step s + 1
        assert a["learning_rate"] == pytest.approx(LR * kit_rate(step), rel=1e-12)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-12), step
    assert kit[-1]["rewards/margins"] != 0.0  # the runs moved: the comparison can fail
    worst = {
        key: max(abs(a[key] - b[key]) for a, b in zip(kit, trl, strict=True))
        for key in ("logps/chosen", "rewards/margins")
    }
    worst["loss"] = max(abs(a["loss"] - x) for a, x in zip(kit, trainer.losses, strict=True))
    print(f"kit vs TRL over {STEPS} steps, largest differences: {worst}")  # pytest -s shows it
