"""Publishing an executed chapter: injected parameters and papermill traces dropped, paths scrubbed,
provenance recorded and shown."""

from __future__ import annotations

import nbformat

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
    assert PROVENANCE_TAG in card.metadata["tags"] and "profile `tiny`" in card.source
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
