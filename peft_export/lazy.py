"""Packages whose public names load their modules on first use (so that importing a package, e.g. for its option
models, does not import PyTorch, ONNX or TensorRT)::

    __getattr__, __all__ = lazy_exports(__name__, {"Trainer": "trainer", "finetune": "trainer"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """A module ``__getattr__`` resolving ``name`` from ``package.homes[name]``, and the sorted ``__all__``."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)

    return __getattr__, sorted(homes)
