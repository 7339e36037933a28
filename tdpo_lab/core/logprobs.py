"""Per-token log-probabilities and the exact per-position KL(pi_ref || pi_theta), memory-lean.

Every preference loss in the kit is a function of four ``[N, T-1]`` tensors aligned with the shifted labels
(``logits[:, :-1]`` predicts ``labels[:, 1:]``): the policy's log-probability of each label token, the
reference's, the KL between the two next-token distributions, and the response mask. :func:`token_stats`
computes all four from the two models' logits; docs/methods.md section 1 gives the formulas.

Why a custom autograd Function: the KL is a sum over the whole vocabulary (50,257 entries for GPT-2), and
the textbook way (the official TDPO code) keeps five full ``[N, T, V]`` tensors alive for backward
(two softmaxes, two log-softmaxes and their product). Here only the response rows are visited, a few rows
at a time, softmax(z_theta) is recomputed in backward instead of stored, and p_ref lives in the rows of the
one ``[N, T, V]`` tensor autograd needs anyway, the gradient. ``benchmarks/README.md`` has the numbers.

Derived in notebooks/03_bradley_terry_token_reward.ipynb (the KL identity and its gradient) and used from
notebooks/05_tdpo.ipynb on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label value every per-token sum in the kit skips (as the cross-entropy does)

# Automatic chunking: bytes of one [rows, V] work buffer (a CPU worker keeps three). Small enough that a
# worker's buffers stay in cache (this machine: 1 MiB L2 per core, 32 MiB shared L3), so the several passes
# over a chunk run at cache speed; large enough that the per-chunk Python overhead stays small. On CUDA
# bigger chunks only mean fewer kernel launches.
_CHUNK_BYTES_CPU = 2 * 2**20
_CHUNK_BYTES_CUDA = 256 * 2**20


class TokenStats(NamedTuple):
    """Per-position statistics of a batch, each ``[N, T-1]``, aligned with ``labels[:, 1:]``.

    - ``logps``: log pi_theta(y_t | s_t) (carries gradient to the policy logits);
    - ``ref_logps``: log pi_ref(y_t | s_t) (no gradient);
    - ``kl``: KL(pi_ref(.|s_t) || pi_theta(.|s_t)), exact over the vocabulary (carries gradient);
    - ``mask``: bool, True on response positions (``labels[:, 1:] != -100``).

    All three value tensors are zero where ``mask`` is False.
    """

    logps: Tensor
    ref_logps: Tensor
    kl: Tensor
    mask: Tensor

    @property
    def log_ratio(self) -> Tensor:
        """r_t = log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t), ``[N, T-1]``, zero off the mask."""
        return self.logps - self.ref_logps


def _check_logits_labels(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{name} and labels must be torch tensors, got {type(logits)} and {type(labels)}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must be [N, T, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labels must be [N, T] = {tuple(logits.shape[:2])} to match {name} {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (token ids, -100 = ignore), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but {name} on {logits.device}; move them together")
    if logits.shape[1] < 2:
        raise ValueError(
            f"need at least 2 positions (T >= 2) to predict a next token, got T = {logits.shape[1]}"
        )
    vocab = logits.shape[-1]
    shifted = labels[:, 1:]
    bad = (shifted != IGNORE_INDEX) & ((shifted < 0) | (shifted >= vocab))
    if bool(bad.any()):
        value = int(shifted[bad][0])
        raise ValueError(
            f"labels hold token id {value}, outside the vocabulary [0, {vocab}); use -100 for prompt and padding"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 math for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (the float64 reference tests rely on it).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(rows: Tensor, chunk: int) -> list[tuple[int, int, int]]:
    """Split sorted row indices into chunks of consecutive rows: ``(first_row, k0, k1)`` per chunk.

    ``rows[k0:k1]`` are the rows ``first_row, first_row + 1, ...``. Each sequence's response is one run of
    consecutive rows of the flattened logits, so a chunk is a plain slice (a view): no gather copy is needed
    to read the logits or to write the gradient.
    """
    flat = rows.tolist()
    out, k0 = [], 0
    for k in range(1, len(flat) + 1):
        if k == len(flat) or flat[k] != flat[k - 1] + 1 or k - k0 == chunk:
            out.append((flat[k0], k0, k))
            k0 = k
    return out


class _Buffers:
    """Named ``[width, V]`` work buffers of one worker, allocated on first use and reused by every chunk
    (allocating per chunk would page-fault fresh memory every time)."""

    def __init__(self, width: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (width, vocab), dtype, device
        self.named: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        if name not in self.named:
            self.named[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.named[name][:rows]

    def rows(self, src: Tensor, first: int, count: int, name: str) -> Tensor:
        """``src[first:first+count]`` in the compute dtype: a view, or an upcast copy into buffer ``name``."""
        view = src[first : first + count]
        return view if view.dtype == self.dtype else self.get(name, count).copy_(view)


def _run_chunks(chunks: list, job: Callable, width: int, vocab: int, dtype: torch.dtype, device) -> None:
    """Call ``job(chunk, buffers)`` for every chunk.

    On CPU with k > 1 torch threads, k Python threads each take whole chunks (torch kernels release the GIL)
    while torch runs single-threaded inside them. Splitting every small kernel over the k cores instead would
    put a barrier after each of ~20 kernels per chunk, and on a shared machine a barrier waits for the slowest
    core's time slice: measured here, up to 10x slower when other jobs run. Each chunk's result is the same
    either way (always single-threaded kernels), so results do not depend on the thread count.
    """
    threads = min(torch.get_num_threads(), len(chunks)) if device.type == "cpu" else 1
    if threads <= 1:
        buffers = _Buffers(width, vocab, dtype, device)
        for chunk in chunks:
            job(chunk, buffers)
        return
    local = threading.local()

    def run(chunk) -> None:
        if not hasattr(local, "buffers"):
            local.buffers = _Buffers(width, vocab, dtype, device)
        with torch.no_grad():  # grad mode is per thread; the workers' kernels must not record a graph
            job(chunk, local.buffers)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(run, chunks):  # iterating re-raises a worker's exception here
                pass
    finally:
        torch.set_num_threads(before)


def _forward_chunk(policy, reference, targets, out, lse, grad, chunk, buffers) -> None:
    """logp, ref_logp and KL of one chunk of rows (see :func:`token_stats` for the equations)."""
    first, k0, k1 = chunk
    c = k1 - k0
    logp, ref_logp, kl = (x[k0:k1] for x in out)
    zt = buffers.rows(policy, first, c, "up_t")
    zr = buffers.rows(reference, first, c, "up_r")
    # softmax is one fused kernel (torch's fastest exp); p_ref goes straight into the gradient's rows when
    # the policy needs a gradient (backward turns it into the gradient in place), else into a buffer
    sm_t = torch.softmax(zt, 1, out=buffers.get("p_t", c))
    sm_r = torch.softmax(zr, 1, out=grad[first : first + c] if grad is not None else buffers.get("p_r", c))
    # logsumexp without another exp pass: the top entry of a softmax is exp(0) / S' = 1 / S' (S' the
    # kernel's own sum) and sits at the row maximum. S' is rounded (~5e-7), which would show in the KL, so
    # the accurate (cascade) row sum sum(p) = S / S' corrects it: lse = max + log(sum(p) / top).
    # (amax, not max-with-indices: the index reduction is several times slower.)
    mass_r = sm_r.sum(1)
    ratio_t = sm_t.sum(1).div_(sm_t.amax(1))  # S_theta / exp(max_t)
    ratio_r = mass_r / sm_r.amax(1)
    max_t, max_r = zt.amax(1), zr.amax(1)
    # sum_v p_ref (z_theta - z_ref). Where p_ref = 0 because z_ref = -inf the product is 0 * inf = NaN, which
    # nansum drops: exactly the 0 that term contributes. (NaN logits are caught by the lse check.)
    cross = torch.sub(zt, zr, out=buffers.get("diff", c)).mul_(sm_r).nansum(1).div_(mass_r)
    # KL = sum_v p_ref (z_ref - z_theta) + lse(z_theta) - lse(z_ref), with the lse difference taken as
    # max_t - max_r + log(ratio_t / ratio_r) so that no large logsumexp values cancel. Rounding can dip
    # below 0; the true value cannot.
    torch.clamp((max_t - max_r).add_((ratio_t / ratio_r).log_()).sub_(cross), min=0.0, out=kl)
    lse_t = torch.add(max_t, ratio_t.log_(), out=lse[0, k0:k1])
    lse_r = torch.add(max_r, ratio_r.log_(), out=lse[1, k0:k1])
    # log-probs as gathered logit minus logsumexp: exact even where the softmax underflows to 0
    torch.sub(zt.gather(1, targets[k0:k1, None])[:, 0], lse_t, out=logp)
    torch.sub(zr.gather(1, targets[k0:k1, None])[:, 0], lse_r, out=ref_logp)


def _backward_chunk(policy, reference, targets, g_logp, g_kl, grad, have_p_ref, chunk, buffers) -> None:
    """Gradient rows g_kl (p_theta - p_ref) + g_logp (onehot - p_theta) of one chunk, written into ``grad``."""
    first, k0, k1 = chunk
    c = k1 - k0
    out = grad[first : first + c]
    cdtype = buffers.dtype
    # work in place in ``grad`` when it has the compute dtype, else in a buffer copied out at the end
    g = out if out.dtype == cdtype else buffers.get("g", c)
    gl = g_logp[k0:k1, None] if g_logp is not None else None
    gk = g_kl[k0:k1, None] if g_kl is not None else None
    # softmax(z_theta), recomputed rather than stored
    p_t = torch.softmax(buffers.rows(policy, first, c, "up_t"), 1, out=buffers.get("p_t", c))
    if gk is not None:
        if not have_p_ref:
            torch.softmax(buffers.rows(reference, first, c, "up_r"), 1, out=g)
        # dKL/dz = p_theta - p_ref and dlogp/dz = onehot - p_theta: g = -g_kl p_ref + (g_kl - g_lp) p_theta
        g.mul_(-gk).addcmul_(p_t, gk - gl if gl is not None else gk)
    else:
        torch.mul(p_t, -gl, out=g)
    if gl is not None:
        g.scatter_add_(1, targets[k0:k1, None], gl)  # the onehot part
    if g is not out:
        out.copy_(g)


class _TokenStatsFunction(torch.autograd.Function):
    """Gathered log-probs and exact KL on selected rows of the flattened logits.

    Forward inputs: ``policy`` and ``reference`` ``[R, V]`` (flattened logits), ``rows`` ``[M]`` (sorted
    rows to visit), ``targets`` ``[M]`` (the label token of each row), ``chunk`` (rows per chunk).
    Outputs ``[M]`` each: logp, ref_logp, kl. Backward returns the ``[R, V]`` gradient
    ``g_kl * (softmax(z_theta) - p_ref) + g_logp * (onehot - softmax(z_theta))`` on the visited rows, zero
    elsewhere. softmax(z_theta) is recomputed in backward. p_ref, which forward computes anyway, is written
    into the visited rows of the gradient tensor (allocated in forward when the policy needs a gradient and
    is fp32/fp64), and backward turns those rows into the gradient in place: one ``[R, V]`` tensor in all,
    and three softmax passes per row instead of four.
    """

    @staticmethod
    def forward(ctx, policy: Tensor, reference: Tensor, rows: Tensor, targets: Tensor, chunk: int):
        cdtype = _compute_dtype(policy.dtype)
        m, vocab = rows.numel(), policy.shape[1]
        chunks = _chunks(rows, chunk)
        # logp, ref_logp, kl
        out = tuple(torch.empty(m, dtype=cdtype, device=policy.device) for _ in range(3))
        lse = torch.empty(2, m, dtype=cdtype, device=policy.device)
        keep_p_ref = ctx.needs_input_grad[0] and policy.dtype == cdtype
        grad = torch.empty_like(policy) if keep_p_ref else None

        def job(chunk_, buffers):
            _forward_chunk(policy, reference, targets, out, lse, grad, chunk_, buffers)

        _run_chunks(chunks, job, min(chunk, max(m, 1)), vocab, cdtype, policy.device)
        # One check at the end (no per-chunk device sync): NaN or +inf in a row, or a row that is entirely
        # -inf, makes its softmax NaN and so its logsumexp.
        if m and not bool(torch.isfinite(lse).all()):
            raise ValueError(
                "policy or reference logits at a response position contain NaN or +inf, or a whole row is "
                "-inf; check the model outputs (finite logits, or -inf for impossible tokens, are valid)"
            )
        ctx.save_for_backward(policy, reference, targets)
        ctx.chunks, ctx.grad = chunks, grad
        ctx.mark_non_differentiable(out[1])
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, _g_ref: Tensor | None, g_kl: Tensor | None):
        policy, reference, targets = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # handed out once; a second backward (retain_graph) recomputes p_ref
        if g_logp is None and g_kl is None:
            return None, None, None, None, None
        have_p_ref = grad is not None
        if grad is None:
            grad = torch.empty_like(policy)
        cdtype = _compute_dtype(policy.dtype)
        g_logp = g_logp.to(cdtype) if g_logp is not None else None
        g_kl = g_kl.to(cdtype) if g_kl is not None else None
        # zero the rows no chunk writes (prompt and padding), with torch's own threads
        done = 0
        for first, k0, k1 in ctx.chunks:
            grad[done:first].zero_()
            done = first + k1 - k0
        grad[done:].zero_()

        def job(chunk_, buffers):
            _backward_chunk(policy, reference, targets, g_logp, g_kl, grad, have_p_ref, chunk_, buffers)

        width = max((k1 - k0 for _, k0, k1 in ctx.chunks), default=1)
        _run_chunks(ctx.chunks, job, width, policy.shape[1], cdtype, policy.device)
        return grad, None, None, None, None


def _auto_chunk_rows(vocab: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES_CUDA if device.type == "cuda" else _CHUNK_BYTES_CPU
    return max(1, budget // (4 * vocab))


def token_stats(
    policy_logits: Tensor, reference_logits: Tensor, labels: Tensor, *, chunk_size: int | None = None
) -> TokenStats:
    """Per-token log-probs of both models and the exact per-position KL(pi_ref || pi_theta).

    Shapes: ``policy_logits`` and ``reference_logits`` ``[N, T, V]`` (any float dtype), ``labels`` ``[N, T]``
    unshifted, -100 on prompt and padding. Returns :class:`TokenStats` with fields ``[N, T-1]`` aligned with
    ``labels[:, 1:]`` (``logits[:, :-1]`` predicts ``labels[:, 1:]``), zero where the mask is False.

    Equations (docs/methods.md section 1), with z the logits and lse = logsumexp over the vocabulary:

        logp_t = z_theta[y_t] - lse(z_theta)                     (never softmax().log())
        KL_t   = sum_v p_ref(v) (z_ref(v) - z_theta(v)) + lse(z_theta) - lse(z_ref)
        dKL_t / dz_theta = softmax(z_theta) - p_ref,   dlogp_t / dz_theta = onehot(y_t) - softmax(z_theta)

    Gradient flows to ``policy_logits`` only (``reference_logits`` is detached). Math is fp32 (fp64 for fp64
    inputs). Only response positions are visited, ``chunk_size`` rows at a time (``None`` or 0 = automatic:
    2 MiB work buffers on CPU, 256 MiB on CUDA); backward recomputes softmax(z_theta), and the one gradient
    tensor of the input's shape is the only ``[N, T, V]`` allocation (zero at prompt and padding positions).
    On CPU the chunks are shared among ``torch.get_num_threads()`` worker threads.

    Numerics: reference logits of -inf, -1e4 or far below the row maximum give probability 0 and contribute
    exactly 0 (no NaN from 0 * -inf). A label token the reference gives logit -inf has ``ref_logps = -inf``
    (its true value). Policy logits are expected finite. NaN or +inf at a response position is an error.

    Derived in notebooks/03_bradley_terry_token_reward.ipynb.
    """
    _check_logits_labels(policy_logits, labels, "policy_logits")
    if not isinstance(reference_logits, Tensor) or reference_logits.shape != policy_logits.shape:
        got = (
            tuple(reference_logits.shape) if isinstance(reference_logits, Tensor) else type(reference_logits)
        )
        raise ValueError(
            f"reference_logits must have the policy's shape {tuple(policy_logits.shape)}, got {got}; "
            "run both models on the same input_ids"
        )
    if not reference_logits.is_floating_point():
        raise ValueError(f"reference_logits must be floating point, got {reference_logits.dtype}")
    if reference_logits.device != policy_logits.device:
        raise ValueError(
            f"reference_logits are on {reference_logits.device}, policy_logits on {policy_logits.device}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0
    ):
        raise ValueError(f"chunk_size must be a positive int, or 0 / None for automatic, got {chunk_size!r}")

    n, t, vocab = policy_logits.shape
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    # Row n * T + t of the flattened logits predicts shifted[n, t]; only response rows are visited.
    pos = mask.nonzero()
    rows = pos[:, 0] * t + pos[:, 1]
    targets = shifted[mask].long()
    chunk = chunk_size or _auto_chunk_rows(vocab, policy_logits.device)
    logp, ref_logp, kl = _TokenStatsFunction.apply(
        policy_logits.reshape(n * t, vocab),
        reference_logits.detach().reshape(n * t, vocab),
        rows,
        targets,
        chunk,
    )
    grid = logp.new_zeros(n, t - 1)
    return TokenStats(
        logps=grid.masked_scatter(mask, logp),
        ref_logps=grid.masked_scatter(mask, ref_logp),
        kl=grid.masked_scatter(mask, kl),
        mask=mask,
    )


def per_token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each label token under ``logits``: ``([N, T-1], mask [N, T-1])``.

    ``logits`` ``[N, T, V]``, ``labels`` ``[N, T]`` unshifted with -100 on prompt and padding.
    logp_t = z[y_t] - logsumexp(z) at ``logits[:, t]`` for label ``labels[:, t+1]``, in fp32 (fp64 for fp64
    inputs), zero where the mask is False. Plain autograd (it materialises a ``[N, T-1, V]`` upcast copy for
    non-fp32 inputs); use :func:`token_stats` when the KL is needed too.

    Derived in notebooks/03_bradley_terry_token_reward.ipynb.
    """
    _check_logits_labels(logits, labels)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    z = logits[:, :-1].to(_compute_dtype(logits.dtype))
    index = torch.where(mask, shifted, 0).long().unsqueeze(-1)
    logps = z.gather(-1, index).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return torch.where(mask, logps, torch.zeros((), dtype=logps.dtype, device=logps.device)), mask


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log pi(y | x) = sum over response positions of log pi(y_t | s_t): ``[N]``.

    Same inputs as :func:`per_token_logps`; the masked sum of its per-token values (prompt and padding
    contribute nothing). Derived in notebooks/03_bradley_terry_token_reward.ipynb.
    """
    logps, _ = per_token_logps(logits, labels)
    return logps.sum(-1)
