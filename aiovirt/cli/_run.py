"""Running one verb: the event loop, Ctrl-C, logging, and every failure as one line and an exit status.

Failures are one line on stderr (``error: domain 'x' not found``) and, with ``--json``, the
``{"error": ...}`` shape on stdout; ``--debug`` adds the traceback and aiovirt's debug log.
The event loop is asyncio's; ``AIOVIRT_CLI_BACKEND=trio`` runs the same verbs on trio (for
aiovirt's own tests, and for whoever wants to check a behaviour there).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

import anyio

import aiovirt

from ._interrupt import Interrupts
from ._output import Output
from ._shapes import CliError, error_shape
from ._verbs import HANDLERS, Context

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "run"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: What a verb may fail with and is reported as one line; anything else is a bug (still one
#: line, with a pointer to --debug).
_EXPECTED = (aiovirt.AiovirtError, CliError, TimeoutError, OSError)


class _Lines(logging.Handler):
    """aiovirt's log as ``warning: ...`` lines on stderr, through :meth:`Output.note`."""

    def __init__(self, out: Output) -> None:
        super().__init__()
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno == logging.WARNING else record.levelname.lower()
        try:
            self._out.note(f"{level}: {record.getMessage()}")
        except Exception:
            self.handleError(record)


def _setup_logging(debug: bool, out: Output) -> logging.Handler:
    handler = _Lines(out)
    logger = logging.getLogger("aiovirt")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False
    return handler


def _hint(exc: BaseException, args: argparse.Namespace) -> str:
    if isinstance(exc, aiovirt.StateDirLockedError):
        return " (verbs that only read still work beside it, e.g. 'aiovirt -r list')"
    return ""


def _report(exc: BaseException, args: argparse.Namespace, out: Output, *, bug: bool = False) -> None:
    if args.debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=out.stderr)
    message = str(exc) or type(exc).__name__
    if bug:
        message = f"internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)"
    elif isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.filename}: {exc.strerror or message}"
    out.error(message + _hint(exc, args))
    if out.json_mode:
        out.json({"error": error_shape(exc)})


async def _amain(ctx: Context) -> int:
    handler = HANDLERS[ctx.args.verb]
    failure: Exception | None = None
    code: int | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(ctx.interrupts.watch)
        try:
            with ctx.interrupts.scope():
                code = await handler(ctx)
        except Exception as exc:
            # Raised here, after the task group: a task group would wrap it in a group.
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return ctx.interrupts.exit_status if code is None else code


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status."""
    out = Output(json_mode=args.json)
    handler = _setup_logging(args.debug, out)
    try:
        try:
            aiovirt.parse_uri(args.connect)
        except aiovirt.InvalidURIError as exc:
            _report(exc, args, out)
            return EXIT_USAGE
        ctx = Context(args, out, Interrupts())
        backend = os.environ.get("AIOVIRT_CLI_BACKEND") or "asyncio"
        try:
            code = anyio.run(_amain, ctx, backend=backend)
        except BaseException as raised:
            failure = _unwrap(raised)
            if isinstance(failure, KeyboardInterrupt):
                out.error("interrupted")
                return EXIT_INTERRUPTED
            if isinstance(failure, _EXPECTED):
                _report(failure, args, out)
                return EXIT_FAILED
            if not isinstance(failure, Exception):
                raise
            _report(failure, args, out, bug=True)
            return EXIT_FAILED
        received = ctx.interrupts.received
        if received is not None and code == ctx.interrupts.exit_status and args.verb != "stop-all":
            out.error("interrupted" if received == signal.SIGINT else f"interrupted ({received.name})")
        return code
    finally:
        logging.getLogger("aiovirt").removeHandler(handler)
