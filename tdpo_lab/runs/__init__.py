"""Training runs and what is read off them: one run (:mod:`.train`) in its folder (:mod:`.rundir`), many at
once (:mod:`.fanout`), the results table (:mod:`.results`), figures (:mod:`.plots`), the frontier study
(:mod:`.study`) and metric mirrors (:mod:`.trackers`). What the chapters use is importable from here."""

from tdpo_lab.runs.fanout import train_points
from tdpo_lab.runs.plots import frontier_plot, metrics_plot, save_figure, seqkl_plot
from tdpo_lab.runs.results import collect, results_markdown, summarise, verdict
from tdpo_lab.runs.rundir import RunConfigMismatch, RunDir, default_run_root, resolve_run_dir, run_name
from tdpo_lab.runs.study import (
    compare_frontiers,
    dominance_verdict,
    frontier_study_plot,
    frontier_value,
    method_curves,
)
from tdpo_lab.runs.train import compute_loss, train

__all__ = [
    "RunConfigMismatch",
    "RunDir",
    "collect",
    "compare_frontiers",
    "compute_loss",
    "default_run_root",
    "dominance_verdict",
    "frontier_plot",
    "frontier_study_plot",
    "frontier_value",
    "method_curves",
    "metrics_plot",
    "resolve_run_dir",
    "results_markdown",
    "run_name",
    "save_figure",
    "seqkl_plot",
    "summarise",
    "train",
    "train_points",
    "verdict",
]
