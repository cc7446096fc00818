"""An anyio client for libvirt's RPC protocol: a short loop around :class:`~aiovirt.rpc.RPCCodec`.

One reader task per connection routes replies to their callers by serial, answers the daemon's
keepalive pings and hands lifecycle events, in order, to an ``on_lifecycle`` callback and to bounded
subscriptions. Any number of tasks may call at once: many calls are in flight on one connection,
answered in whatever order the daemon finishes them. There are no timeouts inside calls (wrap them
in ``anyio.fail_after``); only the handshake and the keepalive (a daemon that stops answering) are
bounded.

The client speaks over any connected ``anyio.abc.ByteStream`` or a plain connected ``socket.socket``
(see ``_transport`` for unix, TLS and ssh): the transport is the caller's choice, the protocol is
the same.
"""

from __future__ import annotations

import os
import socket
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Final, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from .._background import background_tasks
from .._broadcast import Broadcaster, Subscription
from .._errors import AiovirtError, ConnectionLostError, ProtocolError
from . import _protocol as P
from ._codec import CLOSED, NEED_DATA, ErrorReply, KeepalivePing, Message, Reply, RPCCodec
from ._errors import UnsupportedAuthError, error_from_remote, procedure_name
from ._protocol import DomainInfo, DomainRef, LifecycleEvent, Procedure, Program
from ._transport import Channel, SocketChannel, connect_unix_socket
from ._xdr import XDRDecodeError

__all__ = ["RPCClient"]

T = TypeVar("T")

# What one receive asks for: a burst of replies costs one wakeup.
_RECEIVE_SIZE: Final = 65536
# What a stream raises when the peer went away or it was closed under us.
_IO_ERRORS: Final = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
# How long a polite CONNECT_CLOSE may take when the connection is closed.
_CLOSE_TIMEOUT: Final = 2.0


async def _close_now(stream: Channel) -> None:
    """Close without waiting for anything (anyio.aclose_forcefully for any Channel)."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        await stream.aclose()


def _describe(exc: BaseException) -> str:
    """The root of an I/O error (anyio's BrokenResourceError wraps the OSError that says what)."""
    while exc.__cause__ is not None and not str(exc):
        exc = exc.__cause__
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


class _Call:
    """One pending call: woken by the reader with its reply, or with none when the connection ends."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: Reply | ErrorReply | None = None


class RPCClient:
    """An open connection to a libvirt daemon. Make one with :meth:`open` or :meth:`open_unix`.

    Guarantees:

    - :meth:`call` (and every typed method) may run in many tasks at once; each packet is written
      whole, and each caller gets the reply to its own call.
    - Lifecycle events reach ``on_lifecycle`` (first) and then every subscription, in the order the
      daemon sent them; an event sent before a reply is dispatched before that reply's caller resumes.
    - Every keepalive ping from the daemon is answered. When the daemon supports keepalive (libvirt
      does since 0.9.8) the client pings it after ``keepalive_interval`` seconds without traffic and
      gives the connection up after ``keepalive_count`` unanswered pings.
    - Once the connection ends (EOF, I/O error, protocol violation, keepalive timeout,
      :meth:`aclose`), every pending and every later call raises :class:`~aiovirt.ConnectionLostError`
      (its ``__cause__`` says why: e.g. the :class:`~aiovirt.ProtocolError`), subscriptions end
      after draining, and :meth:`wait_closed` returns.
    - A failed call raises a :class:`~aiovirt.rpc.LibvirtError` carrying libvirt's error (see
      ``_errors`` for which are also DomainNotFoundError, DomainExistsError, InvalidStateError).
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream | Channel | socket.socket,
        *,
        on_lifecycle: Callable[[LifecycleEvent], None] | None = None,
        keepalive_interval: float | None = 5.0,
        keepalive_count: int = 5,
        max_packet: int = P.PACKET_MAX,
    ) -> None:
        """Wrap ``stream`` without any I/O. Use :meth:`open`, which also handshakes and reads."""
        if keepalive_interval is not None and not keepalive_interval > 0:
            raise ValueError("keepalive_interval must be positive (or None to send no pings)")
        if keepalive_count < 0:
            raise ValueError("keepalive_count must not be negative")
        self._stream: Channel = SocketChannel(stream) if isinstance(stream, socket.socket) else stream
        self._codec = RPCCodec(max_packet=max_packet)
        self._on_lifecycle = on_lifecycle
        self._lifecycle: Broadcaster[LifecycleEvent] = Broadcaster()
        self._lifecycle_callback: int | None = None
        self._register_lock = anyio.Lock()
        self._pending: dict[int, _Call] = {}
        # fast_acquire: an uncontended call must not pay an extra trip through the event loop.
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._torn = False
        self._keepalive_interval = keepalive_interval
        self._keepalive_count = keepalive_count
        self._last_received = 0.0
        self._opened = False
        self._closed = False
        self._close_reason = "libvirt connection lost"
        self._close_cause: BaseException | None = None
        self._send_broken: BaseException | None = None
        self._closed_event = anyio.Event()
        # Everything the client runs in the background (the reader, the keepalive, pong senders)
        # runs in one task group under this scope, cancelled when the connection ends.
        self._scope = anyio.CancelScope()
        self._helpers: anyio.abc.TaskGroup | None = None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        stream: anyio.abc.ByteStream | Channel | socket.socket,
        name: str | None,
        *,
        flags: int = 0,
        on_lifecycle: Callable[[LifecycleEvent], None] | None = None,
        handshake_timeout: float = 10.0,
        keepalive_interval: float | None = 5.0,
        keepalive_count: int = 5,
        max_packet: int = P.PACKET_MAX,
    ) -> AsyncIterator[RPCClient]:
        """Open the connection ``name`` on ``stream`` (which the client then owns) and yield the client.

        ``stream`` is a connected anyio byte stream (any transport: unix, TCP, TLS, a process's
        pipes), or a connected stream ``socket.socket``, the faster choice: the client then does
        non-blocking I/O on it directly (it must not be in use by anything else).

        ``name`` is the URI the daemon opens, without the transport and the remote driver's own
        query parameters (for ``test+unix:///default?socket=S`` it is ``"test:///default"``;
        ``None`` lets the daemon choose), ``flags`` CONNECT_OPEN's (1: read-only).

        The handshake is libvirt's own: AUTH_LIST (only auth type "none" is supported: a daemon
        that requires SASL or polkit raises :class:`~aiovirt.rpc.UnsupportedAuthError`),
        SUPPORTS_FEATURE(keepalive), CONNECT_OPEN, and with ``on_lifecycle`` the registration for
        lifecycle events (so that none is missed). It completes within ``handshake_timeout``
        seconds or raises ConnectionLostError whose ``__cause__`` is the TimeoutError; a daemon that
        refuses ``name`` raises its :class:`~aiovirt.rpc.LibvirtError`. On failure the stream is
        closed.

        On exit the connection is closed (with a polite CONNECT_CLOSE, bounded), pending calls fail
        with ConnectionLostError and the reader has ended. An exception from the body propagates
        unchanged; one raised by ``on_lifecycle`` ends the connection and propagates out of the
        ``async with`` in an ExceptionGroup (a bug in the callback is never swallowed).
        """
        client = cls(
            stream,
            on_lifecycle=on_lifecycle,
            keepalive_interval=keepalive_interval,
            keepalive_count=keepalive_count,
            max_packet=max_packet,
        )
        async with background_tasks(client.aclose) as tg:
            await tg.start(client._run_background)
            await client._handshake(name, flags, handshake_timeout)
            yield client

    @classmethod
    @asynccontextmanager
    async def open_unix(
        cls,
        path: str | os.PathLike[str],
        name: str | None,
        *,
        flags: int = 0,
        on_lifecycle: Callable[[LifecycleEvent], None] | None = None,
        handshake_timeout: float = 10.0,
        keepalive_interval: float | None = 5.0,
        keepalive_count: int = 5,
        max_packet: int = P.PACKET_MAX,
    ) -> AsyncIterator[RPCClient]:
        """Connect to the daemon's unix socket at ``path`` (any length), then as :meth:`open`.

        Connecting and the handshake together complete within ``handshake_timeout``. A socket that
        cannot be connected (missing, refused: no daemon) raises ConnectionLostError whose
        ``__cause__`` is the OSError.
        """
        deadline = anyio.current_time() + handshake_timeout
        where = os.fsdecode(path)
        try:
            with anyio.fail_after(handshake_timeout):
                stream = await connect_unix_socket(path)
        except TimeoutError as exc:
            raise ConnectionLostError(
                f"cannot connect to libvirt socket {where!r} within {handshake_timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ConnectionLostError(
                f"cannot connect to libvirt socket {where!r}: {exc.strerror or exc}"
            ) from exc
        async with cls.open(
            stream,
            name,
            flags=flags,
            on_lifecycle=on_lifecycle,
            handshake_timeout=max(deadline - anyio.current_time(), 0.0),
            keepalive_interval=keepalive_interval,
            keepalive_count=keepalive_count,
            max_packet=max_packet,
        ) as client:
            yield client

    async def _handshake(self, name: str | None, flags: int, limit: float) -> None:
        try:
            with anyio.fail_after(limit):
                auth = P.decode_auth_list(await self.call(Procedure.AUTH_LIST))
                if auth and P.AuthType.NONE not in auth:
                    raise UnsupportedAuthError(
                        [t.name.lower() if isinstance(t, P.AuthType) else str(t) for t in auth]
                    )
                keepalive = await self.supports_feature(P.Feature.PROGRAM_KEEPALIVE)
                await self.call(Procedure.CONNECT_OPEN, P.encode_open(name, flags))
                self._opened = True
                if self._on_lifecycle is not None:
                    await self._register_lifecycle()
        except TimeoutError as exc:
            raise ConnectionLostError(f"libvirt handshake did not complete within {limit:g} s") from exc
        # The daemon pings only clients that asked about keepalive (above); we ping it if it can answer.
        if keepalive and self._keepalive_interval is not None and self._helpers is not None:
            self._helpers.start_soon(self._keepalive_loop, self._keepalive_interval, self._keepalive_count)

    # -- the reader and the keepalive ------------------------------------------------------

    async def _run_background(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as helpers:
                    self._helpers = helpers
                    task_status.started()
                    await self._read_loop()
                    helpers.cancel_scope.cancel()  # the end: no more pings or pongs
        finally:
            self._finish("libvirt connection closed by the client", None)  # if nothing else ended it
            await _close_now(self._stream)

    async def _read_loop(self) -> None:
        cause: BaseException | None = None
        reason = "libvirt connection closed by the client"  # unless the daemon ended it (below)
        try:
            self._last_received = anyio.current_time()
            receive, feed = self._stream.receive, self._codec.receive_data
            eof = False
            while not eof:
                try:
                    data = await receive(_RECEIVE_SIZE)
                except anyio.EndOfStream:
                    data = b""
                except _IO_ERRORS as exc:
                    cause, data = exc, b""
                if data:
                    self._last_received = anyio.current_time()
                feed(data)
                eof = self._dispatch_buffered()
            reason = (
                "the libvirt daemon closed the connection"
                if cause is None
                else f"libvirt connection broken: {_describe(cause)}"
            )
        except ProtocolError as exc:
            cause, reason = exc, f"libvirt connection closed: {exc}"
        except Exception as exc:
            cause, reason = exc, "libvirt connection closed: the on_lifecycle callback raised"
            raise
        finally:
            self._finish(reason, cause)

    def _dispatch_buffered(self) -> bool:
        """Route every complete buffered event; True once the daemon's EOF was reached."""
        next_event = self._codec.next_event
        pending = self._pending
        while True:
            event = next_event()
            kind = type(event)
            if kind is Reply or kind is ErrorReply:
                assert isinstance(event, (Reply, ErrorReply))
                call = pending.pop(event.serial, None)
                # None: the caller was cancelled; its late reply is dropped.
                if call is not None:
                    call.result = event
                    call.done.set()
            elif kind is Message:
                assert isinstance(event, Message)
                self._dispatch_message(event)
            elif kind is KeepalivePing:
                # Sent from its own task: the reader must never wait for the send lock.
                if self._helpers is not None:
                    self._helpers.start_soon(self._send_keepalive, True)
            elif event is NEED_DATA:
                return False
            elif event is CLOSED:
                return True
            # KeepalivePong: its arrival already counted as traffic.

    def _dispatch_message(self, message: Message) -> None:
        if (
            message.program != Program.REMOTE
            or message.procedure != Procedure.DOMAIN_EVENT_CALLBACK_LIFECYCLE
        ):
            return  # an event nobody registered for here (libvirt's client drops those too)
        try:
            event = P.decode_lifecycle_event(message.body)
        except XDRDecodeError as exc:
            raise ProtocolError(f"a lifecycle event does not decode: {exc}", message.body[:512]) from exc
        # on_lifecycle first: a driver updates its state before any subscriber sees the event.
        if self._on_lifecycle is not None:
            self._on_lifecycle(event)
        self._lifecycle.publish(event)

    async def _send_keepalive(self, pong: bool) -> None:
        async with self._send_lock:
            if self._closed or self._send_broken is not None:
                return
            data = self._codec.send_pong() if pong else self._codec.send_ping()
            try:
                await self._send(data)
            except _IO_ERRORS as exc:
                self._send_broken = exc  # the reader sees the end and fails the pending calls

    async def _keepalive_loop(self, interval: float, count: int) -> None:
        # libvirt's rule (virKeepAliveTimer): after `interval` seconds with nothing received, ping;
        # after `count` such pings with still nothing received, the daemon is dead.
        pings = 0
        while True:
            seen = self._last_received
            await anyio.sleep_until(seen + interval * (pings + 1))
            if self._last_received != seen:
                pings = 0
                continue
            if pings >= count:
                waited = anyio.current_time() - seen
                self._end(
                    f"the libvirt daemon sent nothing for {waited:.3g} s and did not answer "
                    f"{count} keepalive ping(s): it is gone or hung",
                    None,
                )
                return
            # From its own task: a call stuck writing to a daemon that stopped reading holds the
            # send lock, and the count must go on regardless.
            if self._helpers is not None:
                self._helpers.start_soon(self._send_keepalive, False)
            pings += 1

    def _finish(self, reason: str, cause: BaseException | None) -> None:
        """End the connection once: fail pending calls, end subscriptions, release wait_closed()."""
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        self._close_cause = cause
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.done.set()  # with no result: the caller raises ConnectionLostError
        self._lifecycle.close()
        self._closed_event.set()

    def _end(self, reason: str, cause: BaseException | None) -> None:
        """End the connection from inside (keepalive, a torn write, a malformed reply)."""
        self._finish(reason, cause)
        self._scope.cancel()  # the background task closes the stream on its way out

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        # A cancellation already pending is raised here, before anything is written, so that it is
        # not mistaken for an interrupted write below.
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            await self._stream.send(data)
        except BaseException:
            # How much went out is unknown: the daemon may hold part of a packet.
            self._torn = True
            raise

    def _lost(self, procedure: int, program: int) -> ConnectionLostError:
        exc = ConnectionLostError(self._close_reason, command=procedure_name(procedure, program))
        exc.__cause__ = self._close_cause if self._closed else self._send_broken
        return exc

    async def _roundtrip(self, procedure: int, body: bytes, program: int) -> Reply | ErrorReply:
        if self._closed or self._send_broken is not None:
            raise self._lost(procedure, program)
        call = _Call()
        async with self._send_lock:
            if self._closed or self._send_broken is not None:
                raise self._lost(procedure, program)  # it ended while we waited for the lock
            serial, data = self._codec.send_call(procedure, body, program=program)
            self._pending[serial] = call
            try:
                await self._send(data)
            except BaseException as exc:
                self._pending.pop(serial, None)
                if isinstance(exc, _IO_ERRORS):
                    if self._closed:  # closed under us (e.g. keepalive gave the daemon up): say why
                        lost = self._lost(procedure, program)
                        raise lost from lost.__cause__
                    # The reader will see the end and fail the pending calls once it has
                    # dispatched everything the daemon sent before it. Nothing is sent meanwhile.
                    self._send_broken = exc
                    raise ConnectionLostError(
                        "libvirt connection lost", command=procedure_name(procedure, program)
                    ) from exc
                if self._torn:
                    self._send_broken = exc
                    self._end("libvirt connection closed: a write was interrupted midway", exc)
                else:
                    self._codec.abandon(serial)  # cancelled before anything was written
                raise
        try:
            await call.done.wait()
        except BaseException:
            self._pending.pop(serial, None)  # its reply, if it comes, is dropped
            raise
        if call.result is None:
            raise self._lost(procedure, program)
        return call.result

    # -- the API ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection has ended (by either side); no call can succeed after it."""
        return self._closed

    async def wait_closed(self) -> None:
        """Return once the connection has ended (every event sent before the end was dispatched)."""
        await self._closed_event.wait()

    async def call(
        self, procedure: int, body: bytes = b"", *, program: int = Program.REMOTE, name: str = ""
    ) -> bytes:
        """Call ``procedure`` with the encoded arguments ``body``; return the reply's payload.

        ``name`` is the domain the call is about (for the error, if it fails). Raises a
        LibvirtError when the daemon reports a failure and ConnectionLostError (``command`` set,
        the cause chained) when the connection ended before the reply. No timeout applies: use
        ``anyio.fail_after``. A cancelled call leaves the client usable and its late reply is
        dropped; whether the daemon carried it out is then unknown.
        """
        result = await self._roundtrip(procedure, body, program)
        if type(result) is ErrorReply:
            raise error_from_remote(result.error, procedure, program, name=name)
        assert isinstance(result, Reply)
        return result.body

    def _decoded(self, decode: Callable[[bytes], T], body: bytes, procedure: int) -> T:
        try:
            return decode(body)
        except XDRDecodeError as exc:
            # The framing is intact but the daemon does not speak the protocol we know: end it.
            what = procedure_name(procedure)
            error = ProtocolError(
                f"libvirt RPC protocol error: the reply to {what} does not decode: {exc}", body[:512]
            )
            self._end(f"libvirt connection closed: {error}", error)
            raise error from exc

    async def _call_dom(self, procedure: Procedure, dom: DomainRef, flags: int | None = None) -> bytes:
        body = P.encode_dom(dom) if flags is None else P.encode_dom_flags(dom, flags)
        return await self.call(procedure, body, name=dom.name)

    async def _void_dom(self, procedure: Procedure, dom: DomainRef, flags: int | None = None) -> None:
        self._decoded(P.decode_void, await self._call_dom(procedure, dom, flags), procedure)

    async def supports_feature(self, feature: int) -> bool:
        body = await self.call(Procedure.CONNECT_SUPPORTS_FEATURE, P.encode_supports_feature(feature))
        return self._decoded(P.decode_int, body, Procedure.CONNECT_SUPPORTS_FEATURE) != 0

    async def get_hostname(self) -> str:
        body = await self.call(Procedure.CONNECT_GET_HOSTNAME)
        return self._decoded(P.decode_string, body, Procedure.CONNECT_GET_HOSTNAME)

    async def get_uri(self) -> str:
        body = await self.call(Procedure.CONNECT_GET_URI)
        return self._decoded(P.decode_string, body, Procedure.CONNECT_GET_URI)

    async def get_lib_version(self) -> int:
        """libvirt's version in the daemon, as major * 1000000 + minor * 1000 + micro."""
        body = await self.call(Procedure.CONNECT_GET_LIB_VERSION)
        return self._decoded(P.decode_uhyper, body, Procedure.CONNECT_GET_LIB_VERSION)

    async def list_all_domains(self, flags: int = 0) -> list[DomainRef]:
        """Every domain (``flags`` 0), or those ``P.ListFlags`` select (ACTIVE, INACTIVE, ...)."""
        body = await self.call(Procedure.CONNECT_LIST_ALL_DOMAINS, P.encode_list_all_domains(flags))
        return self._decoded(P.decode_list_all_domains, body, Procedure.CONNECT_LIST_ALL_DOMAINS)

    async def lookup_by_name(self, name: str) -> DomainRef:
        body = await self.call(Procedure.DOMAIN_LOOKUP_BY_NAME, P.encode_lookup_by_name(name), name=name)
        return self._decoded(P.decode_dom, body, Procedure.DOMAIN_LOOKUP_BY_NAME)

    async def lookup_by_uuid(self, uuid: uuid_mod.UUID) -> DomainRef:
        body = await self.call(Procedure.DOMAIN_LOOKUP_BY_UUID, P.encode_lookup_by_uuid(uuid), name=str(uuid))
        return self._decoded(P.decode_dom, body, Procedure.DOMAIN_LOOKUP_BY_UUID)

    async def lookup_by_id(self, domain_id: int) -> DomainRef:
        body = await self.call(
            Procedure.DOMAIN_LOOKUP_BY_ID, P.encode_lookup_by_id(domain_id), name=f"id {domain_id}"
        )
        return self._decoded(P.decode_dom, body, Procedure.DOMAIN_LOOKUP_BY_ID)

    async def get_info(self, dom: DomainRef) -> DomainInfo:
        body = await self._call_dom(Procedure.DOMAIN_GET_INFO, dom)
        return self._decoded(P.decode_domain_info, body, Procedure.DOMAIN_GET_INFO)

    async def get_state(self, dom: DomainRef) -> tuple[P.DomainState | int, int]:
        """(state, reason): a ``P.DomainState`` and the number of that state's reason enum."""
        body = await self._call_dom(Procedure.DOMAIN_GET_STATE, dom, 0)
        return self._decoded(P.decode_domain_state, body, Procedure.DOMAIN_GET_STATE)

    async def get_xml_desc(self, dom: DomainRef, flags: int = 0) -> str:
        """The domain's XML (``flags``: ``P.DOMAIN_XML_INACTIVE`` for the persistent definition)."""
        body = await self._call_dom(Procedure.DOMAIN_GET_XML_DESC, dom, flags)
        return self._decoded(P.decode_string, body, Procedure.DOMAIN_GET_XML_DESC)

    async def define_xml(self, xml: str, flags: int = 0) -> DomainRef:
        """Define (or redefine) a persistent domain (DOMAIN_DEFINE_XML_FLAGS)."""
        body = await self.call(Procedure.DOMAIN_DEFINE_XML_FLAGS, P.encode_xml_flags(xml, flags))
        return self._decoded(P.decode_dom, body, Procedure.DOMAIN_DEFINE_XML_FLAGS)

    async def create_xml(self, xml: str, flags: int = 0) -> DomainRef:
        """Create and start a transient domain."""
        body = await self.call(Procedure.DOMAIN_CREATE_XML, P.encode_xml_flags(xml, flags))
        return self._decoded(P.decode_dom, body, Procedure.DOMAIN_CREATE_XML)

    async def create(self, dom: DomainRef, flags: int = 0) -> DomainRef:
        """Start a defined domain (DOMAIN_CREATE_WITH_FLAGS); returns it with its new id."""
        body = await self._call_dom(Procedure.DOMAIN_CREATE_WITH_FLAGS, dom, flags)
        return self._decoded(P.decode_dom, body, Procedure.DOMAIN_CREATE_WITH_FLAGS)

    async def shutdown(self, dom: DomainRef, flags: int = 0) -> None:
        """Ask the guest to shut down (DOMAIN_SHUTDOWN_FLAGS); returns once the request was made."""
        await self._void_dom(Procedure.DOMAIN_SHUTDOWN_FLAGS, dom, flags)

    async def destroy(self, dom: DomainRef, flags: int = 0) -> None:
        """Stop the domain (DOMAIN_DESTROY_FLAGS; ``P.DOMAIN_DESTROY_GRACEFUL``: SIGTERM only)."""
        await self._void_dom(Procedure.DOMAIN_DESTROY_FLAGS, dom, flags)

    async def suspend(self, dom: DomainRef) -> None:
        await self._void_dom(Procedure.DOMAIN_SUSPEND, dom)

    async def resume(self, dom: DomainRef) -> None:
        await self._void_dom(Procedure.DOMAIN_RESUME, dom)

    async def reset(self, dom: DomainRef, flags: int = 0) -> None:
        await self._void_dom(Procedure.DOMAIN_RESET, dom, flags)

    async def undefine(self, dom: DomainRef, flags: int = 0) -> None:
        """Remove the persistent definition (DOMAIN_UNDEFINE_FLAGS)."""
        await self._void_dom(Procedure.DOMAIN_UNDEFINE_FLAGS, dom, flags)

    async def get_autostart(self, dom: DomainRef) -> bool:
        body = await self._call_dom(Procedure.DOMAIN_GET_AUTOSTART, dom)
        return self._decoded(P.decode_int, body, Procedure.DOMAIN_GET_AUTOSTART) != 0

    async def set_autostart(self, dom: DomainRef, autostart: bool) -> None:
        body = await self.call(
            Procedure.DOMAIN_SET_AUTOSTART, P.encode_set_autostart(dom, autostart), name=dom.name
        )
        self._decoded(P.decode_void, body, Procedure.DOMAIN_SET_AUTOSTART)

    async def qemu_monitor_command(self, dom: DomainRef, command: str, flags: int = 0) -> str:
        """Pass ``command`` (QMP JSON text) to the domain's QEMU monitor; returns QEMU's reply text.
        Only the QEMU driver serves it (others fail with NO_SUPPORT)."""
        body = await self.call(
            P.QemuProcedure.DOMAIN_MONITOR_COMMAND,
            P.encode_monitor_command(dom, command, flags),
            program=Program.QEMU,
            name=dom.name,
        )
        return self._decoded(P.decode_string, body, P.QemuProcedure.DOMAIN_MONITOR_COMMAND)

    # -- events ----------------------------------------------------------------------------

    async def _register_lifecycle(self) -> None:
        async with self._register_lock:
            if self._lifecycle_callback is None:
                body = await self.call(
                    Procedure.CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
                    P.encode_event_register_any(P.DOMAIN_EVENT_ID_LIFECYCLE),
                )
                callback_id = self._decoded(
                    P.decode_int, body, Procedure.CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY
                )
                self._lifecycle_callback = callback_id

    @asynccontextmanager
    async def subscribe_lifecycle(self, max_buffer: int = 256) -> AsyncIterator[Subscription[LifecycleEvent]]:
        """Receive every lifecycle event of every domain dispatched while the block is open.

        The first subscription registers the connection for lifecycle events (once; it stays
        registered). Each subscription buffers up to ``max_buffer`` events; beyond that events are
        dropped for it alone and its next receive (after the buffered ones) raises
        EventsDroppedError. It ends (``async for`` stops) once the connection has ended and it has
        been drained.
        """
        with self._lifecycle.subscribe(max_buffer) as subscription:
            if not self._closed:
                await self._register_lifecycle()
            yield subscription

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection (CONNECT_CLOSE first, bounded, if it is healthy). Pending calls fail
        with ConnectionLostError. Idempotent."""
        if self._opened and not self._closed and self._send_broken is None:
            self._opened = False
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                with suppress(AiovirtError):  # the connection is going anyway
                    await self.call(Procedure.CONNECT_CLOSE)
        self._finish("libvirt connection closed by the client", None)
        self._scope.cancel()
        if self._helpers is None:  # never opened: nothing in the background will close it
            await _close_now(self._stream)
