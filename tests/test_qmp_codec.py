"""The sans-IO QMP codec, byte by byte: bytes in, messages out, no event loop involved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiovirt._errors import AiovirtError, ProtocolError
from aiovirt.qmp._codec import (
    CLOSED,
    NEED_DATA,
    CodecState,
    Event,
    Greeting,
    LocalProtocolError,
    Message,
    QMPCodec,
    Response,
)

REPO = Path(__file__).resolve().parent.parent

# What QEMU 7.2 sends, byte for byte (over a socket its lines end in \r\n).
GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}\r\n'
)
GREETING_MSG = Greeting(
    version={"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"},
    capabilities=("oob",),
)


def answer(sent: bytes, body: bytes = b'"return": {}') -> bytes:
    """QEMU's reply line to the command ``sent``: it echoes the id if the command had one."""
    cmd_id = json.loads(sent).get("id")
    echo = b', "id": "%s"' % cmd_id.encode() if cmd_id is not None else b""
    return b"{%s%s}\r\n" % (body, echo)


def drain(codec: QMPCodec) -> list[Message]:
    """Every complete message buffered now."""
    out: list[Message] = []
    while True:
        msg = codec.next_event()
        if msg is NEED_DATA or msg is CLOSED:
            return out
        out.append(msg)


def ready_codec(max_line: int = 1 << 20) -> QMPCodec:
    """A codec past the greeting and the negotiation, as a client sees it."""
    codec = QMPCodec(max_line=max_line)
    codec.receive_data(GREETING)
    assert drain(codec) == [GREETING_MSG]
    cmd_id, sent = codec.send_command("qmp_capabilities")
    codec.receive_data(answer(sent))
    assert drain(codec) == [Response(cmd_id, {})]
    assert codec.state is CodecState.READY
    return codec


# -- one conversation, cut everywhere ---------------------------------------------------------

# What a client sees: the greeting, the reply to qmp_capabilities (c1, sent without an id as
# nothing else was pending), then to "cont" (c1 again, an answered id being free; without an id)
# and "quit" (c2, with its id since cont was pending), each reply preceded by its event as QEMU
# sends them (RESUME before cont's reply, SHUTDOWN before quit's).
CONVERSATION = (
    GREETING
    + b'{"return": {}}\r\n'
    + b'{"timestamp": {"seconds": 1700000000, "microseconds": 500000}, "event": "RESUME"}\r\n'
    + b'{"return": {}}\r\n'
    + b'{"timestamp": {"seconds": 1700000001, "microseconds": 250000}, "event": "SHUTDOWN", '
    b'"data": {"guest": false, "reason": "host-qmp-quit"}}\r\n' + b'{"return": {}, "id": "c2"}\r\n'
)
CONVERSATION_MSGS: list[Message] = [
    GREETING_MSG,
    Response("c1", {}),
    Event("RESUME", {}, 1700000000.5),
    Response("c1", {}),
    Event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, 1700000001.25),
    Response("c2", {}),
]


def converse(data: bytes, cuts: list[int]) -> list[Message]:
    """Play a client against ``data`` fed in chunks cut at ``cuts`` (sorted offsets).

    Like a real client it negotiates on the greeting and sends cont and quit once ready.
    """
    codec = QMPCodec()
    out: list[Message] = []
    start = 0
    for cut in [*cuts, len(data)]:
        if cut == start:
            continue  # b"" would mean EOF
        codec.receive_data(data[start:cut])
        start = cut
        while True:
            msg = codec.next_event()
            if msg is NEED_DATA or msg is CLOSED:
                break
            out.append(msg)
            if isinstance(msg, Greeting):
                assert codec.send_command("qmp_capabilities") == ("c1", b'{"execute":"qmp_capabilities"}\n')
            elif msg == Response("c1", {}) and codec.state is CodecState.READY and len(out) == 2:
                assert codec.send_command("cont") == ("c1", b'{"execute":"cont"}\n')
                assert codec.send_command("quit") == ("c2", b'{"execute":"quit","id":"c2"}\n')
    codec.receive_data(b"")
    assert codec.next_event() is CLOSED
    return out


def test_conversation_in_one_chunk() -> None:
    assert converse(CONVERSATION, []) == CONVERSATION_MSGS


@pytest.mark.parametrize("cut", range(len(CONVERSATION) + 1))
def test_conversation_cut_at_every_offset(cut: int) -> None:
    assert converse(CONVERSATION, [cut]) == CONVERSATION_MSGS


def test_conversation_byte_by_byte() -> None:
    assert converse(CONVERSATION, list(range(1, len(CONVERSATION)))) == CONVERSATION_MSGS


@given(st.lists(st.integers(min_value=0, max_value=len(CONVERSATION)), max_size=40))
def test_conversation_any_chunking(cuts: list[int]) -> None:
    assert converse(CONVERSATION, sorted(cuts)) == CONVERSATION_MSGS


@given(st.lists(st.integers(min_value=0, max_value=len(CONVERSATION)), min_size=1, max_size=3))
def test_conversation_every_pair_of_cuts_sampled(cuts: list[int]) -> None:
    # Few cuts, so hypothesis explores where they fall rather than how many there are.
    assert converse(CONVERSATION, sorted(cuts)) == CONVERSATION_MSGS


# -- framing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b'{"return": 1}\n', [Response("c1", 1)], id="lf"),
        pytest.param(b'{"return": 1}\r\n', [Response("c1", 1)], id="crlf"),
        pytest.param(b'\n\r\n  \r\n{"return": 1}\r\n\r\n', [Response("c1", 1)], id="blank-lines"),
        pytest.param(
            b'{"return": 1}\r\n{"return": 2, "id": "c2"}\n{"event": "STOP", '
            b'"timestamp": {"seconds": 1, "microseconds": 0}}\r\n',
            [Response("c1", 1), Response("c2", 2), Event("STOP", {}, 1.0)],
            id="several-in-one-read",
        ),
        pytest.param(
            b'{"return": 2, "id": "c2"}\r\n{"return": 1}\r\n',
            [Response("c2", 2), Response("c1", 1)],
            id="out-of-order",
        ),
        pytest.param(b'{"return": {"a": "\\u00e9"}}\r\n', [Response("c1", {"a": "é"})], id="escapes"),
    ],
)
def test_framing(data: bytes, expected: list[Message]) -> None:
    codec = ready_codec()
    assert codec.send_command("a") == ("c1", b'{"execute":"a"}\n')
    assert codec.send_command("b") == ("c2", b'{"execute":"b","id":"c2"}\n')
    codec.receive_data(data)
    assert drain(codec) == expected


def test_partial_line_is_scanned_once() -> None:
    # Not a timing test: the scan offset must move forward so a long line arriving in many
    # chunks is not re-searched from its start every time.
    codec = ready_codec()
    codec.send_command("x")
    line = b'{"return": "' + b"a" * 1000 + b'"}\r\n'
    for i in range(len(line) - 1):
        codec.receive_data(line[i : i + 1])
        assert codec.next_event() is NEED_DATA
        assert codec._scanned == i + 1
    codec.receive_data(line[-1:])
    assert codec.next_event() == Response("c1", "a" * 1000)


# -- peer errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(b"garbage\r\n", "not valid JSON", id="bad-json"),
        pytest.param(b'{"return": 1, "id": "c1"\r\n', "not valid JSON", id="truncated-json"),
        pytest.param(b"\xff\xfe\r\n", "not valid JSON", id="not-utf8"),
        pytest.param(b"[1, 2]\r\n", "must be a JSON object", id="array"),
        pytest.param(b'"QMP"\r\n', "must be a JSON object", id="string"),
        pytest.param(b'{"hello": 1}\r\n', "not a QMP message", id="unknown-object"),
        pytest.param(b'{"return": 1, "id": "c9"}\r\n', "never sent", id="unknown-id"),
        pytest.param(b'{"return": 1, "id": 1}\r\n', "never sent", id="non-string-id"),
        pytest.param(b'{"return": 1, "id": "c1"}\r\n', "never sent", id="id-of-command-sent-without"),
        pytest.param(b'{"error": "bad"}\r\n', "error reply", id="error-not-object"),
        pytest.param(b'{"error": {"class": "X"}}\r\n', "error reply", id="error-no-desc"),
        pytest.param(b'{"event": "STOP"}\r\n', "event needs", id="event-no-timestamp"),
        pytest.param(
            b'{"event": 5, "timestamp": {"seconds": 1, "microseconds": 0}}\r\n', "event needs", id="ev-name"
        ),
        pytest.param(
            b'{"event": "X", "data": [], "timestamp": {"seconds": 1, "microseconds": 0}}\r\n',
            "event needs",
            id="event-data-not-object",
        ),
        pytest.param(
            b'{"event": "X", "timestamp": {"seconds": 1}}\r\n', "timestamp", id="event-bad-timestamp"
        ),
        pytest.param(
            b'{"event": "X", "timestamp": {"seconds": 1%s, "microseconds": 0}}\r\n' % (b"0" * 400),
            "timestamp",
            id="event-huge-timestamp",
        ),
        pytest.param(GREETING, "second greeting", id="second-greeting"),
        pytest.param(b"[" * 100000 + b"\r\n", "not valid JSON", id="deep-nesting"),
    ],
)
def test_peer_errors(data: bytes, problem: str) -> None:
    codec = ready_codec()
    codec.send_command("query-status")
    codec.receive_data(data)
    with pytest.raises(ProtocolError, match=problem) as info:
        codec.next_event()
    assert isinstance(info.value, AiovirtError)
    assert info.value.data == data.removesuffix(b"\n")[:512]
    assert codec.state is CodecState.ERROR
    # The error is final: it is raised again, and the codec accepts nothing more.
    with pytest.raises(ProtocolError):
        codec.next_event()
    codec.receive_data(b'{"return": 1, "id": "c1"}\r\n')  # ignored
    with pytest.raises(ProtocolError):
        codec.next_event()
    with pytest.raises(LocalProtocolError):
        codec.send_command("query-status")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(b'{"return": {}, "id": "c1"}\r\n', "before the greeting", id="reply-first"),
        pytest.param(
            b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}\r\n',
            "before the greeting",
            id="event-first",
        ),
        pytest.param(b'{"QMP": {"version": {}}}\r\n', "greeting needs", id="greeting-no-capabilities"),
        pytest.param(
            b'{"QMP": {"version": 7, "capabilities": []}}\r\n', "greeting needs", id="greeting-bad-ver"
        ),
        pytest.param(b'{"QMP": []}\r\n', "must be an object", id="greeting-not-object"),
    ],
)
def test_no_greeting_first(data: bytes, problem: str) -> None:
    codec = QMPCodec()
    codec.receive_data(data)
    with pytest.raises(ProtocolError, match=problem):
        codec.next_event()


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_line_over_limit_without_newline(chunk: int) -> None:
    # The error comes as soon as more than max_line bytes without a newline are buffered,
    # not when (if ever) the newline arrives: memory stays bounded.
    codec = ready_codec(max_line=200)
    data = b'{"return": "' + b"x" * 1000
    for i in range(0, len(data), chunk):
        codec.receive_data(data[i : i + chunk])
        if i + chunk > 200:
            with pytest.raises(ProtocolError, match="longer than 200 bytes") as info:
                codec.next_event()
            assert info.value.data == data[: min(i + chunk, 512)]
            return
        assert codec.next_event() is NEED_DATA
    pytest.fail("no error")


def test_line_over_limit_with_newline() -> None:
    codec = ready_codec(max_line=200)
    codec.send_command("x")
    codec.receive_data(b'{"return": "' + b"x" * 200 + b'"}\r\n')
    with pytest.raises(ProtocolError, match="longer than 200 bytes"):
        codec.next_event()


def test_line_at_limit_is_fine() -> None:
    # The limit counts the line's bytes before its "\n" (a "\r" included).
    codec = ready_codec(max_line=200)
    codec.send_command("x")
    head, tail = b'{"return": "', b'"}\r'
    filler = 200 - len(head) - len(tail)
    codec.receive_data(head + b"x" * filler + tail + b"\n")
    assert codec.next_event() == Response("c1", "x" * filler)


def test_error_carries_truncated_bytes() -> None:
    codec = ready_codec()
    codec.receive_data(b"x" * 5000 + b"\r\n")
    with pytest.raises(ProtocolError) as info:
        codec.next_event()
    assert info.value.data == b"x" * 512


# -- end of file -------------------------------------------------------------------------------


def test_eof_after_messages() -> None:
    codec = ready_codec()
    codec.send_command("quit")
    codec.receive_data(
        b'{"event": "SHUTDOWN", "timestamp": {"seconds": 1, "microseconds": 2}, "data": {"guest": false}}\r\n'
        b'{"return": {}}\r\n'
    )
    codec.receive_data(b"")
    assert codec.state is CodecState.CLOSED
    # Messages before the EOF are still delivered, then CLOSED forever.
    assert codec.next_event() == Event("SHUTDOWN", {"guest": False}, 1.000002)
    assert codec.next_event() == Response("c1", {})
    assert codec.next_event() is CLOSED
    assert codec.next_event() is CLOSED
    codec.receive_data(b"")  # a second EOF is harmless


def test_greeting_and_eof_in_one_go() -> None:
    codec = QMPCodec()
    codec.receive_data(GREETING)
    codec.receive_data(b"")
    assert codec.next_event() == GREETING_MSG
    assert codec.next_event() is CLOSED


@pytest.mark.parametrize("tail", [b"{", b'{"return": {}, "id": "c1"}', b"x"])
def test_eof_mid_line(tail: bytes) -> None:
    codec = ready_codec()
    codec.send_command("x")
    codec.receive_data(tail)
    assert codec.next_event() is NEED_DATA
    codec.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed in the middle of a message") as info:
        codec.next_event()
    assert info.value.data == tail


def test_eof_after_whitespace_is_clean() -> None:
    codec = ready_codec()
    codec.receive_data(b"\r\n\r")
    codec.receive_data(b"")
    assert codec.next_event() is CLOSED


def test_empty_connection() -> None:
    codec = QMPCodec()
    codec.receive_data(b"")
    assert codec.next_event() is CLOSED


# -- replies, ids and events -----------------------------------------------------------------------


def test_replies_routed_by_id() -> None:
    codec = ready_codec()
    sent = [codec.send_command("query-status") for _ in range(3)]
    assert [json.loads(data).get("id") for _, data in sent] == [None, "c2", "c3"]
    assert [cmd_id for cmd_id, _ in sent] == ["c1", "c2", "c3"]
    assert codec.pending_ids == {"c1", "c2", "c3"}
    # The id-less reply is the one to the command sent without an id, whatever came before it.
    codec.receive_data(b'{"return": 3, "id": "c3"}\r\n{"return": 1}\r\n')
    assert drain(codec) == [Response("c3", 3), Response("c1", 1)]
    assert codec.pending_ids == {"c2"}
    # An id is reused only once answered, never while its reply may still come.
    assert codec.send_command("x")[0] in {"c1", "c3"}
    assert codec.send_command("x")[0] in {"c1", "c3"}
    assert codec.send_command("x")[0] == "c4"
    # A second reply to the same id is the peer's error.
    codec.receive_data(b'{"return": 2, "id": "c2"}\r\n{"return": 2, "id": "c2"}\r\n')
    assert codec.next_event() == Response("c2", 2)
    with pytest.raises(ProtocolError, match="never sent or already answered"):
        codec.next_event()


@pytest.mark.parametrize("pending", [0, 1])
def test_error_reply(pending: int) -> None:
    codec = ready_codec()
    for _ in range(pending):
        codec.send_command("stop")
    cmd_id, sent = codec.send_command("nope")
    if pending:  # QEMU answers in order
        codec.receive_data(b'{"return": {}}\r\n')
        assert codec.next_event() == Response("c1", {})
    codec.receive_data(
        answer(sent, b'"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}')
    )
    reply = codec.next_event()
    assert reply == Response(cmd_id, None, "CommandNotFound", "The command nope has not been found")
    assert isinstance(reply, Response)
    assert not reply.ok
    assert Response("c1", {}).ok


def test_idless_error_reply() -> None:
    # What QEMU answers to input it cannot parse: it cannot know the id. With no command sent
    # without an id pending, it cannot be attributed.
    codec = ready_codec()
    codec.receive_data(b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n')
    assert codec.next_event() == Response(None, None, "GenericError", "JSON parse error")
    codec.send_command("a")
    codec.send_command("b")
    codec.receive_data(
        b'{"return": 1}\r\n{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n'
    )
    assert codec.next_event() == Response("c1", 1)
    assert codec.next_event() == Response(None, None, "GenericError", "JSON parse error")
    assert codec.pending_ids == {"c2"}


def test_events_between_command_and_reply() -> None:
    codec = ready_codec()
    quit_id, sent = codec.send_command("quit")
    codec.receive_data(
        b'{"timestamp": {"seconds": 5, "microseconds": 0}, "event": "SHUTDOWN", '
        b'"data": {"guest": false, "reason": "host-qmp-quit"}}\r\n'
    )
    assert codec.next_event() == Event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, 5.0)
    assert codec.next_event() is NEED_DATA
    assert codec.pending_ids == {quit_id}
    codec.receive_data(answer(sent))
    assert codec.next_event() == Response(quit_id, {})


def test_event_without_data() -> None:
    codec = ready_codec()
    codec.receive_data(
        b'{"timestamp": {"seconds": 1795768728, "microseconds": 524446}, "event": "RESUME"}\r\n'
    )
    event = codec.next_event()
    assert event == Event("RESUME", {}, 1795768728.524446)


# -- states and our own misuse -----------------------------------------------------------------


def state(codec: QMPCodec) -> CodecState:
    return codec.state  # a call, so mypy does not keep an earlier narrowing of the property


def test_states() -> None:
    codec = QMPCodec()
    assert state(codec) is CodecState.AWAITING_GREETING
    with pytest.raises(LocalProtocolError, match="greeting has not arrived"):
        codec.send_command("qmp_capabilities")
    codec.receive_data(GREETING)
    assert state(codec) is CodecState.AWAITING_GREETING  # nothing parsed yet
    assert codec.next_event() == GREETING_MSG
    assert state(codec) is CodecState.NEGOTIATING
    with pytest.raises(LocalProtocolError, match="qmp_capabilities"):
        codec.send_command("query-status")
    caps_id, data = codec.send_command("qmp_capabilities", {"enable": []})
    assert data == b'{"execute":"qmp_capabilities","arguments":{"enable":[]}}\n'
    # An error reply to the negotiation leaves it negotiating.
    codec.receive_data(answer(data, b'"error": {"class": "GenericError", "desc": "no"}'))
    assert codec.next_event() == Response(caps_id, None, "GenericError", "no")
    assert state(codec) is CodecState.NEGOTIATING
    caps_id, data = codec.send_command("qmp_capabilities")
    codec.receive_data(answer(data))
    assert codec.next_event() == Response(caps_id, {})
    assert state(codec) is CodecState.READY
    codec.send_command("query-status")
    codec.receive_data(b"")
    assert state(codec) is CodecState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        codec.send_command("query-status")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        codec.receive_data(b"{}")


def test_local_errors_are_not_peer_errors() -> None:
    assert issubclass(LocalProtocolError, RuntimeError)
    assert issubclass(LocalProtocolError, AiovirtError)  # in the tree, but never a ProtocolError
    assert not issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(ProtocolError, RuntimeError)


def test_bad_arguments_leave_no_pending_id() -> None:
    codec = ready_codec()
    with pytest.raises(TypeError):
        codec.send_command("x", {"f": object()})
    assert codec.pending_ids == frozenset()
    assert codec.send_command("x")[0] == "c1"


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        ("query-status", None),
        ("human-monitor-command", {"command-line": "info\nversion"}),
        ("x", {"s": "é\u2028\"'\\", "n": [1, 2.5, None, True], "o": {}}),
    ],
)
@pytest.mark.parametrize("pending", [False, True])
def test_send_command_encoding(command: str, arguments: dict[str, Any] | None, pending: bool) -> None:
    codec = ready_codec()
    if pending:
        codec.send_command("stop")
    cmd_id, data = codec.send_command(command, arguments)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1  # one line, whatever the strings hold
    assert data.isascii()
    expected: dict[str, Any] = {"execute": command}
    if arguments is not None:
        expected["arguments"] = arguments
    if pending:  # the id goes on the wire only when another command is pending
        expected["id"] = cmd_id
    assert json.loads(data) == expected


def test_no_id_only_when_nothing_else_is_pending() -> None:
    codec = ready_codec()
    # Sequential commands never carry an id.
    for _ in range(3):
        cmd_id, data = codec.send_command("query-status")
        assert (cmd_id, data) == ("c1", b'{"execute":"query-status"}\n')
        codec.receive_data(b'{"return": {}}\r\n')
        assert codec.next_event() == Response("c1", {})
    # With one pending, the next ones carry theirs; the replies may come in any order.
    assert codec.send_command("a") == ("c1", b'{"execute":"a"}\n')
    assert codec.send_command("b") == ("c2", b'{"execute":"b","id":"c2"}\n')
    codec.receive_data(b'{"return": "b", "id": "c2"}\r\n')
    assert codec.next_event() == Response("c2", "b")
    # c1 is still pending: c2 is free again but still goes with its id.
    assert codec.send_command("c") == ("c2", b'{"execute":"c","id":"c2"}\n')
    codec.receive_data(b'{"return": "a"}\r\n{"return": "c", "id": "c2"}\r\n')
    assert drain(codec) == [Response("c1", "a"), Response("c2", "c")]
    assert codec.pending_ids == frozenset()


def test_late_reply_to_command_sent_without_id() -> None:
    # A caller gave up on c1 (sent without an id); its reply still comes first, and is c1's.
    codec = ready_codec()
    codec.send_command("query-version")
    assert codec.send_command("query-status") == ("c2", b'{"execute":"query-status","id":"c2"}\n')
    codec.receive_data(b'{"return": {"qemu": {}}}\r\n{"return": {"status": "running"}, "id": "c2"}\r\n')
    assert drain(codec) == [Response("c1", {"qemu": {}}), Response("c2", {"status": "running"})]


def test_big_commands_carry_their_id() -> None:
    # QEMU's parser may fail on big input (over 1024 levels of nesting) and its error has no
    # id: a big command keeps its id so that error cannot pass for its reply.
    codec = ready_codec()
    cmd_id, data = codec.send_command("x", {"blob": "a" * 2000})
    assert json.loads(data)["id"] == cmd_id
    codec.receive_data(b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n')
    assert codec.next_event() == Response(None, None, "GenericError", "JSON parse error")
    assert codec.pending_ids == {cmd_id}


def test_abandon_frees_an_unsent_id() -> None:
    codec = ready_codec()
    assert codec.send_command("x")[0] == "c1"
    assert codec.send_command("y")[0] == "c2"
    codec.abandon("c1")  # its bytes were never sent
    codec.abandon("c9")  # unknown: ignored
    assert codec.pending_ids == {"c2"}
    # No reply is expected for it any more, with or without its id.
    codec.receive_data(b'{"return": 1}\r\n')
    assert codec.next_event() == Response(None, 1)
    codec.receive_data(b'{"return": 1, "id": "c1"}\r\n')
    with pytest.raises(ProtocolError, match="never sent"):
        codec.next_event()


def test_abandoned_negotiation_does_not_complete_it() -> None:
    codec = QMPCodec()
    codec.receive_data(GREETING)
    codec.next_event()
    caps_id, _ = codec.send_command("qmp_capabilities")
    codec.abandon(caps_id)
    assert state(codec) is CodecState.NEGOTIATING
    caps_id, data = codec.send_command("qmp_capabilities")
    codec.receive_data(answer(data))
    assert codec.next_event() == Response(caps_id, {})
    assert state(codec) is CodecState.READY


def test_max_line_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_line"):
        QMPCodec(max_line=0)


def test_sentinels() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert repr(CLOSED) == "CLOSED"


# -- the codec is sans-IO ----------------------------------------------------------------------


@pytest.mark.parametrize("module", ["aiovirt.qmp._codec", "aiovirt.qmp"])
def test_codec_import_loads_no_anyio(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in ('anyio', 'trio', 'sniffio') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
