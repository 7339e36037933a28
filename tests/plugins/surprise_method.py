"""A method from outside the kit, for the tests: "surprisedpo", DPO whose pairs are weighted by how surprising
pi_ref finds their chosen response. It has a knob of its own and a cached input of its own, as a plugin would:

    tdpo-lab run --plugin surprise_method --method surprisedpo --set surprise_temperature=2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdpo_lab import Knob
from tdpo_lab.methods import Method, MethodInput, register

TEMPERATURE = Knob(
    "surprise_temperature",
    float,
    1.0,
    "softmax temperature of the pair weights over pi_ref's per-token surprise",
    lambda v: v > 0,
    "> 0",
)


@torch.no_grad()
def reference_surprise(reference, tokenizer, pairs, knobs, progress=True) -> dict[str, torch.Tensor]:
    """Per pair: pi_ref's mean negative log-likelihood of prompt + chosen, turned into weights averaging 1."""
    device = next(reference.parameters()).device
    surprise = []
    for prompt, chosen in zip(pairs["prompt"], pairs["chosen"], strict=True):
        ids = torch.tensor([tokenizer(prompt + chosen)["input_ids"][:64]], device=device)
        logits = reference(input_ids=ids).logits.float()
        surprise.append(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    values = torch.stack(surprise)
    return {"weight": torch.softmax(values / knobs["surprise_temperature"], 0) * len(values)}


def pair_weights(cfg, pairs, inputs) -> torch.Tensor:
    return inputs["refsurprise"]["weight"]


def step_weights(ctx):
    """Every response position of a pair's two rows gets the pair's weight."""
    ids = torch.tensor(ctx.rows["pair_id"].to_list())
    per_row = torch.cat([ctx.state[ids], ctx.state[ids]]).to(ctx.device)
    return per_row[:, None].expand(ctx.labels.shape[0], ctx.labels.shape[1] - 1).clone(), None


def surprise_loss(terms, *, beta, surprise_temperature):
    return -F.logsigmoid(beta * terms.margin)  # the margins already carry the pair weights


SURPRISE_DPO = register(
    Method(
        name="surprisedpo",
        label="Surprise-weighted DPO",
        color="tab:brown",
        loss=surprise_loss,
        knobs=(TEMPERATURE,),
        token_weights="judge",
        inputs=(MethodInput("refsurprise", compute=reference_surprise, knobs=("surprise_temperature",)),),
        prepare=pair_weights,
        step_weights=step_weights,
    ),
    replace=True,
)
