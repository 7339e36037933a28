"""IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
arXiv 2310.12036): a squared loss that pulls the margin to a finite target instead of pushing it forever.

    L = (h - 1 / (2 tau))^2,   h = sum_t r_t(y_w) - sum_t r_t(y_l)                (IPO, Eq. 17)

tau is the kit's ``beta`` knob, as in TRL. With deterministic, noise-free labels (chapter 02's argmax
ranking: the chosen side wins with probability 1) DPO's loss -log sigma(beta h) has no finite minimiser,
it keeps pushing h up; IPO's is minimised at h = 1/(2 tau) (chapter 04 shows both).

Which form: the paper's, with h built from sequence SUMS of log-ratios, the same margin every other method
of the kit uses (and the one the token-level derivation of chapter 03 telescopes into). TRL's ``ipo`` loss
averages the log-probs over the response length first; on this task both responses of a pair are about
``max_new_tokens`` long, so the average is roughly the sum over a constant and the two forms differ mainly
by a rescaled target. Docs: docs/methods.md section 3.
"""

from __future__ import annotations

from torch import Tensor

from tdpo_lab.methods.base import Method, PairTerms


def ipo_loss(terms: PairTerms, *, beta: float) -> Tensor:
    return (terms.margin - 1.0 / (2.0 * beta)) ** 2  # IPO Eq. 17, tau = beta


IPO = Method(
    name="ipo",
    label="IPO",
    color="tab:brown",
    loss=ipo_loss,
    paper="Azar et al. 2023, arXiv 2310.12036",
)
