"""The typed config's field declarations: allowed values and ranges, checked at load time,
and the one error type every config problem raises (a message naming the key)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and says why."""


class _NotFinite(ConfigError):
    """NaN or an infinity for a number: refused for every key (NaN passes every range check)."""


def choice(default: Any, *options: Any) -> Any:
    """A field whose value must be one of ``options`` (checked at load time)."""
    return field(default=default, metadata={"choices": options})


def ranged(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A number that must lie in ``[low, high]`` (either bound optional; checked at load time)."""
    return field(default=default, metadata={"range": (low, high)})


def _check_field(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}': expected {' | '.join(map(str, choices))}, got {value!r}")
    bounds = f.metadata.get("range")
    if bounds is not None and value is not None:
        low, high = bounds
        if (low is not None and value < low) or (high is not None and value > high):
            want = (f"in [{low:g}, {high:g}]" if low is not None and high is not None
                    else f">= {low:g}" if low is not None else f"<= {high:g}")
            raise ConfigError(f"config key '{key}': must be {want}, got {value}")
