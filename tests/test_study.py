"""The frontier study: envelopes over beta, their comparison, the three-way verdict, the per-method grids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tdpo_lab.config import ConfigError, load_config
from tdpo_lab.runs.results import verdict
from tdpo_lab.runs.study import (
    FRONTIER_BETAS,
    compare_frontiers,
    dominance_verdict,
    envelope,
    frontier_value,
    method_curves,
    parse_betas,
    study_configs,
)


def _summary(method: str, curves: dict[float, list[tuple[float, float]]], n_seeds: int = 3) -> pd.DataFrame:
    rows = []
    for beta, points in curves.items():
        for step, (kl, reward) in enumerate(points):
            rows.append(
                {
                    "method": method,
                    "beta": beta,
                    "alpha": 0.5,
                    "step": 10 * step,
                    "n_seeds": n_seeds,
                    "kl_seq": kl,
                    "kl_seq_se": 0.01,
                    "reward": reward,
                    "reward_se": 0.002 + 0.001 * step,
                    "reward_stderr": 0.05,
                }
            )
    return pd.DataFrame(rows)


def _dense_frontier(curves, budget, n=4001):
    """Brute force: walk every segment at n points and keep the best reward within the budget."""
    best = -np.inf
    for curve in curves:
        kl, reward = curve["kl_seq"].to_numpy(float), curve["reward"].to_numpy(float)
        for i in range(len(kl) - 1):
            t = np.linspace(0.0, 1.0, n)
            k = kl[i] + t * (kl[i + 1] - kl[i])
            r = reward[i] + t * (reward[i + 1] - reward[i])
            inside = k <= budget
            if inside.any():
                best = max(best, r[inside].max())
    return best


RNG_CURVES = {
    0.1: [(0.0, 0.50), (1.2, 0.56), (2.9, 0.58), (4.6, 0.61)],
    0.3: [(0.0, 0.50), (0.6, 0.53), (1.1, 0.555), (1.6, 0.56)],
    1.0: [(0.0, 0.50), (0.3, 0.515), (0.7, 0.54), (1.0, 0.548)],
}


def test_frontier_value_equals_a_dense_walk_along_every_curve():
    curves = method_curves(_summary("dpo", RNG_CURVES), "dpo")
    for budget in np.linspace(0.0, 4.6, 37):
        exact = frontier_value(curves, budget)["reward"]
        assert exact == pytest.approx(_dense_frontier(curves, budget), abs=2e-5), budget
    # within 0.7 nats the large-beta curve is best; the beta it came from is reported
    assert frontier_value(curves, 0.7)["beta"] == 1.0
    assert frontier_value(curves, 4.6)["reward"] == pytest.approx(0.61)


def test_envelope_is_non_decreasing_and_covers_every_checkpoint():
    curves = method_curves(_summary("dpo", RNG_CURVES), "dpo")
    line = envelope(curves)
    assert (np.diff(line["reward"].to_numpy()) >= -1e-12).all()
    assert line["budget"].max() == pytest.approx(4.6)
    for curve in curves:  # no checkpoint lies above the envelope at its own KL
        for kl, reward in zip(curve["kl_seq"], curve["reward"], strict=True):
            assert frontier_value(curves, kl)["reward"] >= reward - 1e-12


def test_one_seed_falls_back_to_the_standard_error_over_prompts():
    curves = method_curves(_summary("dpo", RNG_CURVES, n_seeds=1), "dpo")
    assert (curves[0]["reward_se"] == 0.05).all() and set(curves[0]["se_source"]) == {"prompts (one seed)"}
    curves = method_curves(_summary("dpo", RNG_CURVES, n_seeds=3), "dpo")
    assert (curves[0]["reward_se"] < 0.05).all() and set(curves[0]["se_source"]) == {"seeds"}


def test_compare_frontiers_margins_and_verdicts():
    better = {0.1: [(0.0, 0.50), (0.5, 0.58), (1.0, 0.62)]}
    summary = pd.concat([_summary("dpo", RNG_CURVES), _summary("tdpo2", better)])
    curves = {m: method_curves(summary, m) for m in ("dpo", "tdpo2")}
    comparison = compare_frontiers(curves, "tdpo2")
    assert comparison["budget"].max() == pytest.approx(1.0)  # the largest KL both reach
    for row in comparison.itertuples():
        assert row.margin == pytest.approx(
            frontier_value(curves["tdpo2"], row.budget)["reward"]
            - frontier_value(curves["dpo"], row.budget)["reward"]
        )
    assert dominance_verdict(comparison) == "beyond 2 standard errors"
    reverse = compare_frontiers(curves, "dpo", base="tdpo2")
    assert dominance_verdict(reverse) == "opposite"


def test_verdict_three_ways_and_needs_a_standard_error():
    assert verdict(0.05, 0.02) == "beyond 2 standard errors"
    assert verdict(-0.05, 0.02) == "opposite"
    assert verdict(0.03, 0.02) == "within noise"
    assert verdict(-0.04, 0.02) == "within noise"  # exactly 2 s.e. is not beyond
    with pytest.raises(ValueError, match="standard error"):
        verdict(0.1, 0.0)


def test_parse_betas_grids_and_errors():
    assert parse_betas("") == FRONTIER_BETAS
    assert parse_betas("dpo=0.1,1; tdpo2=0.03") == {"dpo": (0.1, 1.0), "tdpo2": (0.03,)}
    for bad, message in (
        ("dpo:0.1", "METHOD=B1"),
        ("dpo=0.1;nosuch=1", "unknown method"),
        ("dpo=a,b", "not a comma-separated list"),
        ("tdpo2=0.1", "must include dpo"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_betas(bad)


def test_default_grids_span_what_the_study_needs():
    # DPO, TDPO1 and TDPO2 with at least three betas each; DPO reaches larger betas than TDPO2
    assert {"dpo", "tdpo1", "tdpo2"} <= set(FRONTIER_BETAS)
    assert all(len(betas) >= 3 for betas in FRONTIER_BETAS.values())
    assert max(FRONTIER_BETAS["dpo"]) > max(FRONTIER_BETAS["tdpo2"])
    configs = study_configs(
        lambda **kw: load_config("tiny", fast=True, **kw), {"dpo": (0.1, 1.0), "tdpo2": (0.1,)}, [0, 1]
    )
    assert [(c.method, c.beta, c.seed) for c in configs] == [  # seed by seed: whole grids first
        ("dpo", 0.1, 0),
        ("dpo", 1.0, 0),
        ("tdpo2", 0.1, 0),
        ("dpo", 0.1, 1),
        ("dpo", 1.0, 1),
        ("tdpo2", 0.1, 1),
    ]
    # a training seed shares its data seed's SFT model and pairs
    assert len({c.data_seed for c in configs}) == 1
