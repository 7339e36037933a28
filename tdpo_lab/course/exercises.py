"""Student notebooks generated from the chapters: ``tdpo-lab exercises`` writes ``exercises/NN_*.ipynb``.

A chapter marks the lines a student should write inside a code cell with nbgrader's markers::

    ### BEGIN SOLUTION
    mine = -F.logsigmoid(beta * h)
    ### END SOLUTION

and the next cell checks ``mine`` with a checker of :mod:`tdpo_lab.course.grading`. The student version replaces
each region by a stub that keeps the region's indentation::

    # YOUR CODE HERE
    raise NotImplementedError("write the lines of this exercise")

clears every output and execution count, drops the publishing provenance, and points its Colab badge at
itself. Everything else (derivations, check cells, the worked answers) stays, so a student version run as it
is stops at its first exercise. Generated, never hand-edited: tests/test_exercises.py fails when
``exercises/`` differs from what this module makes of the chapters (cell sources only). nbgrader's own
``ClearSolutions`` preprocessor does the same replacement but installs nbgrader's server stack; the markers
are the same, so its tooling can grade these notebooks too.
"""

from __future__ import annotations

import re
from pathlib import Path

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = ("# YOUR CODE HERE", 'raise NotImplementedError("write the lines of this exercise")')
CHAPTERS = ("01", "02", "03", "04", "05", "06", "07", "08")
_BADGE = re.compile(r"(colab\.research\.google\.com/github/[^)\s]+?/blob/[^/)\s]+/)notebooks/")


class ExerciseMarkupError(ValueError):
    """A chapter's solution markers are unbalanced or nested."""


def strip_solutions(source: str, where: str = "a cell") -> tuple[str, int]:
    """``source`` with every solution region replaced by the stub; returns (text, number of regions)."""
    out: list[str] = []
    inside, regions = False, 0
    for line in source.split("\n"):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ExerciseMarkupError(f"{where}: a {BEGIN!r} inside another solution region")
            inside, regions = True, regions + 1
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + stub for stub in STUB)
        elif marker == END:
            if not inside:
                raise ExerciseMarkupError(f"{where}: {END!r} without a {BEGIN!r} before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ExerciseMarkupError(f"{where}: {BEGIN!r} without its {END!r}")
    return "\n".join(out), regions


def student_version(chapter: Path):
    """The student notebook of one chapter (an nbformat notebook) and its number of exercises."""
    import nbformat

    nb = nbformat.read(chapter, as_version=4)
    cells, total = [], 0
    for index, cell in enumerate(nb.cells):
        if "provenance" in cell.metadata.get("tags", []):
            continue
        if cell.cell_type == "code":
            cell.source, regions = strip_solutions(cell.source, f"{chapter.name} cell {index}")
            total += regions
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        elif cell.cell_type == "markdown" and index == 0:
            cell.source = _BADGE.sub(r"\1exercises/", cell.source)  # the badge opens the student version
        cells.append(cell)
    nb.cells = cells
    nb.metadata.pop("tdpo_lab", None)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)  # a chapter's saved widget state: nothing for a student to see
    return nb, total


def write_exercises(notebooks: Path, out: Path) -> dict[str, int]:
    """Write the student version of every chapter 01-08 of ``notebooks`` into ``out``; {name: exercises}."""
    import nbformat

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for chapter in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        if chapter.name[:2] not in CHAPTERS:
            continue
        nb, counts[chapter.name] = student_version(chapter)
        nbformat.write(nb, out / chapter.name)
    return counts
