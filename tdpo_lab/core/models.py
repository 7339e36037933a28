"""Causal language models: a small GPT-2 built from the configuration, a hub name / local folder, or a GGUF file.

Every model leaves here with dropout switched off in its modules: the methods compare log-probabilities of
the policy and the reference on the same tokens, and dropout noise would make those comparisons (and the
tests that check ``loss == ln 2`` at pi_theta = pi_ref) irreproducible. ``model.config`` keeps the model's
own dropout values, so a saved copy (:mod:`tdpo_lab.core.export`) fine-tuned elsewhere gets its usual dropout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from transformers.utils import logging as hf_logging

from tdpo_lab.core.hub import HubUnavailableError, from_pretrained_offline_first
from tdpo_lab.core.smol import GGUFError, is_gguf, loadable_gguf

_TRUE = {"1", "true", "yes", "on"}


def configure_progress_bars(environ: Mapping[str, str] = os.environ) -> bool:
    """transformers' per-load/per-save bars off; the hub's download bars on unless the environment says none.

    The kit shows its own progress bars, and transformers' "Loading weights" bar on every load only clutters
    notebooks; but a download of hundreds of MB from the hub deserves one. ``TQDM_DISABLE`` or
    ``HF_HUB_DISABLE_PROGRESS_BARS`` set to 1/true/yes/on (CI) switch the download bars off too. Called on
    import; returns whether download bars are shown.
    """
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.utils as hub_utils

    hf_logging.disable_progress_bar()  # transformers' own bars; this switches the hub's bars off as well ...
    switches = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    if any(environ.get(var, "").strip().lower() in _TRUE for var in switches):
        return False
    if hub_constants.HF_HUB_DISABLE_PROGRESS_BARS is True:  # read by the hub at import; it has priority
        return False
    hub_utils.enable_progress_bars()  # ... so the downloads' bars are switched back on
    return True


configure_progress_bars()


class ModelError(ValueError):
    """A model cannot be built or loaded as asked."""


def _dtype_keyword() -> str:
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; 5.x only documents ``dtype``.
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ModelError(f"unknown dtype {dtype!r}; use e.g. torch.float32, 'float32' or 'bfloat16'")
    return value


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Switch dropout off in the modules of ``model``, leaving ``model.config`` as it is; returns ``model``.

    Sets ``p = 0`` in every ``torch.nn.Dropout`` and 0 in every float attribute of a module whose name holds
    "dropout" (Llama-style attention reads ``self.attention_dropout``, copied from the config when built).
    The config is not touched, so ``save_pretrained`` writes the model's real dropout values.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def small_gpt2_config(cfg, vocab_size: int, eos_token_id: int):
    """``GPT2Config`` of the from-scratch model: ``cfg.n_layer`` x ``cfg.n_embd`` with ``cfg.n_head`` heads.

    Context ``cfg.n_positions``; bos = eos = pad = ``eos_token_id`` (GPT-2 convention); GPT-2's own dropout
    values (0.1), which :func:`build_model` switches off in the modules (the config keeps them).
    """
    from transformers import GPT2Config

    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ModelError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if not isinstance(eos_token_id, int) or not 0 <= eos_token_id < vocab_size:
        raise ModelError(f"eos_token_id must be an int in [0, {vocab_size}), got {eos_token_id!r}")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def load_model(name_or_path: str | os.PathLike, *, attn_implementation: str | None = None, dtype=None):
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained``: a folder, the local cache, the hub, or GGUF.

    ``attn_implementation="eager"`` makes ``output_attentions=True`` return attention maps (AttentionPO);
    ``dtype`` (``torch.float32``, ``"bfloat16"``, ...) sets the parameter dtype. Dropout is switched off
    (:func:`disable_dropout`; the config keeps its values). The
    hub is only asked when the name is not cached and a quick probe says it is reachable. A GGUF file
    (``"pkg:<package>/<file>"`` or a path ending in ``.gguf``, :mod:`tdpo_lab.core.smol`) is read with
    ``from_pretrained(folder, gguf_file=file)`` and dequantised into a plain model that ``save_pretrained`` writes.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs[_dtype_keyword()] = _as_dtype(dtype)
    name = str(name_or_path)
    if is_gguf(name):
        return disable_dropout(_load_gguf(name, kwargs))
    try:
        model = from_pretrained_offline_first(
            AutoModelForCausalLM.from_pretrained, name, what="model", **kwargs
        )
    except HubUnavailableError:
        raise
    except (OSError, ValueError) as exc:  # no weights / no config.json / unknown architecture
        raise ModelError(
            f"cannot load a causal LM from {name!r} ({exc}); pass a hub name such as 'gpt2' or a folder written by "
            "save_pretrained"
        ) from exc
    return disable_dropout(model)


def _load_gguf(name: str, kwargs: dict):
    """A GGUF causal LM, dequantised to a plain (serialisable) model; errors say what to install."""
    from transformers import AutoModelForCausalLM

    try:
        folder, file = loadable_gguf(name)
    except GGUFError as exc:
        raise ModelError(str(exc)) from exc
    try:  # transformers 5 can keep GGUF blocks quantised; ask for plain float weights (4.x always dequantises)
        from transformers import GgufConfig

        kwargs = {"quantization_config": GgufConfig(dequantize=True), **kwargs}
    except ImportError:
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from the GGUF file {folder / file} ({exc})") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if (
        quantizer is not None
    ):  # weights are plain tensors now: drop the GGUF config that blocks save_pretrained
        quantizer.remove_quantization_config(model)
    return model


def build_model(cfg, tokenizer, *, attn_implementation: str | None = None):
    """The policy/reference architecture of ``cfg`` (on CPU; move it with ``.to(device)``).

    ``cfg.model == "scratch"``: a ``GPT2LMHeadModel`` from :func:`small_gpt2_config` with
    ``len(tokenizer)`` vocabulary entries, initialised from ``cfg.data_seed`` without touching the global RNG
    (the same seed always gives the same weights). Otherwise :func:`load_model` of ``cfg.model`` (a hub
    name, a folder or a GGUF file), checked to cover every token id of ``tokenizer``.
    """
    from transformers import AutoModelForCausalLM

    if tokenizer.eos_token_id is None:
        raise ModelError(
            "the tokenizer has no EOS token; load it with tdpo_lab.products.tokenizer.get_tokenizer(cfg)"
        )
    if cfg.model != "scratch":
        model = load_model(cfg.model, attn_implementation=attn_implementation)
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ModelError(
                f"model {cfg.model!r} has {rows} embedding rows but the tokenizer has {len(tokenizer)} entries; "
                "use the tokenizer the model was trained with"
            )
        return model
    config = small_gpt2_config(cfg, len(tokenizer), tokenizer.eos_token_id)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.data_seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return disable_dropout(model)
