"""Student notebooks: generated from the chapters, current, leak no solution, and stop at the first exercise."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tdpo_lab.course.exercises import (
    BEGIN,
    CHAPTERS,
    END,
    STUB,
    ExerciseMarkupError,
    strip_solutions,
    student_version,
)

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_FILES = sorted(p for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb") if p.name[:2] in CHAPTERS)
MINIMUM = {"03": 4}  # graded exercises per chapter: 3, and 4 in chapter 03


def test_strip_keeps_indentation_and_everything_outside_the_regions():
    source = (
        f"x = 1\nif True:\n    {BEGIN}\n    y = secret(x)\n    {END}\n    print(y)\n{BEGIN}\nz = 2\n{END}"
    )
    text, regions = strip_solutions(source)
    assert regions == 2 and "secret" not in text and "z = 2" not in text
    assert text.split("\n") == [
        "x = 1",
        "if True:",
        "    " + STUB[0],
        "    " + STUB[1],
        "    print(y)",
        *STUB,
    ]


@pytest.mark.parametrize("source", [f"{BEGIN}\nx", f"x\n{END}", f"{BEGIN}\n{BEGIN}\n{END}\n{END}"])
def test_unbalanced_markers_are_an_error(source):
    with pytest.raises(ExerciseMarkupError):
        strip_solutions(source)


def solution_lines(chapter: Path) -> list[str]:
    lines, inside = [], False
    for cell in nbformat.read(chapter, as_version=4).cells:
        for line in cell.source.split("\n") if cell.cell_type == "code" else []:
            if line.strip() in (BEGIN, END):
                inside = line.strip() == BEGIN
            elif inside and line.strip() and not line.strip().startswith("#"):
                lines.append(line.strip())
    return lines


@pytest.mark.parametrize("chapter", CHAPTER_FILES, ids=lambda p: p.name)
def test_exercises_folder_is_current_and_leaks_no_solution(chapter):
    committed = ROOT / "exercises" / chapter.name
    assert committed.exists(), f"{committed} is missing: run `tdpo-lab exercises`"
    generated, count = student_version(chapter)
    assert count >= MINIMUM.get(chapter.name[:2], 3), f"{chapter.name}: only {count} graded exercises"
    student = nbformat.read(committed, as_version=4)
    assert [c.source for c in student.cells] == [c.source for c in generated.cells], (
        f"{committed} is out of date with {chapter.name}: run `tdpo-lab exercises`"
    )
    assert all(
        not c.get("outputs") and c.get("execution_count") is None
        for c in student.cells
        if c.cell_type == "code"
    )
    assert f"blob/main/exercises/{chapter.name}" in student.cells[0].source  # its own Colab badge
    code = {line.strip() for c in student.cells if c.cell_type == "code" for line in c.source.split("\n")}
    leaked = [line for line in solution_lines(chapter) if line in code]
    assert not leaked, f"{committed} shows solution lines: {leaked[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTER_FILES, ids=lambda p: p.name)
def test_student_notebook_stops_at_its_first_exercise(chapter, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb, _ = student_version(chapter)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and STUB[1] in c.source)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    with pytest.raises(CellExecutionError, match="NotImplementedError"):
        client.execute()
    ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count")]
    assert max(ran) == first, (
        f"{chapter.name}: stopped at cell {max(ran)}, the first exercise is cell {first}"
    )
