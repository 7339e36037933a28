"""JSON lines, the kit's one format for logs: appended and flushed per record, read strictly or tolerantly.

Run folders (metrics.jsonl, eval.jsonl), the SFT history and your own pairs files are JSON lines. A run killed
while writing leaves a truncated last line, which the tolerant reader skips; a resumed run may log a step
twice, and :func:`dedupe_steps` keeps its last record; :func:`truncate_jsonl` drops what a resumed run redoes.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

from tdpo_lab.core.utils import atomic_path


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk (metrics survive a crash)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSON-lines file (``[]`` if it does not exist); a line that does not parse raises a
    ``ValueError`` naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}, is not a JSON object ({exc.msg})") from exc
    return records


def read_jsonl_tolerant(path: str | os.PathLike, *, warn: bool = False) -> tuple[list[dict], int]:
    """Records of a JSON-lines file and the number of lines skipped because they do not parse.

    A run killed while writing leaves a truncated last line (and a resumed run may append after it); such
    lines are skipped rather than failing the whole table. A missing file gives ``([], 0)``; where only
    ``<path>.gz`` exists (a results store compresses ``metrics.jsonl``, :mod:`tdpo_lab.runs.store`), that is read.
    """
    path = Path(path)
    packed = path.with_name(path.name + ".gz")
    if not path.exists() and packed.exists():
        text = gzip.decompress(packed.read_bytes()).decode()
    elif path.exists():
        text = path.read_text()
    else:
        return [], 0
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad and warn:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s) (an interrupted write?)", stacklevel=2)
    return records, bad


def dedupe_steps(records: list[dict]) -> list[dict]:
    """Keep the last record of each step (a resumed run may repeat steps), in step order."""
    by_step: dict = {}
    unnumbered = []
    for record in records:
        if "step" in record:
            by_step[record["step"]] = record
        else:
            unnumbered.append(record)
    return [by_step[s] for s in sorted(by_step)] + unnumbered


def truncate_jsonl(path: str | os.PathLike, step: int) -> None:
    """Keep only the records of a step-indexed JSON-lines log with ``step <= step`` (atomic rewrite).

    A resumed run redoes everything after its checkpoint, so lines written after it (or cut off by the
    interruption) are dropped first and never appear twice.
    """
    path = Path(path)
    kept = [r for r in read_jsonl_tolerant(path)[0] if r.get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


class JsonlSteps:
    """Step-indexed JSON-lines logs: the first file gets one record per step, the others are kept in step with
    it (what :class:`tdpo_lab.core.loop.TrainingLoop` writes through; a run folder is one, the SFT history
    another). ``clear()`` on a fresh start, ``truncate(step)`` on resume, ``append(record)`` per step."""

    def __init__(self, *paths: str | os.PathLike):
        if not paths:
            raise ValueError("JsonlSteps needs at least one file")
        self.paths = [Path(p) for p in paths]

    def clear(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)

    def truncate(self, step: int) -> None:
        for path in self.paths:
            truncate_jsonl(path, step)

    def append(self, record: dict) -> None:
        append_jsonl(self.paths[0], record)
