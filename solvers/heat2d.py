r"""2D heat equation on the unit square with constant Dirichlet sides (the Melissa use case).

Problem
-------
.. math::

    u_t = \alpha\,\Delta u \quad \text{on } (0,1)^2, \qquad
    u = T_{\text{left}},\ T_{\text{right}},\ T_{\text{bottom}},\ T_{\text{top}} \text{ on the four sides},
    \qquad u(\cdot, 0) = u_0 \text{ inside}.

The five parameters ``(u0, t_left, t_right, t_bottom, t_top)`` each lie in ``[100, 500]``.

Discretisation
--------------
Grid of ``n x n`` nodes including the boundary, spacing ``h = 1/(n-1)``; a field array is indexed
``[..., i, j]`` with ``x = i h`` and ``y = j h``. Left is ``i = 0``, right ``i = n-1``, bottom
``j = 0``, top ``j = n-1``. Each corner node holds the mean of its two adjacent side temperatures;
corners never enter the 5-point stencil of an interior node, so this choice only affects what the
returned fields show there.

On the ``m x m`` interior (``m = n-2``) the standard 5-point Laplacian splits into an interior
operator and a constant boundary vector, ``(\Delta_h u)_{ij} = (L_h u)_{ij} + b_{ij}``, where
``b`` collects ``T/h^2`` from every boundary neighbour. Backward Euler with step ``dt`` reads

.. math::

    (I - \alpha\,dt\,L_h)\,u^{k+1} = u^k + \alpha\,dt\,b .

``L_h`` is diagonalised by the type-I discrete sine transform ``S``: the sine modes
``\sin(p\pi x)\sin(q\pi y)``, ``p, q = 1..m``, are eigenvectors with eigenvalues

.. math::

    \lambda_{pq} = -\frac{4}{h^2}\Bigl(\sin^2\frac{p\pi h}{2} + \sin^2\frac{q\pi h}{2}\Bigr) < 0 .

With the discrete steady state ``s`` (``L_h s = -b``, i.e. ``\hat s = -\hat b/\lambda``) and
``w = u - s`` the step becomes homogeneous, ``(I - \alpha dt L_h) w^{k+1} = w^k``, so in sine space

.. math::

    \hat w^{k+1}_{pq} = \frac{\hat w^k_{pq}}{1 - \alpha\,dt\,\lambda_{pq}} .

This is exactly backward Euler on the 5-point scheme (no splitting or truncation), unconditionally
stable, and costs one inverse DST per recorded step for the whole batch. Arithmetic is float64;
trajectories are returned as float32.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.fft

from solvers import register
from solvers.base import ParamSpace

_PARAM_NAMES = ("u0", "t_left", "t_right", "t_bottom", "t_top")
_T_LOW = 100.0
_T_HIGH = 500.0


def _check_int(field: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but n=True is always a configuration mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"heat2d.{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"heat2d.{field} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Heat2DConfig:
    """Discretisation of :class:`Heat2D`.

    ``n``: nodes per side including the two boundary nodes (interior ``(n-2)^2``), ``n >= 4``.
    ``alpha``: diffusivity ``> 0``. ``dt``: time step ``> 0``. ``steps``: recorded implicit steps
    ``>= 1``; the trajectory holds ``steps + 1`` states at ``t = k * dt``.
    """

    n: int = 64
    alpha: float = 0.1
    dt: float = 1e-2
    steps: int = 100

    def __post_init__(self) -> None:
        # Normalise numpy scalars / ints-for-floats so that equality and hashing of configs behave.
        object.__setattr__(self, "n", _check_int("n", self.n, 4))
        object.__setattr__(self, "alpha", _check_positive_float("alpha", self.alpha))
        object.__setattr__(self, "dt", _check_positive_float("dt", self.dt))
        object.__setattr__(self, "steps", _check_int("steps", self.steps, 1))

    @property
    def h(self) -> float:
        """Grid spacing ``1/(n-1)``."""
        return 1.0 / (self.n - 1)

    @property
    def t_final(self) -> float:
        """Time of the last recorded state, ``steps * dt``."""
        return self.steps * self.dt


@register
class Heat2D:
    """Batched backward-Euler / DST solver of the 2D heat equation (see the module docstring)."""

    name: ClassVar[str] = "heat2d"
    Config: ClassVar[type[Heat2DConfig]] = Heat2DConfig

    def __init__(self, config: Heat2DConfig = Heat2DConfig()) -> None:
        if not isinstance(config, Heat2DConfig):
            raise TypeError(f"Heat2D expects a Heat2DConfig, got {type(config).__name__}")
        self._config = config
        self._params = ParamSpace(names=_PARAM_NAMES, low=(_T_LOW,) * 5, high=(_T_HIGH,) * 5)
        n, h = config.n, config.h
        # 1D eigenvalues of the Dirichlet second difference, mode p = 1..n-2 (DST-I output index p-1).
        p = np.arange(1, n - 1, dtype=np.float64)
        lam1 = -(4.0 / h**2) * np.sin(p * np.pi * h / 2.0) ** 2
        self._lam = lam1[:, None] + lam1[None, :]  # [m, m], strictly negative
        self._gain = 1.0 / (1.0 - config.alpha * config.dt * self._lam)  # backward-Euler amplification, in (0, 1)

    # ------------------------------------------------------------------ description

    @property
    def config(self) -> Heat2DConfig:
        return self._config

    @property
    def params(self) -> ParamSpace:
        """``(u0, t_left, t_right, t_bottom, t_top)``, each in ``[100, 500]``."""
        return self._params

    @property
    def grid(self) -> tuple[int, int]:
        return (self._config.n, self._config.n)

    @property
    def fields(self) -> tuple[str, ...]:
        return ("u",)

    @property
    def times(self) -> np.ndarray:
        """Recorded times ``k * dt``, ``k = 0..steps`` (float64)."""
        return np.arange(self._config.steps + 1, dtype=np.float64) * self._config.dt

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues ``lambda_pq`` of the interior 5-point Laplacian, ``[n-2, n-2]`` (copy)."""
        return self._lam.copy()

    # ------------------------------------------------------------------ numerics

    def _dst(self, a: np.ndarray) -> np.ndarray:
        # Orthonormal DST-I is its own inverse, so forward and backward use the same call.
        return scipy.fft.dstn(a, type=1, axes=(-2, -1), norm="ortho")

    def _check_boundary(self, boundary: np.ndarray) -> np.ndarray:
        b = np.asarray(boundary, dtype=np.float64)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boundary must have shape [B, 4] (t_left, t_right, t_bottom, t_top), got {list(b.shape)}")
        if not np.all(np.isfinite(b)):
            raise ValueError("boundary temperatures must be finite (no NaN or inf)")
        return b

    def _boundary_frame(self, boundary: np.ndarray) -> np.ndarray:
        """Full ``[B, n, n]`` field that is zero inside and carries the Dirichlet values on the ring."""
        left, right, bottom, top = (boundary[:, k, None] for k in range(4))
        frame = np.zeros((boundary.shape[0], self._config.n, self._config.n), dtype=np.float64)
        frame[:, 0, :] = left
        frame[:, -1, :] = right
        frame[:, :, 0] = bottom
        frame[:, :, -1] = top
        # Corners: mean of the two sides meeting there (they never feed the interior stencil).
        frame[:, 0, 0] = 0.5 * (left[:, 0] + bottom[:, 0])
        frame[:, 0, -1] = 0.5 * (left[:, 0] + top[:, 0])
        frame[:, -1, 0] = 0.5 * (right[:, 0] + bottom[:, 0])
        frame[:, -1, -1] = 0.5 * (right[:, 0] + top[:, 0])
        return frame

    def _steady_interior(self, boundary: np.ndarray) -> np.ndarray:
        """Interior ``[B, m, m]`` of the discrete harmonic function: ``L_h s = -b``."""
        h2 = self._config.h**2
        left, right, bottom, top = (boundary[:, k, None] for k in range(4))
        m = self._config.n - 2
        b = np.zeros((boundary.shape[0], m, m), dtype=np.float64)
        b[:, 0, :] += left / h2
        b[:, -1, :] += right / h2
        b[:, :, 0] += bottom / h2
        b[:, :, -1] += top / h2
        if b.shape[0] == 0:
            return b
        return self._dst(-self._dst(b) / self._lam)

    def _check_params(self, params: np.ndarray) -> np.ndarray:
        p = np.asarray(params, dtype=np.float64)
        # ParamSpace.check reports NaN/inf without saying where; name the offending parameter instead.
        if p.ndim == 2 and p.shape[1] == self._params.dim:
            bad = ~np.isfinite(p)
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise ValueError(f"parameter {self._params.names[j]!r} must be finite, got {p[i, j]} in row {i}")
        return self._params.check(p)

    def steady_state(self, params: np.ndarray) -> np.ndarray:
        """Discrete harmonic steady state ``[B, n, n]`` float64 (the ``t -> inf`` limit of every trajectory).

        Only the four side temperatures of ``params [B, 5]`` matter; ``u0`` is ignored.
        """
        p = self._check_params(params)
        boundary = p[:, 1:]
        out = self._boundary_frame(boundary)
        out[:, 1:-1, 1:-1] = self._steady_interior(boundary)
        return out

    def run(self, initial: np.ndarray, boundary: np.ndarray) -> Iterator[np.ndarray]:
        """Lower-level time stepper for an arbitrary initial field.

        ``initial [B, n, n]``: initial temperature; only its interior is used (the boundary ring is
        overwritten by the Dirichlet values). ``boundary [B, 4]``: ``(t_left, t_right, t_bottom, t_top)``,
        unrestricted finite values. Yields ``steps + 1`` new float64 arrays ``[B, n, n]``, states at
        ``t = k * dt`` for ``k = 0..steps``, using this solver's ``alpha``, ``dt`` and ``steps``.
        """
        n = self._config.n
        u0 = np.asarray(initial, dtype=np.float64)
        if u0.ndim != 3 or u0.shape[1:] != (n, n):
            raise ValueError(f"initial must have shape [B, {n}, {n}], got {list(u0.shape)}")
        if not np.all(np.isfinite(u0)):
            raise ValueError("initial must be finite (no NaN or inf)")
        bnd = self._check_boundary(boundary)
        if bnd.shape[0] != u0.shape[0]:
            raise ValueError(f"initial and boundary batch sizes differ: {u0.shape[0]} != {bnd.shape[0]}")
        return self._run(u0, bnd)

    def _run(self, u0: np.ndarray, boundary: np.ndarray) -> Iterator[np.ndarray]:
        # Separate from run() so that argument errors surface at call time, not at the first next().
        frame = self._boundary_frame(boundary)
        first = frame.copy()
        first[:, 1:-1, 1:-1] = u0[:, 1:-1, 1:-1]
        yield first
        if u0.shape[0] == 0:  # scipy.fft rejects empty axes; an empty batch has nothing to advance
            for _ in range(self._config.steps):
                yield frame.copy()
            return
        s = self._steady_interior(boundary)
        w_hat = self._dst(u0[:, 1:-1, 1:-1] - s)
        for _ in range(self._config.steps):
            # Iterating the gain (rather than gain**k) is literally one backward-Euler step per record.
            w_hat *= self._gain
            state = frame.copy()
            state[:, 1:-1, 1:-1] = s + self._dst(w_hat)
            yield state

    # ------------------------------------------------------------------ Solver protocol

    def _initial_and_boundary(self, params: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self._check_params(params)
        seeds = np.asarray(seeds)
        if seeds.shape != (p.shape[0],):
            raise ValueError(f"seeds must have shape [{p.shape[0]}] (one per parameter row), got {list(seeds.shape)}")
        n = self._config.n
        initial = np.broadcast_to(p[:, 0, None, None], (p.shape[0], n, n))
        return initial, p[:, 1:]

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k, fields [B, 1, n, n] float32)`` for ``k = 0..steps`` as each step is computed.

        The problem is deterministic: ``seeds [B]`` must match the batch size but is otherwise ignored.
        """
        initial, boundary = self._initial_and_boundary(params, seeds)
        return self._stream(initial, boundary)

    def _stream(self, initial: np.ndarray, boundary: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for k, state in enumerate(self._run(initial, boundary)):
            yield k, np.ascontiguousarray(state[:, None], dtype=np.float32)

    def solve(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``params [B, 5]``, ``seeds [B]`` -> trajectories ``[B, steps+1, 1, n, n]`` float32, C-contiguous.

        The problem is deterministic: ``seeds`` must have length ``B`` but does not affect the result.
        """
        initial, boundary = self._initial_and_boundary(params, seeds)
        n = self._config.n
        out = np.empty((initial.shape[0], self._config.steps + 1, 1, n, n), dtype=np.float32)
        for k, fields in self._stream(initial, boundary):
            out[:, k] = fields
        return out
