"""The problem spec: the one contract between solver, buffer, trainer, model card and gateway.

A *parametric* problem learns ``(params, t) -> u(t)`` (Melissa's surrogate): every
recorded time step of every simulation is one sample. Inputs are the parameters
mapped to the unit cube plus ``t / t_final`` and its square root; outputs are the solver's fields,
flattened in the buffer and reshaped to ``[C, *grid]`` by the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from solvers.base import ParamSpace, Solver


@dataclass(frozen=True)
class ProblemSpec:
    """Everything the trainer and the gateway need to know about a stream."""

    solver: str
    solver_config: dict[str, Any]
    params: ParamSpace
    fields: tuple[str, ...]
    grid: tuple[int, ...]
    times: tuple[float, ...]
    kind: str = "parametric"

    def __post_init__(self) -> None:
        if self.kind != "parametric":
            raise ValueError(f"problem kind must be 'parametric', got {self.kind!r}")
        if len(self.times) < 2 or self.times[0] != 0.0:
            raise ValueError("problem times must start at 0 and hold at least two entries")

    @classmethod
    def from_solver(cls, solver: Solver, solver_config: dict[str, Any]) -> ProblemSpec:
        return cls(
            solver=type(solver).name,
            solver_config=dict(solver_config),
            params=solver.params,
            fields=tuple(solver.fields),
            grid=tuple(int(g) for g in solver.grid),
            times=tuple(float(t) for t in solver.times),
        )

    # Shapes -----------------------------------------------------------------
    @property
    def t_final(self) -> float:
        return self.times[-1]

    @property
    def in_features(self) -> int:
        """Model input width: the parameters plus two time features."""
        return self.params.dim + 2

    @property
    def out_shape(self) -> tuple[int, ...]:
        """One sample's output ``(C, *grid)``."""
        return (len(self.fields), *self.grid)

    @property
    def out_size(self) -> int:
        return int(np.prod(self.out_shape))

    # Encoding ---------------------------------------------------------------
    def encode_inputs(self, params: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``params [N, P]`` physical, ``t [N]`` physical time -> model inputs ``[N, P+2]`` float32.

        Time enters as ``t/T`` and ``sqrt(t/T)``: transients are fastest right after t = 0 (a
        diffusive layer grows like sqrt(t)), and the square root spreads them over the input range.
        """
        p = self.params.normalise(params)  # (N, P) in [0, 1]
        tt = np.asarray(t, dtype=np.float64).reshape(-1, 1) / self.t_final  # (N, 1) in [0, 1]
        feats = np.concatenate([p, tt, np.sqrt(np.clip(tt, 0.0, None))], axis=1)  # (N, P+2)
        return np.ascontiguousarray(feats, dtype=np.float32)

    def samples_from_step(
        self, params: np.ndarray, sim_ids: np.ndarray, t_index: int, fields: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One recorded step of B simulations -> ``(x [B, P+2], y [B, C*prod(grid)], sim_id [B], t_index [B])``."""
        b = fields.shape[0]
        t = np.full(b, self.times[t_index])
        x = self.encode_inputs(params, t)
        y = np.ascontiguousarray(fields.reshape(b, -1), dtype=np.float32)  # (B, C*H*W)
        return x, y, np.asarray(sim_ids, dtype=np.int64), np.full(b, t_index, dtype=np.int64)

    def samples_from_trajectories(
        self, params: np.ndarray, sim_ids: np.ndarray, traj: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Whole trajectories ``[B, T+1, C, *grid]`` -> flat samples ordered by (simulation, time)."""
        b, nt = traj.shape[:2]
        t = np.tile(np.asarray(self.times), b)  # (B*(T+1),)
        x = self.encode_inputs(np.repeat(params, nt, axis=0), t)
        y = np.ascontiguousarray(traj.reshape(b * nt, -1), dtype=np.float32)
        sid = np.repeat(np.asarray(sim_ids, dtype=np.int64), nt)
        tix = np.tile(np.arange(nt, dtype=np.int64), b)
        return x, y, sid, tix

    # Card ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "solver": self.solver,
            "solver_config": dict(self.solver_config),
            "params": self.params.to_dict(),
            "fields": list(self.fields),
            "grid": list(self.grid),
            "times": {"t0": self.times[0], "t_final": self.t_final, "count": len(self.times)},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProblemSpec:
        p = d["params"]
        tm = d["times"]
        times = tuple(float(t) for t in np.linspace(tm["t0"], tm["t_final"], int(tm["count"])))
        return cls(
            solver=d["solver"],
            solver_config=dict(d["solver_config"]),
            params=ParamSpace(tuple(p["names"]), tuple(p["low"]), tuple(p["high"])),
            fields=tuple(d["fields"]),
            grid=tuple(int(g) for g in d["grid"]),
            times=times,
            kind=d.get("kind", "parametric"),
        )
