"""The kit's methods inside TRL's DPOTrainer (tdpo_lab.integrations.trl): one step of KitDPOTrainer on the kit's
tokens gives the kit's loss and gradient, for every supported method; the unsupported cases fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip(
    "trl", reason="trl is not installed: pip install 'tdpo-lab[trl]' to test the TRL integration"
)

import datasets  # noqa: E402
from trl import DPOConfig  # noqa: E402

from tdpo_lab.core.data import collate_preference_batch  # noqa: E402
from tdpo_lab.core.logprobs import token_stats  # noqa: E402
from tdpo_lab.integrations.trl import KitDPOTrainer, kit_tokenize, method_alpha  # noqa: E402
from tdpo_lab.methods import get_method, preference_loss  # noqa: E402
from tdpo_lab.methods.attnpo_judge import align_weights  # noqa: E402

PROMPTS = ["This movie was", "I watched it twice and", "The acting is so", "Go"]
CHOSEN = [
    " wonderful, truly moving.",
    " loved it more.",
    " natural and warm.",
    "ue came back and it was great",
]
REJECTED = [" a dull mess.", " hated every minute of it.", " wooden.", " away, it is terrible"]
BETA = 0.1
SUPPORTED = ["dpo", "tdpo1", "tdpo2", "ipo", "attnpo"]


def _args(tmp_path, **overrides) -> DPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        bf16=False,  # TRL's default is True, also on a CPU
        gradient_checkpointing=False,
        per_device_train_batch_size=len(PROMPTS),
        max_length=64,
        beta=BETA,
        learning_rate=1e-3,
        save_strategy="no",
        use_cpu=True,
    )
    settings.update(overrides)
    return DPOConfig(**settings)


def _judge_like_weights(tokenizer):
    """Positive weights per response token (what add_judge_weights writes), seeded, not all ones."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for side, texts in (("chosen", CHOSEN), ("rejected", REJECTED)):
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        out[f"{side}_weights"] = [(0.2 + 2 * torch.rand(n, generator=g)).tolist() for n in lengths]
    return out


@pytest.fixture
def models(tiny_model, tiny_tokenizer):
    # a policy that differs from its reference, so every term of every loss (the SeqKL's gradient too) is live
    def make():
        policy, reference = tiny_model(), tiny_model()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=g))
        return policy, reference

    return make, tiny_tokenizer


def _kit_loss_and_grads(policy, reference, tokenizer, method, weights):
    batch = collate_preference_batch(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=64)
    labels = batch["labels"]
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy_logits = policy(**kw).logits
    with torch.no_grad():
        ref_logits = reference(**kw).logits
    stats = token_stats(policy_logits, ref_logits, labels)
    w = None
    if get_method(method).weighted:
        w = align_weights(batch, weights["chosen_weights"], weights["rejected_weights"]) * stats.mask
    out = preference_loss(method, stats, beta=BETA, alpha=method_alpha(get_method(method)), weights=w)
    out.loss.backward()
    return batch, out, {n: p.grad.clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("method", SUPPORTED)
def test_one_step_of_the_trl_trainer_gives_the_kits_loss_and_gradient(models, tmp_path, method):
    make, tokenizer = models
    policy, reference = make()
    weights = _judge_like_weights(tokenizer)
    batch, kit, kit_grads = _kit_loss_and_grads(policy, reference, tokenizer, method, weights)

    policy, reference = make()  # the same weights again, untouched by the kit's backward
    columns = {"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}
    if get_method(method).weighted:
        columns.update(weights)
    # plain SGD at rate 1, no clipping: the step moves every weight by exactly minus its gradient. One batch
    # of all the pairs, so TRL's shuffling changes nothing (a mean over pairs, a sum of gradients)
    sgd = torch.optim.SGD(policy.parameters(), lr=1.0)
    trainer = KitDPOTrainer(
        model=policy,
        ref_model=reference,
        args=_args(tmp_path, max_steps=1, max_grad_norm=0.0, logging_steps=1),
        train_dataset=datasets.Dataset.from_dict(columns),
        processing_class=tokenizer,
        method=method,
        optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0)),
    )
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PROMPTS))])
    # the kit's tokens: the same ids on every real position, the same response positions
    real = inputs["attention_mask"].bool()
    assert torch.equal(real, batch["attention_mask"].bool())
    assert torch.equal(inputs["input_ids"][real], batch["input_ids"][real])
    assert torch.equal(inputs["completion_mask"].bool(), batch["labels"] != -100)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    result = trainer.train()
    scale = max(abs(kit.loss.item()), 1e-3)
    assert result.training_loss == pytest.approx(kit.loss.item(), rel=1e-5, abs=1e-6 * scale)
    eps32 = torch.finfo(torch.float32).eps
    for name, param in policy.named_parameters():
        want, grad = kit_grads[name], before[name] - param.detach()
        # float32: the update's own rounding (of the weight's size) plus the two routes' sums of the same terms
        tol = 4 * eps32 * float(before[name].abs().max()) + 1e-5 * float(want.abs().max()) + 1e-9
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=tol, msg=name)
    assert any(float(g.abs().max()) > 0 for g in kit_grads.values())
    # the kit's metrics, under TRL's names, in TRL's log
    logged = next(r for r in trainer.state.log_history if "rewards/chosen" in r)
    keys = ["rewards/chosen", "rewards/margins", "logps/rejected", "kl_seq/chosen"]
    if get_method(method).uses_seq_kl:
        keys.append("token_reward/chosen")
    for key in keys:
        assert logged[key] == pytest.approx(kit.metrics[key], rel=1e-5, abs=1e-6), key


def test_the_weights_change_attnpo_so_the_comparison_can_fail(models):
    make, tokenizer = models
    policy, reference = make()
    weights = _judge_like_weights(tokenizer)
    _, weighted, _ = _kit_loss_and_grads(policy, reference, tokenizer, "attnpo", weights)
    _, plain, _ = _kit_loss_and_grads(*make(), tokenizer, "dpo", None)
    assert abs(weighted.loss.item() - plain.loss.item()) > 1e-4
    assert plain.metrics["kl_seq/chosen"] > 1e-3  # the policy is not its reference: the SeqKL terms are live


def test_unsupported_settings_fail_with_what_to_do(models, tmp_path):
    make, tokenizer = models
    policy, reference = make()
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    common = dict(model=policy, ref_model=reference, train_dataset=ds, processing_class=tokenizer)
    with pytest.raises(NotImplementedError, match="tdpo-lab run"):
        KitDPOTrainer(args=_args(tmp_path), method="tidpo", **common)
    with pytest.raises(ValueError, match="whole next-token distribution"):
        KitDPOTrainer(args=_args(tmp_path, precompute_ref_log_probs=True), method="tdpo2", **common)
    with pytest.raises(ValueError, match="loss_type"):
        KitDPOTrainer(args=_args(tmp_path, loss_type=["ipo"]), method="ipo", **common)
    # attnpo without its weight columns: told which columns to add
    trainer = KitDPOTrainer(args=_args(tmp_path), method="attnpo", **common)
    with pytest.raises(ValueError, match="add_judge_weights"):
        trainer.data_collator([trainer.train_dataset[i] for i in range(2)])


def test_kit_tokenize_is_the_kits_tokenisation(tiny_tokenizer):
    ds = kit_tokenize(
        datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}),
        tiny_tokenizer,
    )
    batch = collate_preference_batch(tiny_tokenizer, PROMPTS, CHOSEN, REJECTED)
    for i, row in enumerate(ds):
        p = len(row["prompt_ids"])
        assert p == int(batch["prompt_lengths"][i])
        ids = row["prompt_ids"] + row["chosen_ids"]
        assert ids == batch["input_ids"][i, : len(ids)].tolist()


def test_the_kit_never_imports_the_integration_nor_trl():
    code = (
        "import sys, tdpo_lab, tdpo_lab.runs.train, tdpo_lab.cli, tdpo_lab.products.user_pairs\n"
        "bad = [m for m in sys.modules if m == 'trl' or m.startswith(('trl.', 'tdpo_lab.integrations'))]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
