"""JSON numbers stay exact at any width, on the fast path and the slow one."""

from __future__ import annotations

import pytest

from shared import jsonutil


@pytest.mark.parametrize(
    "text",
    [
        b'{"n": 12345678901234567890123}',  # wider than 64 bits: the exact path
        b'{"n": -98765432109876543210, "s": "x"}',
        b"[1, 18446744073709551616]",  # 2**64
        b'{"n": 1234567890123456789, "t": "9999999999"}',  # 19 digits: orjson keeps it
        b'{"id": "chatcmpl-0123456789012345678901234", "n": 3}',  # digits in a string: either path is exact
    ],
)
def test_loads_keeps_every_integer_exact(text: bytes) -> None:
    import json

    assert jsonutil.loads(text) == json.loads(text)
    assert jsonutil.loads(text.decode()) == json.loads(text)
    assert jsonutil.loads(jsonutil.dumps(jsonutil.loads(text))) == json.loads(text)


@pytest.mark.parametrize("wide", [False, True])
def test_dumps_writes_json_on_both_paths(wide: bool) -> None:
    """A float that is not finite is written as null, beside a 20-digit integer (the exact path) or not."""
    value = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (2.0,)}
    if wide:
        value["n"] = 12345678901234567890123
    written = jsonutil.dumps(value)
    expected = {"a": None, "b": [None, None, 1.5], "c": [2.0]} | ({"n": 12345678901234567890123} if wide else {})
    assert jsonutil.loads(written) == expected


@pytest.mark.parametrize("text", [b"NaN", b'{"a": NaN, "n": 12345678901234567890123}', b"[1e400]", b"[" * 5000])
def test_loads_refuses_what_is_not_json_on_both_paths(text: bytes) -> None:
    with pytest.raises(ValueError):
        jsonutil.loads(text)
