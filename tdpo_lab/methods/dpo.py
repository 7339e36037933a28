"""DPO (Rafailov et al. 2023, arXiv 2305.18290): the sequence-level baseline.

    L = -log sigma(beta * u'),   u' = sum_t r_t(y_w) - sum_t r_t(y_l)            (DPO Eq. 7)

Derived in notebooks/04_dpo_baseline.ipynb; docs/methods.md section 3.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.methods.base import Method, PairTerms


def dpo_loss(terms: PairTerms, *, beta: float) -> Tensor:
    return -F.logsigmoid(beta * terms.margin)  # DPO Eq. 7


DPO = Method(
    name="dpo",
    label="DPO",
    color="tab:blue",
    loss=dpo_loss,
    paper="Rafailov et al. 2023, arXiv 2305.18290",
)
