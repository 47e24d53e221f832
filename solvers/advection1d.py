r"""1D linear advection on the periodic unit interval (PDEBench's ``1D_Advection`` problem).

Problem
-------
.. math::

    u_t + \beta\,u_x = 0 \quad \text{on } [0, 1) \text{ periodic}, \qquad u(x, 0) = u_0(x),

with exact solution :math:`u(x, t) = u_0(x - \beta t)`. The scalar parameter is
:math:`\beta \in [0.1, 4]` (PDEBench ships :math:`\beta \in \{0.1, 0.2, 0.4, 0.7, 1, 2, 4\}`).
The recorded field is ``u`` at ``snapshots + 1`` equally spaced times in ``[0, t_final]``; the natural
operator is ``(u at t=0, beta) -> u at t > 0`` (or one snapshot to the next, autoregressively).

Recipe (Takamoto et al., "PDEBench", NeurIPS 2022 Datasets & Benchmarks; code
``pdebench/data_gen/data_gen_NLE/AdvectionEq/advection_multi_solution_Hydra.py`` and ``utils.init_multi``)
---------------------------------------------------------------------------------------------------------
* Grid: ``N = 1024`` cell centres :math:`x_i = (i + 1/2)/N`; ``t_final = 2``, saved every 0.01 (201 states).
* Initial condition (:func:`draw_initial_condition`, PDEBench's ``init_multi`` with ``k_tot = 4``):
  amplitudes :math:`A_j \sim U(0, 1)` and phases :math:`\phi_j \sim U(0, 2\pi)` for every mode
  :math:`j = 1..k_{max}`; ``n_waves = 2`` mode indices are drawn uniformly *with replacement* and
  :math:`c_j` counts how often ``j`` was drawn, so

  .. math:: u_0(x) = \sum_{j=1}^{k_{max}} A_j \sin(2\pi j c_j x + \phi_j).

  Like PDEBench's code (not its paper's description) a mode that was not drawn (:math:`c_j = 0`) adds the
  constant :math:`A_j \sin\phi_j` and a mode drawn twice has doubled wavenumber. Then, with probability
  ``p_abs = 0.1``, :math:`u_0 \leftarrow |u_0|`; the sign is flipped with probability 1/2; with probability
  ``p_window = 0.1`` it is multiplied by the window
  :math:`\tfrac12[\tanh((x - x_L)/0.01) - \tanh((x - x_R)/0.01)]`,
  :math:`x_L \sim U(0.1, 0.45)`, :math:`x_R \sim U(0.55, 0.9)`. (The reaction-diffusion problem then
  normalises onto ``[0, 1]`` with the grid min/max.)
* Numerics in PDEBench: finite volumes, MC-limited (their ``VLlimiter`` with ``alpha = 2``) linear
  reconstruction, upwind flux, midpoint predictor-corrector in time, ``dt = 0.3 dx / beta`` clipped to the
  save times; float32 JAX.

Differences from PDEBench (deliberate)
--------------------------------------
* PDEBench's wavenumbers are :math:`2\pi j c_j / (x_{N-1} - x_0)` with :math:`x_{N-1} - x_0 = 1 - dx`,
  which leaves a jump of ~2 pi n dx (a few % of the amplitude) at the periodic wrap. Here they are
  :math:`2\pi j c_j` so that :math:`u_0` is exactly periodic.
* Random draws come from ``numpy.random.default_rng(seed)`` per simulation (PDEBench draws one JAX key
  for the whole dataset and reuses keys between draws); the *distribution* is the same, the values are not.
* Default ``method = "spectral"``: the exact solution operator of the trigonometric interpolant,

  .. math:: \hat u_m(t) = \hat u_m(0)\, e^{-i k_m \beta t}, \qquad k_m = 2\pi m,

  advanced by one unit-modulus rotation per recorded interval (round-off drift ~1e-14 after 200 records; no
  truncation error). For an initial condition that is a trigonometric polynomial of degree ``< N/2`` (the basic
  sine superposition) this is exact to round-off; the tanh window (width 0.01 = 10 dx) is resolved to
  round-off too. The ``|.|`` option has kinks, near which the shifted interpolant rings with amplitude
  ~ dx * (slope jump), measured 2..4 dx for O(1) slopes (~3e-3 at N = 1024); the finite-volume scheme smears
  the same kinks over a few cells instead.
* ``method = "fv"`` is PDEBench's finite-volume scheme (MC limiter by default, upwind flux) but with
  Heun's SSP-RK2 instead of the midpoint predictor-corrector, because SSP-RK2 makes the scheme provably TVD
  (hence bounded by the initial data) for ``cfl <= 0.5``; both are second order. Each simulation takes
  ``n = ceil(|beta| dt_save / (cfl dx))`` equal steps per recorded interval, i.e. it lands on the save
  times without a clipped last step. All arithmetic is float64.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from solvers import register
from solvers.base import ParamSpace

_METHODS = ("spectral", "fv")
_LIMITERS = ("mc", "minmod", "vanleer", "none")
WINDOW_WIDTH = 0.01  # PDEBench's ``trns``: tanh transition width of the random window
WINDOW_LEFT = (0.1, 0.45)  # range of x_L
WINDOW_RIGHT = (0.55, 0.9)  # range of x_R


# ---------------------------------------------------------------------------------------------- validation helpers


def check_int(solver: str, name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` or a ``ValueError`` naming ``solver.name`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{solver}.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(
    solver: str, name: str, value: object, low: float, high: float = math.inf, *, open_low: bool = True
) -> float:
    """``value`` as a finite float in ``(low, high]`` (or ``[low, high]`` if ``not open_low``)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        left = "(" if open_low else "["
        right = "]" if math.isfinite(high) else ")"
        raise ValueError(f"{solver}.{name} must be a finite number in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def check_choice(solver: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{solver}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_seeds(seeds: np.ndarray, batch: int) -> np.ndarray:
    """Seeds ``[batch]`` of non-negative integers (what ``numpy.random.default_rng`` accepts)."""
    s = np.asarray(seeds)
    if s.shape != (batch,):
        raise ValueError(f"seeds must have shape [{batch}] (one per parameter row), got {list(s.shape)}")
    if batch and (not np.issubdtype(s.dtype, np.integer) or (s < 0).any()):
        raise ValueError(f"seeds must be non-negative integers, got {s!r}")
    return s.astype(np.int64)


def check_params(space: ParamSpace, params: np.ndarray) -> np.ndarray:
    """``ParamSpace.check`` that names the parameter when a value is NaN/inf."""
    p = np.asarray(params, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == space.dim:
        bad = ~np.isfinite(p)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"parameter {space.names[j]!r} must be finite, got {p[i, j]} in row {i}")
    return space.check(p)


def check_field(name: str, value: np.ndarray, resolution: int) -> np.ndarray:
    """A finite float64 batch of 1D fields ``[B, resolution]``."""
    u = np.asarray(value, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] != resolution:
        raise ValueError(f"{name} must have shape [B, {resolution}], got {list(u.shape)}")
    if not np.all(np.isfinite(u)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return u


def check_coefficient(name: str, value: np.ndarray, batch: int, *, nonnegative: bool = False) -> np.ndarray:
    c = np.asarray(value, dtype=np.float64)
    if c.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one per simulation), got {list(c.shape)}")
    if not np.all(np.isfinite(c)) or (nonnegative and (c < 0).any()):
        raise ValueError(f"{name} must be finite{' and >= 0' if nonnegative else ''}, got {c!r}")
    return c


def cell_centres(resolution: int, length: float = 1.0) -> np.ndarray:
    """PDEBench's grid: cell centres ``(i + 1/2) * length / resolution``, float64 ``[resolution]``."""
    return (np.arange(resolution, dtype=np.float64) + 0.5) * (length / resolution)


def fft_module(xp: Any) -> Any:
    """``scipy.fft`` for numpy (faster than ``numpy.fft`` on batches), ``torch.fft`` for torch: same signatures."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft


def torch_device(device: str | None) -> Any:
    import torch

    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------------------------------- initial condition


@dataclass(frozen=True)
class SineSuperposition:
    """One PDEBench random initial condition, evaluable at any ``x`` (so tests can compare with exact solutions).

    ``u(x) = window(x) * sign * abs?( sum_j A_j sin(2 pi n_j x + phi_j) )``, then ``(u - offset) / scale``.
    """

    wavenumbers: tuple[int, ...]  # n_j = j * c_j (0 for a mode that was not drawn)
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]
    absolute: bool
    sign: float
    window: tuple[float, float] | None  # (x_L, x_R) or None
    offset: float = 0.0
    scale: float = 1.0
    window_width: float = field(default=WINDOW_WIDTH)

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The field before normalisation, float64, same shape as ``x``."""
        x = np.asarray(x, dtype=np.float64)
        u = np.zeros_like(x)
        for n, a, phi in zip(self.wavenumbers, self.amplitudes, self.phases, strict=True):
            u += a * np.sin(2.0 * np.pi * n * x + phi)
        if self.absolute:
            u = np.abs(u)
        u = self.sign * u
        if self.window is not None:
            x_l, x_r = self.window
            w = self.window_width
            u = u * 0.5 * (np.tanh((x - x_l) / w) - np.tanh((x - x_r) / w))
        return u

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (self.raw(x) - self.offset) / self.scale

    @property
    def band_limit(self) -> int | None:
        """Highest wavenumber if ``u`` is a trigonometric polynomial (no ``|.|``, no window), else None."""
        if self.absolute or self.window is not None:
            return None
        return max(self.wavenumbers)


def draw_initial_condition(
    seed: int,
    *,
    resolution: int,
    k_max: int = 4,
    n_waves: int = 2,
    p_abs: float = 0.1,
    p_window: float = 0.1,
    normalise: bool = False,
) -> SineSuperposition:
    """PDEBench's ``init_multi`` for one simulation, drawn from ``numpy.random.default_rng(seed)``.

    Every random number is drawn whatever the outcome of the coin flips, in a fixed order, so that the
    same seed always gives the same field. ``normalise`` maps the grid values onto ``[0, 1]`` (min -> 0,
    max -> 1) as PDEBench does for the reaction-diffusion problem.
    """
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, k_max, size=n_waves)  # mode indices j-1, with replacement
    counts = np.bincount(chosen, minlength=k_max)
    amplitudes = rng.uniform(0.0, 1.0, size=k_max)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=k_max)
    absolute = bool(rng.random() < p_abs)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    use_window = bool(rng.random() < p_window)
    x_l = float(rng.uniform(*WINDOW_LEFT))
    x_r = float(rng.uniform(*WINDOW_RIGHT))
    ic = SineSuperposition(
        wavenumbers=tuple(int(j * c) for j, c in zip(range(1, k_max + 1), counts, strict=True)),
        amplitudes=tuple(float(a) for a in amplitudes),
        phases=tuple(float(p) for p in phases),
        absolute=absolute,
        sign=sign,
        window=(x_l, x_r) if use_window else None,
    )
    if not normalise:
        return ic
    u = ic.raw(cell_centres(resolution))
    lo, span = float(u.min()), float(u.max() - u.min())
    # A constant field (probability zero: needs all amplitudes 0) would divide by zero; keep it at 0 instead.
    return dataclasses.replace(ic, offset=lo, scale=span if span > 0 else 1.0)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Advection1DConfig:
    """Discretisation and initial-condition recipe of :class:`Advection1D`.

    ``resolution``: cells (even, ``>= 16``). ``t_final`` (> 0) and ``snapshots`` (>= 1): states are recorded
    at ``t = k t_final / snapshots``, ``k = 0..snapshots``. ``method``: ``"spectral"`` (exact Fourier shift) or
    ``"fv"`` (MUSCL finite volumes + SSP-RK2). ``limiter`` (fv only): ``"mc"`` (PDEBench), ``"minmod"``,
    ``"vanleer"`` or ``"none"`` (unlimited central slope, Fromm). ``cfl`` (fv only): Courant number in
    ``(0, 0.5]``, the TVD bound for the limiters above. ``k_max``, ``n_waves``, ``p_abs``, ``p_window``: the
    random initial condition (module docstring); ``n_waves * k_max < resolution / 2`` so that every drawn
    wavenumber is resolved below the Nyquist mode.
    """

    resolution: int = 1024
    t_final: float = 2.0
    snapshots: int = 200
    method: str = "spectral"
    limiter: str = "mc"
    cfl: float = 0.3
    k_max: int = 4
    n_waves: int = 2
    p_abs: float = 0.1
    p_window: float = 0.1

    def __post_init__(self) -> None:
        name = "advection1d"
        res = check_int(name, "resolution", self.resolution, 16)
        if res % 2:
            raise ValueError(f"{name}.resolution must be even, got {res}")
        object.__setattr__(self, "resolution", res)
        object.__setattr__(self, "t_final", check_float(name, "t_final", self.t_final, 0.0))
        object.__setattr__(self, "snapshots", check_int(name, "snapshots", self.snapshots, 1))
        object.__setattr__(self, "method", check_choice(name, "method", self.method, _METHODS))
        object.__setattr__(self, "limiter", check_choice(name, "limiter", self.limiter, _LIMITERS))
        object.__setattr__(self, "cfl", check_float(name, "cfl", self.cfl, 0.0, 0.5))
        object.__setattr__(self, "k_max", check_int(name, "k_max", self.k_max, 1))
        object.__setattr__(self, "n_waves", check_int(name, "n_waves", self.n_waves, 1))
        object.__setattr__(self, "p_abs", check_float(name, "p_abs", self.p_abs, 0.0, 1.0, open_low=False))
        object.__setattr__(self, "p_window", check_float(name, "p_window", self.p_window, 0.0, 1.0, open_low=False))
        if self.n_waves * self.k_max >= res // 2:
            raise ValueError(
                f"{name}.k_max must satisfy n_waves * k_max < resolution / 2 (highest drawable wavenumber below "
                f"Nyquist), got k_max={self.k_max}, n_waves={self.n_waves}, resolution={res}"
            )

    @property
    def dx(self) -> float:
        return 1.0 / self.resolution

    @property
    def dt_save(self) -> float:
        """Time between recorded states."""
        return self.t_final / self.snapshots


# ---------------------------------------------------------------------------------------------- numerics (numpy/torch)


def _limited_slope(xp: Any, left: Any, right: Any, limiter: str) -> Any:
    """Limited cell slope (times dx) from the one-sided differences ``u_i - u_{i-1}`` and ``u_{i+1} - u_i``."""
    if limiter == "none":
        return 0.5 * (left + right)
    same_sign = left * right > 0
    if limiter == "minmod":
        s = xp.sign(left) * xp.minimum(xp.abs(left), xp.abs(right))
    elif limiter == "mc":
        s = xp.sign(left) * xp.minimum(2.0 * xp.minimum(xp.abs(left), xp.abs(right)), 0.5 * xp.abs(left + right))
    else:  # van Leer: harmonic mean; the denominator is only used where left*right > 0, i.e. never zero there
        denom = xp.where(same_sign, left + right, xp.ones_like(left))
        s = 2.0 * left * right / denom
    return xp.where(same_sign, s, xp.zeros_like(s))


def _fv_rate(xp: Any, u: Any, beta_pos: Any, beta_neg: Any, dx: float, limiter: str) -> Any:
    """Semi-discrete ``du/dt = -(F_{i+1/2} - F_{i-1/2}) / dx`` with the upwind flux on limited reconstructions."""
    left = u - xp.roll(u, 1, -1)  # u_i - u_{i-1}
    right = xp.roll(u, -1, -1) - u  # u_{i+1} - u_i
    slope = _limited_slope(xp, left, right, limiter)
    u_minus = u + 0.5 * slope  # state just left of face i+1/2 (from cell i)
    u_plus = xp.roll(u - 0.5 * slope, -1, -1)  # state just right of face i+1/2 (from cell i+1)
    flux = beta_pos * u_minus + beta_neg * u_plus  # F_{i+1/2}, upwind
    return (xp.roll(flux, 1, -1) - flux) / dx


def _spectral_states(xp: Any, u0: Any, k: Any, beta: Any, dt_save: float, snapshots: int, n: int) -> Iterator[Any]:
    """``u(t) = IFFT(FFT(u0) exp(-i k beta t))`` at each recorded t; u0 ``[B, N]``, k ``[N/2+1]``, beta ``[B, 1]``."""
    fft = fft_module(xp)
    u_hat = fft.rfft(u0)  # [B, N/2+1] complex128
    # One unit-modulus rotation per record instead of a complex exp per record: the exp dominated the cost, and
    # the product of `snapshots` rotations drifts from the direct phase by only ~snapshots * 1e-16 (relative).
    rotation = xp.exp(-1j * (k[None, :] * beta * dt_save))  # [B, N/2+1]
    yield u0
    for _ in range(snapshots):
        u_hat = u_hat * rotation
        yield fft.irfft(u_hat, n=n)


def _fv_states(
    xp: Any, u0: Any, beta: Any, n_sub: np.ndarray, dt_save: float, dx: float, snapshots: int, limiter: str
) -> Iterator[Any]:
    """MUSCL + SSP-RK2; simulation b takes ``n_sub[b]`` equal steps per record, masked in a common loop."""
    beta_pos = xp.where(beta > 0, beta, xp.zeros_like(beta))  # [B, 1]
    beta_neg = xp.where(beta < 0, beta, xp.zeros_like(beta))
    n_sub_col = n_sub.reshape(-1, 1)
    dt = dt_save / np.maximum(n_sub_col, 1)  # [B, 1]; rows with n_sub = 0 (beta = 0) never update
    if xp is not np:
        dt = xp.asarray(dt, device=u0.device)
        n_sub_col = xp.asarray(n_sub_col, device=u0.device)
    steps = int(n_sub.max()) if n_sub.size else 0
    u = u0
    yield u
    for _ in range(snapshots):
        for s in range(steps):
            # Heun / SSP-RK2: a convex combination of two forward-Euler steps, TVD whenever forward Euler is.
            u1 = u + dt * _fv_rate(xp, u, beta_pos, beta_neg, dx, limiter)
            u_new = 0.5 * (u + u1 + dt * _fv_rate(xp, u1, beta_pos, beta_neg, dx, limiter))
            # Each simulation keeps its own CFL-based step count, so a batch reproduces single runs exactly.
            u = xp.where(n_sub_col > s, u_new, u)
        yield u


# ---------------------------------------------------------------------------------------------- solver


@register
class Advection1D:
    """Batched 1D periodic advection ``u_t + beta u_x = 0`` (see the module docstring).

    Field ``("u",)``; operator input ``u`` at ``t = 0`` and ``beta``, output ``u`` at the later times.
    """

    name: ClassVar[str] = "advection1d"
    Config: ClassVar[type[Advection1DConfig]] = Advection1DConfig
    # The default (spectral) run takes a few ms for a batch of 8; nothing to cut.
    BENCH: ClassVar[dict] = {}

    def __init__(self, config: Advection1DConfig = Advection1DConfig()) -> None:
        if not isinstance(config, Advection1DConfig):
            raise TypeError(f"Advection1D expects an Advection1DConfig, got {type(config).__name__}")
        self._config = config
        self._params = ParamSpace(names=("beta",), low=(0.1,), high=(4.0,))
        n = config.resolution
        self._k = 2.0 * np.pi * np.arange(n // 2 + 1, dtype=np.float64)  # angular wavenumbers on [0, 1)

    # ------------------------------------------------------------------ description

    @property
    def config(self) -> Advection1DConfig:
        return self._config

    @property
    def params(self) -> ParamSpace:
        """``beta`` in ``[0.1, 4]``."""
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
        """The random initial condition of simulation ``seed`` as an evaluable function of ``x``."""
        c = self._config
        return draw_initial_condition(
            int(seed), resolution=c.resolution, k_max=c.k_max, n_waves=c.n_waves, p_abs=c.p_abs, p_window=c.p_window
        )

    def _initial_fields(self, seeds: np.ndarray) -> np.ndarray:
        x = self.x
        if seeds.size == 0:
            return np.zeros((0, x.size))
        # Drawn one simulation at a time so a seed gives the same field in any batch; cheap (N sines each).
        return np.stack([self.initial_condition(s)(x) for s in seeds])

    def _fv_substeps(self, beta: np.ndarray) -> np.ndarray:
        c = self._config
        return np.ceil(np.abs(beta) * c.dt_save / (c.cfl * c.dx) - 1e-12).astype(np.int64)

    # ------------------------------------------------------------------ lower level

    def run(self, initial: np.ndarray, beta: np.ndarray) -> Iterator[np.ndarray]:
        """Advance arbitrary fields ``initial [B, resolution]`` with velocities ``beta [B]`` (any finite value).

        Yields ``snapshots + 1`` float64 arrays ``[B, resolution]``, the states at :attr:`times`, with this
        solver's method.
        """
        u0 = check_field("initial", initial, self._config.resolution)
        b = check_coefficient("beta", beta, u0.shape[0])
        return self._run(np, u0, b)

    def _run(self, xp: Any, u0: Any, beta: np.ndarray) -> Iterator[Any]:
        c = self._config
        if u0.shape[0] == 0:  # FFT backends reject empty batches; nothing to advance
            return iter([u0] * (c.snapshots + 1))
        if xp is np:
            beta_col, k = beta[:, None], self._k
        else:
            beta_col = xp.asarray(beta[:, None], device=u0.device)
            k = xp.asarray(self._k, device=u0.device)
        if c.method == "spectral":
            return _spectral_states(xp, u0, k, beta_col, c.dt_save, c.snapshots, c.resolution)
        return _fv_states(xp, u0, beta_col, self._fv_substeps(beta), c.dt_save, c.dx, c.snapshots, c.limiter)

    # ------------------------------------------------------------------ Solver protocol

    def _inputs(self, params: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = check_params(self._params, params)
        s = check_seeds(seeds, p.shape[0])
        return self._initial_fields(s), p[:, 0]

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k, fields [B, 1, resolution] float32)`` for ``k = 0..snapshots`` as each state is computed."""
        u0, beta = self._inputs(params, seeds)
        return self._stream(u0, beta)

    def _stream(self, u0: np.ndarray, beta: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for k, state in enumerate(self._run(np, u0, beta)):
            yield k, np.ascontiguousarray(state[:, None], dtype=np.float32)

    def solve(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``params [B, 1]`` (beta), ``seeds [B]`` -> ``[B, snapshots+1, 1, resolution]`` float32, C-contiguous."""
        u0, beta = self._inputs(params, seeds)
        out = np.empty((u0.shape[0], self._config.snapshots + 1, 1, self._config.resolution), dtype=np.float32)
        for k, fields in self._stream(u0, beta):
            out[:, k] = fields
        return out

    def solve_torch(self, params: np.ndarray, seeds: np.ndarray, device: str | None = None) -> Any:
        """Same as :meth:`solve` computed with torch (float64/complex128 inside) on ``device``.

        Returns a float32 ``torch.Tensor [B, snapshots+1, 1, resolution]`` on ``device`` (default: CUDA if
        available). The initial conditions are drawn with numpy exactly as in :meth:`solve`.
        """
        import torch

        dev = torch_device(device)
        u0, beta = self._inputs(params, seeds)
        c = self._config
        out = torch.empty((u0.shape[0], c.snapshots + 1, 1, c.resolution), dtype=torch.float32, device=dev)
        for k, state in enumerate(self._run(torch, torch.as_tensor(u0, dtype=torch.float64, device=dev), beta)):
            out[:, k, 0] = state
        return out
