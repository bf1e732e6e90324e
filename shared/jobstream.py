"""The job-stream entry format: how events are stored as Redis Stream entries. The only module that
knows it (``shared.transitions`` holds the Lua half, which reads the ``t`` field).

Every entry has exactly two fields, so Redis stores the field names once per stream node:

    t  the event type (``queued``, ``started``, ``retry``, ``done``, ``error``, ``cancelled``), or, for
       a ``delta``, the attempt number in decimal (a one-byte integer inside Redis)
    d  for other events, the event's data as JSON; for a delta, the upstream's JSON bytes, either
       whole or as a difference from an earlier whole delta of the same attempt (below)

Deltas are lossless by construction: the upstream's bytes are what is stored (or rebuilt exactly),
so unknown keys, key order and every digit of every number survive, and the worker never
re-serializes a chunk.

**Compact deltas.** Consecutive chunks of one stream repeat the same envelope (id, model, created,
fingerprint...) and differ in a few bytes of content. A delta is stored as a *reference* (the whole
bytes) or as ``\\x00`` + three varints (how many entries back its reference is, the length of the
prefix and of the suffix it shares with it) + the bytes in between. A new reference is stored
whenever the difference would not save half. Readers rebuild the bytes exactly; a reader that joins
after a reference fetches it once.

**Entry ids.** The worker gives an attempt's deltas explicit ids: the ``started`` entry's
millisecond and consecutive sequence numbers after it. This is what lets a delta name its reference
by distance, makes a replayed write batch harmless (Redis refuses an id it already has), and fences
a zombie worker: once a newer attempt or the terminal event is in the stream, every id the old
attempt would write is too small, and Redis refuses it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from redis.asyncio import Redis

from . import jsonutil
from .models import DELTA, TERMINAL_TYPES, Event

T: Final = b"t"
D: Final = b"d"
COMPACT: Final = 0x00
"""First byte of a compact delta; a JSON text never starts with it."""

Fields = dict[bytes, bytes]

_TERMINAL_KINDS: Final = frozenset(kind.encode() for kind in TERMINAL_TYPES)


def encode(type: str, data: Any) -> Fields:
    """The entry fields of a non-delta event."""
    return {T: type.encode(), D: jsonutil.dumps(data)}


def is_terminal(fields: dict[bytes, bytes]) -> bool:
    """Whether a raw entry is a terminal event, without decoding its data."""
    return fields[T] in _TERMINAL_KINDS


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as ``(milliseconds, sequence)``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _shared_prefix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``: a binary search of memcmps."""
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def _shared_suffix(a: bytes, b: bytes, limit: int) -> int:
    if limit == 0 or a[len(a) - limit :] == b[len(b) - limit :]:
        return limit
    low, high = 0, limit
    while high - low > 1:
        middle = (low + high) // 2
        if a[len(a) - middle :] == b[len(b) - middle :]:
            low = middle
        else:
            high = middle
    return low


class DeltaEncoder:
    """Encodes one attempt's deltas, with explicit ids after its ``started`` entry.

    :param attempt: the attempt number.
    :param started_id: the id Redis gave the attempt's ``started`` entry.
    """

    __slots__ = ("_kind", "_ms", "_ref", "_ref_seq", "_seq")

    def __init__(self, attempt: int, started_id: str) -> None:
        self._kind = b"%d" % attempt
        self._ms, self._seq = parse_id(started_id)
        self._ref = b""
        self._ref_seq = -1

    def next_id(self) -> bytes:
        """The id of the next entry of this attempt."""
        self._seq += 1
        return b"%d-%d" % (self._ms, self._seq)

    def delta(self, chunk: bytes) -> tuple[bytes, Fields]:
        """The id and fields of the next delta, whose upstream bytes are ``chunk``."""
        entry_id = self.next_id()
        ref = self._ref
        if ref:
            limit = min(len(ref), len(chunk))
            prefix = _shared_prefix(ref, chunk, limit)
            suffix = _shared_suffix(ref, chunk, limit - prefix)
            middle = chunk[prefix : len(chunk) - suffix]
            header = _varint(self._seq - self._ref_seq) + _varint(prefix) + _varint(suffix)
            if 1 + len(header) + len(middle) <= len(chunk) // 2:
                return entry_id, {T: self._kind, D: b"\x00" + header + middle}
        self._ref, self._ref_seq = chunk, self._seq
        return entry_id, {T: self._kind, D: chunk}

    def event(self, type: str, data: Any) -> tuple[bytes, Fields]:
        """The id and fields of a non-delta event written by this attempt (a ``retry``)."""
        return self.next_id(), encode(type, data)


class StreamDecoder:
    """Decodes the entries of one job stream for one reader, rebuilding compact deltas.

    Keeps the last few references it has seen; one it has not (a reader that starts in the middle)
    is fetched with XRANGE.
    """

    CACHE = 64

    def __init__(self, redis: Redis, stream: str) -> None:
        self._redis = redis
        self._stream = stream
        self._refs: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    async def decode(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Event]:
        """Decode entries read from the stream, in order."""
        missing = self._missing_refs(entries)
        if missing:
            await self._fetch(missing)
        return [self._decode(entry_id, fields) for entry_id, fields in entries]

    def raw_chunk(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> bytes:
        """The upstream's bytes of a delta entry (references must be known: call ``decode`` first)."""
        data = fields[D]
        position = parse_id(entry_id)
        if data[:1] != b"\x00":
            self._remember(position, data)
            return data
        distance, at = _read_varint(data, 1)
        prefix, at = _read_varint(data, at)
        suffix, at = _read_varint(data, at)
        ref = self._refs[(position[0], position[1] - distance)]
        return ref[:prefix] + data[at:] + ref[len(ref) - suffix :]

    def _decode(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
        event_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        kind = fields[T]
        if kind[:1].isdigit():
            chunk = jsonutil.loads(self.raw_chunk(entry_id, fields))
            return Event(event_id, DELTA, {"attempt": int(kind), "chunk": chunk})
        return Event(event_id, kind.decode(), jsonutil.loads(fields[D]))

    def _remember(self, position: tuple[int, int], data: bytes) -> None:
        self._refs[position] = data
        self._refs.move_to_end(position)
        if len(self._refs) > self.CACHE:
            self._refs.popitem(last=False)

    def _missing_refs(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> set[tuple[int, int]]:
        present = set(self._refs)
        missing: set[tuple[int, int]] = set()
        for entry_id, fields in entries:
            if not fields[T][:1].isdigit():
                continue
            position = parse_id(entry_id)
            data = fields[D]
            if data[:1] != b"\x00":
                present.add(position)
                continue
            distance, _ = _read_varint(data, 1)
            ref = (position[0], position[1] - distance)
            if ref not in present:
                missing.add(ref)
        return missing

    async def _fetch(self, refs: set[tuple[int, int]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for ms, seq in sorted(refs):
                pipe.xrange(self._stream, f"{ms}-{seq}", f"{ms}-{seq}")
            for found in await pipe.execute():
                for entry_id, fields in found:
                    self._remember(parse_id(entry_id), fields[D])
