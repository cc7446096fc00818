"""Untrusted XML in: a safe parse into a small tree that knows each element's line.

defusedxml's expat reader refuses entity declarations (so entity-expansion bombs and external
entities never expand) and external references; this module also refuses any DTD (a DTD's
``<!ATTLIST>`` defaults would add attributes the text does not show) and input larger than
:data:`MAX_XML_BYTES`. Every refusal and every syntax error is one :class:`ConfigError` line that
names the problem and where it is.

The tree (:class:`Node`) keeps namespaces as URIs (``qemu:`` is only a prefix), attributes, the
element's text and its line, and a slot for what the importer did with it, so that nothing in
a document can be passed over without a record.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal
from xml.sax import SAXException, SAXParseException
from xml.sax.handler import ContentHandler, ErrorHandler, LexicalHandler, feature_namespaces
from xml.sax.handler import property_lexical_handler as _LEXICAL
from xml.sax.xmlreader import AttributesNSImpl, InputSource, Locator

from defusedxml.common import EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.expatreader import DefusedExpatParser

from .._errors import ConfigError

__all__ = [
    "LIBVIRT_NS",
    "MAX_XML_BYTES",
    "MAX_XML_DEPTH",
    "MAX_XML_ELEMENTS",
    "QEMU_NS",
    "Node",
    "Outcome",
    "parse_xml",
]

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
"""libvirt's namespace for QEMU-specific elements (``<qemu:commandline>``)."""

LIBVIRT_NS = ""
"""libvirt's own elements have no namespace."""

MAX_XML_BYTES = 4 << 20
"""The largest document accepted: 4 MiB (a domain XML is a few KiB)."""

MAX_XML_ELEMENTS = 10_000
"""The most elements a document may have (libvirt's busiest domains have a few hundred): a
document of millions of tiny elements would cost hundreds of MiB as a tree."""

MAX_XML_DEPTH = 64
"""The deepest nesting accepted (a domain XML nests about 6 deep)."""

Outcome = Literal["mapped", "accepted", "warned", "error"]
"""What the importer did with an element: ``mapped`` into the config, ``accepted`` because it
changes nothing aiovirt runs, ``warned`` about (aiovirt runs something different), or an ``error``
(aiovirt cannot honour it)."""


@dataclass(eq=False)
class Node:
    """One element of a parsed document."""

    ns: str
    """The element's namespace URI; ``""`` for libvirt's own elements."""
    name: str
    """The local name (without any prefix)."""
    attrs: dict[str, str]
    """Attributes without a namespace by name; namespaced ones as ``{uri}name``."""
    line: int
    """The line of the element's start tag (1-based)."""
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    text: str = ""
    """The element's own character data (not its children's), unstripped."""
    outcome: Outcome | None = None
    """Set by the importer for this element."""
    covers_children: bool = False
    """Whether ``outcome`` holds for the whole subtree (an accepted or refused element's
    contents need no record of their own)."""
    note: str = ""
    """The warning or error text, for ``warned`` and ``error``."""
    path: str = ""
    """An XPath-like location, ``/domain/devices/disk[2]/target`` (set once the document is read)."""

    @property
    def tag(self) -> str:
        """The element as it reads in messages: ``<interface type='bridge'>`` style, short."""
        name = f"qemu:{self.name}" if self.ns == QEMU_NS else self.name
        shown = [
            f"{key}='{self.attrs[key][:40]}'" for key in ("type", "model", "device") if key in self.attrs
        ]
        return "<" + " ".join([name, *shown]) + ">"

    def walk(self) -> Iterator[Node]:
        """This element and all below it, in document order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, name: str, ns: str = LIBVIRT_NS) -> list[Node]:
        """The children called ``name``."""
        return [c for c in self.children if c.name == name and c.ns == ns]


class _Builder(ContentHandler, LexicalHandler):
    def __init__(self) -> None:
        super().__init__()
        self.root: Node | None = None
        self.count = 0
        self._stack: list[Node] = []
        self._text: list[list[str]] = []
        self._locator: Locator | None = None

    def setDocumentLocator(self, locator: Locator) -> None:
        self._locator = locator

    def line(self) -> int:
        line = self._locator.getLineNumber() if self._locator is not None else None
        return line or 0

    def startElementNS(
        self, name: tuple[str | None, str], qname: str | None, attrs: AttributesNSImpl
    ) -> None:
        attributes = {
            (local if not uri else f"{{{uri}}}{local}"): value for (uri, local), value in attrs.items()
        }
        self.count += 1
        if self.count > MAX_XML_ELEMENTS:
            raise _Refused(self.line(), f"more than {MAX_XML_ELEMENTS} elements: not a domain XML")
        if len(self._stack) >= MAX_XML_DEPTH:
            raise _Refused(self.line(), f"elements nested more than {MAX_XML_DEPTH} deep: not a domain XML")
        parent = self._stack[-1] if self._stack else None
        node = Node(ns=name[0] or "", name=name[1], attrs=attributes, line=self.line(), parent=parent)
        if parent is None:
            self.root = node
        else:
            parent.children.append(node)
        self._stack.append(node)
        self._text.append([])

    def endElementNS(self, name: tuple[str | None, str], qname: str | None) -> None:
        node = self._stack.pop()
        node.text = "".join(self._text.pop())

    def characters(self, content: str) -> None:
        if self._text:
            self._text[-1].append(content)

    def endDTD(self) -> None:
        # Refused once the internal subset was read, so an entity declaration in it is reported
        # as what it is (defusedxml raises for it first).
        raise _Refused(self.line(), "a DTD (<!DOCTYPE ...>) is not accepted in a domain XML")


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Errors(ErrorHandler):
    """The default handler raises for errors; its warning() would print."""

    def warning(self, exception: BaseException) -> None:
        pass  # expat reports nothing as a warning


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_xml(text: str | bytes, *, what: str = "domain XML") -> Node:
    """Parse untrusted ``text`` into a :class:`Node` tree, refusing anything unsafe.

    Raises :class:`ConfigError` (one line, starting with ``what``) for malformed XML (with its
    line and column), an entity declaration (the start of every entity-expansion bomb and every
    external entity), an external reference, a DTD, or input over :data:`MAX_XML_BYTES`.
    """
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > MAX_XML_BYTES:
        raise _error(what, f"{size} bytes is more than the {MAX_XML_BYTES} accepted")
    builder = _Builder()
    parser = DefusedExpatParser(forbid_dtd=False, forbid_entities=True, forbid_external=True)
    parser.setFeature(feature_namespaces, True)
    parser.setContentHandler(builder)
    parser.setErrorHandler(_Errors())
    parser.setProperty(_LEXICAL, builder)
    source = InputSource()
    if isinstance(text, str):
        source.setCharacterStream(io.StringIO(text))
    else:
        source.setByteStream(io.BytesIO(text))
    try:
        parser.parse(source)  # parse(), not feed(): only parse() hands the builder a locator
    except EntitiesForbidden as exc:
        if exc.sysid is not None or exc.pubid is not None:
            problem = f"external entity {exc.name!r} ({exc.sysid or exc.pubid!r}) refused: nothing is fetched"
        else:
            problem = f"entity {exc.name!r} declared: entity declarations are refused (no entity expansion)"
        raise _error(what, f"line {builder.line()}: {problem}") from None
    except ExternalReferenceForbidden as exc:
        raise _error(
            what, f"line {builder.line()}: external reference {exc.sysid!r} refused: nothing is fetched"
        ) from None
    except _Refused as exc:
        raise _error(what, f"line {exc.line}: {exc.message}") from None
    except SAXParseException as exc:
        message = _one_line(exc.getMessage())
        line, column = exc.getLineNumber() or 0, (exc.getColumnNumber() or 0) + 1
        raise _error(what, f"malformed XML at line {line}, column {column}: {message}") from None
    except SAXException as exc:
        raise _error(what, f"malformed XML: {_one_line(exc.getMessage())}") from None
    except UnicodeError as exc:
        raise _error(what, f"not valid text: {exc}") from None
    if builder.root is None:  # pragma: no cover - expat reports "no element found" first
        raise _error(what, "no element found")
    _set_paths(builder.root, "/" + _segment(builder.root))
    return builder.root


def _segment(node: Node) -> str:
    if node.ns == QEMU_NS:
        return f"qemu:{node.name}"
    return node.name if node.ns == "" else f"{{{node.ns}}}{node.name}"


def _set_paths(node: Node, path: str) -> None:
    """Give every element its path, in one pass (an index only where a name repeats)."""
    node.path = path
    totals = Counter((c.ns, c.name) for c in node.children)
    seen: Counter[tuple[str, str]] = Counter()
    for child in node.children:
        key = (child.ns, child.name)
        seen[key] += 1
        index = f"[{seen[key]}]" if totals[key] > 1 else ""
        _set_paths(child, f"{path}/{_segment(child)}{index}")


def _error(what: str, message: str) -> ConfigError:
    return ConfigError(f"invalid {what}: {message}", [("", message)])
