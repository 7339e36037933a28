"""LoRA through peft (tdpo_lab.core.lora): config keys, pi_ref as the adapter switched off, training, merging, resuming."""

from __future__ import annotations

import json

import pytest
import torch
from cli_args import small_cli_args

from tdpo_lab.config import LATE_FIELDS, ConfigError, load_config
from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.core.kv_steps import GPT2Steps, cached_steps
from tdpo_lab.core.lora import AdapterOff, TrainableState, attach_lora, target_modules
from tdpo_lab.core.models import build_model
from tdpo_lab.core.utils import CheckpointError
from tdpo_lab.methods import get_method, preference_loss
from tdpo_lab.methods.tidpo import _response_logps
from tdpo_lab.runs.rundir import run_name

pytest.importorskip("peft")

LORA_KEYS = {"lora_r": 0, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_target_modules": ""}


class _Vocab:
    """What build_model reads of a tokenizer: its length and EOS id."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 97


def _models(**lora):
    """(policy with a LoRA adapter, pi_ref built independently with the same weights, the LoraPolicy)."""
    cfg = load_config("tiny", fast=True, n_layer=2, n_head=2, n_embd=32, **lora)
    pi_ref = build_model(cfg, _Vocab())  # seeded by data_seed: the same weights as the policy's base
    return attach_lora(build_model(cfg, _Vocab()), cfg), pi_ref


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # some right padding
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[mask == 0] = -100
    return ids, mask, labels


def _train_steps(lora, steps: int = 4) -> None:
    """A few AdamW steps of the TDPO2 loss, pi_ref's forward through the adapter-off view as in training."""
    from tdpo_lab.core.logprobs import token_stats

    policy, reference = lora.policy, lora.reference
    opt = torch.optim.AdamW(lora.trainable_parameters(), lr=3e-2)
    policy.train()
    for step in range(steps):
        ids, mask, labels = _batch(step)
        with torch.no_grad():
            ref_logits = reference(input_ids=ids, attention_mask=mask).logits
        stats = token_stats(policy(input_ids=ids, attention_mask=mask).logits, ref_logits, labels)
        loss = preference_loss(get_method("tdpo2"), stats, beta=0.1, alpha=0.5).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- config ------------------------------------------------------------------------------------------
def test_lora_keys_default_off_and_keep_every_run_name():
    cfg = load_config("tiny")
    assert {k: getattr(cfg, k) for k in LORA_KEYS} == LORA_KEYS
    assert {k: LATE_FIELDS[k] for k in LORA_KEYS} == LORA_KEYS
    # their defaults, written out, name the same run; any other value names another
    assert run_name(load_config("tiny", **LORA_KEYS)) == run_name(cfg)
    for key, value in {
        "lora_r": 8,
        "lora_alpha": 32.0,
        "lora_dropout": 0.1,
        "lora_target_modules": "c_fc",
    }.items():
        assert run_name(load_config("tiny", **{key: value})) != run_name(cfg), key


@pytest.mark.parametrize(
    "key, value",
    [
        ("lora_r", -1),
        ("lora_alpha", 0.0),
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("lora_target_modules", "a,,b"),
    ],
)
def test_bad_lora_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config("tiny", **{key: value})


def test_target_modules_as_peft_reads_them():
    assert target_modules("") is None
    assert target_modules(" all-linear ") == "all-linear"
    assert target_modules("c_attn, c_fc") == ["c_attn", "c_fc"]


# --- pi_ref is the adapter switched off -----------------------------------------------------------
def test_default_targets_are_peft_defaults_and_only_the_adapter_trains():
    lora, pi_ref = _models(lora_r=4)
    trainable = [n for n, p in lora.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".c_attn." in n for n in trainable)  # GPT-2's default: c_attn
    # r = 4 on c_attn [32 -> 96]: A 4 x 32 and B 96 x 4 per layer
    assert sum(p.numel() for p in lora.trainable_parameters()) == 2 * (4 * 32 + 96 * 4)


def test_reference_is_pi_ref_exactly_at_init_and_after_training():
    lora, pi_ref = _models(lora_r=4, lora_target_modules="all-linear", lora_dropout=0.1)
    base_before = {k: v.clone() for k, v in lora.policy.state_dict().items() if "lora_" not in k}
    ids, mask, _ = _batch(99)
    expected = pi_ref(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(lora.reference(input_ids=ids, attention_mask=mask).logits, expected)
    lora.policy.eval()  # the adapter's dropout off: at init (B = 0) the policy is pi_ref exactly
    assert torch.equal(lora.policy(input_ids=ids, attention_mask=mask).logits, expected)

    _train_steps(lora)
    assert lora.policy.training  # nothing in the reference view switched the policy's mode
    with torch.no_grad():
        moved = lora.policy.eval()(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(moved, expected, atol=1e-3)  # the adapter learned something
    assert torch.equal(lora.reference(input_ids=ids, attention_mask=mask).logits, expected)
    # what TI-DPO's triplet reads off pi_ref: its base model and output layer, reached through the view
    sel = torch.zeros(4, 11, dtype=torch.bool)
    sel[:, 5:] = True
    targets = ids[:, 1:][sel]
    assert torch.equal(
        _response_logps(lora.reference, ids, mask, sel, targets),
        _response_logps(pi_ref, ids, mask, sel, targets),
    )
    # the base weights are bitwise those of pi_ref (peft renames them .base_layer.)
    after = {k: v for k, v in lora.policy.state_dict().items() if "lora_" not in k}
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in after)
    ref_state = pi_ref.state_dict()
    assert all(torch.equal(v, ref_state[k.replace(".base_layer", "")]) for k, v in after.items())


def test_reference_view_generates_as_pi_ref_and_leaves_the_policy_alone():
    lora, pi_ref = _models(lora_r=4)
    _train_steps(lora, steps=2)
    view = lora.reference
    assert isinstance(view, AdapterOff) and isinstance(view.base_model, AdapterOff)
    lora.policy.train()
    view.eval()
    assert lora.policy.training  # eval() of the view does not switch the policy's adapter dropout
    with pytest.raises(ValueError, match="frozen"):
        view.requires_grad_(True)
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(
        do_sample=True,
        max_new_tokens=6,
        top_k=0,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )

    def generated(model):
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, **kwargs)
        return out.sequences, torch.stack(out.logits)

    tokens, logits = generated(view)
    ref_tokens, ref_logits = generated(pi_ref)
    assert torch.equal(tokens, ref_tokens)
    # the full forward is bitwise pi_ref's (above); generate's first step runs the output layer on the last
    # position only, where the CPU's GEMM gave a 1-ulp difference (3e-8) between equal inputs in two models
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    assert not torch.allclose(generated(lora.policy.eval())[1], ref_logits, atol=1e-3)  # the adapter is off


def test_kv_steps_do_not_skip_the_adapter():
    # GPT2Steps writes GPT-2's blocks out from their weights: with LoRA layers it must step aside
    lora, pi_ref = _models(lora_r=4, lora_target_modules="all-linear")
    assert GPT2Steps.applies(pi_ref) and not GPT2Steps.applies(lora.policy)
    _train_steps(lora, steps=2)
    policy = lora.policy.eval()
    ids, mask, _ = _batch(5)
    with torch.no_grad():
        steps = cached_steps(policy, torch.ones(4, 12, dtype=torch.long))
        positions = torch.arange(12).expand(4, 12)
        got = steps(ids, positions)
        want = policy(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- saving and checkpoints ----------------------------------------------------------------------------
def test_merged_policy_is_a_plain_model_with_the_adapters_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    lora, _ = _models(lora_r=4, lora_target_modules="all-linear")
    _train_steps(lora)
    ids, mask, _ = _batch(7)
    lora.policy.eval()
    with torch.no_grad():
        expected = lora.policy(input_ids=ids, attention_mask=mask).logits
    lora.merged().save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not any("lora" in k for k in loaded.state_dict())
    assert all(type(b.attn.c_attn) is Conv1D for b in loaded.transformer.h)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5
        )


def test_checkpoint_state_is_the_adapter_only():
    lora, _ = _models(lora_r=4)
    state = TrainableState(lora.policy)
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    assert saved and all("lora_" in k for k in saved)
    _train_steps(lora, steps=2)
    assert any(not torch.equal(saved[k], v) for k, v in state.state_dict().items())
    state.load_state_dict(saved)
    assert all(torch.equal(saved[k], v) for k, v in state.state_dict().items())
    with pytest.raises(CheckpointError, match="another configuration"):
        state.load_state_dict({**saved, "lm_head.weight": torch.zeros(1)})


# --- end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_run_with_lora_trains_and_saves_a_merged_model(imdb_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from tdpo_lab.cli import main

    args = small_cli_args(imdb_path, tmp_path / "cache", lora_r=8)
    assert main(["run", "--method", "tdpo2", "--out", str(tmp_path / "r"), *args]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["lora_r"] == 8
    evals = read_jsonl(tmp_path / "r" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert evals[-1]["kl_seq"] > 0  # the policy left pi_ref
    assert "| LoRA | r 8, alpha 16" in (tmp_path / "r" / "policy" / "README.md").read_text()  # the model card
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "policy")
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.slow
def test_killed_and_resumed_lora_run_equals_an_uninterrupted_one(imdb_path, tmp_path):
    from test_pipeline import TINY, _assert_same_weights, _metrics, _state

    from tdpo_lab.runs.train import train

    cfg = load_config(
        "tiny", fast=True, data_path=str(imdb_path), cache_dir=str(tmp_path / "cache"), **TINY,
        method="tidpo", lora_r=4, lora_target_modules="all-linear",
    )  # fmt: skip
    a = train(cfg, tmp_path / "a", progress=False)
    c = train(cfg, tmp_path / "c", progress=False, stop_after=5)  # last checkpoint at step 4
    checkpoint = torch.load(c / "checkpoint" / "state.pt", weights_only=True)
    assert checkpoint["step"] == 4 and all("lora_" in k for k in checkpoint["model"])
    train(cfg, c, progress=False)
    assert _metrics(a) == _metrics(c)
    assert read_jsonl(a / "eval.jsonl") == read_jsonl(c / "eval.jsonl")
    _assert_same_weights(_state(a / "policy"), _state(c / "policy"))
