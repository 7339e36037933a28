"""Preference methods as first-class objects: one module per method, one registry.

Built in, in the kit's order: ``dpo``, ``tdpo1``, ``tdpo2``, ``attnpo``, ``tidpo`` and ``ipo``. Each module
declares a :class:`Method` (name, label, colour, knobs with defaults, whether it uses the SeqKL, where its
token weights come from, its loss with the equation beside the line). Config validation, the CLI's choices,
run names, the results table, the figures and the parametrised tests read this registry, so a new method is
one file plus ``register(...)``; see the README's "Add your own method".
"""

from __future__ import annotations

from tdpo_lab.methods.attnpo import ATTNPO
from tdpo_lab.methods.base import (
    LossOutput,
    Method,
    PairTerms,
    StepContext,
    get_method,
    knob_default,
    knob_methods,
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
from tdpo_lab.methods.tidpo import TIDPO, left_align, triplet_loss

for _method in (DPO, TDPO1, TDPO2, ATTNPO, TIDPO, IPO):
    register(_method)

__all__ = [
    "LossOutput",
    "Method",
    "PairTerms",
    "StepContext",
    "get_method",
    "knob_default",
    "knob_methods",
    "left_align",
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
