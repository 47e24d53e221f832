r"""2D incompressible Navier–Stokes in vorticity form on the periodic unit torus (the FNO benchmark).

Problem (Li et al., "Fourier Neural Operator for Parametric PDEs", ICLR 2021, section 5.3)
-------------------------------------------------------------------------------------------
.. math::

    w_t + u\cdot\nabla w = \nu\,\Delta w + f, \qquad \nabla\cdot u = 0, \qquad w = \nabla\times u
    \quad \text{on } [0,1)^2 \text{ periodic},

with the stream function :math:`-\Delta\psi = w`, :math:`u = (\psi_y, -\psi_x)`, the fixed forcing

.. math::

    f(x, y) = 0.1\,\bigl(\sin 2\pi(x+y) + \cos 2\pi(x+y)\bigr),

and the viscosity ``nu`` (the paper uses ``1e-3`` with ``T = 50``, ``1e-4`` with ``T = 30`` and ``1e-5`` with
``T = 20``; any positive value is accepted). The only randomness is the initial vorticity, so the parameter
space is empty and each simulation is determined by its seed.

Initial condition
-----------------
The paper writes :math:`w_0 \sim \mathcal N(0, 7^{3/2}(-\Delta + 49 I)^{-2.5})` with zero mean. This module
reproduces the paper's *data generator* (``GaussianRF(2, s, alpha=2.5, tau=7)`` of the FNO repository), whose
normalisation is: with :math:`\sigma = \tau^{\alpha - d/2} = 7^{3/2}`, :math:`\lambda_k = 4\pi^2|k|^2 + \tau^2`
and i.i.d. complex normals :math:`\xi_k = a_k + i b_k` (``a, b ~ N(0, 1)``) for every integer wavenumber
``k`` of the ``n_solve x n_solve`` FFT grid,

.. math::

    w_0(x) = \operatorname{Re} \sum_{k \ne 0} \sqrt 2\,\sigma\,\lambda_k^{-\alpha/2}\,\xi_k\,e^{2\pi i k\cdot x},

i.e. a real Gaussian field with covariance operator :math:`2\sigma^2(-\Delta+\tau^2 I)^{-\alpha}
= 2\cdot 7^3\,(-\Delta + 49 I)^{-2.5}` restricted to the grid's modes; its discrete Fourier coefficients
:math:`\hat w_k = \frac{1}{n^2}\sum_x w_0(x) e^{-2\pi i k\cdot x}` have
:math:`E|\hat w_k|^2 = 2\sigma^2\lambda_k^{-\alpha}` (also on the Nyquist lines) and
:math:`\hat w_0 = 0`. Each simulation draws ``standard_normal((2, n, n))`` (real parts, then imaginary parts)
from ``np.random.default_rng(seed)``.

Discretisation (pseudo-spectral, as the FNO generator)
------------------------------------------------------
Fourier–Galerkin in space on the ``n_solve x n_solve`` grid :math:`x_i = i/n`, arrays indexed
``[..., i, j]`` with ``x = i/n``, ``y = j/n``. :math:`\hat\psi_k = \hat w_k/(4\pi^2|k|^2)` (``k != 0``),
derivatives by :math:`2\pi i k` (zeroed on the Nyquist lines so every field stays exactly Hermitian, i.e. real),
the advection :math:`N(w) = u\,w_x + v\,w_y` is formed pointwise on the grid and de-aliased with the FNO
mask :math:`|k_x|, |k_y| \le \frac23\lfloor n/2\rfloor` (applied to :math:`\hat N` only, as the generator does).

Time stepping: Crank–Nicolson on :math:`\nu\Delta` with an explicit advection term. With
:math:`a_k = \tfrac12\,dt\,\nu\,4\pi^2|k|^2`,

.. math::

    \hat w^{*} = \frac{(1-a_k)\hat w^n + dt\,(\hat f - \hat N(w^n))}{1 + a_k}, \qquad
    \hat w^{n+1} = \frac{(1-a_k)\hat w^n + dt\,\bigl(\hat f - \tfrac12[\hat N(w^n) + \hat N(w^{*})]\bigr)}{1 + a_k}.

``advection="heun"`` (default) takes both stages (explicit trapezoid/Heun + CN: second order in ``dt``);
``advection="euler"`` stops at :math:`\hat w^*` (forward Euler + CN: first order), which is exactly the FNO
repository's ``ns_2d.py`` update. (The generator also sets :math:`|k|^2 := 1` at ``k = 0``, which slowly damps
the mean; here the mean mode is left untouched, as the continuous equation does.)

The solution is computed on ``n_solve^2`` (default 256, dt = 1e-4, as the paper) and recorded on
``resolution^2`` (default 64) by taking every ``r = n_solve/resolution``-th grid point (point values of the
fine solution, no filtering), every ``record_every`` time units up to ``t_final``.

Natural operators: ``w`` at ``t = 0..9`` -> ``w`` at ``t = 10..T`` (the paper's setting; its files store
``t = 1..T`` with ``a = w(0)`` separately), or ``w(t) -> w(t + record_every)``. Arithmetic is float64
(complex128); trajectories are returned as float32.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.fft

from solvers import register
from solvers.base import ParamSpace

if TYPE_CHECKING:
    import torch

_ALPHA = 2.5  # GRF smoothness exponent (paper: (-Delta + 49 I)^-2.5)
_TAU = 7.0  # GRF inverse length scale (paper: tau^2 = 49)
_SIGMA = _TAU ** (_ALPHA - 1.0)  # tau^(alpha - d/2), d = 2: the generator's default sigma, 7^{3/2}
_FORCING_AMPLITUDE = 0.1
_ADVECTION = ("heun", "euler")
# Relative tolerance for "t_final and record_every are whole multiples of dt" (float inputs like 0.3/1e-4).
_MULTIPLE_RTOL = 1e-6
# Advective CFL guard: with |u| <~ 1 (the forced flows of the benchmark stay well below), the largest resolved
# advection eigenvalue is |u| * 2 pi (n/3), so dt * n <= 0.5 keeps |u| dt 2 pi n / 3 <~ 1.
_CFL_DT_N = 0.5


def _check_int(field: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but n=True is always a configuration mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"ns2d.{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"ns2d.{field} must be a finite number > 0, got {value!r}")
    return float(value)


def _whole_ratio(num: float, den: float) -> int | None:
    """``num/den`` as an int if it is one within ``_MULTIPLE_RTOL``, else None."""
    ratio = num / den
    k = round(ratio)
    if k < 1 or abs(ratio - k) > _MULTIPLE_RTOL * max(1.0, ratio):
        return None
    return int(k)


@dataclass(frozen=True)
class NS2DConfig:
    """Discretisation of :class:`NS2D`.

    ``nu``: viscosity ``> 0`` (paper: 1e-3, 1e-4, 1e-5). ``n_solve``: solve grid per side, even, ``>= 8``
    (paper 256). ``resolution``: recorded grid per side, ``>= 2`` and dividing ``n_solve`` (paper 64).
    ``dt``: time step ``> 0`` with ``dt * n_solve <= 0.5`` (explicit-advection CFL guard; paper 1e-4).
    ``record_every``: recording interval, a whole multiple of ``dt`` (paper 1.0). ``t_final``: last recorded
    time, a whole multiple of ``record_every`` (paper 50 for nu = 1e-3). ``advection``: ``"heun"``
    (second order, default) or ``"euler"`` (the FNO generator's first-order update).
    """

    nu: float = 1e-3
    n_solve: int = 256
    resolution: int = 64
    dt: float = 1e-4
    record_every: float = 1.0
    t_final: float = 50.0
    advection: str = "heun"

    def __post_init__(self) -> None:
        # Normalise numpy scalars / ints-for-floats so that equality and hashing of configs behave.
        object.__setattr__(self, "nu", _check_positive_float("nu", self.nu))
        n = _check_int("n_solve", self.n_solve, 8)
        if n % 2:
            raise ValueError(f"ns2d.n_solve must be even (FFT grid with a Nyquist line), got {n}")
        object.__setattr__(self, "n_solve", n)
        res = _check_int("resolution", self.resolution, 2)
        if n % res:
            raise ValueError(f"ns2d.resolution must divide n_solve={n} (recorded by sub-sampling), got {res}")
        object.__setattr__(self, "resolution", res)
        dt = _check_positive_float("dt", self.dt)
        if dt * n > _CFL_DT_N:
            raise ValueError(
                f"ns2d.dt must satisfy dt * n_solve <= {_CFL_DT_N} (explicit advection CFL), "
                f"got dt={dt} with n_solve={n}"
            )
        object.__setattr__(self, "dt", dt)
        rec = _check_positive_float("record_every", self.record_every)
        if _whole_ratio(rec, dt) is None:
            raise ValueError(f"ns2d.record_every must be a whole multiple of dt={dt}, got {rec}")
        object.__setattr__(self, "record_every", rec)
        tf = _check_positive_float("t_final", self.t_final)
        if _whole_ratio(tf, rec) is None:
            raise ValueError(f"ns2d.t_final must be a whole multiple of record_every={rec}, got {tf}")
        object.__setattr__(self, "t_final", tf)
        if self.advection not in _ADVECTION:
            raise ValueError(f"ns2d.advection must be one of {_ADVECTION}, got {self.advection!r}")

    @property
    def steps_per_record(self) -> int:
        """Time steps between two recorded states."""
        k = _whole_ratio(self.record_every, self.dt)
        assert k is not None  # guaranteed by __post_init__
        return k

    @property
    def records(self) -> int:
        """Number of recorded intervals ``T``; the trajectory holds ``T + 1`` states."""
        k = _whole_ratio(self.t_final, self.record_every)
        assert k is not None
        return k

    @property
    def stride(self) -> int:
        """Sub-sampling factor ``n_solve // resolution``."""
        return self.n_solve // self.resolution


class _Spectral:
    """Backend-agnostic spectral operators and time step (numpy arrays or torch tensors).

    All multipliers live on the rfft2 half-plane ``[n, n//2 + 1]`` (axis -2: ``k_x``, axis -1: ``k_y >= 0``).
    Only ``*``, ``+``, ``-`` and the two transforms are used, so the same code runs on numpy and torch.
    """

    def __init__(
        self,
        arrays: dict[str, Any],
        rfft2: Callable[[Any], Any],
        irfft2: Callable[[Any], Any],
        dt: float,
        heun: bool,
    ) -> None:
        self.__dict__.update(arrays)
        self.rfft2, self.irfft2, self.dt, self.heun = rfft2, irfft2, dt, heun

    def advection_hat(self, w_hat: Any) -> Any:
        """De-aliased ``FFT(u w_x + v w_y)`` from ``w_hat [B, n, n//2+1]``."""
        psi_hat = w_hat * self.inv_lap
        u = self.irfft2(psi_hat * self.dy)  # u = psi_y
        v = self.irfft2(-(psi_hat * self.dx))  # v = -psi_x
        w_x = self.irfft2(w_hat * self.dx)
        w_y = self.irfft2(w_hat * self.dy)
        return self.rfft2(u * w_x + v * w_y) * self.dealias

    def step(self, w_hat: Any, forcing_hat: Any) -> Any:
        n0 = self.advection_hat(w_hat)
        explicit = self.cn_minus * w_hat + forcing_hat  # (1 - a) w + dt f
        pred = (explicit - self.dt * n0) * self.cn_plus_inv
        if not self.heun:
            return pred
        return (explicit - (0.5 * self.dt) * (n0 + self.advection_hat(pred))) * self.cn_plus_inv


@register
class NS2D:
    """Batched pseudo-spectral CN/Heun solver of 2D Navier–Stokes in vorticity form (see the module docstring).

    Field ``w`` (vorticity). Natural operators: ``w(t = 0..9) -> w(t = 10..T)`` or ``w(t) -> w(t + record_every)``.
    """

    name: ClassVar[str] = "ns2d"
    Config: ClassVar[type[NS2DConfig]] = NS2DConfig
    # Default grids (256 solve / 64 recorded) and dt; two recorded intervals of 2 steps each: 4 Heun steps.
    BENCH: ClassVar[dict] = {"record_every": 2e-4, "t_final": 4e-4}

    def __init__(self, config: NS2DConfig = NS2DConfig()) -> None:
        if not isinstance(config, NS2DConfig):
            raise TypeError(f"NS2D expects a NS2DConfig, got {type(config).__name__}")
        self._config = config
        self._params = ParamSpace((), (), ())
        n = config.n_solve
        x = np.arange(n, dtype=np.float64) / n
        xx, yy = np.meshgrid(x, x, indexing="ij")
        self._forcing = _FORCING_AMPLITUDE * (np.sin(2 * np.pi * (xx + yy)) + np.cos(2 * np.pi * (xx + yy)))
        self._arrays = self._multipliers()

    def _multipliers(self) -> dict[str, np.ndarray]:
        cfg = self._config
        n = cfg.n_solve
        kx = np.fft.fftfreq(n, 1.0 / n)[:, None]  # integers 0..n/2-1, -n/2..-1
        ky = np.fft.rfftfreq(n, 1.0 / n)[None, :]  # integers 0..n/2
        lap = 4.0 * np.pi**2 * (kx**2 + ky**2)  # symbol of -Delta, [n, n//2+1]
        inv_lap = np.zeros_like(lap)
        inv_lap[lap > 0] = 1.0 / lap[lap > 0]  # psi has zero mean
        # First derivatives; the Nyquist lines are zeroed so d/dx of a real field stays real (Hermitian).
        kx_d = np.where(np.abs(kx) == n // 2, 0.0, kx)
        ky_d = np.where(ky == n // 2, 0.0, ky)
        kmax = n // 2
        dealias = ((np.abs(kx) <= 2.0 / 3.0 * kmax) & (ky <= 2.0 / 3.0 * kmax)).astype(np.float64)
        a = 0.5 * cfg.dt * cfg.nu * lap
        return {
            "inv_lap": inv_lap,
            "dx": np.broadcast_to(2j * np.pi * kx_d, lap.shape).copy(),
            "dy": np.broadcast_to(2j * np.pi * ky_d, lap.shape).copy(),
            "dealias": dealias,
            "cn_minus": 1.0 - a,
            "cn_plus_inv": 1.0 / (1.0 + a),
        }

    # ------------------------------------------------------------------ description

    @property
    def config(self) -> NS2DConfig:
        return self._config

    @property
    def params(self) -> ParamSpace:
        """Empty: the only randomness is the initial vorticity, drawn from the seed."""
        return self._params

    @property
    def grid(self) -> tuple[int, int]:
        return (self._config.resolution, self._config.resolution)

    @property
    def fields(self) -> tuple[str, ...]:
        return ("w",)

    @property
    def times(self) -> np.ndarray:
        """Recorded times ``k * record_every``, ``k = 0..records`` (float64)."""
        return np.arange(self._config.records + 1, dtype=np.float64) * self._config.record_every

    @property
    def forcing(self) -> np.ndarray:
        """The forcing ``f`` on the ``n_solve^2`` grid (copy)."""
        return self._forcing.copy()

    # ------------------------------------------------------------------ random initial field

    def initial_vorticity(self, seeds: np.ndarray) -> np.ndarray:
        """Initial vorticity ``[B, n_solve, n_solve]`` float64 drawn from each seed (see the module docstring)."""
        seeds = np.asarray(seeds)
        if seeds.ndim != 1:
            raise ValueError(f"seeds must have shape [B], got {list(seeds.shape)}")
        n = self._config.n_solve
        k = np.fft.fftfreq(n, 1.0 / n)
        lam = 4.0 * np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2) + _TAU**2
        # n^2 undoes ifft2's 1/n^2, so w0 = Re sum_k sqrt_eig_k xi_k e^{2 pi i k x} (the generator's convention).
        sqrt_eig = n**2 * math.sqrt(2.0) * _SIGMA * lam ** (-_ALPHA / 2.0)
        sqrt_eig[0, 0] = 0.0  # zero mean
        out = np.empty((seeds.shape[0], n, n), dtype=np.float64)
        for b, seed in enumerate(seeds):  # per-seed draws so that a seed's field does not depend on its batch
            xi = np.random.default_rng(int(seed)).standard_normal((2, n, n))
            out[b] = np.fft.ifft2(sqrt_eig * (xi[0] + 1j * xi[1])).real
        return out

    # ------------------------------------------------------------------ numerics

    def _check_w0(self, w0: np.ndarray) -> np.ndarray:
        n = self._config.n_solve
        w = np.asarray(w0, dtype=np.float64)
        if w.ndim != 3 or w.shape[1:] != (n, n):
            raise ValueError(f"w0 must have shape [B, {n}, {n}] (the n_solve grid), got {list(w.shape)}")
        if not np.all(np.isfinite(w)):
            raise ValueError("w0 must be finite (no NaN or inf)")
        return w

    def _numpy_kernel(self) -> _Spectral:
        n = self._config.n_solve
        return _Spectral(
            self._arrays,
            lambda a: scipy.fft.rfft2(a, axes=(-2, -1)),
            lambda a: scipy.fft.irfft2(a, s=(n, n), axes=(-2, -1)),
            self._config.dt,
            self._config.advection == "heun",
        )

    def run(self, w0: np.ndarray, forcing: bool = True) -> Iterator[np.ndarray]:
        """Lower-level time stepper from an arbitrary initial vorticity.

        ``w0 [B, n_solve, n_solve]``: initial vorticity on the solve grid (its mean is carried unchanged; a
        periodic velocity needs it zero). ``forcing``: include ``f`` (``False``: unforced flow). Yields
        ``records + 1`` new float64 arrays ``[B, n_solve, n_solve]``, the states at ``t = k * record_every``.
        """
        w = self._check_w0(w0)
        return self._run(w, bool(forcing))

    def _run(self, w0: np.ndarray, forcing: bool) -> Iterator[np.ndarray]:
        # Separate from run() so that argument errors surface at call time, not at the first next().
        cfg = self._config
        n = cfg.n_solve
        yield w0.copy()
        if w0.shape[0] == 0:
            for _ in range(cfg.records):
                yield np.empty((0, n, n))
            return
        kern = self._numpy_kernel()
        f_hat = cfg.dt * kern.rfft2(self._forcing) if forcing else np.zeros((n, n // 2 + 1), dtype=np.complex128)
        w_hat = kern.rfft2(w0)
        for k in range(1, cfg.records + 1):
            for _ in range(cfg.steps_per_record):
                w_hat = kern.step(w_hat, f_hat)
            w = kern.irfft2(w_hat)
            if not np.all(np.isfinite(w)):
                raise FloatingPointError(f"ns2d: solution blew up before t = {k * cfg.record_every}; reduce dt")
            yield w

    # ------------------------------------------------------------------ Solver protocol

    def _initial(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        p = self._params.check(params)
        seeds = np.asarray(seeds)
        if seeds.shape != (p.shape[0],):
            raise ValueError(f"seeds must have shape [{p.shape[0]}] (one per parameter row), got {list(seeds.shape)}")
        return self.initial_vorticity(seeds)

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k, fields [B, 1, resolution, resolution] float32)`` for ``k = 0..records``.

        ``params [B, 0]`` (empty parameter space), ``seeds [B]``: one initial vorticity per seed.
        """
        w0 = self._initial(params, seeds)
        return self._stream(w0)

    def _stream(self, w0: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        r = self._config.stride
        for k, w in enumerate(self._run(w0, True)):
            yield k, np.ascontiguousarray(w[:, None, ::r, ::r], dtype=np.float32)

    def work_per_simulation(self) -> int:
        """Grid-point updates of one simulation: solve-grid points times time steps."""
        return int(self._config.n_solve**2 * self._config.records * self._config.steps_per_record)

    def solve(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``params [B, 0]``, ``seeds [B]`` -> trajectories ``[B, records+1, 1, res, res]`` float32, C-contiguous."""
        w0 = self._initial(params, seeds)
        res = self._config.resolution
        out = np.empty((w0.shape[0], self._config.records + 1, 1, res, res), dtype=np.float32)
        for k, fields in self._stream(w0):
            out[:, k] = fields
        return out

    def solve_torch(self, params: np.ndarray, seeds: np.ndarray, device: str | None = None) -> torch.Tensor:
        """Same trajectories as :meth:`solve` as a float32 tensor on ``device`` (complex128 arithmetic inside).

        The initial vorticity is drawn with numpy exactly as in :meth:`solve` and moved to the device.
        """
        import torch

        w0 = self._initial(params, seeds)
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = self._config
        n, r, res = cfg.n_solve, cfg.stride, cfg.resolution
        out = torch.empty((w0.shape[0], cfg.records + 1, 1, res, res), dtype=torch.float32, device=dev)
        w = torch.as_tensor(w0, dtype=torch.float64, device=dev)
        out[:, 0, 0] = w[:, ::r, ::r].float()
        if w0.shape[0] == 0:
            return out
        arrays = {key: torch.as_tensor(val, device=dev) for key, val in self._arrays.items()}
        kern = _Spectral(
            arrays,
            lambda a: torch.fft.rfft2(a),
            lambda a: torch.fft.irfft2(a, s=(n, n)),
            cfg.dt,
            cfg.advection == "heun",
        )
        f_hat = cfg.dt * kern.rfft2(torch.as_tensor(self._forcing, device=dev))
        w_hat = kern.rfft2(w)
        for k in range(1, cfg.records + 1):
            for _ in range(cfg.steps_per_record):
                w_hat = kern.step(w_hat, f_hat)
            w = kern.irfft2(w_hat)
            if not bool(torch.isfinite(w).all()):
                raise FloatingPointError(f"ns2d: solution blew up before t = {k * cfg.record_every}; reduce dt")
            out[:, k, 0] = w[:, ::r, ::r].float()
        return out
