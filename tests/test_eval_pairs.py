"""The evaluation pairs from IMDb test prefixes (config eval_pair_source="test"): keyed, cached, one pair on each of
many test prompts none trained on, logged by prompt id, and no earlier run name or cache key moved."""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from tdpo_lab.cache import plan as plan_mod
from tdpo_lab.cache.plan import EVAL_PAIR_FIELDS, STAGES, Plan
from tdpo_lab.config import ConfigError, load_config
from tdpo_lab.products import eval_pairs as eval_pairs_mod
from tdpo_lab.products import reward as reward_mod
from tdpo_lab.products.eval_pairs import (
    build_eval_pairs,
    eval_pair_prompt_count,
    heldout_prefixes,
    one_pair_per_prompt,
)
from tdpo_lab.products.pairs import rank_pairs
from tdpo_lab.products.pairs_source import ImdbPairs, evaluation_prompts
from tdpo_lab.products.sft import load_reference
from tdpo_lab.runs import run_name, train
from tdpo_lab.runs.study import STUDY_FIXED, STUDY_GRID, grid_configs


# --- keys and names ----------------------------------------------------------------------------------
def _changed(cfg, field):
    value = getattr(cfg, field)
    return cfg.replace(**{field: value + 1 if isinstance(value, int) else value + 0.5})


def test_the_stage_is_keyed_by_its_fields_and_moves_the_reference_evaluation(imdb_path):
    base = load_config("tiny", fast=True, data_path=str(imdb_path))
    on = base.replace(eval_pair_source="test")
    assert Plan(on).key("eval_ref") != Plan(base).key("eval_ref")
    assert Plan(on).key("eval_pairs") == Plan(base).key(
        "eval_pairs"
    )  # the source picks, it does not key them
    numeric = [f for f in EVAL_PAIR_FIELDS if isinstance(getattr(on, f), (int, float))]
    assert len(numeric) == len(EVAL_PAIR_FIELDS) - 1  # all but reward
    for field in [*numeric, "sft_steps", "pair_prompts"]:  # its own fields, then upstream: pi_ref, the pairs
        moved = _changed(on, field)
        assert Plan(moved).key("eval_pairs") != Plan(on).key("eval_pairs"), field
        assert Plan(moved).key("eval_ref") != Plan(on).key("eval_ref"), field
    assert Plan(on.replace(reward="other/model")).key("eval_pairs") != Plan(on).key("eval_pairs")


def test_a_new_pair_format_moves_only_the_reference_evaluations_that_read_it(imdb_path, monkeypatch):
    base = load_config("tiny", fast=True, data_path=str(imdb_path))
    on = base.replace(eval_pair_source="test")
    before = {cfg: Plan(cfg).key("eval_ref") for cfg in (base, on)}
    bumped = dataclasses.replace(STAGES["eval_pairs"], version=STAGES["eval_pairs"].version + 1)
    monkeypatch.setitem(plan_mod.STAGES, "eval_pairs", bumped)
    assert Plan(base).key("eval_ref") == before[base]
    assert Plan(on).key("eval_ref") != before[on]


def test_the_option_names_new_runs_only_and_is_the_retrained_study_s_default():
    base = load_config("tiny", fast=False, method="dpo")
    assert base.eval_pair_source == "train"  # the profile keeps the old pairs
    assert "eval_pair_source" not in run_name(base)
    assert run_name(base.replace(eval_pair_source="test")) != run_name(base)
    configs = grid_configs(lambda **kw: load_config("tiny", fast=False, **kw), STUDY_GRID, **STUDY_FIXED)
    assert {c.eval_pair_source for c in configs} == {"test"} and {c.eval_every for c in configs} == {40}
    with pytest.raises(ConfigError, match="eval_pair_source"):
        load_config("tiny", eval_pair_source="heldout")


# --- choosing one pair per prompt -------------------------------------------------------------------
def _ranked(n_prompts: int, k: int, seed: int, empty_share: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    samples = [
        [f"s{p}_{j}" if rng.random() >= empty_share else "" for j in range(k)] for p in range(n_prompts)
    ]
    rewards = np.round(rng.random((n_prompts, k)), 1)  # coarse: some ties, which make no pair
    return rank_pairs([f"p{p}" for p in range(n_prompts)], samples, rewards)


def test_one_pair_per_prompt_takes_the_first_prompts_with_a_pair():
    ranked = _ranked(40, 4, seed=0, empty_share=0.3)
    got = one_pair_per_prompt(ranked, 10)
    having = sorted(ranked["prompt_id"].unique())
    assert list(got["prompt_id"]) == having[:10]  # distinct, in the test prefixes' order
    merged = got.merge(ranked, how="left", indicator=True)
    assert (merged["_merge"] == "both").all()  # every row is one of that prompt's ranked pairs
    assert len(one_pair_per_prompt(ranked, 1000)) == len(having)
    with pytest.raises(ValueError, match="n_pairs"):
        one_pair_per_prompt(ranked, 0)


def test_the_pair_of_a_prompt_is_drawn_uniformly():
    ranked = _ranked(1, 4, seed=3)  # one prompt, its ranked pairs
    counts = collections.Counter(
        tuple(one_pair_per_prompt(ranked, 1, seed=s)[["chosen", "rejected"]].iloc[0]) for s in range(3000)
    )
    assert set(counts) == set(zip(ranked["chosen"], ranked["rejected"], strict=True))
    expected = 3000 / len(ranked)
    assert all(abs(c - expected) < 5 * np.sqrt(expected) for c in counts.values())


def test_the_full_tiny_sizes_give_at_least_64_prompts_even_with_empty_samples():
    cfg = load_config("tiny", fast=False)
    n_prompts = eval_pair_prompt_count(cfg.eval_pairs)
    assert cfg.eval_pairs >= 64 and n_prompts > cfg.eval_pairs
    # a fifth of the samples empty and coarse rewards (ties): still 64 pairs from 64 different prompts
    ranked = _ranked(n_prompts, cfg.samples_per_prompt, seed=1, empty_share=0.2)
    got = one_pair_per_prompt(ranked, cfg.eval_pairs)
    assert len(got) == got["prompt_id"].nunique() == cfg.eval_pairs


# --- built on a small IMDb sample --------------------------------------------------------------------
SMALL = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    n_positions=192,
    sft_steps=8,
    sft_batch_size=4,
    sft_block_size=32,
    sft_eval_every=4,
    sft_eval_batches=1,
    sft_checkpoint_every=4,
    pair_prompts=12,
    samples_per_prompt=3,
    max_new_tokens=8,
    train_steps=1,
    batch_size=2,
    eval_every=1,
    checkpoint_every=1,
    eval_prompts=8,
    eval_samples=2,
    eval_max_new_tokens=6,
    eval_pairs=64,
    method="dpo",
    eval_pair_source="test",
)


@pytest.fixture(scope="module")
def small(imdb_path, tmp_path_factory):
    """300 train and 200 test reviews; a pi_ref of 8 steps; the run's inputs with test evaluation pairs."""
    folder = tmp_path_factory.mktemp("imdb_small")
    pd.read_parquet(imdb_path / "train.parquet").iloc[:300].to_parquet(folder / "train.parquet")
    pd.read_parquet(imdb_path / "test.parquet").iloc[:200].to_parquet(folder / "test.parquet")
    cache = tmp_path_factory.mktemp("c")
    cfg = load_config("tiny", fast=True, data_path=str(folder), cache_dir=str(cache), **SMALL)
    reward_mod._reward_for.cache_clear()
    with pytest.warns(UserWarning, match="below 0.85"):  # the classifier of 300 reviews is weak
        _, tokenizer = load_reference(cfg, progress=False)
        inputs = ImdbPairs(cfg).training_inputs(tokenizer, plan=Plan(cfg), progress=False)
    return cfg, tokenizer, inputs


def test_64_test_prompts_none_of_them_trained_on(small):
    cfg, tokenizer, inputs = small
    held, trained = inputs.heldout, inputs.train
    assert len(held) == held["prompt_id"].nunique() == 64
    assert not set(held["prompt"]) & set(inputs.pairs["prompt"])  # no training prompt, held out or not
    prefixes = heldout_prefixes(cfg, tokenizer, eval_pair_prompt_count(cfg.eval_pairs))
    assert all(prefixes[i] == p for i, p in zip(held["prompt_id"], held["prompt"], strict=True))
    assert (held["reward_chosen"] > held["reward_rejected"]).all()
    # the training pairs are those of the old split: only the evaluation pairs changed
    off_cfg = cfg.replace(eval_pair_source="train")
    off = ImdbPairs(off_cfg).training_inputs(tokenizer, plan=Plan(off_cfg), progress=False)
    pd.testing.assert_frame_equal(off.train, trained)
    assert off.heldout["prompt_id"].nunique() < 64 and set(off.heldout["prompt"]) <= set(
        inputs.pairs["prompt"]
    )


def test_the_stage_is_cached(small, monkeypatch):
    cfg, _, inputs = small
    assert Plan(cfg).entry("eval_pairs").sealed
    monkeypatch.setattr(eval_pairs_mod, "sample_and_rank", lambda *a, **k: pytest.fail("sampled again"))
    pd.testing.assert_frame_equal(build_eval_pairs(cfg, progress=False), inputs.heldout)


def test_a_test_prefix_that_is_also_a_training_prompt_is_skipped(small, monkeypatch, tmp_path):
    cfg, tokenizer, inputs = small
    first = heldout_prefixes(cfg, tokenizer, 1)[0]
    fake = inputs.pairs.assign(prompt=[first, *inputs.pairs["prompt"][1:]])
    monkeypatch.setattr(eval_pairs_mod, "build_pairs", lambda *a, **k: fake)
    eval_pairs_mod._sample_eval_pairs(cfg, tmp_path, progress=False, plan=Plan(cfg))
    got = pd.read_parquet(tmp_path / eval_pairs_mod.EVAL_PAIRS_FILE)
    assert 0 not in set(got["prompt_id"]) and first not in set(got["prompt"])
    assert 0 in set(inputs.heldout["prompt_id"])  # it was there before


def test_a_run_logs_the_test_prompts_ids_per_pair(small, tmp_path):
    cfg, tokenizer, inputs = small
    reward_mod._reward_for.cache_clear()
    with pytest.warns(UserWarning, match="below 0.85"):
        out = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        assert row["pair_prompt_ids"] == [int(i) for i in inputs.heldout["prompt_id"]]
        assert len(row["kl_seq_chosen_per_pair"]) == 64
    # the ids below eval_prompts name the same prefixes the reward evaluation scores
    prompts = evaluation_prompts(cfg, tokenizer)
    shared = [
        (i, p) for i, p in zip(inputs.heldout["prompt_id"], inputs.heldout["prompt"], strict=True) if i < 8
    ]
    assert shared and all(prompts[i] == p for i, p in shared)
    assert Plan(cfg).entry("eval_ref").sealed
    # the same training: only what the SeqKL curves are measured on differs
    off = train(cfg.replace(eval_pair_source="train"), tmp_path / "off", progress=False)
    losses = [
        [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for folder in (out, off)
    ]
    assert losses[0] == losses[1]
