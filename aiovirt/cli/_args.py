"""The command line: global options, verbs with virsh's names and flags, their help and examples.

Standard library only (argparse), beside the ``aiovirt`` package itself: ``aiovirt --help``
and every usage error are answered before anything of aiovirt's machinery (anyio, the QEMU
driver) is imported. argparse was chosen over click or typer for that start-up time, for its
exit code 2 on usage errors (the documented one), and because it needs no dependency.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiovirt  # already imported (this is its subpackage); only its version is read

__all__ = ["VERBS", "Access", "VerbSpec", "build_parser"]

Access = Literal["read", "write"]
"""``read``: falls back to a read-only connection when another process holds the state
directory; ``write``: needs the state directory's lock (and fails naming its holder)."""


@dataclass(frozen=True)
class VerbSpec:
    name: str
    access: Access
    summary: str
    example: str


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, not {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


VERBS: dict[str, VerbSpec] = {
    v.name: v
    for v in [
        VerbSpec("list", "read", "list domains (active ones unless --all)", "aiovirt list --all"),
        VerbSpec(
            "define",
            "write",
            "define (or redefine) a domain from a JSON, TOML or libvirt domain XML file",
            "aiovirt define web-1.toml",
        ),
        VerbSpec("undefine", "write", "remove a domain's persistent definition", "aiovirt undefine web-1"),
        VerbSpec("start", "write", "start a defined domain", "aiovirt start web-1"),
        VerbSpec(
            "shutdown",
            "write",
            "press the ACPI power button (the guest decides); --wait until it is shut off",
            "aiovirt shutdown web-1 --wait --timeout 60",
        ),
        VerbSpec(
            "destroy",
            "write",
            "stop QEMU at once: SIGTERM, then SIGKILL unless --graceful",
            "aiovirt destroy web-1 --graceful --timeout 10",
        ),
        VerbSpec("suspend", "write", "pause a domain's CPUs", "aiovirt suspend web-1"),
        VerbSpec("resume", "write", "resume a paused domain", "aiovirt resume web-1"),
        VerbSpec("reset", "write", "hard-reset a domain's machine", "aiovirt reset web-1"),
        VerbSpec("dominfo", "read", "show a domain's details", "aiovirt dominfo web-1"),
        VerbSpec("domstate", "read", "show a domain's state", "aiovirt domstate web-1 --reason"),
        VerbSpec(
            "dumpconfig",
            "read",
            "print a domain's config as TOML (or JSON), ready for define",
            "aiovirt dumpconfig web-1 --format json > web-1.json",
        ),
        VerbSpec(
            "dumpxml",
            "read",
            "print a domain's config as libvirt domain XML",
            "aiovirt dumpxml web-1 > web-1.xml",
        ),
        VerbSpec(
            "autostart",
            "write",
            "start a domain whenever a connection opens its state directory (--disable: no more)",
            "aiovirt autostart web-1",
        ),
        VerbSpec(
            "console-log",
            "read",
            "print what the domain wrote to its serial console (--follow: and what it writes next)",
            "aiovirt console-log web-1 --follow",
        ),
        VerbSpec(
            "console",
            "write",
            "attach to a domain's serial console: type to it, see what it prints (Ctrl-] detaches)",
            "aiovirt console web-1",
        ),
        VerbSpec(
            "event",
            "write",
            "wait for lifecycle events (one, or --loop until Ctrl-C or --timeout)",
            "aiovirt event --domain web-1 --loop --timeout 300",
        ),
        VerbSpec(
            "stop-all",
            "write",
            "stop every active domain (or those named) within one policy: ACPI, SIGTERM, SIGKILL",
            "aiovirt stop-all --graceful --deadline 90",
        ),
    ]
}


_DESCRIPTION = """\
Define, start, inspect and stop QEMU virtual machines ("domains") with virsh's verbs and
libvirt's semantics, with no daemon.

The connection URI is -c/--connect, else $AIOVIRT_DEFAULT_URI, else qemu:///system for root and
qemu:///session otherwise. One process at a time controls a state directory: while another
holds it, verbs that only read fall back to a read-only view (and say so on stderr), and verbs
that change something fail naming the holder's pid.
"""

_EPILOG = """\
exit status: 0 success; 1 the operation failed (stop-all: a domain was not stopped);
2 usage error (including a malformed URI); 130 interrupted by Ctrl-C (143: SIGTERM).

examples:
  aiovirt -c 'qemu:///embed?root=/srv/vms' list --all
  aiovirt define web-1.toml && aiovirt start web-1
  aiovirt -r list --json              # beside a running controller
  aiovirt stop-all --deadline 90      # the whole host's fleet
Run 'aiovirt VERB --help' for a verb's flags.
"""


def _add_global_options(parser: argparse.ArgumentParser, *, in_verb: bool) -> None:
    # In a verb's parser the defaults are SUPPRESS, so that "aiovirt --json list" and
    # "aiovirt list --json" both work and neither overwrites the other.
    def default(value: object) -> object:
        return argparse.SUPPRESS if in_verb else value

    group = parser.add_argument_group("global options") if in_verb else parser
    group.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        default=default(None),
        help="connection URI (default: $AIOVIRT_DEFAULT_URI, else qemu:///system for root, qemu:///session)",
    )
    group.add_argument(
        "-r",
        "--readonly",
        action="store_true",
        default=default(False),
        help="read-only connection: takes no lock, sends nothing, changes nothing",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable output (shapes in the 'aiovirt.cli' docs)",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show tracebacks and aiovirt's debug log on stderr",
    )


class _Subparsers(Protocol):
    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def _verb_parser(sub: _Subparsers, spec: VerbSpec) -> argparse.ArgumentParser:
    access = (
        "Reads only: works beside another controller (read-only view)."
        if spec.access == "read"
        else "Needs the state directory (fails if another process holds it)."
    )
    parser = sub.add_parser(
        spec.name,
        help=spec.summary,
        description=f"{spec.summary[0].upper()}{spec.summary[1:]}.\n{access}",
        epilog=f"example:\n  {spec.example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, in_verb=True)
    return parser


def _domain_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", metavar="DOMAIN", help="the domain's name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiovirt",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, in_verb=False)
    parser.add_argument("--version", action="version", version=f"aiovirt {aiovirt.__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    sub.required = True

    p = _verb_parser(sub, VERBS["list"])
    p.add_argument("--all", action="store_true", help="also inactive (shut off) domains")
    p.add_argument("--inactive", action="store_true", help="only inactive domains")
    p.add_argument("--name", action="store_true", help="print only the names, one per line")
    states = p.add_mutually_exclusive_group()
    for state in ("running", "paused", "shutoff"):
        states.add_argument(
            f"--state-{state}",
            dest="state",
            action="store_const",
            const=state,
            help=f"only {state} domains (active or not)",
        )

    p = _verb_parser(sub, VERBS["define"])
    p.add_argument(
        "file",
        metavar="FILE",
        help="a DomainConfig as .json or .toml, or a libvirt domain .xml (else chosen by content)",
    )

    for name in ("undefine", "start"):
        _domain_arg(_verb_parser(sub, VERBS[name]))

    p = _verb_parser(sub, VERBS["shutdown"])
    _domain_arg(p)
    p.add_argument("--wait", action="store_true", help="wait until the domain is shut off")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help="with --wait (implied): give up after S seconds, exit status 1",
    )

    p = _verb_parser(sub, VERBS["destroy"])
    _domain_arg(p)
    p.add_argument(
        "--graceful",
        action="store_true",
        help="never send SIGKILL: fail if QEMU outlives SIGTERM's timeout",
    )
    p.add_argument(
        "--timeout", type=_seconds, default=10.0, metavar="S", help="seconds to wait after SIGTERM (10)"
    )
    p.add_argument("--remove-logs", action="store_true", help="delete the domain's log and console files")

    for name in ("suspend", "resume", "reset", "dominfo"):
        _domain_arg(_verb_parser(sub, VERBS[name]))

    p = _verb_parser(sub, VERBS["domstate"])
    _domain_arg(p)
    p.add_argument("--reason", action="store_true", help="also the reason for the state")

    p = _verb_parser(sub, VERBS["dumpconfig"])
    _domain_arg(p)
    p.add_argument("--format", choices=("toml", "json"), default="toml", help="toml (default) or json")

    _domain_arg(_verb_parser(sub, VERBS["dumpxml"]))

    p = _verb_parser(sub, VERBS["autostart"])
    _domain_arg(p)
    p.add_argument("--disable", action="store_true", help="no longer start it automatically")

    p = _verb_parser(sub, VERBS["console-log"])
    _domain_arg(p)
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep printing what it writes, until it stops or Ctrl-C",
    )

    _domain_arg(_verb_parser(sub, VERBS["console"]))

    p = _verb_parser(sub, VERBS["event"])
    p.add_argument("--domain", metavar="NAME", help="only this domain's events")
    p.add_argument("--loop", action="store_true", help="print events until Ctrl-C (or --timeout)")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help="stop waiting after S seconds (without --loop and with no event: exit status 1)",
    )

    p = _verb_parser(sub, VERBS["stop-all"])
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="only these (default: every active domain)")
    p.add_argument("--graceful", action="store_true", help="never send SIGKILL")
    p.add_argument(
        "--acpi-timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="seconds of the ACPI stage (60; 0 skips it)",
    )
    p.add_argument(
        "--repress-interval",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="press the power button again every S seconds (10; 0 presses once)",
    )
    p.add_argument(
        "--term-timeout", type=_seconds, default=10.0, metavar="S", help="seconds to wait after SIGTERM (10)"
    )
    p.add_argument(
        "--kill-timeout", type=_seconds, default=30.0, metavar="S", help="seconds to wait after SIGKILL (30)"
    )
    p.add_argument(
        "--deadline",
        type=_positive_seconds,
        metavar="S",
        help="overall seconds: the stages are scaled down together to fit",
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=64,
        metavar="N",
        help="QMP requests in flight at once (64); never limits the waiting",
    )
    p.add_argument(
        "--paused",
        choices=("resume", "signal", "report"),
        default="resume",
        help="a paused domain: resume then press (default), signal only, or report and leave it",
    )
    return parser
