"""The experiment pipeline end to end on the fast configuration: SFT, pairs, training, resumption, caches."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest
import torch

from tdpo_lab.config import ConfigError, load_config
from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.products.pairs import (
    InvertedPairError,
    assert_no_inverted,
    build_pairs,
    pairs_path,
    rank_pairs,
    split_pairs,
)
from tdpo_lab.products.sft import sft_history, train_sft
from tdpo_lab.runs.rundir import RunConfigMismatch
from tdpo_lab.runs.train import train

pytestmark = pytest.mark.slow

# Smaller still than the fast profile: these tests train several times.
TINY = dict(
    max_train_reviews=300,
    vocab_size=512,
    n_layer=1,
    n_head=2,
    n_embd=32,
    n_positions=192,
    sft_steps=20,
    sft_block_size=48,
    sft_eval_every=10,
    sft_checkpoint_every=10,
    pair_prompts=12,
    samples_per_prompt=3,
    max_new_tokens=10,
    train_steps=6,
    batch_size=3,
    eval_every=3,
    checkpoint_every=2,
    eval_prompts=4,
    eval_samples=2,
    eval_max_new_tokens=8,
    eval_pairs=3,
    anchor_max_new_tokens=6,
    lr=2e-3,
    warmup_steps=1,
)


@pytest.fixture(scope="module")
def pipeline_cfg(imdb_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_config("tiny", fast=True, data_path=str(imdb_path), cache_dir=str(cache), **TINY)


def _state(folder):
    from tdpo_lab.core.models import load_model

    return load_model(str(folder)).state_dict()


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_sft_trains_caches_and_resumes_identically(pipeline_cfg, tmp_path):
    folder = train_sft(pipeline_cfg, progress=False)
    history = sft_history(pipeline_cfg)
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    assert evals[-1] < evals[0], "held-out loss should fall during SFT"
    assert train_sft(pipeline_cfg, progress=False) == folder  # cached: no retraining

    other = pipeline_cfg.replace(cache_dir=str(tmp_path / "c2"))
    train_sft(other, progress=False, stop_after=13)  # killed after step 13: last checkpoint at step 10
    resumed = train_sft(other, progress=False)
    _assert_same_weights(_state(folder), _state(resumed))
    assert [r["step"] for r in sft_history(other)] == [r["step"] for r in history]


def test_pairs_are_ranked_cached_and_keyed(pipeline_cfg):
    df = build_pairs(pipeline_cfg, progress=False)
    assert len(df) > 0
    assert (df["reward_chosen"] > df["reward_rejected"]).all()
    assert df.groupby("prompt_id").size().max() <= 3  # K = 3 gives at most 3 pairs per prompt
    path = pairs_path(pipeline_cfg)
    mtime = path.stat().st_mtime_ns
    pd.testing.assert_frame_equal(build_pairs(pipeline_cfg, progress=False), df)
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    for change in (
        {"data_seed": 1},
        {"max_new_tokens": 11},
        {"min_reward_gap": 0.1},
        {"samples_per_prompt": 4},
    ):
        assert pairs_path(pipeline_cfg.replace(**change)) != path, change
    # a training seed shares the SFT model and the pairs of its data seed
    assert pairs_path(pipeline_cfg.replace(seed=1)) == path
    train_pairs, heldout = split_pairs(df, pipeline_cfg)
    assert set(train_pairs["prompt_id"]).isdisjoint(heldout["prompt_id"])


def test_rank_pairs_and_inverted_pair_error():
    import numpy as np

    df = rank_pairs(["p"], [["a", "b", "c"]], np.array([[0.2, 0.9, 0.5]]))
    assert list(zip(df["chosen"], df["rejected"], strict=True)) == [("b", "a"), ("c", "a"), ("b", "c")]
    assert len(rank_pairs(["p"], [["a", "b", "c"]], np.array([[0.2, 0.9, 0.5]]), min_gap=0.35)) == 2
    bad = df.copy()
    bad.loc[0, ["reward_chosen", "reward_rejected"]] = [0.1, 0.8]
    with pytest.raises(InvertedPairError, match="inverted"):
        assert_no_inverted(bad)


@pytest.mark.parametrize("method", ["dpo", "tdpo1", "tdpo2", "attnpo", "tidpo"])
def test_training_changes_parameters_and_logs(pipeline_cfg, tmp_path, method):
    cfg = pipeline_cfg.replace(method=method)
    run = train(cfg, tmp_path / method, progress=False)
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, cfg.train_steps + 1))
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "kl_seq/chosen",
        "kl_seq/rejected",
        "logits/chosen",
        "logits/rejected",
        "learning_rate",
    ):
        assert key in metrics[0], key
    # warm-up of one step: the constant rate, under TRL's name and the kit's first one
    assert all(m["learning_rate"] == m["lr"] == pytest.approx(cfg.lr) for m in metrics)
    assert abs(metrics[0]["loss"] - (0.6931 if method != "tidpo" else metrics[0]["loss"])) < 1e-3
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[0]["kl_seq"] == pytest.approx(0.0, abs=1e-6)
    before = _state(train_sft(cfg, progress=False))
    after = _state(run / "policy")
    assert any(not torch.equal(before[k], after[k]) for k in before), (
        "training left every parameter unchanged"
    )


def test_dpo_lowers_its_loss(pipeline_cfg, tmp_path):
    # two epochs of the tiny pair set at a moderate step size: a few noisy batches cannot hide the trend
    cfg = pipeline_cfg.replace(method="dpo", train_steps=24, eval_every=24, lr=2e-3)
    run = train(cfg, tmp_path / "dpo", progress=False)
    losses = [m["loss"] for m in read_jsonl(run / "metrics.jsonl")]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.05, losses


def test_same_seed_same_metrics_and_resume_is_exact(pipeline_cfg, tmp_path):
    cfg = pipeline_cfg.replace(method="tidpo")
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert _metrics(a) == _metrics(b)
    # killed after 5 steps (last checkpoint at step 4), then resumed by the same call
    # report_to only mirrors the logs: the same run folder, and TensorBoard ends with the JSON lines' values
    mirrored = cfg.replace(report_to="tensorboard" if importlib.util.find_spec("tensorboard") else "")
    c = train(mirrored, tmp_path / "c", progress=False, stop_after=5)
    assert not (c / "policy").exists()
    train(mirrored, c, progress=False)
    assert _metrics(a) == _metrics(c)
    assert read_jsonl(a / "eval.jsonl") == read_jsonl(c / "eval.jsonl")
    _assert_same_weights(_state(a / "policy"), _state(c / "policy"))
    if mirrored.report_to:
        from test_trackers import tensorboard_scalars

        scalars = tensorboard_scalars(c / "tensorboard")
        for record in read_jsonl(c / "metrics.jsonl"):
            for key in ("loss", "logits/chosen", "learning_rate"):
                assert scalars[key][record["step"]] == pytest.approx(record[key], rel=1e-6), key
        assert sorted(scalars["eval/reward"]) == [e["step"] for e in read_jsonl(c / "eval.jsonl")]


def test_run_folder_with_other_config_is_refused(pipeline_cfg, tmp_path):
    train(pipeline_cfg.replace(method="dpo", train_steps=1, eval_every=1), tmp_path / "r", progress=False)
    with pytest.raises(RunConfigMismatch, match="different configuration"):
        train(
            pipeline_cfg.replace(method="tdpo2", train_steps=1, eval_every=1), tmp_path / "r", progress=False
        )
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["method"] == "dpo"


def test_bad_method_and_parameters_are_clear_errors(pipeline_cfg):
    with pytest.raises(ConfigError, match="method"):
        pipeline_cfg.replace(method="ppo")
    with pytest.raises(ConfigError, match="beta"):
        pipeline_cfg.replace(beta=-1.0)
    with pytest.raises(ConfigError, match="'bta'.*did you mean 'beta'"):
        pipeline_cfg.replace(bta=0.1)
