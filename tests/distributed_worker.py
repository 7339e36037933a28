"""One process of a multi-process training that tests/test_distributed.py launches with torch.distributed.run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py '<json>'

The JSON holds ``kind`` ("sft" or "train"), ``config`` (load_config keywords, profile tiny), ``out`` (the run
folder, for "train") and ``stop_after`` (steps of this call, or null): what the CLI cannot ask for (stopping a
training part-way, SFT alone).
"""

from __future__ import annotations

import json
import sys

from tdpo_lab.config import load_config
from tdpo_lab.core.distributed import accelerator_for
from tdpo_lab.products.sft import train_sft
from tdpo_lab.runs.train import train


def main(spec: dict) -> None:
    cfg = load_config("tiny", fast=True, **spec["config"])
    if spec["kind"] == "sft":
        train_sft(cfg, progress=False, stop_after=spec.get("stop_after"), accelerator=accelerator_for(cfg))
    else:
        train(cfg, spec["out"], progress=False, stop_after=spec.get("stop_after"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
