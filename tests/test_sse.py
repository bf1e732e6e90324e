"""SSE parsing on bytes, over every recorded fixture and the spec's edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.sse import SSEEvent, SSEParser
from tests.conftest import FIXTURES

RECORDINGS = sorted(FIXTURES.glob("*.sse"))


def parse(*pieces: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.close()


def test_basic_fields_comments_and_multiline_data() -> None:
    body = b': keep-alive\nevent: message\nid: 7\nretry: 300\ndata: {"a":\ndata:1}\n\ndata:no-space\n\n'
    assert parse(body) == [
        SSEEvent(b'{"a":\n1}', "message", "7", 300),
        SSEEvent(b"no-space", None, "7", None),  # the last event id persists, as the spec says
    ]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings(newline: bytes) -> None:
    body = newline.join([b"event: a", b"data: 1", b"", b"data: 2", b"", b""])
    assert [(e.event, e.data) for e in parse(body)] == [("a", b"1"), (None, b"2")]


def test_last_event_without_blank_line_is_flushed_at_end() -> None:
    assert [e.data for e in parse(b"data: 1\n\ndata: [DONE]\n")] == [b"1", b"[DONE]"]
    assert [e.data for e in parse(b"data: 1\n\ndata: [DONE]")] == [b"1", b"[DONE]"]


def test_events_without_data_are_not_dispatched() -> None:
    assert parse(b"event: ping\n\n: comment only\n\n") == []


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
def test_every_split_of_a_recording_parses_the_same(path: Path) -> None:
    raw = path.read_bytes()
    whole = parse(raw)
    assert whole, "a recording has events"
    # Split at every byte (CRLF halves, UTF-8 sequences, field names): same events.
    step = max(1, len(raw) // 400)
    for cut in range(1, len(raw), step):
        assert parse(raw[:cut], raw[cut:]) == whole
    assert parse(*(raw[i : i + 1] for i in range(len(raw)))) == whole


def test_utf8_split_across_reads_survives() -> None:
    raw = 'data: {"content":"héllo 👋"}\n\n'.encode()
    cut = raw.index("👋".encode()) + 2
    assert parse(raw[:cut], raw[cut:])[0].data.decode() == '{"content":"héllo 👋"}'
