"""The ``gpt2`` profile end to end, offline: every chapter and every method on local stand-ins for the hub.

CI cannot reach the Hugging Face hub, so :func:`tdpo_lab.course.standins.build_gpt2_stand_ins` writes, once per
session, a tiny random GPT-2 with GPT-2's real 50,257-entry tokenizer and a tiny random sentiment classifier,
and the config keys ``model``, ``tokenizer`` and ``reward`` point at them: the same ``from_pretrained`` path a
hub name takes, the gpt2 profile's sizes and settings, the fast configuration. The chapters take the keys
through their ``overrides`` parameter, the command line through ``--set``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tdpo_lab.config import load_config
from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.course.chapters import NOTEBOOKS
from tdpo_lab.course.standins import build_gpt2_stand_ins, is_stand_in, uses_stand_ins
from tdpo_lab.methods import method_names
from tdpo_lab.runs.rundir import RunDir

pytestmark = pytest.mark.slow

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
# Chapter 03 is pure math on an enumerable toy: it has no profile (nbval runs it).
CHAPTERS = [name for name in NOTEBOOKS if not name.startswith("03_")]
# Chapter parameters that only set how much is shown, shrunk to keep CI short (the code paths are the same).
SMALLER = {"01": {"n_eval_reviews": 20}}


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    return build_gpt2_stand_ins(tmp_path_factory.mktemp("gpt2_stand_ins"))


@pytest.fixture(scope="session")
def gpt2_run_root(tmp_path_factory) -> Path:
    """One run root for chapters 04-08, so chapter 08 collects the runs 04-07 trained, as on Colab."""
    return tmp_path_factory.mktemp("gpt2_runs")


def test_stand_ins_take_the_hub_models_place(stand_ins):
    from tdpo_lab.core.models import build_model
    from tdpo_lab.products.reward import get_reward
    from tdpo_lab.products.tokenizer import GPT2_VOCAB_SIZE, get_tokenizer

    cfg = load_config("gpt2", fast=True, **stand_ins)
    tokenizer = get_tokenizer(cfg)
    assert len(tokenizer) == GPT2_VOCAB_SIZE
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    model = build_model(cfg, tokenizer)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_positions == 1024
    reward = get_reward(cfg)
    assert reward.positive_label == "POSITIVE"
    scores = reward.score(["A wonderful film.", "A dull mess."])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    assert uses_stand_ins(cfg) == ["model", "reward"]
    assert uses_stand_ins(load_config("gpt2", fast=True)) == [] and not is_stand_in("gpt2")
    # built once: a second call keeps the folders (and their weights) as they are
    weights = Path(stand_ins["model"]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_gpt2_stand_ins(Path(stand_ins["model"]).parent) == stand_ins
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_runs_on_the_gpt2_profile_offline(name, stand_ins, gpt2_run_root, imdb_path, tmp_path):
    papermill = pytest.importorskip("papermill")
    declared = papermill.inspect_notebook(str(NOTEBOOK_DIR / name))
    wanted = {
        "profile": "gpt2",
        "fast": True,
        "overrides": stand_ins,
        "run_root": str(gpt2_run_root),
        **SMALLER.get(name[:2], {}),
    }
    assert {"profile", "fast", "overrides"} <= set(declared), f"{name}: cannot take the gpt2 stand-ins"
    out = tmp_path / name
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / name),
        str(out),
        parameters={k: v for k, v in wanted.items() if k in declared},
        progress_bar=False,
        kernel_name="python3",
        cwd=str(tmp_path),
    )
    text = "\n".join(
        "".join(o.get("text", "")) for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", [])
    )
    assert "profile 'gpt2': set in the parameters cell" in text
    if name.startswith("00_"):  # the judge's sanity check needs a trained judge: skipped, and said so
        assert "untrained stand-ins for ['model', 'reward']" in text and "skipped (untrained stand-in" in text
    if name.startswith("08_"):  # every method of the chapter trained on the stand-ins, into the shared root
        configs = [json.loads(p.read_text()) for p in gpt2_run_root.glob("*/config.json")]
        assert {"dpo", "tdpo1", "tdpo2", "attnpo", "tidpo"} <= {c["method"] for c in configs}
        assert all(c["profile"] == "gpt2" and c["model"] == stand_ins["model"] for c in configs)


@pytest.mark.parametrize("method", method_names())
def test_cli_trains_every_method_on_the_gpt2_profile_offline(method, stand_ins, imdb_path, tmp_path):
    from tdpo_lab.cli import main

    out = tmp_path / method
    sets = [arg for key, value in stand_ins.items() for arg in ("--set", f"{key}={value}")]
    argv = ["run", "--profile", "gpt2", "--fast", "--quiet", "--method", method, "--out", str(out), *sets]
    assert main(argv) == 0
    assert RunDir(out).is_finished
    config = json.loads((out / "config.json").read_text())
    assert (config["profile"], config["method"], config["fast"]) == ("gpt2", method, True)
    assert {key: config[key] for key in stand_ins} == stand_ins
    evals = read_jsonl(out / "eval.jsonl")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == config["train_steps"]
    assert all(math.isfinite(e["reward"]) and 0 <= e["reward"] <= 1 for e in evals)
