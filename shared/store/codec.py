"""The job-stream entry format (version ``FORMAT``; ``docs/stream-format.md`` specifies it for readers in
any language): how events lie in a Redis Stream. Both sides import it; nothing else touches raw
entry fields.

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
run shared from inside the middle (three more varints: where the run starts in the reference's
middle, where it goes in the chunk's middle, its length), for chunks that differ in two places
(OpenAI pads every chunk with a random ``obfuscation`` string). A new reference is stored whenever
the difference would not save half. Readers rebuild the bytes exactly; a reader that joins after a
reference fetches it once.

**Entry ids.** The worker gives an attempt's deltas explicit ids: the ``started`` entry's
millisecond and consecutive sequence numbers after it. This is what lets a delta name its reference
by distance, makes a replayed write batch harmless (Redis refuses an id it already has), and fences
a zombie worker: once a newer attempt or the terminal event is in the stream, every id the old
attempt would write is too small, and Redis refuses it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Final, Literal

from .. import jsonutil
from ..errors import InvalidRequest
from ..models import DELTA, TERMINAL_TYPES, Event
from . import keys
from .keys import FORMAT as FORMAT  # the entry format's version, named in the stream's key

T: Final = b"t"
D: Final = b"d"
COMPACT: Final = 0x00
"""First byte of a compact delta; a JSON text never starts with it."""
COMPACT_INNER: Final = 0x01
"""First byte of a compact delta that also reuses a run from inside its reference's middle."""
INNER_ANCHOR = 8

Fields = dict[bytes, bytes]
RawEntry = tuple[bytes, Fields]
"""An entry as redis-py returns it from XRANGE/XREAD: its id and its fields."""
Position = tuple[int, int]


def encode(type: str, data: Any) -> Fields:
    """The entry fields of a non-delta event."""
    return {T: type.encode(), D: jsonutil.dumps(data)}


_TERMINAL_KINDS: Final = frozenset(kind.encode() for kind in TERMINAL_TYPES)


def is_terminal(fields: Fields) -> bool:
    """Whether a raw entry is a terminal event, without decoding its data."""
    return fields[T] in _TERMINAL_KINDS


_CURSOR: Final = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_ID_MAX: Final = 2**64 - 1


def parse_cursor(after: str) -> Position:
    """A cursor a reader gave (``"0"`` or an entry id), checked exactly as Redis would take it: ASCII
    digits, each part at most 2**64 - 1; anything else is ``InvalidRequest``. The one check every
    reader's cursor goes through (client, CLI, gateway), so that no cursor Redis refuses reaches a
    command that serves other readers."""
    match = _CURSOR.fullmatch(after) if isinstance(after, str) else None
    if match is None or int(match[1]) > _ID_MAX or (match[2] is not None and int(match[2]) > _ID_MAX):
        shown = after if isinstance(after, str) and len(after) <= 64 else f"{str(after)[:64]}..."
        raise InvalidRequest(f"invalid event id {shown!r}: expected '0' or a stream id like '1700000000000-0'")
    return int(match[1]), int(match[2] or 0)


def format_id(position: Position) -> str:
    """An entry id from ``(milliseconds, sequence)``."""
    return f"{position[0]}-{position[1]}"


def parse_id(entry_id: bytes | str) -> Position:
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


def _varints(*values: int) -> bytes:
    """The values as consecutive varints (a delta's header)."""
    out = b""
    for value in values:
        out += _VARINTS[value] if value < 4096 else _varint(value)
    return out


_VARINTS: Final = tuple(_varint(value) for value in range(4096))
"""Every varint under 4,096 (a header's offsets into chunks of up to 4 KB), made once: 0.3 µs a delta."""


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _first_difference(a: bytes, b: bytes, order: Literal["big", "little"]) -> int:
    """How many leading (``"big"``) or trailing (``"little"``) bytes two equally long strings share:
    one XOR of the two as integers, whose bit length tells where they first differ (in C, ~1 µs for
    200 bytes, where a binary search of slice comparisons costs several)."""
    difference = int.from_bytes(a, order) ^ int.from_bytes(b, order)
    return len(a) - (difference.bit_length() + 7) // 8


def _shared_prefix(a: bytes, b: bytes, limit: int, hint: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``.

    ``hint`` is the last answer: chunks of one stream keep their shape, so it is usually right or a
    byte or two short, and one comparison and a step or two settle it.
    """
    if hint <= limit and a[:hint] == b[:hint]:
        low = hint
        while low < limit and a[low] == b[low]:
            low += 1
            if low - hint > 4:
                return _first_difference(a[:limit], b[:limit], "big")
        return low
    return _first_difference(a[:limit], b[:limit], "big")


def _shared_suffix(a: bytes, b: bytes, limit: int, hint: int) -> int:
    """Length of the common suffix of ``a`` and ``b``, at most ``limit``; ``hint`` as above."""
    end_a, end_b = len(a), len(b)
    if hint <= limit and a[end_a - hint :] == b[end_b - hint :]:
        low = hint
        while low < limit and a[end_a - low - 1] == b[end_b - low - 1]:
            low += 1
            if low - hint > 4:
                return _first_difference(a[end_a - limit :], b[end_b - limit :], "little")
        return low
    return _first_difference(a[end_a - limit :], b[end_b - limit :], "little")


def _inner_match(ref_middle: bytes, middle: bytes, hint: int) -> tuple[int, int, int] | None:
    """A run that the two middles share, found from the reference's first quote onwards.

    The content of a chunk ends at a quote, and what follows it (the rest of the choice, the next
    keys) repeats: after prefix and suffix are taken, that run is what is left to save. ``hint`` is
    the run's last length, as for ``_shared_prefix``.
    """
    at_ref = ref_middle.find(b'"')
    if at_ref < 0 or len(ref_middle) - at_ref < INNER_ANCHOR:
        return None
    at_chunk = middle.find(ref_middle[at_ref : at_ref + INNER_ANCHOR])
    if at_chunk < 0:
        return None
    tail_ref, tail_chunk = ref_middle[at_ref + INNER_ANCHOR :], middle[at_chunk + INNER_ANCHOR :]
    limit = min(len(tail_ref), len(tail_chunk))
    return at_ref, at_chunk, INNER_ANCHOR + _shared_prefix(tail_ref, tail_chunk, limit, max(0, hint - INNER_ANCHOR))


class DeltaEncoder:
    """Encodes one attempt's entries, with explicit ids after its ``started`` entry. It is also the
    attempt's handle for the worker's writer, which sets ``fenced`` when Redis refuses one of them
    and ``full`` when it has no memory for one.

    :param job_id: the job.
    :param attempt: the attempt number.
    :param started_id: the id Redis gave the attempt's ``started`` entry.
    """

    __slots__ = (
        "_inner",
        "_kind",
        "_ms",
        "_prefix",
        "_ref",
        "_ref_seq",
        "_seq",
        "_suffix",
        "fenced",
        "full",
        "job_id",
        "key",
        "key_resp",
    )

    def __init__(self, job_id: str, attempt: int, started_id: str) -> None:
        self.job_id = job_id
        self.key = stream = keys.events(job_id).encode()
        self.key_resp = b"$%d\r\n%b\r\n" % (len(stream), stream)
        """The stream's key as one argument of a Redis command, packed once for all its appends."""
        self.fenced = False
        """Redis refused an entry of this attempt: a newer attempt or the job's end is in the stream."""
        self.full = False
        """Redis had no memory for an entry of this attempt."""
        self._kind = b"%d" % attempt
        self._ms, self._seq = parse_id(started_id)
        self._ref = b""
        self._ref_seq = -1
        self._prefix = self._suffix = self._inner = 0

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
            inner = _inner_match(ref[prefix : len(ref) - suffix], middle, self._inner)
            if inner is not None:
                # Two holes: OpenAI's per-chunk `obfuscation` padding differs at the end as well.
                at_ref, at_chunk, length = inner
                self._inner = length
                header = _varints(self._seq - self._ref_seq, prefix, suffix, at_ref, at_chunk, length)
                payload = b"\x01" + header + middle[:at_chunk] + middle[at_chunk + length :]
            else:
                payload = b"\x00" + _varints(self._seq - self._ref_seq, prefix, suffix) + middle
            if len(payload) <= len(chunk) // 2:
                return entry_id, {T: self._kind, D: payload}
        self._ref, self._ref_seq = chunk, self._seq
        self._prefix = self._suffix = len(chunk)
        return entry_id, {T: self._kind, D: chunk}

    def event(self, type: str, data: Any) -> tuple[bytes, Fields]:
        """The id and fields of a non-delta event written by this attempt (a ``retry``)."""
        return self.next_id(), encode(type, data)


class Entry:
    """One decoded entry: the event's id, type, and its data as stored bytes, parsed only when asked.

    ``body`` is the upstream's chunk for a delta (its exact bytes), the data's JSON otherwise: a
    reader that forwards events (the gateway) never parses them.
    """

    __slots__ = ("_data", "_position", "attempt", "body", "id", "terminal", "type")

    def __init__(self, id: str, type: str, attempt: int, body: bytes) -> None:
        self.id = id
        self.type = type
        self.terminal = type in TERMINAL_TYPES
        """Whether this is the job's last event (an attribute: a fan-out asks once per subscriber)."""
        self.attempt = attempt
        """The attempt of a delta; 0 for other events."""
        self.body = body
        self._data: Any = _UNPARSED
        self._position: Position | None = None

    @property
    def position(self) -> Position:
        """The id as ``(milliseconds, sequence)``, computed once."""
        if self._position is None:
            self._position = parse_id(self.id)
        return self._position

    @property
    def data(self) -> Any:
        """The event's ``data`` as the contract has it (parsed once, then kept)."""
        if self._data is _UNPARSED:
            if self.type == DELTA:
                self._data = {"attempt": self.attempt, "chunk": jsonutil.loads(self.body)}
            else:
                self._data = jsonutil.loads(self.body)
        return self._data

    def event(self) -> Event:
        return Event(self.id, self.type, self.data)


_UNPARSED: Final = object()


class Decoder:
    """Rebuilds the entries of one stream for one reader, keeping the last ``CACHE`` references it saw.

    ``missing`` names the references a batch needs that it has not seen (a reader that starts in the
    middle); the caller fetches them (``StreamStore``) and hands them to ``remember``.
    """

    CACHE = 64

    def __init__(self) -> None:
        self._refs: OrderedDict[Position, bytes] = OrderedDict()

    def missing(self, entries: list[RawEntry]) -> set[Position]:
        present = set(self._refs)
        missing: set[Position] = set()
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

    def remember(self, position: Position, data: bytes) -> None:
        self._refs[position] = data
        self._refs.move_to_end(position)
        if len(self._refs) > self.CACHE:
            self._refs.popitem(last=False)

    def decode(self, entries: list[RawEntry]) -> list[Entry]:
        """Decode entries, in order; every reference they need must be known (``missing``)."""
        return [self._entry(entry_id, fields) for entry_id, fields in entries]

    def _entry(self, entry_id: bytes, fields: Fields) -> Entry:
        kind = fields[T]
        if kind[:1].isdigit():
            return Entry(entry_id.decode(), DELTA, int(kind), self._chunk(entry_id, fields[D]))
        return Entry(entry_id.decode(), kind.decode(), 0, fields[D])

    def _chunk(self, entry_id: bytes, data: bytes) -> bytes:
        position = parse_id(entry_id)
        if data[0] > COMPACT_INNER:
            self.remember(position, data)
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
