"""Publishing executed chapters back into ``notebooks/``: real outputs, embedded figures, provenance, no traces
of the publishing machine.

``tdpo-lab reproduce --publish`` executes every chapter on the full profile with an inline figure backend
(so ``plt.show()`` embeds a PNG), then :func:`publish_chapter` turns each executed notebook into the
committed chapter:

- papermill's ``injected-parameters`` cell is dropped (nbval would otherwise run the publishing machine's
  values, full configuration and absolute paths included), and so is papermill's metadata;
- absolute paths of the publishing run (its output folder, the cache, the home folder) are replaced in every
  output by short placeholders;
- the provenance (profile, fast, seeds, package version and commit, date, machine, wall time) goes into the
  notebook's metadata under ``tdpo_lab.provenance`` and into a short markdown cell after the title.

tests/test_notebooks.py checks the result: every plotting cell carries an image, the provenance says the full
configuration, and no injected cell or absolute path is left.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

import tdpo_lab
from tdpo_lab.config import load_config
from tdpo_lab.runs.rundir import git_commit

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
PROVENANCE_TAG = "provenance"


def provenance(*, profile: str, fast: bool, seeds: list[int], wall_minutes: float | None) -> dict:
    """The record a published chapter carries: what produced its outputs, where and when."""

    return {
        "profile": profile,
        "fast": bool(fast),
        "seeds": [int(s) for s in seeds],
        "tdpo_lab": tdpo_lab.__version__,
        "commit": git_commit(Path(tdpo_lab.__file__).resolve().parent),
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {_device_name()}",
        "wall_minutes": None if wall_minutes is None else round(float(wall_minutes), 1),
    }


def _device_name() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"


def _provenance_text(record: dict) -> str:
    wall = "" if record["wall_minutes"] is None else f", {record['wall_minutes']} min of wall time"
    config = "the fast (CI) configuration" if record["fast"] else "the full configuration"
    return (
        f"> **Outputs below**: profile `{record['profile']}`, {config}, seed(s) {record['seeds']}; "
        f"tdpo-lab {record['tdpo_lab']} (commit `{str(record['commit'])[:8]}`), {record['date']}, "
        f"{record['machine']}{wall}. Re-run the chapter to reproduce them."
    )


def scrub_paths(text: str, replacements: dict[str, str]) -> str:
    """``text`` with every key of ``replacements`` (absolute paths, longest first) replaced by its value."""
    for path in sorted(replacements, key=len, reverse=True):
        if path:
            text = text.replace(path, replacements[path])
    return text


def _scrub_output(output: dict, replacements: dict[str, str]) -> None:
    if "text" in output:
        output["text"] = scrub_paths("".join(output["text"]), replacements)
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime == "application/json":
            output["data"][mime] = scrub_paths(
                value if isinstance(value, str) else "".join(value), replacements
            )
    if "traceback" in output:
        output["traceback"] = [scrub_paths(line, replacements) for line in output["traceback"]]


def publish_chapter(executed: Path, target: Path, record: dict, replacements: dict[str, str]) -> None:
    """Write the executed notebook ``executed`` as the committed chapter ``target`` (see the module doc)."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nb.cells = [c for c in nb.cells if PROVENANCE_TAG not in c.metadata.get("tags", [])]
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)  # per-cell timestamps: noise in every diff
        for output in cell.get("outputs", []):
            _scrub_output(output, replacements)
    nb.metadata.setdefault("tdpo_lab", {})["provenance"] = record
    card = nbformat.v4.new_markdown_cell(_provenance_text(record), metadata={"tags": [PROVENANCE_TAG]})
    title = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), -1)
    nb.cells.insert(title + 1, card)
    nbformat.write(nb, target)


def chapter_minutes(executed: Path) -> float | None:
    """The wall time papermill recorded for an executed notebook, in minutes (None if absent)."""
    import nbformat

    duration = nbformat.read(executed, as_version=4).metadata.get("papermill", {}).get("duration")
    return None if duration is None else float(duration) / 60.0


def chapter_seeds(executed: Path) -> list[int]:
    """The training seeds an executed chapter used: its ``seeds`` parameter, else its ``seed`` (default 0)."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    given = nb.metadata.get("papermill", {}).get("parameters", {})
    if given.get("seeds") is not None:
        return [int(s) for s in given["seeds"]]
    return [int(given.get("seed", 0))]


def publish_all(out: Path, names: list[str], target_dir: Path, *, profile: str) -> list[Path]:
    """Publish every executed chapter of ``out`` into ``target_dir``; returns the written paths."""

    cache = str(load_config(profile, fast=False).cache_path.resolve())
    replacements = {str(out.resolve()): "<out>", cache: "<cache>", str(Path.home()): "~"}
    written = []
    for name in names:
        record = provenance(
            profile=profile,
            fast=False,
            seeds=chapter_seeds(out / name),
            wall_minutes=chapter_minutes(out / name),
        )
        publish_chapter(out / name, target_dir / name, record, replacements)
        written.append(target_dir / name)
    return written
