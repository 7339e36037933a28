"""Publishing an executed chapter: injected parameters and papermill traces dropped, paths scrubbed,
provenance recorded and shown."""

from __future__ import annotations

import nbformat
import pytest

from tdpo_lab.course.publish import PROVENANCE_TAG, provenance, publish_chapter, scrub_paths


def executed_notebook(path, out_dir):
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {"run_root": f"{out_dir}/runs"}, "duration": 90.0}
    title = nbformat.v4.new_markdown_cell("# 99 · A chapter")
    params = nbformat.v4.new_code_cell("profile = None", metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell(
        f'fast = False\nrun_root = "{out_dir}/runs"', metadata={"tags": ["injected-parameters"]}
    )
    body = nbformat.v4.new_code_cell("print(run_root)", execution_count=3)
    body.metadata["papermill"] = {"duration": 0.1}
    body.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"run folder: {out_dir}/runs/dpo\n")]
    nb.cells = [title, params, injected, body]
    nbformat.write(nb, path)


def test_publish_drops_injected_cell_scrubs_paths_and_records_provenance(tmp_path):
    out_dir = tmp_path / "publishing-machine" / "reproduce"
    executed_notebook(tmp_path / "executed.ipynb", out_dir)
    record = provenance(profile="tiny", fast=False, seeds=[0, 1, 2], wall_minutes=1.5)
    publish_chapter(
        tmp_path / "executed.ipynb", tmp_path / "published.ipynb", record, {str(out_dir): "<out>"}
    )
    nb = nbformat.read(tmp_path / "published.ipynb", as_version=4)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert "papermill" not in nb.metadata and all("papermill" not in c.metadata for c in nb.cells)
    text = nbformat.writes(nb)
    assert str(tmp_path) not in text and "run folder: <out>/runs/dpo" in text
    saved = nb.metadata["tdpo_lab"]["provenance"]
    assert saved["profile"] == "tiny" and saved["fast"] is False and saved["seeds"] == [0, 1, 2]
    assert {"tdpo_lab", "commit", "date", "machine", "wall_minutes"} <= set(saved)
    card = nb.cells[1]  # right after the title
    assert PROVENANCE_TAG in card.metadata["tags"] and "published with profile=tiny" in card.source
    # publishing again replaces the card instead of adding a second one
    publish_chapter(tmp_path / "published.ipynb", tmp_path / "again.ipynb", record, {})
    again = nbformat.read(tmp_path / "again.ipynb", as_version=4)
    assert sum(PROVENANCE_TAG in c.metadata.get("tags", []) for c in again.cells) == 1


def test_scrub_replaces_the_longest_path_first():
    text = "/a/b/c and /a/b"
    assert scrub_paths(text, {"/a/b": "<out>", "/a/b/c": "<cache>"}) == "<cache> and <out>"


def test_chapter_seeds_come_from_the_executed_parameters(tmp_path):
    from tdpo_lab.course.publish import chapter_seeds

    def executed(parameters):
        nb = nbformat.v4.new_notebook()
        nb.metadata["papermill"] = {"parameters": parameters}
        path = tmp_path / f"nb{len(list(tmp_path.iterdir()))}.ipynb"
        nbformat.write(nb, path)
        return path

    assert chapter_seeds(executed({"seeds": [0, 1, 2], "seed": 5})) == [0, 1, 2]  # the list wins
    assert chapter_seeds(executed({"seeds": None, "seed": 3})) == [3]
    assert chapter_seeds(executed({"profile": "tiny"})) == [0]


def synthetic_runs(root, seconds):
    """Run folders named as tdpo_lab.runs.rundir.run_name names them, each with a metrics.jsonl of ``seconds``."""
    import gzip
    import json

    for name, steps in seconds.items():
        run = root / name
        run.mkdir(parents=True)
        text = "".join(
            json.dumps({"step": i + 1, "loss": 0.69, "seconds": s}) + "\n" for i, s in enumerate(steps)
        )
        if name.startswith("packed"):  # a results store keeps metrics.jsonl gzipped
            (run / "metrics.jsonl.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (run / "metrics.jsonl").write_text(
                text + '{"step": 9, "seconds"'
            )  # a killed run's torn last line
        (run / "eval.jsonl").write_text("")
    (root / "notes").mkdir()  # a folder without a training log is no run


SECONDS = {
    "dpo_beta0.1_seed0_d71f4b": [90.0, 120.0, 150.5],
    "dpo_beta0.1_seed1_0a9c3e": [180.0, 180.0],
    "dpo_beta0.1_seed2_77aa01": [600.0],
    "tdpo1_beta0.1_seed0_391d93": [240.0, 240.0, 240.0, 240.0],
    "packed_beta0.1_seed0_abcdef": [30.0, 30.0],
}


def executed_chapter(path, parameters, printed):
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": parameters, "duration": 30.0}
    cell = nbformat.v4.new_code_cell("report()", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 · A chapter"), cell]
    nbformat.write(nb, path)
    return path


def test_runs_read_follow_the_printed_folders_and_the_chapter_seeds(tmp_path):
    from tdpo_lab.course.publish import run_folders, runs_read

    root = tmp_path / "out" / "runs"
    synthetic_runs(root, SECONDS)
    assert [r.name for r in run_folders(root)] == sorted(SECONDS)

    def read(parameters, printed):
        return sorted(
            r.name for r in runs_read(executed_chapter(tmp_path / "nb.ipynb", parameters, printed), root)
        )

    given = {"run_root": str(root), "seeds": [0, 1]}
    # a printed run counts with its siblings of the chapter's seeds (seed 2 was not asked for), nothing else
    printed = f"run folder: {root}/dpo_beta0.1_seed0_d71f4b\nloss 0.5\n"
    assert read(given, printed) == ["dpo_beta0.1_seed0_d71f4b", "dpo_beta0.1_seed1_0a9c3e"]
    one_seed = {"run_root": str(root), "seed": 0}
    assert read(one_seed, f"{root}/tdpo1_beta0.1_seed0_391d93: 4 steps") == ["tdpo1_beta0.1_seed0_391d93"]
    # the run root itself printed, or a chapter given run_root that names no run: every run under it
    assert read(given, f"collecting {root}\n") == sorted(SECONDS)
    assert read(given, "no path printed\n") == sorted(SECONDS)
    # a sibling folder whose name starts like the run root is not the run root
    assert read({"seed": 0}, f"{root}2/x\n") == []
    # a chapter without run_root reads no run
    assert read({"seed": 0}, "pairs: 800\n") == []


def test_train_compute_sums_the_seconds_of_the_runs(tmp_path):
    import gzip
    import json

    from tdpo_lab.course.publish import train_compute

    root = tmp_path / "runs"
    synthetic_runs(root, SECONDS)
    runs = [root / name for name in SECONDS]
    naive = 0.0  # the reference: every parseable line of every log, read on its own
    for run in runs:
        log = run / "metrics.jsonl"
        lines = (
            log.read_text()
            if log.exists()
            else gzip.decompress((run / "metrics.jsonl.gz").read_bytes()).decode()
        )
        for line in lines.splitlines():
            try:
                naive += json.loads(line)["seconds"]
            except json.JSONDecodeError:
                pass
    compute = train_compute(runs)
    assert compute["runs"] == len(SECONDS)
    assert compute["train_minutes"] == pytest.approx(naive / 60.0)
    assert train_compute([]) == {"runs": 0, "train_minutes": 0.0}


def test_publish_all_records_the_parameters_used_and_the_compute_of_the_runs_read(tmp_path, monkeypatch):
    from tdpo_lab.course.publish import publish_all

    monkeypatch.setenv("TDPO_LAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    root = out / "runs"
    synthetic_runs(root, SECONDS)
    executed_chapter(
        out / "05_x.ipynb",
        {"profile": "tiny", "fast": False, "seeds": [0, 1], "run_root": str(root)},
        f"{root}/dpo_beta0.1_seed0_d71f4b: done\n",
    )
    executed_chapter(out / "03_x.ipynb", {"seed": 0}, "toy\n")  # no profile parameter, no run_root
    target = tmp_path / "notebooks"
    target.mkdir()
    publish_all(out, ["05_x.ipynb", "03_x.ipynb"], target, profile="tiny")

    nb = nbformat.read(target / "05_x.ipynb", as_version=4)
    record = nb.metadata["tdpo_lab"]["provenance"]
    expected = (90.0 + 120.0 + 150.5 + 180.0 + 180.0) / 60.0  # seeds 0 and 1 of dpo
    assert record["runs"] == 2 and record["train_minutes"] == round(expected, 1)
    assert record["wall_minutes"] == 0.5 and record["seeds"] == [0, 1] and record["profile"] == "tiny"
    card = nb.cells[1].source
    assert "published with profile=tiny, fast=False, seeds=[0, 1]" in card
    assert f"2 trained run(s) of {round(expected, 1)} min of training" in card
    assert str(tmp_path) not in nbformat.writes(nb)

    toy = nbformat.read(target / "03_x.ipynb", as_version=4)
    record = toy.metadata["tdpo_lab"]["provenance"]
    assert "runs" not in record and "train_minutes" not in record
    assert record["profile"] == "tiny" and record["seeds"] == [0]
    assert "trained run" not in toy.cells[1].source
