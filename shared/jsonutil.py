"""JSON that keeps every number exact, at orjson's speed where that is safe.

orjson turns integers wider than 64 bits into floats when it reads, and refuses them when it writes.
The contract says a 20-digit integer stays that integer, so those rare documents take the standard
library's slower, exact path.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_NUMBER = re.compile(rb"\d{20}")


def loads(raw: bytes | str) -> Any:
    """Parse JSON; integers of any width stay exact."""
    data = raw.encode() if isinstance(raw, str) else raw
    if _LONG_NUMBER.search(data):
        return json.loads(data)
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Serialize compactly to UTF-8 JSON; integers of any width stay exact."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
