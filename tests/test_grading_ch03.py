"""The checks of chapter 03's graded exercises: a right answer passes, each typical mistake is named.

A toy of the chapter's kind, built here independently of the notebook: a 3-token vocabulary (two words and
EOS), responses of at most 3 tokens, random reference logits per prefix and a random reward per response.
Every exercise is solved the way a student would write it, then broken the way students break it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tdpo_lab.course.grading import ExerciseError
from tdpo_lab.course.grading.ch03 import (
    check_advantage_identity,
    check_kl_grad,
    check_sequence_optimum,
    check_summed_advantages,
    check_values,
)

VOCAB, MAX_LEN, BETA = 3, 3, 0.7
EOS = VOCAB - 1
DT = torch.float64


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    words = range(VOCAB - 1)
    states = [p for k in range(MAX_LEN) for p in itertools.product(words, repeat=k)]
    seqs = [s + (EOS,) for s in states] + list(itertools.product(words, repeat=MAX_LEN))
    tok_logp = {s: F.log_softmax(1.5 * torch.randn(VOCAB, generator=g, dtype=DT), -1) for s in states}
    reward = torch.randn(len(seqs), generator=g, dtype=DT)
    logp_ref = torch.stack([sum(tok_logp[y[:t]][y[t]] for t in range(len(y))) for y in seqs])
    return {"states": states, "seqs": seqs, "tok_logp": tok_logp, "reward": reward, "logp_ref": logp_ref}


def student_values(toy, *, combine=None, bootstrap=True):
    """The chapter's backward induction, as a student writes it; ``combine`` and ``bootstrap`` break it."""
    combine = combine or (lambda lp, q: (lp.exp() * q).sum())
    leaf = {y: toy["reward"][i] for i, y in enumerate(toy["seqs"])}
    Q, V = {}, {}
    for s in sorted(toy["states"], key=len, reverse=True):
        nxt = [V.get(s + (z,), 0.0) if bootstrap else 0.0 for z in range(VOCAB)]
        Q[s] = torch.stack([leaf.get(s + (z,), torch.zeros((), dtype=DT)) + nxt[z] for z in range(VOCAB)])
        V[s] = combine(toy["tok_logp"][s], Q[s])
    return Q, V


def token_optimum(toy):
    Q, _ = student_values(toy)
    return {s: F.log_softmax(toy["tok_logp"][s] + Q[s] / BETA, -1) for s in toy["states"]}


def kl(logp, logq):
    return (logp.exp() * (logp - logq)).sum(-1)


# 1 · log Z(x) and the sequence-level optimum


def test_sequence_optimum_passes(toy, capsys):
    log_Z = torch.logsumexp(toy["logp_ref"] + toy["reward"] / BETA, 0)
    logp_star = toy["logp_ref"] + toy["reward"] / BETA - log_Z
    check_sequence_optimum(log_Z, logp_star, toy["logp_ref"], toy["reward"], BETA)
    assert capsys.readouterr().out.startswith("correct: log Z(x)")
    # the same answer written as a log-softmax, and as floats rather than a tensor, passes too
    check_sequence_optimum(
        log_Z.item(),
        F.log_softmax(toy["logp_ref"] + toy["reward"] / BETA, 0),
        toy["logp_ref"],
        toy["reward"],
        BETA,
    )


@pytest.mark.parametrize(
    ("broken_Z", "match"),
    [
        (lambda lp, r: torch.logsumexp(r / BETA, 0), "without pi_ref's weights"),
        (lambda lp, r: torch.logsumexp(r / BETA, 0) - torch.log(torch.tensor(float(len(r)))), "an average"),
        (lambda lp, r: BETA * torch.logsumexp(lp + r / BETA, 0), r"beta log Z\(x\) rather than"),
        (lambda lp, r: torch.logsumexp(lp + r / BETA, 0).exp(), "not its log"),
        (lambda lp, r: torch.logsumexp(lp + BETA * r, 0), "multiplied by beta"),
        (lambda lp, r: torch.logsumexp(lp - r / BETA, 0), "sign flipped"),
    ],
)
def test_log_Z_mistakes_are_named(toy, broken_Z, match):
    log_Z = broken_Z(toy["logp_ref"], toy["reward"])
    with pytest.raises(ExerciseError, match=f"log_Z is not right: it looks like .*{match}"):
        check_sequence_optimum(log_Z, toy["logp_ref"] * 0, toy["logp_ref"], toy["reward"], BETA)


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (lambda lp, r, lz: lp + r / BETA, "without log Z"),
        (lambda lp, r, lz: lp + r / BETA + lz, "added instead of subtracted"),
        (lambda lp, r, lz: lp + r / BETA - BETA * lz, r"beta log Z\(x\) subtracted"),
        (lambda lp, r, lz: (lp + r / BETA - lz).exp(), "itself, not its log"),
        (lambda lp, r, lz: F.log_softmax(lp + BETA * r, 0), "multiplied by beta"),
        (lambda lp, r, lz: F.log_softmax(lp - r / BETA, 0), "sign flipped"),
        (lambda lp, r, lz: F.log_softmax(r / BETA, 0), "pi_ref left out"),
    ],
)
def test_logp_star_mistakes_are_named(toy, broken, match):
    log_Z = torch.logsumexp(toy["logp_ref"] + toy["reward"] / BETA, 0)
    logp_star = broken(toy["logp_ref"], toy["reward"], log_Z)
    with pytest.raises(ExerciseError, match=f"logp_star is not right: it looks like .*{match}"):
        check_sequence_optimum(log_Z, logp_star, toy["logp_ref"], toy["reward"], BETA)


def test_sequence_optimum_wrong_shape_and_unknown_error(toy):
    log_Z = torch.logsumexp(toy["logp_ref"] + toy["reward"] / BETA, 0)
    with pytest.raises(ExerciseError, match=r"logp_star has shape \(\), expected"):
        check_sequence_optimum(log_Z, log_Z, toy["logp_ref"], toy["reward"], BETA)
    noisy = toy["logp_ref"] + toy["reward"] / BETA - log_Z
    noisy = noisy + 0.1 * (torch.arange(len(noisy)) == 3)
    with pytest.raises(ExerciseError, match=r"largest difference is 0.1 at index \(3,\)"):
        check_sequence_optimum(log_Z, noisy, toy["logp_ref"], toy["reward"], BETA)


# 2 · Q and V by backward induction


def test_values_pass(toy, capsys):
    Q, V = student_values(toy)
    check_values(Q, V, toy["tok_logp"], toy["reward"], toy["seqs"])
    assert capsys.readouterr().out.startswith("correct: Q_ref and V_ref")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"combine": lambda lp, q: q.max()}, r"max_z Q\(s, z\)"),
        ({"combine": lambda lp, q: q.mean()}, "plain mean"),
        ({"combine": lambda lp, q: (lp * q).sum()}, "weighted by log-probabilities"),
        ({"bootstrap": False}, "without the value of the next state"),
    ],
)
def test_values_mistakes_are_named(toy, kwargs, match):
    Q, V = student_values(toy, **kwargs)
    with pytest.raises(ExerciseError, match=f"Q_ref is not right: it looks like .*{match}"):
        check_values(Q, V, toy["tok_logp"], toy["reward"], toy["seqs"])


def test_values_v_alone_wrong_and_missing_states(toy):
    Q, V = student_values(toy)
    V_max = {s: Q[s].max() for s in V}  # Q right, only the last line wrong: named on V
    with pytest.raises(ExerciseError, match=r"V_ref is not right: it looks like V\(s\) = max_z"):
        check_values(Q, V_max, toy["tok_logp"], toy["reward"], toy["seqs"])
    with pytest.raises(ExerciseError, match=r"V_ref has no entry for the state \(\)"):
        check_values(Q, {s: v for s, v in V.items() if s}, toy["tok_logp"], toy["reward"], toy["seqs"])
    with pytest.raises(ExerciseError, match="must be a dict"):
        check_values(Q, torch.stack(list(V.values())), toy["tok_logp"], toy["reward"], toy["seqs"])
    V_off = dict(V)
    V_off[(1,)] = V_off[(1,)] + 0.5
    with pytest.raises(
        ExerciseError, match=r"V_ref is not right: the largest difference .*is the state \(1,\)"
    ):
        check_values(Q, V_off, toy["tok_logp"], toy["reward"], toy["seqs"])


# 3 · the advantage identity


def test_advantage_identity_passes_and_equals_q_minus_v(toy, capsys):
    star, ref = token_optimum(toy), toy["tok_logp"]
    A_mine = {s: BETA * (star[s] - ref[s]) + BETA * kl(ref[s], star[s]) for s in toy["states"]}
    check_advantage_identity(A_mine, star, ref, BETA)
    assert capsys.readouterr().out.startswith("correct: A_ref")
    Q, V = student_values(toy)  # the identity: Q - V passes the same check
    check_advantage_identity({s: Q[s] - V[s] for s in Q}, star, ref, BETA)


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (lambda st, rf: BETA * (st - rf) + BETA * kl(st, rf), r"reverse KL\(pi\* \|\| pi_ref\)"),
        (lambda st, rf: BETA * (st - rf), "the part DPO sees"),
        (lambda st, rf: BETA * (st - rf) - BETA * kl(rf, st), "subtracted instead of added"),
        (lambda st, rf: BETA * (rf - st) + BETA * kl(rf, st), "upside down"),
        (lambda st, rf: (st - rf) + kl(rf, st), "beta left out"),
        (lambda st, rf: BETA * (st - rf) + kl(rf, st), "beta only on the log-ratio"),
    ],
)
def test_advantage_identity_mistakes_are_named(toy, broken, match):
    star, ref = token_optimum(toy), toy["tok_logp"]
    A_mine = {s: broken(star[s], ref[s]) for s in toy["states"]}
    with pytest.raises(ExerciseError, match=f"A_mine is not right: it looks like .*{match}"):
        check_advantage_identity(A_mine, star, ref, BETA)


# 4 · summed advantages


def summed(toy, A, pick=lambda y: range(len(y)), shift=0):
    zero = torch.zeros((), dtype=DT)  # a response of one token has nothing left when one is skipped
    return torch.stack([sum((A[y[:t]][y[t + shift]] for t in pick(y)), zero) for y in toy["seqs"]])


def test_summed_advantages_pass_and_telescope(toy, capsys):
    Q, V = student_values(toy)
    A = {s: Q[s] - V[s] for s in Q}
    sumA = summed(toy, A)
    check_summed_advantages(sumA, Q, V, toy["seqs"])
    assert capsys.readouterr().out.startswith("correct: sum_t A_ref")
    torch.testing.assert_close(sumA, toy["reward"] - V[()])  # what the exercise is for


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (lambda toy, Q, V, A: toy["reward"], r"r\(x, y\) itself"),
        (lambda toy, Q, V, A: -summed(toy, A), "sign flipped"),
        (lambda toy, Q, V, A: summed(toy, Q), r"Q_ref\(s_t, y_t\) summed"),
        (
            lambda toy, Q, V, A: torch.stack([sum(V[y[:t]] for t in range(len(y))) for y in toy["seqs"]]),
            "values",
        ),
        (
            lambda toy, Q, V, A: summed(toy, A, pick=lambda y: range(len(y) - 1)),
            "last token's advantage left out",
        ),
        (lambda toy, Q, V, A: summed(toy, A, pick=lambda y: range(1, len(y))), "first token's advantage"),
        (
            lambda toy, Q, V, A: torch.stack(
                [sum(A[y[:t]].sum() for t in range(len(y))) for y in toy["seqs"]]
            ),
            "whole row",
        ),
        (lambda toy, Q, V, A: summed(toy, A, pick=lambda y: range(len(y) - 1), shift=1), "off-by-one"),
    ],
)
def test_summed_advantages_mistakes_are_named(toy, broken, match):
    Q, V = student_values(toy)
    A = {s: Q[s] - V[s] for s in Q}
    with pytest.raises(ExerciseError, match=f"sumA_ref is not right: it looks like .*{match}"):
        check_summed_advantages(broken(toy, Q, V, A), Q, V, toy["seqs"])


# 5 · the gradient of the per-position KL


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(1)
    z_r = 2.0 * torch.randn(5, 7, generator=g, dtype=DT)
    z_t = (2.0 * torch.randn(5, 7, generator=g, dtype=DT)).requires_grad_()
    return z_r, z_t


def test_kl_grad_passes(logits, capsys):
    z_r, z_t = logits
    check_kl_grad(F.softmax(z_t.detach(), -1) - F.softmax(z_r, -1), z_r, z_t)
    assert capsys.readouterr().out.startswith("correct: d KL")
    # without .detach() the value is the same: a tensor that carries a graph is fine
    check_kl_grad(F.softmax(z_t, -1) - F.softmax(z_r, -1), z_r, z_t)


def _reverse_kl_grad(z_r, z_t):
    z_t = z_t.detach().clone().requires_grad_()
    lp_t, lp_r = F.log_softmax(z_t, -1), F.log_softmax(z_r, -1)
    (g,) = torch.autograd.grad((lp_t.exp() * (lp_t - lp_r)).sum(), z_t)
    return g


def _ref_side_grad(z_r, z_t):
    z_r = z_r.detach().clone().requires_grad_()
    lp_t, lp_r = F.log_softmax(z_t.detach(), -1), F.log_softmax(z_r, -1)
    (g,) = torch.autograd.grad((lp_r.exp() * (lp_r - lp_t)).sum(), z_r)
    return g


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (lambda z_r, z_t: F.softmax(z_r, -1) - F.softmax(z_t, -1), "sign flipped"),
        (lambda z_r, z_t: F.log_softmax(z_t, -1) - F.log_softmax(z_r, -1), "not log-probabilities"),
        (lambda z_r, z_t: z_t - z_r, "the softmax is missing"),
        (lambda z_r, z_t: z_t.exp() - z_r.exp(), "not normalised"),
        (lambda z_r, z_t: F.softmax(z_t, -1), r"p_theta alone"),
        (_reverse_kl_grad, r"reverse KL\(pi_theta \|\| pi_ref\)"),
        (_ref_side_grad, "with respect to the reference logits"),
    ],
)
def test_kl_grad_mistakes_are_named(logits, broken, match):
    z_r, z_t = logits
    with pytest.raises(ExerciseError, match=f"grad_formula is not right: it looks like .*{match}"):
        check_kl_grad(broken(z_r, z_t.detach()), z_r, z_t)


def test_kl_grad_wrong_shape(logits):
    z_r, z_t = logits
    with pytest.raises(ExerciseError, match=r"grad_formula has shape \(5,\), expected \(5, 7\)"):
        check_kl_grad((F.softmax(z_t.detach(), -1) - F.softmax(z_r, -1)).sum(-1), z_r, z_t)
