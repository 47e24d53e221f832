r"""1D diffusion-reaction (Fisher-KPP) on the periodic unit interval (PDEBench's ``1D_ReacDiff`` problem).

Problem
-------
.. math::

    u_t = \nu\,u_{xx} + \rho\,u(1 - u) \quad \text{on } [0, 1) \text{ periodic}, \qquad u(x, 0) = u_0(x) \in [0, 1],

with parameters :math:`\nu \in [0.5, 5]`, :math:`\rho \in [1, 10]` (PDEBench ships
:math:`\nu \in \{0.5, 1, 2, 5\}`, :math:`\rho \in \{1, 2, 5, 10\}`); ``nu_min`` lowers the
diffusivity's bound to reach thin fronts (width :math:`\sqrt{\nu/\rho}`). The recorded field is ``u`` at
``snapshots + 1`` equally spaced times in ``[0, t_final]``; the natural operator is
``(u at t=0, nu, rho) -> u at t > 0`` (or one snapshot to the next). Values stay in ``[0, 1]``.

Recipe (Takamoto et al., "PDEBench", NeurIPS 2022 Datasets & Benchmarks; code
``pdebench/data_gen/data_gen_NLE/ReactionDiffusionEq/reaction_diffusion_multi_solution_Hydra.py``)
------------------------------------------------------------------------------------------------------
* Grid: ``N = 1024`` cell centres :math:`x_i = (i + 1/2)/N`, periodic; ``t_final = 1``, saved every 0.01
  (101 states).
* Initial condition: PDEBench's ``init_multi(..., k_tot=4, if_norm=True)``, i.e. the random sine
  superposition of :mod:`solvers.advection1d` (with its ``|.|``, sign and window options) mapped onto
  ``[0, 1]`` by the grid min/max, so ``min u_0 = 0`` and ``max u_0 = 1``.
* Numerics in PDEBench: the exact logistic step :math:`u \mapsto 1/(1 + e^{-\rho\,dt}(1 - u)/u)` followed by
  explicit second-order finite-volume diffusion inside a midpoint predictor-corrector, with the explicit
  diffusive step ``dt = 0.4 * 0.5 dx^2 / nu`` (millions of steps at ``nu = 5``); float32 JAX.

Numerics here (different: same splitting idea, exact pieces)
------------------------------------------------------------
Strang splitting of the two exactly solvable flows, with step ``h = t_final / (snapshots * substeps)``:

.. math::

    u^{n+1} = R_{h/2}\, D_h\, R_{h/2}\, u^n, \qquad
    R_\tau u = \frac{u}{u + (1 - u)\,e^{-\rho \tau}}, \qquad
    \widehat{D_\tau u}_m = e^{-\nu k_m^2 \tau}\,\hat u_m,\ k_m = 2\pi m / L .

:math:`R_\tau` is the exact logistic flow (written so that its denominator stays positive for
:math:`u \in [0, 1]`) and :math:`D_\tau` the exact heat flow of the trigonometric interpolant (pseudo-spectral,
spectrally accurate in space, no stability limit). Consecutive half reaction steps are merged. The scheme is
second order in time, unconditionally stable, exact when either term vanishes (``rho = 0``: every Fourier
mode decays exactly as :math:`e^{-\nu k^2 t}`; spatially constant ``u``: the exact logistic curve), and it
keeps ``u`` in ``[0, 1]`` (both flows do; the discrete heat kernel is positive to round-off once
:math:`\nu h \gg dx^2`, which holds by orders of magnitude at the defaults). Arithmetic is float64.
ETDRK4 would be fourth order but gives up the exact special cases and the bound preservation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from solvers import register
from solvers.advection1d import (
    SineSuperposition,
    cell_centres,
    check_coefficient,
    check_field,
    check_float,
    check_int,
    check_params,
    check_seeds,
    draw_initial_condition,
    fft_module,
    torch_device,
)
from solvers.base import ParamSpace

_NAME = "reaction_diffusion1d"
NU_MAX, RHO_LOW, RHO_HIGH = 5.0, 1.0, 10.0  # the box's other bounds (PDEBench's)


@dataclass(frozen=True)
class ReactionDiffusion1DConfig:
    """Discretisation and initial-condition recipe of :class:`ReactionDiffusion1D`.

    ``resolution``: cells (even, ``>= 16``). ``t_final`` (> 0) and ``snapshots`` (>= 1): states recorded at
    ``t = k t_final / snapshots``. ``substeps`` (>= 1): Strang steps per recorded interval (default step
    ``h = 5e-4``; measured max deviation from the ``h -> 0`` limit ~1e-4 over the parameter box).
    ``k_max``, ``n_waves``, ``p_abs``, ``p_window``: the random initial condition (see
    :mod:`solvers.advection1d`); ``n_waves * k_max < resolution / 2``. ``nu_min``: lower bound of the ``nu``
    box, in ``(0, 5)`` (default PDEBench's 0.5); below it fronts of width ``sqrt(nu / rho)`` form, which
    ``resolution`` must resolve.
    """

    resolution: int = 1024
    t_final: float = 1.0
    snapshots: int = 100
    substeps: int = 20
    k_max: int = 4
    n_waves: int = 2
    p_abs: float = 0.1
    p_window: float = 0.1
    nu_min: float = 0.5

    def __post_init__(self) -> None:
        res = check_int(_NAME, "resolution", self.resolution, 16)
        if res % 2:
            raise ValueError(f"{_NAME}.resolution must be even, got {res}")
        object.__setattr__(self, "resolution", res)
        object.__setattr__(self, "t_final", check_float(_NAME, "t_final", self.t_final, 0.0))
        object.__setattr__(self, "snapshots", check_int(_NAME, "snapshots", self.snapshots, 1))
        object.__setattr__(self, "substeps", check_int(_NAME, "substeps", self.substeps, 1))
        object.__setattr__(self, "k_max", check_int(_NAME, "k_max", self.k_max, 1))
        object.__setattr__(self, "n_waves", check_int(_NAME, "n_waves", self.n_waves, 1))
        object.__setattr__(self, "p_abs", check_float(_NAME, "p_abs", self.p_abs, 0.0, 1.0, open_low=False))
        object.__setattr__(self, "p_window", check_float(_NAME, "p_window", self.p_window, 0.0, 1.0, open_low=False))
        nu_min = check_float(_NAME, "nu_min", self.nu_min, 0.0, NU_MAX)
        if nu_min >= NU_MAX:
            raise ValueError(f"{_NAME}.nu_min must lie below nu's upper bound {NU_MAX}, got {nu_min}")
        object.__setattr__(self, "nu_min", nu_min)
        if self.n_waves * self.k_max >= res // 2:
            raise ValueError(
                f"{_NAME}.k_max must satisfy n_waves * k_max < resolution / 2 (highest drawable wavenumber below "
                f"Nyquist), got k_max={self.k_max}, n_waves={self.n_waves}, resolution={res}"
            )

    @property
    def dx(self) -> float:
        return 1.0 / self.resolution

    @property
    def dt_save(self) -> float:
        """Time between recorded states."""
        return self.t_final / self.snapshots

    @property
    def dt(self) -> float:
        """Strang step ``t_final / (snapshots * substeps)``."""
        return self.dt_save / self.substeps


def _strang_states(
    xp: Any, u0: Any, decay: Any, e_half: Any, e_full: Any, snapshots: int, substeps: int, n: int
) -> Iterator[Any]:
    """Strang steps ``R_{h/2} D_h R_{h/2}``; u0 ``[B, N]``, decay ``[B, N/2+1]``, e_half/e_full ``[B, 1]``."""

    c_half, c_full = 1.0 - e_half, 1.0 - e_full

    def react(u: Any, e: Any, c: Any) -> Any:
        # Exact logistic flow u / (u + (1 - u) e) = u / (e + u (1 - e)); denominator >= min(1, e) > 0 on [0, 1].
        d = u * c
        d += e  # in place on a temporary: one array pass fewer on the hot loop
        return u / d

    fft = fft_module(xp)

    def diffuse(u: Any) -> Any:
        return fft.irfft(fft.rfft(u) * decay, n=n)

    u = u0
    yield u
    for _ in range(snapshots):
        u = react(u, e_half, c_half)
        for s in range(substeps):
            u = diffuse(u)
            # R_{h/2} R_{h/2} = R_h: merge the half steps of neighbouring Strang steps inside a record.
            u = react(u, e_full, c_full) if s < substeps - 1 else react(u, e_half, c_half)
        yield u


@register
class ReactionDiffusion1D:
    """Batched 1D Fisher-KPP ``u_t = nu u_xx + rho u (1 - u)`` by Strang splitting (see the module docstring).

    Field ``("u",)``; operator input ``u`` at ``t = 0`` with ``(nu, rho)``, output ``u`` at the later times.
    """

    name: ClassVar[str] = _NAME
    Config: ClassVar[type[ReactionDiffusion1DConfig]] = ReactionDiffusion1DConfig
    # Default (2000 Strang steps at N = 1024) already takes ~0.2 s for a batch of 8 on one core.
    BENCH: ClassVar[dict] = {}

    def __init__(self, config: ReactionDiffusion1DConfig = ReactionDiffusion1DConfig()) -> None:
        if not isinstance(config, ReactionDiffusion1DConfig):
            raise TypeError(f"ReactionDiffusion1D expects a ReactionDiffusion1DConfig, got {type(config).__name__}")
        self._config = config
        self._params = ParamSpace(names=("nu", "rho"), low=(config.nu_min, RHO_LOW), high=(NU_MAX, RHO_HIGH))

    # ------------------------------------------------------------------ description

    @property
    def config(self) -> ReactionDiffusion1DConfig:
        return self._config

    @property
    def params(self) -> ParamSpace:
        """``nu`` in ``[nu_min, 5]`` (diffusivity; ``nu_min`` 0.5 by default), ``rho`` in ``[1, 10]`` (growth rate)."""
        return self._params

    @property
    def grid(self) -> tuple[int]:
        return (self._config.resolution,)

    @property
    def fields(self) -> tuple[str, ...]:
        return ("u",)

    @property
    def times(self) -> np.ndarray:
        """Recorded times ``k t_final / snapshots``, ``k = 0..snapshots`` (float64)."""
        return np.arange(self._config.snapshots + 1, dtype=np.float64) * self._config.dt_save

    @property
    def x(self) -> np.ndarray:
        """Cell centres ``(i + 1/2) / resolution`` (float64)."""
        return cell_centres(self._config.resolution)

    # ------------------------------------------------------------------ initial conditions

    def initial_condition(self, seed: int) -> SineSuperposition:
        """The random initial condition of simulation ``seed`` (normalised onto ``[0, 1]`` on the grid)."""
        c = self._config
        return draw_initial_condition(
            int(seed),
            resolution=c.resolution,
            k_max=c.k_max,
            n_waves=c.n_waves,
            p_abs=c.p_abs,
            p_window=c.p_window,
            normalise=True,
        )

    def _initial_fields(self, seeds: np.ndarray) -> np.ndarray:
        x = self.x
        if seeds.size == 0:
            return np.zeros((0, x.size))
        # The grid min/max normalisation already gives [0, 1]; the clip only guards the contract against round-off.
        return np.clip(np.stack([self.initial_condition(s)(x) for s in seeds]), 0.0, 1.0)

    # ------------------------------------------------------------------ lower level

    def run(self, initial: np.ndarray, nu: np.ndarray, rho: np.ndarray, length: float = 1.0) -> Iterator[np.ndarray]:
        """Advance arbitrary fields ``initial [B, resolution]`` on a periodic domain of length ``length``.

        ``nu [B]``, ``rho [B]``: any finite values ``>= 0`` (``rho = 0`` is pure diffusion, ``nu = 0`` the
        pointwise logistic ODE). Yields ``snapshots + 1`` float64 arrays ``[B, resolution]``, the states at
        :attr:`times`, using this solver's ``t_final``, ``snapshots`` and ``substeps``.
        """
        u0 = check_field("initial", initial, self._config.resolution)
        n = check_coefficient("nu", nu, u0.shape[0], nonnegative=True)
        r = check_coefficient("rho", rho, u0.shape[0], nonnegative=True)
        length = check_float(_NAME, "length", length, 0.0)
        return self._run(np, u0, n, r, length)

    def _run(self, xp: Any, u0: Any, nu: np.ndarray, rho: np.ndarray, length: float = 1.0) -> Iterator[Any]:
        c = self._config
        if u0.shape[0] == 0:  # FFT backends reject empty batches; nothing to advance
            return iter([u0] * (c.snapshots + 1))
        h = c.dt
        k = 2.0 * np.pi * np.arange(c.resolution // 2 + 1, dtype=np.float64) / length
        # Factors computed once in numpy float64, so both backends apply bitwise-identical coefficients.
        decay = np.exp(-nu[:, None] * k[None, :] ** 2 * h)  # [B, N/2+1]
        e_half = np.exp(-0.5 * rho * h)[:, None]  # [B, 1]
        e_full = np.exp(-rho * h)[:, None]
        if xp is not np:
            decay, e_half, e_full = (xp.asarray(a, device=u0.device) for a in (decay, e_half, e_full))
        return _strang_states(xp, u0, decay, e_half, e_full, c.snapshots, c.substeps, c.resolution)

    # ------------------------------------------------------------------ Solver protocol

    def _inputs(self, params: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = check_params(self._params, params)
        s = check_seeds(seeds, p.shape[0])
        return self._initial_fields(s), p[:, 0], p[:, 1]

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k, fields [B, 1, resolution] float32)`` for ``k = 0..snapshots`` as each state is computed."""
        u0, nu, rho = self._inputs(params, seeds)
        return self._stream(u0, nu, rho)

    def _stream(self, u0: np.ndarray, nu: np.ndarray, rho: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for k, state in enumerate(self._run(np, u0, nu, rho)):
            yield k, np.ascontiguousarray(state[:, None], dtype=np.float32)

    def work_per_simulation(self) -> int:
        """Grid-point updates of one simulation: grid points times Strang steps."""
        return int(self._config.resolution * self._config.snapshots * self._config.substeps)

    def solve(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``params [B, 2]`` (nu, rho), ``seeds [B]`` -> ``[B, snapshots+1, 1, resolution]`` float32, C-contiguous."""
        u0, nu, rho = self._inputs(params, seeds)
        out = np.empty((u0.shape[0], self._config.snapshots + 1, 1, self._config.resolution), dtype=np.float32)
        for k, fields in self._stream(u0, nu, rho):
            out[:, k] = fields
        return out

    def solve_torch(self, params: np.ndarray, seeds: np.ndarray, device: str | None = None) -> Any:
        """Same as :meth:`solve` computed with torch (float64/complex128 inside) on ``device``.

        Returns a float32 ``torch.Tensor [B, snapshots+1, 1, resolution]`` on ``device`` (default: CUDA if
        available). The initial conditions are drawn with numpy exactly as in :meth:`solve`.
        """
        import torch

        dev = torch_device(device)
        u0, nu, rho = self._inputs(params, seeds)
        c = self._config
        out = torch.empty((u0.shape[0], c.snapshots + 1, 1, c.resolution), dtype=torch.float32, device=dev)
        for k, state in enumerate(self._run(torch, torch.as_tensor(u0, dtype=torch.float64, device=dev), nu, rho)):
            out[:, k, 0] = state
        return out
