"""The checks of the exercises that build the core pass the chapters' solutions and name each typical mistake.

The solution functions below hold the same lines as the chapters' solution regions (04: collation, sequence
log-probs, one DPO step; 05: the two KL estimators; 06: TI-DPO's weighted margin)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from tdpo_lab.core import collate_ids, token_stats
from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch04 import check_collation, check_preference_step, check_sequence_logps
from tdpo_lab.course.grading.ch05 import check_kl_estimators
from tdpo_lab.course.grading.ch06 import check_weighted_margin
from tdpo_lab.methods import preference_loss

B, V, PAD = 3, 13, 12
PROMPTS = [[1, 2], [3], [4, 5, 6]]
CHOSEN = [[7, 8, PAD], [9, PAD], [10, 11, 7, PAD]]
REJECTED = [[8, PAD], [7, 7, 9, PAD], [11, PAD]]


def collate_solution(prompt_ids, chosen_ids, rejected_ids, pad_id, *, keep_prompt=False, pad_label=False):
    rows = list(zip(prompt_ids + prompt_ids, chosen_ids + rejected_ids, strict=True))  # chosen rows first
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), pad_id if pad_label else -100)
    for i, (p, r) in enumerate(rows):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, : len(p) + len(r)] = 1
        labels[i, 0 if keep_prompt else len(p) : len(p) + len(r)] = input_ids[
            i, 0 if keep_prompt else len(p) : len(p) + len(r)
        ]
    if pad_label:  # labels copied from input_ids, only the prompt masked
        labels = input_ids.clone()
        for i, (p, _) in enumerate(rows):
            labels[i, : len(p)] = -100
    return input_ids, attention_mask, labels


def test_collation(capsys):
    check_collation(*collate_solution(PROMPTS, CHOSEN, REJECTED, PAD), PROMPTS, CHOSEN, REJECTED, PAD)
    assert "correct" in capsys.readouterr().out
    ids, mask, labels = collate_solution(PROMPTS, CHOSEN, REJECTED, PAD)
    for wrong, match in [
        (collate_solution(PROMPTS, CHOSEN, REJECTED, PAD, keep_prompt=True), "prompt tokens are not masked"),
        (collate_solution(PROMPTS, CHOSEN, REJECTED, PAD, pad_label=True), "padding is not masked"),
        ((ids, 1 - mask, labels), "other way round"),
        ((ids, mask, torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)), "shifted by hand"),
    ]:
        with pytest.raises(ExerciseError, match=match):
            check_collation(*wrong, PROMPTS, CHOSEN, REJECTED, PAD)
    mixed = [x for pair in zip(CHOSEN, REJECTED, strict=True) for x in pair]
    alt = collate_ids([p for p in PROMPTS for _ in (0, 1)], mixed, PAD)
    with pytest.raises(ExerciseError, match="alternate"):
        check_collation(
            alt["input_ids"], alt["attention_mask"], alt["labels"], PROMPTS, CHOSEN, REJECTED, PAD
        )


def logps_solution(logits, labels, b, *, shift=True, mask_off=True, mean=False, raw=False):
    lp = logits if raw else F.log_softmax(logits.float(), -1)
    lp, tgt = (lp[:, :-1], labels[:, 1:]) if shift else (lp, labels)
    on = tgt != -100 if mask_off else torch.ones_like(tgt, dtype=torch.bool)
    per_token = lp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    seq = torch.where(on, per_token, 0.0).sum(-1)
    seq = seq / (tgt != -100).sum(-1) if mean else seq
    return seq[:b], seq[b:]


@pytest.fixture
def batch():
    data = collate_ids(PROMPTS * 2, CHOSEN + REJECTED, PAD)
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2 * B, data["labels"].shape[1], V, generator=gen, dtype=torch.float64)
    pol = ref + torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    return data, pol, ref


def test_sequence_logps(batch, capsys):
    data, pol, _ = batch
    labels = data["labels"]
    check_sequence_logps(*logps_solution(pol, labels, B), pol, labels)
    assert "correct" in capsys.readouterr().out
    for kwargs, match in [
        ({"shift": False}, "no shift"),
        ({"mask_off": False}, "prompt and padding positions are summed"),
        ({"mean": True}, "averaged"),
        ({"raw": True}, "raw logits"),
    ]:
        with pytest.raises(ExerciseError, match=match):
            check_sequence_logps(*logps_solution(pol, labels, B, **kwargs), pol, labels)
    c, r = logps_solution(pol, labels, B)
    with pytest.raises(ExerciseError, match="swapped"):
        check_sequence_logps(r, c, pol, labels)


def kl_solution(pol_logits, ref_logits, labels, *, reverse=False, flip=False):
    on_response = labels[:, 1:] != -100
    logp = F.log_softmax(pol_logits[:, :-1].float(), -1)
    logq = F.log_softmax(ref_logits[:, :-1].float(), -1)
    a, b = (logq, logp) if reverse else (logp, logq)
    kl_t = (a.exp() * (a - b)).sum(-1)
    tgt = labels[:, 1:].clamp(min=0)[..., None]
    ratio_t = (logp.gather(-1, tgt) - logq.gather(-1, tgt)).squeeze(-1)
    kl_seq = torch.where(on_response, kl_t, 0.0).sum(-1)
    kl_logratio = torch.where(on_response, ratio_t, 0.0).sum(-1)
    return kl_seq, -kl_logratio if flip else kl_logratio


def test_kl_estimators(batch, capsys):
    data, pol, ref = batch
    labels = data["labels"]
    check_kl_estimators(*kl_solution(pol, ref, labels), pol, ref, labels)
    assert "correct" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="other way"):
        check_kl_estimators(*kl_solution(pol, ref, labels, reverse=True), pol, ref, labels)
    with pytest.raises(ExerciseError, match="sign is flipped"):
        check_kl_estimators(*kl_solution(pol, ref, labels, flip=True), pol, ref, labels)
    kl_seq, logratio = kl_solution(pol, ref, labels)
    with pytest.raises(ExerciseError, match="log-ratio estimator"):
        check_kl_estimators(logratio, kl_seq, pol, ref, labels)
    with pytest.raises(ExerciseError, match="averaged"):
        check_kl_estimators(kl_seq / (labels[:, 1:] != -100).sum(-1), logratio, pol, ref, labels)
    # the check's reference is the evaluation's own statistic
    p, q = F.log_softmax(pol[:, :-1], -1), F.log_softmax(ref[:, :-1], -1)
    naive = ((p.exp() * (p - q)).sum(-1) * (labels[:, 1:] != -100)).sum(-1)
    torch.testing.assert_close(kl_seq.double(), naive, rtol=1e-4, atol=1e-5)


def margin_solution(stats, W, b, *, weighted=True, swap=False):
    r_t = torch.where(stats.mask, stats.logps - stats.ref_logps, 0.0)
    rows = ((W if weighted else 1.0) * r_t).sum(-1)
    margin = rows[:b] - rows[b:]
    return -margin if swap else margin


def test_weighted_margin(batch, capsys):
    data, pol, ref = batch
    stats = token_stats(pol, ref, data["labels"])
    W = (
        torch.rand(stats.logps.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        * stats.mask
    )
    check_weighted_margin(margin_solution(stats, W, B), stats, W, beta=0.1)
    assert "correct" in capsys.readouterr().out
    # the package's TI-DPO loss with alpha = 0 is -log sigma(beta * this margin)
    lib = preference_loss("tidpo", stats, beta=0.1, alpha=0.0, weights=W)
    torch.testing.assert_close(lib.losses, -F.logsigmoid(0.1 * margin_solution(stats, W, B)))
    for kwargs, match in [({"weighted": False}, "weights are missing"), ({"swap": True}, "wrong way round")]:
        with pytest.raises(ExerciseError, match=match):
            check_weighted_margin(margin_solution(stats, W, B, **kwargs), stats, W)
    with pytest.raises(ExerciseError, match="beta is inside"):
        check_weighted_margin(0.1 * margin_solution(stats, W, B), stats, W, beta=0.1)


def step_solution(policy, reference, batch, optimizer, beta, *, ascend=False, no_step=False):
    forward = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref_logits = reference(**forward).logits
    stats = token_stats(policy(**forward).logits, ref_logits, batch["labels"])
    loss = preference_loss("dpo", stats, beta=beta).loss
    optimizer.zero_grad()
    (-loss if ascend else loss).backward()
    if not no_step:
        optimizer.step()
    return loss.detach()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    reference = transformers.GPT2LMHeadModel(config).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference, collate_ids(PROMPTS * 2, CHOSEN + REJECTED, PAD)


def test_preference_step(models, capsys):
    policy, reference, data = models
    before = [p.detach().clone() for p in reference.parameters()]
    check_preference_step(step_solution, policy, reference, data, 0.1, lr=0.1)
    assert "correct" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(before, reference.parameters(), strict=True))  # on copies
    for kwargs, match in [
        ({"ascend": True}, "went up"),
        ({"no_step": True}, "did not move"),
    ]:
        with pytest.raises(ExerciseError, match=match):
            check_preference_step(
                lambda *a, kw=kwargs: step_solution(*a, **kw), policy, reference, data, 0.1, lr=0.1
            )

    def trains_the_reference(policy, reference, batch, optimizer, beta):  # the two models' roles swapped
        return step_solution(reference, policy, batch, torch.optim.SGD(reference.parameters(), lr=0.1), beta)

    with pytest.raises(ExerciseError, match="pi_ref's parameters changed"):
        check_preference_step(trains_the_reference, policy, reference, data, 0.1, lr=0.1)
