r"""1D Kuramoto–Sivashinsky equation on a periodic domain, ETDRK4 in Fourier space (chaotic for ``L = 22``).

Problem
-------
.. math::

    u_t + u\,u_x + u_{xx} + u_{xxxx} = 0 \quad \text{on } [0, L) \text{ periodic}, \qquad u(\cdot, 0) = u_0 .

The nonlinear term is written in conservative form, :math:`u u_x = (u^2/2)_x`, so the spatial mean
:math:`\bar u = \frac1L\int_0^L u\,dx` is an invariant. A nonzero mean is equivalent to zero mean seen from a
frame moving at speed :math:`\bar u` (Galilean invariance), so the default keeps it at 0. For ``L = 22`` the
long-time dynamics is chaotic; the largest Lyapunov exponent is about 0.043-0.048 (Edson, Bunder, Mattner &
Roberts 2019, "Lyapunov exponents of the Kuramoto–Sivashinsky PDE", ANZIAM J. 61: 0.043; Cvitanović,
Davidchack & Siminos 2010, SIAM J. Appl. Dyn. Syst. 9: 0.048), i.e. a Lyapunov time of about 23 time units.

Discretisation
--------------
Fourier pseudo-spectral on ``n`` equispaced points ``x_j = j L / n``, ``j = 0..n-1``, real FFT
:math:`\hat u_m`, ``m = 0..n/2``, wavenumbers :math:`k_m = 2\pi m / L`. In Fourier space

.. math::

    \hat u_t = \mathcal L \hat u + \mathcal N(\hat u), \qquad \mathcal L_m = k_m^2 - k_m^4, \qquad
    \mathcal N(\hat u)_m = -\tfrac{i k_m}{2}\,\widehat{(u^2)}_m ,

with the odd derivative zeroed at the Nyquist mode ``m = n/2`` (its ``i k`` is not a real-valued operator on
an even grid). No dealiasing, as in Kassam & Trefethen's ``kursiv.m``: the spectrum decays exponentially and at
the supported resolutions the Nyquist amplitude on the attractor is far below the time-stepping error.

Time stepping is the exponential time-differencing fourth-order Runge–Kutta scheme ETDRK4 of Cox & Matthews
(2002, J. Comput. Phys. 176) with step :math:`h`:

.. math::

    a &= E_2 \hat u + Q\,\mathcal N(\hat u), \quad b = E_2 \hat u + Q\,\mathcal N(a), \quad
    c = E_2 a + Q\,(2\mathcal N(b) - \mathcal N(\hat u)), \\
    \hat u^{+} &= E \hat u + f_1 \mathcal N(\hat u) + 2 f_2 (\mathcal N(a) + \mathcal N(b)) + f_3 \mathcal N(c),

:math:`E = e^{h\mathcal L}`, :math:`E_2 = e^{h\mathcal L/2}`, :math:`Q = h\,(e^{z/2} - 1)/z` and, with
:math:`z = h\mathcal L`, :math:`f_1 = h\,[-4 - z + e^z(4 - 3z + z^2)]/z^3`, :math:`f_2 = h\,[2 + z + e^z(z - 2)]/z^3`,
:math:`f_3 = h\,[-4 - 3z - z^2 + e^z(4 - z)]/z^3` (limits :math:`h/2, h/6, h/6, h/6` at :math:`z = 0`).
These suffer catastrophic cancellation for small :math:`|h\mathcal L|`, so they are evaluated, as in
Kassam & Trefethen (2005, SIAM J. Sci. Comput. 26, "Fourth-order time-stepping for stiff PDEs"), as the mean over
``M = 64`` points :math:`z = h\mathcal L + e^{i\theta}` of a circle of radius 1 around each :math:`h\mathcal L`
(the trapezoid rule for the Cauchy integral, spectrally accurate). :math:`\mathcal L` is real, so the real part
is taken. The mean mode (``m = 0``) has :math:`\mathcal L_0 = 0`, :math:`E = 1` and :math:`\mathcal N_0 = 0`
exactly, so the mean never changes.

Recipe of a simulation
----------------------
The seed draws a smooth random initial condition (``np.random.default_rng(seed)``): Fourier modes
``m = 1..min(8, n/2-1)`` with independent complex Gaussian coefficients of standard deviation
:math:`e^{-(m/4)^2}` (a Gaussian random field with a rapidly decaying spectrum), scaled to RMS 1, plus the
configured ``mean``. It is advanced for ``burn_in`` time units so that the recorded states lie on the attractor
(the transient is forgotten; the IC itself is not recorded), then ``snapshots + 1`` states are recorded every
``record_every`` time units, time 0 being the end of the burn-in. Arithmetic is float64 (complex128);
trajectories are returned as float32. Because the dynamics is chaotic, round-off differences (numpy vs torch,
batched vs single, CPU vs GPU FFTs) grow like :math:`e^{0.045 t}`: two paths agree to ~1e-5 relative only over
about ``burn_in + snapshots * record_every`` <~ 500 time units, beyond which they agree statistically only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.fft

from solvers import register
from solvers.base import ParamSpace

_CONTOUR_POINTS = 64  # Kassam & Trefethen use 32 for real L; 64 costs nothing (set-up only) and is safer.
_IC_MODES = 8  # initial condition: Fourier modes 1..8 ...
_IC_DECAY = 4.0  # ... with standard deviation exp(-(m/4)^2)
_DT_MAX = 0.5  # ETDRK4 step above which the KS attractor statistics are no longer accurate (see Config)
_DX_MAX = 1.0  # grid spacing above which the dissipative range k > 1 is not resolved (see Config)


def _check_int(field: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but resolution=True is always a configuration mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"ks1d.{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(field: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"ks1d.{field} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"ks1d.{field} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _steps_per(field: str, span: float, dt: float, *, allow_zero: bool) -> int:
    """``span / dt`` as an integer, or a ValueError naming ``field`` when ``span`` is not a multiple of ``dt``."""
    ratio = span / dt
    steps = round(ratio)
    if abs(ratio - steps) > 1e-9 * max(1.0, ratio) or (steps == 0 and not allow_zero):
        raise ValueError(
            f"ks1d.{field} must be a{' nonnegative' if allow_zero else ''} integer multiple of dt={dt}, got {span!r}"
        )
    return steps


@dataclass(frozen=True)
class KS1DConfig:
    """Discretisation and recording of :class:`KS1D`.

    ``length``: period ``L > 0`` of the domain (22 is the standard chaotic case).
    ``resolution``: grid points ``n``, even and ``>= 16``, with spacing ``L/n <= 1`` (so that the strongly
    damped range ``k > pi`` is resolved; ``L = 22`` needs ``n >= 22``).
    ``dt``: ETDRK4 step, ``0 < dt <= 0.5`` (larger steps stay stable but bias the chaotic statistics).
    ``burn_in``: time (``>= 0``, a multiple of ``dt``) advanced before recording, so snapshots lie on the attractor.
    ``snapshots``: number of recorded steps ``>= 1``; the trajectory holds ``snapshots + 1`` states.
    ``record_every``: time between records, a positive multiple of ``dt``.
    ``mean``: spatial mean of the initial condition, hence of the whole trajectory (finite; default 0).
    """

    length: float = 22.0
    resolution: int = 64
    dt: float = 0.25
    burn_in: float = 100.0
    snapshots: int = 100
    record_every: float = 1.0
    mean: float = 0.0

    def __post_init__(self) -> None:
        # Normalise numpy scalars / ints-for-floats so that equality and hashing of configs behave.
        object.__setattr__(self, "length", _check_float("length", self.length))
        n = _check_int("resolution", self.resolution, 16)
        if n % 2:
            raise ValueError(f"ks1d.resolution must be even (real FFT with a Nyquist mode), got {n}")
        object.__setattr__(self, "resolution", n)
        if self.length / n > _DX_MAX:
            raise ValueError(
                f"ks1d.resolution must be >= length/{_DX_MAX} (grid spacing <= {_DX_MAX}) to resolve the "
                f"dissipation range, got {n} for length {self.length}"
            )
        dt = _check_float("dt", self.dt)
        if dt > _DT_MAX:
            raise ValueError(f"ks1d.dt must be <= {_DT_MAX}, got {dt!r}")
        object.__setattr__(self, "dt", dt)
        object.__setattr__(self, "burn_in", _check_float("burn_in", self.burn_in, allow_zero=True))
        object.__setattr__(self, "snapshots", _check_int("snapshots", self.snapshots, 1))
        object.__setattr__(self, "record_every", _check_float("record_every", self.record_every))
        if isinstance(self.mean, bool) or not isinstance(self.mean, numbers.Real) or not math.isfinite(self.mean):
            raise ValueError(f"ks1d.mean must be a finite number, got {self.mean!r}")
        object.__setattr__(self, "mean", float(self.mean))
        _steps_per("burn_in", self.burn_in, dt, allow_zero=True)
        _steps_per("record_every", self.record_every, dt, allow_zero=False)

    @property
    def dx(self) -> float:
        """Grid spacing ``L / n``."""
        return self.length / self.resolution

    @property
    def burn_in_steps(self) -> int:
        """ETDRK4 steps before the first record, ``burn_in / dt``."""
        return _steps_per("burn_in", self.burn_in, self.dt, allow_zero=True)

    @property
    def steps_per_record(self) -> int:
        """ETDRK4 steps between records, ``record_every / dt``."""
        return _steps_per("record_every", self.record_every, self.dt, allow_zero=False)

    @property
    def t_final(self) -> float:
        """Time of the last recorded state after the burn-in, ``snapshots * record_every``."""
        return self.snapshots * self.record_every


def etdrk4_coefficients(lin: np.ndarray, h: float, points: int = _CONTOUR_POINTS) -> dict[str, np.ndarray]:
    """ETDRK4 coefficients for a real diagonal linear operator ``lin`` and step ``h`` (Kassam & Trefethen 2005).

    Returns float64 arrays ``E = exp(hL)``, ``E2 = exp(hL/2)``, ``Q``, ``f1``, ``f2``, ``f3`` of ``lin``'s shape;
    the phi-function combinations are contour means over ``points`` roots of unity around each ``hL``.
    """
    lin = np.asarray(lin, dtype=np.float64)
    hl = h * lin
    # Points e^{i pi (j - 1/2)/M}: no point falls on the real axis, where z = 0 would be hit when hL = -1 or 1.
    r = np.exp(1j * np.pi * (np.arange(1, points + 1) - 0.5) / points)
    z = hl[..., None] + r  # [..., M]
    ez = np.exp(z)
    return {
        "E": np.exp(hl),
        "E2": np.exp(hl / 2),
        "Q": h * np.mean((np.exp(z / 2) - 1) / z, axis=-1).real,
        "f1": h * np.mean((-4 - z + ez * (4 - 3 * z + z**2)) / z**3, axis=-1).real,
        "f2": h * np.mean((2 + z + ez * (-2 + z)) / z**3, axis=-1).real,
        "f3": h * np.mean((-4 - 3 * z - z**2 + ez * (4 - z)) / z**3, axis=-1).real,
    }


class _Stepper:
    """ETDRK4 on real-FFT coefficients ``[B, n/2+1]`` for one backend (numpy or torch), float64/complex128."""

    def __init__(
        self,
        coef: dict[str, Any],
        g: Any,
        rfft: Callable[[Any], Any],
        irfft: Callable[[Any], Any],
    ) -> None:
        self.E, self.E2, self.Q = coef["E"], coef["E2"], coef["Q"]
        self.f1, self.f2, self.f3 = coef["f1"], coef["f2"], coef["f3"]
        self.g = g  # -i k / 2 (0 at the Nyquist mode)
        self.rfft, self.irfft = rfft, irfft

    def nonlinear(self, v: Any) -> Any:
        # -(u^2/2)_x in Fourier space; conservative form keeps the mean mode exactly zero.
        u = self.irfft(v)
        return self.g * self.rfft(u * u)

    def step(self, v: Any) -> Any:
        nv = self.nonlinear(v)
        a = self.E2 * v + self.Q * nv
        na = self.nonlinear(a)
        b = self.E2 * v + self.Q * na
        nb = self.nonlinear(b)
        c = self.E2 * a + self.Q * (2 * nb - nv)
        nc = self.nonlinear(c)
        return self.E * v + self.f1 * nv + 2 * self.f2 * (na + nb) + self.f3 * nc

    def advance(self, v: Any, steps: int) -> Any:
        for _ in range(steps):
            v = self.step(v)
        return v


@register
class KS1D:
    """Batched ETDRK4 Fourier solver of the 1D Kuramoto–Sivashinsky equation (see the module docstring).

    Fields ``("u",)`` on the grid ``(n,)``; no scalar parameters (the only randomness is the seeded initial
    condition, forgotten during the burn-in). Natural operator: autoregressive ``u(t) -> u(t + record_every)``.
    """

    name: ClassVar[str] = "ks1d"
    Config: ClassVar[type[KS1DConfig]] = KS1DConfig
    # The default config is only 800 ETDRK4 steps (~0.08 s for 8 on one core); 2000 steps reach the 0.2 s floor.
    BENCH: ClassVar[dict] = {"snapshots": 400}

    def __init__(self, config: KS1DConfig = KS1DConfig()) -> None:
        if not isinstance(config, KS1DConfig):
            raise TypeError(f"KS1D expects a KS1DConfig, got {type(config).__name__}")
        self._config = config
        self._params = ParamSpace((), (), ())
        n = config.resolution
        self._k = 2.0 * np.pi * np.arange(n // 2 + 1, dtype=np.float64) / config.length  # [n/2+1]
        self._lin = self._k**2 - self._k**4
        g = -0.5j * self._k
        g[-1] = 0.0  # Nyquist: the odd derivative of a real grid function has no real-valued representative
        self._g = g
        self._coef = etdrk4_coefficients(self._lin, config.dt)

    # ------------------------------------------------------------------ description

    @property
    def config(self) -> KS1DConfig:
        return self._config

    @property
    def params(self) -> ParamSpace:
        """Empty: the domain length lives in the config, the seed draws the initial condition."""
        return self._params

    @property
    def grid(self) -> tuple[int]:
        return (self._config.resolution,)

    @property
    def fields(self) -> tuple[str, ...]:
        return ("u",)

    @property
    def times(self) -> np.ndarray:
        """Recorded times ``k * record_every``, ``k = 0..snapshots``, counted from the end of the burn-in."""
        return np.arange(self._config.snapshots + 1, dtype=np.float64) * self._config.record_every

    @property
    def x(self) -> np.ndarray:
        """Grid points ``j L / n``, ``j = 0..n-1``."""
        return np.arange(self._config.resolution, dtype=np.float64) * self._config.dx

    @property
    def wavenumbers(self) -> np.ndarray:
        """Wavenumbers ``2 pi m / L`` of the real-FFT modes ``m = 0..n/2`` (copy)."""
        return self._k.copy()

    # ------------------------------------------------------------------ numerics

    def _numpy_stepper(self) -> _Stepper:
        n = self._config.resolution
        return _Stepper(
            self._coef,
            self._g,
            lambda u: scipy.fft.rfft(u, axis=-1),
            lambda v: scipy.fft.irfft(v, n=n, axis=-1),
        )

    def _torch_stepper(self, device: Any) -> _Stepper:
        import torch

        n = self._config.resolution
        coef = {key: torch.as_tensor(val, dtype=torch.float64, device=device) for key, val in self._coef.items()}
        g = torch.as_tensor(self._g, dtype=torch.complex128, device=device)
        return _Stepper(coef, g, lambda u: torch.fft.rfft(u, dim=-1), lambda v: torch.fft.irfft(v, n=n, dim=-1))

    def initial_condition(self, seeds: np.ndarray) -> np.ndarray:
        """The random initial conditions ``[B, n]`` float64 (before the burn-in) drawn from ``seeds [B]``."""
        seeds = np.asarray(seeds)
        if seeds.ndim != 1:
            raise ValueError(f"seeds must have shape [B], got {list(seeds.shape)}")
        n = self._config.resolution
        modes = min(_IC_MODES, n // 2 - 1)
        std = np.exp(-((np.arange(1, modes + 1) / _IC_DECAY) ** 2))
        out = np.empty((seeds.shape[0], n), dtype=np.float64)
        for b, seed in enumerate(seeds):
            # One generator per simulation: the IC depends on the seed only, never on the batch around it.
            rng = np.random.default_rng(int(seed))
            coef = np.zeros(n // 2 + 1, dtype=np.complex128)
            coef[1 : modes + 1] = std * (rng.standard_normal(modes) + 1j * rng.standard_normal(modes))
            u = scipy.fft.irfft(coef, n=n)
            out[b] = u / np.sqrt(np.mean(u**2)) + self._config.mean
        return out

    def _check_u0(self, u0: np.ndarray) -> np.ndarray:
        n = self._config.resolution
        u = np.asarray(u0, dtype=np.float64)
        if u.ndim != 2 or u.shape[1] != n:
            raise ValueError(f"u0 must have shape [B, {n}], got {list(u.shape)}")
        if not np.all(np.isfinite(u)):
            raise ValueError("u0 must be finite (no NaN or inf)")
        return u

    def _steps_for(self, t: float) -> int:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"t must be a finite number >= 0, got {t!r}")
        ratio = t / self._config.dt
        steps = round(ratio)
        if abs(ratio - steps) > 1e-9 * max(1.0, ratio):
            raise ValueError(f"t must be a multiple of dt={self._config.dt}, got {t!r}")
        return steps

    def evolve(self, u0: np.ndarray, t: float) -> np.ndarray:
        """Advance ``u0 [B, n]`` by time ``t`` (a multiple of ``dt``) with ETDRK4; returns float64 ``[B, n]``."""
        u = self._check_u0(u0)
        steps = self._steps_for(t)
        if steps == 0 or u.shape[0] == 0:
            return u.copy()
        st = self._numpy_stepper()
        return st.irfft(st.advance(st.rfft(u), steps))

    def run(self, u0: np.ndarray) -> Iterator[np.ndarray]:
        """Lower-level time stepper from an arbitrary state, without burn-in.

        ``u0 [B, n]``: initial field. Yields ``snapshots + 1`` new float64 arrays ``[B, n]``, the states at
        ``times`` (``u0`` itself first), using this solver's ``dt``, ``record_every`` and ``snapshots``.
        """
        u = self._check_u0(u0)
        return self._run(u, burn_in=False)

    def _run(self, u: np.ndarray, *, burn_in: bool) -> Iterator[np.ndarray]:
        # Separate from run() so that argument errors surface at call time, not at the first next().
        cfg = self._config
        st = self._numpy_stepper()
        if u.shape[0] == 0:  # scipy.fft rejects empty axes; an empty batch has nothing to advance
            for _ in range(cfg.snapshots + 1):
                yield u.copy()
            return
        v = st.rfft(u)  # [B, n/2+1]
        if burn_in:
            v = st.advance(v, cfg.burn_in_steps)
        yield st.irfft(v)
        for _ in range(cfg.snapshots):
            v = st.advance(v, cfg.steps_per_record)
            yield st.irfft(v)

    # ------------------------------------------------------------------ Solver protocol

    def _initial(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        p = self._params.check(params)
        seeds = np.asarray(seeds)
        if seeds.shape != (p.shape[0],):
            raise ValueError(f"seeds must have shape [{p.shape[0]}] (one per parameter row), got {list(seeds.shape)}")
        return self.initial_condition(seeds)

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k, fields [B, 1, n] float32)`` for ``k = 0..snapshots`` as each record is computed.

        ``params [B, 0]`` (no parameters), ``seeds [B]``: one random initial condition per seed, burnt in first.
        """
        u0 = self._initial(params, seeds)
        return self._stream(u0)

    def _stream(self, u0: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for k, state in enumerate(self._run(u0, burn_in=True)):
            yield k, np.ascontiguousarray(state[:, None], dtype=np.float32)

    def work_per_simulation(self) -> int:
        """Grid-point updates of one simulation: grid points times ETDRK4 steps, burn-in included."""
        return int(
            self._config.resolution
            * (self._config.burn_in_steps + self._config.snapshots * self._config.steps_per_record)
        )

    def solve(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``params [B, 0]``, ``seeds [B]`` -> trajectories ``[B, snapshots+1, 1, n]`` float32, C-contiguous."""
        u0 = self._initial(params, seeds)
        out = np.empty((u0.shape[0], self._config.snapshots + 1, 1, self._config.resolution), dtype=np.float32)
        for k, fields in self._stream(u0):
            out[:, k] = fields
        return out

    def solve_torch(self, params: np.ndarray, seeds: np.ndarray, device: str | None = None) -> Any:
        """Same as :meth:`solve` with torch FFTs on ``device`` (default cuda if available): a float32 tensor.

        The initial conditions are drawn with numpy exactly as in :meth:`solve`; arithmetic is complex128.
        """
        import torch

        u0 = self._initial(params, seeds)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = self._config
        b, n = u0.shape[0], cfg.resolution
        out = torch.empty((b, cfg.snapshots + 1, 1, n), dtype=torch.float32, device=device)
        if b == 0:
            return out
        st = self._torch_stepper(device)
        v = st.rfft(torch.as_tensor(u0, dtype=torch.float64, device=device))  # [B, n/2+1] complex128
        v = st.advance(v, cfg.burn_in_steps)
        out[:, 0, 0] = st.irfft(v)
        for k in range(1, cfg.snapshots + 1):
            v = st.advance(v, cfg.steps_per_record)
            out[:, k, 0] = st.irfft(v)
        return out


def largest_lyapunov_exponent(
    solver: KS1D,
    u0: np.ndarray,
    time: float,
    renormalise_every: float = 1.0,
    delta: float = 1e-7,
    seed: int = 0,
) -> np.ndarray:
    r"""Largest Lyapunov exponent per trajectory by the two-trajectory (Benettin et al. 1980) method.

    Each state of ``u0 [B, n]`` (which should already lie on the attractor) gets a companion displaced by a
    random smooth perturbation of RMS norm ``delta``. Both are advanced together with the solver's ETDRK4 step;
    every ``renormalise_every`` time units the growth :math:`d_j = \|u' - u\| / \delta` is logged and the
    companion is pulled back to distance ``delta`` along the current separation. Returns float64 ``[B]``,
    :math:`\lambda = \frac{1}{t}\sum_j \log d_j`. ``delta`` must be small enough that the separation stays in
    the linear regime over one interval (``delta * exp(lambda * renormalise_every)`` << 1) and large enough
    that round-off (~1e-15) is negligible.
    """
    u = solver._check_u0(u0)
    total = solver._steps_for(time)
    per = solver._steps_for(renormalise_every)
    if per == 0 or total == 0 or total % per:
        raise ValueError(f"time ({time}) must be a positive multiple of renormalise_every ({renormalise_every})")
    if isinstance(delta, bool) or not (isinstance(delta, numbers.Real) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    b, n = u.shape
    st = solver._numpy_stepper()
    rng = np.random.default_rng(seed)
    pert = rng.standard_normal((b, n))
    pert -= pert.mean(axis=-1, keepdims=True)  # the mean is invariant: a mean shift is a neutral direction
    pert *= delta / np.sqrt(np.mean(pert**2, axis=-1, keepdims=True))
    # One batched program for both copies: [2B, n/2+1].
    v = st.rfft(np.concatenate([u, u + pert]))
    log_growth = np.zeros(b)
    for _ in range(total // per):
        v = st.advance(v, per)
        diff = v[b:] - v[:b]  # [B, n/2+1], measured in Fourier space (Parseval: same norm up to a constant)
        # RMS in physical space via Parseval on the real FFT (modes 1..n/2-1 count twice).
        w = np.full(diff.shape[-1], 2.0)
        w[0] = 1.0
        w[-1] = 1.0
        dist = np.sqrt(np.sum(w * np.abs(diff) ** 2, axis=-1)) / n  # [B]
        log_growth += np.log(dist / delta)
        v[b:] = v[:b] + diff * (delta / dist)[:, None]
    return log_growth / (total * solver.config.dt)
