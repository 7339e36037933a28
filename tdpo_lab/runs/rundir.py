"""One run folder: the only code that creates, opens, writes or reads a run's files.

A run folder (one per method, hyper-parameters and seed) holds::

    config.json        the Config of the run (Config.to_dict())
    env.json           python / torch / transformers versions, device, world_size, git commit, hostname, time
                       and the full package list (write_env)
    metrics.jsonl      one line per training step (docs/methods.md section 3 names: loss, rewards/margins, ...)
    eval.jsonl         one line per evaluation step: step, method, beta, alpha, seed and the keys of
                       tdpo_lab.core.evaluate.evaluate_policy (reward, kl_seq, kl_logratio, entropy, ...; lists
                       per prompt and per held-out pair: reward_per_prompt, kl_seq_chosen_per_pair, ...)
    samples.jsonl      a few samples of each evaluation (step, prompt, continuation, reward, kl_seq)
    checkpoint/        resumable training state (checkpoint/state.pt) while the run trains
    policy/            the trained policy, written last: its presence means "finished" (tdpo_lab.core.export:
                       save_pretrained files, generation_config.json, a model card README.md)
    .lock              held while a process trains the run

:meth:`RunDir.open` starts or reopens a run (and refuses a folder holding another configuration); the
results table over many runs is :mod:`tdpo_lab.runs.results`, the figures :mod:`tdpo_lab.runs.plots`.

JSON lines are read tolerantly: an interrupted run can leave a truncated last line, which is skipped with a
warning; if a step was logged twice (a resumed run), the last record of that step wins.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import tdpo_lab
from tdpo_lab.config import result_fields
from tdpo_lab.core.distributed import world_size
from tdpo_lab.core.export import MethodInfo, save_model
from tdpo_lab.core.jsonl import append_jsonl, dedupe_steps, read_jsonl_tolerant, truncate_jsonl
from tdpo_lab.core.utils import exclusive_lock, stable_hash, write_json
from tdpo_lab.methods import get_method, reads_knob
from tdpo_lab.products.pairs_source import pairs_source

__all__ = [
    "RunConfigMismatch",
    "RunDir",
    "default_run_root",
    "installed_packages",
    "resolve_run_dir",
    "run_name",
    "write_env",
]


class RunConfigMismatch(ValueError):
    """The run folder already holds a run with a different configuration."""


class RunDir:
    """Paths, writers and readers of one run folder (see the module docstring for the layout).

    >>> run = RunDir.open("runs/tdpo2-b0.1-s0", cfg)  # doctest: +SKIP
    >>> run.log_eval(0, evaluate_policy(...), cfg)    # doctest: +SKIP
    """

    CONFIG = "config.json"
    ENV = "env.json"
    METRICS = "metrics.jsonl"
    EVAL = "eval.jsonl"
    SAMPLES = "samples.jsonl"
    CHECKPOINT = "checkpoint"
    POLICY = "policy"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def open(cls, path: str | os.PathLike, cfg) -> RunDir:
        """Start or reopen the run of ``cfg`` (a Config or a dict) in ``path``.

        Makes the folder; writes ``config.json`` if there is none, else raises :class:`RunConfigMismatch`
        when the saved one differs in a field that can change results (``config.result_fields``: a
        resumed run must be the same run); then writes ``env.json`` (this process's environment).
        """
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        if run.config_path.exists():
            saved, wanted = result_fields(run.config()), result_fields(_config_dict(cfg))
            diff = {
                k: (saved.get(k), wanted.get(k))
                for k in saved.keys() | wanted.keys()
                if saved.get(k) != wanted.get(k)
            }
            if diff:
                raise RunConfigMismatch(
                    f"{run.path} already holds a run with a different configuration {diff} (saved, requested); "
                    "choose another run folder or delete this one"
                )
        else:
            run.write_config(cfg)
        write_env(run.path)
        return run

    # --- where things are ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def env_path(self) -> Path:
        return self.path / self.ENV

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def eval_path(self) -> Path:
        return self.path / self.EVAL

    @property
    def samples_path(self) -> Path:
        return self.path / self.SAMPLES

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def checkpoint_path(self) -> Path:
        """The resumable training state (:func:`tdpo_lab.core.utils.save_training_state`)."""
        return self.checkpoint_dir / "state.pt"

    @property
    def policy_dir(self) -> Path:
        """The trained policy, a ``save_pretrained`` folder (load it with :func:`tdpo_lab.core.models.load_model`)."""
        return self.path / self.POLICY

    @property
    def is_finished(self) -> bool:
        """True once training saved the policy: ``policy/`` is renamed into place whole (atomic write), so
        its ``config.json`` exists only after the last step and the last evaluation are written."""
        return (self.policy_dir / "config.json").exists()

    def lock(self):
        """Hold the run's lock file for a block: a second process asking for the same run waits."""
        return exclusive_lock(self.path / ".lock")

    # --- writing -------------------------------------------------------------------------------------
    def write_config(self, cfg) -> None:
        write_json(self.config_path, _config_dict(cfg))

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Append one training step to ``metrics.jsonl`` (flushed: survives a crash)."""
        append_jsonl(self.metrics_path, {"step": int(step), **_plain(metrics)})

    def log_eval(self, step: int, result: dict, cfg=None) -> dict:
        """Append one evaluation to ``eval.jsonl``: step, method, beta, alpha, seed, then ``result``.

        ``cfg`` defaults to this folder's ``config.json``. Returns the record written. A ``samples`` list in
        ``result`` goes to ``samples.jsonl`` instead (one line per sample, with the step).
        """
        config = _config_dict(cfg) if cfg is not None else self.config()
        record = {"step": int(step), **{k: config.get(k) for k in ("method", "beta", "alpha", "seed")}}
        result = dict(result)
        for sample in result.pop("samples", None) or []:
            append_jsonl(self.samples_path, {"step": int(step), **_plain(sample)})
        record.update(_plain(result))
        append_jsonl(self.eval_path, record)
        return record

    # the step log TrainingLoop writes through: clear(), truncate(step), append(record)
    def append(self, record: dict) -> None:
        """Append one training step's record to ``metrics.jsonl`` (flushed: survives a crash)."""
        append_jsonl(self.metrics_path, _plain(record))

    def clear(self) -> None:
        self.clear_logs()

    def truncate(self, step: int) -> None:
        self.truncate_logs(step)

    def check_pairs(self, record: dict | None, source: str = "") -> None:
        """Record the pairs a run trains on (``pairs.json``), or refuse a folder whose run used other pairs.

        ``record``: the pairs source's record (None for the kit's IMDb pairs, which the config names fully).
        The config holds only a file's path; a file changed in place would otherwise resume, or report as
        finished, a run trained on its old content.
        """
        if record is None:
            return
        path = self.path / "pairs.json"
        if path.is_file():
            saved = json.loads(path.read_text()).get("fingerprint")
            if saved != record["fingerprint"]:
                raise RunConfigMismatch(
                    f"{self.path} holds a run trained on other pairs: {source!r} changed since (sha256 of its "
                    f"pairs {saved[:12] if saved else None}... then, {record['fingerprint'][:12]}... now); "
                    "choose another run folder or delete this one"
                )
            return
        write_json(path, record)

    def clear_logs(self) -> None:
        """Delete ``metrics.jsonl``, ``eval.jsonl`` and ``samples.jsonl``: a run from step 0 writes them anew."""
        self.metrics_path.unlink(missing_ok=True)
        self.eval_path.unlink(missing_ok=True)
        self.samples_path.unlink(missing_ok=True)

    def truncate_logs(self, step: int) -> None:
        """Keep only the log lines up to ``step`` (a resumed run redoes everything after its checkpoint)."""
        for path in (self.metrics_path, self.eval_path, self.samples_path):
            truncate_jsonl(path, step)

    def save_policy(self, model, tokenizer) -> None:
        """Write ``policy/`` atomically, which marks the run finished, and drop the checkpoint: the finished
        policy replaces it. The folder (:func:`tdpo_lab.core.export.save_model`) holds the model, the tokenizer,
        ``generation_config.json`` and a model card whose metrics are pi_ref's (step 0) and the last evaluation."""
        config = self.config()
        method = get_method(config["method"])
        info = MethodInfo(method.name, method.label, tuple(method.knobs), method.paper)
        save_model(
            model,
            tokenizer,
            self.policy_dir,
            config,
            kind="policy",
            metrics=self._card_metrics(),
            method=info,
        )
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def _card_metrics(self) -> dict:
        """The model card's metrics: pi_ref's evaluation (step 0) and the policy's last one."""
        keys = ("reward", "kl_seq", "kl_seq_chosen", "kl_seq_rejected", "entropy", "distinct4")
        evals = self.evals()
        shown = [r for r in evals[:1] if r.get("step") == 0] + [r for r in evals[-1:] if r.get("step") != 0]
        return {
            ("pi_ref (step 0)" if r["step"] == 0 else f"policy (step {r['step']})"): {
                k: r[k] for k in keys if k in r
            }
            for r in shown
        }

    # --- reading -------------------------------------------------------------------------------------
    def config(self) -> dict:
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.config_path} does not exist: is {self.path} a run folder?")
        return json.loads(self.config_path.read_text())

    def metrics(self) -> list[dict]:
        return dedupe_steps(read_jsonl_tolerant(self.metrics_path, warn=True)[0])

    def evals(self) -> list[dict]:
        return dedupe_steps(read_jsonl_tolerant(self.eval_path, warn=True)[0])


def write_env(run_dir: str | os.PathLike) -> dict:
    """Write ``env.json`` into ``run_dir`` and return it.

    Keys: ``python``, ``platform``, ``torch``, ``transformers``, ``numpy``, ``tdpo_lab`` (versions),
    ``device`` ("cpu" or "cuda: <GPU name>"), ``cuda`` (torch's CUDA version or null), ``num_threads``,
    ``world_size`` (the number of processes that train the run together, :mod:`tdpo_lab.core.distributed`),
    ``git_commit`` (``git rev-parse HEAD`` of the kit's source tree, "unknown" outside a git checkout),
    ``hostname``, ``time`` (UTC, ISO 8601), ``packages`` (every installed distribution, ``name==version``,
    sorted: :func:`installed_packages`).
    """
    import torch
    import transformers

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        device = "cpu"
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "tdpo_lab": getattr(tdpo_lab, "__version__", "unknown"),
        "device": device,
        "cuda": torch.version.cuda,
        "num_threads": torch.get_num_threads(),
        "world_size": world_size(),
        "git_commit": git_commit(Path(tdpo_lab.__file__).resolve().parent),
        "hostname": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "packages": installed_packages(),
    }
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / RunDir.ENV, env)
    return env


def installed_packages() -> list[str]:
    """Every distribution installed in this Python, as ``name==version`` sorted by name (case-insensitive).

    What ``pip freeze`` would list, read with :mod:`importlib.metadata` (no subprocess); a distribution found
    twice on ``sys.path`` is listed once, as Python imports it (the first one).
    """
    from importlib.metadata import distributions

    found: dict[str, str] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in found:
            found[name.lower()] = f"{name}=={dist.version}"
    return [found[key] for key in sorted(found)]


# --- where runs live ----------------------------------------------------------------------------------


def run_name(cfg) -> str:
    """A run's folder name: method, its conservativeness knobs, seed, and a short key of the rest.

    The key covers every other config field, so two runs that differ in anything (steps, lr, ...) never
    share a folder, and the same configuration always finds its finished run again.
    """
    name = f"{cfg.method}_beta{cfg.beta:g}"
    if reads_knob(cfg.method, "alpha"):  # alpha is in the name only where the method reads it
        name += f"_alpha{cfg.alpha:g}"
    fields = result_fields(cfg.to_dict())
    record = pairs_source(cfg).record()
    if record is not None:  # your own pairs: their content, not only their path (a file edited in place)
        fields["pairs_sha256"] = record["fingerprint"]
    return f"{name}_seed{cfg.seed}_{stable_hash(fields, 6)}"


def default_run_root(cfg) -> Path:
    """Where notebooks keep runs when no folder is given: under the cache, per profile and size."""
    return cfg.cache_path / "runs" / f"{cfg.profile}{'-fast' if cfg.fast else ''}"


def resolve_run_dir(
    cfg, run_dir: str | os.PathLike | None = None, run_root: str | os.PathLike | None = None
) -> Path:
    """``run_dir`` if given, else ``<run_root or default_run_root(cfg)>/<run_name(cfg)>``."""
    if run_dir:
        return Path(run_dir)
    return Path(run_root or default_run_root(cfg)) / run_name(cfg)


# --- helpers ------------------------------------------------------------------------------------------


def _config_dict(cfg) -> dict:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if isinstance(cfg, dict):
        return dict(cfg)
    raise TypeError(f"cfg must be a tdpo_lab Config or a dict, got {type(cfg).__name__}")


def _plain(values: dict) -> dict:
    """Python numbers for JSON (numpy / torch scalars -> float / int)."""
    out = {}
    for key, value in values.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        out[key] = value
    return out


def git_commit(where: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"
