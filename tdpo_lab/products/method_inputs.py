"""A method's cached inputs, computed once per pair table: the cache layer's side of :class:`MethodInput`.

A method declares what it needs before training (:class:`tdpo_lab.methods.MethodInput`: a name, the knobs it
depends on and a pure ``compute`` function of pi_ref, the tokenizer, the pair table and the knobs). This module
loads pi_ref as the input asks (eager attention for AttentionPO's judge), runs ``compute`` under the stage's
lock, stores its tensors as safetensors in ``<cache>/<name>/<key>`` (:class:`tdpo_lab.cache.plan.Plan`) and
reads them back; a damaged file is recomputed with a warning naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from tdpo_lab.cache.plan import Plan
from tdpo_lab.cache.store import fetch
from tdpo_lab.config import Config
from tdpo_lab.core.utils import atomic_path
from tdpo_lab.methods import MethodInput, get_method
from tdpo_lab.products.sft import load_reference

INPUT_FILE = "tensors.safetensors"
LEGACY_FILES = {"attnpo": "weights.safetensors"}  # the file name AttentionPO's weights were cached under


def fetch_input(cfg: Config, item: MethodInput, pairs, *, plan: Plan | None = None, progress: bool = True):
    """``item``'s tensors for the pair table ``pairs`` of ``cfg`` (computed with pi_ref if not cached)."""
    plan = plan or Plan(cfg)
    file = LEGACY_FILES.get(item.name, INPUT_FILE)
    knobs = {name: getattr(cfg, name) for name in item.knobs}

    def build(folder: Path) -> None:
        reference, tokenizer = load_reference(cfg, progress=progress, plan=plan, **item.model_kwargs)
        tensors = item.compute(reference, tokenizer, pairs, knobs, progress)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise TypeError(f"input {item.name!r}: compute must return a dict of tensors")
        # safetensors stores each tensor's own memory: no views into a larger tensor
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        with atomic_path(folder / file) as tmp:
            save_file(tensors, str(tmp))

    def read(folder: Path) -> dict[str, torch.Tensor]:
        # from bytes, not load_file: its tensors would map the file, and a file damaged in place under a
        # mapping kills the process with SIGBUS instead of raising
        return load_safetensors((folder / file).read_bytes())

    return fetch(plan.entry(item.name), build, read, what=f"{item.name} input cache")


def method_inputs(cfg: Config, pairs, *, plan: Plan | None = None, progress: bool = True) -> dict:
    """Every cached input of ``cfg.method``, by name (an empty dict for a method that declares none)."""
    plan = plan or Plan(cfg)
    return {
        item.name: fetch_input(cfg, item, pairs, plan=plan, progress=progress)
        for item in get_method(cfg.method).inputs
    }


def method_state(cfg: Config, pairs, *, plan: Plan | None = None, progress: bool = True):
    """What ``cfg.method``'s training hooks see as ``ctx.state``: its ``prepare`` of its inputs (or None)."""
    method = get_method(cfg.method)
    if method.prepare is None:
        return None
    return method.prepare(cfg, pairs, method_inputs(cfg, pairs, plan=plan, progress=progress))


def attnpo_weights(cfg: Config, pairs, *, progress: bool = True, plan: Plan | None = None):
    """AttentionPO's ``(w_chosen, w_rejected)`` of every pair of the table, indexed by ``pair_id`` (cached)."""
    method = get_method("attnpo")
    tensors = fetch_input(cfg, method.inputs[0], pairs, plan=plan, progress=progress)
    return method.prepare(cfg, pairs, {"attnpo": tensors})
