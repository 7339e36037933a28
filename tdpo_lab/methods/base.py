"""What a preference method is, the registry that holds them, and the one loss function they all go through.

A method is a :class:`Method`: its name, label and colour (every table and figure reads them from here), the
config knobs it reads with their defaults, whether it needs pi_ref and the SeqKL, where its token weights
come from, and its loss as a pure function of per-pair sums (:class:`PairTerms`). Training-loop hooks
(``prepare``, ``step_weights``, ``extra_loss``) let a method add what the shared loop does not do, such as
AttentionPO's cached judge weights or TI-DPO's live saliency and triplet term.

:func:`preference_loss` turns per-token statistics (:func:`tdpo_lab.logprobs.token_stats`) into the
:class:`PairTerms` of a batch, calls the method's loss and computes the metrics (TRL's names) every method
shares. Rows ``[:N/2]`` of a batch are prompt+chosen (y_w), rows ``[N/2:]`` prompt+rejected (y_l). With
r_t = log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t) (docs/methods.md section 1):

    chosen   = sum_t w_t r_t(y_w)       rejected = sum_t w_t r_t(y_l)     (w_t = 1 for unweighted methods)
    kl_chosen = SeqKL(y_w) = sum_t KL(pi_ref || pi_theta)(s_t)            kl_rejected = SeqKL(y_l)

Derived in notebooks/04_dpo_baseline.ipynb (the shared margin) and the chapter of each method.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tdpo_lab.logprobs import TokenStats

WEIGHT_SOURCES = ("none", "judge", "saliency")


class PairTerms(NamedTuple):
    """Per-pair sums a loss is a function of; every field is ``[B]``.

    ``chosen``/``rejected``: (weighted) sums of the log-ratios r_t over the response; ``kl_chosen``/
    ``kl_rejected``: SeqKL of each response; ``len_chosen``/``len_rejected``: response lengths in tokens;
    ``logps_chosen``/``logps_rejected``: the policy's sequence log-probs (what a reference-free loss reads).
    """

    chosen: Tensor
    rejected: Tensor
    kl_chosen: Tensor
    kl_rejected: Tensor
    len_chosen: Tensor
    len_rejected: Tensor
    logps_chosen: Tensor
    logps_rejected: Tensor

    @property
    def margin(self) -> Tensor:
        """u' = chosen - rejected, the DPO margin inside the sigmoid (before beta)."""
        return self.chosen - self.rejected


class LossOutput(NamedTuple):
    """``loss``: scalar mean over pairs; ``losses``: ``[B]`` per pair; ``metrics``: python floats (TRL names)."""

    loss: Tensor
    losses: Tensor
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a training-loop hook sees at one step (see :mod:`tdpo_lab.train`)."""

    policy: Any
    reference: Any
    tokenizer: Any
    rows: Any  # the pandas rows of the batch: prompt, chosen, rejected, pair_id
    batch: dict  # collate_preference_batch output (on CPU)
    labels: Tensor  # batch["labels"] on the device
    cfg: Any
    device: torch.device
    step_seed: int
    state: Any  # whatever the method's ``prepare`` returned


@dataclasses.dataclass(frozen=True)
class Method:
    """A preference-optimisation method, declared in one place.

    ``loss(terms, beta=..., alpha=...)`` returns the per-pair losses ``[B]`` from :class:`PairTerms`.
    ``knobs``: config fields the method reads besides ``beta``, with their defaults (the Config's defaults
    come from here); knobs of other methods never split this method's runs. ``needs_reference=False``: the
    loop skips pi_ref's forward and scores the policy against itself (r_t = 0, SeqKL = 0), so such a loss
    reads ``terms.logps_chosen``/``logps_rejected`` (a SimPO-like method). ``uses_seq_kl``: the loss reads
    the SeqKL terms (the TDPO family; they also log the token-level reward). ``token_weights``: ``"none"``,
    ``"judge"`` (computed once per pair before training, ``prepare``) or ``"saliency"`` (recomputed every
    step, ``step_weights``). Hooks (all optional):

    - ``prepare(cfg, pairs, progress) -> state``: once per run, before the first step;
    - ``step_weights(ctx) -> (weights [N, T-1] or None, policy_logits or None)``: per step; a hook that runs
      the policy forward itself returns its logits so the loop does not run it twice;
    - ``extra_loss(ctx, stats) -> (tensor, metrics)``: added to the loss (TI-DPO's triplet term).
    """

    name: str
    label: str
    color: str
    loss: Callable[..., Tensor]
    knobs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    needs_reference: bool = True
    uses_seq_kl: bool = False
    token_weights: str = "none"
    paper: str = ""
    prepare: Callable | None = None
    step_weights: Callable | None = None
    extra_loss: Callable | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"a method name is a lower-case identifier such as 'ipo', got {self.name!r}")
        if self.token_weights not in WEIGHT_SOURCES:
            raise ValueError(f"token_weights must be one of {WEIGHT_SOURCES}, got {self.token_weights!r}")
        if not callable(self.loss):
            raise TypeError(f"method {self.name!r}: loss must be callable, got {type(self.loss).__name__}")
        if "beta" in self.knobs:
            raise ValueError(f"method {self.name!r}: beta is every method's knob; do not list it in knobs")

    @property
    def weighted(self) -> bool:
        return self.token_weights != "none"


# --- the registry -----------------------------------------------------------------------------------------
_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (config validation, the CLI, run names, tables and figures read it).

    A knob shared with a registered method must have the same default (one Config field, one default).
    Registering a name twice is an error unless ``replace=True``. Returns the method.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a tdpo_lab.methods.Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is registered already; pass replace=True to redefine it")
    for knob, default in method.knobs.items():
        for other in _REGISTRY.values():
            if other.name != method.name and knob in other.knobs and other.knobs[knob] != default:
                raise ValueError(
                    f"method {method.name!r} declares knob {knob!r} = {default!r}, but {other.name!r} "
                    f"declares it = {other.knobs[knob]!r}; a knob has one default"
                )
    _check_knobs_are_config_fields(method)
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register one of their own clean up with this)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method called ``name``; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}") from None


def method_names() -> tuple[str, ...]:
    """Registered method names in registration order (the kit's order in tables and legends)."""
    return tuple(_REGISTRY)


def method_rank(name) -> tuple:
    """Sort key: the registry's order, unknown names (and ``"sft"`` first) alphabetically after it."""
    if name == "sft":
        return (-1, "")
    names = method_names()
    return (names.index(name), "") if name in names else (len(names), str(name))


def method_label(name) -> str:
    return "SFT" if name == "sft" else (_REGISTRY[name].label if name in _REGISTRY else str(name))


def method_color(name) -> str:
    return "black" if name == "sft" else (_REGISTRY[name].color if name in _REGISTRY else "tab:gray")


def knob_default(knob: str) -> object:
    """The default of a method knob, as the registered methods declare it (Config reads its defaults here)."""
    for method in _REGISTRY.values():
        if knob in method.knobs:
            return method.knobs[knob]
    raise KeyError(f"no registered method declares the knob {knob!r}")


def knob_methods() -> dict[str, tuple[str, ...]]:
    """Each method knob and the methods that read it: a knob splits the runs of those methods only."""
    out: dict[str, tuple[str, ...]] = {}
    for method in _REGISTRY.values():
        for knob in method.knobs:
            out[knob] = (*out.get(knob, ()), method.name)
    return out


def reads_knob(method: str, knob: str) -> bool:
    return method in _REGISTRY and knob in _REGISTRY[method].knobs


def _check_knobs_are_config_fields(method: Method) -> None:
    # The built-in methods register while tdpo_lab.config is being imported (it reads their defaults), so
    # the Config class may not exist yet; config.py checks those itself once it does.
    import sys

    config = sys.modules.get("tdpo_lab.config")
    fields = getattr(config, "_FIELDS", None)
    if fields is None:
        return
    unknown = [k for k in method.knobs if k not in fields]
    if unknown:
        raise ValueError(
            f"method {method.name!r} declares knob(s) {unknown} that are not config fields; a method reads "
            "existing fields of tdpo_lab.config.Config (add a field there for a new knob)"
        )


# --- the shared loss ----------------------------------------------------------------------------------------
def _check_stats(stats: TokenStats) -> tuple[int, int]:
    fields = ("logps", "ref_logps", "kl", "mask")
    if not all(isinstance(getattr(stats, f, None), Tensor) for f in fields):
        raise TypeError(f"stats must be a TokenStats (fields {fields}) from token_stats(), got {type(stats)}")
    shape = tuple(stats.logps.shape)
    if len(shape) != 2:
        raise ValueError(f"stats fields must be [N, T-1], got logps of shape {shape}")
    for f in fields[1:]:
        if tuple(getattr(stats, f).shape) != shape:
            raise ValueError(
                f"stats.{f} has shape {tuple(getattr(stats, f).shape)}, expected {shape} like logps"
            )
    n = shape[0]
    if n == 0 or n % 2:
        raise ValueError(
            f"a preference batch has an even number of rows N = 2B (chosen rows then rejected rows), got N = {n}"
        )
    return n // 2, shape[1]


def _check_scalar(name: str, value: float, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0 (it scales the implicit reward; typical 0.1), got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0 (0 switches the term off), got {value}")


def _masked_weights(method: Method, weights, mask: Tensor, ratio: Tensor, b: int, width: int):
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    if not method.weighted:
        if weights is not None:
            raise ValueError(f"method {method.name!r} takes no token weights; drop weights=")
        return None
    if weights is None:
        raise ValueError(
            f"method {method.name!r} needs token weights [N, T-1] = [{2 * b}, {width}]; pass weights="
        )
    if not isinstance(weights, Tensor) or tuple(weights.shape) != (2 * b, width):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights)
        raise ValueError(f"weights must be [N, T-1] = [{2 * b}, {width}] aligned with stats, got {got}")
    w = torch.where(mask, weights.detach().to(ratio.dtype), zero)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0 on response positions")
    return w


def preference_loss(
    method: str | Method,
    stats: TokenStats,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    weights: Tensor | None = None,
) -> LossOutput:
    """Per-pair loss of a registered method, with the metrics every method logs.

    ``stats``: :class:`TokenStats`, fields ``[N, T-1]``, N = 2B (rows ``[:B]`` chosen, ``[B:]`` rejected).
    ``weights``: ``[N, T-1]`` token weights aligned with ``stats`` (detached; only masked positions are
    used), required for weighted methods (``token_weights != "none"``) and an error for the others.
    ``beta`` > 0; ``alpha`` >= 0 is passed to the method's loss (only the methods with an ``alpha`` knob
    read it). All-ones weights give exactly the unweighted loss; at pi_theta = pi_ref the sigmoid losses are
    ln 2.

    Metrics (python floats, means over pairs): ``loss``; ``rewards/chosen|rejected`` = beta * (weighted) sum
    of r_t (the implicit reward, detached), ``rewards/margins``, ``rewards/accuracies``;
    ``logps/chosen|rejected`` (policy sequence log-probs); ``kl_seq/chosen|rejected`` (SeqKL); and for
    methods that use the SeqKL ``token_reward/chosen|rejected|accuracies`` with the token-level reward
    R = beta * sum r_t + beta * SeqKL (docs/methods.md section 2 step 5; what the TDPO code logs as rewards).
    """
    method = method if isinstance(method, Method) else get_method(method)
    b, width = _check_stats(stats)
    _check_scalar("beta", beta, positive=True)
    _check_scalar("alpha", alpha, positive=False)
    mask = stats.mask.bool()
    zero = torch.zeros((), dtype=stats.logps.dtype, device=stats.logps.device)
    # r_t on response positions only (where() rather than a product: 0 * inf would be NaN at masked slots)
    ratio = torch.where(mask, stats.logps - stats.ref_logps, zero)
    w = _masked_weights(method, weights, mask, ratio, b, width)
    ratio_sum = (w * ratio).sum(-1) if w is not None else ratio.sum(-1)
    seq_kl = torch.where(mask, stats.kl, zero).sum(-1)
    lengths = mask.sum(-1).to(ratio.dtype)
    logps = torch.where(mask, stats.logps, zero).sum(-1)
    terms = PairTerms(
        ratio_sum[:b], ratio_sum[b:], seq_kl[:b], seq_kl[b:], lengths[:b], lengths[b:], logps[:b], logps[b:]
    )
    losses = method.loss(terms, beta=beta, alpha=alpha)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (b,):
        raise ValueError(f"method {method.name!r}: loss must return per-pair losses of shape ({b},)")
    loss = losses.mean()
    return LossOutput(loss=loss, losses=losses, metrics=_metrics(method, terms, ratio, loss, beta))


@torch.no_grad()
def logit_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """TRL's ``logits/chosen`` and ``logits/rejected``: the mean policy logit over response positions.

    ``logits`` ``[N, T, V]`` (rows ``[:N/2]`` chosen, ``[N/2:]`` rejected), ``labels`` ``[N, T]`` unshifted, -100
    off the response. As TRL's ``DPOTrainer`` computes them: the positions that predict a response token
    (``logits[:, :-1]`` where ``labels[:, 1:] != -100``), every vocabulary entry, pooled over the half-batch
    (one mean over all those positions and entries, not a mean of per-pair means). A drift of this number
    shows the logits' scale moving, which a log-softmax hides. Summed over the vocabulary first, in fp32, so
    no ``[positions, V]`` copy is made.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or logits.shape[0] % 2:
        raise ValueError(
            f"need logits [N, T, V] with N = 2B even and labels [N, T], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    b, vocab = logits.shape[0] // 2, logits.shape[-1]
    mask = labels[:, 1:] != -100
    sums = logits[:, :-1].sum(-1, dtype=torch.float32)  # [N, T-1]: each position's logits summed over V
    zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
    per_row = torch.where(mask, sums, zero).sum(-1)
    positions = mask.sum(-1).to(sums.dtype)
    out = {}
    for name, rows in (("logits/chosen", slice(0, b)), ("logits/rejected", slice(b, None))):
        out[name] = (per_row[rows].sum() / (positions[rows].sum().clamp(min=1) * vocab)).item()
    return out


@torch.no_grad()
def _metrics(method: Method, terms: PairTerms, ratio, loss, beta: float) -> dict[str, float]:
    rewards_w, rewards_l = beta * terms.chosen, beta * terms.rejected
    values = {
        "loss": loss,
        "rewards/chosen": rewards_w.mean(),
        "rewards/rejected": rewards_l.mean(),
        "rewards/margins": (rewards_w - rewards_l).mean(),
        "rewards/accuracies": (rewards_w > rewards_l).to(loss.dtype).mean(),
        "logps/chosen": terms.logps_chosen.mean(),
        "logps/rejected": terms.logps_rejected.mean(),
        "kl_seq/chosen": terms.kl_chosen.mean(),
        "kl_seq/rejected": terms.kl_rejected.mean(),
    }
    if method.uses_seq_kl:
        # token-level reward R = beta sum r_t + beta SeqKL (docs/methods.md section 2 step 5), unweighted
        b, plain = terms.chosen.shape[0], ratio.sum(-1)
        token_w = beta * (plain[:b] + terms.kl_chosen)
        token_l = beta * (plain[b:] + terms.kl_rejected)
        values["token_reward/chosen"] = token_w.mean()
        values["token_reward/rejected"] = token_l.mean()
        values["token_reward/accuracies"] = (token_w > token_l).to(loss.dtype).mean()
    stacked = torch.stack([v.detach().to(loss.dtype) for v in values.values()]).tolist()
    return dict(zip(values, stacked, strict=True))
