"""The command line: run, sweep (library grid and notebook grid), collect, reproduce, and its errors."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
from cli_args import small_cli_args

from tdpo_lab.cli import main
from tdpo_lab.core.jsonl import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_args(imdb_path, tmp_path_factory):
    return small_cli_args(imdb_path, tmp_path_factory.mktemp("cli-cache"))


def test_run_writes_a_run_folder(small_args, tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "--method",
                "tdpo2",
                "--beta",
                "0.2",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "r"),
                *small_args,
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["method"], config["beta"], config["seed"]) == ("tdpo2", 0.2, 1)
    assert [e["step"] for e in read_jsonl(tmp_path / "r" / "eval.jsonl")] == [0, 1, 2]
    assert "results:" in capsys.readouterr().out


def test_unknown_key_and_bad_type_exit_with_the_key_named(small_args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--method", "dpo", "--out", str(tmp_path / "x"), *small_args, "--set", "betta=0.3"])
    assert exc.value.code == 2
    assert "betta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            ["run", "--method", "dpo", "--out", str(tmp_path / "x"), *small_args, "--set", "train_steps=lots"]
        )
    assert "train_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--methods", "dpo,ppo", "--out", str(tmp_path / "s"), *small_args])
    assert "ppo" in capsys.readouterr().err


def test_sweep_runs_the_grid_and_writes_table_and_figures(small_args, tmp_path):
    root = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--methods",
            "dpo,tdpo2",
            "--betas",
            "0.1,0.5",
            "--alphas",
            "0.5",
            "--seeds",
            "0,1",
            "--out",
            str(root),
            *small_args,
        ]
    )
    assert code == 0
    runs = pd.read_csv(root / "runs.csv")
    assert runs.groupby(["method", "beta", "seed"]).ngroups == 8
    summary = pd.read_csv(root / "results.csv")
    assert set(summary["n_seeds"]) == {2}
    assert "±" in (root / "results.md").read_text()
    assert (root / "frontier.png").stat().st_size > 0 and (root / "seqkl.png").stat().st_size > 0


def _toy_notebook(path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\nrun_dir = None\nprofile = 'tiny'\nfast = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_notebook_sweep_skips_done_points_and_survives_a_failure(tmp_path, capsys):
    nb = tmp_path / "toy.ipynb"
    _toy_notebook(
        nb,
        "import pathlib\nassert x != 3, 'x must not be 3'\n"
        "p = pathlib.Path(run_dir) / 'policy'\np.mkdir(parents=True)\n(p / 'config.json').write_text(str(x))",
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text("x: [1, 2, 3]\n")
    out = tmp_path / "out"
    assert main(["sweep", "--notebook", str(nb), "--grid", str(grid), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "FAILED x3" in err and "x must not be 3" in err
    assert (out / "x1" / "run" / "policy" / "config.json").read_text() == "1"
    assert (out / "x2" / "toy.ipynb").exists()
    main(["sweep", "--notebook", str(nb), "--grid", str(grid), "--out", str(out), "--quiet"])
    assert "x1: done already, skipped" in capsys.readouterr().out
    grid.write_text("y: [1]\n")
    with pytest.raises(SystemExit):
        main(["sweep", "--notebook", str(nb), "--grid", str(grid), "--out", str(out)])
    assert "'y'" in capsys.readouterr().err


def test_reproduce_names_the_failing_notebook_and_cell(tmp_path, capsys):
    chapters = tmp_path / "nbs"
    chapters.mkdir()
    _toy_notebook(chapters / "00_ok.ipynb", "print('fine')")
    _toy_notebook(chapters / "01_broken.ipynb", "raise RuntimeError('deliberate failure')")
    code = main(["reproduce", "--notebooks", str(chapters), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "01_broken.ipynb" in err and "deliberate failure" in err and "cell" in err
    assert (tmp_path / "out" / "00_ok.ipynb").exists()


def test_sweep_jobs_two_gives_the_results_of_jobs_one(small_args, tmp_path):
    grid = ["--methods", "dpo,tdpo1", "--betas", "0.1", "--seeds", "0,1", *small_args]
    assert main(["sweep", "--jobs", "1", "--out", str(tmp_path / "one"), *grid]) == 0
    assert main(["sweep", "--jobs", "2", "--out", str(tmp_path / "two"), *grid]) == 0
    one, two = (pd.read_csv(tmp_path / name / "runs.csv") for name in ("one", "two"))
    assert len(one) == len(two) > 0
    numeric = [c for c in one.columns if c not in ("path",) and pd.api.types.is_numeric_dtype(one[c])]
    pd.testing.assert_frame_equal(one[numeric], two[numeric])  # each point is one process: same numbers
    # finished points are skipped: a second pass trains nothing and leaves every file as it was
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("eval.jsonl")}
    assert main(["sweep", "--jobs", "2", "--out", str(tmp_path / "two"), *grid]) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_frontier_study_trains_the_grid_and_writes_envelopes_and_verdicts(small_args, tmp_path, capsys):
    root = tmp_path / "study"
    study = [
        "frontier-study",
        "--betas",
        "dpo=0.1,0.5;tdpo2=0.1",
        "--seeds",
        "0,1",
        "--out",
        str(root),
        *small_args,
    ]
    assert main([*study, "--jobs", "1"]) == 0
    report = (root / "frontier_study.md").read_text()
    assert "| TDPO2 |" in report and "Does the method's envelope dominate DPO's?" in report
    assert any(v in report for v in ("beyond 2 standard errors", "within noise", "opposite"))
    assert (root / "frontier_study.png").stat().st_size > 0
    assert not (root / "runs.csv").exists()  # the study writes its own report, not the sweep's table
    assert len(list(root.glob("*/eval.jsonl"))) == 6  # (dpo x 2 betas + tdpo2) x 2 seeds
    # collecting again from the finished runs writes the same report
    assert main([*study, "--collect-only"]) == 0
    assert (root / "frontier_study.md").read_text() == report


def test_reproduce_streams_a_running_chapter_to_its_log(tmp_path):
    """A chapter's .log has its first cell output while the chapter still runs (papermill --log-output)."""
    import threading
    import time

    from tdpo_lab.course.chapters import run_chapters

    chapters, out, go = tmp_path / "nbs", tmp_path / "out", tmp_path / "go"
    chapters.mkdir()
    out.mkdir()
    # the chapter prints, then waits (at most 120 s) for the test to create `go` before printing again
    _toy_notebook(
        chapters / "00_wait.ipynb",
        "import pathlib, time\nprint('first output', flush=True)\nstart = time.time()\n"
        f"while not pathlib.Path({str(go)!r}).exists() and time.time() - start < 120:\n    time.sleep(0.2)\n"
        "print('second output')",
    )
    failed: list = []
    runner = threading.Thread(
        target=lambda: failed.extend(run_chapters(chapters, ["00_wait.ipynb"], out, {}, jobs=1))
    )
    runner.start()
    log = out / "00_wait.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "first output" in log.read_text()):
        time.sleep(0.2)
    text = log.read_text()
    go.touch()
    runner.join(timeout=180)
    assert "first output" in text and "second output" not in text, text  # written while the cell waited
    assert runner.is_alive() is False and failed == []
    final = log.read_text()
    assert "second output" in final and "Executing Cell" in final, final
