"""A sans-IO codec for libvirt's RPC protocol, client side (bytes in, events out; stdlib only).

In the style of h11: no I/O, no event loop. Feed what the socket delivered to
:meth:`RPCCodec.receive_data` (``b""`` at end of file), pull events with
:meth:`RPCCodec.next_event`, and send the bytes that :meth:`RPCCodec.send_call`,
:meth:`RPCCodec.send_ping` and :meth:`RPCCodec.send_pong` return.

A packet on the wire (virnetprotocol.x)::

    length   u32   the whole packet's size in bytes, the length word included
    program  u32   REMOTE 0x20008086, QEMU 0x20008087 or KEEPALIVE 0x6b656570
    version  u32   1
    procedure i32
    type     i32   CALL 0, REPLY 1, MESSAGE 2 (events, keepalive), STREAM 3, ...
    serial   u32   a call's number, echoed by its reply; meaningless for MESSAGE
    status   i32   OK 0, ERROR 1 (the payload is a remote_error), CONTINUE 2
    payload        XDR; at most 16 MiB for header and payload together

Errors are split as h11 splits them. What the peer did wrong (a length word that is too small or
over the limit, an unknown program or version, an unsupported message type, a reply to a serial
that was never sent or was already answered, a reply naming another procedure than its call, a
remote_error that does not decode, a malformed keepalive, EOF inside a packet) raises
:class:`aiovirt.ProtocolError` with the offending bytes (at most 512). What we did wrong (sending
after the end, a packet over the limit) raises :class:`LocalProtocolError`, a RuntimeError.

This module must not import anyio (a test checks it).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, Literal, NoReturn, TypeAlias

from .._errors import LocalProtocolError, ProtocolError
from ._protocol import (
    HEADER_SIZE,
    LEN_SIZE,
    PACKET_MAX,
    PROGRAM_VERSION,
    KeepaliveProcedure,
    MessageStatus,
    MessageType,
    Program,
    RemoteError,
    decode_remote_error,
)
from ._xdr import XDRDecodeError

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "CodecState",
    "ErrorReply",
    "Event",
    "KeepalivePing",
    "KeepalivePong",
    "LocalProtocolError",
    "Message",
    "RPCCodec",
    "Reply",
    "Sentinel",
    "decode_header",
    "encode_packet",
]

# How much of an offending packet a ProtocolError carries: its header and the start of its payload.
_REPORT_BYTES: Final = 512
_FRAME: Final = struct.Struct(">IIIiiIi")  # length word + the 24-byte header
_LENGTH: Final = struct.Struct(">I")
_MIN_PACKET: Final = LEN_SIZE + HEADER_SIZE
_SERIAL_MAX: Final = (1 << 32) - 1
_RPC_PROGRAMS: Final = frozenset({Program.REMOTE, Program.QEMU})


class Sentinel(enum.Enum):
    """What :meth:`RPCCodec.next_event` returns when it has no event."""

    NEED_DATA = "NEED_DATA"
    """No complete packet is buffered: call ``receive_data`` with more bytes."""
    CLOSED = "CLOSED"
    """The peer closed the connection and every packet before the end has been returned."""

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


class CodecState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    """The peer sent EOF. Packets received before it may still be buffered."""
    ERROR = "error"
    """The peer broke the protocol; the connection is unusable."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful reply to the call ``serial``: ``body`` is its XDR payload (the procedure's ``_ret``)."""

    serial: int
    procedure: int
    body: bytes
    program: int = Program.REMOTE


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The call ``serial`` failed: libvirt's error, decoded."""

    serial: int
    procedure: int
    error: RemoteError
    program: int = Program.REMOTE


@dataclass(frozen=True, slots=True)
class Message:
    """An asynchronous message (type MESSAGE): an event such as
    DOMAIN_EVENT_CALLBACK_LIFECYCLE. ``body`` is its XDR payload (the procedure's ``_msg``)."""

    procedure: int
    body: bytes
    program: int = Program.REMOTE


@dataclass(frozen=True, slots=True)
class KeepalivePing:
    """The peer asks whether we are alive: answer with :meth:`RPCCodec.send_pong`'s bytes."""


@dataclass(frozen=True, slots=True)
class KeepalivePong:
    """The peer answered a ping."""


Event: TypeAlias = Reply | ErrorReply | Message | KeepalivePing | KeepalivePong
"""Everything :meth:`RPCCodec.next_event` can return besides a sentinel."""

_PING: Final = KeepalivePing()
_PONG: Final = KeepalivePong()


@dataclass(frozen=True, slots=True)
class Header:
    """A packet's 24-byte header (virNetMessageHeader)."""

    program: int
    version: int
    procedure: int
    type: int
    serial: int
    status: int


def encode_packet(
    program: int,
    procedure: int,
    type: int,
    serial: int,
    status: int = MessageStatus.OK,
    body: bytes = b"",
    *,
    version: int = PROGRAM_VERSION,
) -> bytes:
    """One whole packet: length word, header, ``body``. Raises LocalProtocolError over the limit.

    Used by the codec for what we send; public so that tests can build what a server sends.
    """
    length = _MIN_PACKET + len(body)
    if length > PACKET_MAX:
        raise LocalProtocolError(f"packet of {length} bytes exceeds libvirt's limit of {PACKET_MAX}")
    return _FRAME.pack(length, program, version, procedure, type, serial, status) + body


def decode_header(packet: bytes | bytearray | memoryview) -> tuple[int, Header]:
    """The length word and header at the start of ``packet`` (at least 28 bytes). No validation."""
    length, program, version, procedure, mtype, serial, status = _FRAME.unpack_from(packet)
    return length, Header(program, version, procedure, mtype, serial, status)


class RPCCodec:
    """The client's half of libvirt's RPC as a state machine over bytes.

    Guarantees:

    - Events are returned in the order the peer sent them, whatever the chunking of the input (a
      packet may be split at any byte; many may arrive in one chunk).
    - A length word over the limit raises ProtocolError as soon as its 4 bytes are buffered: memory
      stays bounded by the limit whatever the peer announces.
    - Every reply is matched, by serial, to a call this codec sent and has not yet seen answered,
      with the same program and procedure; else ProtocolError. Replies may come in any order.
    - Serials start at 0, as libvirt's own client's do (so our packets are byte for byte the ones
      it sends), and increase; after 2**32 - 1 they wrap to 0, skipping any still awaiting a reply.
    - After a ProtocolError the codec is in state ERROR and ``next_event`` raises the same error
      again; after EOF and the packets before it, ``next_event`` returns :data:`CLOSED` forever.
    """

    __slots__ = ("_buf", "_eof", "_error", "_max_packet", "_next_serial", "_pending")

    def __init__(self, *, max_packet: int = PACKET_MAX) -> None:
        if not _MIN_PACKET <= max_packet <= PACKET_MAX:
            raise ValueError(f"max_packet must be between {_MIN_PACKET} and {PACKET_MAX}")
        self._max_packet = max_packet
        self._buf = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None
        self._next_serial = 0
        # serial -> (program, procedure) of each call sent and not yet answered.
        self._pending: dict[int, tuple[int, int]] = {}

    @property
    def state(self) -> CodecState:
        if self._error is not None:
            return CodecState.ERROR
        if self._eof:
            return CodecState.CLOSED
        return CodecState.OPEN

    @property
    def pending_serials(self) -> frozenset[int]:
        """Serials of calls sent and not yet answered."""
        return frozenset(self._pending)

    # -- sending ---------------------------------------------------------------------------

    def _check_can_send(self, what: str) -> None:
        state = self.state
        if state is not CodecState.OPEN:
            raise LocalProtocolError(f"cannot send {what}: the connection is {state.value}")

    def send_call(
        self, procedure: int, body: bytes = b"", *, program: int = Program.REMOTE
    ) -> tuple[int, bytes]:
        """Frame a call of ``procedure`` with payload ``body``; return ``(serial, bytes to send)``.

        ``body`` is the procedure's ``_args`` encoded (see ``_protocol``'s ``encode_*``). The
        serial is reserved until its reply arrives (or :meth:`abandon`). Raises
        LocalProtocolError after EOF or a protocol error, or if the packet exceeds the limit.
        """
        self._check_can_send(f"call {procedure}")
        if program not in _RPC_PROGRAMS:
            raise LocalProtocolError(f"calls go to the REMOTE or QEMU program, not {program:#x}")
        serial = self._next_serial
        while serial in self._pending:
            serial = serial + 1 if serial < _SERIAL_MAX else 0
        data = encode_packet(program, procedure, MessageType.CALL, serial, MessageStatus.OK, body)
        self._pending[serial] = (program, procedure)
        self._next_serial = serial + 1 if serial < _SERIAL_MAX else 0
        return serial, data

    def abandon(self, serial: int) -> None:
        """Forget a call none of whose bytes reached the peer: no reply will come for it.

        Only for a call never (even partly) sent; a call that was sent stays pending until its reply
        arrives, so that a late reply is recognised rather than taken for a protocol violation.
        """
        self._pending.pop(serial, None)

    def send_ping(self) -> bytes:
        """A keepalive PING (the peer answers with a PONG)."""
        self._check_can_send("a keepalive ping")
        return encode_packet(Program.KEEPALIVE, KeepaliveProcedure.PING, MessageType.MESSAGE, 0)

    def send_pong(self) -> bytes:
        """The answer to a :class:`KeepalivePing`."""
        self._check_can_send("a keepalive pong")
        return encode_packet(Program.KEEPALIVE, KeepaliveProcedure.PONG, MessageType.MESSAGE, 0)

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
        if self._error is None:
            self._buf += data

    def next_event(self) -> Event | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]:
        """The next complete event, or :data:`NEED_DATA`, or :data:`CLOSED` after EOF.

        Raises ProtocolError when the peer broke the protocol (and forever after).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        size = len(buf)
        if size >= LEN_SIZE:
            (length,) = _LENGTH.unpack_from(buf)
            if length < _MIN_PACKET:
                self._fail(f"packet length {length} is shorter than the {_MIN_PACKET}-byte header", buf)
            if length > self._max_packet:
                self._fail(f"packet length {length} exceeds the limit of {self._max_packet} bytes", buf)
            if size >= length:
                _, program, version, procedure, mtype, serial, status = _FRAME.unpack_from(buf)
                packet = bytes(buf[:length])
                # bytearray deletes from the front without copying the rest (CPython moves its start).
                del buf[:length]
                return self._classify(packet, program, version, procedure, mtype, serial, status)
        if not self._eof:
            return NEED_DATA
        if buf:
            self._fail("connection closed in the middle of a packet", buf)
        return CLOSED

    def _classify(
        self, packet: bytes, program: int, version: int, procedure: int, mtype: int, serial: int, status: int
    ) -> Event:
        # Ordered by frequency: replies, then events and keepalive.
        if program in _RPC_PROGRAMS:
            if version != PROGRAM_VERSION:
                self._fail(f"program {program:#x} version {version} (only {PROGRAM_VERSION} exists)", packet)
            if mtype == MessageType.REPLY:
                return self._reply(packet, program, procedure, serial, status)
            if mtype == MessageType.MESSAGE:
                # virnetprotocol.x says serial 0, but libvirtd sends its events with serial 1
                # (recorded from libvirt 9.0): the serial of a message means nothing.
                if status != MessageStatus.OK:
                    self._fail(f"a message must have status OK, got {status}", packet)
                return Message(procedure, packet[_MIN_PACKET:], program)
            self._fail(f"unsupported message type {mtype} (procedure {procedure})", packet)
        if program == Program.KEEPALIVE:
            if version != PROGRAM_VERSION or mtype != MessageType.MESSAGE or status != MessageStatus.OK:
                self._fail("a keepalive packet must be version 1, type MESSAGE, status OK", packet)
            if len(packet) != _MIN_PACKET:
                self._fail("a keepalive packet carries no payload", packet)
            if procedure == KeepaliveProcedure.PING:
                return _PING
            if procedure == KeepaliveProcedure.PONG:
                return _PONG
            self._fail(f"unknown keepalive procedure {procedure}", packet)
        self._fail(f"unknown program {program:#x}", packet)

    def _reply(self, packet: bytes, program: int, procedure: int, serial: int, status: int) -> Event:
        call = self._pending.get(serial)
        if call is None:
            self._fail(f"a reply to serial {serial}, which was never sent or was already answered", packet)
        if call != (program, procedure):
            self._fail(
                f"the reply to serial {serial} is for program {program:#x} procedure {procedure}, "
                f"but that call was program {call[0]:#x} procedure {call[1]}",
                packet,
            )
        if status == MessageStatus.OK:
            del self._pending[serial]
            return Reply(serial, procedure, packet[_MIN_PACKET:], program)
        if status == MessageStatus.ERROR:
            try:
                error = decode_remote_error(packet[_MIN_PACKET:])
            except XDRDecodeError as exc:
                self._fail(f"the error reply to serial {serial} does not decode: {exc}", packet)
            del self._pending[serial]
            return ErrorReply(serial, procedure, error, program)
        self._fail(f"a reply with status {status} (serial {serial})", packet)

    def _fail(self, problem: str, data: bytes | bytearray) -> NoReturn:
        excerpt = bytes(data[:_REPORT_BYTES])
        self._error = ProtocolError(f"libvirt RPC protocol error: {problem}", excerpt)
        self._buf.clear()
        raise self._error
