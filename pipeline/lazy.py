"""Package attributes imported on first use (PEP 562), so that light imports stay light."""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, exports: dict[str, str], namespace: dict) -> Callable:
    """A module `__getattr__` for `package` that imports `exports[name]` (a submodule) on first
    access and caches the value in `namespace` (the package's globals)."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
