"""Publishing executed chapters back into ``notebooks/``: real outputs, embedded figures, provenance, no traces
of the publishing machine.

``tdpo-lab reproduce --publish`` executes every chapter on the full profile with an inline figure backend
(so ``plt.show()`` embeds a PNG), then :func:`publish_chapter` turns each executed notebook into the
committed chapter:

- papermill's ``injected-parameters`` cell is dropped (nbval would otherwise run the publishing machine's
  values, full configuration and absolute paths included), and so is papermill's metadata;
- absolute paths of the publishing run (its output folder, the cache, the home folder) are replaced in every
  output by short placeholders;
- progress-bar lines (tqdm's format) are cut out of stream and text outputs, the other lines of the same output
  kept, and widget state goes (``metadata.widgets`` and widget-view outputs): on GitHub they show as stray
  ``0it [00:00, ?it/s]`` fragments (:func:`clean_notebook`);
- nbval's ``# NBVAL_*`` comment lines become the cell tags nbval reads instead (``nbval-check-output``, ...): a
  learner never sees a comment that means nothing to them;
- the provenance (the parameters the chapter ran with, package version and commit, date, machine, wall time,
  and the training compute of the runs it read, from their ``metrics.jsonl``) goes into the notebook's metadata
  under ``tdpo_lab.provenance`` and into a short markdown cell after the title.

tests/test_notebooks.py checks the result: every plotting cell carries an image, the provenance says the full
configuration, and no injected cell or absolute path is left.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

import tdpo_lab
from tdpo_lab.config import load_config
from tdpo_lab.core.jsonl import read_jsonl_tolerant
from tdpo_lab.runs.rundir import git_commit

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
PROVENANCE_TAG = "provenance"


def provenance(
    *,
    profile: str,
    fast: bool,
    seeds: list[int],
    wall_minutes: float | None,
    compute: dict | None = None,
) -> dict:
    """The record a published chapter carries: what produced its outputs, where and when.

    ``compute`` is :func:`train_compute` of the runs the chapter read (``runs``, ``train_minutes``); without it
    the record says nothing about them (a chapter that reads no run).
    """

    record = {
        "profile": profile,
        "fast": bool(fast),
        "seeds": [int(s) for s in seeds],
        "tdpo_lab": tdpo_lab.__version__,
        "commit": git_commit(Path(tdpo_lab.__file__).resolve().parent),
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {_device_name()}",
        "wall_minutes": None if wall_minutes is None else round(float(wall_minutes), 1),
    }
    if compute is not None:
        record.update(runs=int(compute["runs"]), train_minutes=round(float(compute["train_minutes"]), 1))
    return record


def _device_name() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"


def _provenance_text(record: dict) -> str:
    wall = "" if record["wall_minutes"] is None else f", {record['wall_minutes']} min of wall time"
    if record.get("runs"):  # the notebook's own minutes hide the training it reads from finished runs
        wall += (
            f" reading {record['runs']} trained run(s) of {record['train_minutes']} min of training in all"
        )
    config = "the fast (CI) configuration" if record["fast"] else "the full configuration"
    # The parameters cell shows the defaults (profile = None, ...): say which values the outputs come from.
    return (
        f"> **Outputs below**: published with profile={record['profile']}, fast={record['fast']}, "
        f"seeds={record['seeds']} ({config}); "
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


# tqdm's line formats: a bar (' 45%|####  | 9/20 [00:01<00:02, 4.1it/s]'), a count without a total
# ('SFT: 0it [00:00, ?it/s]'), a rate closing the bracket ('1.52s/it]'), or its time bracket with any unit
# ('[00:01<00:00, 812.3 examples/s]'); plus descriptions that libraries print on a line of their own.
_PROGRESS = re.compile(
    r"\d+%\||\b\d+it \[|(?:\?|\d[\d.]*)(?:it/s|s/it)\]|\[\d+:\d\d(?::\d\d)?(?:<[\d:?]+)?, [^\]]*\]"
)
PROGRESS_DESCRIPTIONS = ("Converting and de-quantizing GGUF tensors",)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
NBVAL_MARKERS = ("NBVAL_CHECK_OUTPUT", "NBVAL_IGNORE_OUTPUT", "NBVAL_RAISES_EXCEPTION", "NBVAL_SKIP")


def is_progress_line(line: str) -> bool:
    """Whether one line of an output is a progress-bar fragment (tqdm's format)."""
    return bool(_PROGRESS.search(line)) or line.strip().startswith(PROGRESS_DESCRIPTIONS)


def strip_progress(text: str) -> str:
    """``text`` without its progress-bar lines; every other line kept as it was.

    tqdm redraws with ``\\r``, so a line ends at ``\\n`` or at a lone ``\\r``; the bare ``\\r`` left between two
    redraws goes with the bars. Text without a progress line comes back unchanged (the same string).
    """
    pieces = re.split(r"(?<=\n)|(?<=\r)(?!\n)", text)
    if not any(is_progress_line(piece) for piece in pieces):
        return text
    return "".join(p for p in pieces if not is_progress_line(p) and p.strip("\r") != "")


def _clean_output(output: dict) -> dict | None:
    """The output without its progress lines, or None where nothing else is left (or it is a widget view)."""
    data = output.get("data", {})
    if WIDGET_VIEW in data:  # its text/plain is the widget's stand-in (a tqdm bar's last state)
        return None
    if output.get("output_type") == "stream":
        text = output["text"] if isinstance(output["text"], str) else "".join(output["text"])
        cleaned = strip_progress(text)
        if cleaned != text:
            output["text"] = cleaned
        return output if cleaned else None
    if "text/plain" in data:
        text = data["text/plain"] if isinstance(data["text/plain"], str) else "".join(data["text/plain"])
        cleaned = strip_progress(text)
        if cleaned != text:
            data["text/plain"] = cleaned
        if not cleaned:
            data.pop("text/plain")
            return output if data else None
    return output


def nbval_comments_to_tags(cell) -> list[str]:
    """Move a code cell's ``# NBVAL_*`` comment lines into nbval's cell tags (``nbval-check-output``, ...).

    nbval reads either (its plugin's ``comment_markers`` and ``metadata_tags``); a tag keeps the learner's code
    free of a comment that means nothing to them. Returns the tags added; outputs are left alone.
    """
    if cell.get("cell_type") != "code":
        return []
    kept, added = [], []
    for line in cell.source.split("\n"):
        stripped = line.strip()
        marker = stripped.lstrip("#").strip()
        if stripped.startswith("#") and marker in NBVAL_MARKERS:
            added.append(marker.lower().replace("_", "-"))
        else:
            kept.append(line)
    if added:
        cell.source = "\n".join(kept)
        tags = cell.metadata.setdefault("tags", [])
        tags.extend(tag for tag in dict.fromkeys(added) if tag not in tags)
    return added


def clean_notebook(nb) -> dict:
    """Drop progress-bar fragments and widget state, turn nbval comments into tags, in place.

    Returns the counts ``{"outputs": outputs changed or dropped, "tags": nbval tags added}``; outputs without a
    progress line or widget are not touched.
    """
    changed = tagged = 0
    nb.metadata.pop("widgets", None)  # saved widget state: a blob GitHub cannot render
    for cell in nb.cells:
        tagged += len(nbval_comments_to_tags(cell))
        if "outputs" not in cell:
            continue
        kept = []
        for output in cell.outputs:
            before = repr(output)
            cleaned = _clean_output(output)
            changed += cleaned is None or repr(cleaned) != before
            if cleaned is not None:
                kept.append(cleaned)
        cell.outputs = kept
    return {"outputs": changed, "tags": tagged}


def clean_published(path: Path) -> dict:
    """:func:`clean_notebook` applied to a committed chapter file, rewritten only where something changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    counts = clean_notebook(nb)
    if any(counts.values()):
        nbformat.write(nb, path)
    return counts


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
    clean_notebook(nb)
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


def chapter_parameters(executed: Path) -> dict:
    """The parameters papermill gave an executed chapter (those its parameters cell declares)."""
    import nbformat

    return dict(nbformat.read(executed, as_version=4).metadata.get("papermill", {}).get("parameters", {}))


def chapter_seeds(executed: Path) -> list[int]:
    """The training seeds an executed chapter used: its ``seeds`` parameter, else its ``seed`` (default 0)."""
    given = chapter_parameters(executed)
    if given.get("seeds") is not None:
        return [int(s) for s in given["seeds"]]
    return [int(given.get("seed", 0))]


_SEEDED = re.compile(r"^(?P<stem>.+)_seed(?P<seed>\d+)_[0-9a-f]+$")  # tdpo_lab.runs.rundir.run_name's shape


def run_folders(run_root: Path) -> list[Path]:
    """Every run folder under ``run_root``: the folders holding a ``metrics.jsonl`` (or its ``.gz``)."""
    if not Path(run_root).is_dir():
        return []
    logs = [*Path(run_root).rglob("metrics.jsonl"), *Path(run_root).rglob("metrics.jsonl.gz")]
    return sorted({log.parent for log in logs})


def runs_read(executed: Path, run_root: Path) -> list[Path]:
    """The run folders under ``run_root`` an executed chapter read.

    What its outputs name: a run folder printed by path counts, with its siblings of the chapter's other seeds
    (a chapter that averages seeds prints the first one's path); the bare run root printed, or a chapter given
    ``run_root`` that names no run, counts every run under it. A chapter not given ``run_root`` read none.
    """
    import nbformat

    run_root = Path(run_root)
    parameters = chapter_parameters(executed)
    nb = nbformat.read(executed, as_version=4)
    text = "\n".join(
        str(o.get("text", ""))
        + "".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
        for c in nb.cells
        for o in c.get("outputs", [])
    )
    everything = run_folders(run_root)
    named, bare = set(), False
    prefixes = "|".join(re.escape(p) for p in sorted({str(run_root), str(run_root.resolve())}, key=len)[::-1])
    for match in re.finditer(rf"(?:{prefixes})(?:/([A-Za-z0-9_.\-]+)|/?(?![\w.\-]))", text):
        name = (match.group(1) or "").rstrip(".")
        if not name:
            bare = True
        elif (run_root / name) in everything:
            named.add(name)
    if bare or (not named and "run_root" in parameters):
        return everything
    seeds = {str(s) for s in chapter_seeds(executed)}
    stems = {m["stem"] for m in map(_SEEDED.match, named) if m}
    siblings = {
        run.name
        for run in everything
        if (m := _SEEDED.match(run.name)) and m["stem"] in stems and m["seed"] in seeds
    }
    return [run for run in everything if run.name in named | siblings]


def train_compute(runs: list[Path]) -> dict:
    """``{"runs": n, "train_minutes": sum of every step's seconds in the runs' metrics.jsonl / 60}``."""
    seconds = 0.0
    for run in runs:
        records, _ = read_jsonl_tolerant(Path(run) / "metrics.jsonl")
        seconds += sum(float(r.get("seconds", 0.0)) for r in records)
    return {"runs": len(runs), "train_minutes": seconds / 60.0}


def publish_all(out: Path, names: list[str], target_dir: Path, *, profile: str) -> list[Path]:
    """Publish every executed chapter of ``out`` into ``target_dir``; returns the written paths.

    The provenance takes profile, fast and seeds from the parameters each chapter ran with (``profile`` where
    the chapter has no such parameter) and the training compute of the runs it read under ``out/runs``.
    """

    cache = str(load_config(profile, fast=False).cache_path.resolve())
    replacements = {str(out.resolve()): "<out>", cache: "<cache>", str(Path.home()): "~"}
    written = []
    for name in names:
        given = chapter_parameters(out / name)
        runs = runs_read(out / name, Path(given.get("run_root", out / "runs")))
        record = provenance(
            profile=given.get("profile") or profile,
            fast=bool(given.get("fast", False)),
            seeds=chapter_seeds(out / name),
            wall_minutes=chapter_minutes(out / name),
            compute=train_compute(runs) if runs else None,
        )
        publish_chapter(out / name, target_dir / name, record, replacements)
        written.append(target_dir / name)
    return written
