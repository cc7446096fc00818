"""libvirt's errors as aiovirt's exceptions: the one place that maps virErrorNumber codes.

Every exception raised for a failed call is a :class:`LibvirtError` carrying libvirt's
:class:`RemoteError` (``code``, ``domain``, ``message``, ``int1`` = errno for SYSTEM_ERROR, ...)
and the procedure that failed. Where aiovirt has a matching exception the error is also an
instance of it, so a caller catches ``aiovirt.DomainNotFoundError`` whether the domain is local
or behind a daemon:

=========================================  ==========================================
libvirt (virterror.h)                      raised
=========================================  ==========================================
VIR_ERR_NO_DOMAIN (42)                     :class:`RemoteDomainNotFoundError` (DomainNotFoundError)
VIR_ERR_DOM_EXIST (28)                     :class:`RemoteDomainExistsError` (DomainExistsError)
VIR_ERR_OPERATION_FAILED (9) from          :class:`RemoteDomainExistsError`: libvirt reports "domain
DOMAIN_DEFINE_XML(_FLAGS), DOMAIN_CREATE_XML  'x' already exists with uuid ..." with this code
VIR_ERR_OPERATION_INVALID (55)             :class:`RemoteInvalidStateError` (InvalidStateError)
anything else (SYSTEM_ERROR 38, ...)       :class:`LibvirtError`
=========================================  ==========================================

The messages are libvirt's own, in the daemon's language; the mapping uses only the numbers.
Stdlib only.
"""

from __future__ import annotations

from typing import Final

from .._errors import AiovirtError, DomainExistsError, DomainNotFoundError, InvalidStateError
from ._protocol import ErrorCode, Procedure, Program, QemuProcedure, RemoteError

__all__ = [
    "LibvirtError",
    "RemoteDomainExistsError",
    "RemoteDomainNotFoundError",
    "RemoteInvalidStateError",
    "UnsupportedAuthError",
    "error_from_remote",
    "procedure_name",
]

# The procedures whose OPERATION_FAILED means "a domain of that name or UUID exists" (libvirt's
# domain list refuses the addition with that code: virDomainObjListAddLocked).
_ADDS_DOMAIN: Final = frozenset(
    {Procedure.DOMAIN_DEFINE_XML, Procedure.DOMAIN_DEFINE_XML_FLAGS, Procedure.DOMAIN_CREATE_XML}
)


def procedure_name(procedure: int, program: int = Program.REMOTE) -> str:
    """libvirt's name for a procedure (``"DOMAIN_GET_INFO"``, ``"QEMU_DOMAIN_MONITOR_COMMAND"``)."""
    try:
        if program == Program.REMOTE:
            return Procedure(procedure).name
        if program == Program.QEMU:
            return "QEMU_" + QemuProcedure(procedure).name
    except ValueError:
        pass
    return f"procedure {procedure} of program {program:#x}"


class LibvirtError(AiovirtError):
    """A call failed in the daemon. ``remote`` is libvirt's error as sent; ``code``, ``domain``
    (VIR_FROM_*) and ``message`` are its fields; ``procedure`` is the call that failed."""

    def __init__(self, remote: RemoteError, procedure: int, program: int = Program.REMOTE) -> None:
        self._init(remote, procedure, program)

    @property
    def errno(self) -> int | None:
        """For VIR_ERR_SYSTEM_ERROR, the errno that libvirt reported (in remote_error's ``int1``,
        as virReportSystemError puts it): e.g. EBUSY when a graceful destroy timed out."""
        return self.remote.int1 if self.code == ErrorCode.SYSTEM_ERROR else None

    def _init(self, remote: RemoteError, procedure: int, program: int, prefix: str = "") -> None:
        self.remote = remote
        self.code = remote.code
        self.domain = remote.domain
        self.message = remote.message or ""
        self.procedure = procedure
        self.program = program
        AiovirtError.__init__(
            self,
            f"{prefix}libvirt: {self.message or 'unknown error'} "
            f"({remote.code_name}, in {procedure_name(procedure, program)})",
        )


class RemoteDomainNotFoundError(LibvirtError, DomainNotFoundError):
    """VIR_ERR_NO_DOMAIN. ``name`` is the domain asked for (its UUID as text if the call named it by UUID)."""

    def __init__(
        self, remote: RemoteError, procedure: int, program: int = Program.REMOTE, name: str = ""
    ) -> None:
        self._init(remote, procedure, program, f"domain {name!r}: " if name else "")
        self.name = name


class RemoteDomainExistsError(LibvirtError, DomainExistsError):
    """VIR_ERR_DOM_EXIST, or OPERATION_FAILED from a define/create (see the module's table)."""

    def __init__(
        self, remote: RemoteError, procedure: int, program: int = Program.REMOTE, name: str = ""
    ) -> None:
        self._init(remote, procedure, program, f"domain {name!r}: " if name else "")
        self.name = name


class RemoteInvalidStateError(LibvirtError, InvalidStateError):
    """VIR_ERR_OPERATION_INVALID ("domain is not running", "domain is already running", ...).

    ``operation`` is the procedure's name; libvirt does not say which state the domain was in, so
    ``state`` and ``reason`` are None."""

    def __init__(
        self, remote: RemoteError, procedure: int, program: int = Program.REMOTE, name: str = ""
    ) -> None:
        self._init(remote, procedure, program, f"domain {name!r}: " if name else "")
        self.name = name
        self.operation = procedure_name(procedure, program)
        self.state = None
        self.reason = None


class UnsupportedAuthError(AiovirtError):
    """The daemon requires an authentication aiovirt does not speak (SASL, polkit).

    ``auth_types`` are the types the daemon offered (remote_auth_type numbers or names)."""

    def __init__(self, auth_types: list[str]) -> None:
        super().__init__(
            "the libvirt daemon requires authentication by "
            + " or ".join(auth_types)
            + ", which aiovirt does not support (only 'none'): configure the daemon's socket with "
            'auth_unix_rw = "none" (unix socket) or use a TLS client certificate (auth_tls = "none")'
        )
        self.auth_types = list(auth_types)


def error_from_remote(
    remote: RemoteError, procedure: int, program: int = Program.REMOTE, *, name: str = ""
) -> LibvirtError:
    """The exception for libvirt's ``remote`` error from ``procedure``. ``name`` is the domain the
    call was about, if one was named."""
    code = remote.code
    if code == ErrorCode.NO_DOMAIN:
        return RemoteDomainNotFoundError(remote, procedure, program, name)
    if code == ErrorCode.DOM_EXIST or (
        code == ErrorCode.OPERATION_FAILED and program == Program.REMOTE and procedure in _ADDS_DOMAIN
    ):
        return RemoteDomainExistsError(remote, procedure, program, name)
    if code == ErrorCode.OPERATION_INVALID:
        return RemoteInvalidStateError(remote, procedure, program, name)
    return LibvirtError(remote, procedure, program)
