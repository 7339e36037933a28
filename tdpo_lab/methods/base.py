"""What a preference method is, the registry that holds them, and the one loss function they all go through.

A method is a :class:`Method`: its name, label and colour (every table and figure reads them from here), the
config knobs it reads with their defaults, whether it needs pi_ref and the SeqKL, where its token weights
come from, and its loss as a pure function of per-pair sums (:class:`PairTerms`). Training-loop hooks
(``prepare``, ``step_weights``, ``extra_loss``) let a method add what the shared loop does not do, such as
AttentionPO's cached judge weights or TI-DPO's live saliency and triplet term.

:func:`preference_loss` turns per-token statistics (:func:`tdpo_lab.core.logprobs.token_stats`) into the
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tdpo_lab.config import Knob, declare_method, forget_method
from tdpo_lab.config import knobs as declared_knobs
from tdpo_lab.core.logprobs import TokenStats
from tdpo_lab.methods.metrics import logit_metrics as logit_metrics
from tdpo_lab.methods.metrics import pair_metrics

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
    """What a training-loop hook sees at one step (see :mod:`tdpo_lab.runs.train`)."""

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
class MethodInput:
    """A product a method needs before training, computed once per pair table and cached.

    ``compute(reference, tokenizer, pairs, knobs, progress) -> dict[str, Tensor]`` is a pure function of pi_ref
    (loaded with ``model_kwargs``, e.g. eager attention to read attention maps), the pair table and the
    method's knobs; the cache layer (:mod:`tdpo_lab.products.method_inputs`) runs it, stores the tensors as
    safetensors under ``<cache>/<name>/<key>`` and hands them back. The key covers the pair table, the values of
    ``knobs``, ``version`` and ``extra`` (constants of the code, such as a prompt template).
    """

    name: str
    compute: Callable[..., dict]
    knobs: tuple[str, ...] = ()
    version: int = 1
    extra: object = None
    model_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(
                f"an input name is a lower-case identifier (its cache folder), got {self.name!r}"
            )
        if not callable(self.compute):
            raise TypeError(f"input {self.name!r}: compute must be callable")
        object.__setattr__(self, "knobs", tuple(self.knobs))


def _knob_declarations(knobs) -> dict[str, Knob]:
    if isinstance(knobs, Mapping):
        items = [
            k if isinstance(k, Knob) else Knob(name, bool if isinstance(k, bool) else type(k), k)
            for name, k in knobs.items()
        ]
    else:
        items = list(knobs)
    if not all(isinstance(k, Knob) for k in items):
        raise TypeError("knobs must be tdpo_lab.config.Knob declarations or a {name: default} mapping")
    return {k.name: k for k in items}


@dataclasses.dataclass(frozen=True)
class Method:
    """A preference-optimisation method, declared in one place.

    ``loss(terms, *, beta, **knobs)`` returns the per-pair losses ``[B]`` from :class:`PairTerms`; it is
    called with ``beta`` and this method's own knobs only. ``knobs``: the config keys the method reads besides
    ``beta``, as :class:`~tdpo_lab.config.Knob` declarations (name, type, default, valid range, help) or a
    ``{name: default}`` mapping (type from the default). Registering the method makes them config keys
    (``--set name=value``); knobs of other methods never split this method's runs. ``inputs``: cached products
    the method needs before training (:class:`MethodInput`, e.g. AttentionPO's judge weights); the cache layer
    computes, stores and hands them to ``prepare``. ``needs_reference=False``: the
    loop skips pi_ref's forward and scores the policy against itself (r_t = 0, SeqKL = 0), so such a loss
    reads ``terms.logps_chosen``/``logps_rejected`` (a SimPO-like method). ``uses_seq_kl``: the loss reads
    the SeqKL terms (the TDPO family; they also log the token-level reward). ``token_weights``: ``"none"``,
    ``"judge"`` (computed once per pair before training, ``prepare``) or ``"saliency"`` (recomputed every
    step, ``step_weights``). Hooks (all optional):

    - ``prepare(cfg, pairs, inputs) -> state``: once per run, before the first step; ``inputs`` maps each
      declared :class:`MethodInput`'s name to what its ``compute`` returned (read back from the cache);
    - ``step_weights(ctx) -> (weights [N, T-1] or None, policy_logits or None)``: per step; a hook that runs
      the policy forward itself returns its logits so the loop does not run it twice;
    - ``extra_loss(ctx, stats) -> (tensor, metrics)``: added to the loss (TI-DPO's triplet term).
    """

    name: str
    label: str
    color: str
    loss: Callable[..., Tensor]
    knobs: Mapping[str, Knob] | Sequence[Knob] = dataclasses.field(default_factory=dict)
    needs_reference: bool = True
    uses_seq_kl: bool = False
    token_weights: str = "none"
    paper: str = ""
    prepare: Callable | None = None
    step_weights: Callable | None = None
    extra_loss: Callable | None = None
    inputs: tuple[MethodInput, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "knobs", _knob_declarations(self.knobs))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"a method name is a lower-case identifier such as 'ipo', got {self.name!r}")
        if self.token_weights not in WEIGHT_SOURCES:
            raise ValueError(f"token_weights must be one of {WEIGHT_SOURCES}, got {self.token_weights!r}")
        if not callable(self.loss):
            raise TypeError(f"method {self.name!r}: loss must be callable, got {type(self.loss).__name__}")
        if "beta" in self.knobs:
            raise ValueError(f"method {self.name!r}: beta is every method's knob; do not list it in knobs")
        for item in self.inputs:
            if not isinstance(item, MethodInput):
                raise TypeError(
                    f"method {self.name!r}: inputs must be MethodInput, got {type(item).__name__}"
                )
            unknown = [f for f in item.knobs if f not in self.knobs]
            if unknown:
                raise ValueError(
                    f"method {self.name!r}: input {item.name!r} keys on undeclared knob(s) {unknown}"
                )

    def knob_values(self, values) -> dict[str, object]:
        """This method's knobs read from ``values`` (a Config or a mapping), defaults for the missing ones."""
        get = values.get if isinstance(values, Mapping) else lambda k, d: getattr(values, k, d)
        return {name: get(name, knob.default) for name, knob in self.knobs.items()}

    @property
    def weighted(self) -> bool:
        return self.token_weights != "none"


# --- the registry -----------------------------------------------------------------------------------------
_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (config validation, the CLI, run names, tables and figures read it).

    Its knobs become config keys (:func:`tdpo_lab.config.declare_method`); a knob shared with a registered
    method must have the same type and default (one key, one default). Registering a name twice is an error
    unless ``replace=True``. Returns the method.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a tdpo_lab.methods.Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is registered already; pass replace=True to redefine it")
    try:
        declare_method(method.name, method.knobs.values())
    except ValueError as err:  # ConfigError: a clash with a field or with another method's default
        raise ValueError(str(err)) from None
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register one of their own clean up with this)."""
    _REGISTRY.pop(name, None)
    forget_method(name)


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
    """The default of a method knob, as the registered methods declare it."""
    if knob not in declared_knobs():
        raise KeyError(f"no registered method declares the knob {knob!r}")
    return declared_knobs()[knob].default


def reads_knob(method: str, knob: str) -> bool:
    return method in _REGISTRY and knob in _REGISTRY[method].knobs


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


def _own_knobs(method: Method, given: Mapping[str, object]) -> dict[str, object]:
    unknown = sorted(set(given) - set(declared_knobs()))
    if unknown:
        raise ValueError(
            f"unknown knob(s) {unknown} for preference_loss; registered knobs: {sorted(declared_knobs())}"
        )
    own = method.knob_values(given)
    for name, value in own.items():
        knob = method.knobs[name]
        if knob.type is float:
            _check_scalar(name, value, positive=False)
        if knob.check is not None and not knob.check(value):
            raise ValueError(f"{name} must be {knob.valid}, got {value!r}")
    return own


def preference_loss(
    method: str | Method,
    stats: TokenStats,
    *,
    beta: float = 0.1,
    weights: Tensor | None = None,
    **knobs,
) -> LossOutput:
    """Per-pair loss of a registered method, with the metrics every method logs.

    ``stats``: :class:`TokenStats`, fields ``[N, T-1]``, N = 2B (rows ``[:B]`` chosen, ``[B:]`` rejected).
    ``weights``: ``[N, T-1]`` token weights aligned with ``stats`` (detached; only masked positions are
    used), required for weighted methods (``token_weights != "none"``) and an error for the others.
    ``beta`` > 0; ``knobs``: values of the method's own knobs (e.g. ``alpha=0.5`` for TDPO2), defaults for the
    missing ones; knobs only other methods declare are ignored, so one call fits every method. All-ones weights give exactly the unweighted loss; at pi_theta = pi_ref the sigmoid losses are
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
    own = _own_knobs(method, knobs)
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
    losses = method.loss(terms, beta=beta, **own)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (b,):
        raise ValueError(f"method {method.name!r}: loss must return per-pair losses of shape ({b},)")
    loss = losses.mean()
    return LossOutput(
        loss=loss,
        losses=losses,
        metrics=pair_metrics(terms, ratio, loss, beta, token_reward=method.uses_seq_kl),
    )
