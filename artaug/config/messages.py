"""One-line configuration errors: pydantic's validation errors rewritten as `field: value problem`.

Pydantic reports every error with a location tuple and a machine type; users of `--set` and YAML
files want the dotted field they typed, the value they gave and what is wrong with it, on one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from pydantic import ValidationError

from artaug.errors import ArtaugError


class ConfigError(ArtaugError, ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


_UNSET = object()


class Invalid(ValueError):
    """Raised by the sections' validators: `problem` of `value`; `field` names it in a section check.

    Pydantic wraps a ValueError raised in a validator and keeps the instance, so `translate` can read
    the field and value back instead of parsing a message.
    """

    def __init__(self, problem: str, value: Any = _UNSET, field: str | None = None):
        super().__init__(problem)
        self.problem, self.value, self.field = problem, value, field


@dataclasses.dataclass(frozen=True)
class Why:
    """Annotated metadata pydantic ignores: the reason appended to a field's bound or choice error."""

    text: str


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dataclass_type": "a mapping",
    "dataclass_args_type": "a mapping",
    "dict_type": "a mapping",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def translate(error: ValidationError, root: type) -> ConfigError:
    """The first error of `error`, raised while building `root`, as one ConfigError line."""
    err = error.errors(include_url=False)[0]
    kind, value, loc = err["type"], err.get("input"), tuple(err["loc"])
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, Invalid):
        loc += (cause.field,) if cause.field else ()
        value = value if cause.value is _UNSET else cause.value
    name, owner, info = _locate(root, loc)
    if kind == "unexpected_keyword_argument":
        close = difflib.get_close_matches(str(loc[-1]), _fields(owner), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{name}: unknown field{hint}")
    if kind in _EXPECTED:
        return ConfigError(f"{name}: expected {_EXPECTED[kind]}, got {value!r}")
    if isinstance(cause, Invalid):
        problem = cause.problem
    elif kind == "literal_error" and info is not None:
        problem = _one_of(typing.get_args(info.annotation))
    elif kind in _BOUNDS and info is not None:
        problem = _bounds(info.metadata)
    elif kind == "too_short":
        problem = "must not be empty"
    else:
        problem = err["msg"][:1].lower() + err["msg"][1:]
    why = [m.text for m in (info.metadata if info is not None else ()) if isinstance(m, Why)]
    if why and not isinstance(cause, Invalid):
        problem += f" ({why[0]})"
    return ConfigError(f"{name}: {value!r} {problem}")


def _locate(root: type, loc: tuple) -> tuple[str, type | None, Any]:
    """(dotted name, class owning the last named field, that field's FieldInfo) for a location."""
    name, cls, owner, info = _root_name(root), root, root, None
    for item in loc:
        if isinstance(item, int):
            name += f"[{item}]"
            continue
        name = f"{name}.{item}" if name else str(item)
        owner, info = cls, _fields(cls).get(item)
        cls = info.annotation if info is not None and dataclasses.is_dataclass(info.annotation) else None
    return name or "config", owner, info


def _root_name(cls: type) -> str:
    """Where a directly built section sits in RunConfig, so its errors read like a whole config's."""
    from artaug.config.run import RunConfig  # run.py builds on this module: import when first needed

    if cls is RunConfig:
        return ""
    owners = [n for n, f in _fields(RunConfig).items() if f.annotation is cls]
    return owners[0] if owners else cls.__name__.removesuffix("Config").lower()


def _fields(cls: type | None) -> dict:
    return getattr(cls, "__pydantic_fields__", {}) if cls is not None else {}


def _one_of(choices: tuple) -> str:
    names = [str(c) for c in choices]
    return f"must be {names[0]} or {names[1]}" if len(names) == 2 else f"must be one of {', '.join(names)}"


def _bounds(metadata: list) -> str:
    """`must be >= 1`, `must be in (0, 1]`, ... from the field's annotated-types bounds."""
    found = {k: getattr(m, k) for m in metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    low = ("[", found["ge"]) if "ge" in found else ("(", found["gt"]) if "gt" in found else None
    high = ("]", found["le"]) if "le" in found else (")", found["lt"]) if "lt" in found else None
    if low and high:
        return f"must be in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"must be {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return "is out of range"


def _num(bound: Any) -> str:
    return "2**63" if bound == 2**63 else str(bound)
