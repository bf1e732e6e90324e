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
prefix and of the suffix it shares with it) + the bytes in between; or as ``\\x01``, the same plus a
run shared from inside the middle (three more varints), for chunks that differ in two places (OpenAI
pads every chunk with a random ``obfuscation`` string). A new reference is stored whenever the
difference would not save half. Readers rebuild the bytes exactly; a reader that joins
after a reference fetches it once.

**Entry ids.** The worker gives an attempt's deltas explicit ids: the ``started`` entry's
millisecond and consecutive sequence numbers after it. This is what lets a delta name its reference
by distance, makes a replayed write batch harmless (Redis refuses an id it already has), and fences
a zombie worker: once a newer attempt or the terminal event is in the stream, every id the old
attempt would write is too small, and Redis refuses it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Final

from redis.asyncio import Redis

from . import jsonutil
from .errors import InvalidRequest
from .models import DELTA, TERMINAL_TYPES, Event

T: Final = b"t"
D: Final = b"d"
COMPACT: Final = 0x00
"""First byte of a compact delta; a JSON text never starts with it."""
COMPACT_INNER: Final = 0x01
"""First byte of a compact delta that also reuses a run from inside its reference's middle."""
INNER_ANCHOR = 8

Fields = dict[bytes, bytes]

_TERMINAL_KINDS: Final = frozenset(kind.encode() for kind in TERMINAL_TYPES)
_SMALL: Final = tuple(bytes((value,)) for value in range(0x80))


def encode(type: str, data: Any) -> Fields:
    """The entry fields of a non-delta event."""
    return {T: type.encode(), D: jsonutil.dumps(data)}


def is_terminal(fields: dict[bytes, bytes]) -> bool:
    """Whether a raw entry is a terminal event, without decoding its data."""
    return fields[T] in _TERMINAL_KINDS


_CURSOR: Final = re.compile(r"^\d+(-\d+)?$")


def parse_cursor(after: str) -> tuple[int, int]:
    """A cursor a reader gave (``"0"`` or an entry id), checked; ``InvalidRequest`` if it is not one."""
    if not _CURSOR.match(after):
        raise InvalidRequest(f"invalid event id {after!r}: expected '0' or a stream id like '1700000000000-0'")
    return parse_id(after)


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as ``(milliseconds, sequence)``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
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


def _shared_prefix(a: bytes, b: bytes, limit: int, hint: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``.

    ``hint`` is the last answer: chunks of one stream keep their shape, so it is usually right or a
    byte or two short, and two comparisons settle it; otherwise a binary search of memcmps does.
    """
    if hint <= limit and a[:hint] == b[:hint]:
        low = hint
        while low < limit and a[low] == b[low]:
            low += 1
        return low
    low, high = 0, min(hint, limit)  # a[:low] == b[:low] and a[:high] != b[:high]
    if a[:high] == b[:high]:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def _shared_suffix(a: bytes, b: bytes, limit: int, hint: int) -> int:
    """Length of the common suffix of ``a`` and ``b``, at most ``limit``; ``hint`` as above."""
    end_a, end_b = len(a), len(b)
    if hint <= limit and a[end_a - hint :] == b[end_b - hint :]:
        low = hint
        while low < limit and a[end_a - low - 1] == b[end_b - low - 1]:
            low += 1
        return low
    low, high = 0, min(hint, limit)
    if a[end_a - high :] == b[end_b - high :]:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if a[end_a - middle :] == b[end_b - middle :]:
            low = middle
        else:
            high = middle
    return low


def _inner_match(ref_middle: bytes, middle: bytes) -> tuple[int, int, int] | None:
    """A run that the two middles share, found from the reference's first quote onwards.

    The content of a chunk ends at a quote, and what follows it (the rest of the choice, the next
    keys) repeats: after prefix and suffix are taken, that run is what is left to save.
    """
    at_ref = ref_middle.find(b'"')
    if at_ref < 0 or len(ref_middle) - at_ref < INNER_ANCHOR:
        return None
    at_chunk = middle.find(ref_middle[at_ref : at_ref + INNER_ANCHOR])
    if at_chunk < 0:
        return None
    tail_ref, tail_chunk = ref_middle[at_ref + INNER_ANCHOR :], middle[at_chunk + INNER_ANCHOR :]
    limit = min(len(tail_ref), len(tail_chunk))
    return at_ref, at_chunk, INNER_ANCHOR + _shared_prefix(tail_ref, tail_chunk, limit, limit)


class DeltaEncoder:
    """Encodes one attempt's deltas, with explicit ids after its ``started`` entry.

    :param attempt: the attempt number.
    :param started_id: the id Redis gave the attempt's ``started`` entry.
    """

    __slots__ = ("_kind", "_ms", "_prefix", "_ref", "_ref_seq", "_seq", "_suffix")

    def __init__(self, attempt: int, started_id: str) -> None:
        self._kind = b"%d" % attempt
        self._ms, self._seq = parse_id(started_id)
        self._ref = b""
        self._ref_seq = -1
        self._prefix = self._suffix = 0

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
            prefix = self._prefix = _shared_prefix(ref, chunk, limit, self._prefix)
            suffix = self._suffix = _shared_suffix(ref, chunk, limit - prefix, self._suffix)
            middle = chunk[prefix : len(chunk) - suffix]
            header = _varint(self._seq - self._ref_seq) + _varint(prefix) + _varint(suffix)
            inner = _inner_match(ref[prefix : len(ref) - suffix], middle)
            if inner is not None:
                # Two holes: OpenAI's per-chunk `obfuscation` padding differs at the end as well.
                at_ref, at_chunk, length = inner
                header += _varint(at_ref) + _varint(at_chunk) + _varint(length)
                payload = b"\x01" + header + middle[:at_chunk] + middle[at_chunk + length :]
            else:
                payload = b"\x00" + header + middle
            if len(payload) <= len(chunk) // 2:
                return entry_id, {T: self._kind, D: payload}
        self._ref, self._ref_seq = chunk, self._seq
        self._prefix = self._suffix = len(chunk)
        return entry_id, {T: self._kind, D: chunk}

    def event(self, type: str, data: Any) -> tuple[bytes, Fields]:
        """The id and fields of a non-delta event written by this attempt (a ``retry``)."""
        return self.next_id(), encode(type, data)


APPEND_LUA: Final = """
-- KEYS: the stream of each entry. ARGV: id, type field, data field of each entry, in order.
-- Appends every entry (NOMKSTREAM) and returns the 1-based positions of those Redis refused: an id
-- not above the stream's last one (a newer attempt, or the end, is there), or a stream that is gone.
local refused = {}
for i = 1, #KEYS do
  local at = (i - 1) * 3
  local ok, id = pcall(redis.call, 'XADD', KEYS[i], 'NOMKSTREAM', ARGV[at + 1], 't', ARGV[at + 2], 'd', ARGV[at + 3])
  if not ok or not id then refused[#refused + 1] = i end
end
return refused
"""
"""One script call appends a whole batch of entries: one command and one reply, not one per entry."""


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
        if data[0] > COMPACT_INNER:
            self._remember(position, data)
            return data
        distance, at = _read_varint(data, 1)
        prefix, at = _read_varint(data, at)
        suffix, at = _read_varint(data, at)
        ref = self._refs[(position[0], position[1] - distance)]
        middle = data[at:]
        if data[0] == COMPACT_INNER:
            at_ref, at = _read_varint(data, at)
            at_chunk, at = _read_varint(data, at)
            length, at = _read_varint(data, at)
            rest = data[at:]
            start = prefix + at_ref
            middle = rest[:at_chunk] + ref[start : start + length] + rest[at_chunk:]
        return ref[:prefix] + middle + ref[len(ref) - suffix :]

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
            if data[0] > COMPACT_INNER:
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
