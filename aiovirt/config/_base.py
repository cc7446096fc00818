"""The base of every config model: frozen, no extra fields, and ConfigError instead of pydantic's errors.

pydantic's ``ValidationError`` never leaves this package: constructing a model (``Model(...)``),
validating data (``Model.model_validate``, ``Model.model_validate_json``, ``Model.parse``) and assigning
to a frozen field all raise :class:`aiovirt._errors.ConfigError`, whose ``errors`` lists every problem
as ``(location, message)`` pairs. Locations are dotted paths into the input (``"disks.0.path"``);
the empty string stands for the input as a whole (e.g. text that is not JSON).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from .._errors import ConfigError

__all__ = ["ConfigModel", "CrossFieldErrors", "config_error_from"]

_MAX_INPUT_REPR = 80
_FROZEN = "cannot be assigned: configs are frozen (copy with model_copy(update=...), then parse)"


class CrossFieldErrors(ValueError):
    """Raised by a model validator to report several problems, each at its own location.

    pydantic wraps it in its ``ValidationError`` at the location of the model; the translation to
    :class:`ConfigError` unpacks it, so each problem keeps its own field as location.
    """

    def __init__(self, problems: Iterable[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{_join(loc) or '(input)'}: {msg}" for loc, msg in self.problems))


def _join(loc: Iterable[str | int]) -> str:
    return ".".join(str(part) for part in loc)


def _shown_input(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_INPUT_REPR:
        text = text[: _MAX_INPUT_REPR - 3] + "..."
    return f" (got {text})"


def config_error_from(exc: ValidationError, what: str) -> ConfigError:
    """Translate a pydantic ``ValidationError`` about a ``what`` into a readable :class:`ConfigError`."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, CrossFieldErrors):
            problems.extend((_join(loc + sub), msg) for sub, msg in cause.problems)
            continue
        if isinstance(cause, ConfigError):
            # A nested model given as a mapping: pydantic calls its __init__ (see ConfigModel),
            # which already translated its problems; prefix their locations with this one.
            prefix = _join(loc)
            problems.extend((".".join(p for p in (prefix, sub) if p), msg) for sub, msg in cause.errors)
            continue
        if err["type"] == "frozen_instance":
            problems.append((_join(loc), _FROZEN))
            continue
        if err["type"] in ("value_error", "assertion_error") and isinstance(cause, BaseException):
            message = str(cause)
        else:
            message = err["msg"]
        value = err.get("input")
        if err["type"] != "missing" and (value is None or isinstance(value, (str, bytes, int, float))):
            message += _shown_input(value)
        problems.append((_join(loc), message))
    if len(problems) == 1:
        text = f"invalid {what}: {_describe(problems[0])}"
    else:
        text = f"invalid {what} ({len(problems)} problems): " + "; ".join(_describe(p) for p in problems)
    return ConfigError(text, problems)


def _describe(problem: tuple[str, str]) -> str:
    loc, message = problem
    return f"{loc}: {message}" if loc else message


class ConfigModel(BaseModel):
    """A frozen model that rejects unknown fields and reports problems as :class:`ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error_from(exc, type(self).__name__) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise config_error_from(exc, type(self).__name__) from exc

    def __delattr__(self, name: str) -> None:
        try:
            super().__delattr__(name)
        except ValidationError as exc:
            raise config_error_from(exc, type(self).__name__) from exc

    @classmethod
    def model_validate(cls, *args: Any, **kwargs: Any) -> Self:
        """pydantic's ``model_validate``, raising :class:`ConfigError` for invalid input."""
        try:
            return super().model_validate(*args, **kwargs)
        except ValidationError as exc:
            raise config_error_from(exc, cls.__name__) from exc

    @classmethod
    def model_validate_json(cls, *args: Any, **kwargs: Any) -> Self:
        """pydantic's ``model_validate_json``, raising :class:`ConfigError` for invalid input."""
        try:
            return super().model_validate_json(*args, **kwargs)
        except ValidationError as exc:
            raise config_error_from(exc, cls.__name__) from exc

    @classmethod
    def parse(cls, data: Mapping[str, Any] | str | bytes) -> Self:
        """Validate ``data``: a mapping of field values, or the model's JSON text.

        This is the checked way back from ``model_dump(mode="json")`` (or ``model_dump_json()``):
        ``Model.parse(m.model_dump(mode="json")) == m`` for every valid model ``m``. Use it to
        re-validate a model made with ``model_copy(update=...)``, which pydantic does not validate.

        Raises :class:`ConfigError` when ``data`` is not valid (or not a mapping or text at all).
        """
        if isinstance(data, (str, bytes)):
            return cls.model_validate_json(data)
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"invalid {cls.__name__}: expected a mapping or JSON text, got {type(data).__name__}",
                [("", f"expected a mapping or JSON text, got {type(data).__name__}")],
            )
        return cls.model_validate(dict(data))
