"""Checks for the exercises that build the core: collation, sequence log-probs, one step, the KL estimators,
TI-DPO's weighted margin.

Chapters import them from their own checker module (04: the first three, 05: the KL estimators, 06: the
weighted margin); they live here so that each chapter's module stays small. Rows ``[:B]`` of a preference batch
are prompt + chosen, rows ``[B:]`` prompt + rejected; labels are -100 on the prompt and the padding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tdpo_lab.core.data import collate_ids
from tdpo_lab.core.logprobs import IGNORE_INDEX, token_stats
from tdpo_lab.course.grading import ExerciseError, check_close, passed
from tdpo_lab.methods import preference_loss

__all__ = [
    "check_collation",
    "check_kl_estimators",
    "check_preference_step",
    "check_sequence_logps",
    "check_weighted_margin",
]

INTERLEAVED = (
    "chosen and rejected rows alternate (pair i in rows 2i and 2i + 1): the kit puts every chosen row first, "
    "then every rejected row, so that row i and row B + i are the two sides of pair i"
)


def _halves(rows: Tensor) -> tuple[Tensor, Tensor]:
    b = rows.shape[0] // 2
    return rows[:b], rows[b:]


def _alternate(rows: Tensor) -> tuple[Tensor, Tensor]:
    return rows[0::2], rows[1::2]


def check_collation(
    input_ids,
    attention_mask,
    labels,
    prompt_ids: Sequence,
    chosen_ids: Sequence,
    rejected_ids: Sequence,
    pad_id: int,
) -> None:
    """``input_ids``, ``attention_mask``, ``labels`` [2B, T] of B pairs given as token-id lists (responses end in EOS)."""
    prompts, responses = list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids)
    want = collate_ids(prompts, responses, pad_id)
    mixed = [x for pair in zip(chosen_ids, rejected_ids, strict=True) for x in pair]
    alternate = collate_ids([p for p in prompt_ids for _ in (0, 1)], mixed, pad_id)
    left = collate_ids(
        [[] for _ in prompts], [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)], pad_id
    )
    padding = want["attention_mask"] == 0
    check_close(
        input_ids,
        want["input_ids"].double(),
        name="input_ids",
        mistakes={INTERLEAVED: alternate["input_ids"].double()},
    )
    check_close(
        attention_mask,
        want["attention_mask"].double(),
        name="attention_mask",
        mistakes={
            "the mask is 1 on the padding and 0 on real tokens: it is the other way round": padding.double()
        },
    )
    check_close(
        labels,
        want["labels"].double(),
        name="labels",
        mistakes={
            "the prompt tokens are not masked: only response tokens (and the EOS) carry a label, the prompt is "
            "-100 so that the loss never scores the prompt": left["labels"].double(),
            "the padding is not masked: padded positions must be -100, or the pad token (EOS) is scored as if "
            "the response went on": torch.where(
                padding, torch.full_like(want["input_ids"], pad_id), want["labels"]
            ).double(),
            "labels are shifted by hand: the collated labels sit on the same grid as input_ids; the shift "
            "(logits[:, :-1] predict labels[:, 1:]) happens when the log-probs are read": torch.cat(
                [want["labels"][:, 1:], torch.full_like(want["labels"][:, :1], IGNORE_INDEX)], 1
            ).double(),
            INTERLEAVED: alternate["labels"].double(),
        },
    )
    passed("the preference batch: chosen rows then rejected rows, prompt and padding labelled -100")


def check_sequence_logps(logp_chosen, logp_rejected, logits: Tensor, labels: Tensor) -> None:
    """``logp_chosen``, ``logp_rejected`` [B]: log pi(y | x) of each pair's responses from ``logits`` [2B, T, V]."""
    logits = logits.detach()
    stats = token_stats(logits, logits, labels)
    rows = stats.logps.double().sum(-1)
    lp = torch.log_softmax(logits.double(), -1)
    mask = labels != IGNORE_INDEX
    unshifted = torch.where(mask, lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0).sum(-1)
    shifted_all = lp[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    every_position = shifted_all.sum(-1)
    length = stats.mask.sum(-1).clamp(min=1).double()
    raw = torch.where(
        stats.mask, logits[:, :-1].double().gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0], 0.0
    )
    for name, mine, part in (("logp_chosen", logp_chosen, 0), ("logp_rejected", logp_rejected, 1)):

        def pick(values: Tensor, how=_halves, part=part) -> Tensor:
            return how(values)[part]

        check_close(
            mine,
            pick(rows),
            name=name,
            rtol=1e-4,
            atol=1e-4,
            mistakes={
                "there is no shift: logits at position t predict the token at t + 1, so use logits[:, :-1] "
                "against labels[:, 1:]": pick(unshifted),
                "the prompt and padding positions are summed too (their -100 labels turned into token 0); "
                "keep only positions whose label is not -100": pick(every_position),
                "the log-probs are averaged over the response instead of summed: log pi(y|x) is a sum over "
                "its tokens (chain rule)": pick(rows / length),
                "raw logits are gathered instead of log-probabilities: apply log_softmax over the vocabulary "
                "first": pick(raw.sum(-1)),
                INTERLEAVED: pick(rows, _alternate),
                "chosen and rejected are swapped": _halves(rows)[1 - part],
            },
        )
    passed("the sequence log-probs of the chosen and rejected rows: shifted, masked, summed")


def _parameters(model) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _dpo_loss(policy, reference, batch: dict, beta: float) -> Tensor:
    forward = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        stats = token_stats(policy(**forward).logits, reference(**forward).logits, batch["labels"])
    return preference_loss("dpo", stats, beta=beta).loss


def check_preference_step(
    step: Callable, policy, reference, batch: dict, beta: float, *, lr: float = 1e-3
) -> None:
    """``step(policy, reference, batch, optimizer, beta)`` takes one DPO step and returns the loss before it.

    Runs on copies (the chapter's models stay as they are) in eval mode, with SGD at ``lr`` on the policy's
    parameters. Right: the returned loss is DPO's on the batch before the step, the loss on the same batch
    is lower after it, and pi_ref's parameters are bit for bit unchanged.
    """
    policy, reference = copy.deepcopy(policy).eval(), copy.deepcopy(reference).eval()
    for p in reference.parameters():
        p.requires_grad_(
            True
        )  # as a student's freshly loaded model: the step must not rely on it being frozen
    before_ref, before_pol = _parameters(reference), _parameters(policy)
    loss_before = _dpo_loss(policy, reference, batch, beta)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=lr)
    returned = step(policy, reference, batch, optimizer, beta)
    if any(not torch.equal(a, b) for a, b in zip(before_ref, _parameters(reference), strict=True)):
        raise ExerciseError(
            "pi_ref's parameters changed: only the policy is trained. The optimizer must hold the policy's "
            "parameters alone, and the reference's forward pass runs under torch.no_grad()"
        )
    if all(torch.equal(a, b) for a, b in zip(before_pol, _parameters(policy), strict=True)):
        raise ExerciseError(
            "the policy did not move: call loss.backward() and then optimizer.step() (and optimizer.zero_grad() "
            "before backward, not between backward and step)"
        )
    loss_after = _dpo_loss(policy, reference, batch, beta)
    if not loss_after < loss_before:
        raise ExerciseError(
            f"the loss went up ({loss_before.item():.6f} -> {loss_after.item():.6f}): the step climbs the loss. "
            "Minimise -log sigma(beta h): backward() on the loss itself, not on its negative or on log sigma"
        )
    check_close(
        returned,
        loss_before,
        name="the returned loss",
        rtol=1e-4,
        atol=1e-6,
        mistakes={
            "it is the loss after the step: return the loss you computed before optimizer.step()": loss_after
        },
        hint="return the mean DPO loss of the batch, computed before the step",
    )
    passed(f"one DPO step: loss {loss_before.item():.5f} -> {loss_after.item():.5f}, pi_ref unchanged")


def check_kl_estimators(
    kl_seq_mine, kl_logratio_mine, pol_logits: Tensor, ref_logits: Tensor, labels: Tensor
) -> None:
    """``kl_seq_mine``, ``kl_logratio_mine`` [N]: per-row exact KL(pi_theta || pi_ref) summed over the response
    positions, and the sampled log-ratio sum_t log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)."""
    pol_logits, ref_logits = pol_logits.detach().double(), ref_logits.detach().double()
    # token_stats(a, b).kl is KL(pi_b || pi_a): with the reference first it is the evaluation's direction
    evaluation = token_stats(ref_logits, pol_logits, labels)
    tdpo = token_stats(pol_logits, ref_logits, labels)
    kl_seq = evaluation.kl.sum(-1)
    logratio = (evaluation.ref_logps - evaluation.logps).sum(-1)
    length = evaluation.mask.sum(-1).clamp(min=1).double()
    p, q = torch.log_softmax(pol_logits[:, :-1], -1), torch.log_softmax(ref_logits[:, :-1], -1)
    kl_all = (p.exp() * (p - q)).sum(-1).sum(-1)
    check_close(
        kl_seq_mine,
        kl_seq,
        name="kl_seq_mine",
        rtol=1e-4,
        atol=1e-5,
        mistakes={
            "the KL runs the other way, KL(pi_ref || pi_theta) (TDPO's SeqKL): the evaluation reports "
            "KL(pi_theta || pi_ref), weighted by the policy that wrote the sample": tdpo.kl.sum(-1),
            "it is the log-ratio estimator, not the exact KL: sum over the whole vocabulary at each position": logratio,
            "positions off the response are summed too: keep only positions whose label is not -100": kl_all,
            "the KL is averaged over the response instead of summed": kl_seq / length,
        },
    )
    check_close(
        kl_logratio_mine,
        logratio,
        name="kl_logratio_mine",
        rtol=1e-4,
        atol=1e-5,
        mistakes={
            "the sign is flipped: log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t), policy first": -logratio,
            "it is the exact KL: this estimator reads only the sampled token's log-probabilities": kl_seq,
            "the log-ratio is averaged over the response instead of summed": logratio / length,
        },
    )
    passed("kl_seq (exact, summed over positions) and kl_logratio (the sampled log-ratio)")


def check_weighted_margin(margin_mine, stats, weights: Tensor, *, beta: float | None = None) -> None:
    """``margin_mine`` [B]: sum_t W_t r_t(y_w) - sum_t W_t r_t(y_l) from ``stats`` and ``weights`` [2B, T-1]."""
    mask = stats.mask.bool()
    ratio = torch.where(mask, stats.logps - stats.ref_logps, 0.0).detach().double()
    w = weights.detach().double()
    rows, plain = (w * ratio).sum(-1), ratio.sum(-1)
    all_w = (w * (stats.logps - stats.ref_logps).detach().double()).sum(-1)
    b = rows.shape[0] // 2
    chosen, rejected = _halves(rows)
    mistakes = {
        "the weights are missing: TI-DPO scales each token's log-ratio r_t by its weight W_t": _halves(plain)[
            0
        ]
        - _halves(plain)[1],
        "the margin is taken the wrong way round (rejected minus chosen)": rejected - chosen,
        "it is the weighted sum of the chosen rows only: subtract the rejected rows' weighted sum": chosen,
        "the policy's log-probs are weighted instead of the log-ratios r_t = log pi_theta - log pi_ref": _halves(
            (w * torch.where(mask, stats.logps, 0.0).detach().double()).sum(-1)
        )[0]
        - _halves((w * torch.where(mask, stats.logps, 0.0).detach().double()).sum(-1))[1],
        INTERLEAVED: _alternate(rows)[0] - _alternate(rows)[1],
        "masked positions are summed too: weight only the response positions": all_w[:b] - all_w[b:],
    }
    if beta is not None:
        mistakes["beta is inside the margin: the margin is unscaled, beta multiplies it in the loss"] = (
            beta * (chosen - rejected)
        )
    check_close(margin_mine, chosen - rejected, name="margin_mine", mistakes=mistakes, rtol=1e-4, atol=1e-6)
    passed("TI-DPO's weighted margin sum_t W_t r_t(y_w) - sum_t W_t r_t(y_l)")
