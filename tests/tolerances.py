"""Float tolerances derived from the magnitudes a computation handles, not from one CPU's rounding.

A float64 result that went through matrix products and sums of terms of size up to ``magnitude`` carries
rounding error of order ``k * eps * magnitude``: eps = 2.2e-16, and k grows with the number of operations
that accumulated (inner dimensions of the products, terms of the sums). Different CPUs (AVX2 versus AVX-512
kernels, other blockings) round differently, so a test that compares two routes to one number needs this
bound, not an absolute constant measured on one machine.
"""

from __future__ import annotations

import torch

EPS64 = torch.finfo(torch.float64).eps

# A few hundred operations touch each value in the brute-force checks (GEMMs of inner size 16 and 64, a
# log-softmax, a sum over positions); 1024 ulps covers their worst case with room, and stays ten orders of
# magnitude below any masking or shifting error, which moves a log-probability by O(1).
ULPS = 1024


def rounding_atol(magnitude: torch.Tensor | float, ulps: int = ULPS) -> float:
    """Absolute tolerance for float64 results built from terms of size up to ``magnitude``."""
    return float(ulps * EPS64 * float(torch.as_tensor(magnitude).abs().max()))
