"""Accumulation of streamed upstream events into the contract's ``Result``.

The worker feeds every parsed chunk to an accumulator as it publishes it, and writes the result with
the terminal event; a consumer can rebuild the same result from the deltas it read. Both streaming
APIs are covered:

- Chat Completions chunks merge into a ``chat.completion`` object with every choice, the way the
  official SDK's accumulator does, plus what real providers send beyond it: content as a list of
  typed parts, ``reasoning_content`` / ``reasoning`` / ``reasoning_details``, tool calls without an
  ``index``, repeated full tool names, the legacy ``function_call``, usage on any chunk or on none.
- Responses API events: output text deltas, reasoning and refusal deltas, and the final Response
  object from ``response.completed`` / ``response.incomplete`` / ``response.failed``.
"""

from __future__ import annotations

from typing import Any, Protocol

from .models import Result, ToolCall


class Accumulator(Protocol):
    """What the worker needs from an accumulator."""

    def add(self, chunk: Any, event: str | None = None) -> None: ...

    def result(self) -> Result: ...


def accumulator_for(endpoint: str) -> Accumulator:
    """A fresh accumulator for one attempt against ``endpoint``."""
    return ResponsesAccumulator() if endpoint == "responses" else ChatAccumulator()


_TEXT_FIELDS = frozenset({"refusal", "reasoning_content", "reasoning"})
"""Delta fields whose string pieces are concatenated; every other field keeps its last value."""


def _concat(current: str | None, piece: Any) -> str | None:
    if not isinstance(piece, str):
        return current
    return piece if current is None else current + piece


class _Choice:
    """One choice being assembled from its deltas."""

    __slots__ = ("extra", "finish_reason", "index", "logprobs", "message", "pieces", "thinking", "tool_calls")

    def __init__(self, index: int) -> None:
        self.index = index
        self.message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        self.pieces: list[str] = []
        """The content's pieces, joined once (``text``): appending to a string would copy it per token."""
        self.tool_calls: list[dict[str, Any]] = []
        self.thinking: str | None = None
        self.finish_reason: str | None = None
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}

    def text(self) -> str | None:
        """The content so far."""
        if self.pieces:
            self.message["content"] = "".join(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
            self.pieces = [self.message["content"]]
        return self.message["content"]  # type: ignore[no-any-return]

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if (
            type(delta) is dict
            and len(delta) == 1
            and type(content := delta.get("content")) is str
            and choice.get("finish_reason") is None
            and choice.get("logprobs") is None
            and len(choice) <= 4
        ):
            # The common chunk, one piece of text: no walk over every field (a few µs per token).
            self.pieces.append(content)
            if len(choice) > 1 + ("index" in choice) + ("finish_reason" in choice) + ("logprobs" in choice):
                self._add_fields(choice)
            return
        self._add_fields(choice)

    def _add_fields(self, choice: dict[str, Any]) -> None:
        for key, value in choice.items():
            if key == "delta":
                if isinstance(value, dict):
                    self._merge_delta(value)
            elif key == "logprobs":
                if isinstance(value, dict):
                    self._merge_logprobs(value)
            elif key == "finish_reason":
                # Some providers send it twice, or null after it: the last real one counts.
                if value is not None:
                    self.finish_reason = value
            elif key != "index" and (value is not None or key not in self.extra):
                self.extra[key] = value  # e.g. native_finish_reason, content_filter_results

    def _merge_delta(self, delta: dict[str, Any]) -> None:
        message = self.message
        for key, value in delta.items():
            if key == "content":
                self._merge_content(value)
            elif key in _TEXT_FIELDS:
                message[key] = _concat(message.get(key), value)
            elif key == "reasoning_details" and isinstance(value, list):
                message.setdefault("reasoning_details", []).extend(value)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        self._merge_tool_call(call)
            elif key == "function_call" and isinstance(value, dict):
                legacy = message.setdefault("function_call", {"name": "", "arguments": ""})
                legacy["name"] = _merge_name(legacy["name"], value.get("name"))
                legacy["arguments"] = _concat(legacy["arguments"], value.get("arguments")) or ""
            elif value is not None or key not in message:
                message[key] = value  # role, channel, audio...: the last value, never concatenated

    def _merge_content(self, value: Any) -> None:
        if isinstance(value, str):
            self.pieces.append(value)
        elif isinstance(value, list):
            # Content as typed parts (Mistral): text parts are content, thinking parts are reasoning.
            for part in value:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    self.pieces.append(part["text"])
                elif part.get("type") == "thinking":
                    for thought in part.get("thinking") or []:
                        if isinstance(thought, dict):
                            self.thinking = _concat(self.thinking, thought.get("text"))
                            self.message["thinking"] = self.thinking

    def reasoning(self) -> str | None:
        """The reasoning text, from whichever field the provider used (they never mean different text)."""
        for key in ("reasoning_content", "reasoning"):
            if self.message.get(key):
                return str(self.message[key])
        if self.thinking:
            return self.thinking
        details = self.message.get("reasoning_details") or []
        text = "".join(str(d.get("text") or "") for d in details if isinstance(d, dict))
        return text or None

    def _merge_tool_call(self, call: dict[str, Any]) -> None:
        target = self._tool_call_slot(call)
        if call.get("id") and not target.get("id"):
            target["id"] = call["id"]
        if call.get("type"):
            target["type"] = call["type"]
        function = call.get("function")
        if isinstance(function, dict):
            slot = target.setdefault("function", {"name": "", "arguments": ""})
            slot["name"] = _merge_name(slot["name"], function.get("name"))
            slot["arguments"] = _concat(slot["arguments"], function.get("arguments")) or ""

    def _tool_call_slot(self, call: dict[str, Any]) -> dict[str, Any]:
        index = call.get("index")
        if not isinstance(index, int):
            # No index (Ollama, Mistral): a new id or a named call starts a new slot, else the last one.
            same = [slot for slot in self.tool_calls if call.get("id") and slot.get("id") == call["id"]]
            if same:
                return same[0]
            function = call.get("function") or {}
            if call.get("id") or function.get("name") or not self.tool_calls:
                index = len(self.tool_calls)
            else:
                index = len(self.tool_calls) - 1
        while len(self.tool_calls) <= index:
            self.tool_calls.append({"index": len(self.tool_calls), "id": None, "type": "function"})
        return self.tool_calls[index]

    def _merge_logprobs(self, logprobs: dict[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                existing = self.logprobs.get(key)
                self.logprobs[key] = (existing or []) + value
            elif key not in self.logprobs or self.logprobs[key] is None:
                self.logprobs[key] = value

    def as_dict(self) -> dict[str, Any]:
        self.text()
        message = dict(self.message)
        if self.tool_calls:
            message["tool_calls"] = [dict(call) for call in self.tool_calls]
        return {
            "index": self.index,
            "message": message,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
            **self.extra,
        }


def _merge_name(current: str, piece: Any) -> str:
    """Tool names: some providers repeat the full name on every chunk; it must not double."""
    if not isinstance(piece, str) or not piece or piece == current:
        return current
    return current + piece


_PER_CHUNK = frozenset({"choices", "usage", "object", "obfuscation", "error"})
"""Chunk fields that are not part of the completion's envelope."""
_LATEST = frozenset({"system_fingerprint", "moderation", "service_tier"})
"""Envelope fields where the last non-null value counts, as in the SDK's accumulator."""


class ChatAccumulator:
    """Builds a ``chat.completion`` and the ``Result`` from Chat Completions chunks."""

    def __init__(self) -> None:
        self.envelope: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None
        self._settled: frozenset[str] = _PER_CHUNK
        """Keys a chunk may carry without changing the envelope but for its last-value fields."""
        self._latest: list[str] = []
        """The last-value fields the envelope has."""

    def add(self, chunk: Any, event: str | None = None) -> None:
        """Merge one chunk. ``event`` (the SSE event name) is not used by Chat Completions."""
        if not isinstance(chunk, dict):
            return
        if chunk.keys() <= self._settled:
            # Every token after the first: no key is new, none whose first value was empty (in C,
            # where walking the chunk's keys in Python cost ~1 µs a token).
            for key in self._latest:
                value = chunk.get(key)
                if value is not None:
                    self.envelope[key] = value
        else:
            self._add_envelope(chunk)
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            slot = self.choices.get(index)
            if slot is None:
                slot = self.choices[index] = _Choice(index)
            slot.add(choice)

    def _add_envelope(self, chunk: dict[str, Any]) -> None:
        envelope = self.envelope
        for key, value in chunk.items():
            if key in _PER_CHUNK:
                continue
            if key in _LATEST:
                if value is not None or key not in envelope:
                    envelope[key] = value
            elif key not in envelope or (value and not envelope[key]):
                # The first non-empty value wins: Azure's first chunk has an empty id and model.
                envelope[key] = value
        self._latest = [key for key in _LATEST if key in envelope]
        self._settled = _PER_CHUNK.union(key for key, value in envelope.items() if value or key in _LATEST)

    def completion(self) -> dict[str, Any]:
        completion = {**self.envelope, "object": "chat.completion"}
        completion["choices"] = [self.choices[index].as_dict() for index in sorted(self.choices)]
        completion["usage"] = self.usage
        return completion

    def result(self) -> Result:
        first = self.choices.get(0) or (self.choices[min(self.choices)] if self.choices else None)
        if first is None:
            return empty_result(completion=self.completion(), usage=self.usage)
        tool_calls: list[ToolCall] = [
            {
                "id": call.get("id"),
                "type": call.get("type") or "function",
                "function": {
                    "name": (call.get("function") or {}).get("name", ""),
                    "arguments": (call.get("function") or {}).get("arguments", ""),
                },
            }
            for call in first.tool_calls
        ]
        return {
            "text": first.text() or "",
            "reasoning": first.reasoning(),
            "refusal": first.message.get("refusal"),
            "tool_calls": tool_calls,
            "finish_reason": first.finish_reason,
            "usage": self.usage,
            "completion": self.completion(),
        }


def empty_result(*, completion: dict[str, Any] | None = None, usage: dict[str, Any] | None = None) -> Result:
    return {
        "text": "",
        "reasoning": None,
        "refusal": None,
        "tool_calls": [],
        "finish_reason": None,
        "usage": usage,
        "completion": completion,
    }


_FINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")


class ResponsesAccumulator:
    """Builds the ``Result`` from Responses API events; ``completion`` is the final Response object."""

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None
        self.text = ""
        self.reasoning: str | None = None
        self.refusal: str | None = None
        self.items: dict[int, dict[str, Any]] = {}

    def add(self, chunk: Any, event: str | None = None) -> None:
        """Merge one event; its type is the chunk's ``type``, else the SSE event name."""
        if not isinstance(chunk, dict):
            return
        kind = chunk.get("type") or event
        if kind == "response.output_text.delta":
            self.text += chunk.get("delta") or ""
        elif kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            self.reasoning = _concat(self.reasoning, chunk.get("delta"))
        elif kind == "response.refusal.delta":
            self.refusal = _concat(self.refusal, chunk.get("delta"))
        elif kind == "response.output_item.done" and isinstance(chunk.get("item"), dict):
            self.items[chunk.get("output_index", len(self.items))] = chunk["item"]
        elif kind == "response.created" or kind in _FINAL_RESPONSE_EVENTS or kind == "response.in_progress":
            if isinstance(chunk.get("response"), dict):
                self.response = chunk["response"]

    def result(self) -> Result:
        response = self.response or {}
        output = response.get("output") or [self.items[index] for index in sorted(self.items)]
        tool_calls: list[ToolCall] = [
            {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item.get("name") or "", "arguments": item.get("arguments") or ""},
            }
            for item in output
            if isinstance(item, dict) and item.get("type") == "function_call"
        ]
        status = response.get("status")
        if status == "incomplete":
            finish_reason = (response.get("incomplete_details") or {}).get("reason") or "incomplete"
        elif status == "completed":
            finish_reason = "tool_calls" if tool_calls else "stop"
        else:
            finish_reason = status
        return {
            "text": self.text,
            "reasoning": self.reasoning,
            "refusal": self.refusal,
            "tool_calls": tool_calls,
            "finish_reason": finish_reason,
            "usage": response.get("usage"),
            "completion": self.response,
        }


def delta_text(chunk: Any) -> str:
    """The visible text one delta adds: choice 0's content, or a Responses output text delta."""
    if not isinstance(chunk, dict):
        return ""
    if chunk.get("type") == "response.output_text.delta":
        return str(chunk.get("delta") or "")
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(
                    str(part.get("text") or "")
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text"
                )
    return ""
