"""The architecture's promises that an import can break."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import aiovirt

PKG = Path(aiovirt.__file__).parent


def test_sans_io_parts_load_no_anyio() -> None:
    code = (
        "import sys, aiovirt, aiovirt.config, aiovirt.qmp, aiovirt.qmp._codec\n"
        "import aiovirt._lifecycle, aiovirt._uri\n"
        "import aiovirt.rpc._codec, aiovirt.rpc._xdr, aiovirt.rpc._protocol\n"
        "import aiovirt.rpc._errors, aiovirt.rpc._mapping\n"
        "aiovirt.config.render_argv\n"
        "bad = [m for m in ('anyio', 'trio', 'sniffio') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _aiovirt_imports(path: Path) -> set[str]:
    """The aiovirt modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks excluded),
    as dotted names relative to the package."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in typing_only:
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            found.add(".".join([*base, *([node.module] if node.module else [])]))
        elif node.module and node.module.startswith("aiovirt"):
            found.add(node.module.removeprefix("aiovirt").lstrip("."))
    return found


_ABOVE_DRIVERS = {"_domain", "_connection", "_fleet", "cli", "pytest_plugin"}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("_errors.py", {"*"}),
        ("_states.py", {"*"}),
        ("_lifecycle.py", {"drivers", "qmp", "config", "_broadcast", *_ABOVE_DRIVERS}),
        ("_uri.py", {"drivers", "qmp", "config", "_broadcast", *_ABOVE_DRIVERS}),
        ("_unix.py", {"*"}),
        ("_fds.py", {"*"}),
        ("_background.py", {"*"}),
        ("config/_models.py", {"drivers", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("config/_render.py", {"drivers", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("config/_xml.py", {"drivers", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("config/_xml_import.py", {"drivers", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("config/_xml_tree.py", {"drivers", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("config/_files.py", {"drivers", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("qmp/_codec.py", {"drivers", "config", "_broadcast", "_lifecycle", *_ABOVE_DRIVERS}),
        ("qmp/_client.py", {"drivers", "config", "_lifecycle", *_ABOVE_DRIVERS}),
        ("rpc/_xdr.py", {"drivers", "qmp", "config", "_broadcast", "_lifecycle", *_ABOVE_DRIVERS}),
        ("rpc/_protocol.py", {"drivers", "qmp", "config", "_broadcast", "_lifecycle", *_ABOVE_DRIVERS}),
        ("rpc/_codec.py", {"drivers", "qmp", "config", "_broadcast", "_lifecycle", *_ABOVE_DRIVERS}),
        ("rpc/_errors.py", {"drivers", "qmp", "config", "_broadcast", "_lifecycle", *_ABOVE_DRIVERS}),
        ("rpc/_mapping.py", {"drivers", "qmp", "config", "_broadcast", "_lifecycle", *_ABOVE_DRIVERS}),
        ("rpc/_client.py", {"drivers", "qmp", "config", "_lifecycle", *_ABOVE_DRIVERS}),
        ("_console.py", {"drivers", "qmp", "config", "_lifecycle", *_ABOVE_DRIVERS}),
        ("drivers/qemu/_overlay.py", _ABOVE_DRIVERS),
        ("drivers/qemu/_serial.py", _ABOVE_DRIVERS),
        ("drivers/_base.py", {"drivers.qemu", "drivers.test", *_ABOVE_DRIVERS}),
        ("drivers/qemu/_process.py", {"drivers", "config", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("drivers/qemu/_statedir.py", {"drivers", "config", "qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("drivers/qemu/_records.py", {"qmp", "_lifecycle", *_ABOVE_DRIVERS}),
        ("drivers/qemu/_machine.py", _ABOVE_DRIVERS),
        ("drivers/qemu/_driver.py", _ABOVE_DRIVERS),
        ("drivers/test.py", {"drivers.qemu", *_ABOVE_DRIVERS}),
        *(
            (f"drivers/remote/{m}.py", {"drivers.qemu", "drivers.test", *_ABOVE_DRIVERS})
            for m in ("__init__", "_driver", "_machine", "_happenings", "_streams")
        ),
        ("_hosts.py", {"drivers", "qmp", "rpc", "cli", "pytest_plugin"}),
        ("_domain.py", {"_connection", "_fleet", "drivers.qemu", "drivers.test", "qmp._client"}),
        ("_fleet.py", {"_connection", "drivers", "qmp"}),
        ("_connection.py", {"drivers.qemu._machine", "drivers.qemu._process", "qmp"}),
    ],
)
def test_imports_point_one_way(module: str, forbidden: set[str]) -> None:
    imports = _aiovirt_imports(PKG / module)
    if forbidden == {"*"}:
        assert imports == set(), f"{module} must import nothing of aiovirt, imports {imports}"
    else:
        bad = {i for i in imports if any(i == f or i.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{module} imports {bad}"


def _private_names_defined(tree: ast.Module) -> set[str]:
    """The private attributes a module defines: its private functions, methods, classes and the
    ``self._x`` / ``cls._x`` attributes its methods assign."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith(
            "_"
        ):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and t.attr.startswith("_"):
                        names.add(t.attr)
                    elif isinstance(t, ast.Name) and t.id.startswith("_"):
                        names.add(t.id)
    return names


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_touches_another_modules_private_attributes(path: Path) -> None:
    """``obj._x`` is allowed only for a ``_x`` that this very module defines (``self._x``, a
    private class's method, a sibling class's field): private means private to the module."""
    tree = ast.parse(path.read_text())
    own = _private_names_defined(tree)
    bad = sorted(
        f"{ast.unparse(node)} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and node.attr not in own
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "sys", "os"))
    )
    assert not bad, f"{path.relative_to(PKG)} reaches into private attributes of other modules: {bad}"


def test_public_api_is_complete() -> None:
    for name in aiovirt.__all__:
        assert getattr(aiovirt, name) is not None
    assert issubclass(aiovirt.StateDirLockedError, aiovirt.StateDirError)
    assert issubclass(aiovirt.CommandError, aiovirt.QMPError)
    for exc in (aiovirt.ConfigError, aiovirt.LaunchError, aiovirt.QMPError, aiovirt.StateDirError):
        assert issubclass(exc, aiovirt.AiovirtError)
