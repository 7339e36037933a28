"""The config's keys beyond its fields: the :class:`Knob` a method declares, and the registry of declarations.

The method registry (:func:`tdpo_lab.methods.register`) hands each method's knobs to :func:`declare_method`; the
Config (:mod:`tdpo_lab.config`) reads them from here. Nothing here knows a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

_RESERVED: set[str] = set()  # the Config's own fields (set by tdpo_lab.config): no knob may shadow one


def reserve(names: Iterable[str]) -> None:
    _RESERVED.update(names)


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


@dataclasses.dataclass(frozen=True)
class Knob:
    """A config key that one or more methods read: declared by the method, validated by the Config.

    ``type``: ``int``, ``float``, ``str`` or ``bool``; ``check(value) -> bool`` and ``valid`` (its words, e.g.
    ``">= 0"``) give the valid range; ``help`` is one line for the CLI and the docs.
    """

    name: str
    type: type
    default: object
    help: str = ""
    check: Callable[[object], bool] | None = None
    valid: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a knob name is an identifier such as 'alpha', got {self.name!r}")
        if self.type not in (int, float, str, bool):
            raise TypeError(f"knob {self.name!r}: type must be int, float, str or bool, got {self.type!r}")
        if not _type_ok(self.default, self.type.__name__):
            raise TypeError(
                f"knob {self.name!r}: default {self.default!r} is not of type {self.type.__name__}"
            )


# The methods' declarations, handed in by the method registry (tdpo_lab.methods.register): knob name -> Knob,
# method name -> the names of its knobs. The Config reads nothing else of a method.
_KNOBS: dict[str, Knob] = {}
_METHOD_KNOBS: dict[str, tuple[str, ...]] = {}


def declare_method(name: str, knobs: Iterable[Knob]) -> None:
    """Make ``name`` a valid ``method`` and its ``knobs`` config keys (the registry calls this on register).

    A knob another method declares already must have the same type and default (one key, one default); a knob
    may not shadow a Config field.
    """
    knobs = tuple(knobs)
    for knob in knobs:
        if knob.name in _RESERVED:
            raise ConfigError(f"method {name!r} declares knob {knob.name!r}, which is a Config field already")
        other = _KNOBS.get(knob.name)
        owners = [m for m, names in _METHOD_KNOBS.items() if knob.name in names and m != name]
        if other is not None and owners and (other.type, other.default) != (knob.type, knob.default):
            raise ConfigError(
                f"method {name!r} declares knob {knob.name!r} = {knob.default!r} ({knob.type.__name__}), but "
                f"{owners[0]!r} declares it = {other.default!r} ({other.type.__name__}); a knob has one default"
            )
    _METHOD_KNOBS[name] = tuple(k.name for k in knobs)
    for knob in knobs:
        _KNOBS[knob.name] = knob


def forget_method(name: str) -> None:
    """Undo :func:`declare_method` (a knob stays while another method declares it)."""
    _METHOD_KNOBS.pop(name, None)
    still = {k for names in _METHOD_KNOBS.values() for k in names}
    for knob in [k for k in _KNOBS if k not in still]:
        del _KNOBS[knob]


def declared_methods() -> tuple[str, ...]:
    return tuple(_METHOD_KNOBS)


def knobs() -> dict[str, Knob]:
    """Every declared knob by name."""
    return dict(_KNOBS)


def knob_methods() -> dict[str, tuple[str, ...]]:
    """Each knob and the methods that read it: a knob splits the runs of those methods only."""
    out: dict[str, tuple[str, ...]] = {}
    for method, names in _METHOD_KNOBS.items():
        for knob in names:
            out[knob] = (*out.get(knob, ()), method)
    return out


def method_knobs(method: str, values: Mapping[str, object]) -> dict[str, object]:
    """The knobs ``method`` declares, read from ``values`` (a Config's attributes or a dict)."""
    get = values.get if isinstance(values, Mapping) else lambda k, d: getattr(values, k, d)
    return {k: get(k, _KNOBS[k].default) for k in _METHOD_KNOBS.get(method, ())}


def _type_ok(value: object, annotation: str) -> bool:
    expected = {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)
