"""Accumulation edge cases that real providers produce and the recordings do not all show."""

from __future__ import annotations

from typing import Any

from shared.accumulate import ChatAccumulator, ResponsesAccumulator, delta_text


def chunk(
    delta: dict[str, Any] | None = None, *, finish: str | None = None, index: int = 0, **top: Any
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish}]
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
        **top,
    }


def accumulate(*chunks: dict[str, Any]) -> ChatAccumulator:
    accumulator = ChatAccumulator()
    for item in chunks:
        accumulator.add(item)
    return accumulator


def test_legacy_function_call_in_pieces_is_kept_as_the_sdk_keeps_it() -> None:
    acc = accumulate(
        chunk({"role": "assistant", "content": None, "function_call": {"name": "get_", "arguments": ""}}),
        chunk({"function_call": {"name": "weather"}}),
        chunk({"function_call": {"arguments": '{"city":'}}),
        chunk({"function_call": {"arguments": '"Oslo"}'}}, finish="function_call"),
    )
    message = acc.completion()["choices"][0]["message"]
    assert message["function_call"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert acc.result()["finish_reason"] == "function_call"


def test_tool_call_arguments_missing_null_or_empty() -> None:
    acc = accumulate(
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": None}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": ""}}]}),
    )
    assert acc.result()["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]


def test_tool_calls_without_index_continue_the_last_call() -> None:
    acc = accumulate(
        chunk({"tool_calls": [{"id": "a", "function": {"name": "one", "arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"id": "b", "function": {"name": "two", "arguments": "{}"}}]}),
    )
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in acc.result()["tool_calls"]] == [
        ("a", "one", '{"x":1}'),
        ("b", "two", "{}"),
    ]


def test_usage_anywhere_or_twice_the_last_counts() -> None:
    first = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    second = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    acc = accumulate(
        chunk({"content": "a"}, usage=None),
        chunk({}, finish="stop", usage=first),
        chunk(None, usage=second),
        chunk(None, usage=None),
    )
    assert acc.result()["usage"] == second
    assert accumulate(chunk({"content": "a"})).result()["usage"] is None


def test_finish_reason_never_sent_and_null_after_a_real_one() -> None:
    assert accumulate(chunk({"content": "a"})).result()["finish_reason"] is None
    acc = accumulate(chunk({"content": "a"}, finish="length"), chunk({"content": ""}, finish=None))
    assert acc.result()["finish_reason"] == "length"


def test_reasoning_from_either_field_is_not_doubled_when_both_are_sent() -> None:
    acc = accumulate(
        chunk({"reasoning_content": "think", "reasoning": "think"}),
        chunk({"reasoning_content": "ing", "reasoning": "ing"}),
        chunk({"content": "answer"}),
    )
    result = acc.result()
    assert (result["reasoning"], result["text"]) == ("thinking", "answer")


def test_choices_arriving_out_of_order_and_extra_choice_keys() -> None:
    acc = accumulate(
        chunk({"content": "b"}, index=1),
        chunk({"content": "a"}, index=0),
        {
            **chunk({}, finish="stop", index=1),
            "choices": [{"index": 1, "delta": {}, "finish_reason": "stop", "native_finish_reason": "end_turn"}],
        },
    )
    choices = acc.completion()["choices"]
    assert [c["message"]["content"] for c in choices] == ["a", "b"]
    assert choices[1]["native_finish_reason"] == "end_turn"
    assert acc.result()["text"] == "a"


def test_envelope_skips_empty_first_values_and_keeps_unknown_keys() -> None:
    acc = accumulate(
        {
            "id": "",
            "model": "",
            "created": 0,
            "object": "",
            "choices": [],
            "prompt_filter_results": [{"i": 0}],
        },
        chunk({"content": "x"}, system_fingerprint="fp_1", obfuscation="abc"),
    )
    completion = acc.completion()
    assert (completion["id"], completion["model"], completion["created"]) == ("c1", "m", 1)
    assert completion["prompt_filter_results"] == [{"i": 0}]
    assert completion["system_fingerprint"] == "fp_1" and "obfuscation" not in completion


def test_envelope_rules_hold_once_every_key_has_been_seen() -> None:
    """After the first chunks every key is known (the accumulator's fast path): the first non-empty
    value still wins, a key first sent empty still takes its first real value, and the last-value
    fields still take each non-null value."""
    acc = accumulate(
        chunk({"content": "a"}, system_fingerprint=None, service_tier="default", region=""),
        chunk({"content": "b"}, system_fingerprint="fp_1", service_tier="default", region=""),
        chunk({"content": "c"}, system_fingerprint="fp_1", region="eu", id="c2"),
        chunk({"content": "d"}, system_fingerprint=None, service_tier="flex", region="us", model="other"),
        chunk({"content": "e"}, system_fingerprint="fp_2"),
    )
    completion = acc.completion()
    assert (completion["id"], completion["model"], completion["region"]) == ("c1", "m", "eu")
    assert (completion["system_fingerprint"], completion["service_tier"]) == ("fp_2", "flex")
    assert completion["choices"][0]["message"]["content"] == "abcde"


def test_responses_items_done_out_of_order_and_no_type_field() -> None:
    acc = ResponsesAccumulator()
    acc.add({"delta": "Hel"}, "response.output_text.delta")  # the type only in the SSE event line
    acc.add({"type": "response.output_text.delta", "delta": "lo"})
    acc.add(
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{}"},
        }
    )
    acc.add(
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        }
    )
    result = acc.result()
    assert result["text"] == "Hello"
    assert [call["id"] for call in result["tool_calls"]] == ["c1", "c2"]


def test_responses_incomplete_gives_its_reason() -> None:
    acc = ResponsesAccumulator()
    acc.add(
        {
            "type": "response.incomplete",
            "response": {
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "output": [],
                "usage": None,
            },
        }
    )
    assert acc.result()["finish_reason"] == "max_output_tokens"


def test_delta_text_of_each_shape() -> None:
    assert delta_text(chunk({"content": "a"})) == "a"
    assert delta_text(chunk({"content": [{"type": "text", "text": "b"}, {"type": "thinking", "thinking": []}]})) == "b"
    assert delta_text(chunk({"content": "c"}, index=1)) == ""
    assert delta_text({"type": "response.output_text.delta", "delta": "d"}) == "d"
    assert delta_text({"error": {"message": "x"}}) == ""
