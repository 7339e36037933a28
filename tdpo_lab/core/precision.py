"""bf16 on a CPU: the model's forward passes under autocast, everything the loss reads in fp32.

``cfg.mixed_precision="bf16"`` on a GPU goes through accelerate (its autocast wraps the step and the model's
forward). On a CPU the kit does it itself, narrowly, because accelerate would wrap the whole step and patch
the policy's ``forward`` for good, so the evaluations (reward, KL, samples) would run in bf16 too:

- the weights and AdamW's moments stay fp32 (autocast casts a weight to bf16 inside the region only);
- the policy's and reference's forward passes (and TI-DPO's attribution and anchor) run under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` (:func:`forward_autocast`);
- their logits are cast to fp32 before anything takes a softmax of them (:func:`fp32_logits`), and the
  log-probs, the exact SeqKL and the losses are computed outside the region, in fp32;
- evaluation runs outside it: fp32, as precise as with ``mixed_precision="no"``.

It pays only on a CPU with native bf16 (AVX512-BF16 or AMX, :func:`native_bf16`): there the issue measured a
tiny-profile step at 0.54x of fp32; on a CPU without it (AVX2 only) torch emulates bf16 and the step is several
times slower (benchmarks/README.md, "bf16 on the CPU").
"""

from __future__ import annotations

import contextlib
import warnings

import torch


def cpu_bf16(cfg, device: torch.device | str | None) -> bool:
    """True when ``cfg`` asks for bf16 and the step runs on a CPU: the kit's own autocast applies."""
    kind = torch.device(device).type if device is not None else "cpu"
    return getattr(cfg, "mixed_precision", "no") == "bf16" and kind == "cpu"


def native_bf16() -> bool:
    """True when this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), as oneDNN reports it.

    Without it torch emulates bf16 and autocast makes a step several times slower, not faster.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def warn_if_emulated(cfg, device) -> None:
    """A warning when bf16 is asked for on a CPU that would emulate it (benchmarks/README.md, "bf16 on the CPU")."""
    if cpu_bf16(cfg, device) and not native_bf16():
        warnings.warn(
            "mixed_precision='bf16' on a CPU without native bf16 (AVX512-BF16 or AMX): torch emulates it and a "
            "training step is several times slower than in fp32; use --set mixed_precision=no on this machine",
            stacklevel=2,
        )


def forward_autocast(cfg, device: torch.device | str | None):
    """bf16 autocast for forward passes when :func:`cpu_bf16`; otherwise a context that does nothing."""
    if cpu_bf16(cfg, device):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp32_region(cfg, device: torch.device | str | None):
    """Autocast switched off (losses and statistics in fp32) when :func:`cpu_bf16`; else nothing."""
    if cpu_bf16(cfg, device):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


def fp32_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[N, T, V]`` as fp32 (bf16/fp16 from autocast are upcast; fp32 and fp64 pass unchanged).

    The upcast is differentiable: the gradient comes back in fp32 and autograd casts it to the logits' dtype.
    """
    if logits.dtype in (torch.bfloat16, torch.float16):
        return logits.float()
    return logits
