"""Numerical PDE solvers, registered by name: ``solvers.get("heat2d")``.

A solver of one's own is named by its import path, ``"package.module:Class"`` (a class
with what ``Solver`` asks and a ``Config``): it is imported where it is needed, on every node, so its package must
be importable there.
"""

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
    cls = solver_class(name)
    return cls(cls.Config(**config))


def solver_class(name: str) -> type:
    """The class of solver ``name``: a registered name, or ``"package.module:Class"``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import(name)
    raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())} (or package.module:Class)")


def solver_ref(cls: type) -> str:
    """The name that finds ``cls`` again: its registered name, else ``"package.module:Class"``."""
    name = getattr(cls, "name", None)
    return name if _REGISTRY.get(name) is cls else f"{cls.__module__}:{cls.__qualname__}"


def config_class(name: str) -> type:
    """The frozen config dataclass of solver ``name``."""
    return solver_class(name).Config


def _import(path: str) -> type:
    import importlib

    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import solver {path!r}: {e}") from None
    # The Solver protocol has data members, so issubclass cannot check it: look for what is used.
    if not (isinstance(cls, type) and all(hasattr(cls, a) for a in ("Config", "stream", "solve", "name"))):
        raise ValueError(f"solver {path!r} is not a solver class (Config, name, solve, stream)")
    return cls


def _discover() -> None:
    """Import every solver module of this package so that it registers itself."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_discover()

__all__ = ["ParamSpace", "Solver", "available", "config_class", "get", "register", "solver_class", "solver_ref"]
