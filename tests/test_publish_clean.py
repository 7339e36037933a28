"""Committed outputs without progress-bar fragments or widget state; nbval's check markers as cell tags.

The cleaner (tdpo_lab.course.publish.clean_notebook) runs on every published chapter; the committed chapters and
student notebooks are checked here as they are on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from tdpo_lab.course.publish import (
    NBVAL_MARKERS,
    WIDGET_VIEW,
    clean_notebook,
    is_progress_line,
    nbval_comments_to_tags,
    publish_chapter,
    strip_progress,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted([*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "exercises").glob("*.ipynb")])

BAR = "Map: 100%|##########| 10/10 [00:00<00:00, 812.31 examples/s]"
COUNT = "SFT: 0it [00:00, ?it/s]"
GGUF = "Converting and de-quantizing GGUF tensors...:   0%|          | 0/272 [00:00<?, ?it/s]"
SLOW = "  3/20 [00:09<00:51, 3.02s/it]"


def widget_output(text):
    view = {"model_id": "3f44", "version_major": 2, "version_minor": 0}
    return nbformat.v4.new_output("display_data", data={WIDGET_VIEW: view, "text/plain": text})


def synthetic_notebook():
    """One cell whose outputs mix progress fragments with real lines, and one untouched cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    mixed = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\ntrain()", execution_count=4)
    mixed.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text=f"{BAR}\nwarning: kept\n{COUNT}\n"),
        nbformat.v4.new_output("stream", name="stderr", text=f"\r{SLOW}\r{SLOW}\n"),  # only redraws
        widget_output(GGUF),
        nbformat.v4.new_output("stream", name="stdout", text="loss 0.6931\naccuracy 1.0\n"),
        nbformat.v4.new_output(
            "display_data", data={"text/plain": f"{GGUF}\n<Figure size 640x480>", "image/png": "iVBORw0KGgo="}
        ),
    ]
    plain = nbformat.v4.new_code_cell("print(1)", execution_count=5)
    plain.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 · A chapter"), mixed, plain]
    return nb


@pytest.mark.parametrize("line", [BAR, COUNT, GGUF, SLOW, "Converting and de-quantizing GGUF tensors..."])
def test_progress_lines_are_recognised(line):
    assert is_progress_line(line)


@pytest.mark.parametrize(
    "line",
    [
        "loss 0.6931 | accuracy 100%",
        "step 10 [00:01] done",
        "tokens/s: 812.3",
        "| method | 45% |",
        "edit [it]",
    ],
)
def test_ordinary_lines_are_kept(line):
    assert not is_progress_line(line) and strip_progress(line + "\n") == line + "\n"


def test_strip_progress_removes_carriage_return_redraws_and_keeps_the_other_lines():
    text = f"start\n\r{SLOW}\r{SLOW}\ndone\r\nend"
    assert strip_progress(text) == "start\ndone\r\nend"
    unchanged = "a\nb\n"
    assert strip_progress(unchanged) is unchanged


def test_cleaner_drops_fragments_and_widgets_and_keeps_everything_else():
    nb = synthetic_notebook()
    untouched = json.dumps(nb.cells[2], sort_keys=True)
    counts = clean_notebook(nb)
    mixed = nb.cells[1]
    assert "widgets" not in nb.metadata
    kinds = [(o.output_type, o.get("name")) for o in mixed.outputs]
    # the redraw-only stream and the widget view are gone, the rest stays in order
    assert kinds == [("stream", "stderr"), ("stream", "stdout"), ("display_data", None)]
    assert mixed.outputs[0].text == "warning: kept\n"
    assert mixed.outputs[1].text == "loss 0.6931\naccuracy 1.0\n"
    assert mixed.outputs[2].data == {"text/plain": "<Figure size 640x480>", "image/png": "iVBORw0KGgo="}
    assert counts == {"outputs": 4, "tags": 1}
    assert json.dumps(nb.cells[2], sort_keys=True) == untouched  # a cell without fragments: as it was
    # a second pass finds nothing to do
    assert clean_notebook(nb) == {"outputs": 0, "tags": 0}


def test_publishing_cleans_the_chapter(tmp_path):
    nbformat.write(synthetic_notebook(), tmp_path / "executed.ipynb")
    publish_chapter(tmp_path / "executed.ipynb", tmp_path / "published.ipynb", _record(), {})
    text = (tmp_path / "published.ipynb").read_text()
    assert "it/s]" not in text and "0it [" not in text and WIDGET_VIEW not in text and '"widgets"' not in text
    assert "warning: kept" in text and "NBVAL" not in text and "nbval-check-output" in text


def _record():
    from tdpo_lab.course.publish import provenance

    return provenance(profile="tiny", fast=False, seeds=[0], wall_minutes=0.1)


def test_nbval_comment_becomes_the_tag_nbval_reads():
    cell = nbformat.v4.new_code_cell("x = 1\n  #  NBVAL_SKIP\n# NBVAL_CHECK_OUTPUT is a comment about it\nx")
    cell.metadata["tags"] = ["keep"]
    assert nbval_comments_to_tags(cell) == ["nbval-skip"]
    assert cell.source == "x = 1\n# NBVAL_CHECK_OUTPUT is a comment about it\nx"  # prose mentioning it stays
    assert cell.metadata["tags"] == ["keep", "nbval-skip"]
    assert nbval_comments_to_tags(cell) == [] and cell.metadata["tags"] == ["keep", "nbval-skip"]
    markdown = nbformat.v4.new_markdown_cell("# NBVAL_SKIP")
    assert nbval_comments_to_tags(markdown) == [] and markdown.source == "# NBVAL_SKIP"


def test_every_marker_maps_to_a_tag_nbval_knows():
    plugin = pytest.importorskip("nbval.plugin")
    for marker in NBVAL_MARKERS:
        cell = nbformat.v4.new_code_cell(f"# {marker}\npass")
        (tag,) = nbval_comments_to_tags(cell)
        assert tag in plugin.metadata_tags
        assert plugin.metadata_tags[tag] == plugin.comment_markers[marker]  # same meaning as the comment


def _text_outputs(nb):
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")]
            texts += [v for k, v in output.get("data", {}).items() if k.startswith("text/")]
            for text in texts:
                yield index, output, text if isinstance(text, str) else "".join(text)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_notebooks_carry_no_progress_fragment_widget_state_or_nbval_comment(path):
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata"
    for index, output, text in _text_outputs(nb):
        assert WIDGET_VIEW not in output.get("data", {}), f"{path.name} cell {index}: a widget view"
        for line in text.splitlines():
            assert "it/s]" not in line and "0it" not in line and not is_progress_line(line), (
                f"{path.name} cell {index}: progress-bar fragment {line!r}; publish it again or run "
                "tdpo_lab.course.publish.clean_published on it"
            )
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            comments = [m for m in NBVAL_MARKERS if f"# {m}" in cell.source]
            assert not comments, f"{path.name} cell {index}: {comments} as a comment; make it a cell tag"
