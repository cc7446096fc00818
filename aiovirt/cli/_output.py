"""Output for people (aligned tables, key/value lines), for scripts (JSON), and stderr lines.

rich renders it: on a terminal with colour, through a pipe as plain text sized to its content
(never cut to 80 columns, no trailing blanks). Nothing here is interpreted as rich markup:
names, paths and messages are printed as they are.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console
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

_GAP = "   "

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
        self.noted: list[str] = []
        """Every line written to stderr, so that a verb does not repeat what the library logged."""

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
        self.noted.append(text)
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

    def columns(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[str | Text]],
        right: Iterable[str] = (),
    ) -> None:
        """An aligned table: a bold header, a rule, one line per row (``right``: right-justified).

        Built as one rich ``Text`` rather than a rich ``Table``, which costs about a millisecond
        per row: ``list`` of 1,000 domains would spend most of its time there.
        """
        body = [[cell if isinstance(cell, Text) else Text(cell) for cell in row] for row in rows]
        widths = [cell_len(h) for h in headers]
        for row in body:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], cell.cell_len)
        flush_right = set(right)
        out = Text()

        def add(cells: Sequence[Text], names: Sequence[str]) -> None:
            for i, (cell, name) in enumerate(zip(cells, names, strict=True)):
                pad = " " * (widths[i] - cell.cell_len)
                last = i == len(cells) - 1
                if name in flush_right:
                    out.append(pad)
                    out.append_text(cell)
                else:
                    out.append_text(cell)
                    if not last:
                        out.append(pad)
                if not last:
                    out.append(_GAP)
            out.append("\n")

        add([Text(h, style="bold") for h in headers], headers)
        out.append("\u2500" * (sum(widths) + len(_GAP) * (len(widths) - 1)) + "\n", style="dim")
        for row in body:
            add(row, headers)
        self.console.print(out, end="", soft_wrap=True)

    def domains(self, doms: Sequence[aiovirt.Domain]) -> None:
        rows: list[list[str | Text]] = []
        for dom in doms:
            state = str(dom.state)
            rows.append(
                [
                    dom.name,
                    Text(state, style=STATE_STYLES.get(state, "")),
                    str(dom.reason),
                    "-" if dom.pid is None else str(dom.pid),
                    str(dom.config.vcpus),
                    f"{dom.config.memory_mib} MiB",
                    "yes" if dom.autostart else "no",
                    "yes" if dom.persistent else "no",
                ]
            )
        self.columns(
            ["Name", "State", "Reason", "PID", "vCPUs", "Memory", "Autostart", "Persistent"],
            rows,
            right=("PID", "vCPUs", "Memory"),
        )

    def fields(self, pairs: Iterable[tuple[str, str]]) -> None:
        """``Key:   value`` lines, aligned as virsh's dominfo."""
        items = list(pairs)
        width = max((len(key) for key, _ in items), default=0) + 2
        for key, value in items:
            self.line(f"{key + ':':<{width}}{value}")
