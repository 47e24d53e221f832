"""The solver contract shared by every PDE in this package.

A solver advances a *batch* of simulations in one array program and returns
trajectories ``[B, T+1, C, *grid]`` (float32, C-contiguous). Nothing here
imports Ray, the trainer or the services.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ParamSpace:
    """Names and closed bounds of a solver's input parameters."""

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.low) == len(self.high)):
            raise ValueError("ParamSpace: names, low and high must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"ParamSpace: duplicate parameter names in {self.names}")
        for name, lo, hi in zip(self.names, self.low, self.high, strict=True):
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"ParamSpace: bounds of {name!r} must be finite with low < high, got [{lo}, {hi}]")

    @property
    def dim(self) -> int:
        return len(self.names)

    def scale(self, unit: np.ndarray) -> np.ndarray:
        """Map points of the unit cube ``[N, P]`` onto the box."""
        lo = np.asarray(self.low, dtype=np.float64)
        hi = np.asarray(self.high, dtype=np.float64)
        return lo + np.asarray(unit, dtype=np.float64) * (hi - lo)

    def normalise(self, params: np.ndarray) -> np.ndarray:
        """Map parameters ``[N, P]`` onto the unit cube (the models' input scale)."""
        lo = np.asarray(self.low, dtype=np.float64)
        hi = np.asarray(self.high, dtype=np.float64)
        return (np.asarray(params, dtype=np.float64) - lo) / (hi - lo)

    def check(self, params: np.ndarray) -> np.ndarray:
        """Return ``params`` as float64 ``[N, P]`` or raise ``ValueError`` saying what is wrong."""
        p = np.asarray(params, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != self.dim:
            raise ValueError(f"params must have shape [N, {self.dim}] ({', '.join(self.names)}), got {list(p.shape)}")
        if not np.all(np.isfinite(p)):
            raise ValueError("params must be finite (no NaN or inf)")
        lo = np.asarray(self.low)
        hi = np.asarray(self.high)
        bad = (p < lo) | (p > hi)
        if bad.any():
            _, j = np.argwhere(bad)[0]
            raise ValueError(f"parameter {self.names[j]!r} must lie in [{self.low[j]}, {self.high[j]}]")
        return p

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "low": list(self.low), "high": list(self.high)}


@runtime_checkable
class Solver(Protocol):
    """What every registered solver provides."""

    name: ClassVar[str]

    @property
    def params(self) -> ParamSpace: ...

    @property
    def grid(self) -> tuple[int, ...]: ...

    @property
    def fields(self) -> tuple[str, ...]: ...

    @property
    def times(self) -> np.ndarray:
        """Recorded times ``[T+1]``, starting at 0."""
        ...

    def solve(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``params [B, P]``, ``seeds [B]`` -> trajectories ``[B, T+1, C, *grid]`` float32."""
        ...

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(time_index, fields [B, C, *grid])`` as each recorded step is computed."""
        ...
