"""What the simulator says: deterministic text for a request, so tests know what a job must produce."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import orjson

DEFAULT_TOKENS = 16
_WORDS = (
    "stream fleet token delta worker queue redis upstream consumer replay resume cursor event "
    "latency socket chunk result job attempt cancel retry publish subscribe order exactly once "
    "every tail late joiner gateway signal restart backoff jitter deadline heartbeat"
).split()


def options(request: dict[str, Any]) -> dict[str, Any]:
    """The simulator's own knobs, passed in the request body under ``"simulator"``."""
    value = request.get("simulator")
    return value if isinstance(value, dict) else {}


def token_count(request: dict[str, Any]) -> int:
    count = options(request).get("tokens")
    if isinstance(count, int) and count >= 0:
        return count
    limit = request.get("max_tokens") or request.get("max_completion_tokens") or request.get("max_output_tokens")
    return min(DEFAULT_TOKENS, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_TOKENS


def tokens(request: dict[str, Any], choice: int = 0) -> list[str]:
    """The tokens of choice ``choice`` for ``request``: the same request always gets the same text."""
    prompt = request.get("messages", request.get("input"))
    seed_source = orjson.dumps([request.get("model"), prompt, choice], option=orjson.OPT_SORT_KEYS)
    rng = random.Random(hashlib.sha256(seed_source).digest())
    words = [rng.choice(_WORDS) for _ in range(token_count(request))]
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def expected_text(request: dict[str, Any], choice: int = 0) -> str:
    """The whole text the simulator streams for ``request``."""
    return "".join(tokens(request, choice))


def finish_reason(request: dict[str, Any]) -> str:
    limit = request.get("max_tokens") or request.get("max_completion_tokens")
    return "length" if isinstance(limit, int) and token_count(request) >= limit else "stop"


def request_id(request: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]


def usage(request: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt_tokens = max(1, len(orjson.dumps(request.get("messages", request.get("input")))) // 4)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
