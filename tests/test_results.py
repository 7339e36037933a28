"""The results table and figures: collect / summarise against numpy, Markdown table, figures (Agg)."""

import json
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from tdpo_lab.config import load_config  # noqa: E402
from tdpo_lab.methods import method_color  # noqa: E402
from tdpo_lab.runs.plots import frontier_plot, metrics_plot, seqkl_plot  # noqa: E402
from tdpo_lab.runs.results import collect, results_markdown, summarise  # noqa: E402
from tdpo_lab.runs.rundir import RunDir  # noqa: E402

STEPS = (0, 5, 10)
# (method, beta, alpha, seeds): 2 seeds for dpo and tdpo2 alpha 0.5, 1 seed for tdpo2 alpha 0.2
SETTINGS = [("dpo", 0.1, 0.5, (0, 1)), ("tdpo2", 0.1, 0.5, (0, 1)), ("tdpo2", 0.1, 0.2, (0,))]


def fake_eval(rng, step):
    return {
        "reward": float(rng.uniform(0.4, 0.8)),
        "reward_stderr": 0.01,
        "kl_seq": float(step * rng.uniform(0.5, 1.5)),
        "kl_logratio": float(step * rng.uniform(0.5, 1.5)),
        "entropy": float(rng.uniform(3, 5)),
        "distinct2": float(rng.uniform(0.5, 1)),
        "distinct4": float(rng.uniform(0.8, 1)),
        "kl_seq_chosen": float(step * rng.uniform(0.1, 0.3)),
        "kl_seq_rejected": float(step * rng.uniform(0.2, 0.5)),
        "n_samples": 16,
    }


@pytest.fixture
def root(tmp_path):
    """A sweep folder: five finished runs, one without evaluations, one with a truncated last line."""
    rng = np.random.default_rng(0)
    for method, beta, alpha, seeds in SETTINGS:
        for seed in seeds:
            cfg = load_config("tiny", fast=False, method=method, beta=beta, alpha=alpha, seed=seed)
            run = RunDir(tmp_path / f"{method}-b{beta}-a{alpha}-s{seed}")
            run.path.mkdir()
            run.write_config(cfg)
            for step in STEPS:
                run.log_eval(step, fake_eval(rng, step), cfg)
            # a saved model's Hugging Face config.json inside the run must not count as a run
            (run.path / "policy").mkdir()
            (run.path / "policy" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    # interrupted: the last eval line was cut mid-write
    with open(tmp_path / "tdpo2-b0.1-a0.2-s0" / "eval.jsonl", "a") as fh:
        fh.write('{"step": 15, "reward": 0.7, "kl_se')
    empty = RunDir(tmp_path / "nested" / "dpo-b0.5-s0")
    empty.path.mkdir(parents=True)
    empty.write_config(load_config("tiny", fast=False, method="dpo", beta=0.5))
    return tmp_path


def collect_quiet(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect(root)


def test_collect_rows_columns_and_warnings(root):
    with pytest.warns(UserWarning) as record:
        table = collect(root)
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 1 run folder(s) without evaluations" in messages and "nested/dpo-b0.5-s0" in messages
    assert "1 unreadable" in messages
    assert len(table) == 5 * len(STEPS)  # the truncated step 15 is gone, nothing else
    for column in ("run", "method", "beta", "alpha", "seed", "profile", "step", "reward", "kl_seq", "path"):
        assert column in table.columns
    assert set(table["run"]) == {f"{m}-b{b}-a{a}-s{s}" for m, b, a, seeds in SETTINGS for s in seeds}
    assert (table["profile"] == "tiny").all()
    first = table[(table["run"] == "dpo-b0.1-a0.5-s1") & (table["step"] == 5)].iloc[0]
    line = RunDir(root / "dpo-b0.1-a0.5-s1").evals()[1]
    assert first["reward"] == line["reward"] and first["seed"] == 1


def test_collect_resumed_run_keeps_last_record_of_a_step(root):
    run = RunDir(root / "dpo-b0.1-a0.5-s0")
    run.log_eval(5, {"reward": 123.0, "kl_seq": 1.0})
    table = collect_quiet(root)
    rows = table[(table["run"] == "dpo-b0.1-a0.5-s0") & (table["step"] == 5)]
    assert len(rows) == 1 and rows["reward"].iloc[0] == 123.0


def test_collect_errors_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect(tmp_path / "nope")
    table = collect(tmp_path)
    assert table.empty and "reward" not in table.columns and "method" in table.columns


def test_summarise_against_numpy(root):
    table = collect_quiet(root)
    summary = summarise(table)
    assert len(summary) == len(SETTINGS) * len(STEPS)
    for row in summary.itertuples():
        rows = table[
            (table["method"] == row.method)
            & (table["beta"] == row.beta)
            & (table["alpha"] == row.alpha)
            & (table["step"] == row.step)
        ]
        assert row.n_seeds == len(rows)
        for metric in ("reward", "kl_seq", "entropy", "kl_seq_rejected"):
            values = rows[metric].to_numpy()
            assert getattr(row, metric) == pytest.approx(values.mean())
            expected_se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
            assert getattr(row, f"{metric}_se") == pytest.approx(expected_se)
    assert "reward_stderr" in summary.columns and "reward_stderr_se" not in summary.columns
    assert "seed_se" not in summary.columns


def test_results_markdown(root):
    summary = summarise(collect_quiet(root))
    text = results_markdown(summary)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(summary)
    assert lines[0].startswith("| method") and "reward" in lines[0]
    assert "±" in text  # two-seed settings show their standard error
    dpo_row = next(line for line in lines if line.startswith("| DPO") and "| 10 |" in line)
    assert "| – |" in dpo_row  # alpha is not a DPO knob
    last = results_markdown(summary, last_step_only=True).strip().splitlines()
    assert len(last) == 2 + len(SETTINGS)
    assert results_markdown(collect_quiet(root)) == text  # a raw table is summarised first


def labelled_lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_frontier_plot_curves_points_and_errorbars(root):
    table = collect_quiet(root)
    summary = summarise(table)
    fig = frontier_plot(table)
    ax = fig.axes[0]
    lines = labelled_lines(ax)
    assert len(lines) == len(SETTINGS) + 1  # one curve per setting plus the SFT star
    labels = [line.get_label() for line in lines]
    assert labels.count("SFT π_ref (step 0)") == 1
    assert "DPO β=0.1" in labels and "TDPO2 β=0.1 α=0.5" in labels and "TDPO2 β=0.1 α=0.2" in labels
    dpo = lines[labels.index("DPO β=0.1")]
    expected = summary[summary["method"] == "dpo"].sort_values("step")
    np.testing.assert_allclose(dpo.get_xdata(), expected["kl_seq"])
    np.testing.assert_allclose(dpo.get_ydata(), expected["reward"])
    assert to_rgba(dpo.get_color()) == to_rgba(method_color("dpo"))
    a05, a02 = (lines[labels.index(f"TDPO2 β=0.1 α={a}")] for a in ("0.5", "0.2"))
    assert (a05.get_marker(), a05.get_linestyle()) != (a02.get_marker(), a02.get_linestyle())
    assert "KL" in ax.get_xlabel() and "nats" in ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert len(ax.get_legend().get_texts()) == len(SETTINGS) + 1
    assert len(ax.collections) > 0  # error bars for the two-seed settings
    plt.close(fig)
    bare = frontier_plot(table, show_errorbars=False)
    assert len(bare.axes[0].collections) == 0
    plt.close(bare)


def test_frontier_plot_on_given_axes_and_bad_table(root):
    fig, ax = plt.subplots()
    assert frontier_plot(collect_quiet(root), ax=ax) is fig
    plt.close(fig)
    with pytest.raises(ValueError, match="kl_seq"):
        frontier_plot(
            pd.DataFrame({"method": ["dpo"], "beta": [0.1], "alpha": [0.5], "step": [0], "reward": [0.5]})
        )


def test_seqkl_plot_chosen_solid_rejected_dashed(root):
    table = collect_quiet(root)
    fig = seqkl_plot(table)
    ax = fig.axes[0]
    lines = labelled_lines(ax)
    assert len(lines) == 2 * len(SETTINGS)
    for line in lines:
        assert line.get_linestyle() == ("-" if line.get_label().endswith("chosen") else "--")
        assert len(line.get_xdata()) == len(STEPS)
    assert ax.get_xlabel() == "training step" and "nats" in ax.get_ylabel() and ax.get_title()
    plt.close(fig)
    with pytest.raises(ValueError, match="pairs"):
        seqkl_plot(table.drop(columns=["kl_seq_chosen"]))


def test_metrics_plot(root):
    run = RunDir(root / "dpo-b0.1-a0.5-s0")
    for step in range(1, 6):
        run.log_metrics(
            step,
            {
                "loss": 0.7 - 0.01 * step,
                "kl_seq/chosen": 0.1 * step,
                "kl_seq/rejected": 0.2 * step,
                "rewards/accuracies": np.float64(0.5),
            },
        )
    fig = metrics_plot(run.path)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3  # loss, accuracies, the kl pair; rewards/chosen absent
    pair = next(ax for ax in visible if "kl_seq/chosen" in ax.get_title())
    assert [line.get_label() for line in labelled_lines(pair)] == ["kl_seq/chosen", "kl_seq/rejected"]
    assert all(ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() for ax in visible)
    plt.close(fig)
    with pytest.raises(ValueError, match="loss"):
        metrics_plot(run.path, keys=["nothing"])
    with pytest.raises(FileNotFoundError):
        metrics_plot(root / "tdpo2-b0.1-a0.2-s0")
