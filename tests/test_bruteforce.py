"""Brute force on a 3-token vocabulary: enumerate every sequence of a tiny causal LM.

Checks the shifting and masking of tdpo_lab.core.logprobs against quantities computed without them:
- masked sums of token log-probs are sequence log-probs: for every prompt, the probabilities of all its
  continuations sum to 1, and each equals the chain-rule product of next-token probabilities read off
  prefix-only forward passes;
- the per-position KL of token_stats sums (under pi_ref) to the exact KL between the two models'
  distributions over whole continuations;
- prompt tokens never contribute: the logits that score prompt tokens can be anything, and unmasking the
  prompt adds exactly log P(prompt tokens).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tolerances import rounding_atol  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from tdpo_lab.core.logprobs import per_token_logps, sequence_logps, token_stats  # noqa: E402

VOCAB, PROMPT, CONT = 3, 2, 4


def tiny_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():  # sharper than the 0.02-std init, so the distributions are far from uniform
        for p in model.parameters():
            p.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def world():
    """Every (prompt, continuation) pair: 3^2 prompts x 3^4 continuations = 729 sequences of length 6."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=PROMPT + CONT)))
    labels = seqs.clone()
    labels[:, :PROMPT] = -100
    policy, reference = tiny_model(0), tiny_model(1)
    with torch.no_grad():
        return {
            "ids": seqs,
            "labels": labels,
            "policy": policy,
            "logits": policy(seqs).logits,
            "ref_logits": reference(seqs).logits,
            "reference": reference,
        }


def logit_scale(logits: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum over scored positions of the largest |logit|: the size of what the forward pass
    and the log-softmax round, and so the scale of a log-probability's rounding error (the log-probs
    themselves reach ~300 here, far above the ~50 one might guess)."""
    return logits[:, PROMPT - 1 : -1].abs().amax(-1).sum(-1)


def chain_rule_logps(model, ids):
    """log P(continuation | prompt) from prefix-only forwards: no shifted labels, no masks."""
    total = torch.zeros(ids.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for t in range(PROMPT, ids.shape[1]):
            last = model(ids[:, :t]).logits[:, -1].log_softmax(-1)
            total += last.gather(1, ids[:, t : t + 1])[:, 0]
    return total


def test_continuations_of_every_prompt_sum_to_one(world):
    seq = sequence_logps(world["logits"], world["labels"])
    per_prompt = seq.exp().view(VOCAB**PROMPT, VOCAB**CONT).sum(1)
    # each probability p carries a relative error of its log-prob's rounding, so the sum of p's is off by at
    # most that rounding (the p's sum to 1)
    tol = rounding_atol(logit_scale(world["logits"]))
    torch.testing.assert_close(per_prompt, torch.ones(VOCAB**PROMPT, dtype=torch.float64), rtol=0, atol=tol)
    # the model is far from uniform, so the check is not trivially true
    assert seq.exp().max() > 10 * seq.exp().min()


def test_masked_sums_are_chain_rule_sequence_logps(world):
    # prefix-only forwards run other GEMM shapes than the full-sequence forward, so the two routes round
    # differently: a few ulps of the logits' scale, which differs between CPUs (1.4e-12 seen on one)
    want = chain_rule_logps(world["policy"], world["ids"])
    tol = rounding_atol(logit_scale(world["logits"]))
    torch.testing.assert_close(sequence_logps(world["logits"], world["labels"]), want, rtol=0, atol=tol)
    stats = token_stats(world["logits"], world["ref_logits"], world["labels"], chunk_size=5)
    torch.testing.assert_close(stats.logps.sum(-1), want, rtol=0, atol=tol)
    want_ref = chain_rule_logps(world["reference"], world["ids"])
    ref_tol = rounding_atol(logit_scale(world["ref_logits"]))
    torch.testing.assert_close(stats.ref_logps.sum(-1), want_ref, rtol=0, atol=ref_tol)


def test_token_kl_sums_to_the_sequence_kl(world):
    """sum_y P_ref(y|x) SeqKL(x, y) = KL(P_ref(.|x) || P_theta(.|x)) over whole continuations (chain rule)."""
    stats = token_stats(world["logits"], world["ref_logits"], world["labels"])
    log_p = stats.logps.sum(-1).view(VOCAB**PROMPT, -1)
    log_q = stats.ref_logps.sum(-1).view(VOCAB**PROMPT, -1)
    exact = (log_q.exp() * (log_q - log_p)).sum(1)
    from_tokens = (log_q.exp() * stats.kl.sum(-1).view(VOCAB**PROMPT, -1)).sum(1)
    # both sides come from the same log-probs, summed in another order: rounding of the log-prob scale
    tol = rounding_atol(logit_scale(world["logits"]) + logit_scale(world["ref_logits"]))
    torch.testing.assert_close(from_tokens, exact, rtol=0, atol=tol)
    assert torch.all(exact > 1e-3)


def test_prompt_tokens_never_contribute(world):
    logits, labels, ref_logits = world["logits"], world["labels"], world["ref_logits"]
    base = token_stats(logits, ref_logits, labels)
    # the rows that score prompt tokens (position 0 predicts prompt token 1) can hold anything, even rows
    # that are entirely -inf: nothing moves and no gradient reaches them
    garbage = logits.clone()
    garbage[:, : PROMPT - 1] = torch.randn_like(garbage[:, : PROMPT - 1]) * 1e3
    garbage_ref = ref_logits.clone()
    garbage_ref[:, : PROMPT - 1] = float("-inf")
    x = garbage.clone().requires_grad_(True)
    moved = token_stats(x, garbage_ref, labels)
    for a, b in zip(moved, base, strict=True):
        assert torch.equal(a, b)
    (moved.logps.sum() + moved.kl.sum()).backward()
    assert torch.all(x.grad[:, : PROMPT - 1] == 0)
    # unmasking the prompt adds exactly log P(prompt token 1 | prompt token 0)
    unmasked = world["ids"].clone()
    unmasked[:, 0] = -100
    with torch.no_grad():
        first = world["policy"](world["ids"][:, :1]).logits[:, -1].log_softmax(-1)
    extra = first.gather(1, world["ids"][:, 1:2])[:, 0]
    tol = rounding_atol(logit_scale(logits) + logits[:, 0].abs().amax(-1))
    torch.testing.assert_close(
        sequence_logps(logits, unmasked), sequence_logps(logits, labels) + extra, rtol=0, atol=tol
    )
    logps, mask = per_token_logps(logits, unmasked)
    assert mask[:, 0].all() and not mask[:, 0].equal(base.mask[:, 0])
