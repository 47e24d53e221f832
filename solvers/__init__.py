"""Numerical PDE solvers, registered by name: ``solvers.get("heat2d")``."""

from __future__ import annotations

from typing import Any

from solvers.base import ParamSpace, Solver

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a solver available under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"solver {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered solvers."""
    return sorted(_REGISTRY)


def get(name: str, **config: Any) -> Solver:
    """Build the solver ``name`` from keyword config (validated by its config dataclass)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}") from None
    return cls(cls.Config(**config))


def solver_class(name: str) -> type:
    """The registered class of solver ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}") from None


def config_class(name: str) -> type:
    """The frozen config dataclass of solver ``name``."""
    get_cls = _REGISTRY.get(name)
    if get_cls is None:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}")
    return get_cls.Config


def _discover() -> None:
    """Import every solver module of this package so that it registers itself."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_discover()

__all__ = ["ParamSpace", "Solver", "available", "config_class", "get", "register", "solver_class"]
