"""Mirroring a run's logs to an experiment tracker: the config key ``report_to``.

The run folder's JSON lines stay the record (:mod:`tdpo_lab.runs.rundir`); a tracker gets a copy of every line as
it is written, under the same names, so its charts and the kit's files agree:

- a line of ``metrics.jsonl`` (one per training step): each number under its own name (``loss``,
  ``rewards/margins``, ``logits/chosen``, ``learning_rate``, ...);
- a line of ``eval.jsonl`` (step 0, every ``eval_every`` steps, the last): each number under
  ``eval/<name>`` (``eval/reward``, ``eval/kl_seq``, ...), leaving out the config echo (method, beta, ...).

``report_to = ""`` (the default) mirrors nothing; ``"tensorboard"`` writes TensorBoard event files into
``<run>/tensorboard`` (``tensorboard --logdir runs/`` shows every run), which needs the ``tensorboard`` package
(``pip install "tdpo-lab[tensorboard]"``). A resumed run first drops the events of the steps it redoes, as it
drops their JSON lines. trackio is not offered: its install downgrades pillow, which matplotlib uses.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NoTracker", "TensorBoardTracker", "TrackerError", "open_tracker"]

TENSORBOARD_DIR = "tensorboard"
EVAL_PREFIX = "eval/"
# eval.jsonl repeats these config values on every line: they are settings, not measurements
_CONFIG_ECHO = ("method", "beta", "alpha", "seed")


class TrackerError(RuntimeError):
    """The tracker named by ``report_to`` cannot be used; the message says what to install."""


class NoTracker:
    """``report_to = ""``: nothing is mirrored."""

    def log_metrics(self, record: dict) -> None:
        pass

    def log_eval(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars into ``log_dir`` with ``torch.utils.tensorboard.SummaryWriter``, one per number of a record.

    The writer opens at the first record with ``purge_step`` = its step: a resumed run, whose first record is
    the step after its checkpoint, hides the events an interrupted attempt wrote from that step on.
    """

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch imports tensorboard's protobuf code here
            raise TrackerError(
                'report_to="tensorboard" needs the tensorboard package: pip install tensorboard '
                '(or pip install "tdpo-lab[tensorboard]"), or set report_to="" to log to the run folder only'
            ) from exc
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer = None

    def log_metrics(self, record: dict) -> None:
        self._write(record, "")

    def log_eval(self, record: dict) -> None:
        self._write({k: v for k, v in record.items() if k not in _CONFIG_ECHO}, EVAL_PREFIX)

    def _write(self, record: dict, prefix: str) -> None:
        step = int(record["step"])
        if self._writer is None:
            self._writer = self._writer_class(str(self.log_dir), purge_step=step)
        for name, value in record.items():
            if name != "step" and _is_number(value):
                self._writer.add_scalar(prefix + name, value, step)
        self._writer.flush()  # on disk with its JSON line, even if the run dies next

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def open_tracker(report_to: str, run_dir: str | os.PathLike):
    """The tracker of ``report_to`` for the run in ``run_dir``: :class:`NoTracker` or :class:`TensorBoardTracker`."""
    if report_to == "":
        return NoTracker()
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR)
    raise TrackerError(f"report_to must be '' (none) or 'tensorboard', got {report_to!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
