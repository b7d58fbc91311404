"""The typed config's building blocks: :class:`Section` (a pydantic model: strict types, unknown
keys refused, NaN and infinities refused), the field helpers (:func:`ranged`, ``Literal``
choices, :data:`Text`), and the translation of pydantic's errors into the one-line
:class:`ConfigError` every config problem raises (a message naming the key)."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and says why."""


def _number_as_text(value: Any) -> Any:
    # YAML reads `run_id: 2024` or `label: 7` as a number; such a value is still the text it spells.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


# A string key: numbers are taken as the text they spell, nothing else is converted.
Text = Annotated[str, BeforeValidator(_number_as_text)]


class Section(BaseModel):
    """One config section. Strict: ``"10"`` is not an int, ``1.5`` is not an int, ``1`` is not a
    bool (ints do pass as floats); unknown keys and NaN / infinite numbers are refused."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_default=False)


def ranged(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A number that must lie in ``[low, high]`` (either bound optional; checked at load time)."""
    return Field(default, ge=low, le=high)


# ---------------------------------------------------------------- pydantic's errors, one line each

_EXPECTED = {"int_type": "int", "int_parsing": "int", "float_type": "float", "float_parsing": "float",
             "string_type": "str", "bool_type": "bool", "bool_parsing": "bool", "list_type": "a list",
             "model_type": "a mapping", "dict_type": "a mapping", "model_attributes_type": "a mapping",
             "none_required": "null"}


def _key(loc: tuple) -> str:
    """``('selections', 0, 'budget')`` -> ``selections[0].budget``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, str | None]:
    """The section class holding the last name in ``loc``, and that name."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(node, "model_fields", {})
        if part not in fields:
            return None, None
        node = _section_type(fields[part].annotation)
    return (node if isinstance(node, type) and issubclass(node, BaseModel) else None), str(loc[-1])


def _section_type(annotation: Any) -> Any:
    """``list[X]``, ``X | None`` -> ``X`` (the section class a key path walks into)."""
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _bounds(model: type[BaseModel] | None, name: str | None) -> tuple[Any, Any]:
    low = high = None
    if model is not None and name in model.model_fields:
        for rule in model.model_fields[name].metadata:
            low = getattr(rule, "ge", low)
            high = getattr(rule, "le", high)
    return low, high


def _choices(model: type[BaseModel] | None, name: str | None) -> list[Any]:
    if model is None or name not in model.model_fields:
        return []
    annotation = model.model_fields[name].annotation
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return []


def config_error(exc: ValidationError, model: type[BaseModel]) -> ConfigError:
    """The first of pydantic's errors as the one line the CLI prints (exit 2)."""
    error = exc.errors()[0]
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    key, kind, value = _key(loc), error["type"], error.get("input")
    owner, name = _model_at(model, loc) if loc else (model, None)
    if kind == "extra_forbidden":
        known = ", ".join(owner.model_fields) if owner is not None else ""
        return ConfigError(f"unknown config key '{key}' (known: {known})")
    if kind == "missing":
        return ConfigError(f"config key '{key}': required")
    if kind == "finite_number":
        return ConfigError(f"config key '{key}': must be a finite number, got {value}")
    if kind in ("greater_than_equal", "less_than_equal"):
        low, high = _bounds(owner, name)
        want = (f"in [{low:g}, {high:g}]" if low is not None and high is not None
                else f">= {low:g}" if low is not None else f"<= {high:g}")
        return ConfigError(f"config key '{key}': must be {want}, got {value}")
    if kind == "literal_error":
        options = " | ".join(map(str, _choices(owner, name)))
        return ConfigError(f"config key '{key}': expected {options}, got {value!r}")
    if kind in _EXPECTED:
        return ConfigError(f"config key '{key or '<root>'}': expected {_EXPECTED[kind]}, got {value!r}")
    return ConfigError(f"config key '{key or '<root>'}': {error['msg']}, got {value!r}")
