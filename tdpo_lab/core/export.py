"""Saving a trained model as a folder that describes itself: weights, tokenizer, sampling settings and a card.

Both models the kit trains leave through :func:`save_model`: the SFT model pi_ref (:mod:`tdpo_lab.products.sft`) and
a run's policy (:meth:`tdpo_lab.runs.rundir.RunDir.save_policy`). The folder needs nothing from the kit::

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.generate(**tokenizer("This movie", return_tensors="pt"))  # samples as the kit's evaluation did

It holds:

- ``config.json``: the model's own configuration, its dropout values included (training switches dropout
  off in the modules, never in the config: :func:`tdpo_lab.core.models.disable_dropout`);
- the tokenizer, its ``model_max_length`` equal to the model's context (``n_positions`` or
  ``max_position_embeddings``), so long inputs are measured against what the model can read;
- ``generation_config.json``: how the model was sampled (:func:`generation_config`), which ``generate`` uses
  when called without sampling arguments;
- ``README.md``: a short model card (:func:`model_card`): method, beta and the method's knobs, data,
  training, metrics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from tdpo_lab.core.utils import atomic_path

__all__ = ["CARD", "generation_config", "model_card", "model_positions", "save_model"]

CARD = "README.md"  # the name the Hugging Face hub shows as a model's card
KINDS = ("sft", "policy")


class MethodInfo(NamedTuple):
    """What a model card says of a policy's method: its name, label and the knobs it reads."""

    name: str
    label: str
    knobs: tuple[str, ...] = ()
    paper: str = ""


def model_positions(model) -> int | None:
    """The context length of ``model`` (GPT-2's ``n_positions``, Llama's ``max_position_embeddings``)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def generation_config(model, tokenizer, cfg: Mapping, *, kind: str = "policy"):
    """A ``GenerationConfig`` of the sampling the kit does with this model: pure sampling (temperature 1,
    top_k 0, top_p 1: every token drawn from the model's own distribution; docs/methods.md section 6).

    ``kind="policy"``: ``cfg["eval_max_new_tokens"]`` new tokens (the evaluation's samples); ``"sft"``:
    ``cfg["max_new_tokens"]`` (the samples ranked into preference pairs). ``top_k=0`` is written out on purpose:
    left unset, transformers fills it with 50. EOS and padding ids come from the tokenizer.
    """
    from transformers import GenerationConfig

    _check_kind(kind)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    new_tokens = cfg["eval_max_new_tokens"] if kind == "policy" else cfg["max_new_tokens"]
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=int(new_tokens),
        bos_token_id=getattr(model.config, "bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=pad,
    )


def save_model(
    model,
    tokenizer,
    folder: str | os.PathLike,
    cfg,
    *,
    kind: str = "policy",
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    method: MethodInfo | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` into ``folder`` atomically (the whole folder appears at once), with
    ``generation_config.json`` and the model card ``README.md``; return the folder.

    ``cfg``: the run's Config (or its dict); ``kind``: ``"sft"`` (pi_ref) or ``"policy"`` (a preference run);
    ``metrics``: columns of the card's metrics table, ``{column label: {metric: value}}``; ``method``: the
    policy's method as the card names it (its label and knobs; the config's method name alone without). Neither the model
    nor the tokenizer is changed: the tokenizer's ``model_max_length`` is set to the model's context for
    the save only.
    """
    _check_kind(kind)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    folder = Path(folder)
    positions = model_positions(model)
    declared = tokenizer.model_max_length
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        try:
            if positions:
                tokenizer.model_max_length = positions
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.model_max_length = declared
        # written after save_pretrained, which writes the model's own (default) generation config
        generation_config(model, tokenizer, cfg, kind=kind).save_pretrained(tmp)
        (tmp / CARD).write_text(
            model_card(cfg, kind=kind, metrics=metrics, positions=positions, method=method)
        )
    return folder


def model_card(
    cfg: Mapping,
    *,
    kind: str = "policy",
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    positions: int | None = None,
    method: MethodInfo | None = None,
) -> str:
    """The ``README.md`` of a saved model: what it is, how it was trained, its metrics, how to load it."""
    _check_kind(kind)
    if kind == "policy" and method is None:
        method = MethodInfo(cfg["method"], cfg["method"])
    method = method if kind == "policy" else None
    name = f"{method.label} policy" if method else "SFT reference policy (pi_ref)"
    tags = ["tdpo-lab", "text-generation", "imdb"] + (
        ["preference-optimization", method.name] if method else ["sft"]
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
        "",
        f"# {name}, trained with tdpo-lab",
        "",
    ]
    if method:
        lines += [
            f"A causal LM trained with **{method.label}**{f' ({method.paper})' if method.paper else ''} from the SFT reference pi_ref on",
            "preference pairs: review prefixes of IMDb, continuations sampled from pi_ref, ranked by a sentiment",
            "reward (the controlled-sentiment experiment of the DPO and TDPO papers).",
        ]
    else:
        lines += [
            "The reference policy pi_ref of the kit's experiments: a causal LM fine-tuned on IMDb reviews",
            "(next-token cross-entropy on packed blocks of cleaned review text).",
        ]
    lines += ["", "| setting | value |", "|---|---|"]
    for key, value in _settings(cfg, method, positions):
        lines.append(f"| {key} | {value} |")
    if metrics:
        columns = list(metrics)
        names = list(dict.fromkeys(k for column in metrics.values() for k in column))
        lines += ["", "## Metrics", "", "| metric | " + " | ".join(columns) + " |"]
        lines.append("|---" * (len(columns) + 1) + "|")
        for metric in names:
            cells = [_number(metrics[c].get(metric)) for c in columns]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Names as in the run folder's `metrics.jsonl` / `eval.jsonl` (tdpo-lab README, docs/methods.md):",
            "`reward` is the mean sentiment reward of pure samples, `kl_seq` the exact KL(pi_theta || pi_ref)",
            "of a sample summed over its tokens.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'out = model.generate(**tokenizer("This movie", return_tensors="pt"))  # generation_config.json',
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "`generation_config.json` holds the sampling the kit used (pure sampling: temperature 1, top_k 0,",
        "top_p 1). `config.json` keeps the model's own dropout values; tdpo-lab trains with dropout off.",
        "",
    ]
    return "\n".join(lines)


def _settings(cfg: Mapping, method, positions: int | None) -> list[tuple[str, str]]:
    if cfg.get("model", "scratch") == "scratch":
        model = "GPT-2 trained from scratch, " + ", ".join(
            f"{key} {cfg[key]}" for key in ("n_layer", "n_embd", "n_head", "n_positions")
        )
    else:
        model = f"`{cfg['model']}`" + (f", context {positions}" if positions else "")
    tokenizer = (
        f"byte-level BPE of {cfg['vocab_size']} entries trained on IMDb"
        if cfg.get("tokenizer") == "bpe"
        else f"`{cfg.get('tokenizer')}`"
    )
    rows = [
        ("profile", f"{cfg.get('profile')}" + (" (fast)" if cfg.get("fast") else "")),
        ("model", model),
        ("tokenizer", tokenizer),
        ("data", "IMDb reviews (`stanfordnlp/imdb` or a local copy in its schema)"),
    ]
    if method is None:
        rows += [
            (
                "SFT steps x batch",
                f"{cfg['sft_steps']} x {cfg['sft_batch_size']} blocks of {cfg['sft_block_size']} tokens",
            ),
            (
                "learning rate",
                f"{cfg['sft_lr']:g} (sft_warmup_steps {cfg['sft_warmup_steps']}, then cosine to 10%)",
            ),
            ("data seed", str(cfg.get("data_seed", 0))),
        ]
        return rows
    rows += [
        ("method", f"`{method.name}` ({method.label})"),
        ("beta", f"{cfg['beta']:g}"),
        *[(knob, _value(cfg.get(knob))) for knob in method.knobs],
        (
            "preference pairs",
            f"{cfg['pair_prompts']} prefixes x {cfg['samples_per_prompt']} samples of {cfg['max_new_tokens']} "
            f"tokens from pi_ref, ranked by `{cfg['reward']}`",
        ),
        ("steps x pairs per step", f"{cfg['train_steps']} x {cfg['batch_size']}"),
        (
            "learning rate",
            f"{cfg['lr']:g} (linear warm-up, warmup_steps {cfg['warmup_steps']}, then constant)",
        ),
        ("seed", f"{cfg['seed']} (data seed {cfg.get('data_seed', 0)})"),
    ]
    if cfg.get("lora_r"):  # a LoRA run (tdpo_lab.core.lora): the adapter is merged into the saved weights
        targets = cfg.get("lora_target_modules") or "peft's default"
        rows.append(
            (
                "LoRA",
                f"r {cfg['lora_r']}, alpha {cfg['lora_alpha']:g}, dropout {cfg['lora_dropout']:g}, "
                f"targets {targets}; merged into these weights",
            )
        )
    return rows


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _number(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
