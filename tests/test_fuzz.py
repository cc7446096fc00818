"""Fuzzing with hypothesis: whatever comes from outside, aiovirt fails only in the documented ways.

What is fuzzed (the table-driven cases are in test_qmp_codec.py, test_config.py, test_render.py,
test_uris.py and test_crash_safety.py; these are random inputs on top of them):

- the QMP codec (``aiovirt.qmp._codec``): random valid conversations cut into random chunks give
  the same messages; random bytes, QMP-shaped JSON with hostile values, deep nesting, huge
  numbers, over-long lines and floods of events raise ``ProtocolError`` or nothing, never another
  exception, and memory stays bounded by ``max_line``;
- config validation and rendering: any value of any field gives a config or ``ConfigError``;
  every valid config renders to an argv that, parsed back with QEMU's own rules (``,`` separated
  ``key=value`` with ``,,`` escaping, the JSON of ``-blockdev``/``-device``), has exactly the
  options the config implies, each user value exactly in its own field;
- connection URIs (``aiovirt.parse_uri``): a ``ParsedURI`` or ``InvalidURIError``;
- definition records in the state directory, as ``connect()`` reads them: a mutated record is
  either loaded as what it says or set aside and reported, and ``connect()`` always succeeds.

Budget: the default run is deterministic (``derandomize=True``, no example database) and small;
``AIOVIRT_FUZZ_EXAMPLES=N`` runs N random examples per test instead (say 20000, for hours):

    AIOVIRT_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
import tempfile
import tracemalloc
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import aiovirt
from aiovirt import ConfigError, InvalidURIError, ProtocolError
from aiovirt.config import Disk, DomainConfig, Nic, PortForward, parse_config, render_argv
from aiovirt.config._models import SUPERVISION_BREAKING_OPTIONS
from aiovirt.config._render import CACHE_MODES
from aiovirt.qmp._codec import (
    CLOSED,
    NEED_DATA,
    CodecState,
    Event,
    Greeting,
    Message,
    QMPCodec,
    Response,
)
from aiovirt.rpc import _codec as rpc_codec
from aiovirt.rpc import _protocol as rpc_protocol
from aiovirt.rpc._codec import encode_packet
from aiovirt.rpc._xdr import Packer, XDRDecodeError


def _examples_from_env() -> int:
    text = os.environ.get("AIOVIRT_FUZZ_EXAMPLES", "")
    if not text:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"AIOVIRT_FUZZ_EXAMPLES must be a positive integer, not {text!r}")
    return int(text)


LONG_RUN = _examples_from_env()
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def budget(examples: int) -> settings:
    """``examples`` fixed examples in the default run; AIOVIRT_FUZZ_EXAMPLES random ones when set."""
    return settings(
        max_examples=LONG_RUN or examples,
        derandomize=not LONG_RUN,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# -- JSON values --------------------------------------------------------------------------------

json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**200), 2**200)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)


def nested(
    keys: st.SearchStrategy[str], size: int
) -> Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Any]]:
    """What st.recursive extends with: lists and objects (keys from ``keys``) of up to ``size`` items."""

    def extend(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(kids, max_size=size) | st.dictionaries(keys, kids, max_size=size)

    return extend


json_value = st.recursive(json_scalar, nested(st.text(max_size=8), 4), max_leaves=12)
json_object = st.dictionaries(st.text(max_size=8), json_value, max_size=4)


def attempt(call: Callable[[], T], *allowed: type[E]) -> T | E:
    """What ``call`` returns, or the exception it raised if it is one of ``allowed`` (others propagate)."""
    try:
        return call()
    except allowed as exc:
        return exc


def _line(obj: Any, ending: bytes = b"\r\n") -> bytes:
    return json.dumps(obj).encode() + ending


# -- QMP: valid conversations, any chunking -----------------------------------------------------


def _command_ids(n: int) -> tuple[str, list[tuple[str, bool]]]:
    """The id of qmp_capabilities and of ``n`` commands sent together once ready, each with
    whether it went without an id on the wire: found by asking a codec, not assumed."""
    codec = QMPCodec()
    codec.receive_data(_line({"QMP": {"version": {}, "capabilities": []}}))
    assert isinstance(codec.next_event(), Greeting)
    caps_id, _ = codec.send_command("qmp_capabilities")
    codec.receive_data(_line({"return": {}}))
    assert codec.next_event() == Response(caps_id, {})
    sent = [codec.send_command(f"c-{i}") for i in range(n)]
    return caps_id, [(cid, b'"id"' not in data) for cid, data in sent]


@st.composite
def conversations(draw: st.DrawFn) -> tuple[bytes, int, list[Message]]:
    """(the peer's bytes, how many commands the client sends once ready, the messages it must see)."""
    endings = st.sampled_from([b"\n", b"\r\n"])
    blank = st.sampled_from([b"", b"", b"\r\n", b"\n", b"  \n"])
    version = draw(json_object)
    caps = draw(st.lists(st.text(max_size=8), max_size=3))
    n = draw(st.integers(0, 6))
    caps_id, ids = _command_ids(n)
    order = draw(st.permutations(range(n)))
    items: list[tuple[str, Any]] = [("reply", i) for i in order]
    for _ in range(draw(st.integers(0, 8))):
        items.insert(draw(st.integers(0, len(items))), ("event", None))
    out = _line({"QMP": {"version": version, "capabilities": caps}}, draw(endings)) + draw(blank)
    out += _line({"return": {}}, draw(endings))
    expected: list[Message] = [Greeting(version, tuple(caps)), Response(caps_id, {})]
    for kind, i in items:
        if kind == "event":
            name = draw(st.text(min_size=1, max_size=12))
            data = draw(json_object)
            seconds, micros = draw(st.integers(0, 2**40)), draw(st.integers(0, 999_999))
            msg: dict[str, Any] = {"event": name, "timestamp": {"seconds": seconds, "microseconds": micros}}
            keep_empty = draw(st.booleans())
            if data or keep_empty:
                msg["data"] = data
            expected.append(Event(name, data, float(seconds + micros / 1e6)))
        else:
            cid, anonymous = ids[i]
            if draw(st.booleans()):
                value = draw(json_value)
                msg = {"return": value}
                expected.append(Response(cid, value))
            else:
                cls, desc = draw(st.text(max_size=10)), draw(st.text(max_size=20))
                msg = {"error": {"class": cls, "desc": desc}}
                expected.append(Response(cid, None, cls, desc))
            if not anonymous:
                msg["id"] = cid
        keys = draw(st.permutations(list(msg)))
        out += _line({k: msg[k] for k in keys}, draw(endings)) + draw(blank)
    return out, n, expected


def _client(codec: QMPCodec, commands: int, msg: Message, seen: int) -> None:
    """React as aiovirt's client does: negotiate on the greeting, send the commands once ready."""
    if isinstance(msg, Greeting) and codec.state is CodecState.NEGOTIATING:
        codec.send_command("qmp_capabilities")
    elif isinstance(msg, Response) and seen == 2 and codec.state is CodecState.READY:
        for i in range(commands):
            codec.send_command(f"c-{i}")


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, *cuts, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@budget(300)
@given(conversations(), st.data())
def test_any_valid_conversation_in_any_chunks(
    conv: tuple[bytes, int, list[Message]], data: st.DataObject
) -> None:
    stream, commands, expected = conv
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    codec = QMPCodec()
    got: list[Message] = []
    for chunk in _chunks(stream, cuts):
        codec.receive_data(chunk)
        while (msg := codec.next_event()) is not NEED_DATA:
            assert msg is not CLOSED
            got.append(msg)
            _client(codec, commands, msg, len(got))
    codec.receive_data(b"")
    assert codec.next_event() is CLOSED
    assert got == expected
    assert codec.pending_ids == frozenset()


# -- QMP: anything else raises ProtocolError, and only that ---------------------------------------

GREETING = _line(
    {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": ["oob"]}}
)
FRAGMENTS = [
    b"{", b"}", b"[", b"]", b":", b",", b'"', b"\n", b"\r\n", b" ", b"\\", b"\x00", b"\xff", b"\xc3",
    b"\xed\xa0\x80", b'"\\ud800"', b'"return"', b'"error"', b'"event"', b'"QMP"', b'"id"', b'"c1"',
    b'"timestamp"', b'"seconds"', b'"microseconds"', b'"data"', b'"class"', b'"desc"', b"null",
    b"true", b"1", b"-0", b"1e999", b"-1e999", b"NaN", b"Infinity", b"9" * 5000, b"[" * 3000,
    b'{"return": {}}\n', b'{"return": {}, "id": "c1"}\n', b'{"event": "X", "timestamp": {"seconds": 1, '
    b'"microseconds": 2}}\n', GREETING,
]  # fmt: skip
qmp_keys = st.sampled_from(
    ["QMP", "return", "error", "event", "timestamp", "data", "id", "class", "desc", "seconds",
     "microseconds", "version", "capabilities"]
) | st.text(max_size=4)  # fmt: skip
hostile_scalar = json_scalar | st.sampled_from(
    [1e308, -1e308, float("inf"), 10**300, -(2**63), 2**64, "c1", ""]
)
qmp_shaped = st.recursive(hostile_scalar, nested(qmp_keys, 4), max_leaves=10)


def _check_message(msg: Message) -> None:
    """A message the codec returns is well-typed, whatever the peer sent."""
    if isinstance(msg, Greeting):
        assert type(msg.version) is dict and all(type(c) is str for c in msg.capabilities)
    elif isinstance(msg, Response):
        assert msg.id is None or type(msg.id) is str
        assert msg.ok == (msg.error_class is None)
        if not msg.ok:
            assert type(msg.error_class) is str and type(msg.error_desc) is str
    else:
        assert isinstance(msg, Event)
        assert type(msg.name) is str and type(msg.data) is dict and type(msg.timestamp) is float


def _feed_hostile(codec: QMPCodec, chunks: list[bytes]) -> ProtocolError | None:
    """Feed ``chunks`` then EOF as a client would; return the ProtocolError, if one was raised.

    Fails on any other exception, on a second, different ProtocolError, and on any message or
    sentinel after the first ProtocolError (the codec stays broken)."""
    error: ProtocolError | None = None
    seen = 0

    def drain() -> None:
        nonlocal error, seen
        while True:
            msg = attempt(codec.next_event, ProtocolError)
            if isinstance(msg, ProtocolError):
                assert error is None or msg is error, (error, msg)
                error = msg
                assert codec.state is CodecState.ERROR
                assert isinstance(msg.data, bytes) and len(msg.data) <= 512  # the offending bytes, truncated
                return
            assert error is None, f"{msg!r} after {error!r}"
            if msg is NEED_DATA or msg is CLOSED:
                return
            seen += 1
            _check_message(msg)
            if isinstance(msg, Greeting) and codec.state is CodecState.NEGOTIATING:
                codec.send_command("qmp_capabilities")
            elif codec.state is CodecState.READY and not codec.pending_ids:
                codec.send_command("query-status")  # something for replies to answer
                codec.send_command("query-status")

    for chunk in chunks:
        codec.receive_data(chunk)
        drain()
    codec.receive_data(b"")
    drain()
    drain()  # once more: the error (or CLOSED) stays
    return error


@budget(400)
@given(
    st.sampled_from([b"", GREETING, GREETING + b'{"return": {}}\r\n']),
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map(b"".join) | st.binary(max_size=300),
    st.data(),
)
def test_garbage_raises_protocol_error_only(prefix: bytes, junk: bytes, data: st.DataObject) -> None:
    stream = prefix + junk
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    _feed_hostile(QMPCodec(), _chunks(stream, cuts))


@budget(400)
@given(st.lists(qmp_shaped, min_size=1, max_size=6), st.booleans())
def test_qmp_shaped_json_raises_protocol_error_only(messages: list[Any], greet: bool) -> None:
    lines = b"".join(_line(m) for m in messages)
    _feed_hostile(QMPCodec(), [GREETING + lines if greet else lines])


@budget(60)
@given(st.integers(1, 200_000), st.sampled_from(["return", "data", "line"]))
def test_deep_nesting(depth: int, where: str) -> None:
    nested = b"[" * depth + b"]" * depth
    line = {
        "return": b'{"return": ' + nested + b"}",
        "data": b'{"event": "X", "timestamp": {"seconds": 1, "microseconds": 0}, "data": {"a": '
        + nested
        + b"}}",
        "line": nested,
    }[where]
    codec = QMPCodec(max_line=1 << 20)
    codec.receive_data(GREETING + line + b"\n")
    assert isinstance(codec.next_event(), Greeting)
    try:
        msg = codec.next_event()
    except ProtocolError:
        return  # too deep for the JSON decoder (a RecursionError inside), or not a message at all
    assert where != "line"
    value = msg.result if isinstance(msg, Response) else msg.data["a"]  # type: ignore[union-attr]
    for _ in range(depth - 1):
        (value,) = value
    assert value == []


@budget(80)
@given(
    st.integers(1, 12_000),
    st.sampled_from(["return", "seconds", "microseconds", "exponent"]),
    st.booleans(),
)
def test_huge_numbers(digits: int, where: str, negative: bool) -> None:
    number = (b"-" if negative else b"") + b"7" * digits
    if where == "exponent":
        number = b"1e" + number
    line = (
        b'{"return": ' + number + b"}"
        if where in ("return", "exponent")
        else b'{"event": "X", "timestamp": {"seconds": '
        + (number if where == "seconds" else b"1")
        + b', "microseconds": '
        + (number if where == "microseconds" else b"0")
        + b"}}"
    )
    codec = QMPCodec()
    codec.receive_data(GREETING + line + b"\n")
    assert isinstance(codec.next_event(), Greeting)
    try:
        msg = codec.next_event()
    except ProtocolError:
        return  # more digits than Python converts (4300), or a timestamp beyond a float
    _check_message(msg)  # type: ignore[arg-type]
    if where == "return":
        assert isinstance(msg, Response) and msg.result == int(number)


@budget(200)
@given(
    st.integers(len(GREETING), 5000),
    st.integers(0, 10_000),
    st.lists(st.integers(1, 4096), min_size=1, max_size=50),
)
def test_line_limit_is_exact_whatever_the_chunks(max_line: int, length: int, sizes: list[int]) -> None:
    """A line of ``length`` bytes: an event if it fits ``max_line``, else ProtocolError, raised as
    soon as more than ``max_line`` bytes without a newline are buffered."""
    head = b'{"event": "X", "timestamp": {"seconds": 1, "microseconds": 2}'
    length = max(length, len(head) + 1)
    line = head + b" " * (length - len(head) - 1) + b"}"
    codec = QMPCodec(max_line=max_line)
    codec.receive_data(GREETING)
    assert isinstance(codec.next_event(), Greeting)
    stream, fed = line + b"\n", 0
    while fed < len(stream):
        size = sizes[fed % len(sizes)]
        chunk = stream[fed : fed + size]
        fed += len(chunk)
        codec.receive_data(chunk)
        buffered_without_newline = min(fed, len(line))
        if length > max_line and (buffered_without_newline > max_line or fed > len(line)):
            with pytest.raises(ProtocolError, match="longer than"):
                codec.next_event()
            return
        msg = codec.next_event()
        if fed > len(line):
            assert msg == Event("X", {}, 1.000002)
            return
        assert msg is NEED_DATA
    raise AssertionError("the line was never complete")


@budget(40)
@given(st.integers(1, 3000), st.data())
def test_flood_of_events_in_one_chunk(n: int, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, n))
    events = [_line({"event": f"E{i}", "timestamp": {"seconds": i, "microseconds": 0}}) for i in range(n)]
    codec = QMPCodec()
    codec.receive_data(GREETING)
    assert isinstance(codec.next_event(), Greeting)
    caps_id, _ = codec.send_command("qmp_capabilities")
    codec.receive_data(b"".join(events[:at]) + b'{"return": {}}\r\n' + b"".join(events[at:]))
    got = []
    while (msg := codec.next_event()) is not NEED_DATA:
        got.append(msg)
    names = [m.name for m in got if isinstance(m, Event)]
    assert names == [f"E{i}" for i in range(n)]
    assert got[at] == Response(caps_id, {})


def _peak_while(work: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_endless_line_keeps_memory_bounded() -> None:
    """64 MiB without a newline into a codec with a 1 MiB limit, as a client reading 64 KiB at a time."""
    chunk = b"x" * 65536

    def work() -> None:
        codec = QMPCodec(max_line=1 << 20)
        codec.receive_data(GREETING)
        assert isinstance(codec.next_event(), Greeting)
        failed_at = None
        for i in range(1024):
            codec.receive_data(chunk)  # ignored once the codec failed
            if failed_at is None:
                try:
                    assert codec.next_event() is NEED_DATA
                except ProtocolError:
                    failed_at = i
        assert failed_at == 16  # 17 chunks: the first time more than 1 MiB was buffered

    assert _peak_while(work) < 4 << 20


def test_endless_flood_of_events_keeps_memory_bounded() -> None:
    """100,000 events (about 8 MiB) read 64 KiB at a time and dropped: the codec keeps none of them."""
    events = b"".join(
        _line({"event": "BLOCK_IO_ERROR", "timestamp": {"seconds": i, "microseconds": 0}, "data": {"n": i}})
        for i in range(100_000)
    )

    def work() -> None:
        codec = QMPCodec()
        codec.receive_data(GREETING)
        assert isinstance(codec.next_event(), Greeting)
        count = 0
        for at in range(0, len(events), 65536):
            codec.receive_data(events[at : at + 65536])
            while (msg := codec.next_event()) is not NEED_DATA:
                assert isinstance(msg, Event)
                count += 1
        assert count == 100_000

    assert len(events) > 6 << 20
    assert _peak_while(work) < 2 << 20


# -- libvirt RPC: packets from a daemon ------------------------------------------------------------

_RPC_PROGRAMS = [rpc_protocol.Program.REMOTE, rpc_protocol.Program.QEMU]


def _xdr_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", len(data)) + data + bytes(-len(data) % 4)


_XDR_TOKENS = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda v: struct.pack(">I", v)),
    st.sampled_from([0, 1, 2, 3, 4, 16, 0xFFFFFFFF, 0x7FFFFFFF, 4 << 20]).map(lambda v: struct.pack(">I", v)),
    st.binary(max_size=12),
    st.text(max_size=6).map(_xdr_string),
    st.just(b"\xff\xfe\x00\x00"),
    st.just(bytes(16)),
)
xdr_bodies = st.lists(_XDR_TOKENS, max_size=12).map(b"".join)


def _remote_error_body(draw: st.DrawFn) -> bytes:
    # libvirt's strings are UTF-8 with no NUL (a lone surrogate has no UTF-8)
    text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
    packer = Packer()
    rpc_protocol.RemoteError(
        code=draw(st.integers(-(2**31), 2**31 - 1)),
        domain=draw(st.integers(0, 100)),
        message=draw(st.none() | text),
        level=draw(st.integers(0, 2)),
        str1=draw(st.none() | text),
    ).pack(packer)
    return packer.getvalue()


@st.composite
def rpc_conversations(draw: st.DrawFn) -> tuple[list[tuple[int, int]], bytes, list[Any]]:
    """(calls to send, the daemon's bytes, the events the client must see)."""
    calls: list[tuple[int, int]] = [
        (draw(st.sampled_from(_RPC_PROGRAMS)), draw(st.integers(1, 400)))
        for _ in range(draw(st.integers(0, 6)))
    ]
    items: list[tuple[str, int]] = [("reply", i) for i in draw(st.permutations(range(len(calls))))]
    for _ in range(draw(st.integers(0, 6))):
        items.insert(
            draw(st.integers(0, len(items))), (draw(st.sampled_from(["message", "ping", "pong"])), 0)
        )
    stream, expected = b"", list[Any]()
    MT, MS, P = rpc_protocol.MessageType, rpc_protocol.MessageStatus, rpc_protocol.Program
    for kind, i in items:
        if kind == "reply":
            program, procedure = calls[i]
            if draw(st.booleans()):
                body = draw(xdr_bodies)
                stream += encode_packet(program, procedure, MT.REPLY, i, MS.OK, body)
                expected.append(rpc_codec.Reply(i, procedure, body, program))
            else:
                body = _remote_error_body(draw)
                stream += encode_packet(program, procedure, MT.REPLY, i, MS.ERROR, body)
                expected.append(
                    rpc_codec.ErrorReply(i, procedure, rpc_protocol.decode_remote_error(body), program)
                )
        elif kind == "message":
            program, procedure, body = (
                draw(st.sampled_from(_RPC_PROGRAMS)),
                draw(st.integers(0, 400)),
                draw(xdr_bodies),
            )
            stream += encode_packet(
                program, procedure, MT.MESSAGE, draw(st.integers(0, 2**32 - 1)), MS.OK, body
            )
            expected.append(rpc_codec.Message(procedure, body, program))
        else:
            procedure = (
                rpc_protocol.KeepaliveProcedure.PING
                if kind == "ping"
                else rpc_protocol.KeepaliveProcedure.PONG
            )
            stream += encode_packet(P.KEEPALIVE, procedure, MT.MESSAGE, 0)
            expected.append(rpc_codec.KeepalivePing() if kind == "ping" else rpc_codec.KeepalivePong())
    return calls, stream, expected


@budget(300)
@given(rpc_conversations(), st.data())
def test_rpc_any_valid_stream_in_any_chunks(
    conv: tuple[list[tuple[int, int]], bytes, list[Any]], data: st.DataObject
) -> None:
    calls, stream, expected = conv
    codec = rpc_codec.RPCCodec()
    assert [codec.send_call(procedure, program=program)[0] for program, procedure in calls] == list(
        range(len(calls))
    )
    got = []
    for chunk in _chunks(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=20))):
        codec.receive_data(chunk)
        while (event := codec.next_event()) is not rpc_codec.NEED_DATA:
            got.append(event)
    codec.receive_data(b"")
    assert codec.next_event() is rpc_codec.CLOSED
    assert got == expected
    assert codec.pending_serials == frozenset()


@st.composite
def hostile_rpc_streams(draw: st.DrawFn) -> bytes:
    MT, MS = rpc_protocol.MessageType, rpc_protocol.MessageStatus
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.sampled_from(["valid", "valid", "packet", "packet", "length", "junk"]))
        if how == "valid":  # a reply to one of the calls 0-2 (procedures 1-3), an event, a ping
            serial = draw(st.integers(0, 2))
            out += draw(
                st.sampled_from(
                    [
                        encode_packet(rpc_protocol.Program.REMOTE, serial + 1, MT.REPLY, serial, MS.OK),
                        encode_packet(rpc_protocol.Program.REMOTE, 7, MT.MESSAGE, 1, MS.OK, b"\0" * 8),
                        encode_packet(rpc_protocol.Program.KEEPALIVE, 1, MT.MESSAGE, 0),
                    ]
                )
            )
        elif how == "junk":
            out += draw(st.binary(max_size=40))
        elif how == "length":
            out += struct.pack(
                ">I",
                draw(
                    st.sampled_from(
                        [0, 1, 27, 28, 29, rpc_protocol.PACKET_MAX, rpc_protocol.PACKET_MAX + 1, 2**32 - 1]
                    )
                ),
            )
        else:
            program = draw(
                st.sampled_from([*_RPC_PROGRAMS, rpc_protocol.Program.KEEPALIVE]) | st.integers(0, 2**32 - 1)
            )
            out += encode_packet(
                program,
                draw(st.integers(0, 3) | st.integers(-(2**31), 2**31 - 1)),
                draw(st.sampled_from(list(MT)) | st.integers(-(2**31), 2**31 - 1)),
                draw(st.integers(0, 4) | st.integers(0, 2**32 - 1)),
                draw(st.sampled_from(list(MS)) | st.integers(-(2**31), 2**31 - 1)),
                draw(xdr_bodies),
                version=draw(st.sampled_from([1, 1, 0, 2])),
            )
    return out


@budget(400)
@given(hostile_rpc_streams(), st.data())
def test_rpc_garbage_raises_protocol_error_only(stream: bytes, data: st.DataObject) -> None:
    codec = rpc_codec.RPCCodec()
    for procedure in range(1, 4):  # pending serials 0, 1, 2 for replies to match, or not
        codec.send_call(procedure)
    error: ProtocolError | None = None
    chunks = _chunks(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    for chunk in [*chunks, b""]:
        codec.receive_data(chunk)
        while True:
            event = attempt(codec.next_event, ProtocolError)
            if isinstance(event, ProtocolError):
                assert error is None or event is error
                error = event
                assert codec.state is rpc_codec.CodecState.ERROR and len(event.data) <= 512
                break
            assert error is None, f"{event!r} after {error!r}"
            if event is rpc_codec.NEED_DATA or event is rpc_codec.CLOSED:
                break
            assert isinstance(event, (rpc_codec.Reply, rpc_codec.ErrorReply, rpc_codec.Message,
                                      rpc_codec.KeepalivePing, rpc_codec.KeepalivePong))  # fmt: skip


_DECODERS = [
    rpc_protocol.decode_void, rpc_protocol.decode_int, rpc_protocol.decode_uhyper, rpc_protocol.decode_string,
    rpc_protocol.decode_dom, rpc_protocol.decode_auth_list, rpc_protocol.decode_list_all_domains,
    rpc_protocol.decode_domain_info, rpc_protocol.decode_domain_state, rpc_protocol.decode_lifecycle_event,
    rpc_protocol.decode_remote_error,
]  # fmt: skip


@budget(400)
@given(st.sampled_from(_DECODERS), xdr_bodies | st.binary(max_size=100))
def test_rpc_payloads_decode_or_raise_xdr_errors_only(decode: Callable[[bytes], Any], body: bytes) -> None:
    """Each reply and event payload a daemon sends: its value, or XDRDecodeError (which the client
    turns into a ProtocolError), never another exception."""
    attempt(lambda: decode(body), XDRDecodeError)


# -- config: any value gives a config or ConfigError ----------------------------------------------

anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=6)
    | st.sampled_from(["\ud800", "\x00", "/a\nb", "", " ", "-1", "1e3", "pc", "virtio", "qcow2"]),
    nested(st.text(max_size=6), 3),
    max_leaves=6,
)
hostile_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00\n\r"), max_size=20
) | st.lists(
    st.sampled_from([",", ",,", "=", "a,snapshot=on", '{"driver":"x"}', '"', "'", "\\", " -device x",
                     "-S", "\t", "id=x", "\u2028", "\ufeff", "é", " ", "}", "{", "$(x)", ";", "\\u0000"]),
    max_size=6,
).map("".join)  # fmt: skip
abs_path = hostile_text.map(lambda t: "/" + t)
forward_kw = st.fixed_dictionaries(
    {},
    optional={
        "protocol": st.sampled_from(["tcp", "udp"]) | anything,
        "host_addr": st.ip_addresses(v=4).map(str) | anything,
        "host_port": st.integers(0, 70000) | anything,
        "guest_port": st.integers(0, 70000) | anything,
    },
)
disk_kw = st.fixed_dictionaries(
    {"path": abs_path | anything},
    optional={
        "format": st.sampled_from(["raw", "qcow2"]) | anything,
        "bus": st.sampled_from(["virtio", "ide"]) | anything,
        "cache": st.sampled_from(sorted(CACHE_MODES)) | anything,
        "readonly": st.booleans() | anything,
    },
)
nic_kw = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["virtio", "e1000"]) | anything,
        "mac": st.sampled_from(["52:54:00:12:34:56", "01:00:00:00:00:00", "00:00:00:00:00:00"]) | anything,
        "forwards": st.lists(forward_kw, max_size=3) | anything,
    },
)
config_kw = st.fixed_dictionaries(
    {"name": st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True) | anything},
    optional={
        "uuid": st.uuids().map(str) | anything,
        "memory_mib": st.integers(-1, 1 << 23) | anything,
        "vcpus": st.integers(-1, 300) | anything,
        "machine": st.sampled_from(["pc", "q35", "microvm", "none"]) | anything,
        "accel": st.sampled_from(["tcg", "kvm", "auto"]) | anything,
        "kernel": abs_path | anything,
        "initrd": abs_path | anything,
        "cmdline": hostile_text | anything,
        "disks": st.lists(disk_kw, max_size=3) | anything,
        "nics": st.lists(nic_kw, max_size=2) | anything,
        "console": st.booleans() | anything,
        "emulator": st.sampled_from(["qemu-system-x86_64", "/usr/bin/qemu", "rel/qemu"]) | anything,
        "extra_args": st.lists(hostile_text, max_size=2) | anything,
        "unknown": anything,
    },
)


def _valid_or_config_error(make: Callable[[], Any]) -> Any:
    result = attempt(make, ConfigError)
    if isinstance(result, ConfigError):
        assert result.errors and all(isinstance(loc, str) and msg for loc, msg in result.errors), (
            result.errors
        )
        return None
    return result


@budget(400)
@given(config_kw)
def test_any_config_input_is_a_config_or_config_error(kw: dict[str, Any]) -> None:
    for make in (
        lambda: DomainConfig(**kw),
        lambda: DomainConfig.parse(kw),
        lambda: DomainConfig.parse(json.dumps(kw, default=repr)),
    ):
        cfg = _valid_or_config_error(make)
        if cfg is not None:
            assert DomainConfig.parse(cfg.model_dump(mode="json")) == cfg
            render_argv(
                cfg.model_copy(update={"uuid": cfg.uuid or uuid.uuid4()}), monitor_fd=3, console_path=None
            )


@budget(200)
@given(st.sampled_from([Disk, Nic, PortForward]), st.dictionaries(st.text(max_size=10), anything, max_size=5))
def test_any_sub_model_input_is_a_model_or_config_error(model: type[Any], kw: dict[str, Any]) -> None:
    _valid_or_config_error(lambda: model(**kw))
    _valid_or_config_error(lambda: model.parse(kw))


@budget(100)
@given(st.binary(max_size=200) | st.text(max_size=200) | anything)
def test_any_document_is_a_config_or_config_error(doc: Any) -> None:
    _valid_or_config_error(lambda: DomainConfig.parse(doc))


_XML_TRICKS = [
    '<?xml version="1.0"?>', '<?xml version="1.0" encoding="latin-1"?>',
    '<!DOCTYPE domain [<!ENTITY a "aaaa">]>',
    '<!DOCTYPE d [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>', '<!ENTITY x SYSTEM "file:///etc/passwd">',
    "&x;", "&a;&a;&a;", "&#0;", "&#xD800;", "<![CDATA[<name>]]>", "<?pi x?>", "<!-- c -->", "<domain>",
    "</domain>", "<domain type='kvm'>", "<name>vm</name>", "<memory>1</memory>",
    "<memory unit='TiB'>9999</memory>",
    "<devices>", "</devices>", "<disk type='file'><source file='/a,b'/><target dev='vda'/></disk>",
    "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-S'/>",
    "<x:domain xmlns:x='urn:x'>", "<" * 50, "<a>" * 2000, "\x00", "\ufeff", "\ud800", "name = 'vm'\n",
    'memory_mib = 1\n', "[[disks]]\n", "{", '{"name": "vm", "memory_mib": 1}', '{"name": "vm", "name": "x"}',
    "1e999", "[", "]", '"""', "\n",
]  # fmt: skip


_VALID_FILES = {
    "json": '{"name": "vm", "memory_mib": 64}',
    "toml": 'name = "vm"\nmemory_mib = 64\n',
    "xml": "<domain type='qemu'><name>vm</name><memory unit='MiB'>64</memory></domain>",
}


@st.composite
def config_files(draw: st.DrawFn) -> tuple[Any, str | bytes]:
    """(format, contents): hostile text, random bytes, or a valid file with hostile text around it."""
    fmt = draw(st.sampled_from(sorted(_VALID_FILES)))
    noise = st.lists(st.sampled_from(_XML_TRICKS) | st.text(max_size=8), max_size=6).map("".join)
    how = draw(st.sampled_from(["noise", "bytes", "wrapped"]))
    if how == "noise":
        return fmt, draw(noise)
    if how == "bytes":
        return fmt, draw(st.binary(max_size=200))
    text = draw(noise) + _VALID_FILES[fmt] + draw(noise)
    return fmt, text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16"])), "surrogatepass")


@budget(300)
@given(config_files())
def test_any_config_file_is_a_config_or_config_error(file: tuple[Any, str | bytes]) -> None:
    """``parse_config`` (what ``load_config`` reads a file with) in each format, on hostile text:
    DTDs and entities (expansion bombs, external files), bad encodings, nesting, duplicate keys."""
    fmt, data = file
    result = attempt(lambda: parse_config(data, fmt, source="vm.cfg"), ConfigError)
    if isinstance(result, ConfigError):
        assert str(result).startswith("vm.cfg: ") and result.errors
    else:
        assert isinstance(result.config, DomainConfig) and result.config.name == "vm"


# -- rendering: parsed back with QEMU's rules, every value is where it belongs --------------------

#: How many values each option the renderer uses takes (QEMU takes the next argv entry as the value,
#: whatever it starts with).
ARITY = {
    "-name": 1, "-uuid": 1, "-machine": 1, "-accel": 1, "-cpu": 1, "-m": 1, "-smp": 1, "-nodefaults": 0,
    "-no-user-config": 0, "-display": 1, "-audiodev": 1, "-S": 0, "-chardev": 1, "-mon": 1, "-serial": 1,
    "-kernel": 1, "-initrd": 1, "-append": 1, "-blockdev": 1, "-device": 1, "-netdev": 1,
}  # fmt: skip


def qemu_opts_split(text: str) -> list[str]:
    """QEMU's option syntax: parts separated by ``,``, where ``,,`` is a literal comma."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text.startswith(",,", i):
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    return [*parts, current]


def qemu_json(text: str) -> dict[str, Any]:
    """A JSON option value as QEMU reads it: one object, no duplicate keys."""
    assert text.startswith("{"), text

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys in {text}"
        return dict(pairs)

    value = json.loads(text, object_pairs_hook=no_duplicates)
    assert isinstance(value, dict)
    return value


def parse_argv(argv: list[str], extra: int) -> list[tuple[str, str | None]]:
    """``(option, value)`` pairs of ``argv[1:]`` before the ``extra`` extra_args, by QEMU's arity."""
    body = argv[1 : len(argv) - extra]
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(body):
        flag = body[i]
        assert flag in ARITY, f"{flag!r} at position {i + 1} is not an option the renderer uses: {argv}"
        if ARITY[flag]:
            assert i + 1 < len(body), f"{flag} has no value"
            out.append((flag, body[i + 1]))
            i += 2
        else:
            out.append((flag, None))
            i += 1
    return out


def expected_options(cfg: DomainConfig, console: bool, paused: bool) -> list[str]:
    system = cfg.machine != "none"
    flags = ["-name", "-uuid", "-machine", *(["-accel"] * (2 if cfg.accel == "auto" else 1))]
    flags += [*(["-cpu"] if system else []), "-m", "-smp", "-nodefaults", "-no-user-config", "-display"]
    flags += [*(["-audiodev"] if system else []), *(["-S"] if paused else []), "-chardev", "-mon"]
    flags += ["-chardev", "-serial"] if console else []
    flags += [
        f
        for f, v in (("-kernel", cfg.kernel), ("-initrd", cfg.initrd), ("-append", cfg.cmdline))
        if v is not None
    ]
    flags += ["-blockdev", "-blockdev", "-device"] * len(cfg.disks)
    flags += ["-netdev", "-device"] * len(cfg.nics)
    return flags


def check_rendered(
    cfg: DomainConfig, argv: list[str], monitor_fd: int, console_path: str | None, paused: bool
) -> None:
    console = console_path is not None and cfg.console
    assert argv[0] == cfg.emulator
    assert argv[len(argv) - len(cfg.extra_args) :] == list(cfg.extra_args)
    options = parse_argv(argv, len(cfg.extra_args))
    assert [flag for flag, _ in options] == expected_options(cfg, console, paused)
    values: dict[str, list[str]] = {}
    for flag, value in options:
        if value is not None:
            values.setdefault(flag, []).append(value)
    assert [qemu_opts_split(v) for v in values["-name"]] == [[f"guest={cfg.name}"]]
    assert values["-uuid"] == [str(cfg.uuid)]
    assert values["-machine"] == [cfg.machine]
    assert values["-accel"] == (["kvm", "tcg"] if cfg.accel == "auto" else [cfg.accel])
    assert values["-m"] == [str(cfg.memory_mib)] and values["-smp"] == [str(cfg.vcpus)]
    chardevs = [qemu_opts_split(v) for v in values["-chardev"]]
    assert chardevs[0] == ["socket", "id=monitor", f"fd={monitor_fd}", "server=on", "wait=on"]
    assert values["-mon"] == ["chardev=monitor,mode=control"]
    if console:
        assert chardevs[1] == ["file", "id=console0", f"path={console_path}"]
        assert values["-serial"] == ["chardev:console0"]
    for flag, field in (("-kernel", cfg.kernel), ("-initrd", cfg.initrd), ("-append", cfg.cmdline)):
        assert values.get(flag, []) == ([] if field is None else [str(field)])
    blockdevs = [qemu_json(v) for v in values.get("-blockdev", [])]
    devices = [qemu_json(v) for v in values.get("-device", [])]
    assert len(devices) == len(cfg.disks) + len(cfg.nics)
    for i, disk in enumerate(cfg.disks):
        direct, no_flush, write_cache = CACHE_MODES[disk.cache]
        cache = {"direct": direct, "no-flush": no_flush}
        file_node, format_node = blockdevs[2 * i], blockdevs[2 * i + 1]
        assert file_node == {
            "driver": "file", "filename": str(disk.path), "node-name": f"disk{i}-file",
            "read-only": disk.readonly, "cache": cache,
        }  # fmt: skip
        assert format_node == {
            "driver": disk.format, "file": f"disk{i}-file", "node-name": f"disk{i}-format",
            "read-only": disk.readonly, "cache": cache,
        }  # fmt: skip
        device = devices[i]
        assert device.keys() == {"driver", "id", "drive", "write-cache"} | (
            {"bus", "unit"} if disk.bus == "ide" else set()
        )
        assert (device["id"], device["drive"]) == (f"disk{i}", f"disk{i}-format")
        assert device["write-cache"] == ("on" if write_cache else "off")
    for i, nic in enumerate(cfg.nics):
        netdev = qemu_opts_split(values["-netdev"][i])
        forwards = [f"hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}" for f in nic.forwards]
        assert netdev == ["user", f"id=net{i}", *forwards]
        device = devices[len(cfg.disks) + i]
        assert device.keys() == {"driver", "id", "netdev"} | ({"mac"} if nic.mac else set())
        assert (device["id"], device["netdev"], device.get("mac")) == (f"nic{i}", f"net{i}", nic.mac)


def _breaks_supervision(arg: str) -> bool:
    return arg.startswith("-") and arg.lstrip("-") in SUPERVISION_BREAKING_OPTIONS


extra_arg = (hostile_text | st.sampled_from(["-device", "{}", "-smp", "--", "-"])).filter(
    lambda a: not _breaks_supervision(a)
)


@budget(100)
@given(
    st.lists(extra_arg, max_size=3),
    st.sampled_from(sorted(SUPERVISION_BREAKING_OPTIONS)),
    st.sampled_from(["-", "--"]),
    st.data(),
)
def test_extra_args_that_break_supervision_are_refused(
    args: list[str], option: str, dashes: str, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(args)))
    args.insert(at, dashes + option)
    error = attempt(lambda: DomainConfig(name="x", memory_mib=1, extra_args=args), ConfigError)
    assert isinstance(error, ConfigError)
    assert [loc for loc, _msg in error.errors] == [f"extra_args.{at}"]


@st.composite
def valid_configs(draw: st.DrawFn) -> DomainConfig:
    machine = draw(st.sampled_from(["pc", "q35", "microvm", "none"]))
    system = machine != "none"
    kw: dict[str, Any] = {
        "name": draw(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)),
        "uuid": draw(st.uuids()),
        "memory_mib": draw(st.integers(1, 1 << 22)),
        "vcpus": draw(st.integers(1, 255)) if system else 1,
        "machine": machine,
        "accel": draw(st.sampled_from(["tcg", "kvm", "auto"])),
        "console": draw(st.booleans()),
        "emulator": draw(st.sampled_from(["qemu-system-x86_64"]) | abs_path),
        "extra_args": draw(st.lists(extra_arg, max_size=3)),
    }
    if system and draw(st.booleans()):
        kw["kernel"] = draw(abs_path)
        kw["initrd"] = draw(st.none() | abs_path)
        kw["cmdline"] = draw(st.none() | hostile_text)
    if system:
        buses = ["virtio", "ide"] if machine in ("pc", "q35") else ["virtio"]
        disks = []
        for _ in range(draw(st.integers(0, 4))):
            bus = draw(st.sampled_from(buses))
            disks.append(
                Disk(
                    path=draw(abs_path),
                    format=draw(st.sampled_from(["raw", "qcow2"])),
                    bus=bus,
                    cache=draw(st.sampled_from(sorted(CACHE_MODES))),
                    readonly=bus == "virtio" and draw(st.booleans()),
                )
            )
        kw["disks"] = disks
        nics = []
        for i in range(draw(st.integers(0, 2))):
            forwards = [
                PortForward(
                    protocol=draw(st.sampled_from(["tcp", "udp"])),
                    host_addr=IPv4Address(draw(st.sampled_from(["127.0.0.1", "10.1.2.3"]))),
                    host_port=1000 * (i + 1) + k,  # distinct: no clash
                    guest_port=draw(st.integers(1, 65535)),
                )
                for k in range(draw(st.integers(0, 2)))
            ]
            models = ["virtio", "e1000"] if machine != "microvm" else ["virtio"]
            mac = draw(st.none() | st.just(f"52:54:00:00:00:{i + 1:02x}"))
            nics.append(Nic(model=draw(st.sampled_from(models)), mac=mac, forwards=forwards))
        kw["nics"] = nics
    result = attempt(lambda: DomainConfig(**kw), ConfigError)
    if isinstance(result, ConfigError):
        # Only the cross-field rule this strategy does not avoid: the same writable image twice.
        assert all("same image" in msg for _loc, msg in result.errors), result.errors
        assume(False)
    assert isinstance(result, DomainConfig)
    return result


@budget(400)
@given(valid_configs(), st.integers(0, 1 << 16), st.none() | abs_path, st.booleans())
def test_rendered_argv_parses_back_exactly(
    cfg: DomainConfig, monitor_fd: int, console_path: str | None, paused: bool
) -> None:
    argv = render_argv(cfg, monitor_fd=monitor_fd, console_path=console_path, paused=paused)
    check_rendered(cfg, argv, monitor_fd, console_path, paused)


@budget(100)
@given(st.text(max_size=30))
def test_any_console_path_renders_or_is_refused(console_path: str) -> None:
    cfg = DomainConfig(name="x", memory_mib=1, uuid=uuid.uuid4())
    argv = attempt(lambda: render_argv(cfg, monitor_fd=3, console_path=console_path), ValueError)
    if isinstance(argv, ValueError):
        assert "\x00" in console_path and "NUL" in str(argv)
    else:
        check_rendered(cfg, argv, 3, console_path, True)


# -- connection URIs ------------------------------------------------------------------------------

uris = st.text(max_size=40) | st.builds(
    "{}:{}{}{}{}{}".format,
    st.sampled_from(["qemu", "test", "qemu+unix", "qemu+tcp", "qemu+tls", "qemu+ssh", "test+unix", "test+tcp",
                     "qemu+", "+ssh", "qemu+ftp", "QEMU", "", "qemu ", "q\u0435mu"]),
    st.sampled_from(["//", "///", "/", ""]),
    st.sampled_from(["", "host", "user@h:22", "h:99999", "h:0", "h:x", ":22", "[::1]", "[::1]:22", "%00",
                     "u%ffx@h"]) | st.text(max_size=4),
    st.sampled_from(["/session", "/system", "/embed", "/default", "/empty", "", "/embed/", "/Embed",
                     "/embed\x00"]) | st.text(max_size=8),
    st.sampled_from(["", "?", "?root=/x", "?root=", "?root=/a&root=/b", "?root=%00", "?root=/%ff", "?x=1",
                     "?root=/a;b", "?&&", "?root=/a&x", "?root=rel", "?root=/a+b", "?socket=/s",
                     "?no_verify=1", "?keyfile=%ff", "?mode=auto&mode=direct", "?command=ssh"])
    | st.text(max_size=10).map("?".__add__),
    st.sampled_from(["", "#", "#x"]),
)  # fmt: skip


remote_uris = st.builds(
    "{}+{}://{}{}{}".format,
    st.sampled_from(["qemu", "test"]),
    st.sampled_from(["unix", "tcp", "tls", "ssh"]),
    st.sampled_from(["", "host", "user@host", "u%20v@h:22", "h:22", "h:0", "h:65536", "[::1]",
                     "[fe80::1%25e]:1"]),
    st.sampled_from(["/system", "/session", "/default", "/"]),
    st.sampled_from(["", "?socket=/s", "?no_verify=1", "?pkipath=/p&tls_priority=NORMAL", "?keyfile=/k",
                     "?command=ssh", "?mode=auto&mode=direct", "?socket=%ff", "?x=1", "?socket"]),
)  # fmt: skip
local_uris = st.builds(
    "{}:///{}{}".format,
    st.sampled_from(["qemu", "test"]),
    st.sampled_from(["embed", "session", "system", "default", "empty"]),
    st.sampled_from(["", "?root=/x", "?root=/a+b", "?root=%2Fa%2Cb", "?root=rel", "?root=/x&x=1"]),
)


@budget(500)
@given(uris | remote_uris | local_uris)
def test_any_uri_is_parsed_or_refused(uri: str) -> None:
    parsed = attempt(lambda: aiovirt.parse_uri(uri), ValueError)  # InvalidURIError is a ValueError
    if isinstance(parsed, ValueError):
        assert isinstance(parsed, InvalidURIError), repr(parsed)
        assert parsed.uri == uri and parsed.problem
        return
    assert parsed.uri == uri
    if parsed.scheme == "qemu":
        assert parsed.driver in ("embed", "session", "system")
        assert parsed.root.is_absolute() and parsed.run.is_absolute()
    elif parsed.scheme == "test":
        assert parsed.driver in ("default", "empty")
    else:
        assert parsed.scheme == "remote" and parsed.driver in ("qemu", "test")
        assert parsed.transport in ("unix", "tcp", "tls", "ssh")
        assert bool(parsed.host) == (parsed.transport != "unix")
        assert parsed.port is None or 0 <= parsed.port <= 65535
        assert parsed.name in ("qemu:///system", "qemu:///session", "test:///default")


@pytest.mark.parametrize(
    "uri", ["qemu://[::1", "qemu://[x]/system", "test+unix://x]", "qemu+tcp://h:99999/system"]
)
def test_bracketed_host_is_an_invalid_uri(uri: str) -> None:
    with pytest.raises(InvalidURIError):
        aiovirt.parse_uri(uri)


@budget(300)
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=30))
def test_any_embed_root_round_trips(tail: str) -> None:
    root = "/" + tail
    for safe in ("", "/+"):  # fully percent-encoded, or with '/' and '+' as they are ('+' is a plus)
        parsed = aiovirt.parse_uri("qemu:///embed?root=" + quote(root, safe=safe))
        assert parsed.root == Path(root)
        assert parsed.run == Path(root) / "run"


# -- the state directory's definition records, as connect() reads them ----------------------------

_TEMPLATE: dict[str, bytes] = {}


async def _define_template(root: Path) -> None:
    async with aiovirt.connect(f"qemu:///embed?root={root}") as conn:
        await conn.define(DomainConfig(name="vm", machine="none", accel="tcg", memory_mib=16))


def _template() -> bytes:
    """A definition record exactly as aiovirt writes it (made once, by aiovirt itself)."""
    if "vm" not in _TEMPLATE:
        root = Path(tempfile.mkdtemp(prefix="aiovirt-fuzz-"))
        try:
            anyio.run(_define_template, root)
            _TEMPLATE["vm"] = (root / "domains" / "vm.json").read_bytes()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return _TEMPLATE["vm"]


@st.composite
def mutated_records(draw: st.DrawFn) -> bytes:
    good = _template()
    how = draw(st.sampled_from(["value", "delete", "add", "truncate", "flip", "bytes"]))
    if how == "truncate":
        return good[: draw(st.integers(0, len(good) - 1))]
    if how == "flip":
        at = draw(st.integers(0, len(good) - 1))
        return good[:at] + bytes([good[at] ^ draw(st.integers(1, 255))]) + good[at + 1 :]
    if how == "bytes":
        return draw(st.binary(max_size=200))
    record = json.loads(good)
    target = record if draw(st.booleans()) else record["config"]
    key = draw(st.sampled_from(sorted(target)) | st.text(max_size=6))
    if how == "delete":
        target.pop(key, None)
    else:
        target[key] = draw(anything | json_value)
    if record.get("autostart") is not False and isinstance(record.get("config"), dict):
        # A valid autostart record would start its QEMU: whatever the emulator field says.
        record["autostart"] = False
    return json.dumps(record, default=repr).encode()


async def _connect_and_check(root: Path, record: bytes) -> None:
    async with aiovirt.connect(f"qemu:///embed?root={root}") as conn:
        definition = root / "domains" / "vm.json"
        try:
            dom = await conn.lookup("vm")
        except aiovirt.DomainNotFoundError:
            (problem,) = conn.problems
            assert problem.kind == "definition" and problem.path == definition.with_name("vm.json.corrupt")
            assert problem.path.read_bytes() == record  # kept, unchanged, for a human to look at
            assert not definition.exists()
            return
        assert conn.problems == []
        assert dom.config == DomainConfig.parse(json.loads(record)["config"])
        assert not dom.active
        assert definition.read_bytes() == record


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@budget(40)
@given(mutated_records())
def test_any_definition_record_is_loaded_or_set_aside(backend: str, record: bytes) -> None:
    root = Path(tempfile.mkdtemp(prefix="aiovirt-fuzz-"))
    try:
        (root / "domains").mkdir(mode=0o700)
        path = root / "domains" / "vm.json"
        path.write_bytes(record)
        path.chmod(0o600)
        anyio.run(_connect_and_check, root, record, backend=backend)
    finally:
        shutil.rmtree(root, ignore_errors=True)
