"""TDPO1 (Zeng et al. 2024, Token-level DPO, arXiv 2404.11999): DPO's margin minus the SeqKL gap.

    L = -log sigma(beta * (u' - (SeqKL(y_l) - SeqKL(y_w))))                        (TDPO_1, Eq. 18)

Both KL terms carry gradient; TDPO1 has no alpha. Derived in notebooks/05_tdpo.ipynb; docs/methods.md
section 3.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.methods.base import Method, PairTerms


def tdpo1_loss(terms: PairTerms, *, beta: float) -> Tensor:
    # TDPO Eq. 18: -log sigma(u - delta), delta = beta (SeqKL_l - SeqKL_w)
    return -F.logsigmoid(beta * (terms.margin - (terms.kl_rejected - terms.kl_chosen)))


TDPO1 = Method(
    name="tdpo1",
    label="TDPO1",
    color="tab:orange",
    loss=tdpo1_loss,
    uses_seq_kl=True,
    paper="Zeng et al. 2024, arXiv 2404.11999",
)
