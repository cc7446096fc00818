"""XDR (RFC 4506), the encoding of libvirt's RPC payloads: the types its procedures use (stdlib only).

Every item is a multiple of 4 bytes, big-endian. ``int``/``unsigned int``/``enum``/``bool`` (and
rpcgen's ``char``/``short``, widened to 4 bytes) are 4 bytes; ``hyper``/``unsigned hyper`` 8;
``opaque[n]`` is n bytes padded to a multiple of 4; ``opaque<max>`` and ``string<max>`` are a
4-byte length and then the bytes, padded; ``T *`` (an optional value) is a bool and then the value
if true; ``T<max>`` (a variable array) is a 4-byte count and then the items.

:class:`Packer` raises :class:`XDREncodeError` (a ValueError) for a value it cannot encode: the
caller's mistake. :class:`Unpacker` raises :class:`XDRDecodeError` (a ValueError) for input that is
truncated, over a declared maximum, or otherwise malformed: the peer's mistake, turned into
:class:`aiovirt.ProtocolError` by the codec. Limits are checked before anything is allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

__all__ = ["Packer", "Unpacker", "XDRDecodeError", "XDREncodeError"]

T = TypeVar("T")

_INT: Final = struct.Struct(">i")
_UINT: Final = struct.Struct(">I")
_HYPER: Final = struct.Struct(">q")
_UHYPER: Final = struct.Struct(">Q")
_DOUBLE: Final = struct.Struct(">d")
_PAD: Final = (b"", b"\0\0\0", b"\0\0", b"\0")
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_UINT_MAX: Final = (1 << 32) - 1
_HYPER_MIN, _HYPER_MAX = -(1 << 63), (1 << 63) - 1
_UHYPER_MAX: Final = (1 << 64) - 1


class XDREncodeError(ValueError):
    """A value cannot be encoded (out of range, too long, wrong size)."""


class XDRDecodeError(ValueError):
    """The bytes are not a valid encoding of the expected type. ``offset`` is where it failed."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


class Packer:
    """Appends XDR items to a growing buffer; :meth:`getvalue` returns the bytes so far."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def int32(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise XDREncodeError(f"int must be an int, not {type(value).__name__}")
        if not _INT_MIN <= value <= _INT_MAX:
            raise XDREncodeError(f"int out of range: {value}")
        self._buf += _INT.pack(value)

    def uint32(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise XDREncodeError(f"unsigned int must be an int, not {type(value).__name__}")
        if not 0 <= value <= _UINT_MAX:
            raise XDREncodeError(f"unsigned int out of range: {value}")
        self._buf += _UINT.pack(value)

    def hyper(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise XDREncodeError(f"hyper must be an int, not {type(value).__name__}")
        if not _HYPER_MIN <= value <= _HYPER_MAX:
            raise XDREncodeError(f"hyper out of range: {value}")
        self._buf += _HYPER.pack(value)

    def uhyper(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise XDREncodeError(f"unsigned hyper must be an int, not {type(value).__name__}")
        if not 0 <= value <= _UHYPER_MAX:
            raise XDREncodeError(f"unsigned hyper out of range: {value}")
        self._buf += _UHYPER.pack(value)

    def boolean(self, value: bool) -> None:
        if type(value) is not bool:
            raise XDREncodeError(f"bool must be a bool, not {type(value).__name__}")
        self._buf += _INT.pack(1 if value else 0)

    def double(self, value: float) -> None:
        self._buf += _DOUBLE.pack(float(value))

    def opaque_fixed(self, data: bytes, size: int) -> None:
        if len(data) != size:
            raise XDREncodeError(f"fixed opaque must be {size} bytes, got {len(data)}")
        self._buf += data
        self._buf += _PAD[size & 3]

    def opaque(self, data: bytes, max_size: int) -> None:
        if len(data) > max_size:
            raise XDREncodeError(f"opaque of {len(data)} bytes exceeds its maximum of {max_size}")
        self._buf += _UINT.pack(len(data))
        self._buf += data
        self._buf += _PAD[len(data) & 3]

    def string(self, value: str, max_size: int) -> None:
        """A string, UTF-8 encoded. libvirt's strings are C strings: a NUL inside is refused."""
        if not isinstance(value, str):
            raise XDREncodeError(f"string must be a str, not {type(value).__name__}")
        try:
            data = value.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 for it
            why = f"{exc.reason} at {exc.start}"
            raise XDREncodeError(f"a string for libvirt must be valid Unicode: {why}") from exc
        if b"\0" in data:
            raise XDREncodeError("a string for libvirt cannot contain NUL characters")
        if len(data) > max_size:
            raise XDREncodeError(f"string of {len(data)} bytes exceeds its maximum of {max_size}")
        self._buf += _UINT.pack(len(data))
        self._buf += data
        self._buf += _PAD[len(data) & 3]

    def optional(self, value: T | None, pack: Callable[[T], None]) -> None:
        """``T *``: false, or true and the value."""
        if value is None:
            self._buf += _INT.pack(0)
        else:
            self._buf += _INT.pack(1)
            pack(value)

    def array(self, items: Sequence[T], max_count: int, pack: Callable[[T], None]) -> None:
        """``T<max>``: the count, then each item."""
        if len(items) > max_count:
            raise XDREncodeError(f"array of {len(items)} items exceeds its maximum of {max_count}")
        self._buf += _UINT.pack(len(items))
        for item in items:
            pack(item)


class Unpacker:
    """Reads XDR items from ``data``, in order. Call :meth:`done` to insist nothing is left over."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    def _take(self, size: int, what: str) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise XDRDecodeError(
                f"truncated {what}: needs {size} bytes, {len(self._data) - self._pos} left", self._pos
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def int32(self) -> int:
        value: int = _INT.unpack(self._take(4, "int"))[0]
        return value

    def uint32(self) -> int:
        value: int = _UINT.unpack(self._take(4, "unsigned int"))[0]
        return value

    def hyper(self) -> int:
        value: int = _HYPER.unpack(self._take(8, "hyper"))[0]
        return value

    def uhyper(self) -> int:
        value: int = _UHYPER.unpack(self._take(8, "unsigned hyper"))[0]
        return value

    def double(self) -> float:
        value: float = _DOUBLE.unpack(self._take(8, "double"))[0]
        return value

    def boolean(self) -> bool:
        at = self._pos
        value = self.int32()
        if value not in (0, 1):
            raise XDRDecodeError(f"bool must be 0 or 1, got {value}", at)
        return value == 1

    def _padding(self, size: int) -> None:
        pad = _PAD[size & 3]
        if pad:
            at = self._pos
            if self._take(len(pad), "padding") != pad:
                raise XDRDecodeError("padding bytes must be zero", at)

    def opaque_fixed(self, size: int) -> bytes:
        data = self._take(size, f"opaque[{size}]")
        self._padding(size)
        return data

    def _length(self, max_size: int, what: str) -> int:
        at = self._pos
        size = self.uint32()
        if size > max_size:
            raise XDRDecodeError(f"{what} length {size} exceeds its maximum of {max_size}", at)
        return size

    def opaque(self, max_size: int) -> bytes:
        size = self._length(max_size, "opaque")
        data = self._take(size, "opaque")
        self._padding(size)
        return data

    def string(self, max_size: int) -> str:
        size = self._length(max_size, "string")
        at = self._pos
        data = self._take(size, "string")
        self._padding(size)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise XDRDecodeError(f"string is not UTF-8: {exc.reason}", at + exc.start) from None

    def optional(self, unpack: Callable[[], T]) -> T | None:
        return unpack() if self.boolean() else None

    def array(self, max_count: int, unpack: Callable[[], T]) -> list[T]:
        count = self._length(max_count, "array")
        # Every item takes at least 4 bytes: a count the data cannot hold is refused up front, so a
        # hostile count never makes a huge list.
        if count * 4 > len(self._data) - self._pos:
            raise XDRDecodeError(f"truncated array: {count} items cannot fit", self._pos)
        return [unpack() for _ in range(count)]

    def done(self) -> None:
        """Raise unless every byte was consumed (trailing garbage is a malformed message)."""
        if self._pos != len(self._data):
            raise XDRDecodeError(f"{len(self._data) - self._pos} unexpected trailing bytes", self._pos)
