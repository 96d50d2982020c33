"""The `section` decorator and the field types the sections are declared with.

Scalars are strict: a YAML string is never quietly read as a number or a bool ("8" for an int field is
an error, as before). Nested sections cannot be strict (pydantic then refuses the mappings YAML
gives), so strictness lives in these field types rather than in the model config.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any

import pydantic.dataclasses
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic_core import PydanticKnownError

from artaug.config.messages import Invalid, translate

_CONFIG = ConfigDict(extra="forbid")


def section(cls: type) -> type:
    """A frozen pydantic dataclass whose constructor raises one-line ConfigErrors."""
    cls = pydantic.dataclasses.dataclass(frozen=True, config=_CONFIG)(cls)
    init = cls.__init__

    # dataclasses.replace and direct construction go through __init__; nested sections are validated
    # by the parent's validator instead, so errors are translated once, at the outermost class.
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as err:
            raise translate(err, type(self)) from None

    cls.__init__ = __init__
    return cls


def _as_text(value: Any) -> Any:
    # YAML reads `revision: 1234` as an int and `revision:` as None; both are meant as text.
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _split_commas(value: Any) -> Any:
    # `--set model.loras=a.safetensors,b.safetensors` gives one string.
    if isinstance(value, str):
        return [item for item in value.split(",") if item]
    return value


def _integer(value: Any) -> Any:
    # Literal[1, 2] alone would accept 2.0 and True; Strict() cannot be applied to a Literal.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticKnownError("int_type")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise Invalid("must not be empty", value)
    return value


# A name that becomes one folder name (the run folder, Ray Train's run folder): no separators, no
# "." or "..", nothing a shell or an object store treats specially.
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _folder_name(value: str) -> str:
    if not _FOLDER_NAME.match(value):
        rule = "must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise Invalid(rule, value)
    return value


def _http(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise Invalid("must start with http:// or https://", value)
    return value


def _empty_or_http(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise Invalid("must be empty or start with http:// or https://", value)
    return value


def _multiple_of_16(value: int) -> int:
    # Latents are 1/8 of the image and packed in 2x2 patches: sides must divide by 16.
    if value <= 0 or value % 16:
        raise Invalid("is not a positive multiple of 16", value)
    return value


def _odd(value: int) -> int:
    if value < 1 or value % 2 == 0:
        raise Invalid("must be an odd number >= 1", value)
    return value


def _auto_or_nonnegative(value: float) -> float:
    if value != -1 and value < 0:
        raise Invalid("must be -1 (auto) or >= 0", value)
    return value


# Kubernetes label syntax, which Ray's node labels follow: [prefix/]name=value.
_LABEL_PART = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_NODE_LABEL = re.compile(rf"^([a-z0-9.-]{{1,253}}/)?{_LABEL_PART}={_LABEL_PART}$")


def _node_label(value: str) -> str:
    if not _NODE_LABEL.match(value):
        raise Invalid('is not a node label "key=value"', value)
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict still takes an int, as a float
Bool = Annotated[bool, Strict()]
Text = Annotated[str, BeforeValidator(_as_text), Strict()]
Texts = Annotated[list[Text], BeforeValidator(_split_commas)]

Count = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(gt=0, le=1)]
Seed = Annotated[Int, Field(ge=0, lt=2**63)]
Side = Annotated[Int, AfterValidator(_multiple_of_16)]
OddSize = Annotated[Int, AfterValidator(_odd)]
Gpus = Annotated[Float, AfterValidator(_auto_or_nonnegative)]
StrictChoice = BeforeValidator(_integer)  # Annotated[Literal[1, 2], StrictChoice]

Name = Annotated[Text, AfterValidator(_not_blank)]
FolderName = Annotated[Text, AfterValidator(_folder_name)]
NonEmptyTexts = Annotated[Texts, Field(min_length=1)]
Url = Annotated[Text, AfterValidator(_http)]
OptionalUrl = Annotated[Text, AfterValidator(_empty_or_http)]
NodeLabels = Annotated[list[Annotated[Text, AfterValidator(_node_label)]], BeforeValidator(_split_commas)]
