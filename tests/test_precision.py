"""bf16 on the CPU (tdpo_lab.core.precision): forward passes under autocast, statistics, losses and evaluation fp32.

Every method's loss in bf16 is close to its fp32 loss on the same batch (and not equal: autocast did run),
token_stats reads fp32 logits, the weights and gradients stay fp32, TI-DPO's saliency and AttentionPO's judge
weights work under autocast, accelerate is left out of it on a CPU, and a bf16 run killed and resumed ends
identical to one that was not.
"""

from __future__ import annotations

import importlib
import warnings

import pandas as pd
import pytest
import torch
from test_pipeline import TINY, _assert_same_weights, _metrics, _state

from tdpo_lab.config import load_config
from tdpo_lab.core.distributed import accelerator_for
from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.core.models import build_model
from tdpo_lab.core.precision import cpu_bf16, forward_autocast, fp32_logits, fp32_region
from tdpo_lab.core.utils import seed_everything
from tdpo_lab.methods import get_method, method_names
from tdpo_lab.methods.attnpo_judge import attention_weights
from tdpo_lab.products.tokenizer import get_tokenizer
from tdpo_lab.runs.train import compute_loss, train

train_module = importlib.import_module(
    "tdpo_lab.runs.train"
)  # the module (tdpo_lab.runs.train is the function)


@pytest.fixture(scope="module")
def cfg(imdb_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_config("tiny", fast=True, data_path=str(imdb_path), cache_dir=str(cache), **TINY)


@pytest.fixture(scope="module")
def models(cfg):
    seed_everything(0)
    tokenizer = get_tokenizer(cfg)
    reference = build_model(cfg, tokenizer).eval().requires_grad_(False)
    policy = build_model(cfg, tokenizer)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():  # a policy away from pi_ref, so the log-ratios and the SeqKL are not zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    judge = build_model(cfg, tokenizer, attn_implementation="eager").eval()
    judge.load_state_dict(reference.state_dict())
    rows = pd.DataFrame(
        {
            "prompt": ["This movie was", "I watched it and", "The plot"],
            "chosen": [" great fun from start to end.", " loved every minute.", " is clever and warm."],
            "rejected": [" a waste of time.", " fell asleep twice, sadly.", " makes no sense."],
            "pair_id": [0, 1, 2],
        }
    )
    state = [attention_weights(judge, tokenizer, r.prompt, r.chosen, r.rejected) for r in rows.itertuples()]
    return policy, reference, tokenizer, rows, state


def test_switches():
    bf16, fp32 = load_config("tiny", mixed_precision="bf16"), load_config("tiny")
    assert cpu_bf16(bf16, "cpu") and not cpu_bf16(bf16, "cuda") and not cpu_bf16(fp32, "cpu")
    with forward_autocast(bf16, "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        with fp32_region(bf16, "cpu"):
            assert not torch.is_autocast_enabled("cpu")
    with forward_autocast(fp32, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    x = torch.ones(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    y = fp32_logits(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    z = torch.ones(2, dtype=torch.float64)
    assert fp32_logits(z) is z


def test_accelerate_does_not_autocast_on_a_cpu():
    acc = accelerator_for(load_config("tiny", mixed_precision="bf16", device="cpu"))
    assert acc.mixed_precision == "no"
    with acc.autocast():  # the loop's context: evaluation and the statistics stay fp32
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("method", [m for m in method_names() if m != "ipo"])
def test_bf16_loss_is_close_to_fp32_and_reads_fp32_logits(cfg, models, method, monkeypatch):
    policy, reference, tokenizer, rows, state = models
    seen = []
    real = train_module.token_stats

    def spy(policy_logits, ref_logits, labels, **kw):
        seen.append((policy_logits.dtype, ref_logits.dtype, torch.is_autocast_enabled("cpu")))
        return real(policy_logits, ref_logits, labels, **kw)

    monkeypatch.setattr(train_module, "token_stats", spy)
    losses, grads = {}, {}
    for precision in ("no", "bf16"):
        mcfg = cfg.replace(method=method, mixed_precision=precision)
        policy.zero_grad(set_to_none=True)
        loss, metrics = compute_loss(policy, reference, tokenizer, rows, mcfg, step_seed=7, state=state)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        assert grads[precision].dtype == torch.float32 and torch.isfinite(grads[precision]).all()
        losses[precision] = loss.item()
    assert seen == [(torch.float32, torch.float32, False)] * 2
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert losses["bf16"] != losses["no"]  # autocast ran
    assert losses["bf16"] == pytest.approx(losses["no"], abs=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["no"], dim=0)
    assert cos > 0.95, cos


def test_tidpo_saliency_under_autocast(cfg, models):
    policy, reference, tokenizer, rows, state = models
    from tdpo_lab.core.data import collate_preference_batch
    from tdpo_lab.methods import StepContext

    batch = collate_preference_batch(
        tokenizer, list(rows["prompt"]), list(rows["chosen"]), list(rows["rejected"]), max_length=192
    )
    weights = {}
    for precision in ("no", "bf16"):
        mcfg = cfg.replace(method="tidpo", mixed_precision=precision)
        ctx = StepContext(policy, reference, tokenizer, rows, batch, batch["labels"], mcfg, "cpu", 0, None)
        with forward_autocast(mcfg, "cpu"):
            w, logits = get_method("tidpo").step_weights(ctx)
        assert w.dtype == torch.float32 and torch.isfinite(w).all() and (w >= 0).all()
        assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        weights[precision] = w * (batch["labels"][:, 1:] != -100)
    torch.testing.assert_close(weights["bf16"], weights["no"], atol=0.05, rtol=0.05)


def test_a_bf16_run_resumes_exactly_and_differs_from_fp32(cfg, tmp_path, monkeypatch):
    run_cfg = cfg.replace(method="tidpo", mixed_precision="bf16")
    autocast_in_evaluation = []
    real = train_module.evaluate_policy

    def spy(*args, **kwargs):
        autocast_in_evaluation.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_policy", spy)
    a = train(run_cfg, tmp_path / "a", progress=False)
    assert autocast_in_evaluation == [False] * 3  # pi_ref (step 0), steps 3 and 6: fp32
    c = train(run_cfg, tmp_path / "c", progress=False, stop_after=5)  # last checkpoint at step 4
    assert not (c / "policy").exists()
    train(run_cfg, c, progress=False)
    assert _metrics(a) == _metrics(c)
    assert read_jsonl(a / "eval.jsonl") == read_jsonl(c / "eval.jsonl")
    _assert_same_weights(_state(a / "policy"), _state(c / "policy"))
    f = train(cfg.replace(method="tidpo"), tmp_path / "f", progress=False)
    assert [m["loss"] for m in _metrics(f)] != [m["loss"] for m in _metrics(a)]


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    from tdpo_lab.core import precision

    bf16 = load_config("tiny", mixed_precision="bf16")
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        precision.warn_if_emulated(bf16, "cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    with warnings.catch_warnings():  # native bf16, fp32 or a GPU: no warning
        warnings.simplefilter("error")
        precision.warn_if_emulated(bf16, "cpu")
        monkeypatch.setattr(precision, "native_bf16", lambda: False)
        precision.warn_if_emulated(load_config("tiny"), "cpu")  # fp32: nothing to warn about
        precision.warn_if_emulated(bf16, "cuda")  # a GPU: accelerate's autocast, not the kit's
