"""A method from outside the package (tests/plugins/surprise_method.py: a knob and a cached input of its own)
trains, resumes, collects and plots through the command line, and loads through --plugin and entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdpo_lab import load_config
from tdpo_lab.cache import Plan
from tdpo_lab.cli import main
from tdpo_lab.core import read_jsonl
from tdpo_lab.methods import method_names, unregister
from tdpo_lab.runs import train

PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.fixture
def plugin_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield
    unregister("surprisedpo")  # the registry (and the config's knobs) as they were
    sys.modules.pop("surprise_method", None)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_a_plugin_method_trains_resumes_collects_and_plots(plugin_path, tmp_path, capsys):
    out = tmp_path / "runs" / "surprise"
    args = ["run", "--plugin", "surprise_method", "--fast", "--quiet", "--method", "surprisedpo"]
    args += ["--set", "surprise_temperature=2.0", "--out", str(out)]
    assert "surprisedpo" not in method_names()
    # interrupted after 5 steps (the first call), then resumed by the command line
    import surprise_method  # noqa: F401  (registers, as --plugin does)

    cfg = load_config("tiny", fast=True, method="surprisedpo", surprise_temperature=2.0)
    assert cfg.surprise_temperature == 2.0 and cfg.to_dict()["surprise_temperature"] == 2.0
    train(cfg, out, progress=False, stop_after=5)
    assert main(args) == 0
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, cfg.train_steps + 1))
    # its cached input sits in the cache under its own name, keyed by the knob
    entry = Plan(cfg).entry("refsurprise")
    assert (entry.folder / "tensors.safetensors").is_file()
    assert Plan(cfg.replace(surprise_temperature=3.0)).key("refsurprise") != entry.key
    assert "surprisedpo_beta0.1_seed0" in __import__("tdpo_lab").runs.run_name(cfg)
    # a second call finds the run finished and trains nothing
    before = (out / "metrics.jsonl").read_bytes()
    assert main(args) == 0
    assert (out / "metrics.jsonl").read_bytes() == before
    # collected with its own label, and plotted
    assert main(["collect", str(out.parent)]) == 0
    assert "Surprise-weighted DPO" in (out.parent / "results.md").read_text()
    assert (out.parent / "frontier.png").stat().st_size > 0


def test_a_plugin_knob_is_validated_by_the_config(plugin_path, capsys):
    import surprise_method  # noqa: F401

    with pytest.raises(Exception, match="surprise_temperature.*> 0"):
        load_config("tiny", fast=True, method="surprisedpo", surprise_temperature=-1.0)
    with pytest.raises(SystemExit) as stopped:  # the parser's exit: status 2 and the message
        main(
            [
                "run",
                "--plugin",
                "surprise_method",
                "--fast",
                "--method",
                "surprisedpo",
                "--set",
                "surprise_temperature=oops",
            ]
        )
    assert stopped.value.code == 2
    assert "surprise_temperature" in capsys.readouterr().err
    # other methods' runs ignore the knob: their names do not move
    dpo = load_config("tiny", fast=True, method="dpo")
    assert __import__("tdpo_lab").runs.run_name(dpo) == __import__("tdpo_lab").runs.run_name(
        dpo.replace(surprise_temperature=5.0)
    )


def test_an_unknown_plugin_says_what_to_do(capsys):
    assert main(["run", "--plugin", "no_such_plugin_module", "--fast"]) == 2
    assert "no_such_plugin_module" in capsys.readouterr().err


def test_sweep_workers_load_the_plugins():
    code = (
        "from tdpo_lab.runs.fanout import _init_worker; _init_worker(None, ('surprise_method',)); "
        "from tdpo_lab.methods import method_names; assert 'surprisedpo' in method_names(); print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_an_entry_point_plugin_loads_with_the_registry(tmp_path):
    dist = tmp_path / "surprise_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: surprise-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tdpo_lab.methods]\nsurprisedpo = surprise_method\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    code = "import tdpo_lab; assert 'surprisedpo' in tdpo_lab.method_names(); print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
