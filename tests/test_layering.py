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


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("_errors.py", {"*"}),
        ("_states.py", {"*"}),
        ("config/_models.py", {"_domain", "_connection", "_process", "_statedir", "qmp"}),
        ("config/_render.py", {"_domain", "_connection", "_process", "_statedir", "qmp"}),
        ("qmp/_codec.py", {"_domain", "_connection", "_process", "_statedir", "config", "_broadcast"}),
        ("qmp/_client.py", {"_domain", "_connection", "_process", "_statedir", "config"}),
        ("_process.py", {"_domain", "_connection", "_statedir", "config", "qmp"}),
        ("_statedir.py", {"_domain", "_connection", "_process", "config", "qmp"}),
        ("_domain.py", {"_connection"}),
    ],
)
def test_imports_point_one_way(module: str, forbidden: set[str]) -> None:
    imports = _aiovirt_imports(PKG / module)
    if forbidden == {"*"}:
        assert imports == set(), f"{module} must import nothing of aiovirt, imports {imports}"
    else:
        bad = {i for i in imports if i.split(".")[0] in forbidden}
        assert not bad, f"{module} imports {bad}"


def test_public_api_is_complete() -> None:
    for name in aiovirt.__all__:
        assert getattr(aiovirt, name) is not None
    assert issubclass(aiovirt.StateDirLockedError, aiovirt.StateDirError)
    assert issubclass(aiovirt.CommandError, aiovirt.QMPError)
    assert issubclass(aiovirt.ConnectionLostError, aiovirt.QMPError)
    for exc in (aiovirt.ConfigError, aiovirt.LaunchError, aiovirt.QMPError, aiovirt.StateDirError):
        assert issubclass(exc, aiovirt.AiovirtError)
