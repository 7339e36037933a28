"""TDPO2 (Zeng et al. 2024, Token-level DPO, arXiv 2404.11999): the SeqKL gap weighted by alpha, the
chosen side's SeqKL behind a stop-gradient (sg).

    L = -log sigma(beta * (u' - alpha (SeqKL(y_l) - sg(SeqKL(y_w)))))              (TDPO_2, Eq. 20)

Derived in notebooks/05_tdpo.ipynb; docs/methods.md section 3.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.config import Knob
from tdpo_lab.methods.base import Method, PairTerms

ALPHA = Knob(
    "alpha",
    float,
    0.5,
    help="weight of the SeqKL gap relative to the margin (TDPO paper default 0.5)",
    check=lambda v: v >= 0,
    valid=">= 0",
)


def tdpo2_logit(terms: PairTerms, alpha: float) -> Tensor:
    """u' - alpha (SeqKL_l - sg(SeqKL_w)): TDPO2's logit before beta (TI-DPO reuses it, weighted)."""
    return terms.margin - alpha * (terms.kl_rejected - terms.kl_chosen.detach())  # TDPO Eq. 20


def tdpo2_loss(terms: PairTerms, *, beta: float, alpha: float) -> Tensor:
    return -F.logsigmoid(beta * tdpo2_logit(terms, alpha))


TDPO2 = Method(
    name="tdpo2",
    label="TDPO2",
    color="tab:green",
    loss=tdpo2_loss,
    knobs=(ALPHA,),
    uses_seq_kl=True,
    paper="Zeng et al. 2024, arXiv 2404.11999",
)
