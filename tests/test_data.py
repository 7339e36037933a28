"""tdpo_lab.core.data: IMDb loading and its errors, cleaning, fingerprints, prefixes, batch collation."""

from __future__ import annotations

import hashlib
import types

import numpy as np
import pandas as pd
import pytest
import torch

from tdpo_lab.core.data import (
    IGNORE_INDEX,
    DataError,
    DataNotFoundError,
    clean_text,
    collate_ids,
    collate_preference_batch,
    collate_sequences,
    dataset_fingerprint,
    load_imdb,
    make_prefixes,
)


# --- loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("split", "rows"), [("train", 4000), ("test", 1000)])
def test_load_imdb_sample_schema(imdb_path, split, rows):
    import datasets

    ds = load_imdb(split, imdb_path)
    assert len(ds) == rows
    assert ds.column_names == ["text", "label"]
    assert ds.features["text"] == datasets.Value("string")
    assert ds.features["label"] == datasets.ClassLabel(names=["neg", "pos"])
    labels = np.asarray(ds["label"])
    assert set(np.unique(labels)) == {0, 1} and 0.45 < labels.mean() < 0.55
    # The same rows as the parquet file, in order (naive reference: pandas).
    frame = pd.read_parquet(imdb_path / f"{split}.parquet")
    assert list(ds["text"][:5]) == frame["text"].tolist()[:5]
    assert labels.tolist() == frame["label"].tolist()


def test_load_imdb_from_env_and_path_precedence(imdb_path, monkeypatch, tmp_path):
    monkeypatch.setenv("TDPO_LAB_IMDB", str(imdb_path))
    assert len(load_imdb("test")) == 1000
    monkeypatch.setenv("TDPO_LAB_IMDB", str(tmp_path / "nowhere"))
    assert len(load_imdb("test", path=str(imdb_path))) == 1000  # path= beats the environment
    with pytest.raises(DataNotFoundError, match="nowhere"):
        load_imdb("test")


def _write(folder, split, frame):
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / f"{split}.parquet")


def _assert_says_both_ways(message):
    assert (
        "TDPO_LAB_IMDB" in message
        and "path=" in message
        and "stanfordnlp/imdb" in message
        and "hub" in message
    )


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_imdb("train", tmp_path / "absent")
    assert "absent" in str(info.value) and "does not exist" in str(info.value)
    _assert_says_both_ways(str(info.value))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_path_that_is_a_file(tmp_path):
    file = tmp_path / "train.parquet"
    file.write_text("x")
    with pytest.raises(DataNotFoundError, match="not a folder"):
        load_imdb("train", file)


def test_missing_split_file_is_named(tmp_path):
    _write(tmp_path, "train", pd.DataFrame({"text": ["good"], "label": [1]}))
    assert len(load_imdb("train", tmp_path)) == 1
    with pytest.raises(DataNotFoundError) as info:
        load_imdb("test", tmp_path)
    assert "'test.parquet'" in str(info.value) and "train.parquet" in str(info.value)
    _assert_says_both_ways(str(info.value))


@pytest.mark.parametrize(
    ("columns", "missing"), [(["text"], "label"), (["label"], "text"), (["review", "y"], "text")]
)
def test_missing_column_is_named(tmp_path, columns, missing):
    frame = pd.DataFrame({c: (["good"] if c in ("text", "review") else [1]) for c in columns})
    _write(tmp_path, "train", frame)
    with pytest.raises(DataError) as info:
        load_imdb("train", tmp_path)
    assert f"'{missing}'" in str(info.value) and "missing" in str(info.value)
    _assert_says_both_ways(str(info.value))


def test_extra_columns_are_dropped(tmp_path):
    _write(tmp_path, "train", pd.DataFrame({"text": ["good", "bad"], "label": [1, 0], "id": [7, 8]}))
    ds = load_imdb("train", tmp_path)
    assert ds.column_names == ["text", "label"] and ds["label"][:] == [1, 0]


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (pd.DataFrame({"text": ["a", "b"], "label": [0, -1]}), r"0 \(negative\) or 1 \(positive\).*-1"),
        (pd.DataFrame({"text": ["a", "b"], "label": [0, 2]}), r"found values \[2\]"),
        (pd.DataFrame({"text": ["a", "b"], "label": ["neg", "pos"]}), "'label' must hold integers"),
        (pd.DataFrame({"text": [1, 2], "label": [0, 1]}), "'text' must hold strings"),
        (pd.DataFrame({"text": ["a", None], "label": [0, 1]}), "missing values"),
    ],
)
def test_malformed_columns(tmp_path, frame, match):
    _write(tmp_path, "train", frame)
    with pytest.raises(DataError, match=match):
        load_imdb("train", tmp_path)


def test_unreadable_parquet(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="train.parquet"):
        load_imdb("train", tmp_path)


@pytest.mark.parametrize("split", ["validation", "unsupervised", "Train", ""])
def test_unknown_split(imdb_path, split):
    with pytest.raises(DataError, match="unknown IMDb split"):
        load_imdb(split, imdb_path)


def test_no_path_no_env_no_hub_says_all_three(monkeypatch):
    monkeypatch.delenv("TDPO_LAB_IMDB", raising=False)
    with pytest.raises(DataNotFoundError) as info:
        load_imdb("train")  # HF_HUB_OFFLINE=1 (conftest): the hub attempt fails at once, without network
    message = str(info.value)
    assert "no IMDb path was given" in message and "TDPO_LAB_IMDB is not set" in message
    _assert_says_both_ways(message)
    # HF_HUB_OFFLINE=1 makes datasets try its cache and fail fast; that error is wrapped, not swallowed.
    assert "failed" in message and info.value.__cause__ is not None


# --- cleaning -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a<br />b", "a\nb"),
        ("a<br/>b", "a\nb"),
        ("a<br>b", "a\nb"),
        ("a<BR />b", "a\nb"),
        ("a< br / >b", "a\nb"),
        ("a.<br /><br />b", "a.\n\nb"),
        ("a<br /><br /><br /><br />b", "a\n\nb"),
        ("a <br /> b", "a\nb"),
        ("  two   spaces\tand tab  ", "two spaces and tab"),
        ('He said \\"hi\\".', 'He said "hi".'),
        ("bell\x07 here", "bell here"),
        ("already clean.", "already clean."),
        ("<br />", ""),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_on_the_sample(imdb_train_texts):
    joined = "\n".join(imdb_train_texts)
    assert "<br" not in joined.lower() and "  " not in joined and '\\"' not in joined
    assert all(t == t.strip() and t for t in imdb_train_texts)
    assert all(clean_text(t) == t for t in imdb_train_texts[:200])  # idempotent


def test_clean_text_rejects_non_strings():
    with pytest.raises(TypeError, match="str"):
        clean_text(None)  # type: ignore[arg-type]


# --- fingerprints ---------------------------------------------------------------------------------
def _naive_fingerprint(texts, labels):
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        blob = text.encode()
        digest.update(len(blob).to_bytes(8, "little") + blob + int(label).to_bytes(8, "little", signed=True))
    return digest.hexdigest()


def test_dataset_fingerprint():
    import datasets

    def make(texts, labels):
        return datasets.Dataset.from_dict({"text": texts, "label": labels})

    base = dataset_fingerprint(make(["ab", "c"], [0, 1]))
    assert base == _naive_fingerprint(["ab", "c"], [0, 1])
    assert base == dataset_fingerprint({"text": ["ab", "c"], "label": [0, 1]})
    assert base != dataset_fingerprint(make(["a", "bc"], [0, 1]))  # text boundaries matter
    assert base != dataset_fingerprint(make(["ab", "c"], [1, 1]))  # labels matter
    assert base != dataset_fingerprint(make(["c", "ab"], [1, 0]))  # order matters
    with pytest.raises(DataError, match="'text' and 'label'"):
        dataset_fingerprint(make(["a"], [0]).rename_column("label", "y"))


def test_dataset_fingerprint_of_the_sample_is_stable(imdb_path):
    a = dataset_fingerprint(load_imdb("test", imdb_path))
    frame = pd.read_parquet(imdb_path / "test.parquet")
    assert a == _naive_fingerprint(frame["text"], frame["label"])


# --- prefixes -------------------------------------------------------------------------------------
def test_make_prefixes_matches_the_definition(imdb_train_texts, tiny_tokenizer):
    texts = imdb_train_texts[:300]
    prefixes = make_prefixes(texts, tiny_tokenizer, min_tokens=2, max_tokens=8, seed=3)
    ks = np.random.default_rng(3).integers(2, 9, size=len(texts))
    for text, k, prefix in zip(texts, ks, prefixes, strict=True):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prefix == tiny_tokenizer.decode(ids[:k])
        assert text.startswith(prefix)  # byte-level BPE: a literal prefix of the review
    assert set(ks.tolist()) == set(range(2, 9))


def test_make_prefixes_is_seeded(imdb_train_texts, gpt2_tokenizer):
    texts = imdb_train_texts[:50]
    a = make_prefixes(texts, gpt2_tokenizer, seed=0)
    assert a == make_prefixes(texts, gpt2_tokenizer, seed=0)
    assert a != make_prefixes(texts, gpt2_tokenizer, seed=1)
    lengths = [len(gpt2_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in a]
    assert 2 <= min(lengths) and max(lengths) <= 8


def test_make_prefixes_edge_cases(gpt2_tokenizer):
    assert make_prefixes([], gpt2_tokenizer) == []
    assert make_prefixes(["Hi"], gpt2_tokenizer, min_tokens=3, max_tokens=3) == ["Hi"]  # shorter than k
    # The text is cleaned before it is cut.
    assert make_prefixes(["x<br />y z"], gpt2_tokenizer, min_tokens=3, max_tokens=3) == ["x\ny"]
    # An emoji is 4 bytes, several byte-level tokens: a cut inside it is moved to its end.
    prefix = make_prefixes(["\U0001f600 great film"], gpt2_tokenizer, min_tokens=1, max_tokens=1)[0]
    assert prefix == "\U0001f600"


@pytest.mark.parametrize(
    ("texts", "kwargs", "match"),
    [
        (["good"], {"min_tokens": 0}, "min_tokens"),
        (["good"], {"min_tokens": 5, "max_tokens": 4}, "min_tokens <= max_tokens"),
        (["good", "<br />"], {}, r"texts\[1\] is empty"),
        (["good", 3], {}, r"texts\[1\] is a int"),
    ],
)
def test_make_prefixes_bad_input(gpt2_tokenizer, texts, kwargs, match):
    with pytest.raises(DataError, match=match):
        make_prefixes(texts, gpt2_tokenizer, **kwargs)


# --- collation ------------------------------------------------------------------------------------
def _naive_rows(tokenizer, prompts, responses, max_length=None):
    """Reference collation, one row at a time, straight from docs/methods.md section 1."""
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False) + [eos]
        if max_length is not None:
            r = r[: max_length - len(p)]
        rows.append((p, r))
    width = max(len(p) + len(r) for p, r in rows)
    ids, mask, labels = [], [], []
    for p, r in rows:
        pad = width - len(p) - len(r)
        ids.append(p + r + [eos] * pad)
        mask.append([1] * (len(p) + len(r)) + [0] * pad)
        labels.append([IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
        "prompt_lengths": torch.tensor([len(p) for p, _ in rows]),
        "response_lengths": torch.tensor([len(r) for _, r in rows]),
    }


PROMPTS = ["Hello", "This movie was", "I"]
CHOSEN = [" world", " great fun from start to end", " loved it!"]
REJECTED = [" there, my old friend", " dull", " hated every minute of this"]


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "tiny_tokenizer"])
def test_collate_preference_batch_matches_reference(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    batch = collate_preference_batch(tokenizer, PROMPTS, CHOSEN, REJECTED)
    expected = _naive_rows(tokenizer, PROMPTS + PROMPTS, CHOSEN + REJECTED)
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].dtype == torch.long, key
        torch.testing.assert_close(batch[key], value, msg=key)
    n, width = batch["input_ids"].shape
    assert n == 2 * len(PROMPTS) and batch["labels"].shape == (n, width)
    eos = tokenizer.eos_token_id
    ends = batch["prompt_lengths"] + batch["response_lengths"] - 1
    assert (batch["input_ids"][torch.arange(n), ends] == eos).all()  # every response ends with EOS
    # After the shift only response tokens (EOS included) are scored.
    assert torch.equal((batch["labels"][:, 1:] != IGNORE_INDEX).sum(1), batch["response_lengths"])
    # Rows [:B] are the chosen side, [B:] the rejected side, on the same prompts.
    for i, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED, strict=True)):
        for row, response in ((i, c), (i + len(PROMPTS), r)):
            length = int(batch["attention_mask"][row].sum())
            assert tokenizer.decode(batch["input_ids"][row, :length]) == p + response + tokenizer.eos_token


def test_collate_sequences_underlies_the_preference_batch(gpt2_tokenizer):
    a = collate_preference_batch(gpt2_tokenizer, PROMPTS, CHOSEN, REJECTED)
    b = collate_sequences(gpt2_tokenizer, PROMPTS + PROMPTS, CHOSEN + REJECTED)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_collate_ids_is_collate_sequences_on_token_ids(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    full = collate_sequences(gpt2_tokenizer, PROMPTS, CHOSEN)
    encode = lambda texts: gpt2_tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    got = collate_ids(encode(PROMPTS), [ids + [eos] for ids in encode(CHOSEN)], eos)
    assert list(got) == ["input_ids", "attention_mask", "labels"]
    for key, value in got.items():
        assert torch.equal(value, full[key]), key


def test_collate_random_batches_match_reference(gpt2_tokenizer):
    rng = np.random.default_rng(0)
    words = ["the", "film", "was", "not", "bad", ",", "great", "!", "acting", "\n", "plot", "é"]
    make = lambda n: "".join(" " + rng.choice(words) for _ in range(n))  # noqa: E731
    for _ in range(20):
        b = int(rng.integers(1, 5))
        prompts = [make(int(rng.integers(1, 6))) for _ in range(b)]
        responses = [make(int(rng.integers(1, 12))) for _ in range(b)]
        max_length = None if rng.random() < 0.5 else int(rng.integers(8, 14))
        prompts = [p if len(gpt2_tokenizer.encode(p)) < (max_length or 99) else "x" for p in prompts]
        got = collate_sequences(gpt2_tokenizer, prompts, responses, max_length=max_length)
        expected = _naive_rows(gpt2_tokenizer, prompts, responses, max_length)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, msg=key)


def test_max_length_cuts_the_response_only(gpt2_tokenizer):
    prompts, responses = ["One two three"], [" four five six seven eight"]
    full = collate_sequences(gpt2_tokenizer, prompts, responses)
    assert full["input_ids"].shape[1] == 3 + 5 + 1
    cut = collate_sequences(gpt2_tokenizer, prompts, responses, max_length=5)
    assert cut["input_ids"].shape == (1, 5)
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :5])
    assert cut["prompt_lengths"].item() == 3 and cut["response_lengths"].item() == 2
    assert gpt2_tokenizer.eos_token_id not in cut["input_ids"][0].tolist()  # a cut response has no EOS
    roomy = collate_sequences(gpt2_tokenizer, prompts, responses, max_length=50)
    assert torch.equal(roomy["input_ids"], full["input_ids"])
    one = collate_sequences(gpt2_tokenizer, prompts, responses, max_length=4)
    assert one["response_lengths"].item() == 1


def test_padding_is_eos_and_masked(gpt2_tokenizer):
    batch = collate_sequences(gpt2_tokenizer, ["A", "A"], [" b", " b c d e f"])
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["input_ids"][pad] == gpt2_tokenizer.eos_token_id).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["attention_mask"].sum(1) == batch["prompt_lengths"] + batch["response_lengths"]).all()


@pytest.mark.parametrize(
    ("prompts", "chosen", "rejected", "match"),
    [
        ([], [], [], "empty"),
        (["a", "b"], [" x"], [" y", " z"], "equal lengths, got 2, 1, 2"),
        (["a"], [" x"], [" y", " z"], "equal lengths"),
        (["a"], [""], [" y"], r"chosen\[0\] is empty"),
        (["a", "b"], [" x", " x"], [" y", ""], r"rejected\[1\] is empty"),
        ([""], [" x"], [" y"], r"prompts\[0\] has no tokens"),
        ("a", [" x"], [" y"], "list of strings"),
        (["a"], [None], [" y"], r"chosen\[0\] is a NoneType"),
    ],
)
def test_collate_preference_batch_bad_input(gpt2_tokenizer, prompts, chosen, rejected, match):
    with pytest.raises(DataError, match=match):
        collate_preference_batch(gpt2_tokenizer, prompts, chosen, rejected)


@pytest.mark.parametrize(
    ("prompts", "responses", "kwargs", "match"),
    [
        ([], [], {}, "empty"),
        (["a", "b"], [" x"], {}, "differ in length"),
        (["a"], [""], {}, r"responses\[0\] is empty"),
        (["one two three"], [" x"], {"max_length": 3}, "no room for a response"),
        (["a"], [" x"], {"max_length": 1}, "max_length must be an int >= 2"),
        (["a"], [" x"], {"max_length": 4.0}, "max_length must be an int"),
    ],
)
def test_collate_sequences_bad_input(gpt2_tokenizer, prompts, responses, kwargs, match):
    with pytest.raises(DataError, match=match):
        collate_sequences(gpt2_tokenizer, prompts, responses, **kwargs)


def test_collate_needs_an_eos_token(gpt2_tokenizer):
    no_eos = types.SimpleNamespace(eos_token_id=None)
    with pytest.raises(DataError, match="no EOS token"):
        collate_sequences(no_eos, ["a"], [" b"])
    with pytest.raises(DataError, match="no EOS token"):
        collate_preference_batch(no_eos, ["a"], [" b"], [" c"])
