"""The shared training loop's batch schedule and its resumption bookkeeping (the trainers' own resumption
tests, SFT and preference, are in test_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.core.loop import TrainingLoop, batch_schedule


def test_batch_schedule_is_a_function_of_seed_and_step_and_covers_each_epoch_once():
    n, bs, seed = 23, 5, 3
    per_epoch = n // bs
    first_epoch = np.concatenate([batch_schedule(n, bs, s, seed) for s in range(per_epoch)])
    assert len(set(first_epoch.tolist())) == per_epoch * bs  # no item twice within an epoch
    assert np.array_equal(batch_schedule(n, bs, 2, seed), batch_schedule(n, bs, 2, seed))
    assert not np.array_equal(batch_schedule(n, bs, 0, seed), batch_schedule(n, bs, 0, seed + 1))
    # a new permutation per epoch
    assert not np.array_equal(batch_schedule(n, bs, 0, seed), batch_schedule(n, bs, per_epoch, seed))
    with pytest.raises(ValueError, match="batch_size > 0"):
        batch_schedule(n, 0, 0, seed)


def make_loop(tmp_path, total=6):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loop = TrainingLoop(
        model,
        opt,
        sched,
        total_steps=total,
        checkpoint_path=tmp_path / "ckpt.pt",
        log=[tmp_path / "log.jsonl", tmp_path / "eval.jsonl"],
        eval_every=3,
        checkpoint_every=2,
    )
    data = torch.randn(total, 4, 3, generator=torch.Generator().manual_seed(1))

    def step_fn(step, part):
        loss = model(data[step]).pow(2).mean()
        return loss, {"loss": loss.item()}

    return loop, model, step_fn


def test_an_interrupted_loop_resumes_to_the_same_weights_and_log(tmp_path):
    whole, model_a, step_a = make_loop(tmp_path / "a")
    (tmp_path / "a").mkdir()
    assert whole.run(
        step_a, on_start=lambda: {"eval": 0.0}, evaluate=lambda s: {"eval": float(s)}, progress=False
    )
    (tmp_path / "b").mkdir()
    part, _, step_b = make_loop(tmp_path / "b")
    assert not part.run(
        step_b,
        on_start=lambda: {"eval": 0.0},
        evaluate=lambda s: {"eval": float(s)},
        progress=False,
        stop_after=4,
    )
    again, model_b, step_c = make_loop(tmp_path / "b")  # a fresh process: new objects, same folder
    assert again.run(step_c, evaluate=lambda s: {"eval": float(s)}, progress=False)
    assert torch.equal(model_a.weight, model_b.weight)
    log_a = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(tmp_path / "a" / "log.jsonl")]
    log_b = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(tmp_path / "b" / "log.jsonl")]
    assert log_a == log_b and [r["step"] for r in log_a] == list(range(7))
    assert [r["eval"] for r in log_a if "eval" in r] == [0.0, 3.0, 6.0]


def test_the_logged_learning_rate_is_the_rate_the_steps_update_used(tmp_path):
    # SGD moves w by -rate * grad, so the rate each update used is read off the weights themselves
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warmup = 4
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))  # train.py's
    loop = TrainingLoop(
        model,
        opt,
        sched,
        total_steps=5,
        checkpoint_path=tmp_path / "ckpt.pt",
        log=[tmp_path / "log.jsonl"],
        eval_every=100,
        checkpoint_every=100,
        max_grad_norm=1e9,  # no clipping: the update is exactly -rate * grad
    )
    data = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1))
    used = []

    def step_fn(step, part):
        before = model.weight.detach().clone()
        loss = model(data[step]).pow(2).mean()
        (grad,) = torch.autograd.grad(loss, model.weight, retain_graph=True)
        used.append((before, grad))
        return loss, {"loss": loss.item()}

    assert loop.run(step_fn, progress=False)
    after = [b for b, _ in used[1:]] + [model.weight.detach()]
    rates = [float(((b - a) / g).mean()) for (b, g), a in zip(used, after, strict=True)]
    logged = read_jsonl(tmp_path / "log.jsonl")
    assert logged[0]["learning_rate"] == pytest.approx((0 + 1) / warmup * 0.1)  # step 1: 1/W of the target
    for record, rate in zip(logged, rates, strict=True):
        assert record["learning_rate"] == record["lr"] == pytest.approx(rate, rel=1e-5)
