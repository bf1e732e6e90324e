"""Server-Sent Events parsing, on bytes, as the spec says and as providers actually send it.

Written by hand rather than taken from httpx-sse because this is the hottest loop of the worker and
because httpx-sse drops a last event that has no closing blank line (Azure's streams end that way)
and decodes to text that we would only encode again: the worker stores each ``data`` payload's bytes
as they came. Working on bytes also makes UTF-8 split across network reads a non-issue, since only
ASCII CR and LF are looked for.

Handled: ``data:`` lines joined with LF across a multi-line event, ``event:``, ``id:``, ``retry:``,
comment lines (``: ping``, ``: OPENROUTER PROCESSING``), LF, CRLF and lone CR line ends, a space after
the colon or none, and a final event flushed at end of stream.

Bounded: a line, and an event's data, longer than ``max_event_bytes`` raise ``SSETooLarge``; a line
that arrives over many reads is kept as its pieces and joined once, so its cost is linear.
"""

from __future__ import annotations

from typing import NamedTuple


class SSEEvent(NamedTuple):
    """One dispatched event. ``event`` is ``None`` when the stream named no type.

    A named tuple, not a frozen dataclass: one is made per upstream chunk, and it builds 3x faster.
    """

    data: bytes
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class SSETooLarge(ValueError):
    """A line or an event is longer than the parser's bound."""


MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSEParser:
    """Incremental parser: ``feed`` it network reads, then ``close`` it at end of stream.

    :param max_event_bytes: the longest line, and the most data one event may carry.
    """

    __slots__ = ("_buffer", "_data", "_data_bytes", "_event", "_id", "_max", "_pending", "_pending_bytes", "_retry")

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buffer = b""
        self._pending: list[bytes] = []  # reads of a line that has not ended yet
        self._pending_bytes = 0
        self._data: list[bytes] = []
        self._data_bytes = 0
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse one network read; return the events it completed, in order."""
        if (
            chunk[:6] == b"data: "
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-1] == 0x0A
            and not self._buffer
            and not self._pending
            and not self._data
            and self._event is None
            and b"\r" not in chunk
            and len(chunk) - 7 <= self._max
        ):
            # One whole one-line event in one read, as most providers send each token: no split.
            whole = SSEEvent(chunk[6:-2], None, self._id, self._retry)
            self._retry = None
            return [whole]
        if b"\n" not in chunk and b"\r" not in chunk and not self._buffer.endswith(b"\r"):
            if len(chunk) + self._pending_bytes + len(self._buffer) > self._max:
                raise SSETooLarge(f"the upstream sent a line of over {self._max} bytes")
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            return []
        if self._pending:
            chunk = b"".join((self._buffer, *self._pending, chunk))
            self._buffer, self._pending, self._pending_bytes = b"", [], 0
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF split across reads: keep it back.
            held = buffer.endswith(b"\r")
            if held:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                buffer += b"\r"
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self._max:
            raise SSETooLarge(f"the upstream sent a line of over {self._max} bytes")
        events: list[SSEEvent] = []
        for line in lines:
            if line[:6] == b"data: ":  # the common case, without a call
                self._add_data(line[6:])
                continue
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a last line and a last event that had no closing blank line."""
        events: list[SSEEvent] = []
        rest = b"".join((self._buffer, *self._pending)).rstrip(b"\r")
        self._buffer, self._pending, self._pending_bytes = b"", [], 0
        if rest:
            event = self._line(rest)
            if event is not None:
                events.append(event)
        event = self._line(b"")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == 0x3A:  # ":" starts a comment
            return None
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._add_data(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _add_data(self, value: bytes) -> None:
        self._data_bytes += len(value) + 1
        if self._data_bytes > self._max:
            raise SSETooLarge(f"the upstream sent an event of over {self._max} bytes")
        self._data.append(value)

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = None
            return None
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        event = SSEEvent(data, self._event, self._id, self._retry)
        self._data = []
        self._data_bytes = 0
        self._event = None
        self._retry = None
        return event
