"""The upstream simulator: an OpenAI-compatible HTTP server for demos, tests and benchmarks.

It speaks the real wire format of ``/v1/chat/completions`` and ``/v1/responses``, streaming and
not, with deterministic text for a given request (``simulator.text``). A request tunes it with a
``"simulator"`` object in its body, which the fleet forwards untouched like any unknown field:

    tokens      how many tokens to stream (default 16, or ``max_tokens`` if smaller)
    tps         tokens per second (default: the server's ``--tps``)
    ttft_ms     time to first token in milliseconds (default: the server's ``--ttft-ms``)
    replay      a recorded ``.sse`` file (under ``--replay-dir``) to send byte for byte
    pace_ms     with ``replay``: pause between events
    stamp       add ``x_sent_ns`` (CLOCK_MONOTONIC at send) to every chunk, for latency benchmarks

and asks for faults (``simulator.faults``: error statuses, drops, stalls, error events, bad data).

``GET /_simulator/stats`` counts requests, streams started, completed and cut short by the client.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared import processes

from . import faults, text


@dataclass
class SimulatorConfig:
    tps: float = 50.0
    ttft_ms: float = 20.0
    replay_dir: Path | None = None


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    disconnected: int = 0
    requests: int = 0
    paths: dict[str, int] = field(default_factory=dict)


MODELS = ("sim", "sim-large")
"""The names ``/v1/models`` lists."""


def _sse(data: Any, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": None}}, status)


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.seen: Counter[str] = Counter()

    def _timing(self, body: dict[str, Any]) -> tuple[float, float]:
        opts = text.options(body)
        tps = float(opts.get("tps") or self.config.tps)
        ttft_ms = float(opts.get("ttft_ms", self.config.ttft_ms))
        return ttft_ms / 1000, (1 / tps if tps > 0 else 0.0)

    async def _counted(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.stats.started += 1
        finished = False
        try:
            async for piece in events:
                yield piece
            finished = True
        finally:
            if finished:
                self.stats.completed += 1
            else:
                self.stats.disconnected += 1

    async def _body(self, request: Request) -> dict[str, Any] | JSONResponse:
        self.stats.requests += 1
        self.stats.paths[request.url.path] = self.stats.paths.get(request.url.path, 0) + 1
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "you must provide a model parameter")
        return body

    async def _prelude(self, request: Request) -> Response | tuple[dict[str, Any], faults.Fault | None]:
        """What both endpoints do first: read the body, replay a recording, answer a status fault.
        Returns the answer, or the body and the stream fault (if any) for the endpoint to apply."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if "replay" in text.options(body):
            return self._replay(body)
        fault = faults.pick(body, self.seen)
        if fault is not None and (failed := faults.status_response(fault)) is not None:
            return failed
        return body, fault

    def _replay(self, body: dict[str, Any]) -> Response:
        name = str(text.options(body)["replay"])
        root = self.config.replay_dir
        path = (root / name).resolve() if root else None
        if root is None or path is None or not path.is_file() or root.resolve() not in path.parents:
            return _error(404, f"no recording named {name!r} under the replay directory")
        raw = path.read_bytes()
        pace = float(text.options(body).get("pace_ms", 0)) / 1000

        async def events() -> AsyncIterator[bytes]:
            if not pace:
                yield raw
                return
            pieces = raw.split(b"\n\n")
            for i, piece in enumerate(pieces):
                yield piece + (b"\n\n" if i < len(pieces) - 1 else b"")
                await asyncio.sleep(pace)

        return StreamingResponse(self._counted(events()), media_type="text/event-stream")

    async def chat_completions(self, request: Request) -> Response:
        prelude = await self._prelude(request)
        if isinstance(prelude, Response):
            return prelude
        body, fault = prelude
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' must be a non-empty array")
        choices = body.get("n") or 1
        tokens = [text.tokens(body, choice) for choice in range(choices)]
        envelope = {
            "id": "chatcmpl-" + text.request_id(body),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_simulator",
        }
        usage = text.usage(body, sum(len(t) for t in tokens))
        finish = text.finish_reason(body)
        if not body.get("stream"):
            ttft, interval = self._timing(body)
            await asyncio.sleep(ttft + interval * max(0, len(tokens[0]) - 1))
            return JSONResponse(
                {
                    **envelope,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": "".join(t), "refusal": None},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                        for i, t in enumerate(tokens)
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stamp = bool(text.options(body).get("stamp"))
        ttft, interval = self._timing(body)

        def chunk(choice: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            data = {
                **envelope,
                "choices": [{"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                data["usage"] = None
            if stamp:
                data["x_sent_ns"] = time.monotonic_ns()  # CLOCK_MONOTONIC: comparable across processes
            return _sse(data)

        async def events() -> AsyncIterator[bytes]:
            await asyncio.sleep(ttft)
            for choice in range(choices):
                yield chunk(choice, {"role": "assistant", "content": "", "refusal": None})
            start = time.monotonic()
            for position in range(max(len(t) for t in tokens)):
                if position:
                    await asyncio.sleep(max(0.0, start + position * interval - time.monotonic()))
                for choice, choice_tokens in enumerate(tokens):
                    if position < len(choice_tokens):
                        yield chunk(choice, {"content": choice_tokens[position]})
            for choice in range(choices):
                yield chunk(choice, {}, finish)
            if include_usage:
                yield _sse({**envelope, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        body_events = events() if fault is None else faults.inject(events(), fault, responses=False)
        return StreamingResponse(self._counted(body_events), media_type="text/event-stream")

    async def responses(self, request: Request) -> Response:
        prelude = await self._prelude(request)
        if isinstance(prelude, Response):
            return prelude
        body, fault = prelude
        tokens = text.tokens(body)
        full = "".join(tokens)
        response_id = "resp_" + text.request_id(body)
        item_id = "msg_" + text.request_id(body)
        counts = text.usage(body, len(tokens))
        usage = {
            "input_tokens": counts["prompt_tokens"],
            "output_tokens": counts["completion_tokens"],
            "total_tokens": counts["total_tokens"],
        }
        message = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": full, "annotations": []}],
        }
        base = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": "in_progress",
            "output": [],
            "usage": None,
        }
        final = {**base, "status": "completed", "output": [message], "usage": usage}
        ttft, interval = self._timing(body)
        if not body.get("stream"):
            await asyncio.sleep(ttft + interval * max(0, len(tokens) - 1))
            return JSONResponse(final)

        async def events() -> AsyncIterator[bytes]:
            sequence = iter(range(1_000_000))

            def event(kind: str, **data: Any) -> bytes:
                return _sse({"type": kind, "sequence_number": next(sequence), **data}, kind)

            yield event("response.created", response=base)
            yield event("response.in_progress", response=base)
            await asyncio.sleep(ttft)
            yield event(
                "response.output_item.added",
                output_index=0,
                item={**message, "status": "in_progress", "content": []},
            )
            part = {"type": "output_text", "text": "", "annotations": []}
            yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)
            start = time.monotonic()
            for position, token in enumerate(tokens):
                if position:
                    await asyncio.sleep(max(0.0, start + position * interval - time.monotonic()))
                yield event(
                    "response.output_text.delta",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    delta=token,
                )
            yield event("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=full)
            yield event(
                "response.content_part.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part={**part, "text": full},
            )
            yield event("response.output_item.done", output_index=0, item=message)
            yield event("response.completed", response=final)

        body_events = events() if fault is None else faults.inject(events(), fault, responses=True)
        return StreamingResponse(self._counted(body_events), media_type="text/event-stream")

    async def stats_route(self, request: Request) -> Response:
        return JSONResponse(asdict(self.stats))

    async def models(self, request: Request) -> Response:
        """The model list, as OpenAI's ``GET /v1/models`` answers (the simulator answers any model name)."""
        models = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "simulator"} for name in MODELS]
        return JSONResponse({"object": "list", "data": models})


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    # It shares the benchmarks' machine with the fleet: its collector is settled as the fleet's are.
    processes.settle_garbage_collector()
    yield


def create_app(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app."""
    simulator = Simulator(config or SimulatorConfig())
    return Starlette(
        lifespan=_lifespan,
        routes=[
            Route("/v1/chat/completions", simulator.chat_completions, methods=["POST"]),
            Route("/v1/responses", simulator.responses, methods=["POST"]),
            Route("/v1/models", simulator.models, methods=["GET"]),
            Route("/_simulator/stats", simulator.stats_route, methods=["GET"]),
        ],
    )
