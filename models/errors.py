"""Config errors and key checking: a leaf module every config (model, MoE, attention, serve,
train) imports, so none of them imports another just for its error type."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message says what to fix."""


def check_keys(cls: type, given: Mapping[str, Any], where: str) -> None:
    """Raise a ConfigError naming the closest valid key for each unknown one."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown {where} key '{key}'{hint}; valid keys: {', '.join(valid)}")


def require(cond: bool, msg: str) -> None:
    """Raise a ConfigError with `msg` unless `cond` holds."""
    if not cond:
        raise ConfigError(msg)
