"""Where a chapter runs: the default profile follows the machine, an explicit one wins; Drive is opt-in."""

from __future__ import annotations

import os

import pytest

from tdpo_lab.config import ConfigError
from tdpo_lab.course.colab import drive_cache, resolve_profile


def test_default_profile_is_gpt2_with_a_gpu_and_tiny_without():
    profile, why = resolve_profile(None, cuda=True)
    assert profile == "gpt2" and "GPU" in why
    profile, why = resolve_profile(None, cuda=False)
    assert profile == "tiny" and "no CUDA GPU" in why


def test_explicit_profile_always_wins_and_is_checked():
    assert resolve_profile("tiny", cuda=True)[0] == "tiny"
    assert resolve_profile("gpt2", cuda=False)[0] == "gpt2"
    with pytest.raises(ConfigError, match="unknown profile 'gtp2'"):
        resolve_profile("gtp2")


def test_this_machine_resolves_by_its_own_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_profile(None)[0] == "tiny"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile(None)[0] == "gpt2"


def test_drive_cache_is_opt_in_and_colab_only(monkeypatch):
    monkeypatch.setenv("TDPO_LAB_CACHE", "/somewhere")
    assert drive_cache(False) is None
    assert drive_cache(True) is None  # not on Colab: nothing mounted, cache unchanged
    assert os.environ["TDPO_LAB_CACHE"] == "/somewhere"
