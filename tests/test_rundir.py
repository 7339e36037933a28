"""One run folder: open (config check, env.json), its paths, logs, "finished", tolerant JSON lines."""

import json

import numpy as np
import pytest

from tdpo_lab.config import load_config
from tdpo_lab.core.jsonl import read_jsonl_tolerant
from tdpo_lab.runs.rundir import RunConfigMismatch, RunDir, run_name, write_env


def test_env_json_and_rundir_open(tmp_path):
    cfg = load_config("tiny", fast=False, method="tdpo2", seed=3)
    run = RunDir.open(tmp_path / "run", cfg)
    env = json.loads(run.env_path.read_text())
    for key in ("python", "torch", "transformers", "numpy", "device", "git_commit", "hostname", "time"):
        assert env[key], key
    assert set(write_env(tmp_path / "other")) == set(env)
    # the full package list, pip-freeze style: the kit's own dependencies are in it with their versions
    import torch
    import transformers

    packages = env["packages"]
    names = [p.split("==")[0].lower() for p in packages]
    assert names == sorted(names) and len(names) == len(set(names))
    assert f"torch=={torch.__version__}" in packages
    assert f"transformers=={transformers.__version__}" in packages
    assert run.config()["method"] == "tdpo2"
    record = run.log_eval(0, {"reward": np.float64(0.5), "kl_seq": 0.0})
    assert record == {
        "step": 0,
        "method": "tdpo2",
        "beta": 0.1,
        "alpha": 0.5,
        "seed": 3,
        "reward": 0.5,
        "kl_seq": 0.0,
    }
    assert run.evals() == [record]
    assert run.checkpoint_dir == tmp_path / "run" / "checkpoint"


def test_read_jsonl_tolerant(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n[1, 2]\n')
    records, bad = read_jsonl_tolerant(path)
    assert records == [{"step": 1}, {"step": 3}] and bad == 2
    assert read_jsonl_tolerant(tmp_path / "missing.jsonl") == ([], 0)


def test_open_refuses_another_config_and_ignores_other_methods_knobs(tmp_path):
    cfg = load_config("tiny", fast=False, method="dpo", beta=0.1, seed=0)
    RunDir.open(tmp_path / "run", cfg)
    RunDir.open(
        tmp_path / "run", cfg.replace(alpha=0.9, num_threads=3)
    )  # DPO reads no alpha; threads are runtime
    with pytest.raises(RunConfigMismatch, match="different configuration.*beta"):
        RunDir.open(tmp_path / "run", cfg.replace(beta=0.2))
    assert RunDir(tmp_path / "run").config()["beta"] == 0.1


def test_paths_logs_and_finished(tmp_path, tiny_model, tiny_tokenizer):
    cfg = load_config("tiny", fast=False, method="tdpo2", seed=0)
    run = RunDir.open(tmp_path / run_name(cfg), cfg)
    assert run.checkpoint_path == run.path / "checkpoint" / "state.pt"
    assert run.policy_dir == run.path / "policy" and not run.is_finished
    for step in (1, 2, 3):
        run.log_metrics(step, {"loss": 0.1 * step})
        run.log_eval(step, {"reward": 0.5})
    run.truncate_logs(2)
    assert [m["step"] for m in run.metrics()] == [1, 2] and [e["step"] for e in run.evals()] == [1, 2]
    run.clear_logs()
    assert run.metrics() == [] and run.evals() == []

    run.log_eval(0, {"reward": 0.5, "kl_seq": 0.0})
    run.log_eval(6, {"reward": 0.625, "kl_seq": 1.5})
    run.checkpoint_dir.mkdir()
    model = tiny_model()
    run.save_policy(model, tiny_tokenizer)
    assert run.is_finished and not run.checkpoint_dir.exists()  # the finished policy replaces the checkpoint
    card = (run.policy_dir / "README.md").read_text()  # tdpo_lab.core.export's card, metrics from eval.jsonl
    assert "| reward | 0.5 | 0.625 |" in card and "pi_ref (step 0)" in card and "policy (step 6)" in card
    assert (run.policy_dir / "generation_config.json").is_file()
    assert "alpha0.5" in run.path.name  # tdpo2 reads alpha, so its run name carries it
