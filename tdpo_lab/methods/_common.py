"""Small helpers the token-weight modules share (TI-DPO's attribution and AttentionPO's judge)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (no dropout) and restore each one's own flag afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # Restore per module, not just model.train(flag): a caller may have frozen parts in eval mode.
        for module, flag in modes:
            module.training = flag


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (several training processes, tdpo_lab.distributed), else the model.

    A forward pass goes through the wrapper (that is how DDP knows to average the gradients); reading the
    model's parts (its embeddings, blocks, output layer) or sampling from it needs the model itself.
    """
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def abbrev(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width // 2] + " ... " + text[-width // 2 :])
