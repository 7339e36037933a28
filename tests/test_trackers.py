"""tdpo_lab.runs.trackers: report_to mirrors the run's JSON lines to TensorBoard under the same names."""

from __future__ import annotations

import sys

import pytest

from tdpo_lab.config import ConfigError, load_config
from tdpo_lab.runs.rundir import run_name
from tdpo_lab.runs.trackers import NoTracker, TrackerError, open_tracker


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard itself reads the folder (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_no_tracker_by_default_and_report_to_is_validated_and_runtime(tmp_path):
    cfg = load_config("tiny", fast=True)
    assert cfg.report_to == "" and isinstance(open_tracker(cfg.report_to, tmp_path), NoTracker)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="report_to"):
        load_config("tiny", report_to="wandb")
    assert run_name(cfg.replace(report_to="tensorboard")) == run_name(cfg)  # logging never splits runs


def test_tensorboard_gets_the_jsonl_names_and_a_resume_drops_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = open_tracker("tensorboard", tmp_path)
    tracker.log_eval({"step": 0, "method": "dpo", "beta": 0.1, "alpha": 0.5, "seed": 0, "reward": 0.5})
    for step in (1, 2, 3):
        tracker.log_metrics(
            {"step": step, "loss": 0.7 - 0.1 * step, "rewards/margins": 0.1 * step, "note": "x"}
        )
    tracker.close()
    # a resumed run (checkpoint at step 1) redoes steps 2 and 3 with other values
    again = open_tracker("tensorboard", tmp_path)
    for step in (2, 3):
        again.log_metrics({"step": step, "loss": 1.0 + step, "rewards/margins": 0.0})
    again.log_eval({"step": 3, "method": "dpo", "reward": 0.75, "kl_seq": 1.25})
    again.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {
        "loss",
        "rewards/margins",
        "eval/reward",
        "eval/kl_seq",
    }  # no config echo, no text
    assert scalars["loss"] == pytest.approx({1: 0.6, 2: 3.0, 3: 4.0})
    assert scalars["eval/reward"] == pytest.approx({0: 0.5, 3: 0.75})


def test_missing_tensorboard_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(TrackerError, match="pip install tensorboard"):
        open_tracker("tensorboard", tmp_path)
