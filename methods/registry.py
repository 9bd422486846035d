"""Name -> method class.  Every module in methods/ is imported once, so a new method is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from core.errors import ConfigError

_REGISTRY: dict[str, type] = {}
_LOADED = False


def register(cls):
    """Class decorator: make a Method subclass available under `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if info.name not in ("base", "registry"):
            importlib.import_module(f"methods.{info.name}")
    _LOADED = True


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}' (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
