"""Presets and the one rule for merging them.

Every module that has settings keeps them next to its code, airbench-style, as one
dict of defaults (units in comments) plus per-preset overrides::

    DEFAULTS = {"epochs": 30, ...}            # the ``thesis`` protocol
    PRESETS = {"quick": {"epochs": 2, ...}}   # only what changes

and calls :func:`settings` to get the values in force. The preset comes from the
``MRILIB_PRESET`` environment variable (``thesis`` when unset) unless passed.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from .paths import preset_name

KNOWN_PRESETS = ("thesis", "quick", "cell")


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """A deep copy of ``base`` with ``override`` merged in (nested dicts merged key by key)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def settings(defaults: Mapping[str, Any], presets: Mapping[str, Mapping] | None = None,
             preset: str | None = None, **overrides: Any) -> dict:
    """The settings in force: defaults, then the preset's overrides, then the caller's."""
    name = preset or preset_name()
    if name not in KNOWN_PRESETS:
        raise ValueError(f"unknown preset {name!r} (from MRILIB_PRESET or the preset "
                         f"argument); choose one of {', '.join(KNOWN_PRESETS)}")
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(defaults)}")
    out = merged(defaults, (presets or {}).get(name, {}))
    return merged(out, overrides)
