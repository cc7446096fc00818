"""A sans-IO codec for QMP, the QEMU Machine Protocol (bytes in, messages out; stdlib only).

In the style of h11: the codec does no I/O and knows nothing of any event loop. Feed it what the
socket delivered with :meth:`QMPCodec.receive_data` (``b""`` for end of file), pull parsed
messages with :meth:`QMPCodec.next_event`, and send what :meth:`QMPCodec.send_command` returns.

The states of a connection, in order::

    AWAITING_GREETING --greeting--> NEGOTIATING --qmp_capabilities reply--> READY
    any state --EOF--> CLOSED          any state --peer's protocol violation--> ERROR

Errors are split as h11 splits them: what the peer did wrong raises
:class:`aiovirt.ProtocolError` (carrying the offending bytes, truncated); what we did wrong
(sending before the greeting, sending anything but ``qmp_capabilities`` while negotiating,
sending after the end) raises :class:`LocalProtocolError`, a :class:`RuntimeError`.

This module must not import anyio (a test checks it): it is usable from any I/O framework.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypeAlias

from .._errors import LocalProtocolError, ProtocolError

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "CodecState",
    "Event",
    "Greeting",
    "LocalProtocolError",
    "Message",
    "QMPCodec",
    "Response",
    "Sentinel",
]

# How much of an offending line a ProtocolError carries: enough to recognise it, never megabytes.
_REPORT_BYTES: Final = 512
# Commands shorter than this may be sent without an id (see send_command). QEMU's JSON parser
# fails only beyond 1024 levels of nesting or 64 MiB tokens, impossible in 1 KiB.
_ANON_MAX: Final = 1024


class Sentinel(enum.Enum):
    """What :meth:`QMPCodec.next_event` returns when it has no message."""

    NEED_DATA = "NEED_DATA"
    """No complete message is buffered: call ``receive_data`` with more bytes."""
    CLOSED = "CLOSED"
    """The peer closed the connection and every message before the end has been returned."""

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


class CodecState(enum.Enum):
    """Where a :class:`QMPCodec` is in the conversation."""

    AWAITING_GREETING = "awaiting_greeting"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"
    """The peer sent EOF. Messages received before it may still be buffered."""
    ERROR = "error"
    """The peer broke the protocol; the connection is unusable."""


@dataclass(frozen=True, slots=True)
class Greeting:
    """QEMU's first message. ``version`` is QEMU's version object as sent."""

    version: dict[str, Any]
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Response:
    """A command's reply: either ``result`` (QMP's ``return``) or QEMU's error class and text.

    ``id`` is the id given by :meth:`QMPCodec.send_command`; it is None only for the error QEMU
    sends when it could not parse a request at all (it cannot tell which request that was).
    """

    id: str | None
    result: Any
    error_class: str | None = None
    error_desc: str | None = None

    @property
    def ok(self) -> bool:
        """True for a successful reply (QMP's ``return``), False for an error reply."""
        return self.error_class is None


@dataclass(frozen=True, slots=True)
class Event:
    """An asynchronous QMP event. ``timestamp`` is QEMU's, in seconds since the epoch (host clock)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


Message: TypeAlias = Greeting | Response | Event
"""Everything :meth:`QMPCodec.next_event` can return besides a sentinel."""


def _excerpt(data: bytes | bytearray) -> bytes:
    return bytes(data[:_REPORT_BYTES])


_encode = json.JSONEncoder(separators=(",", ":")).encode  # ASCII-only output: what QEMU expects
_decode = json.JSONDecoder().decode


class QMPCodec:
    """The whole QMP protocol as a state machine over bytes.

    Guarantees:

    - Messages are returned in the order the peer sent them, whatever the chunking of the input
      (a message may be split at any byte; many may arrive in one chunk). Lines may end in
      ``\\n`` or ``\\r\\n``; blank lines are ignored.
    - A line longer than ``max_line`` bytes (not counting its ``\\n``) raises ProtocolError as
      soon as that many bytes without a newline are buffered: memory stays bounded.
    - Every reply is matched to a command this codec sent and has not yet seen answered: by its
      id, or, for an id-less reply, to the command sent without an id (see ``send_command``);
      else ProtocolError. An id-less reply with no such command (QEMU's error for a request it
      could not parse) is returned as a Response with ``id=None``.
    - Events may come at any time after the greeting, including between a command and its
      reply.
    - After a ProtocolError the codec is in state ERROR and ``next_event`` raises the same error
      again; after EOF and the messages before it, ``next_event`` returns :data:`CLOSED` forever.
    """

    __slots__ = (
        "_anon",
        "_buf",
        "_caps_ids",
        "_eof",
        "_error",
        "_free_ids",
        "_max_line",
        "_next_id",
        "_outstanding",
        "_phase",
        "_scanned",
    )

    def __init__(self, max_line: int = 1 << 20) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self._max_line = max_line
        self._buf = bytearray()
        # Bytes at the start of _buf already known to contain no b"\n": a line that arrives in
        # many chunks is scanned once, not once per chunk.
        self._scanned = 0
        self._eof = False
        # How far the conversation got: AWAITING_GREETING, NEGOTIATING or READY. EOF and errors are
        # tracked apart because messages buffered before the EOF must still be parsed in this phase.
        self._phase = CodecState.AWAITING_GREETING
        self._error: ProtocolError | None = None
        self._next_id = 1
        self._outstanding: set[str] = set()
        # Ids whose replies arrived, reused (last freed first) so ids stay as short as the number
        # of commands in flight: QEMU reads its monitor one byte per main-loop iteration, so
        # every byte of a command costs latency.
        self._free_ids: list[str] = []
        # The id of the command sent without an id on the wire, if its reply is still due.
        self._anon: str | None = None
        self._caps_ids: set[str] = set()

    @property
    def state(self) -> CodecState:
        if self._error is not None:
            return CodecState.ERROR
        if self._eof:
            return CodecState.CLOSED
        return self._phase

    @property
    def pending_ids(self) -> frozenset[str]:
        """Ids of commands sent and not yet answered."""
        return frozenset(self._outstanding)

    # -- sending ---------------------------------------------------------------------------

    def send_command(self, command: str, arguments: Mapping[str, Any] | None = None) -> tuple[str, bytes]:
        """Encode ``command`` with an id; return ``(id, bytes to send)``.

        The id differs from that of every command still awaiting its reply (an id is reused only
        once its reply has arrived, so a late reply can never be mistaken for a newer command's),
        and the reply to this command is returned with this id.

        On the wire the id is left out when no other command is pending (and the command is under
        1 KiB): QEMU runs in-band commands one at a time and answers them in order, so the next
        id-less reply can only be this command's. QEMU reads its monitor one byte per main-loop
        iteration, so the shorter command is answered sooner; sequential callers, the common
        case, never send an id.

        The bytes are one JSON object and ``b"\\n"``. Raises LocalProtocolError before the
        greeting, for anything but ``qmp_capabilities`` while negotiating, and after EOF or a
        protocol error; TypeError/ValueError if the arguments are not JSON-serialisable.
        """
        state = self.state
        if state is not CodecState.READY:
            if state is CodecState.AWAITING_GREETING:
                raise LocalProtocolError(f"cannot send {command!r}: QEMU's greeting has not arrived yet")
            if state is CodecState.NEGOTIATING:
                if command != "qmp_capabilities":
                    raise LocalProtocolError(
                        f"cannot send {command!r} before the qmp_capabilities negotiation completed"
                    )
            else:
                raise LocalProtocolError(f"cannot send {command!r}: the connection is {state.value}")
        free = self._free_ids
        cmd_id = free[-1] if free else f"c{self._next_id}"
        # Formatted by hand around json's encoder: this runs once per command on the hot path.
        head = f'{{"execute":{_encode(command)}'
        if arguments is not None:
            head = f'{head},"arguments":{_encode(dict(arguments))}'
        # With nothing else pending, the id stays off the wire: QEMU answers in-band commands in
        # order, so the next id-less reply is this command's, and QEMU, which reads its monitor
        # one byte per main-loop iteration, answers sooner. Small commands only: QEMU's JSON
        # parser cannot fail on them, so no id-less parse error can be mistaken for this reply.
        anonymous = not self._outstanding and len(head) < _ANON_MAX
        text = f"{head}}}\n" if anonymous else f'{head},"id":"{cmd_id}"}}\n'
        data = text.encode("ascii")
        # Commit only once encoding succeeded, so a bad argument leaves no phantom pending id.
        if free:
            free.pop()
        else:
            self._next_id += 1
        self._outstanding.add(cmd_id)
        if anonymous:
            self._anon = cmd_id
        if command == "qmp_capabilities" and state is CodecState.NEGOTIATING:
            self._caps_ids.add(cmd_id)
        return cmd_id, data

    def abandon(self, cmd_id: str) -> None:
        """Release the id of a command whose bytes were never sent: no reply will come for it.

        Only for a command none of whose bytes reached the peer; an id still pending otherwise
        stays reserved until its (possibly late) reply arrives.
        """
        if cmd_id in self._outstanding:
            self._outstanding.remove(cmd_id)
            self._caps_ids.discard(cmd_id)
            self._free_ids.append(cmd_id)
            if cmd_id == self._anon:
                self._anon = None

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its end (EOF).

        Raises LocalProtocolError for data fed after EOF. Data fed after a ProtocolError is ignored.
        """
        if self._eof:
            if data:
                raise LocalProtocolError("received data after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._error is not None:
            return
        self._buf += data

    def next_event(self) -> Message | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]:
        """The next complete message, or :data:`NEED_DATA`, or :data:`CLOSED` after EOF.

        Raises ProtocolError when the peer broke the protocol (and forever after).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        while True:
            nl = buf.find(b"\n", self._scanned)
            if nl < 0:
                size = len(buf)
                if size > self._max_line:
                    self._fail(f"line longer than {self._max_line} bytes (no newline yet)", buf)
                if not self._eof:
                    self._scanned = size
                    return NEED_DATA
                if buf.strip():
                    self._fail("connection closed in the middle of a message", buf)
                buf.clear()
                self._scanned = 0
                return CLOSED
            if nl > self._max_line:
                self._fail(f"line longer than {self._max_line} bytes", buf[:nl])
            line = buf[:nl]
            # bytearray deletes from the front in O(1) (CPython moves its start offset).
            del buf[: nl + 1]
            self._scanned = 0
            try:
                msg = _decode(line.decode())
            except (ValueError, RecursionError):
                if not line.strip():
                    continue  # a blank line (or a lone "\r")
                self._fail("not valid JSON", line)
            if type(msg) is not dict:
                self._fail("a message must be a JSON object", line)
            return self._classify(msg, line)

    def _classify(self, msg: dict[str, Any], line: bytearray) -> Message:
        # Ordered by frequency: replies, then events, then the one greeting.
        if "return" in msg or "error" in msg:
            if self._phase is CodecState.AWAITING_GREETING:
                self._fail("a reply arrived before the greeting", line)
            return self._response(msg, line)
        if "event" in msg:
            if self._phase is CodecState.AWAITING_GREETING:
                self._fail("an event arrived before the greeting", line)
            return self._event(msg, line)
        if "QMP" in msg:
            return self._greeting(msg, line)
        self._fail("not a QMP message (no return, error, event or QMP key)", line)

    def _response(self, msg: dict[str, Any], line: bytearray) -> Response:
        cmd_id = msg.get("id")
        if cmd_id is None:
            # QEMU answers in order; the command sent without an id was the oldest pending one.
            if self._anon is not None:
                cmd_id, self._anon = self._anon, None
        elif type(cmd_id) is not str or cmd_id not in self._outstanding or cmd_id == self._anon:
            self._fail(f"a reply to id {cmd_id!r}, which was never sent or already answered", line)
        negotiated = False
        if cmd_id is not None:
            self._outstanding.remove(cmd_id)
            self._free_ids.append(cmd_id)
            if self._caps_ids and cmd_id in self._caps_ids:
                self._caps_ids.remove(cmd_id)
                negotiated = True
        if "error" in msg:
            err = msg["error"]
            if type(err) is not dict or type(err.get("class")) is not str or type(err.get("desc")) is not str:
                self._fail("an error reply needs an object with string 'class' and 'desc'", line)
            return Response(cmd_id, None, err["class"], err["desc"])
        if negotiated and self._phase is CodecState.NEGOTIATING:
            self._phase = CodecState.READY
        return Response(cmd_id, msg["return"])

    def _event(self, msg: dict[str, Any], line: bytearray) -> Event:
        name = msg["event"]
        ts = msg.get("timestamp")
        data = msg.get("data", {})
        if type(name) is not str or type(data) is not dict or type(ts) is not dict:
            self._fail("an event needs a string 'event', an object 'timestamp' and an object 'data'", line)
        try:
            timestamp = ts["seconds"] + ts["microseconds"] / 1e6
        except (KeyError, TypeError, OverflowError):
            self._fail("an event timestamp needs numeric 'seconds' and 'microseconds'", line)
        return Event(name, data, float(timestamp))

    def _greeting(self, msg: dict[str, Any], line: bytearray) -> Greeting:
        if self._phase is not CodecState.AWAITING_GREETING:
            self._fail("a second greeting", line)
        body = msg["QMP"]
        if type(body) is not dict:
            self._fail("the greeting's 'QMP' must be an object", line)
        version = body.get("version")
        caps = body.get("capabilities")
        if type(version) is not dict or type(caps) is not list or not all(type(c) is str for c in caps):
            self._fail("the greeting needs an object 'version' and a list of strings 'capabilities'", line)
        self._phase = CodecState.NEGOTIATING
        return Greeting(version, tuple(caps))

    def _fail(self, problem: str, data: bytes | bytearray) -> NoReturn:
        self._error = ProtocolError(f"QMP protocol error: {problem}: {_excerpt(data)!r}", _excerpt(data))
        self._buf.clear()
        self._scanned = 0
        raise self._error
