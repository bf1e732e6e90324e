"""The HTTP gateway as a real process: jobs API with resumable SSE, the official openai SDK against its
OpenAI-compatible routes, auth and tenants, errors, metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared.accumulate import delta_text
from simulator import expected_text
from tests.conftest import GatewayFactory, GatewayURL, WorkerFactory, cli

pytestmark = [pytest.mark.split_roles, pytest.mark.slow]


def chat(prompt: str, **simulator: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "simulator": simulator}


def parse_sse(raw: str) -> list[dict[str, Any]]:
    events = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            events.append(fields)
    return events


async def read_events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    async with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse((await response.aread()).decode())


@pytest.fixture
def gateway(start_gateway: GatewayFactory, start_worker: WorkerFactory) -> GatewayURL:
    start_worker()
    return start_gateway()


async def test_jobs_api_fifty_subscribers_resume_and_late_join(gateway: str) -> None:
    request = chat("fan out", tokens=40, tps=100)
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        accepted = await client.post("/v1/jobs", json={"request": request})
        assert accepted.status_code == 202
        job = accepted.json()
        assert job["status"] == "queued" and job["events_url"] == f"/v1/jobs/{job['id']}/events"
        streams = await asyncio.gather(*(read_events(client, job["events_url"]) for _ in range(50)))
        assert all(stream == streams[0] for stream in streams)
        events = streams[0]
        assert events[0]["event"] == "queued" and events[-1]["event"] == "done"
        text = "".join(delta_text(json.loads(e["data"])["chunk"]) for e in events if e["event"] == "delta")
        assert text == expected_text(request)

        cut = events[len(events) // 2]["id"]
        rest = await read_events(client, job["events_url"], {"Last-Event-ID": cut})
        assert rest == events[len(events) // 2 + 1 :]
        assert await read_events(client, job["events_url"] + f"?after={cut}") == rest
        assert await read_events(client, job["events_url"]) == events  # late joiner: everything

        status = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert status["status"] == "done" and status["result"]["text"] == expected_text(request)
        bad = await client.get(job["events_url"], headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 400 and "invalid event id" in bad.json()["error"]["message"]
        assert (await client.get("/v1/jobs/job_nope")).status_code == 404
        assert (await client.get("/v1/jobs/job_nope/events")).status_code == 404


async def test_idle_streams_get_pings_and_cancel_ends_them(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        job = (await client.post("/v1/jobs", json={"request": chat("slow", tokens=500, tps=1)})).json()
        seen = ""
        async with client.stream("GET", job["events_url"]) as response:
            async for text in response.aiter_text():
                seen += text
                if ": ping" in seen and "event: delta" in seen and "cancel" not in seen:
                    cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel")
                    assert cancelled.status_code == 200
                    seen += "cancel"
        assert "event: cancelled" in seen
        assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "cancelled"


async def test_openai_sdk_chat_streaming_and_not(gateway: str) -> None:
    client = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused")
    request = chat("through the sdk", tokens=25)
    extra = {"simulator": request["simulator"]}
    stream = await client.chat.completions.create(
        model="sim", messages=request["messages"], stream=True, extra_body=extra
    )
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected_text(request)

    raw = await client.chat.completions.with_raw_response.create(
        model="sim", messages=request["messages"], extra_body=extra
    )
    assert raw.headers["x-streamfleet-job-id"].startswith("job_")
    completion = raw.parse()
    assert completion.choices[0].message.content == expected_text(request)
    assert completion.usage is not None and completion.usage.completion_tokens == 25

    async with client.chat.completions.stream(model="sim", messages=request["messages"], extra_body=extra) as s:
        final = await s.get_final_completion()
    assert final.choices[0].message.content == expected_text(request)
    await client.close()


async def test_openai_sdk_background_responses_resume_and_cancel(gateway: str) -> None:
    client = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused")
    request = {"model": "sim", "input": "background please", "simulator": {"tokens": 30, "tps": 60}}
    stream = await client.responses.create(
        model="sim",
        input="background please",
        background=True,
        stream=True,
        extra_body={"simulator": request["simulator"]},
    )
    response_id, cursor, seen = None, -1, []
    async for event in stream:
        if event.type == "response.created":
            response_id = event.response.id
        cursor = event.sequence_number
        seen.append(event.type)
        if len(seen) == 8:
            break  # the connection drops
    await stream.close()
    assert response_id is not None and response_id.startswith("job_")
    resumed = await client.responses.retrieve(response_id, stream=True, starting_after=cursor)
    rest = [event async for event in resumed]
    assert rest[0].sequence_number == cursor + 1
    assert rest[-1].type == "response.completed"
    text = "".join(e.delta for e in rest if e.type == "response.output_text.delta")
    assert expected_text(request).endswith(text) and text
    final = await client.responses.retrieve(response_id)
    assert final.status == "completed" and final.output_text == expected_text(request)

    queued = await client.responses.create(
        model="sim", input="cancel me", background=True, extra_body={"simulator": {"tokens": 1000, "tps": 5}}
    )
    assert queued.status == "queued" and queued.id.startswith("job_")
    cancelled = await client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert (await client.responses.cancel(queued.id)).status == "cancelled"  # idempotent
    await client.close()


async def test_errors_are_json_with_the_right_status(gateway: GatewayURL) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        for body in (
            {"request": {"model": "m"}},
            {"request": [1]},
            {"nothing": 1},
            {"request": chat("x"), "endpoint": "embeddings"},
        ):
            response = await client.post("/v1/jobs", json=body)
            assert response.status_code == 400, body
            assert response.json()["error"]["message"]
        not_json = await client.post(
            "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
        huge = await client.post("/v1/jobs", json={"request": chat("x" * 2_000_000)})
        assert huge.status_code == 413
        failing = await client.post("/v1/chat/completions", json=chat("bad", fault="400"))
        assert failing.status_code == 400 and "simulated 400" in failing.json()["error"]["message"]
        health = await client.get("/healthz")
        assert health.json() == {"status": "ok", "redis": True, "fanout_restarts": 0, "pid": gateway.process.pid}
        metrics = (await client.get("/metrics")).text
        for name in (
            "streamfleet_gateway_requests_total",
            "streamfleet_gateway_open_streams",
            "streamfleet_gateway_subscribers",
        ):
            assert name in metrics


async def test_keys_and_tenants(start_gateway: GatewayFactory, start_worker: WorkerFactory) -> None:
    start_worker()
    base = start_gateway(env={"STREAMFLEET_GATEWAY_API_KEYS": "key-one,key-two"})
    one = {"Authorization": "Bearer key-one"}
    two = {"Authorization": "Bearer key-two"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.post("/v1/jobs", json={"request": chat("x")})).status_code == 401
        assert (
            await client.post("/v1/jobs", json={"request": chat("x")}, headers={"Authorization": "Bearer nope"})
        ).status_code == 401
        job = (await client.post("/v1/jobs", json={"request": chat("mine", tokens=3)}, headers=one)).json()
        assert (await client.get(f"/v1/jobs/{job['id']}", headers=one)).status_code == 200
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/responses/{job['id']}"):
            assert (await client.get(path, headers=two)).status_code == 404
        assert (await client.post(f"/v1/jobs/{job['id']}/cancel", headers=two)).status_code == 404
        # Idempotency keys are per tenant.
        first = await client.post("/v1/jobs", json={"request": chat("i"), "idempotency_key": "k"}, headers=one)
        again = await client.post("/v1/jobs", json={"request": chat("i")}, headers={**one, "Idempotency-Key": "k"})
        other = await client.post("/v1/jobs", json={"request": chat("i"), "idempotency_key": "k"}, headers=two)
        assert first.json()["id"] == again.json()["id"] != other.json()["id"]
        assert (await client.get("/metrics")).status_code == 401


async def test_read_tokens_read_one_job_until_they_expire(
    start_gateway: GatewayFactory, start_worker: WorkerFactory
) -> None:
    """A read token reads its own job's events; a tampered, expired, foreign or other gateway's token
    is a 401, and so is a token where a key is needed. Browsers: tests/test_browser.py."""
    start_worker()
    keys = {"STREAMFLEET_GATEWAY_API_KEYS": "key-one", "STREAMFLEET_GATEWAY_CORS_ORIGINS": "https://app.example"}
    base = start_gateway(env=keys)
    stranger = start_gateway(env={"STREAMFLEET_GATEWAY_API_KEYS": "another-key"})
    one = {"Authorization": "Bearer key-one"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        job_id = (await client.post("/v1/jobs", json={"request": chat("read me", tokens=3)}, headers=one)).json()["id"]
        other = (await client.post("/v1/jobs", json={"request": chat("not me")}, headers=one)).json()["id"]
        minted = (await client.post(f"/v1/jobs/{job_id}/tokens", headers=one)).json()
        token = minted["token"]
        assert minted["events_url"] == f"/v1/jobs/{job_id}/events?token={token}"
        short = (await client.post(f"/v1/jobs/{job_id}/tokens", json={"ttl_seconds": 1}, headers=one)).json()
        events = await client.get(minted["events_url"])
        assert events.status_code == 200 and "event: done" in events.text
        payload, _, signature = token.partition(".")
        tampered = f"{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{signature}"
        async with httpx.AsyncClient(base_url=stranger, timeout=30) as elsewhere:
            assert (await elsewhere.get(minted["events_url"])).status_code == 401
        await asyncio.sleep(2.1)
        for path, query in (
            (f"/v1/jobs/{job_id}/events", tampered),
            (f"/v1/jobs/{job_id}/events", token + "x"),
            (f"/v1/jobs/{job_id}/events", short["token"]),  # expired
            (f"/v1/jobs/{other}/events", token),  # another job's
            (f"/v1/jobs/{job_id}", token),  # a token reads events, nothing else
            (f"/v1/jobs/{job_id}/events", "not-a-token"),
        ):
            refused = await client.get(path, params={"token": query})
            assert refused.status_code == 401, (path, query, refused.text)
        assert (await client.post(f"/v1/jobs/{job_id}/tokens", params={"token": token})).status_code == 401
        allowed = await client.get(f"/v1/jobs/{job_id}", headers={**one, "Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        foreign = await client.get(f"/v1/jobs/{job_id}", headers={**one, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in foreign.headers


def test_no_keys_means_loopback_only(fleet_env: dict[str, str]) -> None:
    refused = cli("gateway", "--host", "0.0.0.0", "--port", "1", env=fleet_env)
    assert refused.returncode == 2 and "STREAMFLEET_GATEWAY_API_KEYS" in refused.stderr


def test_openapi_document_lists_the_routes(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from producer.gateway import create_app; from shared.settings import "
            "Settings; print(json.dumps(create_app(Settings()).openapi()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    paths = json.loads(out.stdout)["paths"]
    for route in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/responses/{job_id}",
        "/v1/responses/{job_id}/cancel",
        "/healthz",
        "/metrics",
    ):
        assert route in paths, route
