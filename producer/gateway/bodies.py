"""Request bodies: every route parses JSON with ``shared.jsonutil``, so that one rule says what is
refused (``NaN``, ``Infinity``, numbers that overflow, nesting past ~1,000 levels) and integers of
any width stay exact on their way to the upstream."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from shared import jsonutil


class _StrictRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = jsonutil.loads(body)
            except ValueError as exc:
                # FastAPI answers this one with its 400 ("JSON decode error").
                raise json.JSONDecodeError(str(exc), body.decode("utf-8", "replace")[:100], 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose pydantic body is parsed by ``jsonutil`` instead of the standard library's
    ``json`` (which takes ``NaN`` and fails deep nesting with a ``RecursionError``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictRequest(request.scope, request.receive))

        return strict


async def json_object(request: Request) -> dict[str, Any]:
    """The request's body, which must be a JSON object (a 400 otherwise)."""
    try:
        body = jsonutil.loads(await request.body())
    except ValueError as exc:
        raise HTTPException(400, f"the request body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    return body
