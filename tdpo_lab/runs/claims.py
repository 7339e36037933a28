"""One verdict per claim of the TDPO paper, computed once from the runs (docs/methods.md section 6).

Each claim is a function of a per-prompt results table (:func:`tdpo_lab.runs.results.collect` with
``per_prompt=True``, from run folders or a results store) and returns a :class:`Claim`: the estimate in the
claim's direction (positive supports it), its bootstrap standard error (:mod:`tdpo_lab.runs.bootstrap`: seeds
and evaluation units resampled, paired across the two methods), the three-way verdict of
:func:`tdpo_lab.runs.results.verdict` and the KL range the claim was tested on. Chapters, the README, ``docs/``,
``tdpo-lab claims`` and the frontier study's ``claims.md`` all print these records, so they cannot disagree.

1. :func:`frontier_claim`: method's monotone frontier above base's (:mod:`tdpo_lab.runs.frontier`), the mean of
   F_method(k) - F_base(k) over KL budgets inside both methods' ranges.
2. :func:`seqkl_balance_claim`: the method holds chosen and rejected SeqKL closer than base, measured by the
   scale-free |ln rho|, rho = SeqKL_rejected / SeqKL_chosen of the held-out pairs, at matched KL: the mean of
   |ln rho|_base(k) - |ln rho|_method(k) over budgets both methods' curves reach (never a raw gap between
   methods that moved different distances: a method that moves less looks balanced for that reason alone).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tdpo_lab.methods import method_label
from tdpo_lab.runs.bootstrap import N_BOOT, at_kl, bootstrap, checkpoint_arrays
from tdpo_lab.runs.frontier import envelope_overstatement, frontier_data, isotonic_at, kl_range
from tdpo_lab.runs.results import collect, verdict

__all__ = [
    "Claim",
    "all_claims",
    "claim_records",
    "claims_markdown",
    "frontier_claim",
    "seqkl_balance_claim",
    "write_claims",
]

FRONTIER_FRACTIONS = (0.2, 0.4, 0.6, 0.8)  # of the largest KL both fits reach: the fit's top end is biased
BALANCE_POINTS = 4


@dataclass(frozen=True)
class Claim:
    """One claim's verdict: ``estimate`` in the claim's direction, its ``se``, on ``kl_range`` (nats)."""

    claim: str
    method: str
    base: str
    estimate: float
    se: float
    verdict: str
    kl_range: tuple[float, float]
    budgets: tuple[float, ...]
    per_budget: tuple[float, ...] = field(default=())
    per_budget_se: tuple[float, ...] = field(default=())

    def line(self) -> str:
        """``VERDICT  text: estimate ± se over KL lo-hi nats`` (what every entry point prints)."""
        lo, hi = self.kl_range
        return (
            f"{self.verdict.upper():<26}{self.claim}: {self.estimate:+.4f} ± {self.se:.4f} "
            f"(mean over {len(self.budgets)} KL budgets in {lo:.2f}-{hi:.2f} nats)"
        )


def frontier_claim(
    table: pd.DataFrame, method: str = "tdpo2", base: str = "dpo", *, n_boot: int = N_BOOT, seed: int = 0
) -> Claim:
    """``method``'s monotone frontier lies above ``base``'s: mean of F_method(k) - F_base(k) over budgets.

    Budgets: :data:`FRONTIER_FRACTIONS` of the largest KL both methods' points reach (the isotonic fit is
    biased at its top end, so the last budget stays below it). Paired bootstrap of both fits together.
    """
    k_star = min(kl_range(table, m)[1] for m in (method, base))
    budgets = np.asarray(FRONTIER_FRACTIONS) * k_star
    mine, _ = frontier_data(table, method, "a_")
    theirs, clusters = frontier_data(table, base, "b_")

    def gap(d):
        return isotonic_at(d["a_kl"], d["a_reward"], budgets) - isotonic_at(d["b_kl"], d["b_reward"], budgets)

    per = bootstrap(gap, {**mine, **theirs}, clusters, n_boot=n_boot, seed=seed)
    whole = _mean_over_budgets(per)
    return Claim(
        claim=f"{method_label(method)}'s frontier above {method_label(base)}'s at matched KL",
        method=method,
        base=base,
        estimate=whole[0],
        se=whole[1],
        verdict=verdict(*whole),
        kl_range=(float(budgets[0]), float(budgets[-1])),
        budgets=tuple(float(k) for k in budgets),
        per_budget=tuple(float(v) for v in per.estimate),
        per_budget_se=tuple(float(v) for v in per.se),
    )


def seqkl_balance_claim(
    table: pd.DataFrame, method: str = "tdpo2", base: str = "dpo", *, n_boot: int = N_BOOT, seed: int = 0
) -> Claim:
    """``method`` keeps held-out chosen and rejected SeqKL more balanced than ``base``, at matched KL.

    Per (checkpoint, seed): rho = mean rejected SeqKL / mean chosen SeqKL over the held-out pairs (pairs of
    one prompt drawn together), |ln rho|; each setting's seed-mean curve of |ln rho| against the evaluation
    KL is read at the budgets (straight lines, no extrapolation, step 0 left out: rho is 0/0 there) and
    averaged over the settings that reach the budget. Budgets: :data:`BALANCE_POINTS` evenly from the
    largest first-evaluation KL to the smallest final KL of the two methods.
    """
    parts, clusters, curves = {}, {}, {}
    for tag, m in (("a_", method), ("b_", base)):
        rows = table[(table["method"] == m) & (table["step"] > 0)]
        if rows.empty:
            raise ValueError(f"no evaluations of {m!r} after step 0 in the table")
        keys, kl, _, prompts = checkpoint_arrays(rows, "kl_seq_per_prompt")
        _, chosen, _, pairs = checkpoint_arrays(rows, "kl_seq_chosen_per_pair", "pair_prompt_ids")
        _, rejected, _, _ = checkpoint_arrays(rows, "kl_seq_rejected_per_pair", "pair_prompt_ids")
        parts.update(
            {tag + "kl": ("prompts", kl), tag + "ch": ("pairs", chosen), tag + "rj": ("pairs", rejected)}
        )
        for unit_set, labels in (("prompts", prompts), ("pairs", pairs)):
            if unit_set in clusters and list(clusters[unit_set]) != list(labels):
                raise ValueError(f"{method} and {base} were not evaluated on the same {unit_set}: no pairing")
            clusters[unit_set] = labels
        curves[tag] = [np.flatnonzero((keys["setting"] == s).to_numpy()) for s in keys["setting"].unique()]
    means = {n: v.mean(-1).mean(-1) for n, (_, v) in parts.items()}  # seed-mean KL at each checkpoint
    lo = max(min(means[t + "kl"][c[0]] for c in curves[t]) for t in curves)
    hi = min(max(means[t + "kl"][c[-1]] for c in curves[t]) for t in curves)
    if not lo < hi:
        raise ValueError(
            f"{method} and {base} share no KL range after their first evaluation ({lo:.2f} >= {hi:.2f} nats): "
            "no matched-KL comparison; extend one method's grid"
        )
    budgets = np.linspace(lo, hi, BALANCE_POINTS)

    def imbalance(d, tag):
        log_rho = np.abs(np.log(d[tag + "rj"] / d[tag + "ch"]))  # [C, S]
        at = np.array([at_kl(d[tag + "kl"][c], log_rho[c], budgets) for c in curves[tag]])  # [settings, K]
        reached = np.isfinite(at).sum(0)
        return np.where(reached > 0, np.nansum(at, 0) / np.maximum(reached, 1), np.nan)

    per = bootstrap(
        lambda d: imbalance(d, "b_") - imbalance(d, "a_"), parts, clusters, n_boot=n_boot, seed=seed
    )
    whole = _mean_over_budgets(per)
    return Claim(
        claim=f"{method_label(method)} keeps chosen/rejected SeqKL more balanced than {method_label(base)} "
        "(|ln ρ| at matched KL)",
        method=method,
        base=base,
        estimate=whole[0],
        se=whole[1],
        verdict=verdict(*whole),
        kl_range=(float(lo), float(hi)),
        budgets=tuple(float(k) for k in budgets),
        per_budget=tuple(float(v) for v in per.estimate),
        per_budget_se=tuple(float(v) for v in per.se),
    )


def all_claims(
    table: pd.DataFrame, methods: Sequence[str] = ("tdpo1", "tdpo2"), base: str = "dpo", **kwargs
) -> list[Claim]:
    """Both claims for every method of ``methods`` present in ``table``, against ``base``."""
    present = set(table["method"])
    if base not in present:
        raise ValueError(f"the table has no {base!r} runs: every claim is against {base}")
    out = []
    for m in (m for m in methods if m in present):
        out += [frontier_claim(table, m, base, **kwargs), seqkl_balance_claim(table, m, base, **kwargs)]
    return out


def claims_markdown(table: pd.DataFrame, claims: Sequence[Claim]) -> str:
    """The verdicts (one line each, as :meth:`Claim.line`), per-budget numbers and the envelope's overstatement."""
    lines = ["# The papers' claims, one verdict each", "", "```"]
    lines += [c.line() for c in claims]
    lines += ["```", "", "| claim | budget k (nats) | estimate | s.e. |", "|---|---|---|---|"]
    for c in claims:
        for k, v, s in zip(c.budgets, c.per_budget, c.per_budget_se, strict=True):
            lines.append(f"| {c.claim} | {k:.2f} | {v:+.4f} | {s:.4f} |")
    lines += ["", "## How much the old envelope overstated (envelope − monotone fit)", ""]
    lines += [
        "| method | budget k (nats) | envelope | monotone fit | overstatement |",
        "|---|---|---|---|---|",
    ]
    for m in dict.fromkeys([c.base for c in claims] + [c.method for c in claims]):
        k_hi = kl_range(table, m)[1]
        over = envelope_overstatement(table, m, np.asarray(FRONTIER_FRACTIONS) * k_hi, n_boot=200)
        for row in over.itertuples():
            lines.append(
                f"| {method_label(m)} | {row.budget:.2f} | {row.envelope:.4f} ± {row.envelope_se:.4f} | "
                f"{row.isotonic:.4f} ± {row.isotonic_se:.4f} | {row.overstatement:+.4f} |"
            )
    return "\n".join(lines) + "\n"


def write_claims(root: str | os.PathLike, out: str | os.PathLike | None = None, **kwargs) -> Path:
    """Collect ``root`` (run folders or a store), write ``claims.md`` into ``out`` (default ``root``)."""
    table = collect(root, per_prompt=True)
    claims = all_claims(table, **kwargs)
    path = Path(out or root) / "claims.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(claims_markdown(table, claims))
    return path


def claim_records(claims: Sequence[Claim]) -> list[dict]:
    """Plain dicts of the claims (for JSON, or a DataFrame)."""
    return [asdict(c) for c in claims]


# --- helpers ------------------------------------------------------------------------------------------------


def _mean_over_budgets(per) -> tuple[float, float]:
    """The mean over budgets of a per-budget bootstrap, and its standard error from the same replicates."""
    estimate = float(np.nanmean(per.estimate))
    with warnings.catch_warnings():  # a replicate whose drawn seeds reach no budget is left out, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        replicates = np.nanmean(per.replicates, axis=1)
        return estimate, float(np.nanstd(replicates, ddof=1))
