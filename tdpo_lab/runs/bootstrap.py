"""Error bars that include the prompts: a two-level bootstrap over seeds and evaluation units.

Every evaluation number is a mean over evaluation units (prompts, or held-out pairs) of one run, then a mean
over training seeds. Both levels are samples: another seed trains differently, other prompts score
differently. The kit's runs share their units: every seed and every method is scored on the same 64 prompts
and the same held-out pairs (prompts are *crossed* with seeds, not nested in them). One bootstrap replicate
therefore draws

1. S seeds with replacement out of the S seeds, and
2. one set of units with replacement out of the units, used for every drawn seed (drawing prompts anew for
   each seed would treat the prompts' own effect as if it averaged out over seeds: an error bar too small by
   up to a factor sqrt(S) on that part), by cluster: held-out pairs of one prompt are drawn together;

and the same draw is applied to every method and checkpoint (paired: a difference of two methods then loses
what the seeds and prompts share). Fixed, not resampled: the SFT model, the training pairs, the reward model.
The statistic is recomputed on each replicate; its standard deviation over replicates is the standard error.

Known biases, tested in tests/test_bootstrap.py: the seed share of the variance comes out (S-1)/S of its
unbiased value (2/3 with three seeds), and the seed x prompt interaction is counted about three times (each
level's draw picks it up); with main effects dominant the error bar is about right, for a paired difference
whose main effects cancel it is conservative.

Data: ``{name: (unit_set, array[..., S, U])}`` (leading axes: checkpoints or anything else, S seeds in the
same order everywhere, U units of that set) and ``{unit_set: labels[U]}`` (the cluster of each unit). A
statistic gets ``{name: array[..., S]}``, the per-seed means over the drawn units with the drawn seeds, and
returns a number or a 1-D array. :func:`checkpoint_arrays` builds the arrays from a per-prompt results table
(:func:`tdpo_lab.runs.results.collect` with ``per_prompt=True``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "Bootstrap",
    "at_kl",
    "bootstrap",
    "checkpoint_arrays",
    "difference",
    "ideal_variance_of_mean",
    "mean",
]

N_BOOT = 2000
CHECKPOINT = ["method", "beta", "alpha", "setting", "step"]


@dataclass(frozen=True)
class Bootstrap:
    """A statistic's value on the data, its bootstrap standard error and the replicates ``[B, ...]``."""

    estimate: np.ndarray | float
    se: np.ndarray | float
    replicates: np.ndarray

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """The percentile interval of the replicates (NaN-aware), e.g. for a band."""
        tail = (1.0 - level) / 2.0
        with warnings.catch_warnings():  # an all-NaN column (a budget out of reach) stays NaN, quietly
            warnings.simplefilter("ignore", RuntimeWarning)
            return tuple(np.nanquantile(self.replicates, [tail, 1.0 - tail], axis=0))


def bootstrap(
    statistic: Callable[[dict[str, np.ndarray]], float | np.ndarray],
    data: Mapping[str, tuple[str, np.ndarray]],
    clusters: Mapping[str, Sequence],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Bootstrap:
    """Resample seeds, and units within them (one draw per unit set, shared by all seeds and arrays).

    ``data[name] = (unit_set, values[..., S, U])``; ``clusters[unit_set]`` = the cluster label of each of
    its U units (each unit its own cluster: ``range(U)``). Every array must have the same S. ``statistic``
    maps ``{name: per-seed means[..., S]}`` to a number or a 1-D array; it is applied to the data itself
    (the estimate) and to ``n_boot`` replicates drawn with ``numpy.random.default_rng(seed)`` (the same
    seed gives the same standard error: a verdict is computed once, whatever calls it). The standard error
    is the replicates' standard deviation (ddof=1), NaN-aware (a replicate where the statistic is undefined,
    e.g. a budget out of reach, is left out).
    """
    if not data:
        raise ValueError("bootstrap needs at least one array in data")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    arrays = {}
    n_seeds = None
    for name, (unit_set, values) in data.items():
        values = np.asarray(values, dtype=float)
        if unit_set not in clusters:
            raise ValueError(
                f"{name}: unit set {unit_set!r} has no cluster labels; pass clusters[{unit_set!r}]"
            )
        if values.ndim < 2 or values.shape[-1] != len(clusters[unit_set]):
            raise ValueError(
                f"{name}: expected values[..., S, U] with U = {len(clusters[unit_set])} units of "
                f"{unit_set!r}, got shape {values.shape}"
            )
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: values must be finite (a run without per-prompt values?)")
        if n_seeds is not None and values.shape[-2] != n_seeds:
            raise ValueError(f"{name}: {values.shape[-2]} seeds, others have {n_seeds}; pair the same seeds")
        n_seeds = values.shape[-2]
        arrays[name] = (unit_set, values)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # [B, S]
    weights = {u: _cluster_weights(np.asarray(labels), n_boot, rng) for u, labels in sorted(clusters.items())}

    # per-seed means over the drawn units, with the drawn seeds: [..., S, B] per array
    drawn = {}
    for name, (unit_set, values) in arrays.items():
        w = weights[unit_set]  # [B, U]
        means = (values @ w.T) / w.sum(1)  # [..., S, B]
        drawn[name] = means[..., seeds.T, np.arange(n_boot)[None, :]]
    estimate = np.asarray(statistic({n: v.mean(-1) for n, (_, v) in arrays.items()}), dtype=float)
    replicates = np.stack(
        [np.asarray(statistic({n: d[..., b] for n, d in drawn.items()}), dtype=float) for b in range(n_boot)]
    )
    with warnings.catch_warnings():  # as in Bootstrap.interval
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.nanstd(replicates, axis=0, ddof=1)
    if estimate.ndim == 0:
        return Bootstrap(float(estimate), float(se), replicates)
    return Bootstrap(estimate, se, replicates)


def _cluster_weights(labels: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[B, U]: each unit weighted by how often its cluster was drawn (K draws out of K clusters)."""
    _, inverse = np.unique(labels, return_inverse=True)
    k = inverse.max() + 1
    counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)  # [B, K]
    return counts[:, inverse].astype(float)


# --- the common statistics -----------------------------------------------------------------------------


def mean(values: np.ndarray, *, clusters: Sequence | None = None, **kwargs) -> Bootstrap:
    """The mean over seeds of the mean over units of ``values[S, U]``."""
    values = np.asarray(values, dtype=float)
    labels = np.arange(values.shape[-1]) if clusters is None else clusters
    return bootstrap(lambda d: d["x"].mean(-1), {"x": ("units", values)}, {"units": labels}, **kwargs)


def difference(a: np.ndarray, b: np.ndarray, *, clusters: Sequence | None = None, **kwargs) -> Bootstrap:
    """mean(a) - mean(b) for two methods scored on the same seeds and units (``[S, U]`` each), paired."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(
            f"a paired difference needs the same seeds and units: shapes {a.shape} and {b.shape}"
        )
    labels = np.arange(a.shape[-1]) if clusters is None else clusters
    return bootstrap(
        lambda d: d["a"].mean(-1) - d["b"].mean(-1),
        {"a": ("units", a), "b": ("units", b)},
        {"units": labels},
        **kwargs,
    )


def at_kl(kl: np.ndarray, y: np.ndarray, budget: float | Sequence[float]) -> float | np.ndarray:
    """A seed-mean curve's value at KL = ``budget``: ``kl[C, S]`` and ``y[C, S]`` (checkpoints in step order).

    The seeds are averaged at each checkpoint, then ``y`` is read off by straight lines between the two
    checkpoints that bracket the budget (the first crossing in step order); NaN where the curve never reaches
    it. ``budget`` may be a list (then an array comes back). Used as a bootstrap statistic: a value at
    matched KL.
    """
    kl, y = np.asarray(kl, dtype=float).mean(-1), np.asarray(y, dtype=float).mean(-1)
    budgets = np.atleast_1d(np.asarray(budget, dtype=float))
    if len(kl) < 2:
        raise ValueError("a curve needs at least two checkpoints to be read at a KL")
    lo, hi = np.minimum(kl[:-1], kl[1:]), np.maximum(kl[:-1], kl[1:])  # [C-1] segments
    inside = (lo[None, :] <= budgets[:, None]) & (budgets[:, None] <= hi[None, :])  # [K, C-1]
    first = inside.argmax(1)
    run = kl[first + 1] - kl[first]
    t = np.where(run == 0, 0.0, (budgets - kl[first]) / np.where(run == 0, 1.0, run))
    out = np.where(inside.any(1), y[first] + t * (y[first + 1] - y[first]), np.nan)
    return float(out[0]) if np.ndim(budget) == 0 else out


def ideal_variance_of_mean(values: np.ndarray) -> float:
    """The exact (infinitely many replicates) bootstrap variance of the grand mean of ``values[S, U]``.

    With seed weights W (multinomial(S, 1/S) / S) and unit weights V (multinomial(U, 1/U) / U), independent,
    the replicate is W' Y V; with C_n = (diag(1/n) - 11'/n^2) / n the covariance of such weights and u, v the
    uniform vectors, Var = tr(Y C_U Y' C_S) + u' Y C_U Y' u + v' Y' C_S Y v. A check on :func:`bootstrap`
    without Monte-Carlo noise (each unit its own cluster).
    """
    y = np.asarray(values, dtype=float)
    s, n = y.shape

    def cov(k: int) -> np.ndarray:
        return (np.eye(k) / k - np.full((k, k), 1.0 / k**2)) / k

    c_s, c_u = cov(s), cov(n)
    u, v = np.full(s, 1.0 / s), np.full(n, 1.0 / n)
    return float(np.trace(y @ c_u @ y.T @ c_s) + u @ y @ c_u @ y.T @ u + v @ y.T @ c_s @ y @ v)


# --- from a results table --------------------------------------------------------------------------------


def checkpoint_arrays(
    table: pd.DataFrame, column: str, units: str = "prompt_ids", *, by: Sequence[str] = CHECKPOINT
) -> tuple[pd.DataFrame, np.ndarray, list[int], np.ndarray]:
    """(checkpoints, values[C, S, U], seeds, unit labels[U]) of one per-unit column of a results table.

    ``table`` comes from :func:`tdpo_lab.runs.results.collect` with ``per_prompt=True``; ``column`` is a list
    column (``reward_per_prompt``, ``kl_seq_per_prompt``, ``kl_seq_chosen_per_pair``, ...) and ``units``
    the column of its unit labels (``prompt_ids``; ``pair_prompt_ids`` for the pairs, the cluster of each).
    One row of ``checkpoints`` per ``by`` group, in the table's order; every group must hold the same seeds
    and every record the same unit labels, so that the bootstrap can pair them.
    """
    for name in (column, units, "seed", *by):
        if name not in table.columns:
            raise ValueError(
                f"table lacks column {name!r}: collect it with tdpo_lab.runs.results.collect(root, per_prompt=True) "
                "from runs that log per-prompt values (retrain runs made before them)"
            )
    if table[column].isna().any():
        raise ValueError(f"some evaluations have no {column!r} (runs made before per-prompt logging)")
    labels = table[units].iloc[0]
    if any(list(other) != list(labels) for other in table[units]):
        raise ValueError(
            f"the runs were not evaluated on the same units ({units} differ): they cannot be paired"
        )
    seeds = sorted(int(s) for s in table["seed"].unique())
    keys, blocks = [], []
    for key, group in table.groupby(list(by), dropna=False, sort=False):
        got = sorted(int(s) for s in group["seed"])
        if got != seeds:
            raise ValueError(
                f"checkpoint {dict(zip(by, key, strict=True))} has seeds {got}, the table {seeds}: "
                "finish the missing runs, or select the seeds every setting has"
            )
        group = group.sort_values("seed")
        keys.append(dict(zip(by, key, strict=True)))
        blocks.append(np.array([np.asarray(v, dtype=float) for v in group[column]]))
    return pd.DataFrame(keys), np.stack(blocks), seeds, np.asarray(labels)
