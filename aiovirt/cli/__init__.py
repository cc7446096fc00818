"""The ``aiovirt`` command (also ``python -m aiovirt``): virsh's verbs over aiovirt's public API.

``main(argv)`` parses the command line first, with the standard library only, so that ``--help``
and usage errors cost no import of the QEMU driver or anyio; only then is the verb run.

Modules: :mod:`._args` (the command line), :mod:`._run` (event loop, errors, exit status),
:mod:`._session` (the connection and its read-only fallback), :mod:`._verbs` (one function per
verb), :mod:`._shapes` (the ``--json`` shapes, documented there), :mod:`._output` (tables and
lines), :mod:`._stopall` (the live fleet stop), :mod:`._interrupt` (Ctrl-C as a cancel scope).

Exit status: 0 success; 1 the operation failed (``stop-all``: a domain was not stopped); 2 usage
error (also a malformed URI); 130 interrupted by Ctrl-C (143 by SIGTERM, handled the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    from ._args import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    from ._run import run

    return run(args)
