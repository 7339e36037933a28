"""preference_loss, triplet_loss and left_align against naive float64 loops, plus the methods' identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tdpo_lab.core.logprobs import TokenStats, token_stats
from tdpo_lab.methods import LossOutput, get_method, left_align, method_names, preference_loss, triplet_loss

METHODS = method_names()  # every registered method: a new built-in method needs its naive formula below

B, T1 = 3, 6  # pairs, shifted length


def make_stats(seed=0, dtype=torch.float64):
    """Leaf tensors for logps and kl (so that gradients can be compared), a prompt and ragged padding."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * B
    mask = torch.ones(n, T1, dtype=torch.bool)
    mask[:, :1] = False  # prompt
    mask[0, 4:] = False  # padding
    mask[4, 3:] = False
    logps = (-3 * torch.rand(n, T1, generator=gen, dtype=dtype)).where(mask, 0).requires_grad_(True)
    ref_logps = (-3 * torch.rand(n, T1, generator=gen, dtype=dtype)).where(mask, 0)
    kl = torch.rand(n, T1, generator=gen, dtype=dtype).where(mask, 0).requires_grad_(True)
    weights = (0.1 + 2 * torch.rand(n, T1, generator=gen, dtype=dtype)).where(mask, 0)
    return TokenStats(logps, ref_logps, kl, mask), weights


def naive_loss(method, stats, beta, alpha, weights):
    """The docs/methods.md section 3 table written out pair by pair, position by position."""
    logps, ref, kl, mask = stats
    w = weights if method in ("attnpo", "tidpo") else torch.ones_like(logps)
    losses, metrics = [], {k: 0.0 for k in ("rw", "rl", "acc", "lw", "ll", "kw", "kl", "tw", "tl", "tacc")}

    def seq(row, values):
        return sum(values[row, t] for t in range(T1) if mask[row, t])

    for i in range(B):
        win, lose = i, i + B
        u = seq(win, w * (logps - ref)) - seq(lose, w * (logps - ref))
        kl_w, kl_l = seq(win, kl), seq(lose, kl)
        if method in ("dpo", "attnpo", "ipo"):
            z = u
        elif method == "tdpo1":
            z = u - (kl_l - kl_w)
        elif method in ("tdpo2", "tidpo"):  # the chosen SeqKL is a constant baseline
            z = u - alpha * (kl_l - kl_w.detach())
        else:
            raise NotImplementedError(f"write the naive formula of {method!r} here")
        if method == "ipo":  # IPO Eq. 17: (h - 1/(2 tau))^2 with tau = beta
            losses.append((z - 1.0 / (2.0 * beta)) ** 2)
        else:
            losses.append(-F.logsigmoid(beta * z))
        rw, rl = beta * seq(win, w * (logps - ref)), beta * seq(lose, w * (logps - ref))
        tw = beta * (seq(win, logps - ref) + kl_w)
        tl = beta * (seq(lose, logps - ref) + kl_l)
        for key, value in zip(
            metrics,
            (rw, rl, float(rw > rl), seq(win, logps), seq(lose, logps), kl_w, kl_l, tw, tl, float(tw > tl)),
            strict=True,
        ):
            metrics[key] += float(torch.as_tensor(value).detach()) / B
    losses = torch.stack(losses)
    named = {
        "loss": float(losses.mean().detach()),
        "rewards/chosen": metrics["rw"],
        "rewards/rejected": metrics["rl"],
        "rewards/margins": metrics["rw"] - metrics["rl"],
        "rewards/accuracies": metrics["acc"],
        "logps/chosen": metrics["lw"],
        "logps/rejected": metrics["ll"],
        "kl_seq/chosen": metrics["kw"],
        "kl_seq/rejected": metrics["kl"],
    }
    if method in ("tdpo1", "tdpo2", "tidpo"):
        named.update(
            {
                "token_reward/chosen": metrics["tw"],
                "token_reward/rejected": metrics["tl"],
                "token_reward/accuracies": metrics["tacc"],
            }
        )
    return losses, named


def call(method, stats, weights, **kw):
    return preference_loss(method, stats, weights=weights if get_method(method).weighted else None, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("beta, alpha", [(0.1, 0.5), (0.7, 1.3)])
def test_matches_naive_value_gradient_and_metrics(method, beta, alpha):
    stats, weights = make_stats(seed=METHODS.index(method))
    out = call(method, stats, weights, beta=beta, alpha=alpha)
    assert isinstance(out, LossOutput)
    want_losses, want_metrics = naive_loss(method, stats, beta, alpha, weights)
    torch.testing.assert_close(out.losses, want_losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, want_losses.mean(), rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(out.loss, (stats.logps, stats.kl), allow_unused=True)
    want_grads = torch.autograd.grad(want_losses.mean(), (stats.logps, stats.kl), allow_unused=True)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert (got is None) == (want is None)  # dpo and attnpo do not touch the KL
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert set(out.metrics) == set(want_metrics)
    assert all(type(v) is float for v in out.metrics.values())
    for key, value in want_metrics.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("method", METHODS)
def test_all_methods_start_at_their_zero_margin_value_when_policy_is_reference(method):
    """At pi_theta = pi_ref every sigmoid loss is ln 2; IPO's is its squared target (1 / (2 beta))^2."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * B, T1 + 1, 17, generator=gen)
    labels = torch.randint(0, 17, (2 * B, T1 + 1), generator=gen)
    labels[:, :2] = -100
    stats = token_stats(logits, logits, labels)
    weights = torch.rand(2 * B, T1, generator=gen) + 0.5
    out = call(method, stats, weights)
    start = (1.0 / (2.0 * 0.1)) ** 2 if method == "ipo" else math.log(2.0)
    torch.testing.assert_close(out.loss, torch.tensor(start), rtol=0, atol=1e-6)
    assert out.metrics["loss"] == pytest.approx(start, abs=1e-6)
    # equal rewards are not "accurate" (TRL counts chosen > rejected strictly)
    assert out.metrics["rewards/margins"] == 0.0 and out.metrics["rewards/accuracies"] == 0.0


def test_uniform_weights_reproduce_the_unweighted_losses_exactly():
    stats, _ = make_stats(seed=4)
    ones = torch.ones_like(stats.logps)
    for weighted, plain in (("attnpo", "dpo"), ("tidpo", "tdpo2")):
        a = preference_loss(weighted, stats, weights=ones, alpha=0.8)
        b = preference_loss(plain, stats, alpha=0.8)
        assert torch.equal(a.losses, b.losses)
        grads_a = torch.autograd.grad(a.loss, (stats.logps, stats.kl), allow_unused=True)
        grads_b = torch.autograd.grad(b.loss, (stats.logps, stats.kl), allow_unused=True)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            assert (ga is None and gb is None) or torch.equal(ga, gb)
        assert a.metrics == b.metrics
    # weights act: non-uniform weights change the loss
    skewed = ones.clone()
    skewed[:, 3] = 5.0
    assert not torch.equal(
        preference_loss("attnpo", stats, weights=skewed).losses, preference_loss("dpo", stats).losses
    )


@pytest.mark.parametrize("method", ["tdpo2", "tidpo"])
def test_tdpo2_has_no_gradient_through_the_chosen_kl(method):
    stats, weights = make_stats(seed=2)
    out = call(method, stats, weights)
    (grad_kl,) = torch.autograd.grad(out.loss, stats.kl)
    assert torch.all(grad_kl[:B] == 0)
    assert torch.all(grad_kl[B:][stats.mask[B:]] != 0)
    # TDPO1 keeps both sides: the same check fails there
    (grad_kl1,) = torch.autograd.grad(preference_loss("tdpo1", stats).loss, stats.kl)
    assert torch.all(grad_kl1[:B][stats.mask[:B]] != 0)


def test_tdpo_with_zero_kl_equals_dpo_and_dpo_ignores_kl():
    stats, _ = make_stats(seed=3)
    zero_kl = stats._replace(kl=torch.zeros_like(stats.kl))
    dpo = preference_loss("dpo", zero_kl)
    for method in ("tdpo1", "tdpo2"):
        torch.testing.assert_close(preference_loss(method, zero_kl).losses, dpo.losses, rtol=0, atol=0)
    assert torch.equal(preference_loss("dpo", stats).losses, dpo.losses)
    # and with a KL present the TDPO losses differ from DPO
    assert not torch.allclose(preference_loss("tdpo1", stats).losses, dpo.losses)


def test_masked_positions_never_matter():
    stats, weights = make_stats(seed=6)
    junk = torch.full_like(stats.logps, float("-inf"))
    noisy = TokenStats(
        torch.where(stats.mask, stats.logps, junk),
        torch.where(stats.mask, stats.ref_logps, junk),
        torch.where(stats.mask, stats.kl, torch.full_like(stats.kl, float("nan"))),
        stats.mask,
    )
    noisy_weights = torch.where(stats.mask, weights, torch.full_like(weights, float("nan")))
    for method in METHODS:
        a = call(method, stats, weights)
        b = call(method, noisy, noisy_weights)
        torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)


def test_bad_arguments_are_clear_errors():
    stats, weights = make_stats()
    with pytest.raises(ValueError, match="unknown method 'simpo'"):
        preference_loss("simpo", stats)
    odd = TokenStats(*(f[:5] for f in stats))
    with pytest.raises(ValueError, match="even number of rows"):
        preference_loss("dpo", odd)
    with pytest.raises(ValueError, match="needs token weights"):
        preference_loss("attnpo", stats)
    with pytest.raises(ValueError, match="takes no token weights"):
        preference_loss("dpo", stats, weights=weights)
    with pytest.raises(ValueError, match="weights must be \\[N, T-1\\]"):
        preference_loss("tidpo", stats, weights=weights[:, :3])
    with pytest.raises(ValueError, match="finite and >= 0"):
        preference_loss("tidpo", stats, weights=-weights)
    for beta in (-0.1, 0.0, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            preference_loss("dpo", stats, beta=beta)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        preference_loss("tdpo2", stats, alpha=-1.0)
    with pytest.raises(ValueError, match="stats.kl has shape"):
        preference_loss("dpo", stats._replace(kl=stats.kl[:, :3]))
    with pytest.raises(TypeError, match="TokenStats"):
        preference_loss("dpo", (1, 2, 3, 4))


# --------------------------------------------------------------------------------------------------------
# triplet loss and left alignment
# --------------------------------------------------------------------------------------------------------
def naive_triplet(a, am, w, wm, r, rm, margin):
    total = 0.0
    for i in range(a.shape[0]):
        d_pos = d_neg = torch.zeros((), dtype=a.dtype)
        for t in range(min(a.shape[1], w.shape[1])):
            if am[i, t] and wm[i, t]:
                d_pos = d_pos + (a[i, t] - w[i, t]) ** 2
        for t in range(min(a.shape[1], r.shape[1])):
            if am[i, t] and rm[i, t]:
                d_neg = d_neg + (a[i, t] - r[i, t]) ** 2
        total = total + torch.clamp(d_pos - d_neg + margin, min=0.0)
    return total / a.shape[0]


def ragged(b, length, lengths, gen):
    values = torch.randn(b, length, generator=gen, dtype=torch.float64)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    values = torch.where(mask, values, torch.full_like(values, float("nan")))  # junk past the end
    return values.requires_grad_(True), mask


@pytest.mark.parametrize("margin", [0.001, 0.5, 3.0])
def test_triplet_loss_matches_naive_loop(margin):
    gen = torch.Generator().manual_seed(0)
    a, am = ragged(4, 5, [5, 2, 4, 3], gen)
    w, wm = ragged(4, 7, [7, 3, 1, 6], gen)
    r, rm = ragged(4, 4, [2, 4, 4, 0], gen)
    got = triplet_loss(a, am, w, wm, r, rm, margin=margin)
    # the naive loop never reads masked entries, so NaN junk there is harmless to it too
    want = naive_triplet(a, am, w, wm, r, rm, margin)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, (a, w, r))
    want_grads = torch.autograd.grad(want, (a, w, r))
    for g1, g2 in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(g1).all()


def test_triplet_loss_hinge_and_errors():
    a = torch.zeros(2, 3, requires_grad=True)
    m = torch.ones(2, 3, dtype=torch.bool)
    near, far = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    # anchor on the chosen side and far from the rejected one: the hinge is inactive
    loss = triplet_loss(a, m, near, m, far, m, margin=0.1)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, a)
    assert torch.all(grad == 0)
    # swapped: d_pos - d_neg + margin = 12 + 0.1
    assert triplet_loss(a, m, far, m, near, m, margin=0.1).item() == pytest.approx(12.1)
    with pytest.raises(ValueError, match="same number B"):
        triplet_loss(a, m, near[:1], m[:1], far, m, margin=0.1)
    with pytest.raises(ValueError, match="chosen_mask must have the shape"):
        triplet_loss(a, m, near, m[:, :2], far, m, margin=0.1)
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(a, m, near, m, far, m, margin=float("nan"))


def test_left_align_matches_naive_loop_and_is_differentiable():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 7, generator=gen) > 0.4
    mask[2] = False  # a row with nothing to align
    aligned, aligned_mask = left_align(values, mask)
    length = int(mask.sum(1).max())
    assert aligned.shape == aligned_mask.shape == (4, length)
    for i in range(4):
        picked = [values[i, t] for t in range(7) if mask[i, t]]
        assert aligned_mask[i].tolist() == [True] * len(picked) + [False] * (length - len(picked))
        for j, v in enumerate(picked):
            assert aligned[i, j] == v
        assert torch.all(aligned[i, len(picked) :] == 0)
    (grad,) = torch.autograd.grad(aligned.sum(), values)
    assert torch.equal(grad, mask.to(grad.dtype))
    with pytest.raises(ValueError, match="mask must have the shape"):
        left_align(values, mask[:, :3])


def test_left_align_feeds_triplet_loss_like_the_training_loop():
    """[N, T-1] log-ratios with prompts of different lengths, aligned then compared position by position."""
    gen = torch.Generator().manual_seed(2)
    logratio = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 2:6] = True  # prompt of 2, response of 4
    mask[1, 4:7] = True  # prompt of 4, response of 3
    aligned, aligned_mask = left_align(logratio, mask)
    torch.testing.assert_close(aligned[0, :4], logratio[0, 2:6])
    torch.testing.assert_close(aligned[1, :3], logratio[1, 4:7])
    anchor = torch.zeros(2, 5, dtype=torch.float64)
    anchor_mask = torch.ones(2, 5, dtype=torch.bool)
    loss = triplet_loss(
        anchor, anchor_mask, aligned, aligned_mask, torch.zeros_like(aligned), aligned_mask, margin=0.0
    )
    # the rejected side equals the anchor, so each hinge is d(anchor, chosen) = the sum of squares
    want = (logratio[0, 2:6].pow(2).sum() + logratio[1, 4:7].pow(2).sum()) / 2
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_metrics_match_trls_pooled_mean_over_response_positions(dtype):
    """TRL: ``logits[:B][loss_mask[:B]].mean()`` with logits shifted onto the labels they predict."""
    from tdpo_lab.methods import logit_metrics

    gen = torch.Generator().manual_seed(0)
    n, t, vocab = 4, 7, 11
    logits = (torch.randn(n, t, vocab, generator=gen) * 3 + 1).to(dtype)
    labels = torch.randint(0, vocab, (n, t), generator=gen)
    labels[:, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding of a shorter chosen response
    labels[3, 4:] = -100
    got = logit_metrics(logits, labels)
    mask = labels[:, 1:] != -100
    shifted = logits[:, :-1].float()
    want_chosen = shifted[:2][mask[:2]].mean().item()  # pooled over every chosen position and entry
    want_rejected = shifted[2:][mask[2:]].mean().item()
    assert got["logits/chosen"] == pytest.approx(want_chosen, rel=1e-5)
    assert got["logits/rejected"] == pytest.approx(want_rejected, rel=1e-5)
    per_pair = torch.stack([shifted[i][mask[i]].mean() for i in range(2)]).mean().item()
    assert got["logits/chosen"] != pytest.approx(per_pair, rel=1e-4)  # pooled, not a mean of per-pair means
    with pytest.raises(ValueError, match="N = 2B"):
        logit_metrics(logits[:3], labels[:3])
