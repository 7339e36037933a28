"""Per-prompt evaluation logging and the results store: a stored run reads back exactly like its run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_args import SMALL, small_cli_args

from tdpo_lab.cli import main
from tdpo_lab.runs.results import collect
from tdpo_lab.runs.rundir import RunDir
from tdpo_lab.runs.store import MARKER, pending, store_run, stored_names

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_args(imdb_path, tmp_path_factory):
    return small_cli_args(imdb_path, tmp_path_factory.mktemp("store-cache"))


@pytest.fixture(scope="module")
def finished_runs(small_args, tmp_path_factory):
    """Two finished runs of a tiny sweep (dpo, tdpo2), and one unfinished folder beside them."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["sweep", "--methods", "dpo,tdpo2", "--betas", "0.1", "--out", str(root), *small_args]) == 0
    return root


def test_every_evaluation_logs_per_prompt_and_per_pair_values(finished_runs):
    for run in sorted(p.parent for p in finished_runs.glob("*/policy")):
        for record in RunDir(run).evals():
            n = SMALL["eval_prompts"]
            assert record["prompt_ids"] == list(range(n))
            for key, mean in (("reward", "reward"), ("kl_seq", "kl_seq")):
                values = record[f"{key}_per_prompt"]
                assert len(values) == n
                # equal sample counts per prompt: the mean of the prompt means is the mean of the samples
                assert np.mean(values) == pytest.approx(record[mean], rel=1e-5, abs=1e-9)
            assert len(record["entropy_per_prompt"]) == n
            pairs = len(record["kl_seq_chosen_per_pair"])
            assert pairs == len(record["kl_seq_rejected_per_pair"]) == len(record["pair_prompt_ids"]) > 0
            assert np.mean(record["kl_seq_chosen_per_pair"]) == pytest.approx(
                record["kl_seq_chosen"], rel=1e-5, abs=1e-9
            )
            assert np.mean(record["kl_seq_rejected_per_pair"]) == pytest.approx(
                record["kl_seq_rejected"], rel=1e-5, abs=1e-9
            )
        samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        assert samples and {"step", "prompt", "continuation", "reward"} <= set(samples[0])


def test_collect_leaves_lists_out_unless_asked(finished_runs):
    plain = collect(finished_runs)
    assert "reward_per_prompt" not in plain.columns and "prompt_ids" not in plain.columns
    full = collect(finished_runs, per_prompt=True)
    assert isinstance(full["reward_per_prompt"].iloc[0], list)
    pd.testing.assert_frame_equal(full[plain.columns], plain)


def test_store_reads_back_like_the_runs(finished_runs, tmp_path, capsys):
    (finished_runs / "unfinished_run").mkdir(exist_ok=True)
    (finished_runs / "unfinished_run" / "config.json").write_text(json.dumps({"method": "dpo"}))
    store = tmp_path / "results" / "tiny"
    assert main(["store", str(finished_runs), "--into", str(store)]) == 0
    out = capsys.readouterr()
    assert "stored 2 finished run(s)" in out.out and "unfinished_run" in out.err
    assert stored_names(store) == {p.parent.name for p in finished_runs.glob("*/policy")}
    for folder in store.iterdir():
        names = {p.name for p in folder.iterdir()}
        assert names == {"config.json", "env.json", "eval.jsonl", "metrics.jsonl.gz", "samples.jsonl", MARKER}
        assert "packages" not in json.loads((folder / "env.json").read_text())
        # the gzipped training log reads back through the run-folder reader
        original = RunDir(finished_runs / folder.name)
        assert RunDir(folder).metrics() == original.metrics()
    for per_prompt in (False, True):
        a = collect(finished_runs, per_prompt=per_prompt).drop(columns="path")
        b = collect(store, per_prompt=per_prompt).drop(columns="path")
        pd.testing.assert_frame_equal(a, b)
    total = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert total < 200_000  # no weights


def test_storing_again_gives_the_same_bytes_and_refuses_unfinished_runs(finished_runs, tmp_path):
    run = next(p.parent for p in finished_runs.glob("*/policy"))
    first = store_run(run, tmp_path / "a")
    second = store_run(run, tmp_path / "b")
    for f in first.iterdir():
        assert f.read_bytes() == (second / f.name).read_bytes(), f.name
    with pytest.raises(ValueError, match="not finished"):
        unfinished = tmp_path / "u"
        unfinished.mkdir()
        (unfinished / "config.json").write_text(json.dumps({"method": "dpo"}))
        store_run(unfinished, tmp_path / "a")
    with pytest.raises(ValueError, match="not a run folder"):
        store_run(tmp_path / "a", tmp_path / "c")


def test_a_sweep_pointed_at_a_store_skips_stored_runs(small_args, finished_runs, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["store", str(finished_runs), "--into", str(store)]) == 0
    fresh = tmp_path / "fresh"  # a new session: no run folders, only the store
    args = ["sweep", "--methods", "dpo,tdpo2", "--betas", "0.1", "--out", str(fresh), "--store", str(store)]
    assert main([*args, *small_args]) == 0
    assert not fresh.exists() or not list(fresh.glob("*/policy"))  # nothing retrained
    assert (fresh / "results.md").exists()  # the report, from the store
    # one more beta: only its runs train, and they join the store
    assert main([*args[:4], "0.1,0.2", *args[5:], *small_args]) == 0
    assert {p.parent.name for p in fresh.glob("*/policy")} == {
        n for n in stored_names(store) if "beta0.2" in n
    }
    assert len(stored_names(store)) == 4


def test_pending_without_store_keeps_everything(tmp_path):
    configs, outs = ["a", "b"], [tmp_path / "x", tmp_path / "y"]
    assert pending(configs, outs, None) == (configs, outs)
    (tmp_path / "s" / "y").mkdir(parents=True)
    (tmp_path / "s" / "y" / MARKER).write_text("{}")
    assert pending(configs, outs, tmp_path / "s") == (["a"], [tmp_path / "x"])


def test_train_points_hands_each_finished_run_on_at_once(tmp_path, monkeypatch):
    """A study stopped half-way keeps what finished: on_finished sees each run as it ends, never a failed one."""
    from tdpo_lab import load_config
    from tdpo_lab.runs import fanout

    seen = []

    def fake_train(cfg, out, progress=True):
        if cfg.seed == 1:
            raise RuntimeError("this point fails")
        seen.append(("trained", Path(out).name))
        return Path(out)

    monkeypatch.setattr(fanout, "train", fake_train)
    configs = [load_config("tiny", fast=True, method="dpo", seed=s) for s in (0, 1, 2)]
    outs = [tmp_path / f"run{s}" for s in (0, 1, 2)]
    failures = fanout.train_points(
        configs, outs, jobs=1, on_finished=lambda out: seen.append(("stored", out.name))
    )
    assert [name for name, _ in failures] == ["run1"]
    assert seen == [("trained", "run0"), ("stored", "run0"), ("trained", "run2"), ("stored", "run2")]
