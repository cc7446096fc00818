"""Domain configuration: frozen pydantic models, a pure renderer from a model to QEMU's argv, the
model <-> libvirt domain XML mapping, and config files (JSON, TOML or libvirt XML).

Importing this package loads pydantic, defusedxml and the standard library only (no anyio, no I/O).
Invalid input raises :class:`aiovirt.ConfigError` (never pydantic's ``ValidationError``).
"""

from ._files import ConfigFormat, dump_config, load_config, parse_config
from ._models import CacheMode, Disk, DomainConfig, Nic, PortForward
from ._render import qemu_opt_escape, render_argv, render_command_line
from ._xml import to_libvirt_xml
from ._xml_import import ElementReport, ImportedConfig, from_libvirt_xml

__all__ = [
    "CacheMode",
    "ConfigFormat",
    "Disk",
    "DomainConfig",
    "ElementReport",
    "ImportedConfig",
    "Nic",
    "PortForward",
    "dump_config",
    "from_libvirt_xml",
    "load_config",
    "parse_config",
    "qemu_opt_escape",
    "render_argv",
    "render_command_line",
    "to_libvirt_xml",
]
