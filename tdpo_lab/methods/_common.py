"""Small helpers the token-weight modules share (TI-DPO's attribution and AttentionPO's judge)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from tdpo_lab.core.utils import eval_mode as eval_mode  # re-exported: the one eval_mode of the kit


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (several training processes, tdpo_lab.core.distributed), else the model.

    A forward pass goes through the wrapper (that is how DDP knows to average the gradients); reading the
    model's parts (its embeddings, blocks, output layer) or sampling from it needs the model itself.
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def abbrev(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width // 2] + " ... " + text[-width // 2 :])
