"""The stage layer: keys, manifests, damaged entries rebuilt or refused by name, no unpickling, one fingerprint."""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tdpo_lab.cache.plan import STAGES, Plan
from tdpo_lab.cache.store import CacheError, CacheWarning, Entry, Stage, fetch
from tdpo_lab.config import load_config
from tdpo_lab.core import data as data_mod
from tdpo_lab.core.utils import CheckpointError
from tdpo_lab.course.schedule import chapter_needs
from tdpo_lab.products import reward as reward_mod
from tdpo_lab.products.method_inputs import attnpo_weights
from tdpo_lab.products.pairs import build_pairs, samples_table, split_pairs
from tdpo_lab.products.pairs_source import evaluation_prompts
from tdpo_lab.products.reward import get_reward
from tdpo_lab.products.sft import load_reference, sft_dir, sft_history, train_sft
from tdpo_lab.products.tokenizer import get_tokenizer
from tdpo_lab.runs.train import reference_evaluation, train

PACKAGE = Path(__file__).resolve().parents[1] / "tdpo_lab"


# --- the mechanics, on a toy stage -------------------------------------------------------------------
def _toy(tmp_path, calls):
    entry = Entry(tmp_path, "toy", "k1")

    def build(folder):
        calls.append(folder)
        (folder / "sub").mkdir(exist_ok=True)
        (folder / "a.txt").write_text("alpha")
        (folder / "sub" / "b.bin").write_bytes(bytes(range(200)))

    def load(folder):
        return (folder / "a.txt").read_text(), (folder / "sub" / "b.bin").read_bytes()

    return entry, build, load


def test_fetch_builds_once_then_loads(tmp_path):
    calls = []
    entry, build, load = _toy(tmp_path, calls)
    first = fetch(entry, build, load, what="toy cache")
    assert fetch(entry, build, load, what="toy cache") == first
    assert len(calls) == 1 and entry.sealed and entry.problem() is None
    assert sorted(entry.files()) == ["a.txt", "sub/b.bin"]
    assert (tmp_path / ".locks" / "toy" / "k1.lock").is_file()  # the lock lives outside the entry


@pytest.mark.parametrize(
    ("damage", "file", "says"),
    [
        ("truncate", "sub/b.bin", "truncated"),
        ("flip", "sub/b.bin", "corrupt"),
        ("delete", "a.txt", "missing"),
        ("garbage", "manifest.json", "unreadable"),
    ],
)
def test_damaged_entry_is_rebuilt_with_a_message_naming_the_file(tmp_path, damage, file, says):
    calls = []
    entry, build, load = _toy(tmp_path, calls)
    good = fetch(entry, build, load, what="toy cache")
    _damage(entry.folder / file, damage)
    with pytest.warns(CacheWarning, match=f"{file}.*{says}.*rebuilding") as record:
        assert fetch(entry, build, load, what="toy cache") == good
    assert len(calls) == 2 and entry.problem() is None
    assert all("\n" not in str(w.message) for w in record)


def test_unbuildable_or_unloadable_entries_are_kit_errors(tmp_path):
    calls = []
    entry, build, load = _toy(tmp_path, calls)
    with pytest.raises(CacheError, match=r"not built \(no manifest.json\).*Run it first"):
        fetch(entry, None, load, what="toy cache", how="Run it first.")
    fetch(entry, build, load, what="toy cache")
    _damage(entry.folder / "a.txt", "truncate")
    with pytest.raises(CacheError, match=r"a\.txt is truncated"):
        fetch(entry, None, load, what="toy cache")

    def broken_load(folder):
        raise ValueError("unreadable format")

    with pytest.raises(CacheError, match=r"built just now, yet .*unreadable format.*Delete"):
        fetch(Entry(tmp_path, "toy", "k2"), build, broken_load, what="toy cache")


def test_a_build_stopped_early_stays_unsealed_and_resumes(tmp_path):
    entry = Entry(tmp_path, "toy", "resume")
    seen = []

    def build(folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        if not (folder / "half").exists():
            (folder / "half").write_text("step 1")
            return False  # stopped on purpose
        (folder / "done").write_text("step 2")

    assert fetch(entry, build, lambda f: (f / "done").read_text(), what="toy cache") is None
    assert not entry.sealed
    assert fetch(entry, build, lambda f: (f / "done").read_text(), what="toy cache") == "step 2"
    assert seen == [[], ["half"]]  # the second build found the first one's work


def test_stage_key_covers_fields_upstream_version_and_extra():
    stage = Stage("s", ("a",), ("up",), 1, "x")
    key = stage.key({"a": 1, "b": 2}, {"up": "u1"})
    assert key == stage.key({"a": 1, "b": 3}, {"up": "u1"})  # b is not one of its fields
    assert len({key, stage.key({"a": 2}, {"up": "u1"}), stage.key({"a": 1}, {"up": "u2"})}) == 3
    assert key != Stage("s", ("a",), ("up",), 2, "x").key({"a": 1}, {"up": "u1"})
    assert key != Stage("s", ("a",), ("up",), 1, "y").key({"a": 1}, {"up": "u1"})
    with pytest.raises(ValueError, match="upstream"):
        stage.key({"a": 1}, {})


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # same size, one byte changed: only the sha256 can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"garbage")


# --- the pipeline's keys -----------------------------------------------------------------------------
def test_keys_travel_down_the_graph(imdb_path):
    cfg = load_config("tiny", fast=True, data_path=str(imdb_path))
    names = [*STAGES, "attnpo"]  # the built-in stages and AttentionPO's declared input
    base = {name: Plan(cfg).key(name) for name in names}
    downstream = {
        "vocab_size": {"tokenizer", "sft", "pairs", "attnpo", "eval_pairs", "eval_ref"},
        "sft_steps": {"sft", "pairs", "attnpo", "eval_pairs", "eval_ref"},
        "max_new_tokens": {"pairs", "attnpo", "eval_pairs", "eval_ref"},
        "attn_layer": {"attnpo"},
        "eval_samples": {"eval_ref"},
        "beta": set(),  # a preference-training knob: no cached stage depends on it
    }
    for field, expected in downstream.items():
        value = getattr(cfg, field)
        changed = cfg.replace(**{field: value + 1 if isinstance(value, int) else value * 2})
        keys = {name: Plan(changed).key(name) for name in names}
        assert {name for name in names if keys[name] != base[name]} == expected, field


def test_chapter_needs_derives_the_reproduce_table():
    assert chapter_needs() == {
        "00": (),
        "01": ("00",),
        "02": ("01",),
        "03": (),
        "04": ("02",),
        "05": ("04",),
        "06": ("02",),
        "07": ("06",),
        "08": ("05", "07"),
    }


def test_split_fingerprint_is_kept_until_the_file_changes(imdb_path, tmp_path, monkeypatch):
    folder = tmp_path / "imdb"
    folder.mkdir()
    for split in ("train", "test"):
        pd.read_parquet(imdb_path / f"{split}.parquet").iloc[:50].to_parquet(folder / f"{split}.parquet")
    calls = []
    real = data_mod.dataset_fingerprint
    monkeypatch.setattr(data_mod, "dataset_fingerprint", lambda ds: calls.append(1) or real(ds))
    first = data_mod.split_fingerprint("train", folder)
    assert data_mod.split_fingerprint("train", folder) == first and len(calls) == 1
    pd.read_parquet(imdb_path / "train.parquet").iloc[:40].to_parquet(folder / "train.parquet")
    assert data_mod.split_fingerprint("train", folder) != first and len(calls) == 2


# --- no unpickling --------------------------------------------------------------------------------------
def _unpickling_calls(source: str) -> list[str]:
    """Every construct in ``source`` that can unpickle: the modules, and loads that allow pickles."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in filter(None, names):
                if name.split(".")[0] in {"pickle", "joblib", "dill", "cloudpickle", "shelve", "marshal"}:
                    found.append(f"line {node.lineno}: import {name}")
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.load") or func == "load" and "weights_only" in keywords:
                if keywords.get("weights_only") != "True":
                    found.append(f"line {node.lineno}: {func} without weights_only=True")
            if keywords.get("allow_pickle") not in (None, "False"):
                found.append(f"line {node.lineno}: {func}(allow_pickle={keywords['allow_pickle']})")
            if func.endswith(("read_pickle", "pickle.load", "pickle.loads")):
                found.append(f"line {node.lineno}: {func}")
    return found


def test_the_grep_finds_what_it_looks_for():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\nimport pandas as pd\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "pd.read_pickle('x')\n"
    )
    assert len(_unpickling_calls(bad)) == 6
    assert _unpickling_calls("import torch\ntorch.load('x', weights_only=True)\n") == []


def test_no_unpickling_anywhere_in_the_package():
    offenders = {
        str(path.relative_to(PACKAGE)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if (found := _unpickling_calls(path.read_text()))
    }
    assert offenders == {}


# --- every real cache file, damaged in turn -----------------------------------------------------------
# Smaller than the fast profile: each damaged SFT or pair entry is rebuilt, some twice.
TINY = dict(
    max_train_reviews=200,
    vocab_size=400,
    n_layer=1,
    n_head=2,
    n_embd=32,
    n_positions=192,
    sft_steps=8,
    sft_batch_size=4,
    sft_block_size=32,
    sft_eval_every=4,
    sft_eval_batches=1,
    sft_checkpoint_every=4,
    pair_prompts=8,
    samples_per_prompt=3,
    max_new_tokens=8,
    train_steps=1,
    batch_size=2,
    eval_every=1,
    checkpoint_every=1,
    eval_prompts=2,
    eval_samples=2,
    eval_max_new_tokens=6,
    eval_pairs=2,
    method="attnpo",
)


@pytest.fixture(scope="module")
def small_data(imdb_path, tmp_path_factory):
    """300 train and 200 test reviews: every stage builds in seconds (the classifier is weak: warned)."""
    folder = tmp_path_factory.mktemp("imdb_small")
    pd.read_parquet(imdb_path / "train.parquet").iloc[:300].to_parquet(folder / "train.parquet")
    pd.read_parquet(imdb_path / "test.parquet").iloc[:200].to_parquet(folder / "test.parquet")
    return folder


@pytest.fixture(scope="module")
def built(small_data, tmp_path_factory):
    """Every stage of one configuration, built once; returns (cfg, the products as first built)."""
    cfg = load_config(
        "tiny", fast=True, data_path=str(small_data), cache_dir=str(tmp_path_factory.mktemp("c")), **TINY
    )
    with pytest.warns(UserWarning, match="below 0.85"):
        train(cfg, tmp_path_factory.mktemp("run") / "attnpo", progress=False)  # builds every stage
    return cfg, {name: _product(cfg, name) for name in PRODUCTS}


def _product(cfg, name):
    if name == "tokenizer":
        return get_tokenizer(cfg).get_vocab()
    if name == "reward":
        reward_mod._reward_for.cache_clear()  # the per-process copy would hide the file
        return get_reward(cfg).score(["a fine film", "a dull film", ""])
    if name == "sft":
        return {k: v.clone() for k, v in load_reference(cfg, progress=False)[0].state_dict().items()}
    pairs = build_pairs(cfg, progress=False)
    if name == "pairs":
        return pairs, samples_table(cfg)
    if name == "attnpo":
        return attnpo_weights(cfg, pairs, progress=False)
    reference, tokenizer = load_reference(cfg, progress=False)
    reward_mod._reward_for.cache_clear()
    prompts = evaluation_prompts(cfg, tokenizer)
    return reference_evaluation(
        cfg, reference, tokenizer, get_reward(cfg), prompts, split_pairs(pairs, cfg)[1]
    )


PRODUCTS = {  # stage -> the file damaged
    "tokenizer": "tokenizer.json",
    "reward": "classifier.npz",
    "sft": "model/model.safetensors",
    "pairs": "pairs.parquet",
    "attnpo": "weights.safetensors",
    "eval_ref": "reference_eval.json",
}


def _same(a, b) -> None:
    if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    elif isinstance(a, tuple) and isinstance(a[0], pd.DataFrame):
        for x, y in zip(a, b, strict=True):
            pd.testing.assert_frame_equal(x, y)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for (c1, r1), (c2, r2) in zip(a, b, strict=True):
            assert torch.equal(c1, c2) and torch.equal(r1, r2)
    elif hasattr(a, "shape"):
        assert (a == b).all()
    else:
        assert a == b


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the reward classifier's test accuracy")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_each_damaged_cache_file_is_rebuilt_by_name(built, name, damage):
    cfg, products = built
    plan = Plan(cfg)
    entry = plan.entry(name)
    path = entry.folder / PRODUCTS[name]
    assert entry.problem() is None and path.is_file()
    _damage(path, damage)
    with pytest.warns(CacheWarning, match=f"{PRODUCTS[name]} is (truncated|corrupt).*rebuilding") as record:
        again = _product(cfg, name)
    assert all("\n" not in str(w.message) for w in record if issubclass(w.category, CacheWarning))
    _same(products[name], again)  # the same numbers as the first build
    assert entry.problem() is None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the reward classifier's test accuracy")
def test_what_cannot_be_rebuilt_here_is_a_kit_error_naming_the_file(built, tmp_path):
    cfg, _ = built
    history = sft_dir(cfg) / "history.jsonl"
    good = history.read_bytes()
    try:
        history.write_bytes(good[:-10])
        with pytest.raises(CacheError, match=r"history\.jsonl is truncated.*train_sft\(cfg\)"):
            sft_history(cfg)  # a reader: it does not retrain
        with pytest.warns(CacheWarning, match=r"history\.jsonl is truncated.*rebuilding"):
            train_sft(cfg, progress=False)  # the stage itself rebuilds it
        assert [r["step"] for r in sft_history(cfg)] == list(range(cfg.sft_steps + 1))
    finally:
        if sft_dir(cfg).joinpath("history.jsonl").read_bytes() != good:  # keep the module's entry intact
            history.write_bytes(good)
            Plan(cfg).entry("sft").seal()

    other = cfg.replace(cache_dir=str(tmp_path))
    train_sft(other, progress=False, stop_after=cfg.sft_checkpoint_every)
    checkpoint = sft_dir(other) / "checkpoint.pt"
    _damage(checkpoint, "truncate")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt cannot be read.*delete it"):
        train_sft(other, progress=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the reward classifier's test accuracy")
def test_a_cached_train_call_fingerprints_each_split_once(built, tmp_path, monkeypatch):
    cfg, _ = built
    results = []
    real = data_mod.dataset_fingerprint

    def counting(ds):
        results.append(real(ds))
        return results[-1]

    for module in [m for name, m in sys.modules.items() if name.startswith("tdpo_lab")]:
        if hasattr(module, "dataset_fingerprint"):  # wherever it was imported, count it
            monkeypatch.setattr(module, "dataset_fingerprint", counting)
    monkeypatch.setattr(data_mod, "_FINGERPRINTS", {})
    reward_mod._reward_for.cache_clear()
    train(cfg, tmp_path / "again", progress=False)  # every stage cached: only the run is new
    assert sorted(collections.Counter(results).values()) == [1, 1]  # train and test split, once each
