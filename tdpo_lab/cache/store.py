"""One way to cache a product: a key, a folder, a lock, atomic files and a manifest checked on every load.

A cached product (the tokenizer, the reward classifier, the SFT model, the pair table, the AttentionPO
judge weights, the reference evaluation) is a :class:`Stage`: a name, the configuration fields it depends
on, the stages upstream of it and a format version. Its key hashes all of these plus the upstream keys,
so a change anywhere upstream reaches every product downstream. An :class:`Entry` is one keyed product on
disk, ``<cache root>/<stage name>/<key>/``; :func:`fetch` loads it, or builds it under an exclusive lock.

The manifest (``manifest.json``: each file's size and sha256) is written last and checked before every
load, so a build that died half-way, a truncated file or a flipped byte is never used: the entry is
rebuilt with a one-line :class:`CacheWarning` naming the file, or, where this call cannot rebuild it, a
:class:`CacheError` names the file and says what to do. Only JSON, parquet, safetensors and npz files are
written: nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from tdpo_lab.core.distributed import broadcast, main_process_lock
from tdpo_lab.core.utils import exclusive_lock, file_sha256, stable_hash, write_json

MANIFEST = "manifest.json"
T = TypeVar("T")


class CacheError(RuntimeError):
    """A cache entry is damaged and this call cannot rebuild it (the message names the file and the fix)."""


class CacheWarning(UserWarning):
    """A damaged cache entry was found and is being rebuilt (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """A cached product: folder name, the Config fields it depends on, its upstream stages, format version.

    ``extra`` holds constants of the code that builds it (a prompt template, hyper-parameters); bump
    ``version`` when the stored format changes, so an old entry is never read by new code. ``late`` pairs
    fields added after entries were built with the value those entries had: a field enters the key only when
    it has another value, so the existing entries keep their keys.
    """

    name: str
    fields: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    version: int = 1
    extra: object = None
    late: tuple[tuple[str, object], ...] = ()

    def key(self, values: Mapping[str, object], upstream_keys: Mapping[str, str]) -> str:
        """16 hex digits over the field values, the upstream keys, the version and ``extra``."""
        missing = set(self.upstream) - set(upstream_keys)
        if missing:
            raise ValueError(f"stage {self.name!r} needs the key(s) of {sorted(missing)} upstream")
        payload = {
            "stage": self.name,
            "version": self.version,
            "fields": {name: values[name] for name in self.fields},
            "upstream": {name: upstream_keys[name] for name in self.upstream},
            "extra": self.extra,
        }
        late = {name: values[name] for name, default in self.late if values[name] != default}
        if late:
            payload["late"] = late
        return stable_hash(payload)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One keyed product on disk: ``folder = root/stage/key``; its lock lives in ``root/.locks``.

    The lock sits outside the folder because some builders replace the folder as a whole
    (``atomic_path``), which would pull a lock file inside it away from under a waiting process.
    """

    root: Path
    stage: str
    key: str

    @property
    def folder(self) -> Path:
        return self.root / self.stage / self.key

    def lock(self):
        """Exclusive lock of this entry (a second process asking for it waits, then finds it built)."""
        return exclusive_lock(self.root / ".locks" / self.stage / f"{self.key}.lock")

    def files(self) -> list[str]:
        """The product's files, relative to the folder; names starting with "." (temporaries) are not."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.rglob("*")):
            rel = path.relative_to(self.folder)
            if (
                path.is_file()
                and rel.as_posix() != MANIFEST
                and not any(p.startswith(".") for p in rel.parts)
            ):
                found.append(rel.as_posix())
        return found

    @property
    def sealed(self) -> bool:
        """Whether the build finished (the manifest is written last)."""
        return (self.folder / MANIFEST).is_file()

    def seal(self) -> None:
        """Write the manifest (atomically, last): the size and sha256 of every file of the product."""
        listing = {
            name: {"bytes": (self.folder / name).stat().st_size, "sha256": file_sha256(self.folder / name)}
            for name in self.files()
        }
        write_json(self.folder / MANIFEST, {"stage": self.stage, "key": self.key, "files": listing})

    def problem(self) -> str | None:
        """``None`` if every file matches the manifest, else what is wrong, naming the file."""
        manifest = self.folder / MANIFEST
        try:
            listing = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{manifest} is unreadable ({type(exc).__name__}: {exc})"
        for name, expected in listing.items():
            path = self.folder / name
            if not path.is_file():
                return f"{path} is missing"
            size = path.stat().st_size
            if size != expected["bytes"]:
                return f"{path} is truncated or altered ({size} bytes, the manifest says {expected['bytes']})"
            if file_sha256(path) != expected["sha256"]:
                return f"{path} is corrupt (its sha256 differs from the manifest's)"
        return None

    def discard(self) -> None:
        """Remove the product (manifest first, so a crash here leaves an unsealed, rebuildable folder)."""
        (self.folder / MANIFEST).unlink(missing_ok=True)
        if self.folder.is_dir():
            for child in self.folder.iterdir():
                if child.name.startswith("."):
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _try_load(entry: Entry, load: Callable[[Path], T]) -> tuple[T | None, str | None]:
    """(product, None), or (None, the problem); an unsealed entry gives (None, "")."""
    if not entry.sealed:
        return None, ""
    problem = entry.problem()
    if problem is not None:
        return None, problem
    try:
        return load(entry.folder), None
    except Exception as exc:  # noqa: BLE001 - files intact but unreadable (e.g. another library version)
        return None, f"{entry.folder} could not be loaded ({type(exc).__name__}: {exc})"


def fetch(
    entry: Entry,
    build: Callable[[Path], bool | None] | None,
    load: Callable[[Path], T],
    *,
    what: str,
    how: str = "",
) -> T | None:
    """Load ``entry``, building it first (under its lock) when it is missing, unfinished or damaged.

    ``build(folder)`` writes the product's files into ``folder`` (which may hold an unfinished earlier
    attempt, e.g. a checkpoint to resume from); returning ``False`` means it stopped early on purpose:
    the entry stays unsealed and ``fetch`` returns ``None``. ``build=None`` means this call cannot
    build: a missing or damaged entry is a :class:`CacheError` that says ``how`` to build it.
    """
    product, problem = _try_load(entry, load)
    if problem is None:
        return product
    if build is None:
        state = problem or f"{entry.folder} is not built (no {MANIFEST})"
        raise CacheError(f"{what}: {state}. {how or 'Build it first.'}")
    with entry.lock():
        product, problem = _try_load(entry, load)  # another process may have built it while we waited
        if problem is None:
            return product
        if problem:  # damaged, not merely absent or unfinished: say so, start over
            warnings.warn(f"{what}: {problem}; rebuilding it", CacheWarning, stacklevel=3)
            entry.discard()
        entry.folder.mkdir(parents=True, exist_ok=True)
        if build(entry.folder) is False:
            return None
        entry.seal()
        product, problem = _try_load(entry, load)
    if problem is not None:
        raise CacheError(
            f"{what}: built just now, yet {problem}. Delete {entry.folder} and run again; "
            "if it happens again the disk or the library versions are at fault"
        )
    return product


def fetch_together(
    accelerator, entry: Entry, build: Callable[[Path], bool | None], load: Callable[[Path], T], *, what: str
) -> T | None:
    """:func:`fetch` for a product that every process of a multi-process job builds together (the SFT model).

    The main process holds the entry's lock and decides (loaded, or to build: a damaged entry is discarded
    first, with the same warning); every process then runs ``build(folder)`` (it trains with DDP inside) and
    the main process seals the entry. Every process must call it at the same point.
    """

    main = accelerator.is_main_process
    with main_process_lock(accelerator, entry.lock()):
        problem = _try_load(entry, load)[1] if main else None
        if main and problem:
            warnings.warn(f"{what}: {problem}; rebuilding it", CacheWarning, stacklevel=3)
            entry.discard()
        if main:
            entry.folder.mkdir(parents=True, exist_ok=True)
        if broadcast(accelerator, problem is not None):
            finished = build(entry.folder) is not False
            accelerator.wait_for_everyone()  # every process is done with the folder before it is sealed
            if main and finished:
                entry.seal()
            if not finished:
                return None
    product, problem = _try_load(entry, load)
    if problem is not None:
        raise CacheError(f"{what}: built just now, yet {problem}. Delete {entry.folder} and run again")
    return product
