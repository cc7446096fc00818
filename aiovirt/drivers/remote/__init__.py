"""The remote driver: libvirt daemons through aiovirt's own RPC client (see ``_driver``)."""

from ._driver import RemoteDriver

__all__ = ["RemoteDriver"]
