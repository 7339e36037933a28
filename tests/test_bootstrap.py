"""The two-level bootstrap against brute-force enumeration and against data with known variance components."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from tdpo_lab.runs.bootstrap import (
    at_kl,
    bootstrap,
    checkpoint_arrays,
    difference,
    ideal_variance_of_mean,
    mean,
)


def enumerated_variance(y: np.ndarray) -> float:
    """Every (seed draw, unit draw) of the bootstrap, equally likely: the exact variance by brute force."""
    s, u = y.shape
    values = [
        y[np.ix_(seeds, units)].mean()
        for seeds in itertools.product(range(s), repeat=s)
        for units in itertools.product(range(u), repeat=u)
    ]
    return float(np.var(values))


def crossed(rng, s, p, sd_seed, sd_prompt, sd_noise, shift=0.0, seed_effects=None, prompt_effects=None):
    """y[s, p] = a_s + b_p + e_sp + shift: seeds and prompts crossed, as the kit's runs are."""
    a = rng.normal(0, sd_seed, s) if seed_effects is None else seed_effects
    b = rng.normal(0, sd_prompt, p) if prompt_effects is None else prompt_effects
    return shift + a[:, None] + b[None, :] + rng.normal(0, sd_noise, (s, p))


def test_closed_form_and_monte_carlo_match_enumeration():
    y = np.random.default_rng(0).normal(size=(2, 4)) * [[1.0], [3.0]]
    exact = enumerated_variance(y)
    assert ideal_variance_of_mean(y) == pytest.approx(exact, rel=1e-10)
    mc = mean(y, n_boot=40_000, seed=1)
    assert mc.estimate == pytest.approx(y.mean())
    assert mc.se**2 == pytest.approx(exact, rel=0.03)


def test_clusters_are_drawn_whole():
    # four copies of each of 3 prompts' values: drawing clusters is drawing the 3 prompts
    rng = np.random.default_rng(2)
    y = rng.normal(size=(3, 3))
    copies = np.repeat(y, 4, axis=1)
    clustered = mean(copies, clusters=np.repeat([7, 8, 9], 4), n_boot=30_000, seed=3)
    assert clustered.se**2 == pytest.approx(ideal_variance_of_mean(y), rel=0.04)
    # drawn unit by unit instead, the copies would look like 12 independent prompts: too small an error bar
    assert mean(copies, n_boot=30_000, seed=3).se < 0.85 * clustered.se


@pytest.mark.parametrize(("sd_seed", "sd_prompt"), [(1.0, 0.1), (0.1, 1.0), (0.5, 0.5)])
def test_standard_error_recovers_known_variance_components(sd_seed, sd_prompt):
    s, p, sd_noise = 20, 40, 0.5
    truth = sd_seed**2 / s + sd_prompt**2 / p + sd_noise**2 / (s * p)
    rng = np.random.default_rng(4)
    datasets = [crossed(rng, s, p, sd_seed, sd_prompt, sd_noise) for _ in range(400)]
    # brute force: the estimator's own spread over datasets drawn from the model
    assert np.var([d.mean() for d in datasets], ddof=1) == pytest.approx(truth, rel=0.2)
    ideal = np.mean([ideal_variance_of_mean(d) for d in datasets])
    assert ideal == pytest.approx(truth, rel=0.15)
    mc = np.mean([mean(d, n_boot=500, seed=i).se ** 2 for i, d in enumerate(datasets[:40])])
    assert mc == pytest.approx(truth, rel=0.25)


def nested_se(y: np.ndarray, n_boot: int, seed: int) -> float:
    """The alternative the module rejects: prompts drawn anew for every drawn seed."""
    rng = np.random.default_rng(seed)
    s, p = y.shape
    reps = [
        np.mean([y[i, rng.integers(0, p, p)].mean() for i in rng.integers(0, s, s)]) for _ in range(n_boot)
    ]
    return float(np.std(reps, ddof=1))


def test_prompts_shared_by_seeds_need_one_draw_for_all_seeds():
    s, p = 10, 30
    truth = 1.0 / p + 0.01 / s + 0.04 / (s * p)  # prompt effects dominate
    rng = np.random.default_rng(5)
    y = crossed(rng, s, p, 0.1, 1.0, 0.2)
    shared = mean(y, n_boot=3000, seed=6).se
    assert shared**2 == pytest.approx(truth, rel=0.5)
    assert nested_se(y, 1500, 7) < 0.6 * shared  # misses most of the prompts' share


def test_pairing_on_seeds_and_prompts_shrinks_the_error_of_a_difference():
    # each method has its own seed effects (training diverges), the prompts' effects are shared by both
    s, p, sd_seed, sd_prompt, sd_noise = 12, 40, 0.3, 1.0, 0.3
    truth = 2 * sd_seed**2 / s + 2 * sd_noise**2 / (s * p)  # the shared prompt effects cancel
    rng = np.random.default_rng(8)
    diffs, paired, unpaired = [], [], []
    for i in range(60):
        b_p = rng.normal(0, sd_prompt, p)
        a = crossed(rng, s, p, sd_seed, 0, sd_noise, 0.05, prompt_effects=b_p)
        b = crossed(rng, s, p, sd_seed, 0, sd_noise, 0.0, prompt_effects=b_p)
        diffs.append(a.mean() - b.mean())
        paired.append(difference(a, b, n_boot=400, seed=i).se ** 2)
        unpaired.append(mean(a, n_boot=400, seed=i).se ** 2 + mean(b, n_boot=400, seed=1000 + i).se ** 2)
    assert np.var(diffs, ddof=1) == pytest.approx(truth, rel=0.4)
    assert np.mean(paired) == pytest.approx(truth, rel=0.25)
    assert np.mean(paired) < 0.4 * np.mean(unpaired)  # unpaired, the prompts' 2 sd_prompt^2 / p stays in


def test_the_seed_by_prompt_interaction_is_counted_about_three_times():
    # pure noise: the truth is sd^2 / (s p); every term of the closed form picks up a share of it (expected
    # value of each term for i.i.d. cells), so a difference with no main effects gets a conservative error bar
    s, p = 6, 30
    expected = ((s - 1) * (p - 1) / (s * p) + (p - 1) / p + (s - 1) / s) / (s * p)
    rng = np.random.default_rng(10)
    ideal = np.mean([ideal_variance_of_mean(rng.normal(size=(s, p))) for _ in range(2000)])
    assert ideal == pytest.approx(expected, rel=0.05)
    assert 2.5 / (s * p) < expected < 3 / (s * p)


def test_a_general_statistic_and_its_replicates_are_reproducible():
    rng = np.random.default_rng(9)
    kl = np.abs(rng.normal(size=(4, 3, 8))).cumsum(0)  # [C, S, U]: growing along steps
    reward = 0.5 + 0.1 * kl + rng.normal(0, 0.05, kl.shape)
    data = {"kl": ("prompts", kl), "reward": ("prompts", reward)}
    stat = lambda d: at_kl(d["kl"], d["reward"], 1.0)  # noqa: E731
    one = bootstrap(stat, data, {"prompts": range(8)}, n_boot=300, seed=1)
    two = bootstrap(stat, data, {"prompts": range(8)}, n_boot=300, seed=1)
    assert one.se == two.se > 0
    assert one.estimate == pytest.approx(at_kl(kl.mean(-1), reward.mean(-1), 1.0))
    lo, hi = one.interval(0.9)
    assert lo < one.estimate < hi


def test_at_kl_reads_straight_lines_and_refuses_extrapolation():
    kl = np.array([[0.0], [1.0], [3.0]])
    y = np.array([[0.5], [0.6], [0.8]])
    assert at_kl(kl, y, 2.0) == pytest.approx(0.7)
    assert at_kl(kl, y, 0.5) == pytest.approx(0.55)
    assert np.isnan(at_kl(kl, y, 3.5))
    # a curve that turns back: the first crossing in step order, as a loop over segments would find it
    rng = np.random.default_rng(11)
    kl, y = rng.uniform(0, 3, (6, 2)), rng.normal(size=(6, 2))
    budgets = np.linspace(-0.2, 3.2, 23)
    k, v = kl.mean(-1), y.mean(-1)
    naive = []
    for b in budgets:
        hits = [i for i in range(5) if min(k[i], k[i + 1]) <= b <= max(k[i], k[i + 1])]
        i = hits[0] if hits else None
        naive.append(np.nan if i is None else v[i] + (b - k[i]) / (k[i + 1] - k[i]) * (v[i + 1] - v[i]))
    np.testing.assert_allclose(at_kl(kl, y, budgets), naive)


def test_checkpoint_arrays_pairs_seeds_and_refuses_gaps():
    rows = [
        {"method": "dpo", "beta": 0.1, "alpha": 0.5, "setting": "x", "step": st, "seed": sd,
         "reward_per_prompt": [st + sd, st + sd + 0.5], "prompt_ids": [0, 1]}
        for st in (0, 40) for sd in (1, 0)
    ]  # fmt: skip
    keys, values, seeds, labels = checkpoint_arrays(pd.DataFrame(rows), "reward_per_prompt")
    assert seeds == [0, 1] and list(labels) == [0, 1] and list(keys["step"]) == [0, 40]
    assert values.shape == (2, 2, 2) and values[1, 1, 1] == 41.5
    with pytest.raises(ValueError, match="seeds"):
        checkpoint_arrays(pd.DataFrame(rows[:-1]), "reward_per_prompt")
    with pytest.raises(ValueError, match="per_prompt=True"):
        checkpoint_arrays(pd.DataFrame(rows).drop(columns="prompt_ids"), "reward_per_prompt")
    with pytest.raises(ValueError, match="same seeds"):
        bootstrap(
            lambda d: 0.0, {"a": ("u", np.zeros((2, 3))), "b": ("u", np.zeros((3, 3)))}, {"u": range(3)}
        )
