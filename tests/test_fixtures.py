"""Every recorded upstream stream, replayed byte for byte by the simulator, through a worker process,
Redis and ``tail``: the deltas are JSON-equal to the recording, the terminal event is the right one,
and the result is what the provider meant.

Two oracles the fleet's own code does not share:
- httpx-sse's decoder splits the recording into events (plus the end-of-file flush it lacks);
- the official ``openai`` SDK's ``ChatCompletionStreamState`` accumulates Chat Completions chunks,
  for every recording it accepts and gets right.
The expected results for the rest are written out by hand below, read off the recordings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from producer import FleetClient
from shared.models import DELTA, DONE, ERROR
from tests.conftest import FIXTURES, WorkerFactory

RECORDINGS = sorted(FIXTURES.glob("*.sse"))


def oracle_events(raw: bytes) -> list[Any]:
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    events = []
    for line in [*lines.decode(raw.decode()), *lines.flush(), ""]:
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


def oracle_chunks(path: Path) -> list[Any]:
    """The JSON of every data event of the recording up to ``[DONE]``, with exact integers."""
    chunks = []
    for event in oracle_events(path.read_bytes()):
        if event.data == "[DONE]":
            break
        chunks.append(json.loads(event.data))
    return chunks


def endpoint_of(path: Path) -> str:
    return "responses" if "responses" in path.name else "chat.completions"


# What each recording means, read off the file by hand. `reasoning` is checked by its start.
EXPECTED: dict[str, dict[str, Any]] = {
    "azure-openai-gpt4o-prompt-filter-first-chunk.sse": {
        "terminal": DONE,
        "text": "Hallo Welt!",
        "finish_reason": "stop",
        "tool_calls": [],
        "usage": None,
    },
    "deepseek-reasoner-reasoning-content.sse": {
        "terminal": DONE,
        "text": "Hello there! 😊 How can I help you today?",
        "finish_reason": "stop",
        "reasoning": 'Hmm, the user just said "Hello".',
        "usage_total": 218,
    },
    "deepseek-responses-reasoning-text-function-call.sse": {
        "terminal": DONE,
        "text": "",
        "finish_reason": "tool_calls",
        "reasoning": "The user asks about temperature in Tokyo. I'll call the tool.",
        "tool_calls": [
            {
                "id": "call_00_xjY8Z2BvSlzgEmmw0DtH0464",
                "type": "function",
                "function": {"name": "get_temperature", "arguments": '{"city": "Tokyo"}'},
            }
        ],
        "usage_total": 425,
    },
    "framing-only-mcp-sse-starlette-crlf-ping-comments.sse": {"terminal": DONE, "text": "", "tool_calls": []},
    "groq-gptoss120b-event-error-tool-use-failed.sse": {
        "terminal": ERROR,
        "error_code": "tool_use_failed",
        "status": 400,
        "reasoning": "We need to call the tool with invalid parameters first",
    },
    "mistral-large-parallel-tool-calls-no-index.sse": {
        "terminal": DONE,
        "text": "",
        "finish_reason": "tool_calls",
        "usage_total": 232,
        "tool_calls": [
            {
                "id": "nqjf8Hqe1",
                "type": "function",
                "function": {"name": "plus", "arguments": '{"a": 1, "b": 2}'},
            },
            {
                "id": "ATcpCKul3",
                "type": "function",
                "function": {"name": "minus", "arguments": '{"a": 2, "b": 1}'},
            },
        ],
    },
    "mistral-magistral-content-array-thinking.sse": {
        "terminal": DONE,
        "text_start": "To cross the street safely, follow these steps:",
        "reasoning": "Okay, the user is asking how to cross the street.",
        "finish_reason": "stop",
    },
    "ollama-llama31-content-no-usage.sse": {
        "terminal": DONE,
        "text": "Hello! How are you today? Is there something I can help you with or would you like to chat?",
        "finish_reason": "stop",
        "usage": None,
    },
    "ollama-llama31-tool-call-no-index-finish-stop.sse": {
        "terminal": DONE,
        "text": "",
        "finish_reason": "stop",
        "usage": None,
        "tool_calls": [
            {
                "id": "call_28sm5ma0",
                "type": "function",
                "function": {"name": "return_list_of_int", "arguments": '{"value":"[1, 2, 3, 4, 5]"}'},
            }
        ],
    },
    "openai-chat-gpt4o-content-logprobs.sse": {"terminal": DONE, "text": "Foo!", "usage_total": 11},
    "openai-chat-gpt4o-finish-length.sse": {"terminal": DONE, "text": '{"', "finish_reason": "length"},
    "openai-chat-gpt4o-n3-interleaved-choices.sse": {
        "terminal": DONE,
        "text": '{"city":"San Francisco","temperature":65,"units":"f"}',
        "choices": 3,
    },
    "openai-chat-gpt4o-parallel-tool-calls.sse": {
        "terminal": DONE,
        "finish_reason": "tool_calls",
        "tool_calls": [
            {
                "id": "call_JMW1whyEaYG438VE1OIflxA2",
                "type": "function",
                "function": {
                    "name": "GetWeatherArgs",
                    "arguments": '{"city": "Edinburgh", "country": "GB", "units": "c"}',
                },
            },
            {
                "id": "call_DNYTawLBoN8fj3KN6qU9N1Ou",
                "type": "function",
                "function": {
                    "name": "get_stock_price",
                    "arguments": '{"ticker": "AAPL", "exchange": "NASDAQ"}',
                },
            },
        ],
    },
    "openai-chat-gpt4o-plain-content-usage.sse": {
        "terminal": DONE,
        "finish_reason": "stop",
        "usage_total": 44,
        "text": "I'm unable to provide real-time weather updates. To get the current weather in San "
        "Francisco, I recommend checking a reliable weather website or a weather app.",
    },
    "openai-chat-gpt4o-refusal-deltas.sse": {
        "terminal": DONE,
        "text": "",
        "refusal": "I'm sorry, I can't assist with that request.",
    },
    "openai-chat-gpt4o-tool-call-single.sse": {
        "terminal": DONE,
        "finish_reason": "tool_calls",
        "tool_calls": [
            {
                "id": "call_c91SqDXlYFuETYv8mUHzz6pp",
                "type": "function",
                "function": {
                    "name": "GetWeatherArgs",
                    "arguments": '{"city":"Edinburgh","country":"UK","units":"c"}',
                },
            }
        ],
    },
    "openai-responses-gpt4o-function-call-no-seqnum.sse": {
        "terminal": DONE,
        "text": "",
        "finish_reason": "tool_calls",
        "usage_total": 271,
        "tool_calls": [
            {
                "id": "call_kL0PCQV7M2WMoVX8V8OtYSAL",
                "type": "function",
                "function": {"name": "get_capital", "arguments": '{"country":"France"}'},
            }
        ],
    },
    "openai-responses-gpt4o-output-text-no-seqnum.sse": {
        "terminal": DONE,
        "text": "The capital of France is Paris.",
        "finish_reason": "stop",
        "usage_total": 287,
    },
    "openai-responses-gpt5nano-error-event-quota-reconstructed.sse": {
        "terminal": ERROR,
        "error_code": "insufficient_quota",
        "status": None,
    },
    "openrouter-deepseek-v3-content-then-tool-call.sse": {
        "terminal": DONE,
        "text": "My favorite city is Kyoto, Japan! Let me check the weather there for you.",
        "finish_reason": "tool_calls",
        "usage_total": 213,
        "tool_calls": [
            {
                "id": "chatcmpl-tool-8841ebdbc1974669a96e3801a0338190",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location":"Kyoto, Japan"}'},
            }
        ],
    },
    "openrouter-minimax-m2-midstream-error-keepalive.sse": {
        "terminal": ERROR,
        "status": 400,
        "message": "Token limit reached",
        "reasoning": "We need to respond to a greeting. The user",
        "partial_usage_total": 53,
    },
    "openrouter-novita-kimik2-tool-call-repeated-name.sse": {
        "terminal": DONE,
        "text": "",
        "finish_reason": None,
        "usage_total": 74,
        "tool_calls": [{"id": "0", "type": "function", "function": {"name": "llm_version", "arguments": "{}"}}],
    },
    "vllm-crusoe-llama33-content-usage.sse": {
        "terminal": DONE,
        "text": "1, 2, 3, 4, 5",
        "finish_reason": "stop",
        "usage_total": 60,
    },
}

# Recordings the SDK's accumulator takes but gets wrong: it concatenates every repeated string, so a
# provider that repeats `role` (or a tool call's full id and name) on every chunk gets them doubled.
SDK_DOUBLES_REPEATED_STRINGS = {
    "ollama-llama31-content-no-usage.sse",
    "openrouter-deepseek-v3-content-then-tool-call.sse",
    "openrouter-novita-kimik2-tool-call-repeated-name.sse",
}


def test_every_recording_has_an_expectation() -> None:
    assert sorted(EXPECTED) == [path.name for path in RECORDINGS]


def check_result(result: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("text", "finish_reason", "tool_calls", "usage", "refusal"):
        if key in expected:
            assert result[key] == expected[key], key
    if "text_start" in expected:
        assert result["text"].startswith(expected["text_start"])
    if "reasoning" in expected:
        assert result["reasoning"].startswith(expected["reasoning"])
    if "usage_total" in expected:
        total = result["usage"].get("total_tokens")
        assert total == expected["usage_total"]
    if "choices" in expected:
        assert len(result["completion"]["choices"]) == expected["choices"]


def sdk_completion(chunks: list[Any]) -> dict[str, Any] | None:
    """The SDK's accumulated completion, or None when it refuses the chunks."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk
    from pydantic import ValidationError

    state: Any = ChatCompletionStreamState()
    try:
        for chunk in chunks:
            try:
                state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
            except Exception as exc:  # raised after the chunk was merged; the stream goes on
                if type(exc).__name__ != "LengthFinishReasonError":
                    raise
    except (ValidationError, TypeError, KeyError, IndexError):
        return None
    dumped: dict[str, Any] = state.current_completion_snapshot.model_dump(mode="json", exclude_unset=True)
    return dumped


def without_nulls(value: Any) -> Any:
    """null and absent mean the same in OpenAI objects; `parsed*` are the SDK's own additions."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None and not k.startswith("parsed")}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
async def test_recording_through_the_fleet(path: Path, fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker()
    endpoint = endpoint_of(path)
    request: dict[str, Any] = {"model": "replayed", "simulator": {"replay": path.name}}
    if endpoint == "responses":
        request["input"] = "replay"
    else:
        request["messages"] = [{"role": "user", "content": "replay"}]
    job_id = await fleet.submit(request, endpoint=endpoint)
    events = [event async for event in fleet.tail(job_id)]

    chunks = oracle_chunks(path)
    assert [e.data["chunk"] for e in events if e.type == DELTA] == chunks
    expected = EXPECTED[path.name]
    terminal = events[-1]
    assert terminal.type == expected["terminal"]
    if terminal.type == DONE:
        check_result(terminal.data["result"], expected)
        completion = terminal.data["result"]["completion"]
        if endpoint == "chat.completions" and path.name not in SDK_DOUBLES_REPEATED_STRINGS:
            sdk = sdk_completion(chunks)
            if sdk is not None:
                assert without_nulls(completion) == without_nulls(sdk)
    else:
        error = terminal.data["error"]
        assert error["type"] == "upstream_error" and error["status"] == expected["status"]
        body = error["upstream"]["error"]
        if "error_code" in expected:
            assert body["code"] == expected["error_code"]
        if "message" in expected:
            assert body["message"] == expected["message"]
        partial = terminal.data["partial"]
        if "reasoning" in expected:
            assert partial["reasoning"].startswith(expected["reasoning"])
        if "partial_usage_total" in expected:
            assert partial["usage"]["total_tokens"] == expected["partial_usage_total"]


def test_the_sdk_comparison_covers_the_openai_recordings() -> None:
    """Guard against the SDK check silently applying to nothing."""
    compared = [
        path.name
        for path in RECORDINGS
        if endpoint_of(path) == "chat.completions"
        and path.name not in SDK_DOUBLES_REPEATED_STRINGS
        and sdk_completion(oracle_chunks(path)) is not None
    ]
    assert {name for name in compared if name.startswith("openai-chat")} == {
        path.name for path in RECORDINGS if path.name.startswith("openai-chat")
    }
    assert len(compared) >= 9


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
def test_the_simulator_replays_a_recording_byte_for_byte(path: Path, simulator: Any) -> None:
    import httpx

    body = {"model": "replayed", "messages": [], "simulator": {"replay": path.name, "pace_ms": 1}}
    with httpx.stream("POST", simulator.base_url + "/chat/completions", json=body) as response:
        assert b"".join(response.iter_raw()) == path.read_bytes()
