"""The stream format, as docs/stream-format.md specifies it: the test vectors decoded by the fleet's own
code, produced by its encoder, and decoded by a second reader written here from the document alone
(it imports nothing of the fleet's)."""

from __future__ import annotations

import base64
import json
from typing import Any

from shared import jsonutil
from shared.store import keys
from shared.store.codec import FORMAT, Decoder, DeltaEncoder, encode
from tests.conftest import ROOT

VECTORS = json.loads((ROOT / "docs" / "stream-format-vectors.json").read_text())


def read_as_documented(entries: list[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
    """An independent reader, from docs/stream-format.md."""

    def varint(data: bytes, at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, at
            shift += 7

    whole: dict[tuple[int, int], bytes] = {}
    events = []
    for entry_id, t, d in entries:
        if not t[:1].isdigit():
            events.append({"id": entry_id, "type": t, "data": json.loads(d)})
            continue
        ms, seq = (int(part) for part in entry_id.split("-"))
        if d[0] not in (0, 1):
            chunk = whole[(ms, seq)] = d
        else:
            numbers, at = [], 1
            for _ in range(3 if d[0] == 0 else 6):
                number, at = varint(d, at)
                numbers.append(number)
            distance, prefix, suffix = numbers[:3]
            ref = whole[(ms, seq - distance)]
            if d[0] == 0:
                middle = d[at:]
            else:
                at_ref, at_chunk, length = numbers[3:]
                rest = d[at:]
                middle = rest[:at_chunk] + ref[prefix + at_ref : prefix + at_ref + length] + rest[at_chunk:]
            chunk = ref[:prefix] + middle + ref[len(ref) - suffix :]
        events.append({"id": entry_id, "type": "delta", "data": {"attempt": int(t), "chunk": json.loads(chunk)}})
    return events


def vector_entries() -> list[tuple[str, str, bytes]]:
    return [(entry["id"], entry["t"], base64.b64decode(entry["d_base64"])) for entry in VECTORS["entries"]]


def test_the_vectors_are_of_the_format_the_fleet_writes() -> None:
    assert VECTORS["format"] == FORMAT and VECTORS["stream"] == keys.events("job_v")
    kinds = {d[0] for _, t, d in vector_entries() if t.isdigit()}
    assert {0x00, 0x01} <= kinds and any(kind not in (0, 1) for kind in kinds)  # every delta shape


def test_an_independent_reader_from_the_document_decodes_the_vectors() -> None:
    assert read_as_documented(vector_entries()) == VECTORS["events"]


def test_the_fleets_decoder_decodes_the_vectors_byte_for_byte() -> None:
    raw = [(entry_id.encode(), {b"t": t.encode(), b"d": d}) for entry_id, t, d in vector_entries()]
    decoded = Decoder().decode(raw)
    assert [{"id": e.id, "type": e.type, "data": e.data} for e in decoded] == VECTORS["events"]
    assert [e.body.decode() for e in decoded if e.type == "delta"] == VECTORS["chunks_exact"]


def test_the_fleets_encoder_writes_the_vectors() -> None:
    """From the same events, the encoder produces the same entries: the document describes what runs."""
    written: list[tuple[str, str, bytes]] = []
    chunks = iter(VECTORS["chunks_exact"])
    encoder: DeltaEncoder | None = None
    for event in VECTORS["events"]:
        if event["type"] == "delta":
            assert encoder is not None
            entry_id, fields = encoder.delta(next(chunks).encode())
        elif event["type"] == "retry":
            assert encoder is not None
            entry_id, fields = encoder.event("retry", event["data"])
        else:
            entry_id, fields = event["id"].encode(), encode(event["type"], event["data"])
            if event["type"] == "started":
                encoder = DeltaEncoder("job_v", event["data"]["attempt"], event["id"])
        written.append((entry_id.decode(), fields[b"t"].decode(), fields[b"d"]))
    assert written == vector_entries()
    assert jsonutil.loads(vector_entries()[-1][2])["result"]["text"] == "Hello there, world"
