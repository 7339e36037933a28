"""tdpo_lab.core.hub: the offline switches, the reachability probe, and from_pretrained's lookup order."""

from __future__ import annotations

import pytest

from tdpo_lab.core import hub
from tdpo_lab.core.hub import HubUnavailableError, from_pretrained_offline_first, hub_status


def test_hub_status_offline_switch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in hub_status()


def test_hub_status_unreachable_endpoint(monkeypatch):
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    hub._probe.cache_clear()
    try:
        reason = hub_status(timeout=2.0)
    finally:
        hub._probe.cache_clear()
    assert reason is not None and "127.0.0.1:9" in reason


def test_from_pretrained_offline_first_order(tmp_path, monkeypatch):
    calls = []

    def cached_loader(name, **kwargs):
        calls.append((name, kwargs))
        return "model"

    assert from_pretrained_offline_first(cached_loader, "org/name", what="model", x=1) == "model"
    assert calls == [("org/name", {"local_files_only": True, "x": 1})]  # cache first, no network

    calls.clear()
    assert from_pretrained_offline_first(cached_loader, str(tmp_path), what="model") == "model"
    assert calls == [(str(tmp_path), {})]  # a folder is loaded as is

    def uncached_loader(name, **kwargs):
        calls.append((name, kwargs))
        if kwargs.get("local_files_only"):
            raise OSError("not in cache")
        return "from hub"

    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"model 'org/name'.*HF_HUB_OFFLINE"):
        from_pretrained_offline_first(uncached_loader, "org/name", what="model")
    assert len(calls) == 1  # the hub was never asked

    calls.clear()
    monkeypatch.setattr(hub, "hub_status", lambda timeout=3.0: None)  # pretend the hub is reachable
    assert from_pretrained_offline_first(uncached_loader, "org/name", what="model") == "from hub"
    assert calls[-1] == ("org/name", {})
