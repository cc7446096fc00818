"""libvirt's RPC programs as data: numbers and the typed payloads of the procedures aiovirt uses.

Every number here is libvirt's own, checked against its sources (``src/rpc/virnetprotocol.x``,
``src/rpc/virkeepaliveprotocol.x``, ``src/remote/remote_protocol.x``, ``src/remote/qemu_protocol.x``,
``include/libvirt/virterror.h``, ``include/libvirt/libvirt-domain.h``, ``src/libvirt_internal.h``)
and against digitalocean/go-libvirt's generated constants; the byte layouts are also checked
against packets recorded from libvirt's own client (tests/data/rpc/).

Each procedure's arguments are encoded by an ``encode_*`` function (or a ``*Args`` value's
``encode()``) to the payload bytes, and its reply payload decoded by a ``decode_*`` function.
Encoders raise :class:`~aiovirt.rpc._xdr.XDREncodeError` (a ValueError) for a value libvirt's
limits refuse; decoders raise :class:`~aiovirt.rpc._xdr.XDRDecodeError` for malformed bytes,
including trailing bytes. Stdlib only.
"""

from __future__ import annotations

import enum
import uuid as uuid_mod
from dataclasses import dataclass
from typing import Final

from ._xdr import Packer, Unpacker

# -- virnetprotocol.x: framing -----------------------------------------------------------------

MESSAGE_MAX: Final = 16777216
"""VIR_NET_MESSAGE_MAX: the most a packet may hold after its 4-byte length word (header + payload)."""
LEN_SIZE: Final = 4
"""VIR_NET_MESSAGE_LEN_MAX: the length word, which counts itself (but is not counted in MESSAGE_MAX)."""
HEADER_SIZE: Final = 24
"""VIR_NET_MESSAGE_HEADER_MAX: program, version, procedure, type, serial, status."""
PACKET_MAX: Final = LEN_SIZE + MESSAGE_MAX
"""The largest value the length word may carry (libvirt checks ``len - 4 > VIR_NET_MESSAGE_MAX``)."""
STRING_MAX: Final = 4194304
"""REMOTE_STRING_MAX (and VIR_NET_MESSAGE_STRING_MAX): the longest string in any payload."""
UUID_BUFLEN: Final = 16
DOMAIN_LIST_MAX: Final = 16384
AUTH_TYPE_LIST_MAX: Final = 20


class MessageType(enum.IntEnum):
    """virNetMessageType."""

    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5


class MessageStatus(enum.IntEnum):
    """virNetMessageStatus."""

    OK = 0
    ERROR = 1
    CONTINUE = 2


# -- programs ----------------------------------------------------------------------------------


class Program(enum.IntEnum):
    REMOTE = 0x20008086
    """REMOTE_PROGRAM (remote_protocol.x)."""
    QEMU = 0x20008087
    """QEMU_PROGRAM (qemu_protocol.x)."""
    KEEPALIVE = 0x6B656570
    """KEEPALIVE_PROGRAM (virkeepaliveprotocol.x): ASCII "keep"."""


PROGRAM_VERSION: Final = 1
"""REMOTE_PROTOCOL_VERSION, QEMU_PROTOCOL_VERSION and KEEPALIVE_PROTOCOL_VERSION are all 1."""


class KeepaliveProcedure(enum.IntEnum):
    PING = 1
    PONG = 2


class QemuProcedure(enum.IntEnum):
    DOMAIN_MONITOR_COMMAND = 1


class Procedure(enum.IntEnum):
    """REMOTE_PROC_* of remote_protocol.x (the ones aiovirt uses)."""

    CONNECT_OPEN = 1
    CONNECT_CLOSE = 2
    CONNECT_GET_VERSION = 4
    DOMAIN_CREATE = 9
    DOMAIN_CREATE_XML = 10
    DOMAIN_DEFINE_XML = 11
    DOMAIN_DESTROY = 12
    DOMAIN_GET_XML_DESC = 14
    DOMAIN_GET_AUTOSTART = 15
    DOMAIN_GET_INFO = 16
    DOMAIN_LOOKUP_BY_ID = 22
    DOMAIN_LOOKUP_BY_NAME = 23
    DOMAIN_LOOKUP_BY_UUID = 24
    DOMAIN_RESUME = 28
    DOMAIN_SET_AUTOSTART = 29
    DOMAIN_SHUTDOWN = 33
    DOMAIN_SUSPEND = 34
    DOMAIN_UNDEFINE = 35
    CONNECT_GET_HOSTNAME = 59
    CONNECT_SUPPORTS_FEATURE = 60
    AUTH_LIST = 66
    AUTH_SASL_INIT = 67
    AUTH_POLKIT = 70
    DOMAIN_EVENT_LIFECYCLE = 107
    CONNECT_GET_URI = 110
    CONNECT_GET_LIB_VERSION = 157
    DOMAIN_CREATE_WITH_FLAGS = 196
    DOMAIN_GET_STATE = 212
    DOMAIN_UNDEFINE_FLAGS = 231
    DOMAIN_DESTROY_FLAGS = 234
    DOMAIN_RESET = 245
    DOMAIN_SHUTDOWN_FLAGS = 258
    CONNECT_LIST_ALL_DOMAINS = 273
    CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY = 316
    CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY = 317
    DOMAIN_EVENT_CALLBACK_LIFECYCLE = 318
    DOMAIN_DEFINE_XML_FLAGS = 350


class AuthType(enum.IntEnum):
    """remote_auth_type."""

    NONE = 0
    SASL = 1
    POLKIT = 2


class Feature(enum.IntEnum):
    """VIR_DRV_FEATURE_* (src/libvirt_internal.h) for CONNECT_SUPPORTS_FEATURE."""

    PROGRAM_KEEPALIVE = 10
    REMOTE_EVENT_CALLBACK = 14


# -- libvirt's public enums and flags ----------------------------------------------------------


class DomainState(enum.IntEnum):
    """virDomainState."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


class EventType(enum.IntEnum):
    """virDomainEventType (the ``event`` of a lifecycle event)."""

    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


DOMAIN_EVENT_ID_LIFECYCLE: Final = 0
"""VIR_DOMAIN_EVENT_ID_LIFECYCLE, the eventID for CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY."""

DOMAIN_DESTROY_GRACEFUL: Final = 1
"""VIR_DOMAIN_DESTROY_GRACEFUL: SIGTERM only; libvirt waits and fails with SYSTEM_ERROR (EBUSY)."""
DOMAIN_XML_SECURE: Final = 1
DOMAIN_XML_INACTIVE: Final = 2
DOMAIN_START_PAUSED: Final = 1
DOMAIN_START_AUTODESTROY: Final = 2
DOMAIN_DEFINE_VALIDATE: Final = 1
DOMAIN_SHUTDOWN_ACPI_POWER_BTN: Final = 1
DOMAIN_UNDEFINE_MANAGED_SAVE: Final = 1
DOMAIN_UNDEFINE_NVRAM: Final = 4


class ListFlags(enum.IntFlag):
    """VIR_CONNECT_LIST_DOMAINS_* for CONNECT_LIST_ALL_DOMAINS (0 lists every domain)."""

    ACTIVE = 1
    INACTIVE = 2
    PERSISTENT = 4
    TRANSIENT = 8
    RUNNING = 16
    PAUSED = 32
    SHUTOFF = 64
    OTHER = 128


class ErrorCode(enum.IntEnum):
    """virErrorNumber (include/libvirt/virterror.h): the codes aiovirt tells apart."""

    OK = 0
    INTERNAL_ERROR = 1
    NO_MEMORY = 2
    NO_SUPPORT = 3
    NO_CONNECT = 5
    INVALID_CONN = 6
    INVALID_DOMAIN = 7
    INVALID_ARG = 8
    OPERATION_FAILED = 9
    XML_ERROR = 27
    DOM_EXIST = 28
    OPERATION_DENIED = 29
    XML_DETAIL = 35
    SYSTEM_ERROR = 38
    RPC = 39
    NO_DOMAIN = 42
    AUTH_FAILED = 45
    OPERATION_INVALID = 55
    CONFIG_UNSUPPORTED = 67
    OPERATION_TIMEOUT = 68
    ARGUMENT_UNSUPPORTED = 74
    OPERATION_ABORTED = 78
    AUTH_CANCELLED = 79
    OPERATION_UNSUPPORTED = 84
    AGENT_UNRESPONSIVE = 86
    RESOURCE_BUSY = 87
    ACCESS_DENIED = 88
    AUTH_UNAVAILABLE = 94
    NO_SERVER = 95
    NO_CLIENT = 96
    MULTIPLE_DOMAINS = 110


# -- shared structs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainRef:
    """remote_nonnull_domain: how a domain travels in every call. ``id`` is -1 while it is inactive."""

    name: str
    uuid: uuid_mod.UUID
    id: int

    def pack(self, p: Packer) -> None:
        p.string(self.name, STRING_MAX)
        p.opaque_fixed(self.uuid.bytes, UUID_BUFLEN)
        p.int32(self.id)

    @classmethod
    def unpack(cls, u: Unpacker) -> DomainRef:
        name = u.string(STRING_MAX)
        raw = u.opaque_fixed(UUID_BUFLEN)
        return cls(name, uuid_mod.UUID(bytes=raw), u.int32())


@dataclass(frozen=True, slots=True)
class NetworkRef:
    """remote_nonnull_network (only ever seen inside remote_error, where libvirt leaves it unset)."""

    name: str
    uuid: uuid_mod.UUID

    @classmethod
    def unpack(cls, u: Unpacker) -> NetworkRef:
        name = u.string(STRING_MAX)
        return cls(name, uuid_mod.UUID(bytes=u.opaque_fixed(UUID_BUFLEN)))


def _opt_string(u: Unpacker) -> str | None:
    return u.optional(lambda: u.string(STRING_MAX))


@dataclass(frozen=True, slots=True)
class RemoteError:
    """remote_error: what a failed call (status ERROR) carries. ``code`` is a virErrorNumber,
    ``domain`` a virErrorDomain (VIR_FROM_*: which part of libvirt failed), ``level`` a virErrorLevel."""

    code: int
    domain: int
    message: str | None
    level: int
    dom: DomainRef | None = None
    str1: str | None = None
    str2: str | None = None
    str3: str | None = None
    int1: int = 0
    int2: int = 0
    net: NetworkRef | None = None

    @property
    def code_name(self) -> str:
        """libvirt's name for the code (``"NO_DOMAIN"``), or the number as text if unknown here."""
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return str(self.code)

    @classmethod
    def unpack(cls, u: Unpacker) -> RemoteError:
        code = u.int32()
        domain = u.int32()
        message = _opt_string(u)
        level = u.int32()
        dom = u.optional(lambda: DomainRef.unpack(u))
        str1, str2, str3 = _opt_string(u), _opt_string(u), _opt_string(u)
        int1, int2 = u.int32(), u.int32()
        net = u.optional(lambda: NetworkRef.unpack(u))
        return cls(code, domain, message, level, dom, str1, str2, str3, int1, int2, net)

    def pack(self, p: Packer) -> None:
        """For fake servers in tests."""
        p.int32(self.code)
        p.int32(self.domain)
        p.optional(self.message, lambda s: p.string(s, STRING_MAX))
        p.int32(self.level)
        p.optional(self.dom, lambda d: d.pack(p))
        for s in (self.str1, self.str2, self.str3):
            p.optional(s, lambda v: p.string(v, STRING_MAX))
        p.int32(self.int1)
        p.int32(self.int2)
        p.boolean(False)  # net: always unset (libvirt never fills it)


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """remote_domain_get_info_ret (virDomainInfo): memory in KiB, CPU time in nanoseconds."""

    state: DomainState | int
    max_mem_kib: int
    memory_kib: int
    nr_virt_cpu: int
    cpu_time_ns: int


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """remote_domain_event_callback_lifecycle_msg: ``event`` is an EventType, ``detail`` its
    per-type virDomainEvent*DetailType."""

    callback_id: int
    dom: DomainRef
    event: EventType | int
    detail: int


def _state(value: int) -> DomainState | int:
    try:
        return DomainState(value)
    except ValueError:
        return value


def _event_type(value: int) -> EventType | int:
    try:
        return EventType(value)
    except ValueError:
        return value


# -- encoders: the payload of each call --------------------------------------------------------


def _dom_and(dom: DomainRef) -> Packer:
    p = Packer()
    dom.pack(p)
    return p


def _int_body(value: int) -> bytes:
    p = Packer()
    p.int32(value)
    return p.getvalue()


def _string_body(value: str) -> bytes:
    p = Packer()
    p.string(value, STRING_MAX)
    return p.getvalue()


def encode_open(name: str | None, flags: int = 0) -> bytes:
    """remote_connect_open_args: the URI the daemon opens for us (``None``: its default)."""
    p = Packer()
    p.optional(name, lambda s: p.string(s, STRING_MAX))
    p.uint32(flags)
    return p.getvalue()


def encode_supports_feature(feature: int) -> bytes:
    return _int_body(feature)


def encode_list_all_domains(flags: int = 0, need_results: bool = True) -> bytes:
    p = Packer()
    p.int32(1 if need_results else 0)
    p.uint32(flags)
    return p.getvalue()


def encode_lookup_by_name(name: str) -> bytes:
    return _string_body(name)


def encode_lookup_by_uuid(uuid: uuid_mod.UUID) -> bytes:
    p = Packer()
    p.opaque_fixed(uuid.bytes, UUID_BUFLEN)
    return p.getvalue()


def encode_lookup_by_id(domain_id: int) -> bytes:
    return _int_body(domain_id)


def encode_dom(dom: DomainRef) -> bytes:
    """The many ``{remote_nonnull_domain dom;}`` args (create, destroy, suspend, resume, shutdown,
    undefine, get_info, get_autostart)."""
    return _dom_and(dom).getvalue()


def encode_dom_flags(dom: DomainRef, flags: int = 0) -> bytes:
    """``{dom; unsigned int flags;}`` (get_state, get_xml_desc, create_with_flags, destroy_flags,
    shutdown_flags, reset, undefine_flags)."""
    p = _dom_and(dom)
    p.uint32(flags)
    return p.getvalue()


def encode_set_autostart(dom: DomainRef, autostart: bool) -> bytes:
    p = _dom_and(dom)
    p.int32(1 if autostart else 0)
    return p.getvalue()


def encode_define_xml(xml: str) -> bytes:
    return _string_body(xml)


def encode_xml_flags(xml: str, flags: int = 0) -> bytes:
    """``{string xml; unsigned int flags;}`` (define_xml_flags, create_xml)."""
    p = Packer()
    p.string(xml, STRING_MAX)
    p.uint32(flags)
    return p.getvalue()


def encode_event_register_any(event_id: int, dom: DomainRef | None = None) -> bytes:
    """remote_connect_domain_event_callback_register_any_args (``dom`` None: every domain)."""
    p = Packer()
    p.int32(event_id)
    p.optional(dom, lambda d: d.pack(p))
    return p.getvalue()


def encode_event_deregister_any(callback_id: int) -> bytes:
    return _int_body(callback_id)


def encode_monitor_command(dom: DomainRef, command: str, flags: int = 0) -> bytes:
    """qemu_domain_monitor_command_args (QEMU program)."""
    p = _dom_and(dom)
    p.string(command, STRING_MAX)
    p.uint32(flags)
    return p.getvalue()


# -- decoders: the payload of each reply -------------------------------------------------------


def decode_void(body: bytes) -> None:
    Unpacker(body).done()


def decode_int(body: bytes) -> int:
    """Every ``{int x;}`` reply (supports_feature, get_autostart, callback_register_any)."""
    u = Unpacker(body)
    value = u.int32()
    u.done()
    return value


def decode_uhyper(body: bytes) -> int:
    """``{unsigned hyper x;}`` (get_version, get_lib_version)."""
    u = Unpacker(body)
    value = u.uhyper()
    u.done()
    return value


def decode_string(body: bytes) -> str:
    """Every ``{remote_nonnull_string x;}`` reply (get_hostname, get_uri, get_xml_desc, monitor_command)."""
    u = Unpacker(body)
    value = u.string(STRING_MAX)
    u.done()
    return value


def decode_dom(body: bytes) -> DomainRef:
    """Every ``{remote_nonnull_domain dom;}`` reply (lookups, define, create_xml, create_with_flags)."""
    u = Unpacker(body)
    dom = DomainRef.unpack(u)
    u.done()
    return dom


def decode_auth_list(body: bytes) -> list[AuthType | int]:
    u = Unpacker(body)
    types = u.array(AUTH_TYPE_LIST_MAX, u.int32)
    u.done()
    out: list[AuthType | int] = []
    for t in types:
        try:
            out.append(AuthType(t))
        except ValueError:
            out.append(t)
    return out


def decode_list_all_domains(body: bytes) -> list[DomainRef]:
    u = Unpacker(body)
    doms = u.array(DOMAIN_LIST_MAX, lambda: DomainRef.unpack(u))
    u.uint32()  # ret: the count again
    u.done()
    return doms


def decode_domain_info(body: bytes) -> DomainInfo:
    u = Unpacker(body)
    # rpcgen widens unsigned char (state) and unsigned short (nrVirtCpu) to 4 bytes.
    info = DomainInfo(_state(u.uint32()), u.uhyper(), u.uhyper(), u.uint32(), u.uhyper())
    u.done()
    return info


def decode_domain_state(body: bytes) -> tuple[DomainState | int, int]:
    """remote_domain_get_state_ret: (state, reason); the reason's enum depends on the state."""
    u = Unpacker(body)
    state, reason = _state(u.int32()), u.int32()
    u.done()
    return state, reason


def decode_lifecycle_event(body: bytes) -> LifecycleEvent:
    u = Unpacker(body)
    callback_id = u.int32()
    dom = DomainRef.unpack(u)
    event = _event_type(u.int32())
    detail = u.int32()
    u.done()
    return LifecycleEvent(callback_id, dom, event, detail)


def decode_remote_error(body: bytes) -> RemoteError:
    u = Unpacker(body)
    err = RemoteError.unpack(u)
    u.done()
    return err


def encode_lifecycle_event(event: LifecycleEvent) -> bytes:
    """For fake servers in tests."""
    p = Packer()
    p.int32(event.callback_id)
    event.dom.pack(p)
    p.int32(int(event.event))
    p.int32(event.detail)
    return p.getvalue()
