"""The clients people already use, against the real gateway: the official ``openai`` SDK's exception classes
on stream errors, a clean end on resume, ``/v1/models``, OpenAI-shaped 404s, and one usage rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from producer import FleetClient
from simulator import expected_text
from tests.conftest import GatewayFactory, WorkerFactory, free_port, port_open, stop_process, wait_until
from tests.test_failures import FAST, chat

pytestmark = [pytest.mark.slow, pytest.mark.split_roles]


@pytest.fixture
def gateway(start_gateway: GatewayFactory, start_worker: WorkerFactory) -> str:
    start_worker(env={**FAST, "STREAMFLEET_MAX_ATTEMPTS": "2"})
    return start_gateway()


def sdk(gateway: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    ("fault", "exception", "status"),
    [
        ("400", openai.BadRequestError, 400),
        ("429", openai.RateLimitError, 429),
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
    ],
)
async def test_stream_errors_before_the_first_token_are_http_errors(
    gateway: str, fault: str, exception: type[openai.APIStatusError], status: int
) -> None:
    client = sdk(gateway)
    request = chat(f"fails with {fault}", fault=fault, fault_times=10, retry_after=0.05)
    extra = {"simulator": request["simulator"]}
    with pytest.raises(exception) as raised:
        stream = await client.chat.completions.create(
            model="sim", messages=request["messages"], stream=True, extra_body=extra
        )
        async for _ in stream:
            pass
    assert raised.value.status_code == status
    assert raised.value.response.headers["x-streamfleet-job-id"].startswith("job_")
    with pytest.raises(exception) as raised_again:
        events = await client.responses.create(model="sim", input="x", stream=True, extra_body=extra)
        async for _ in events:
            pass
    assert raised_again.value.status_code == status
    await client.close()


async def test_an_error_after_the_first_token_stays_an_error_event(gateway: str) -> None:
    client = sdk(gateway)
    request = chat("fails mid-stream", tokens=20, fault="error_event", fault_after=5)
    stream = await client.chat.completions.create(
        model="sim", messages=request["messages"], stream=True, extra_body={"simulator": request["simulator"]}
    )
    pieces = []
    with pytest.raises(openai.APIError, match="simulated error event"):
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(pieces) and expected_text(request).startswith("".join(pieces))
    await client.close()


async def test_a_resume_at_or_after_the_end_ends_at_once(gateway: str, fleet: FleetClient) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        job_id = (await client.post("/v1/jobs", json={"request": chat("ends", tokens=3)})).json()["id"]
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = [line async for line in response.aiter_lines()]
        assert lines[0] == "retry: 2000"
        last = [line[4:] for line in lines if line.startswith("id: ")][-1]
        for headers, params in (({"Last-Event-ID": last}, {}), ({}, {"after": last}), ({}, {"after": "9" * 19})):
            answer = await client.get(f"/v1/jobs/{job_id}/events", headers=headers, params=params)
            assert answer.status_code == 204 and answer.content == b""
        # Before the end, the same cursor streams what follows it.
        answer = await client.get(f"/v1/jobs/{job_id}/events", params={"after": "0"})
        assert "event: done" in answer.text


async def test_models_are_listed_and_unknown_routes_answer_like_openai(gateway: str) -> None:
    client = sdk(gateway)
    wait_until(lambda: bool(httpx.get(gateway + "/v1/models").json()["data"]), what="a worker to list the models")
    listed = [model.id async for model in client.models.list()]
    assert {"sim", "sim-large"} <= set(listed)
    assert (await client.models.retrieve("sim")).owned_by == "simulator"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")
    async with httpx.AsyncClient(base_url=gateway) as http:
        for method, path in (("GET", "/v1/nothing"), ("DELETE", "/v1/models"), ("GET", "/v1/jobs/job_x")):
            answer = await http.request(method, path)
            error = answer.json()["error"]
            assert answer.status_code in (404, 405) and error["message"] and "type" in error, (path, answer.text)
    await client.close()


LITELLM_USAGE = (
    b"".join(
        b"data: " + json.dumps(chunk).encode() + b"\n\n"
        for chunk in (
            {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            },
            # LiteLLM proxy's usage chunk: a choice with an empty delta, and a cost.
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 0.0001},
            },
        )
    )
    + b"data: [DONE]\n\n"
)


async def test_usage_reaches_a_client_only_if_it_asked_whatever_the_chunk_shape(
    start_gateway: GatewayFactory, start_worker: WorkerFactory, tmp_path: Path, fleet: FleetClient
) -> None:
    """The fleet asks every chat upstream for usage (the result carries it). A client that did not ask
    gets no usage, however the upstream shapes its usage chunk; one that asked gets it; the job's
    own events keep everything the upstream sent."""
    (tmp_path / "litellm.sse").write_bytes(LITELLM_USAGE)
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "simulator", "--port", str(port), "--replay-dir", str(tmp_path)])
    try:
        wait_until(lambda: port_open(port), what="the upstream")
        start_worker(env={"STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"})
        gateway = start_gateway()
        base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        base["simulator"] = {"replay": "litellm.sse"}
        async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
            unasked = await client.post("/v1/chat/completions", json=base)
            asked = await client.post("/v1/chat/completions", json={**base, "stream_options": {"include_usage": True}})
    finally:
        stop_process(upstream)
    unasked_chunks = [json.loads(line[6:]) for line in unasked.text.splitlines() if line.startswith("data: {")]
    asked_chunks = [json.loads(line[6:]) for line in asked.text.splitlines() if line.startswith("data: {")]
    assert not any("usage" in chunk for chunk in unasked_chunks) and len(unasked_chunks) == 2
    assert asked_chunks[-1]["usage"]["cost"] == 0.0001 and len(asked_chunks) == 3
    job = unasked.headers["x-streamfleet-job-id"]
    deltas = [event.data["chunk"] for event in [event async for event in fleet.tail(job)] if event.type == "delta"]
    assert deltas[-1]["usage"]["total_tokens"] == 4  # nothing the upstream sent is lost
