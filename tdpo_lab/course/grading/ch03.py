"""Checks for the graded exercises of notebooks/03_bradley_terry_token_reward.ipynb.

The chapter's toy is a tree: ``states`` are unfinished prefixes (tuples of token ids), a policy is a dict
``{state: [V] log-probabilities}``, and the finished responses ``seqs`` are its leaves, with one reward each.
Every checker recomputes the exercise's value from those inputs (the KL gradient through the kit's own
:func:`tdpo_lab.core.logprobs.token_stats`) and hands it to :func:`tdpo_lab.course.grading.check_close` together with
the values that typical mistakes produce, so that a wrong answer is told which mistake it looks like.

1. :func:`check_sequence_optimum` (section 2): log Z(x) and log pi*(y|x) = log pi_ref + r/beta - log Z(x);
2. :func:`check_values` (section 3): Q_ref and V_ref by backward induction over the tree;
3. :func:`check_advantage_identity` (section 3): A_ref = beta log pi*/pi_ref + beta KL(pi_ref || pi*);
4. :func:`check_summed_advantages` (section 4): sum_t A_ref(s_t, y_t) along every response;
5. :func:`check_kl_grad` (section 6): d KL(pi_ref || pi_theta) / d z_theta = p_theta - p_ref.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tdpo_lab.core.logprobs import token_stats
from tdpo_lab.course.grading import ExerciseError, check_close, passed

__all__ = [
    "check_advantage_identity",
    "check_kl_grad",
    "check_sequence_optimum",
    "check_summed_advantages",
    "check_values",
]

Table = Mapping[tuple, Tensor]  # {state (a prefix of token ids): tensor}


def _states(tok_logp: Table) -> list[tuple]:
    """The toy's states, deepest first: children come before their parents in backward induction."""
    return sorted(tok_logp, key=len, reverse=True)


def _stack(table, states: Sequence[tuple], name: str) -> Tensor:
    """A student's ``{state: value}`` dict as one tensor, rows in the order of ``states``."""
    if not isinstance(table, Mapping):
        raise ExerciseError(
            f"{name} must be a dict {{state: value}} with one entry per state (prefix), "
            f"got {type(table).__name__}"
        )
    missing = [s for s in states if s not in table]
    if missing:
        raise ExerciseError(
            f"{name} has no entry for the state {missing[0]} "
            f"({len(missing)} of {len(states)} states missing): it needs one per unfinished prefix"
        )
    try:
        rows = [
            v if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float64)
            for v in map(table.get, states)
        ]
        return torch.stack([r.detach().to(torch.float64) for r in rows])
    except (TypeError, ValueError, RuntimeError) as err:
        raise ExerciseError(f"the entries of {name} must be tensors of one shape: {err}") from None


def _where(mine: Tensor, want: Tensor, states: Sequence[tuple], name: str) -> str:
    """A hint that names the state of the largest difference (the message's index is a row number)."""
    if mine.shape != want.shape:
        return ""
    diff = (mine - want).abs().reshape(len(states), -1).amax(-1)
    return f"(row {int(diff.argmax())} of {name} is the state {states[int(diff.argmax())]}.)"


# 1 · section 2: the KL-regularised optimum pi* = pi_ref e^{r/beta} / Z(x) over whole responses


def check_sequence_optimum(log_Z, logp_star, logp_ref: Tensor, reward: Tensor, beta: float) -> None:
    """Graded exercise 1: ``log_Z`` (a scalar) and ``logp_star`` (``[S]``, one entry per response).

    Z(x) = sum_y pi_ref(y|x) e^{r(x,y)/beta} and log pi*(y|x) = log pi_ref(y|x) + r(x,y)/beta - log Z(x)
    (Rafailov et al., 2023, Eq. 4), from ``logp_ref`` ``[S]`` (log pi_ref(y|x) per response) and ``reward``
    ``[S]``.
    """
    logp_ref, reward = logp_ref.detach(), reward.detach()
    tilted = logp_ref + reward / beta
    want_Z = torch.logsumexp(tilted, dim=0)
    check_close(
        log_Z,
        want_Z,
        name="log_Z",
        mistakes={
            "Z(x) without pi_ref's weights (a sum of e^{r/beta} alone)": lambda: torch.logsumexp(
                reward / beta, dim=0
            ),
            "an average of e^{r/beta} over the responses: Z(x) weighs them by pi_ref(y|x), not uniformly": (
                lambda: torch.logsumexp(reward / beta, dim=0) - math.log(reward.numel())
            ),
            "beta log Z(x) rather than log Z(x)": lambda: beta * want_Z,
            "Z(x) itself, not its log": lambda: want_Z.exp(),
            "r multiplied by beta instead of divided by it": lambda: torch.logsumexp(
                logp_ref + beta * reward, dim=0
            ),
            "the reward's sign flipped (pi_ref e^{-r/beta})": lambda: torch.logsumexp(
                logp_ref - reward / beta, dim=0
            ),
        },
        hint="log Z(x) is a log-sum-exp over every response of log pi_ref(y|x) + r(x,y)/beta.",
    )
    want = tilted - want_Z
    check_close(
        logp_star,
        want,
        name="logp_star",
        mistakes={
            "log pi_ref + r/beta without log Z(x): pi* must be normalised, subtract log Z(x)": tilted,
            "log Z(x) added instead of subtracted": lambda: tilted + want_Z,
            "beta log Z(x) subtracted instead of log Z(x)": lambda: tilted - beta * want_Z,
            "pi*(y|x) itself, not its log": lambda: want.exp(),
            "r multiplied by beta instead of divided by it": lambda: F.log_softmax(
                logp_ref + beta * reward, dim=0
            ),
            "the reward's sign flipped (pi_ref e^{-r/beta})": lambda: F.log_softmax(
                logp_ref - reward / beta, dim=0
            ),
            "pi_ref left out (e^{r/beta} / Z alone)": lambda: F.log_softmax(reward / beta, dim=0),
        },
        hint="Each entry is log pi_ref(y|x) + r(x,y)/beta - log Z(x); the exponentials sum to one.",
    )
    passed(
        f"log Z(x) = {want_Z.item():.4f}, and log pi*(y|x) = log pi_ref + r/beta - log Z for all "
        f"{want.numel()} responses"
    )


# 2 · section 3: Q and V of pi_ref by backward induction


def _tree_values(
    tok_logp: Table,
    leaf_reward: Mapping[tuple, Tensor],
    combine: Callable[[Tensor, Tensor], Tensor],
    *,
    bootstrap: bool = True,
) -> tuple[dict, dict]:
    """Q and V over the tree with the whole reward paid on the token that ends a response.

    ``combine(log_probs, q)`` turns a state's Q row into its V (the right answer is the mean under pi);
    ``bootstrap=False`` leaves V(s z) out of Q(s, z), one of the mistakes checked.
    """
    Q, V = {}, {}
    for s in _states(tok_logp):
        zero = torch.zeros((), dtype=torch.float64)
        row = []
        for z in range(tok_logp[s].shape[-1]):
            child = s + (z,)
            r = leaf_reward.get(child, zero)
            row.append(r + (V.get(child, zero) if bootstrap else zero))
        Q[s] = torch.stack(row)
        V[s] = combine(tok_logp[s].detach().double(), Q[s])
    return Q, V


def _mean_under_pi(logp: Tensor, q: Tensor) -> Tensor:
    return (logp.exp() * q).sum()


def check_values(Q_ref, V_ref, tok_logp: Table, reward: Tensor, seqs: Sequence[tuple]) -> None:
    """Graded exercise 2: ``Q_ref`` ``{state: [V]}`` and ``V_ref`` ``{state: scalar}`` of ``tok_logp``.

    Bellman with deterministic transitions and the whole reward paid at the last token:
    Q(s, z) = R(s, z) + V(s z) (V = 0 after the end) and V(s) = sum_z pi(z|s) Q(s, z), deepest states first.
    """
    states = _states(tok_logp)
    leaf_reward = {tuple(y): reward[i].detach().double() for i, y in enumerate(seqs)}
    wrong_combines = {
        "V(s) = max_z Q(s, z), the value of always taking the best token: V_ref averages Q under pi_ref": (
            lambda lp, q: q.max()
        ),
        "V(s) as a plain mean of Q(s, .) over the tokens: weigh each token by its probability pi_ref(z|s)": (
            lambda lp, q: q.mean()
        ),
        "V(s) weighted by log-probabilities: tok_logp holds log pi(z|s), weigh by its exp()": (
            lambda lp, q: (lp * q).sum()
        ),
    }
    Q_want, V_want = _tree_values(tok_logp, leaf_reward, _mean_under_pi)
    # Q first. A wrong V line makes Q wrong too (Q reads the children's V), so Q's mistakes are whole
    # recursions run with each wrong line; the message then names the line that caused it.
    variants = {k: _tree_values(tok_logp, leaf_reward, c)[0] for k, c in wrong_combines.items()}
    variants["Q(s, z) = R(s, z) without the value of the next state: Bellman adds V(s z)"] = _tree_values(
        tok_logp, leaf_reward, _mean_under_pi, bootstrap=False
    )[0]
    want_t, mine_t = torch.stack([Q_want[s] for s in states]), _stack(Q_ref, states, "Q_ref")
    check_close(
        mine_t,
        want_t,
        name="Q_ref",
        mistakes={k: torch.stack([q[s] for s in states]) for k, q in variants.items()},
        rtol=1e-6,
        atol=1e-9,
        hint=_where(mine_t, want_t, states, "Q_ref"),
    )
    # Q is right, so a wrong V is the last line alone, applied to the right Q
    lp = {s: tok_logp[s].detach().double() for s in states}
    want_t, mine_t = torch.stack([V_want[s] for s in states]), _stack(V_ref, states, "V_ref")
    check_close(
        mine_t,
        want_t,
        name="V_ref",
        mistakes={k: torch.stack([c(lp[s], Q_want[s]) for s in states]) for k, c in wrong_combines.items()},
        rtol=1e-6,
        atol=1e-9,
        hint=_where(mine_t, want_t, states, "V_ref"),
    )
    root = min(states, key=len)
    passed(f"Q_ref and V_ref at all {len(states)} states; V_ref(x) = {V_want[root].item():.4f}")


# 3 · section 3: the advantage in terms of the token-level optimum


def check_advantage_identity(A_mine, logp_star_tok: Table, logp_ref_tok: Table, beta: float) -> None:
    """Graded exercise 3: ``A_mine`` ``{state: [V]}`` = beta log pi*/pi_ref + beta KL(pi_ref || pi*) at s.

    ``logp_star_tok`` and ``logp_ref_tok`` are ``{state: [V] log-probabilities}`` of the token-level optimum
    and of the reference. The KL is the forward one: it comes from averaging Q under pi_ref.
    """
    states = _states(logp_ref_tok)
    star = torch.stack([logp_star_tok[s].detach().double() for s in states])  # [n_states, V]
    ref = torch.stack([logp_ref_tok[s].detach().double() for s in states])
    log_ratio = star - ref
    forward = (ref.exp() * (ref - star)).sum(-1, keepdim=True)  # KL(pi_ref || pi*) per state
    reverse = (star.exp() * (star - ref)).sum(-1, keepdim=True)  # KL(pi* || pi_ref)
    want = beta * log_ratio + beta * forward
    mine = _stack(A_mine, states, "A_mine")
    check_close(
        mine,
        want,
        name="A_mine",
        mistakes={
            "the reverse KL(pi* || pi_ref): averaging Q under pi_ref puts pi_ref first, KL(pi_ref || pi*)": (
                beta * log_ratio + beta * reverse
            ),
            "beta log pi*/pi_ref alone, the part DPO sees: the beta KL(pi_ref || pi*) term is missing": (
                beta * log_ratio
            ),
            "the KL term subtracted instead of added": beta * log_ratio - beta * forward,
            "the log-ratio upside down (log pi_ref/pi*)": -beta * log_ratio + beta * forward,
            "beta left out (log pi*/pi_ref + KL)": log_ratio + forward,
            "beta only on the log-ratio (the KL needs it too)": beta * log_ratio + forward,
        },
        rtol=1e-6,
        atol=1e-9,
        hint=_where(mine, want, states, "A_mine"),
    )
    passed(f"A_ref = beta log pi*/pi_ref + beta KL(pi_ref || pi*) at all {len(states)} states, no Z needed")


# 4 · section 4: summed advantages along a response


def check_summed_advantages(sumA, Q: Table, V: Table, seqs: Sequence[tuple]) -> None:
    """Graded exercise 4: ``sumA`` ``[S]``, the sum over t of A(s_t, y_t) = Q(s_t, y_t) - V(s_t) per response.

    ``Q`` ``{state: [V]}`` and ``V`` ``{state: scalar}`` as the chapter's ``values`` returns them; the
    responses in the order of ``seqs``.
    """
    seqs = [tuple(y) for y in seqs]

    def along(term: Callable[[tuple, int, int], Tensor], skip_first=False, skip_last=False) -> Tensor:
        # term(state, token, t) summed over the positions t of each response
        out = []
        for y in seqs:
            ts = range(1 if skip_first else 0, len(y) - (1 if skip_last else 0))
            out.append(sum((term(y[:t], y[t], t) for t in ts), torch.zeros((), dtype=torch.float64)))
        return torch.stack(out)

    def adv(s, z, t):
        return (Q[s][z] - V[s]).detach().double()

    want = along(adv)
    root = min(Q, key=len)
    check_close(
        sumA,
        want,
        name="sumA_ref",
        mistakes={
            "r(x, y) itself: the advantages telescope to r(x, y) - V_ref(x), not to r": lambda: (
                want + V[root].detach().double()
            ),
            "the sign flipped": -want,
            "Q_ref(s_t, y_t) summed instead of the advantages Q - V": lambda: along(
                lambda s, z, t: Q[s][z].detach().double()
            ),
            "the values V_ref(s_t) summed instead of the advantages": lambda: along(
                lambda s, z, t: V[s].detach().double()
            ),
            "the last token's advantage left out (t runs from 1 to T, EOS included)": lambda: along(
                adv, skip_last=True
            ),
            "the first token's advantage left out (t starts at 1, at the state s_1 = x)": lambda: along(
                adv, skip_first=True
            ),
            "the whole row A(s_t, .) summed at each state: take only the token y_t that was written": (
                lambda: along(lambda s, z, t: (Q[s] - V[s]).sum().detach().double())
            ),
            "an off-by-one: A(s_t, .) read at the next token y_{t+1}": lambda: torch.stack(
                [
                    sum(
                        (adv(y[:t], y[t + 1], t) for t in range(len(y) - 1)),
                        torch.zeros((), dtype=torch.float64),
                    )
                    for y in seqs
                ]
            ),
        },
        rtol=1e-6,
        atol=1e-9,
        hint="One number per response, in the order of seqs: A_ref[s][y[len(s)]] summed over its prefixes s.",
    )
    passed(f"sum_t A_ref(s_t, y_t) for all {len(seqs)} responses")


# 5 · section 6: the gradient of the per-position KL in logits


def check_kl_grad(grad, z_ref: Tensor, z_theta: Tensor) -> None:
    """Graded exercise 5: ``grad`` ``[R, V]`` = d KL(pi_ref || pi_theta) / d z_theta, one row per position.

    The expected value is the kit's: the backward pass of :func:`tdpo_lab.core.logprobs.token_stats` on the rows
    ``z_ref`` and ``z_theta`` (``[R, V]`` logits of the reference and the policy).
    """
    z_ref, z_theta = z_ref.detach().double(), z_theta.detach().double()
    rows, vocab = z_theta.shape
    # one sequence of R + 1 positions whose first R positions predict a (any) label: their KL is scored
    policy = torch.cat([z_theta, z_theta.new_zeros(1, vocab)])[None].requires_grad_()
    reference = torch.cat([z_ref, z_ref.new_zeros(1, vocab)])[None]
    labels = torch.zeros(1, rows + 1, dtype=torch.long)
    labels[0, 0] = -100
    (g,) = torch.autograd.grad(token_stats(policy, reference, labels).kl.sum(), policy)
    want = g[0, :rows]
    p_theta, p_ref = F.softmax(z_theta, -1), F.softmax(z_ref, -1)
    lp_theta, lp_ref = F.log_softmax(z_theta, -1), F.log_softmax(z_ref, -1)
    reverse_kl = (p_theta * (lp_theta - lp_ref)).sum(-1, keepdim=True)
    forward_kl = (p_ref * (lp_ref - lp_theta)).sum(-1, keepdim=True)
    check_close(
        grad,
        want,
        name="grad_formula",
        mistakes={
            "the sign flipped: p_ref - p_theta is minus the gradient (the direction a descent step takes)": (
                p_ref - p_theta
            ),
            "log p_theta - log p_ref: the gradient is a difference of probabilities, not log-probabilities": (
                lp_theta - lp_ref
            ),
            "z_theta - z_ref, the logits themselves: the softmax is missing": z_theta - z_ref,
            "e^{z_theta} - e^{z_ref}: exponentials not normalised (softmax divides by the sum)": (
                z_theta.exp() - z_ref.exp()
            ),
            "p_theta alone, the gradient of lse(z_theta): the term -sum_v p_ref z_theta adds -p_ref": p_theta,
            "the gradient of the reverse KL(pi_theta || pi_ref): the kit's KL puts pi_ref first": (
                p_theta * (lp_theta - lp_ref - reverse_kl)
            ),
            "the gradient with respect to the reference logits z_ref, not the policy's z_theta": (
                p_ref * (lp_ref - lp_theta - forward_kl)
            ),
        },
        rtol=1e-6,
        atol=1e-9,
        hint="Differentiate sum_v p_ref (z_ref - z_theta) + lse(z_theta) - lse(z_ref) in z_theta.",
    )
    passed("d KL(pi_ref || pi_theta) / d z_theta = p_theta - p_ref, the same as the kit's backward pass")
