"""One verdict per claim: the right verdict on synthetic runs with known truth, the same through every entry point."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_runs import synthetic_table, write_run_folders

from tdpo_lab.cli import main
from tdpo_lab.runs.claims import all_claims, frontier_claim, seqkl_balance_claim, write_claims
from tdpo_lab.runs.frontier import kl_range
from tdpo_lab.runs.results import collect
from tdpo_lab.runs.store import store_runs

DPO = {"speeds": [0.3, 0.6, 1.0], "betas": [1.0, 0.3, 0.1], "rho": 1.15}
N_BOOT = 400


def study(**tdpo2):
    spec = {"speeds": [0.2, 0.4, 0.8], "betas": [0.3, 0.1, 0.03], "rho": 1.02, **tdpo2}
    return synthetic_table({"dpo": DPO, "tdpo2": spec}, sd_noise=0.03, sd_seed=0.005)


@pytest.mark.parametrize(
    ("gain", "expected"), [(0.28, "beyond 2 standard errors"), (0.2, "within noise"), (0.12, "opposite")]
)
def test_frontier_claim_finds_the_known_ordering(gain, expected):
    table = study(gain=gain)
    claim = frontier_claim(table, "tdpo2", "dpo", n_boot=N_BOOT)
    assert claim.verdict == expected
    assert claim.kl_range[1] == pytest.approx(0.8 * kl_range(table, "tdpo2")[1])  # inside TDPO2's range
    assert np.mean(claim.per_budget) == pytest.approx(claim.estimate)


def test_balance_claim_compares_at_matched_kl_not_at_the_end():
    # |ln rho| grows with KL alike for both methods; TDPO2 moves less, so its final |ln rho| is smaller
    same = lambda k: np.exp(0.04 * k)  # noqa: E731
    table = synthetic_table(
        {
            "dpo": {**DPO, "rho": same},
            "tdpo2": {"speeds": [0.2, 0.3, 0.5], "betas": [0.3, 0.1, 0.03], "rho": same},
        },
        sd_noise=0.03,
    )
    last = table[table["step"] == table["step"].max()]
    raw = {
        m: np.abs(np.log(g["kl_seq_rejected"] / g["kl_seq_chosen"])).mean() for m, g in last.groupby("method")
    }
    assert raw["dpo"] > 1.5 * raw["tdpo2"]  # the raw comparison would call TDPO2 balanced
    claim = seqkl_balance_claim(table, "tdpo2", "dpo", n_boot=N_BOOT)
    assert claim.verdict == "within noise"
    assert claim.kl_range[1] <= table.loc[table["method"] == "tdpo2", "kl_seq"].max()
    balanced = seqkl_balance_claim(study(), "tdpo2", "dpo", n_boot=N_BOOT)  # rho 1.02 against 1.15
    assert balanced.verdict == "beyond 2 standard errors"
    assert balanced.estimate == pytest.approx(np.log(1.15) - np.log(1.02), abs=0.02)


def test_the_same_runs_give_the_same_verdicts_through_every_entry_point(tmp_path, capsys):
    runs = write_run_folders(study(gain=0.25), tmp_path / "runs")
    from_runs = all_claims(collect(runs, per_prompt=True))
    assert len(from_runs) == 2
    store = tmp_path / "results" / "tiny"
    assert len(store_runs([runs], store)["stored"]) == 18
    from_store = all_claims(collect(store, per_prompt=True))
    assert from_store == from_runs  # the records, every field
    lines = [c.line() for c in from_runs]
    assert main(["claims", str(store), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert all(line in printed for line in lines)
    assert all(line in (tmp_path / "cli" / "claims.md").read_text() for line in lines)
    assert all(line in write_claims(runs).read_text() for line in lines)
    study_args = ["frontier-study", "--collect-only", "--betas", "dpo=1,0.3,0.1;tdpo2=0.3,0.1,0.03"]
    assert main([*study_args, "--out", str(runs), "--report", str(tmp_path / "study"), "--quiet"]) == 0
    assert all(line in (tmp_path / "study" / "claims.md").read_text() for line in lines)
