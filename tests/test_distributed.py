"""Training as several processes (tdpo_lab.core.distributed) gives the training of one process.

Two gloo processes on the CPU (``python -m torch.distributed.run --nproc_per_node 2``, what ``accelerate
launch`` starts) train the same preference run and the same SFT model as one process with the same global
batch; a two-process run stopped part-way and resumed by a new launch ends identical to the uninterrupted one.

Tolerance. With one process the loss of a step is the mean over its 4 pairs; with two, each process takes
the mean over its 2 and DDP averages the two gradients. That is the same number, but float32 additions in
another order: the results differ in the last bits (measured: losses by ~1e-7, the summed log-probs by
~4e-6 on values near -30, i.e. relative ~1e-7). AdamW then divides each weight's step by that weight's own
gradient scale, so where a gradient is near 0 such last-bit differences move the weight by a small fraction
of the learning rate: measured at most 4e-6 after 4-20 steps at lr 2e-3 to 3e-3. The weights are compared
to within 5e-5 (2.5% of one step) and the metrics to within 1e-5 relative and absolute. An error in the split
(a row dropped or counted twice, gradients not averaged across processes, a rank on another batch) moves
the weights by whole steps and the losses in the third digit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import TINY as PIPELINE_TINY

from tdpo_lab.cache.plan import STAGES
from tdpo_lab.cache.store import Stage
from tdpo_lab.config import ConfigError, load_config
from tdpo_lab.core.distributed import check_split, rank_rows
from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.core.loop import TrainingLoop
from tdpo_lab.core.models import load_model
from tdpo_lab.products.sft import sft_dir, train_sft
from tdpo_lab.runs.rundir import RunDir, run_name
from tdpo_lab.runs.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
WEIGHTS_ATOL = 5e-5  # see the module docstring
METRICS_TOL = 1e-5
POOLED_TOL = 1e-3  # means pooled over tokens (logits/*): the mean of slice means differs from the pooled one

# test_pipeline's TINY with batches of 4 (2 rows per process) and 4 preference steps.
TINY = {
    **PIPELINE_TINY,
    "sft_steps": 12,
    "sft_batch_size": 4,
    "sft_eval_every": 6,
    "sft_checkpoint_every": 6,
    "train_steps": 4,
    "batch_size": 4,
    "eval_every": 2,
}


# --- the split of a batch ------------------------------------------------------------------------------
def test_rank_rows_cut_the_batch_into_equal_disjoint_slices_in_order():
    batch = np.arange(100, 112)
    for world, parts in [(1, 1), (2, 1), (1, 3), (2, 3), (3, 2)]:
        slices = [
            rank_rows(batch, rank=r, world_size=world, parts=parts, part=p)
            for r in range(world)
            for p in range(parts)
        ]
        assert {len(s) for s in slices} == {12 // (world * parts)}
        assert np.array_equal(np.concatenate(slices), batch)  # rank r takes slices r*parts ... (r+1)*parts-1
    with pytest.raises(ValueError, match="multiple of 8"):
        check_split(12, 4, 2)


def test_the_batch_must_split_over_the_accumulation_steps():
    with pytest.raises(ConfigError, match="'batch_size' .* divisible by 'grad_accum_steps'"):
        load_config("tiny", fast=True, batch_size=4, grad_accum_steps=3)
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config("tiny", fast=True, mixed_precision="fp8")
    cfg = load_config("tiny", fast=True)
    assert (cfg.grad_accum_steps, cfg.mixed_precision) == (1, "no")


def test_new_knobs_keep_the_old_keys_until_set(tmp_path):
    """Existing SFT caches and run folders keep their keys: the knobs enter them only when set."""
    cfg = load_config("tiny", fast=True, cache_dir=str(tmp_path))
    sft = STAGES["sft"]
    values = {f: getattr(cfg, f) for f in sft.fields}
    upstream = {"train_data": "a", "test_data": "b", "tokenizer": "c"}
    without_late = Stage(sft.name, sft.fields, sft.upstream, sft.version, sft.extra)
    assert sft.key({**values, "mixed_precision": "no"}, upstream) == without_late.key(values, upstream)
    assert sft.key({**values, "mixed_precision": "bf16"}, upstream) != without_late.key(values, upstream)
    assert run_name(cfg) == run_name(cfg.replace(grad_accum_steps=1, mixed_precision="no"))
    assert run_name(cfg) != run_name(cfg.replace(grad_accum_steps=2))


def test_gradient_accumulation_in_the_loop_gives_the_whole_batch_step(tmp_path):
    data = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(1))

    def run(parts: int, folder: Path) -> torch.nn.Linear:
        folder.mkdir()
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        loop = TrainingLoop(
            model,
            opt,
            sched,
            total_steps=3,
            checkpoint_path=folder / "ckpt.pt",
            log=[folder / "log.jsonl"],
            eval_every=10,
            checkpoint_every=10,
            grad_accum_steps=parts,
        )

        def step_fn(step, part):
            rows = data[step].chunk(parts)[part]
            loss = model(rows).pow(2).mean()
            return loss, {"loss": loss.item()}

        assert loop.run(step_fn, progress=False)
        return model, read_jsonl(folder / "log.jsonl")

    whole, log_whole = run(1, tmp_path / "one")
    split, log_split = run(2, tmp_path / "two")
    torch.testing.assert_close(split.weight, whole.weight, rtol=1e-6, atol=1e-6)
    # the step's loss is the mean of its parts' losses: the whole batch's loss
    for a, b in zip(log_whole, log_split, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


# --- whole trainings, one process against two --------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(imdb_path, tmp_path_factory):
    """A one-process preference run (in this process): it builds the cached SFT model and pairs it shares."""
    root = tmp_path_factory.mktemp("distributed")
    kwargs = dict(TINY, data_path=str(imdb_path), cache_dir=str(root / "cache"), method="tdpo2")
    cfg = load_config("tiny", fast=True, **kwargs)
    return root, kwargs, train(cfg, root / "one", progress=False)


def _launch(*args: str) -> None:
    """Run ``args`` as two gloo processes with torch.distributed.run; fail with their output if they fail."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def _cli_run(kwargs: dict, out: Path) -> None:
    sets = [f"--set={key}={json.dumps(value)}" for key, value in kwargs.items()]
    _launch("-m", "tdpo_lab.cli", "run", "--fast", "--quiet", "--out", str(out), *sets)


def _worker(**spec) -> None:
    _launch(str(WORKER), json.dumps(spec, default=str))


def _steps(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(path)]


def _assert_close_records(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if isinstance(value, float):
                # logits/* pool every response token of the batch into one mean: processes average the means
                # of their slices, which weights a token by its slice's length, so they agree only to ~1e-4
                tol = POOLED_TOL if key.startswith("logits/") else METRICS_TOL
                assert rb[key] == pytest.approx(value, rel=tol, abs=tol), (ra["step"], key)
            else:
                assert rb[key] == value, (ra["step"], key)


def _assert_close_weights(a: Path, b: Path, atol: float) -> None:
    sa, sb = load_model(str(a)).state_dict(), load_model(str(b)).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_two_processes_train_the_run_of_one_and_resume_exactly(one_process):
    root, kwargs, one = one_process
    two = root / "two"
    _cli_run(kwargs, two)  # the cached SFT model and pairs of the one-process run: the same inputs
    _assert_close_records(_steps(one / "metrics.jsonl"), _steps(two / "metrics.jsonl"))
    _assert_close_weights(one / "policy", two / "policy", WEIGHTS_ATOL)
    assert [r["step"] for r in read_jsonl(two / "eval.jsonl")] == [0, 2, 4]
    assert json.loads((one / "env.json").read_text())["world_size"] == 1
    assert json.loads((two / "env.json").read_text())["world_size"] == 2

    # killed after step 3 (last checkpoint: step 2), then launched again: the same run, to the last bit
    resumed = root / "resumed"
    _worker(kind="train", config=kwargs, out=str(resumed), stop_after=3)
    assert not RunDir(resumed).is_finished and RunDir(resumed).checkpoint_path.is_file()
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3]
    _cli_run(kwargs, resumed)
    assert _steps(resumed / "metrics.jsonl") == _steps(two / "metrics.jsonl")
    assert _steps(resumed / "eval.jsonl") == _steps(two / "eval.jsonl")
    _assert_close_weights(two / "policy", resumed / "policy", 0.0)


@pytest.mark.slow
def test_two_processes_train_the_sft_model_of_one(one_process):
    root, kwargs, _ = one_process
    cfg = load_config("tiny", fast=True, **kwargs)
    cache = root / "cache-two"
    shutil.copytree(Path(kwargs["cache_dir"]) / "tokenizer", cache / "tokenizer")  # the same tokenizer
    _worker(kind="sft", config={**kwargs, "cache_dir": str(cache)})
    two = cfg.replace(cache_dir=str(cache))
    assert sft_dir(two) != sft_dir(cfg)
    _assert_close_records(_steps(sft_dir(cfg) / "history.jsonl"), _steps(sft_dir(two) / "history.jsonl"))
    _assert_close_weights(sft_dir(cfg) / "model", sft_dir(two) / "model", WEIGHTS_ATOL)


@pytest.mark.slow
def test_gradient_accumulation_trains_the_run_of_one_pass(one_process):
    root, kwargs, one = one_process
    cfg = load_config("tiny", fast=True, **kwargs, grad_accum_steps=2)
    accum = train(cfg, root / "accum", progress=False)  # the same cached SFT model and pairs
    _assert_close_records(_steps(one / "metrics.jsonl"), _steps(accum / "metrics.jsonl"))
    _assert_close_weights(one / "policy", accum / "policy", WEIGHTS_ATOL)
    # SFT as well, into a cache of its own (grad_accum_steps is not part of the SFT key, like the process count)
    base = load_config("tiny", fast=True, **kwargs)
    cache = root / "cache-accum"
    shutil.copytree(Path(kwargs["cache_dir"]) / "tokenizer", cache / "tokenizer")
    split = cfg.replace(cache_dir=str(cache))
    train_sft(split, progress=False)
    _assert_close_records(_steps(sft_dir(base) / "history.jsonl"), _steps(sft_dir(split) / "history.jsonl"))
    _assert_close_weights(sft_dir(base) / "model", sft_dir(split) / "model", WEIGHTS_ATOL)
