"""The local QEMU driver: QEMU processes supervised in the caller's event loop, state in a directory."""

from ._driver import QemuDriver

__all__ = ["QemuDriver"]
