"""Domain configuration: frozen pydantic models and a pure renderer from a model to QEMU's argv.

Importing this package loads pydantic and the standard library only (no anyio, no I/O).
Invalid input raises :class:`aiovirt.ConfigError` (never pydantic's ``ValidationError``).
"""

from ._models import CacheMode, Disk, DomainConfig, Nic, PortForward
from ._render import qemu_opt_escape, render_argv, render_command_line

__all__ = [
    "CacheMode",
    "Disk",
    "DomainConfig",
    "Nic",
    "PortForward",
    "qemu_opt_escape",
    "render_argv",
    "render_command_line",
]
