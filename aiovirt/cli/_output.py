"""Output for people (rich tables, aligned key/value lines) and for scripts (JSON), and stderr lines.

rich renders the tables: on a terminal with colour, through a pipe as plain text sized to its
content (never cut to 80 columns). Nothing here is interpreted as rich markup: names, paths and
messages are printed as they are.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import aiovirt

__all__ = ["STATE_STYLES", "Output", "format_bytes", "format_seconds"]

STATE_STYLES = {
    "running": "green",
    "paused": "yellow",
    "shutdown": "yellow",
    "shutoff": "dim",
    "crashed": "red",
}

#: Width given to rich when stdout is not a terminal: a table is as wide as its content.
_PIPE_WIDTH = 4096


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _console(file: IO[str]) -> Console:
    terminal = file.isatty()
    return Console(
        file=file,
        markup=False,
        highlight=False,
        emoji=False,
        soft_wrap=False,
        width=None if terminal else _PIPE_WIDTH,
    )


class Output:
    """Where a verb writes: ``stdout`` for results, ``stderr`` for notes, warnings and errors."""

    def __init__(self, *, json_mode: bool, stdout: IO[str] | None = None, stderr: IO[str] | None = None):
        self.json_mode = json_mode
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = _console(self.stdout)
        return self._console

    @property
    def terminal(self) -> bool:
        return self.stdout.isatty()

    # -- lines ----------------------------------------------------------------------------------

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def note(self, text: str) -> None:
        """One line on stderr (a note, a warning, the fallback to read-only)."""
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def warning(self, text: str) -> None:
        self.note(f"warning: {text}")

    def error(self, text: str) -> None:
        # One line: a multi-line message (a QEMU log excerpt) is joined, not cut.
        self.note("error: " + " ".join(text.split("\n")).strip())

    def raw(self, data: bytes) -> None:
        """Bytes as they are (a guest's console output, as cat shows it)."""
        buffer = getattr(self.stdout, "buffer", None)
        if buffer is not None:
            self.stdout.flush()
            buffer.write(data)
            buffer.flush()
        else:
            self.stdout.write(data.decode("utf-8", errors="replace"))
            self.stdout.flush()

    def json(self, obj: Any, *, lines: bool = False) -> None:
        """``obj`` as JSON: indented, or compact on one line for JSON lines."""
        text = json.dumps(obj, ensure_ascii=False) if lines else json.dumps(obj, indent=2, ensure_ascii=False)
        self.line(text)

    # -- people ---------------------------------------------------------------------------------

    def table(self, table: Table) -> None:
        if self.terminal:
            self.console.print(table)
            return
        # Through a pipe: no padding after the last column (rich pads every cell).
        with self.console.capture() as captured:
            self.console.print(table)
        for line in captured.get().splitlines():
            self.line(line.rstrip())

    def domains(self, doms: Sequence[aiovirt.Domain]) -> None:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for column, justify in (
            ("Name", "left"),
            ("State", "left"),
            ("Reason", "left"),
            ("PID", "right"),
            ("vCPUs", "right"),
            ("Memory", "right"),
            ("Autostart", "left"),
            ("Persistent", "left"),
        ):
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for dom in doms:
            state = str(dom.state)
            table.add_row(
                dom.name,
                Text(state, style=STATE_STYLES.get(state, "")),
                str(dom.reason),
                "-" if dom.pid is None else str(dom.pid),
                str(dom.config.vcpus),
                f"{dom.config.memory_mib} MiB",
                "yes" if dom.autostart else "no",
                "yes" if dom.persistent else "no",
            )
        self.table(table)

    def fields(self, pairs: Iterable[tuple[str, str]]) -> None:
        """``Key:   value`` lines, aligned as virsh's dominfo."""
        items = list(pairs)
        width = max((len(key) for key, _ in items), default=0) + 2
        for key, value in items:
            self.line(f"{key + ':':<{width}}{value}")
