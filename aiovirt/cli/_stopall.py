"""``aiovirt stop-all``: the fleet stop, shown live on a terminal and as lines through a pipe.

On a terminal: a live panel (domains per stage, stopped, failed, time left of the deadline),
redrawn by a task of the event loop (rich's own refresh thread is not used), then a summary
table. Through a pipe: one line per domain as it finishes (JSON lines with ``--json``), then a
summary line (text only).

``stop_all`` reports a domain only once it is finished, so the stage a running domain is in is
inferred from the policy: every domain starts the stages together, and each stage lasts its
timeout, scaled down by the same factor when a ``--deadline`` is shorter than their sum (the rule
:class:`aiovirt.StopPolicy` documents). A domain that skips the ACPI stage (``--acpi-timeout 0``,
a paused one with ``--paused signal``, one still starting) is counted in SIGTERM from the start.

Ctrl-C cancels the ``stop_all`` call: it sends nothing further (no SIGKILL, no new press), what
is known is reported (the unfinished domains as interrupted, not stopped), and the exit status is
130 (143 for SIGTERM, which is handled the same).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

import aiovirt

from ._interrupt import Interrupts
from ._output import Output, format_seconds
from ._shapes import stop_result_shape

if TYPE_CHECKING:
    import argparse

__all__ = [
    "StopProgress",
    "StopSchedule",
    "policy_from_args",
    "render_panel",
    "run_stop_all",
    "summary_rows",
]

#: How often the live panel is redrawn (seconds).
_REFRESH = 0.2


def policy_from_args(args: argparse.Namespace) -> aiovirt.StopPolicy:
    return aiovirt.StopPolicy(
        graceful=args.graceful,
        acpi_timeout=args.acpi_timeout,
        repress_interval=args.repress_interval or None,
        term_timeout=args.term_timeout,
        kill_timeout=args.kill_timeout,
        deadline=args.deadline,
        paused=args.paused,
    )


@dataclass(frozen=True)
class StopSchedule:
    """When each stage ends, in seconds from the start, for a domain that does (or skips) ACPI."""

    policy: aiovirt.StopPolicy

    def _ends(self, acpi: bool) -> tuple[float, float, float]:
        p = self.policy
        acpi_t = p.acpi_timeout if acpi else 0.0
        kill_t = 0.0 if p.graceful else p.kill_timeout
        total = acpi_t + p.term_timeout + kill_t
        scale = 1.0 if p.deadline is None or total <= p.deadline else p.deadline / total
        acpi_end = acpi_t * scale
        term_end = acpi_end + p.term_timeout * scale
        return acpi_end, term_end, term_end + kill_t * scale

    def stage_at(self, elapsed: float, *, acpi: bool) -> aiovirt.StopStage:
        """The stage a domain still running after ``elapsed`` seconds is in."""
        acpi_end, term_end, _ = self._ends(acpi)
        if acpi and elapsed < acpi_end:
            return aiovirt.StopStage.ACPI
        if elapsed < term_end or self.policy.graceful:
            return aiovirt.StopStage.SIGTERM
        return aiovirt.StopStage.SIGKILL

    def time_left(self, elapsed: float) -> tuple[float, bool]:
        """Seconds left and whether that is the deadline (else: the most the stages can take)."""
        if self.policy.deadline is not None:
            return max(0.0, self.policy.deadline - elapsed), True
        return max(0.0, self._ends(True)[2] - elapsed), False


def _skips_acpi(dom: aiovirt.Domain, policy: aiovirt.StopPolicy) -> bool:
    if policy.acpi_timeout == 0:
        return True
    if dom.state == aiovirt.DomainState.PAUSED:
        return dom.reason == aiovirt.StateReason.STARTING_UP or policy.paused == "signal"
    return False


class StopProgress:
    """What is known while ``stop_all`` runs: who finished how, and when it started."""

    def __init__(self, doms: Sequence[aiovirt.Domain], policy: aiovirt.StopPolicy, started_at: float) -> None:
        self.names = [d.name for d in doms]
        self.acpi = {d.name: not _skips_acpi(d, policy) for d in doms}
        self.schedule = StopSchedule(policy)
        self.policy = policy
        self.started_at = started_at
        self.results: dict[str, aiovirt.StopResult] = {}
        self.interrupted = False

    def elapsed(self, now: float) -> float:
        return now - self.started_at

    def stage_counts(self, now: float) -> dict[aiovirt.StopStage, int]:
        counts = {
            s: 0 for s in (aiovirt.StopStage.ACPI, aiovirt.StopStage.SIGTERM, aiovirt.StopStage.SIGKILL)
        }
        elapsed = self.elapsed(now)
        for name in self.names:
            if name not in self.results:
                counts[self.schedule.stage_at(elapsed, acpi=self.acpi[name])] += 1
        return counts

    @property
    def stopped(self) -> int:
        return sum(1 for r in self.results.values() if r.stopped)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results.values() if not r.stopped)

    def unfinished(self, now: float) -> list[aiovirt.StopResult]:
        """Placeholder results for the domains not finished (after an interruption)."""
        elapsed = self.elapsed(now)
        return [
            aiovirt.StopResult(name, False, aiovirt.StopStage.NONE, None, elapsed)
            for name in self.names
            if name not in self.results
        ]

    def all_results(self, now: float) -> list[tuple[aiovirt.StopResult, bool]]:
        """Every domain in the order given: ``(result, interrupted)``."""
        missing = {r.name: r for r in self.unfinished(now)}
        return [(self.results[n], False) if n in self.results else (missing[n], True) for n in self.names]


# -- rendering ---------------------------------------------------------------------------------


def render_panel(progress: StopProgress, now: float, *, done: bool = False) -> RenderableType:
    total = len(progress.names)
    counts = progress.stage_counts(now)
    left, is_deadline = progress.schedule.time_left(progress.elapsed(now))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(justify="left")
    grid.add_column(justify="right")
    grid.add_row("ACPI power button", str(counts[aiovirt.StopStage.ACPI]))
    grid.add_row("after SIGTERM", str(counts[aiovirt.StopStage.SIGTERM]))
    if not progress.policy.graceful:
        grid.add_row("after SIGKILL", str(counts[aiovirt.StopStage.SIGKILL]))
    grid.add_row(Text("stopped", style="green"), Text(str(progress.stopped), style="green"))
    grid.add_row(Text("failed", style="red"), Text(str(progress.failed), style="red"))
    if done:
        timing = f"done in {format_seconds(progress.elapsed(now))}"
    elif is_deadline:
        timing = f"{format_seconds(left)} left of the {progress.policy.deadline:g} s deadline"
    else:
        timing = f"at most {format_seconds(left)} left (no deadline)"
    mode = "graceful: no SIGKILL" if progress.policy.graceful else "ACPI, SIGTERM, SIGKILL"
    title = Text(f"Stopping {total} domain{'s' if total != 1 else ''} ({mode})", style="bold")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(total, 1), completed=len(progress.results), width=40),
        Text(f"{len(progress.results)}/{total} finished"),
    )
    return Group(title, grid, bar, Text(timing))


def summary_rows(progress: StopProgress, now: float) -> tuple[list[str], list[list[str | Text]]]:
    """The summary table's headers and rows, one per domain in the order given."""
    rows = progress.all_results(now)
    errors = any(interrupted or result.error is not None for result, interrupted in rows)
    headers = ["Name", "Result", "Stage", "Reason", "Elapsed", *(["Error"] if errors else [])]
    body: list[list[str | Text]] = []
    for result, interrupted in rows:
        if result.stopped:
            outcome = Text("stopped", style="green")
        else:
            outcome = Text("interrupted" if interrupted else "NOT stopped", style="red")
        error = "stop-all interrupted" if interrupted else (str(result.error) if result.error else "")
        cells: list[str | Text] = [
            result.name,
            outcome,
            str(result.stage),
            result.reason or "",
            format_seconds(result.elapsed),
        ]
        body.append(cells + ([error] if errors else []))
    return headers, body


def result_line(result: aiovirt.StopResult, *, interrupted: bool = False) -> str:
    if result.stopped:
        how = str(result.stage) + (f", {result.reason}" if result.reason else "")
        by = " by another task" if result.by_other else ""
        return f"{result.name}: stopped ({how}){by} in {format_seconds(result.elapsed)}"
    why = "interrupted (Ctrl-C)" if interrupted else (str(result.error) if result.error else "not stopped")
    return f"{result.name}: NOT stopped after {format_seconds(result.elapsed)}: {why}"


# -- running -----------------------------------------------------------------------------------


@contextmanager
def _live(out: Output, progress: StopProgress) -> Iterator[Live | None]:
    if out.json_mode or not out.terminal:
        yield None
        return
    # auto_refresh=False: no refresh thread; the event loop redraws (see _redraw).
    with Live(
        render_panel(progress, anyio.current_time()),
        console=out.console,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        yield live


async def _redraw(live: Live, progress: StopProgress) -> None:
    while True:
        live.update(render_panel(progress, anyio.current_time()), refresh=True)
        await anyio.sleep(_REFRESH)


async def run_stop_all(
    conn: aiovirt.Connection,
    doms: Sequence[aiovirt.Domain],
    policy: aiovirt.StopPolicy,
    limit: int,
    out: Output,
    interrupts: Interrupts,
) -> int:
    """Stop ``doms`` and report; the exit status (0 all stopped, 1 any not, 130 interrupted)."""
    if not doms:
        if out.json_mode:
            return 0
        out.line("No active domains to stop.")
        return 0
    progress = StopProgress(doms, policy, anyio.current_time())
    lines = out.json_mode or not out.terminal

    def finished(result: aiovirt.StopResult) -> None:
        progress.results[result.name] = result
        if out.json_mode:
            out.json(stop_result_shape(result), lines=True)
        elif lines:
            out.line(result_line(result))

    with _live(out, progress) as live:
        async with anyio.create_task_group() as tg:
            if live is not None:
                tg.start_soon(_redraw, live, progress)
            with interrupts.scope() as scope:
                await conn.stop_all(doms, policy, limit, on_result=finished)
            progress.interrupted = scope.cancelled_caught
            tg.cancel_scope.cancel()
        now = anyio.current_time()
        if live is not None:
            live.update(render_panel(progress, now, done=not progress.interrupted), refresh=True)

    now = anyio.current_time()
    if progress.interrupted:
        for result in progress.unfinished(now):
            if out.json_mode:
                out.json(stop_result_shape(result, interrupted=True), lines=True)
            elif lines:
                out.line(result_line(result, interrupted=True))
    if not out.json_mode:
        if not lines:
            headers, rows = summary_rows(progress, now)
            out.columns(headers, rows, right=("Elapsed",))
        stopped, total = progress.stopped, len(progress.names)
        tail = " (interrupted: nothing further was sent)" if progress.interrupted else ""
        out.line(
            f"Stopped {stopped} of {total} domain{'s' if total != 1 else ''} in "
            f"{format_seconds(progress.elapsed(now))}{tail}."
        )
    if progress.interrupted:
        return interrupts.exit_status
    return 0 if progress.stopped == len(progress.names) else 1
