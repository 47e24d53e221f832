"""The problem spec: the one contract between solver, buffer, trainer, model card and gateway.

Two kinds of problem are built from a solver's trajectories ``[B, T+1, C, *grid]``:

* **parametric** ``(params, t) -> u(t)`` (Melissa's surrogate): every recorded step of every
  simulation is one sample. Inputs are a vector: the parameters mapped to the unit cube plus
  ``t / t_final`` and its square root.
* **operator** ``fields -> fields`` (the FNO setting): the input fields at one recorded step
  (e.g. the initial condition, or a coefficient field the solver drew) map to the output
  fields at another (``pairs: final``: one sample per simulation), or every snapshot maps to
  the next (``pairs: next``, for autoregressive models). Scalar parameters, if the solver
  has any, enter as constant input channels (mapped to the unit cube).

In the buffer, ``x`` and ``y`` are flattened float32 rows; the models reshape them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import solvers
from solvers.base import ParamSpace, Solver

KINDS = ("parametric", "operator")
PAIRS = ("final", "next")


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
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    input_index: int = 0
    output_index: int = -1
    pairs: str = "final"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"problem.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not self.times or self.times[0] != 0.0:
            raise ValueError("problem times must start at 0")
        if not self.outputs:
            # Predict what is not an input; an evolution operator (u(0) -> u(T)) predicts its input fields later.
            rest = tuple(f for f in self.fields if f not in self.inputs)
            object.__setattr__(self, "outputs", rest or self.inputs)
        for role, names in (("inputs", self.inputs), ("outputs", self.outputs)):
            unknown = [n for n in names if n not in self.fields]
            if unknown:
                raise ValueError(f"problem.{role}: unknown field(s) {unknown}; the solver records {list(self.fields)}")
        if not self.outputs:
            raise ValueError("problem.outputs: no field left to predict")
        nt = len(self.times)
        if self.kind == "parametric":
            if self.inputs:
                raise ValueError("problem.inputs: a parametric problem takes parameters and time, not fields")
            if nt < 2:
                raise ValueError("a parametric problem needs a solver that records at least two times")
            return
        if not self.inputs and self.params.dim == 0:
            raise ValueError("problem.inputs: an operator problem needs input fields (or solver parameters)")
        if self.pairs not in PAIRS:
            raise ValueError(f"problem.pairs must be one of {list(PAIRS)}, got {self.pairs!r}")
        for name, idx in (("input_index", self.input_index), ("output_index", self.output_index)):
            if not -nt <= idx < nt:
                raise ValueError(f"problem.{name} must lie in [{-nt}, {nt - 1}] (the solver records {nt} times)")
        if self.pairs == "next" and nt < 2:
            raise ValueError("problem.pairs 'next' needs a solver that records at least two times")
        if self.pairs == "final" and self._out_k < self._in_k:
            raise ValueError("problem.output_index must not come before problem.input_index")

    @classmethod
    def from_solver(cls, solver: Solver, solver_config: dict[str, Any], **problem: Any) -> ProblemSpec:
        return cls(
            solver=solvers.solver_ref(type(solver)),
            solver_config=dict(solver_config),
            params=solver.params,
            fields=tuple(solver.fields),
            grid=tuple(int(g) for g in solver.grid),
            times=tuple(float(t) for t in solver.times),
            **problem,
        )

    # Shapes -----------------------------------------------------------------
    @property
    def t_final(self) -> float:
        return self.times[-1]

    @property
    def field_input(self) -> bool:
        """Whether the model's input is a field ``[C, *grid]`` (operator) or a vector (parametric)."""
        return self.kind == "operator"

    @property
    def in_channels(self) -> int:
        if self.kind == "parametric":
            return self.params.dim + 2  # parameters, t/T, sqrt(t/T)
        return len(self.inputs) + self.params.dim

    @property
    def in_features(self) -> int:  # kept for the parametric wording
        return self.in_channels

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One sample's model input."""
        return (self.in_channels, *self.grid) if self.field_input else (self.in_channels,)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """One sample's output ``(C_out, *grid)``."""
        return (len(self.outputs), *self.grid)

    @property
    def out_size(self) -> int:
        return int(np.prod(self.out_shape))

    @property
    def samples_per_simulation(self) -> int:
        if self.kind == "parametric":
            return len(self.times)
        return len(self.times) - 1 if self.pairs == "next" else 1

    @property
    def _in_k(self) -> int:
        return self.input_index % len(self.times)

    @property
    def _out_k(self) -> int:
        return self.output_index % len(self.times)

    def _idx(self, names: tuple[str, ...]) -> list[int]:
        return [self.fields.index(n) for n in names]

    # Encoding ---------------------------------------------------------------
    def encode_inputs(self, params: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Parametric: ``params [N, P]`` physical, ``t [N]`` physical time -> model inputs ``[N, P+2]`` float32.

        Time enters as ``t/T`` and ``sqrt(t/T)``: transients are fastest right after t = 0 (a
        diffusive layer grows like sqrt(t)), and the square root spreads them over the input range.
        """
        p = self.params.normalise(params)  # (N, P) in [0, 1]
        tt = np.asarray(t, dtype=np.float64).reshape(-1, 1) / self.t_final  # (N, 1) in [0, 1]
        feats = np.concatenate([p, tt, np.sqrt(np.clip(tt, 0.0, None))], axis=1)  # (N, P+2)
        return np.ascontiguousarray(feats, dtype=np.float32)

    def encode_fields(self, fields: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Operator: input fields ``[N, C_in, *grid]`` and ``params [N, P]`` -> model inputs ``[N, C_in+P, *grid]``."""
        n = fields.shape[0]
        p = self.params.normalise(params).astype(np.float32)  # (N, P)
        const = np.broadcast_to(p.reshape(n, -1, *([1] * len(self.grid))), (n, p.shape[1], *self.grid))
        return np.ascontiguousarray(np.concatenate([fields.astype(np.float32), const], axis=1))

    def assembler(self, params: np.ndarray, sim_ids: np.ndarray) -> StepAssembler:
        """Turns a batch's recorded steps, as they stream in, into samples."""
        return StepAssembler(self, np.asarray(params, dtype=np.float64), np.asarray(sim_ids, dtype=np.int64))

    def samples_from_trajectories(
        self, params: np.ndarray, sim_ids: np.ndarray, traj: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Whole trajectories ``[B, T+1, C, *grid]`` -> flat samples ``(x, y, sim_id, t_index)``."""
        asm = self.assembler(params, sim_ids)
        parts = [s for k in range(traj.shape[1]) if (s := asm.feed(k, traj[:, k])) is not None]
        return tuple(np.concatenate(a) for a in zip(*parts, strict=True))  # type: ignore[return-value]

    # Card ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "solver": self.solver,
            "solver_config": dict(self.solver_config),
            "params": self.params.to_dict(),
            "fields": list(self.fields),
            "grid": list(self.grid),
            "times": {"t0": self.times[0], "t_final": self.t_final, "count": len(self.times)},
            "outputs": list(self.outputs),
        }
        if self.kind == "operator":
            d.update(
                inputs=list(self.inputs),
                input_index=self.input_index,
                output_index=self.output_index,
                pairs=self.pairs,
            )
        return d

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
            inputs=tuple(d.get("inputs", ())),
            outputs=tuple(d.get("outputs", ())),
            input_index=int(d.get("input_index", 0)),
            output_index=int(d.get("output_index", -1)),
            pairs=d.get("pairs", "final"),
        )


class StepAssembler:
    """Builds samples from the steps of one batch of simulations as the solver yields them."""

    def __init__(self, spec: ProblemSpec, params: np.ndarray, sim_ids: np.ndarray) -> None:
        self.spec = spec
        self.params = params
        self.sim_ids = sim_ids
        self._in = spec._idx(spec.inputs)
        self._out = spec._idx(spec.outputs)
        self._held: np.ndarray | None = None  # operator: the input fields waiting for their output

    def feed(self, k: int, fields: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Step ``k`` of the batch, ``fields [B, C, *grid]`` -> ``(x, y, sim_id, t_index)`` or None."""
        spec, b = self.spec, fields.shape[0]
        if spec.kind == "parametric":
            x = spec.encode_inputs(self.params, np.full(b, spec.times[k]))  # (B, P+2)
            y = fields[:, self._out].reshape(b, -1)  # (B, C_out*prod(grid))
            return self._pack(x, y, k)
        if spec.pairs == "next":
            out = None
            if self._held is not None:
                out = self._pack(self._held, fields[:, self._out].reshape(b, -1), k)
            self._held = spec.encode_fields(fields[:, self._in], self.params).reshape(b, -1)
            return out
        if k == spec._in_k:
            self._held = spec.encode_fields(fields[:, self._in], self.params).reshape(b, -1)
        if k == spec._out_k:
            assert self._held is not None
            return self._pack(self._held, fields[:, self._out].reshape(b, -1), k)
        return None

    def _pack(self, x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        b = x.shape[0]
        return (
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(y, dtype=np.float32),
            self.sim_ids.copy(),
            np.full(b, k, dtype=np.int64),
        )
