"""The Hugging Face hub, offline first: is it usable, and ``from_pretrained`` that never hangs without it.

Every stage that can come from the hub (data, tokenizer, model, reward) must behave the same with and
without it, so they all ask these two helpers: :func:`hub_status` (reachable, or why not) and
:func:`from_pretrained_offline_first` (a folder, the local cache, then the hub only if it is reachable).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

__all__ = ["HubUnavailableError", "from_pretrained_offline_first", "hub_status"]


class HubUnavailableError(OSError):
    """A hub name was asked for, it is not in the local cache and the hub cannot be reached."""


_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_status(timeout: float = 3.0) -> str | None:
    """``None`` when the Hugging Face hub looks reachable, else a short reason why not.

    The reason is an offline switch (``HF_HUB_OFFLINE=1`` and friends) or the failure of one TCP
    connection to the hub endpoint (or to the HTTPS proxy, if one is configured) within ``timeout``
    seconds. Why probe at all: ``huggingface_hub`` retries an unreachable host with back-off for
    minutes per file, so an offline machine would hang instead of falling back. The probe result is
    cached per process; the offline switches are read on every call.
    """
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
    return _probe(proxy or endpoint, float(timeout))


@functools.lru_cache(maxsize=16)
def _probe(url: str, timeout: float) -> str | None:
    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"cannot connect to {host}:{port} ({exc})")

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f} s"


def from_pretrained_offline_first(loader: Callable, name: str, *, what: str, **kwargs):
    """Call ``loader(name, **kwargs)`` (a ``from_pretrained``) from a folder, the local cache, or the hub.

    Order: an existing folder is loaded as is; otherwise the local Hugging Face cache is tried with
    ``local_files_only=True`` (fast, no network); only if that fails and :func:`hub_status` says the
    hub is reachable is the hub asked. Raises :class:`HubUnavailableError` naming ``what`` otherwise.
    """
    if Path(name).expanduser().is_dir():
        return loader(str(Path(name).expanduser()), **kwargs)
    try:
        return loader(name, local_files_only=True, **kwargs)
    except Exception as cached_error:  # noqa: BLE001 - any failure means "not usable from the cache"
        reason = hub_status()
        if reason is not None:
            raise HubUnavailableError(
                f"{what} {name!r} is not a local folder, is not in the local Hugging Face cache, and the hub "
                f"cannot be used ({reason}). Pass a folder saved with save_pretrained, run once with the hub "
                f"reachable to fill the cache, or pick the offline option. Cache lookup said: {cached_error}"
            ) from cached_error
    return loader(name, **kwargs)
