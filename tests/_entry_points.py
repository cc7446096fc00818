"""Child Pythons that see this checkout as the installed aiovirt, entry points included (not a test module).

A pytest run in a child process loads aiovirt's plugin through its ``pytest11`` entry point, which
comes from the metadata of the installed distribution. An editable install made before
``pyproject.toml`` gained an entry point does not have it, and may point at another checkout; so
the child gets this checkout first on ``PYTHONPATH`` and, beside it, a ``.dist-info`` whose
``entry_points.txt`` holds the ``[project.entry-points]`` tables of this checkout's
``pyproject.toml``, written the way an installer writes them. Then the child's pytest finds the
plugin exactly as it does for a user who installed aiovirt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def write_checkout_metadata(into: Path) -> Path:
    """Write ``aiovirt-VERSION.dist-info`` (METADATA, entry_points.txt) into ``into``; return ``into``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist = into / f"{project['name']}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    sections = []
    for group, entries in project.get("entry-points", {}).items():
        sections.append(f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items()))
    (dist / "entry_points.txt").write_text("\n".join(sections))
    return into


def child_env(metadata_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that imports this checkout's aiovirt and sees its entry points."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(metadata_dir), out.get("PYTHONPATH", "")) if p
    )
    out.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)  # the child must load plugins by entry point
    out.pop("PYTEST_ADDOPTS", None)
    return out
