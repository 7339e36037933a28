"""Preference methods as first-class objects: one module per method, one registry.

Built in, in the kit's order: ``dpo``, ``tdpo1``, ``tdpo2``, ``attnpo``, ``tidpo`` and ``ipo``. Each module
declares a :class:`Method`: name, label, colour, its knobs (:class:`Knob`: type, default, valid range, help),
whether it uses the SeqKL, where its token weights come from, the cached inputs it needs
(:class:`MethodInput`) and its loss with the equation beside the line. Config validation, the CLI's choices,
run names, the results table, the figures and the parametrised tests read this registry, so a new method is
one file plus ``register(...)``.

Methods outside the package load in two ways (README, "Add your own method"): an installed distribution
that names its module in the entry-point group ``tdpo_lab.methods`` is imported when this package is, and
``tdpo-lab ... --plugin MODULE`` (or :func:`load_plugin`) imports a module by name; either module calls
:func:`register`.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

from tdpo_lab.config import Knob, knob_methods
from tdpo_lab.methods.attnpo import ATTNPO
from tdpo_lab.methods.attnpo_judge import (
    SINK_MIN_LENGTH,
    align_weights,
    attention_to_weights,
    attention_weights,
    fix_attention_sink,
)
from tdpo_lab.methods.attnpo_prompt import JUDGE_TEMPLATE, judge_text, uses_chat_template
from tdpo_lab.methods.base import (
    LossOutput,
    Method,
    MethodInput,
    PairTerms,
    StepContext,
    get_method,
    knob_default,
    logit_metrics,
    method_color,
    method_label,
    method_names,
    method_rank,
    preference_loss,
    reads_knob,
    register,
    unregister,
)
from tdpo_lab.methods.dpo import DPO
from tdpo_lab.methods.ipo import IPO
from tdpo_lab.methods.tdpo1 import TDPO1
from tdpo_lab.methods.tdpo2 import TDPO2
from tdpo_lab.methods.tidpo import TIDPO, left_align, triplet_loss, triplet_term
from tdpo_lab.methods.tidpo_importance import (
    gaussian_prior,
    gradient_importance,
    gradient_saliency,
    hybrid_weights,
    shift_to_labels,
)

ENTRY_POINT_GROUP = "tdpo_lab.methods"

for _method in (DPO, TDPO1, TDPO2, ATTNPO, TIDPO, IPO):
    register(_method)


def load_plugin(module: str) -> None:
    """Import ``module`` (a dotted name on ``sys.path``), which registers its methods; a clear error if absent."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            raise ValueError(
                f"plugin module {module!r} not found: install it, or put its folder on PYTHONPATH"
            ) from None
        raise


def _load_entry_points() -> None:
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # a broken plugin must not take the kit down with it
            warnings.warn(f"method plugin {entry.name!r} ({entry.value}) failed to load: {err}", stacklevel=2)


_load_entry_points()

__all__ = [
    "ENTRY_POINT_GROUP",
    "JUDGE_TEMPLATE",
    "SINK_MIN_LENGTH",
    "align_weights",
    "attention_to_weights",
    "attention_weights",
    "fix_attention_sink",
    "gaussian_prior",
    "gradient_importance",
    "gradient_saliency",
    "hybrid_weights",
    "judge_text",
    "shift_to_labels",
    "triplet_term",
    "uses_chat_template",
    "Knob",
    "LossOutput",
    "Method",
    "MethodInput",
    "PairTerms",
    "StepContext",
    "get_method",
    "knob_default",
    "knob_methods",
    "left_align",
    "load_plugin",
    "logit_metrics",
    "method_color",
    "method_label",
    "method_names",
    "method_rank",
    "preference_loss",
    "reads_knob",
    "register",
    "triplet_loss",
    "unregister",
]
