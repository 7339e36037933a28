"""Checks for the graded exercises: compare a student's value with the package's, and say what is off.

Every chapter marks the lines a student writes with nbgrader's ``### BEGIN SOLUTION`` / ``### END SOLUTION``;
``tdpo-lab exercises`` turns the chapters into student notebooks with those lines replaced by a stub. The cell
after each exercise calls a checker of ``tdpo_lab.course.grading.chNN``, which calls :func:`check_close` here:

- wrong type or shape: the message gives both shapes;
- not close: before giving up, the student's value is compared with the values that typical mistakes produce
  (a flipped sign, masked positions counted, a missing stop-gradient, ...); a match names the mistake;
- otherwise the message gives the largest difference and where it is.

:class:`ExerciseError` (an ``AssertionError``) carries the message, so a failing check reads like a failing
``assert`` in the notebook. Checks run in seconds on small tensors: grading never trains anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tdpo_lab.core.logprobs import TokenStats

__all__ = ["ExerciseError", "check_close", "check_grad", "num_pairs", "passed"]


class ExerciseError(AssertionError):
    """A graded exercise's value is not right; the message says what is off and, if it can, why."""


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ExerciseError(f"{name} must be a tensor (or a number), got {type(value).__name__}") from None


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool((torch.isclose(a, b, rtol=rtol, atol=atol) | both_nan).all())


def check_close(
    mine,
    want: torch.Tensor,
    *,
    name: str,
    mistakes: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    hint: str = "",
) -> None:
    """Raise :class:`ExerciseError` unless ``mine`` equals ``want`` (shape and values, within tolerance).

    ``mistakes`` maps a description of a typical mistake to the value it would produce (or a function that
    computes it, evaluated only when needed); if ``mine`` matches one, the message names it. ``hint`` is
    appended to a message that found no known mistake.
    """
    mine = _as_tensor(mine, name)
    want = want.detach()
    if tuple(mine.shape) != tuple(want.shape):
        _name_mistake(mine, name, mistakes, rtol, atol)  # some mistakes change the shape (a dropped EOS, ...)
        raise ExerciseError(
            f"{name} has shape {tuple(mine.shape)}, expected {tuple(want.shape)}"
            + (
                f" (did you sum or average over the wrong axis?) {hint}"
                if mine.numel() != want.numel()
                else ""
            )
        )
    if _close(mine, want, rtol, atol):
        return
    _name_mistake(mine, name, mistakes, rtol, atol)
    diff = (mine.detach().double().cpu() - want.double().cpu()).abs()
    worst = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    index = (
        tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), tuple(want.shape)))
        if want.dim()
        else ()
    )
    raise ExerciseError(
        f"{name} is not right: the largest difference is {diff.flatten()[worst].item():.4g} at index {index} "
        f"(yours {mine.detach().flatten()[worst].item():.6g}, expected {want.flatten()[worst].item():.6g}). "
        + hint
    )


def _name_mistake(mine: torch.Tensor, name: str, mistakes, rtol: float, atol: float) -> None:
    """Raise naming the first typical mistake whose value ``mine`` equals (same shape, within tolerance)."""
    for mistake, value in (mistakes or {}).items():
        wrong = value() if callable(value) else value
        if wrong is not None and _close(mine, _as_tensor(wrong, mistake), rtol, atol):
            raise ExerciseError(f"{name} is not right: it looks like {mistake}.")


def check_grad(
    mine: torch.Tensor,
    want: torch.Tensor,
    wrt: torch.Tensor,
    *,
    name: str,
    mistakes: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]] | None = None,
    hint: str = "",
) -> None:
    """Check that the scalar ``mine`` has the gradient of ``want`` with respect to ``wrt``.

    Values can agree while gradients differ (a missing ``.detach()``): this compares d mine / d wrt with
    d want / d wrt; ``mistakes`` map to gradients that typical mistakes produce.
    """
    if not isinstance(mine, torch.Tensor) or not mine.requires_grad:
        raise ExerciseError(
            f"{name} carries no gradient: build it from the given tensors with torch operations "
            "(no .item(), .numpy() or .detach() on the whole result)"
        )
    (g_mine,) = torch.autograd.grad(mine.sum(), wrt, retain_graph=True, allow_unused=True)
    (g_want,) = torch.autograd.grad(want.sum(), wrt, retain_graph=True, allow_unused=True)
    g_mine = torch.zeros_like(wrt) if g_mine is None else g_mine
    g_want = torch.zeros_like(wrt) if g_want is None else g_want
    check_close(g_mine, g_want, name=f"the gradient of {name}", mistakes=mistakes, hint=hint)


def num_pairs(stats) -> int:
    """B, the number of pairs of a ``TokenStats`` batch of 2B rows (chosen rows, then rejected rows)."""
    if not isinstance(stats, TokenStats):
        raise TypeError(f"stats must be a tdpo_lab.core.logprobs.TokenStats, got {type(stats).__name__}")
    rows = stats.logps.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"a preference batch has 2B rows (chosen, then rejected), got {rows}")
    return rows // 2


def passed(what: str) -> None:
    """The line a check cell prints when the exercise is right."""
    print(f"correct: {what}")
