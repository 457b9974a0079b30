"""Flat APIs whose heavy names (timm, diffusers, openai, grad-cam) load on first use (PEP 562)."""
from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence


def lazy_names(package: str, names_by_module: Mapping[str, Sequence[str]],
               namespace: dict) -> tuple[Callable[[str], object], list[str]]:
    """A module ``__getattr__`` for ``package`` that imports each name from its submodule
    on first use (and stores it in ``namespace``), and the list of those names."""
    where = {name: module for module, names in names_by_module.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        namespace[name] = value
        return value

    return __getattr__, list(where)
