"""token_stats, per_token_logps and sequence_logps against naive float64 references, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdpo_lab.core.logprobs import TokenStats, per_token_logps, sequence_logps, token_stats

SHAPES = [(2, 5, 7), (3, 9, 11), (4, 6, 50)]


def make_batch(n, t, v, *, dtype=torch.float32, seed=0, prompt=2, scale=3.0):
    """Random policy/reference logits and labels with a prompt, one padded row and a hole-free response."""
    gen = torch.Generator().manual_seed(seed)
    policy = (scale * torch.randn(n, t, v, generator=gen, dtype=torch.float64)).to(dtype)
    reference = (scale * torch.randn(n, t, v, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, :prompt] = -100
    labels[0, t - 2 :] = -100  # padding on the first row
    return policy, reference, labels


def naive(policy, reference, labels):
    """float64 log_softmax + gather and F.kl_div(log_target=True): the textbook formulas."""
    z, zr = policy.double()[:, :-1], reference.double()[:, :-1]
    shifted = labels[:, 1:]
    mask = shifted != -100
    index = shifted.clamp(min=0).unsqueeze(-1)
    lp, lr = F.log_softmax(z, -1), F.log_softmax(zr, -1)
    logps = lp.gather(-1, index)[..., 0] * mask
    ref_logps = lr.gather(-1, index)[..., 0] * mask
    kl = F.kl_div(lp, lr, log_target=True, reduction="none").sum(-1) * mask
    return logps, ref_logps, kl, mask


def naive_safe(policy, reference, labels):
    """float64 reference for logits holding -inf: p_ref = 0 terms contribute exactly 0 (xlogy style)."""
    z, zr = policy.double()[:, :-1], reference.double()[:, :-1]
    shifted = labels[:, 1:]
    mask = shifted != -100
    index = shifted.clamp(min=0).unsqueeze(-1)
    lp, lr = F.log_softmax(z, -1), F.log_softmax(zr, -1)
    p_ref = lr.exp()
    terms = torch.where(p_ref > 0, p_ref * (lr - lp), torch.zeros((), dtype=torch.float64))
    zero = torch.zeros((), dtype=torch.float64)
    kl = torch.where(mask, terms.sum(-1), zero)
    logps = torch.where(mask, lp.gather(-1, index)[..., 0], zero)
    ref_logps = torch.where(mask, lr.gather(-1, index)[..., 0], zero)
    return logps, ref_logps, kl, mask


def grads_of(fn, policy, reference, labels, g_logp, g_kl):
    x = policy.detach().clone().requires_grad_(True)
    logps, ref_logps, kl, mask = fn(x, reference, labels)
    (grad,) = torch.autograd.grad((logps * g_logp).sum() + (kl * g_kl).sum(), x)
    return (logps.detach(), ref_logps.detach(), kl.detach(), mask), grad


def ours(chunk_size=None):
    return lambda p, r, y: token_stats(p, r, y, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, None, "all"])
@pytest.mark.parametrize("shape", SHAPES)
def test_token_stats_matches_naive_forward_and_backward(shape, chunk, dtype):
    policy, reference, labels = make_batch(*shape, dtype=dtype, seed=sum(shape))
    if chunk == "all":
        chunk = int((labels[:, 1:] != -100).sum())
    gen = torch.Generator().manual_seed(1)
    g_logp = torch.randn(shape[0], shape[1] - 1, generator=gen, dtype=torch.float64)
    g_kl = torch.randn(shape[0], shape[1] - 1, generator=gen, dtype=torch.float64)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got, grad = grads_of(ours(chunk), policy, reference, labels, g_logp.to(out_dtype), g_kl.to(out_dtype))
    want, want_grad = grads_of(naive, policy.double(), reference, labels, g_logp, g_kl)
    # values are computed in fp32 (fp64 for fp64 inputs) whatever the input dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got[:3], want[:3], strict=True):
        assert a.dtype == out_dtype
        torch.testing.assert_close(a.double(), b, **tol)
    assert torch.equal(got[3], want[3])
    assert grad.dtype == dtype and grad.shape == policy.shape
    # the gradient comes back in the input's dtype: bf16 rounds it to ~3 significant digits
    gtol = dict(rtol=2e-2, atol=2e-2 * float(want_grad.abs().max())) if dtype == torch.bfloat16 else tol
    torch.testing.assert_close(grad.double(), want_grad, **gtol)


def test_fields_masked_and_aligned():
    policy, reference, labels = make_batch(3, 8, 11)
    stats = token_stats(policy, reference, labels)
    assert isinstance(stats, TokenStats)
    assert torch.equal(stats.mask, labels[:, 1:] != -100)
    for field in (stats.logps, stats.ref_logps, stats.kl):
        assert field.shape == (3, 7)
        assert torch.all(field[~stats.mask] == 0)
        assert torch.all(field[stats.mask] != 0)
    torch.testing.assert_close(stats.log_ratio, stats.logps - stats.ref_logps)


def test_gradcheck_float64():
    policy, reference, labels = make_batch(2, 6, 5, dtype=torch.float64)
    policy.requires_grad_(True)

    def fn(x):
        stats = token_stats(x, reference, labels, chunk_size=3)
        return stats.logps, stats.kl

    assert torch.autograd.gradcheck(fn, (policy,))


def test_thread_count_does_not_change_results():
    policy, reference, labels = make_batch(4, 9, 50, seed=3)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = policy.clone().requires_grad_(True)
            stats = token_stats(x, reference, labels, chunk_size=2)
            (stats.logps.sum() + 2 * stats.kl.sum()).backward()
            results.append((stats.logps.detach(), stats.kl.detach(), x.grad))
            assert torch.get_num_threads() == threads  # restored after the worker threads ran
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_reference_gets_no_gradient_and_prompt_rows_are_zero():
    policy, reference, labels = make_batch(3, 8, 11)
    policy.requires_grad_(True)
    reference.requires_grad_(True)
    stats = token_stats(policy, reference, labels)
    (stats.logps.sum() + stats.kl.sum()).backward()
    assert reference.grad is None
    assert not stats.ref_logps.requires_grad
    # rows that predict nothing (prompt positions, padding, the last position) get exactly zero gradient
    predicts = torch.zeros(3, 8, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    assert torch.all(policy.grad[~predicts] == 0)
    assert torch.all(policy.grad[predicts].abs().sum(-1) > 0)


def test_kl_nonnegative_zero_at_equality_and_shift_invariant():
    policy, reference, labels = make_batch(4, 9, 50, scale=10.0, seed=5)
    stats = token_stats(policy, reference, labels)
    assert torch.all(stats.kl >= 0)
    assert torch.all(stats.kl[stats.mask] > 0)
    # equal logits: KL is exactly 0 and so is its gradient (p_theta - p_ref = 0)
    x = policy.clone().requires_grad_(True)
    same = token_stats(x, policy, labels)
    assert torch.equal(same.kl, torch.zeros_like(same.kl))
    assert torch.equal(same.logps, same.ref_logps)
    same.kl.sum().backward()
    assert torch.all(x.grad == 0)
    # adding a constant to each row of either model changes no probability
    gen = torch.Generator().manual_seed(0)
    shifted = token_stats(
        policy + 50 * torch.randn(4, 9, 1, generator=gen),
        reference - 30 * torch.rand(4, 9, 1, generator=gen),
        labels,
    )
    for a, b in zip(shifted[:3], stats[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("where", ["response", "prompt", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_with_extreme_reference_logits(where, dtype):
    policy, reference, labels = make_batch(3, 8, 11, dtype=dtype, seed=7)
    rows = {"response": [5, 6], "prompt": [0, 1], "both": [0, 1, 5, 6]}[where]
    labels_next = labels[:, 1:]
    for t in rows:
        for n in range(3):
            target = int(labels_next[n, t]) if labels_next[n, t] != -100 else 0
            others = [v for v in range(11) if v != target]
            reference[n, t, others[0]] = -1e4
            reference[n, t, others[1]] = float("-inf")
            reference[n, t, others[2]] = reference[n, t].max() - 120.0  # exp underflows in fp32
            reference[n, t, others[3]] = float("-inf")
    # the official TDPO formula (softmax().log() and a multiplicative mask) is NaN on this input
    p_ref = reference.double()[:, :-1].softmax(-1)
    official = (p_ref * (p_ref.log() - F.log_softmax(policy.double()[:, :-1], -1))).sum(-1) * (
        labels_next != -100
    )
    assert torch.isnan(official).any()
    g_logp = torch.randn(3, 7, dtype=dtype)
    g_kl = torch.randn(3, 7, dtype=dtype)
    got, grad = grads_of(ours(2), policy, reference, labels, g_logp, g_kl)
    want, want_grad = grads_of(naive_safe, policy.double(), reference, labels, g_logp.double(), g_kl.double())
    for value in (*got[:3], grad):
        assert torch.isfinite(value).all()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a.double(), b, **tol)
    torch.testing.assert_close(grad.double(), want_grad, **tol)


def test_reference_minus_inf_on_the_label_gives_minus_inf_ref_logp_only():
    policy, reference, labels = make_batch(2, 6, 7)
    n, t = 1, 3
    reference[n, t, labels[n, t + 1]] = float("-inf")
    x = policy.clone().requires_grad_(True)
    stats = token_stats(x, reference, labels)
    assert stats.ref_logps[n, t] == float("-inf")
    assert torch.isfinite(stats.logps).all() and torch.isfinite(stats.kl).all()
    (stats.logps.sum() + stats.kl.sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_broken_policy_logits_at_response_are_an_error_but_ignored_at_prompt():
    policy, reference, labels = make_batch(2, 6, 7)
    at_prompt = policy.clone()
    at_prompt[:, 0, 3] = float("nan")  # position 0 predicts a prompt token: never visited
    stats = token_stats(at_prompt, reference, labels)
    assert all(torch.isfinite(f).all() for f in stats[:3])
    for bad in (float("nan"), float("inf")):
        broken = policy.clone()
        broken[1, 3, 2] = bad
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            token_stats(broken, reference, labels)
    all_minus_inf = reference.clone()
    all_minus_inf[1, 3] = float("-inf")
    with pytest.raises(ValueError, match="whole row"):
        token_stats(policy, all_minus_inf, labels)


def test_second_backward_and_no_grad_mode_give_the_same_results():
    policy, reference, labels = make_batch(3, 8, 11)
    x = policy.clone().requires_grad_(True)
    stats = token_stats(x, reference, labels, chunk_size=4)
    loss = (stats.logps * 0.3).sum() + (stats.kl * 1.7).sum()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)  # p_ref was consumed by the first: recomputed
    torch.testing.assert_close(first, second, rtol=0, atol=1e-7)
    with torch.no_grad():
        plain = token_stats(policy, reference, labels, chunk_size=4)
    for a, b in zip(plain, stats, strict=True):
        assert torch.equal(a, b.detach())


def test_no_response_positions():
    policy, reference, labels = make_batch(2, 5, 7)
    labels[:] = -100
    x = policy.clone().requires_grad_(True)
    stats = token_stats(x, reference, labels)
    assert not stats.mask.any()
    assert all(torch.equal(f, torch.zeros(2, 4)) for f in stats[:3])
    (stats.logps.sum() + stats.kl.sum()).backward()
    assert x.grad is None or torch.all(x.grad == 0)


def test_bad_inputs_are_clear_errors():
    policy, reference, labels = make_batch(2, 5, 7)
    with pytest.raises(ValueError, match="policy_logits must be \\[N, T, V\\]"):
        token_stats(policy[0], reference, labels)
    with pytest.raises(ValueError, match="reference_logits must have the policy's shape"):
        token_stats(policy, reference[:, :4], labels)
    with pytest.raises(ValueError, match="labels must be \\[N, T\\]"):
        token_stats(policy, reference, labels[:, :4])
    with pytest.raises(ValueError, match="integer tensor"):
        token_stats(policy, reference, labels.float())
    too_big = labels.clone()
    too_big[0, 3] = 7
    with pytest.raises(ValueError, match="token id 7, outside the vocabulary"):
        token_stats(policy, reference, too_big)
    negative = labels.clone()
    negative[1, 4] = -5
    with pytest.raises(ValueError, match="token id -5"):
        per_token_logps(policy, negative)
    with pytest.raises(ValueError, match="T >= 2"):
        token_stats(policy[:, :1], reference[:, :1], labels[:, :1])
    for chunk in (-1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            token_stats(policy, reference, labels, chunk_size=chunk)
    with pytest.raises(ValueError, match="floating point"):
        token_stats(policy, reference.long(), labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_per_token_and_sequence_logps_match_naive(dtype):
    policy, reference, labels = make_batch(3, 8, 11, dtype=dtype)
    g = torch.randn(3, 7, dtype=torch.float64)
    x = policy.clone().requires_grad_(True)
    logps, mask = per_token_logps(x, labels)
    (grad,) = torch.autograd.grad((logps * g.to(logps.dtype)).sum(), x)
    want, want_grad = grads_of(naive, policy.double(), reference, labels, g, torch.zeros_like(g))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps.double(), want[0], **tol)
    assert torch.equal(mask, want[3])
    gtol = dict(rtol=2e-2, atol=1e-2) if dtype == torch.bfloat16 else tol
    torch.testing.assert_close(grad.double(), want_grad, **gtol)
    torch.testing.assert_close(sequence_logps(policy, labels).double(), want[0].sum(-1), **tol)
    # token_stats agrees with the convenience function
    torch.testing.assert_close(
        token_stats(policy, reference, labels).logps, logps.detach(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    policy, reference, labels = make_batch(3, 9, 50)
    g_logp, g_kl = torch.randn(3, 8), torch.randn(3, 8)
    cpu, cpu_grad = grads_of(ours(4), policy, reference, labels, g_logp, g_kl)
    dev = [t.cuda() for t in (policy, reference, labels, g_logp, g_kl)]
    gpu, gpu_grad = grads_of(ours(4), *dev)
    for a, b in zip((*gpu[:3], gpu_grad), (*cpu[:3], cpu_grad), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
