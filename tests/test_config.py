"""tdpo_lab.config: profiles, overrides, the fast switch, validation errors that name the key, cache keys."""

from __future__ import annotations

import dataclasses

import pytest

from tdpo_lab.config import (
    FAST_OVERRIDES,
    PROFILE_DEFAULTS,
    Config,
    ConfigError,
    config_from_file,
    load_config,
)
from tdpo_lab.methods import method_names


@pytest.fixture(autouse=True)
def _no_fast_env(monkeypatch):
    # A developer's shell may export TDPO_LAB_FAST; these tests set it explicitly where they need it.
    monkeypatch.delenv("TDPO_LAB_FAST", raising=False)


def test_tiny_profile_is_the_offline_default():
    cfg = load_config()
    assert cfg == load_config("tiny")
    assert (cfg.profile, cfg.fast) == ("tiny", False)
    assert (cfg.tokenizer, cfg.model, cfg.reward, cfg.vocab_size) == ("bpe", "scratch", "classifier", 8192)
    assert cfg.method in method_names()


def test_gpt2_profile_applies_its_defaults():
    cfg = load_config("gpt2")
    for key, value in PROFILE_DEFAULTS["gpt2"].items():
        assert getattr(cfg, key) == value, key
    assert (cfg.tokenizer, cfg.model) == ("gpt2", "gpt2")


def test_unknown_profile_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown profile 'large'.*tiny.*gpt2"):
        load_config("large")


def test_overrides_are_applied_and_ints_become_floats():
    cfg = load_config("tiny", beta=0.2, n_layer=3, method="dpo")
    assert (cfg.beta, cfg.n_layer, cfg.method) == (0.2, 3, "dpo")
    cfg = load_config("tiny", beta=1)
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", bta=0.2)
    message = str(info.value)
    assert "'bta'" in message and "did you mean 'beta'" in message


def test_unknown_key_without_close_match_is_still_named():
    with pytest.raises(ConfigError, match="'zzzzzz'"):
        load_config("tiny", zzzzzz=1)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("n_layer", "4", "int"),
        ("n_layer", 4.0, "int"),
        ("n_layer", True, "int"),  # bool is an int subclass in Python; the config refuses it
        ("beta", "0.1", "float"),
        ("fast", 1, "bool"),
        ("method", 3, "str"),
    ],
)
def test_wrong_type_names_the_key_and_type(key, value, expected):
    # replace() because load_config's own ``fast`` argument is a switch that it turns into a bool itself.
    with pytest.raises(ConfigError) as info:
        load_config("tiny").replace(**{key: value})
    assert f"'{key}'" in str(info.value) and expected in str(info.value)
    if key != "fast":
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config("tiny", **{key: value})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"beta": 0.0}, "beta"),
        ({"alpha": -0.1}, "alpha"),
        ({"lam": 1.5}, "lam"),
        ({"method": "ppo"}, "method"),
        ({"device": "tpu"}, "device"),
        ({"importance_span": "prompt"}, "importance_span"),
        ({"n_embd": 30, "n_head": 4}, "n_embd"),
        ({"prefix_min_tokens": 9, "prefix_max_tokens": 8}, "prefix_min_tokens"),
        ({"samples_per_prompt": 1}, "samples_per_prompt"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"train_steps": -1}, "train_steps"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("tiny", **overrides)


def test_profile_must_be_known_everywhere():
    with pytest.raises(ConfigError, match="'profile'"):
        load_config("tiny").replace(profile="large")


def test_fast_switch_from_environment(monkeypatch):
    assert load_config().fast is False
    monkeypatch.setenv("TDPO_LAB_FAST", "1")
    cfg = load_config()
    assert cfg.fast is True
    for key, value in FAST_OVERRIDES.items():
        assert getattr(cfg, key) == value, key
    assert load_config(fast=False).fast is False  # an explicit argument beats the environment
    monkeypatch.setenv("TDPO_LAB_FAST", "0")
    assert load_config().fast is False


def test_fast_shrinks_sizes_and_overrides_still_win():
    slow, fast = load_config("tiny", fast=False), load_config("tiny", fast=True)
    for key in (
        "n_layer",
        "n_embd",
        "vocab_size",
        "sft_steps",
        "train_steps",
        "eval_prompts",
        "pair_prompts",
    ):
        assert getattr(fast, key) < getattr(slow, key), key
    assert load_config("tiny", fast=True, n_embd=128).n_embd == 128


def test_replace_returns_a_validated_copy():
    cfg = load_config()
    other = cfg.replace(beta=0.3)
    assert other.beta == 0.3 and cfg.beta == 0.1
    with pytest.raises(ConfigError, match="'bta'"):
        cfg.replace(bta=0.3)
    with pytest.raises(ConfigError, match="'beta'"):
        cfg.replace(beta=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.5  # type: ignore[misc]


def test_cache_path_follows_field_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TDPO_LAB_CACHE", str(tmp_path / "env"))
    assert load_config().cache_path == tmp_path / "env"
    assert load_config(cache_dir=str(tmp_path / "field")).cache_path == tmp_path / "field"


def test_recipe_file_round_trip_and_bad_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("profile: tiny\nmethod: tdpo1\nbeta: 0.2\n")
    cfg = config_from_file(recipe, seed=3)
    assert (cfg.method, cfg.beta, cfg.seed) == ("tdpo1", 0.2, 3)
    recipe.write_text("bettta: 0.2\n")
    with pytest.raises(ConfigError, match="'bettta'"):
        config_from_file(recipe)


def test_every_field_has_a_supported_type():
    # _validate only knows int/float/str/bool: a new field of another type would silently pass validation.
    for field in dataclasses.fields(Config):
        annotation = field.type if isinstance(field.type, str) else field.type.__name__
        assert annotation in {"int", "float", "str", "bool"}, field.name


def test_default_seeds_three_on_the_full_tiny_profile_one_elsewhere():
    from tdpo_lab.config import default_seeds

    assert default_seeds(load_config("tiny", fast=False)) == [0, 1, 2]
    assert default_seeds(load_config("tiny", fast=True, seed=4)) == [4]
    assert default_seeds(load_config("gpt2", fast=False)) == [0]
