"""Where a chapter runs: the profile it defaults to, and Colab's optional Drive-backed cache.

Each chapter's parameters cell leaves ``profile = None``; :func:`resolve_profile` then picks ``"gpt2"`` (the
hub's GPT-2, the full IMDb, the RoBERTa sentiment judge) when a CUDA GPU is present, as on a Colab GPU
runtime, and ``"tiny"`` (everything offline, trained from scratch on a CPU) otherwise. An explicit value
always wins. :func:`drive_cache` keeps the kit's cache on Google Drive, so that the SFT model, the pairs
and the runs built by one chapter (or one Colab session) are found by the next.
"""

from __future__ import annotations

import os
import sys

from tdpo_lab.config import PROFILES, ConfigError

DRIVE_MOUNT = "/content/drive"
DRIVE_CACHE = "/content/drive/MyDrive/tdpo_lab_cache"


def resolve_profile(profile: str | None = None, *, cuda: bool | None = None) -> tuple[str, str]:
    """``(profile, why)``: ``profile`` itself when given, else ``"gpt2"`` with a CUDA GPU and ``"tiny"``.

    ``cuda`` overrides the detection (tests); by default ``torch.cuda.is_available()``.
    """
    if profile is not None:
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)} or None")
        return profile, "set in the parameters cell"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return "gpt2", "a CUDA GPU is present: the hub's gpt2, the full IMDb and the RoBERTa sentiment judge"
    return "tiny", "no CUDA GPU: the offline profile (a small GPT-2 trained from scratch on a CPU)"


def drive_cache(enabled: bool, folder: str = DRIVE_CACHE) -> str | None:
    """On Colab with ``enabled``: mount Google Drive and point ``TDPO_LAB_CACHE`` at ``folder``.

    Returns the cache folder it set, or None when it did nothing (not enabled, or not on Colab: the cache
    stays ``$TDPO_LAB_CACHE`` or ``~/.cache/tdpo_lab``). Call it before the chapter builds its Config.
    """
    if not enabled:
        return None
    if "google.colab" not in sys.modules:
        print("use_drive=True only applies on Colab; the cache stays where it is")
        return None
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(DRIVE_MOUNT)
    os.makedirs(folder, exist_ok=True)
    os.environ["TDPO_LAB_CACHE"] = folder
    print(f"cache on Google Drive: {folder} (SFT model, pairs and runs are shared across sessions)")
    return folder
