"""Option rules declared on signatures instead of written as checks.

A numeric option states its allowed range in its annotation, a choice option its choices as a ``Literal``::

    def __init__(self, lr: Annotated[float, Positive] = 1e-3,
                 ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.999,
                 steps: Annotated[int, Range(ge=1, label="K, flow iterations")] = 10,
                 coupling: Literal[COUPLINGS] = "minibatch") -> None: ...

:func:`~onestep.generators.base.check_option_types` (generators) and the datamodule read these when a
module is built, so every rule is written once and its error is the same one line everywhere:
``<option> must <rule>, got <value>`` (e.g. ``ema_decay must lie in [0, 1), got 1.5``). The CLI reads the
same rule for a value the parser refused before the module was built (``nan``): see :func:`declared_rule`.
Rules that tie several options together (``t_min < t_max``) stay hand-written checks in the ``__init__``.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Range:
    """An interval rule ``ge/gt <= value <= le/lt`` (any bound may be left out).

    ``label`` goes after the option's name, ``note`` after the rule:
    ``steps (K, flow iterations) must be >= 1, got 0``; ``eta_d must be > 0 (1 = full projection), got 0``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    label: str = ""
    note: str = ""

    def contains(self, value: Any) -> bool:
        v = int(value) if isinstance(value, numbers.Integral) else float(value)  # exact for large integers
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def bounds(self) -> str:
        """``> 0``, ``>= 1``, ``in [0, 1)`` (empty without bounds)."""
        low = (self.ge, "[", ">=") if self.ge is not None else (self.gt, "(", ">") if self.gt is not None else None
        high = (self.le, "]", "<=") if self.le is not None else (self.lt, ")", "<") if self.lt is not None else None
        if low and high:
            return f"in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
        bound = low or high
        return f"{bound[2]} {_number(bound[0])}" if bound else ""

    def describe(self) -> str:
        """``be > 0``, ``be >= 1``, ``lie in [0, 1)``: the words after ``<option> must``."""
        bounds = self.bounds()
        text = ("lie " if bounds.startswith("in ") else "be ") + (bounds or "a finite number")
        return text + (f" ({self.note})" if self.note else "")

    def message(self, option: str, value: Any) -> str:
        name = f"{option} ({self.label})" if self.label else option
        return f"{name} must {self.describe()}, got {value!r}"


def _number(x: float) -> str:
    if float(x).is_integer() and abs(x) >= 2**32 and (int(abs(x)) & (int(abs(x)) - 1)) == 0:
        return ("-" if x < 0 else "") + f"2**{int(abs(x)).bit_length() - 1}"  # seeds: [0, 2**63)
    return str(int(x)) if float(x).is_integer() else str(x)


#: the common rules, by name
Positive = Range(gt=0)
NonNegative = Range(ge=0)
AtLeastOne = Range(ge=1)
UnitInterval = Range(ge=0, le=1)
Fraction = Range(ge=0, lt=1)  # decays and momenta: [0, 1)


def rules_of(tp: Any) -> list[Range]:
    """The :class:`Range` rules in an annotation (through ``Optional``/unions)."""
    if typing.get_origin(tp) is typing.Annotated:
        return [m for m in tp.__metadata__ if isinstance(m, Range)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [r for a in typing.get_args(tp) for r in rules_of(a)]
    return []


def choices_of(tp: Any) -> tuple | None:
    """The choices of a ``Literal`` annotation (``Literal[...] | None`` included), else None."""
    if typing.get_origin(tp) is typing.Annotated:
        return choices_of(typing.get_args(tp)[0])
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [c for a in typing.get_args(tp) if (c := choices_of(a)) is not None]
        return tuple(c for group in found for c in group) if found else None
    return None


def rule_error(option: str, value: Any, tp: Any) -> str | None:
    """The one-line error for ``value`` of an option annotated ``tp`` whose *type* is already right, or
    None when the value obeys the declared rule (range or choices)."""
    choices = choices_of(tp)
    if choices is not None and value not in choices and not (value is None and _allows_none(tp)):
        return f"{option} must be one of {choices}" + (" (or null)" if _allows_none(tp) else "") + f", got {value!r}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        return None  # None, text, ...: the type check answers
    for rule in rules_of(tp):
        if not rule.contains(value):
            return rule.message(option, value)
    return None


def describe_rule(tp: Any) -> str | None:
    """The declared rule of an annotation as the words after ``<option> must`` (None if it declares none)."""
    rules = rules_of(tp)
    if rules:
        return rules[0].describe()
    choices = choices_of(tp)
    return f"be one of {choices}" if choices is not None else None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def init_hints(cls: type) -> dict[str, Any]:
    """The ``__init__`` annotations of ``cls`` and its bases (subclasses win), with their rules kept."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints.update(typing.get_type_hints(init, include_extras=True))
        except Exception:  # noqa: BLE001 - an annotation that does not resolve is simply not checked
            continue
    hints.pop("return", None)
    return hints


def declared_rule(cls: type, option: str) -> str | None:
    """The rule ``cls`` (or a base) declares for ``option`` (``be > 0``), for messages about values the
    command-line parser refused before the class was built (``nan``, ``inf``)."""
    tp = init_hints(cls).get(option)
    return describe_rule(tp) if tp is not None else None


# ---------------------------------------------------------------------- types from annotations
def describe_type(tp: Any) -> str:
    """An annotation in words: ``an integer``, ``a finite number or None``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return describe_type(args[0])
    if tp is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
    if origin in (list, tuple, Sequence) or tp in (list, tuple, Sequence):
        return f"a list of {describe_type(args[0])} values" if args else "a list"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the type the annotation ``tp`` asks for (types this cannot judge are accepted;
    ranges are :func:`rule_error`'s business)."""
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return conforms(value, args[0])
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, (bool, np.bool_))
    if tp is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if tp is float:
        return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
                and math.isfinite(float(value)))
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or tp in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(conforms(v, args[0]) for v in value)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, tp) if isinstance(tp, type) else True


def check_options(cls: type, options: Mapping[str, Any], prefix: str = "", say_allowed: bool = False) -> None:
    """Refuse the first of ``options`` that breaks the ``__init__`` annotations of ``cls`` (and its bases)
    with one line: a choice not among a ``Literal``'s, a value of the wrong type (``nan`` included, with the
    declared range), or a value outside its declared :class:`Range`. Options without annotation pass.
    ``say_allowed``: every refusal reads ``<prefix><option>=<value> is not allowed; use <type and rule>``."""
    hints = init_hints(cls)
    for option, value in options.items():
        if option not in hints:
            continue
        tp = hints[option]
        if say_allowed:
            if value_problem(value, tp):
                raise ValueError(f"{prefix}{option}={value!r} is not allowed; use {allowed_words(tp)}")
            continue
        wrong_rule = rule_error(option, value, tp)
        if wrong_rule and choices_of(tp) is not None:
            raise ValueError(prefix + wrong_rule)
        if not conforms(value, tp):
            non_finite = isinstance(value, (float, np.floating)) and not math.isfinite(float(value))
            stated = describe_rule(tp) if non_finite else None
            also = f" ({option} must {stated})" if stated else ""
            raise ValueError(f"{cls.__name__}: {option}={value!r} is not allowed; expected {describe_type(tp)}{also}")
        if wrong_rule:
            raise ValueError(prefix + wrong_rule)


def value_problem(value: Any, tp: Any) -> str | None:
    """Why ``value`` breaks the annotation ``tp``, type and rule in one phrase (``must be an integer >= 1,
    got 0``), for checks that name the option themselves (suite files); None when it fits."""
    if conforms(value, tp) and rule_error("", value, tp) is None:
        return None
    return f"must be {allowed_words(tp)}, got {value!r}"


def allowed_words(tp: Any) -> str:
    """What an annotation allows, type and rule in one phrase: ``an integer >= 1``, ``one of a, b``."""
    choices = choices_of(tp)
    if choices is not None:
        return f"one of {', '.join(str(c) for c in choices)}"
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    kinds = [a for a in args if a is not type(None)]
    rules = rules_of(tp)
    words = " or ".join(describe_type(a) for a in kinds)
    if rules:
        words += f" {rules[0].bounds()}" + (f" ({rules[0].note})" if rules[0].note else "")
    return words
