"""The monotone frontier against the old envelope on synthetic curves with a known frontier and known noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.isotonic import IsotonicRegression
from synthetic_runs import STEPS, synthetic_table, true_frontier

from tdpo_lab.config import load_config
from tdpo_lab.methods import method_names
from tdpo_lab.runs.frontier import envelope_overstatement, isotonic_at, isotonic_frontier, kl_range
from tdpo_lab.runs.rundir import run_name
from tdpo_lab.runs.study import STUDY_EVAL_EVERY, STUDY_GRID, frontier_value, grid_configs

SD = 0.02  # noise of one (setting, step, seed) point: its mean over prompts
BUDGETS = (1.5, 3.0)


def simulate(rng, n_settings, n_seeds=3):
    """Points of ``n_settings`` betas moving along the true frontier at different speeds, and their curves."""
    speeds = np.linspace(0.6, 1.2, n_settings)
    steps = np.arange(len(STEPS))
    kl = speeds[:, None, None] * steps[None, :, None] * np.ones((1, 1, n_seeds))  # [G, C, S]
    reward = true_frontier(kl) + rng.normal(0, SD, kl.shape) * (kl > 0)
    curves = [
        pd.DataFrame(
            {
                "kl_seq": kl[g].mean(-1),
                "reward": reward[g].mean(-1),
                "reward_se": reward[g].std(-1, ddof=1) / np.sqrt(n_seeds),
                "beta": float(g),
            }
        )
        for g in range(n_settings)
    ]
    return kl, reward, curves


def errors(n_settings, n_sims=300):
    rng = np.random.default_rng(n_settings)
    env, iso = [], []
    for _ in range(n_sims):
        kl, reward, curves = simulate(rng, n_settings)
        env.append([frontier_value(curves, k)["reward"] for k in BUDGETS])
        iso.append(isotonic_at(kl, reward, BUDGETS))
    truth = true_frontier(BUDGETS)
    return np.array(env) - truth, np.array(iso) - truth


def test_the_envelope_is_biased_upward_and_more_so_with_more_betas():
    env2, iso2 = errors(2)
    env8, iso8 = errors(8)
    for env, iso in ((env2, iso2), (env8, iso8)):
        n = len(env)
        assert (env.mean(0) > 3 * env.std(0, ddof=1) / np.sqrt(n)).all()  # biased upward, clearly
        # the monotone fit: no bias beyond its own error bar (nor beyond its Monte-Carlo noise, much)
        assert (np.abs(iso.mean(0)) < 0.5 * iso.std(0, ddof=1)).all()
        assert (np.abs(iso.mean(0)) < 4 * iso.std(0, ddof=1) / np.sqrt(n)).all()
    assert (env8.mean(0) > 1.5 * env2.mean(0)).all()  # more grid points to choose from, more bias
    assert (env8.mean(0) > iso8.std(0)).all()  # with 8 betas the envelope's bias exceeds the fit's s.e.


def test_isotonic_at_is_the_pool_adjacent_violators_fit():
    kl = np.array([0.0, 1.0, 2.0, 3.0])
    reward = np.array([0.5, 0.7, 0.6, 0.9])  # 0.7 > 0.6 violates: both become 0.65
    got = isotonic_at(kl, reward, [0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    np.testing.assert_allclose(got[:6], [0.5, 0.65, 0.65, 0.65, 0.775, 0.9])
    assert np.isnan(got[6])  # no extrapolation
    with pytest.raises(ValueError, match="two"):
        isotonic_at([1.0], [0.5], [1.0])


def test_isotonic_at_equals_scikit_learns_estimator_with_ties():
    rng = np.random.default_rng(3)
    kl = np.round(rng.uniform(0, 4, 300), 1)  # many tied KLs, as step 0 of every run is
    reward = 0.5 + 0.05 * kl + rng.normal(0, 0.1, 300)
    budgets = np.linspace(-0.5, 4.5, 41)
    reference = IsotonicRegression(increasing=True, out_of_bounds="nan").fit(kl, reward).predict(budgets)
    np.testing.assert_allclose(isotonic_at(kl, reward, budgets), reference, rtol=1e-12, atol=1e-12)


def test_isotonic_frontier_and_overstatement_on_a_results_table():
    table = synthetic_table({"dpo": {"speeds": np.linspace(0.2, 1.0, 6)}}, sd_noise=0.08, sd_seed=0.02)
    lo, hi = kl_range(table, "dpo")
    budgets = [0.5 * hi, 0.8 * hi, hi + 1.0]
    fit = isotonic_frontier(table, "dpo", budgets, n_boot=300)
    assert np.isnan(fit["reward"].iloc[2])
    inside = fit.iloc[:2]
    assert (inside["reward_se"] > 0).all() and (inside["lo"] <= inside["reward"]).all()
    assert (inside["reward"] <= inside["hi"]).all()
    assert fit["n_points"].iloc[0] == 6 * len(STEPS) * 3
    # the bootstrap s.e. of the fit is of the size of its actual error over many synthetic studies
    truth = true_frontier(budgets[:2])
    assert np.all(np.abs(inside["reward"] - truth) < 4 * inside["reward_se"])
    table_over = envelope_overstatement(table, "dpo", budgets[:2], n_boot=200)
    assert list(table_over.columns[:2]) == ["method", "budget"]
    np.testing.assert_allclose(table_over["overstatement"], table_over["envelope"] - table_over["isotonic"])


def test_the_retrained_study_grid_covers_every_method_at_three_settings():
    configs = grid_configs(lambda **kw: load_config("tiny", fast=False, **kw), eval_every=STUDY_EVAL_EVERY)
    assert set(STUDY_GRID) == set(method_names())
    settings = {(c.method, c.beta, c.alpha) for c in configs}
    for method in STUDY_GRID:
        assert len({s for s in settings if s[0] == method}) >= 3, method
    assert {c.alpha for c in configs if c.method == "tdpo2"} == {0.1, 0.25, 0.5}
    assert len(configs) == 3 * len(settings) == len({run_name(c) for c in configs})
    assert {c.eval_every for c in configs} == {40} and {c.seed for c in configs} == {0, 1, 2}
