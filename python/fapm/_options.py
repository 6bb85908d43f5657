"""Python values of numeric options as the text the command line takes: the Rust side
(``fapm::config``, the command line's own parser) checks them and says what is wrong.

A float is the decimal its ``repr`` shows (``0.9`` is ``"0.9"``, the exact decimal 0.9, as
``--sparsity 0.9`` is), written without an exponent (``1e-05`` is ``"0.00001"``); an int is its
digits; a ``str`` or ``decimal.Decimal`` is taken as it is written; another real number (NumPy's
``float32``) as its ``str``. ``True`` and ``False`` are
not numbers here. NaN and the infinities pass as ``"nan"`` and ``"inf"``, which the parser
refuses with the command line's message.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Iterable, Mapping, Tuple, Union

Number = Union[str, int, float]


def decimal(option: str, value) -> str:
    """``value`` of option ``option`` as the command line's text."""
    if isinstance(value, str):
        return value
    if _is_decimal(value):
        return format(value, "f")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{option} must be a number or a string such as '0.9', not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    # A float's repr; another real's str (NumPy's float32: the shortest decimal of its precision).
    text = float.__repr__(value) if isinstance(value, float) else str(value)
    if "e" in text.lower() and math.isfinite(value):
        from decimal import Decimal, InvalidOperation

        try:
            text = format(Decimal(text), "f")
        except InvalidOperation:
            pass
    return text


def _is_decimal(value) -> bool:
    # A Decimal exists only once its module was imported: no import for the others.
    d = sys.modules.get("decimal")
    return d is not None and isinstance(value, d.Decimal)


def size(option: str, value):
    """A size option (``memory_budget``): None, text such as ``"512M"``, or a number of bytes."""
    return None if value is None else decimal(option, value)


def sparsity_rules(rules: Union[Mapping[str, Number], Iterable[Union[str, Tuple[str, Number]]]]) -> list:
    """``sparsity_for`` as ``RE=S`` rules: given as such strings, as ``(RE, S)`` pairs, or as a
    dict ``{RE: S}`` (in its order: the first matching rule wins)."""
    if isinstance(rules, str):
        raise TypeError("sparsity_for must be a list of 'REGEX=SPARSITY' rules or a dict, not one string")
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for r in items:
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str):
            out.append(f"{r[0]}={decimal('sparsity_for', r[1])}")
        else:
            raise TypeError(f"a sparsity_for rule is 'REGEX=SPARSITY' or a (regex, sparsity) pair, not {type(r).__name__}")
    return out
