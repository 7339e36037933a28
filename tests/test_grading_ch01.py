"""The checks of chapter 01's graded exercises: the right answer passes, each typical mistake is named.

Every wrong answer below is written the way a student would write it (not taken from the checker's own
table of mistakes), so a checker that stops recognising a mistake fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from tdpo_lab.config import load_config
from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch01 import check_lr_schedule, check_next_token_loss, check_pack_blocks

# ---------------------------------------------------------------- exercise 1: packing

TOY = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36]]  # 14 tokens with EOS: 3 blocks of 4, a tail of 2
EOS, L = 0, 4


def pack(toy, eos, size):
    stream = [tok for ids in toy for tok in (*ids, eos)]
    return torch.tensor(stream[: len(stream) // size * size]).view(-1, size)


def test_packing_right(capsys):
    check_pack_blocks(pack(TOY, EOS, L), TOY, EOS, L)
    assert capsys.readouterr().out.startswith("correct: 3 blocks of 4 tokens")
    check_pack_blocks(pack(TOY, EOS, L).tolist(), TOY, EOS, L)  # a nested list of ints is fine too


def wrong_packings():
    stream = [tok for ids in TOY for tok in (*ids, EOS)]
    no_eos = [tok for ids in TOY for tok in ids]
    eos_first = [tok for ids in TOY for tok in (EOS, *ids)]
    padded = stream + [EOS] * (-len(stream) % L)
    yield "no_eos", torch.tensor(no_eos[: len(no_eos) // L * L]).view(-1, L), "without an EOS"
    yield "eos_first", torch.tensor(eos_first[:12]).view(-1, L), "EOS put before each review"
    yield "tail_kept", torch.tensor(padded).view(-1, L), "the tail kept"
    yield "head_dropped", torch.tensor(stream[-12:]).view(-1, L), "first tokens of the stream dropped"
    yield "column_major", torch.tensor(stream[:12]).view(L, -1).T, "column by column"
    yield "float", pack(TOY, EOS, L).float(), "token ids are integers"
    yield "off_by_one", torch.tensor(stream[1:13]).view(-1, L), "largest difference"


@pytest.mark.parametrize(("case", "mine", "message"), list(wrong_packings()), ids=lambda v: str(v)[:12])
def test_packing_mistakes_are_named(case, mine, message):
    with pytest.raises(ExerciseError, match=message):
        check_pack_blocks(mine, TOY, EOS, L)


# ---------------------------------------------------------------- exercise 2: the learning rate


@pytest.fixture
def cfg():
    return load_config("tiny", fast=True).replace(sft_steps=20, sft_warmup_steps=4, sft_lr=3e-3)


def schedule(cfg, *, warm=lambda s, W: (s + 1) / W, floor=0.1, amp=0.45, pi=math.pi, start="W", peak=True):
    """lr_after as a student writes it, with one knob per typical slip."""
    W, S = cfg.sft_warmup_steps, cfg.sft_steps

    def lr_after(s):
        scale = cfg.sft_lr if peak else 1.0
        if s < W:
            return scale * warm(s, W)
        frac = min((s - W) / max(S - W, 1), 1.0) if start == "W" else min(s / S, 1.0)
        return scale * (floor + amp * (1 + math.cos(pi * frac)))

    return lr_after


def test_schedule_right(cfg, capsys):
    check_lr_schedule(schedule(cfg), cfg)
    assert "at every step s" in capsys.readouterr().out
    check_lr_schedule(schedule(cfg.replace(sft_warmup_steps=0)), cfg.replace(sft_warmup_steps=0))


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        (dict(warm=lambda s, W: s / W), r"s / W instead of \(s \+ 1\) / W"),
        (dict(floor=0.0, amp=0.5), "decays to 0"),
        (dict(amp=0.5), "0.45 = 0.9 / 2"),
        (dict(start="0"), "counted from step 0"),
        (dict(pi=1.0), "without the factor pi"),
        (dict(peak=False), "multiplier alone"),
        (dict(warm=lambda s, W: 2.0), "largest difference"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_schedule_mistakes_are_named(cfg, slip, message):
    with pytest.raises(ExerciseError, match=message):
        check_lr_schedule(schedule(cfg, **slip), cfg)


def test_schedule_linear_decay_and_no_warmup_are_named(cfg):
    W, S = cfg.sft_warmup_steps, cfg.sft_steps

    def linear(s):
        return cfg.sft_lr * ((s + 1) / W if s < W else 1 - 0.9 * (s - W) / (S - W))

    def no_warmup(s):
        return cfg.sft_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * max(s - W, 0) / (S - W))))

    with pytest.raises(ExerciseError, match="linear decay"):
        check_lr_schedule(linear, cfg)
    with pytest.raises(ExerciseError, match="no warm-up"):
        check_lr_schedule(no_warmup, cfg)
    with pytest.raises(ExerciseError, match="must be a function"):
        check_lr_schedule(0.001, cfg)


# ---------------------------------------------------------------- exercise 3: the next-token loss


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 7, 11, generator=gen)
    ids = torch.randint(0, 11, (3, 7), generator=gen)
    return logits, ids


def loss(
    logits, ids, *, z=lambda lg: lg.log_softmax(-1), shift=(slice(None, -1), slice(1, None)), red="mean"
):
    """The mean next-token cross-entropy as a student writes it, with one knob per typical slip."""
    cut_z, cut_ids = shift
    nll = -z(logits)[:, cut_z].gather(-1, ids[:, cut_ids, None]).squeeze(-1)
    return {"mean": nll.mean(), "sum": nll.sum(), "per_block": nll.sum(-1).mean(), "rows": nll.mean(-1)}[red]


def test_loss_right(batch, capsys):
    logits, ids = batch
    check_next_token_loss(loss(logits, ids), logits, ids)
    assert "over 18 predicted tokens" in capsys.readouterr().out
    written_out = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) - logits[:, :-1].logsumexp(-1)
    check_next_token_loss(-written_out.mean(), logits, ids)  # the chapter's way
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    check_next_token_loss(hf, logits, ids)  # what a Hugging Face causal LM's .loss does


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        (dict(shift=(slice(None), slice(None))), "no shift"),
        (dict(shift=(slice(1, None), slice(None, -1))), "the wrong way round"),
        (dict(red="sum"), "sum over the positions and blocks"),
        (dict(red="per_block"), "each block's sum"),
        (dict(z=lambda lg: lg), "raw logit"),
        (dict(z=lambda lg: lg.log_softmax(-1) / math.log(2)), "log base 2"),
        (dict(red="rows"), r"has shape \(3,\), expected \(\)"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_loss_mistakes_are_named(batch, slip, message):
    logits, ids = batch
    with pytest.raises(ExerciseError, match=message):
        check_next_token_loss(loss(logits, ids, **slip), logits, ids)


def test_loss_sign_and_perplexity_are_named(batch):
    logits, ids = batch
    right = loss(logits, ids)
    with pytest.raises(ExerciseError, match="without its minus sign"):
        check_next_token_loss(-right, logits, ids)
    with pytest.raises(ExerciseError, match="perplexity"):
        check_next_token_loss(right.exp(), logits, ids)
