"""SSE parsing on bytes, over every recorded fixture and the spec's edge cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.sse import SSEEvent, SSEParser, SSETooLarge
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


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
def test_a_recording_read_an_event_at_a_time_parses_the_same(path: Path) -> None:
    """Each event in a read of its own, as providers send tokens: the parser's one-event fast path
    gives what the line-by-line path gives."""
    raw = path.read_bytes()
    reads = [piece + b"\n\n" for piece in raw.split(b"\n\n")]
    reads[-1] = reads[-1][:-2]
    assert b"".join(reads) == raw
    assert parse(*reads) == parse(raw)


def test_the_one_event_fast_path_keeps_the_parsers_state() -> None:
    reads = [b"data: 1\n\n", b"id: 9\nretry: 50\n\n", b"data: 2\n\n", b"data: 3\n\n", b"data: 4", b"\n\n"]
    reads += [b"event: e\n", b"data: 5\n\n", b"data: \n\n", b"data: x\r\n\r\n"]
    assert parse(*reads) == [
        SSEEvent(b"1"),
        SSEEvent(b"2", None, "9", 50),
        SSEEvent(b"3", None, "9", None),
        SSEEvent(b"4", None, "9", None),
        SSEEvent(b"5", "e", "9", None),
        SSEEvent(b"", None, "9", None),
        SSEEvent(b"x", None, "9", None),
    ]
    with pytest.raises(SSETooLarge):
        SSEParser(max_event_bytes=4).feed(b"data: 12345\n\n")
    assert SSEParser(max_event_bytes=4).feed(b"data: 123\n\n") == [SSEEvent(b"123")]


def test_utf8_split_across_reads_survives() -> None:
    raw = 'data: {"content":"héllo 👋"}\n\n'.encode()
    cut = raw.index("👋".encode()) + 2
    assert parse(raw[:cut], raw[cut:])[0].data.decode() == '{"content":"héllo 👋"}'
