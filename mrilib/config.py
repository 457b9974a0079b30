"""Presets and the one rule for merging them.

Every module that has settings keeps them next to its code, airbench-style, as one
dict of defaults (units in comments) plus per-preset overrides::

    DEFAULTS = {"epochs": 30, ...}            # the ``thesis`` protocol
    PRESETS = {"quick": {"epochs": 2, ...}}   # only what changes

and calls :func:`settings` to get the values in force. The preset comes from the
``MRILIB_PRESET`` environment variable (``thesis`` when unset) unless passed.

Beside its ``DEFAULTS`` a module that keys a result (a cache folder, a run's design)
declares ``RUN_ONLY``: the settings that change how a run is batched, timed or sampled in
chunks, not what it produces. Every key is built from :func:`design_view` of the
settings minus those, and hashed with :func:`hash8` where it names a design.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Iterable, Mapping

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


def design_view(cfg: Mapping[str, Any], run_only: Iterable[str] = ()) -> dict:
    """``cfg`` without its ``run_only`` settings, JSON-stable: sorted keys, tuples as lists."""
    skip = set(run_only)
    return {key: _plain(value) for key, value in sorted(cfg.items()) if key not in skip}


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {key: _plain(v) for key, v in sorted(value.items())}
    return value


def hash8(value: Any) -> str:
    """8 hex digits of sha1 over ``value`` as sorted JSON (other types by ``str``)."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]
