"""tdpo_lab.products.reward: the offline TF-IDF classifier (accuracy, cache) and hub-style pipelines (offline folder)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tdpo_lab.config import load_config
from tdpo_lab.core.data import load_imdb
from tdpo_lab.products import reward as reward_mod
from tdpo_lab.products.reward import (
    ClassifierReward,
    PipelineReward,
    RewardError,
    get_reward,
    load_reward,
    positive_label,
)


@pytest.fixture(scope="session")
def reward_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reward_cache")


@pytest.fixture(scope="session")
def classifier(imdb_path, reward_cache) -> ClassifierReward:
    """Trained once per session (a few seconds), cached in a session folder."""
    return load_reward("classifier", data_path=imdb_path, cache_dir=reward_cache)


def test_classifier_accuracy_is_at_least_085(classifier, imdb_path):
    assert classifier.kind == "classifier"
    assert classifier.accuracy >= 0.85
    # Recompute it from score() on the test split: the stored number is the real one.
    test = load_imdb("test", imdb_path)
    scores = classifier.score(test["text"])
    recomputed = np.mean((scores > 0.5) == np.asarray(test["label"]))
    assert recomputed == pytest.approx(classifier.accuracy, abs=1e-12)


def test_scores_are_probabilities(classifier):
    texts = ["A wonderful, moving film. Loved every minute.", "Dreadful. Boring plot and awful acting.", ""]
    scores = classifier.score(texts)
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert ((0 <= scores) & (scores <= 1)).all()
    assert scores[0] > 0.8 > 0.2 > scores[1]
    np.testing.assert_array_equal(classifier(texts), scores)
    assert classifier.score([]).shape == (0,)


def test_scores_match_sklearn_directly_after_cleaning(classifier):
    raw = ["Great<br /><br />film", 'He said \\"awful\\"']
    cleaned = ["Great\n\nfilm", 'He said "awful"']
    direct = classifier.pipeline.predict_proba(cleaned)[:, list(classifier.pipeline.classes_).index(1)]
    np.testing.assert_allclose(classifier.score(raw), direct, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("texts", "match"), [("just one string", "list of texts"), (["ok", 3], r"texts\[1\] is a int")]
)
def test_score_bad_input(classifier, texts, match):
    with pytest.raises(RewardError, match=match):
        classifier.score(texts)


def test_cached_classifier_is_reused_and_prints_accuracy(
    imdb_path, reward_cache, classifier, monkeypatch, capsys
):
    assert len(_entries(reward_cache)) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been used")

    monkeypatch.setattr(reward_mod, "train_classifier", no_training)
    again = load_reward("classifier", data_path=imdb_path, cache_dir=reward_cache)
    assert f"test accuracy {classifier.accuracy:.4f}" in capsys.readouterr().out
    texts = ["fine film", "terrible film"]
    np.testing.assert_array_equal(again.score(texts), classifier.score(texts))


def _entries(cache) -> list:
    """The finished classifier entries under a cache root (folders with a manifest)."""
    return [p for p in (cache / "reward").iterdir() if (p / "manifest.json").is_file()]


def test_reloaded_classifier_scores_exactly_like_the_trained_one(imdb_path, tmp_path):
    from tdpo_lab.core.data import clean_text

    train, test = load_imdb("train", imdb_path).select(range(400)), load_imdb("test", imdb_path)
    trained, accuracy = reward_mod.train_classifier(train, test)
    reward_mod.save_classifier(trained, accuracy, len(test), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.json", "classifier.npz"]
    reloaded, accuracy_again, n_test = reward_mod.read_classifier(tmp_path)
    assert (accuracy_again, n_test) == (accuracy, len(test))
    texts = [clean_text(t) for t in test["text"]] + ["", "great great film", "awful"]
    np.testing.assert_array_equal(reloaded.predict_proba(texts), trained.predict_proba(texts))
    np.testing.assert_array_equal(reloaded.predict(texts), trained.predict(texts))


@pytest.fixture
def subset_folder(imdb_path, tmp_path):
    """An IMDb folder with 300 train and 200 test reviews: trains in well under a second."""
    folder = tmp_path / "subset"
    folder.mkdir()
    pd.read_parquet(imdb_path / "train.parquet").iloc[:300].to_parquet(folder / "train.parquet")
    pd.read_parquet(imdb_path / "test.parquet").iloc[:200].to_parquet(folder / "test.parquet")
    return folder


@pytest.mark.filterwarnings("ignore:the reward classifier's test accuracy")
def test_cache_key_follows_the_data(imdb_path, subset_folder, classifier, tmp_path, capsys, monkeypatch):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(classifier.path, cache / "reward" / classifier.path.name)
    with pytest.warns(UserWarning, match="below 0.85"):  # 300 reviews are too few for a good judge
        small = load_reward("classifier", data_path=subset_folder, cache_dir=cache)
    assert "test accuracy" in capsys.readouterr().out
    assert small.path != classifier.path and (small.path / "manifest.json").is_file()
    monkeypatch.setattr(reward_mod, "train_classifier", None)  # from here on, training would crash
    assert load_reward("classifier", data_path=imdb_path, cache_dir=cache).accuracy == classifier.accuracy
    assert load_reward("classifier", data_path=subset_folder, cache_dir=cache).accuracy == small.accuracy
    assert len(_entries(cache)) == 2


@pytest.mark.filterwarnings("ignore:the reward classifier's test accuracy")
def test_damaged_cache_is_rebuilt(subset_folder, tmp_path):
    with pytest.warns(UserWarning, match="below 0.85"):
        first = load_reward("classifier", data_path=subset_folder, cache_dir=tmp_path / "cache")
    (first.path / "classifier.npz").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"classifier\.npz is truncated or altered"):
        rebuilt = load_reward("classifier", data_path=subset_folder, cache_dir=tmp_path / "cache")
    assert rebuilt.accuracy == first.accuracy
    leftovers = [p for p in first.path.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers  # the atomic write removed its temporary folder


def test_default_cache_root_is_the_environment(imdb_path, tmp_cache, classifier, reward_cache):
    import shutil

    shutil.copytree(classifier.path, tmp_cache / "reward" / classifier.path.name)  # skip retraining
    r = load_reward("classifier", data_path=imdb_path)
    assert r.path.parent == tmp_cache / "reward"


def test_get_reward_uses_the_config(imdb_path, reward_cache, classifier):
    cfg = load_config("tiny", fast=True, data_path=str(imdb_path), cache_dir=str(reward_cache))
    r = get_reward(cfg)
    assert isinstance(r, ClassifierReward) and r.path == classifier.path


def test_missing_data_is_a_data_error(tmp_path):
    from tdpo_lab.core.data import DataError

    with pytest.raises(DataError, match="does not exist"):
        load_reward("classifier", data_path=tmp_path / "absent", cache_dir=tmp_path)


# --- hub-style classifiers, offline through a saved folder ------------------------------------------
@pytest.fixture
def sentiment_folder(tiny_tokenizer, tmp_path):
    """A tiny 2-label GPT-2 classifier saved with save_pretrained, like a hub model on disk."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # make the two classes clearly differ
    model.save_pretrained(tmp_path / "clf")
    tiny_tokenizer.save_pretrained(tmp_path / "clf")
    return tmp_path / "clf", model


def test_pipeline_reward_from_folder_matches_the_model(sentiment_folder, tiny_tokenizer):
    folder, model = sentiment_folder
    reward = load_reward(str(folder), device="cpu", batch_size=2)
    assert isinstance(reward, PipelineReward) and reward.positive_label == "POSITIVE"
    texts = ["A fine film.", "Awful, truly awful and long.", "ok", "Mixed feelings about this one, really."]
    scores = reward.score(texts)
    assert scores.dtype == np.float64 and scores.shape == (4,)
    assert ((0 <= scores) & (scores <= 1)).all()
    # Reference: one text at a time (no padding), softmax over the two logits, column of POSITIVE.
    with torch.no_grad():
        expected = [
            model(**tiny_tokenizer(t, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for t in texts
        ]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert reward.score([]).shape == (0,)


def test_pipeline_reward_truncates_long_texts(sentiment_folder):
    folder, _ = sentiment_folder
    reward = load_reward(str(folder), device="cpu")
    assert reward.max_length == 64  # the position table, not the tokenizer's 1024
    scores = reward.score(["word " * 500, "short"])
    assert scores.shape == (2,) and np.isfinite(scores).all()


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({0: "NEGATIVE", 1: "POSITIVE"}, "POSITIVE"),
        ({0: "neg", 1: "pos"}, "pos"),
        ({0: "LABEL_0", 1: "LABEL_1"}, "LABEL_1"),
        ({0: "negative", 1: "happy"}, "happy"),
    ],
)
def test_positive_label(labels, expected):
    assert positive_label(labels) == expected


@pytest.mark.parametrize("labels", [{0: "bad", 1: "good"}, {0: "1 star", 1: "2 stars", 2: "3 stars"}])
def test_positive_label_ambiguous(labels):
    with pytest.raises(RewardError, match="cannot tell which label is positive"):
        positive_label(labels)


def test_unknown_kind_offline_is_clear(tmp_path):
    with pytest.raises(
        RewardError, match=r"'no-such-org/no-such-model' is neither 'classifier'.*HF_HUB_OFFLINE"
    ):
        load_reward("no-such-org/no-such-model")
    with pytest.raises(RewardError, match="neither 'classifier' nor a loadable"):
        load_reward(str(tmp_path))  # a folder without a model


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"kind": ""}, "reward kind"), ({"batch_size": 0}, "batch_size")]
)
def test_load_reward_bad_arguments(kwargs, match):
    with pytest.raises(RewardError, match=match):
        load_reward(**kwargs)
