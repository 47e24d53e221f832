r"""2D steady Darcy flow with a piecewise-constant random permeability (the FNO benchmark).

Problem
-------
.. math::

    -\nabla\cdot\bigl(a(x, y)\,\nabla u\bigr) = f \quad \text{on } (0,1)^2, \qquad u = 0 \text{ on the boundary},

with constant forcing ``f`` (default 1) and the two-valued coefficient of Li et al., "Fourier Neural
Operator for Parametric Partial Differential Equations" (ICLR 2021), section 5.2:
``a = a_pos`` (default 12) where ``mu >= 0`` and ``a = a_neg`` (default 3) where ``mu < 0``, with

.. math::

    \mu \sim \mathcal N\bigl(0, (-\Delta + 9 I)^{-2}\bigr), \quad \text{zero Neumann boundary conditions.}

Gaussian field (exact convention)
---------------------------------
Karhunen-Loeve expansion in the orthonormal Neumann eigenfunctions of ``-Delta`` on ``L^2((0,1)^2)``,
``phi_kl(x, y) = c_k c_l cos(k pi x) cos(l pi y)`` with ``c_0 = 1`` and ``c_k = sqrt(2)`` for ``k >= 1``,
whose covariance eigenvalues are ``(pi^2 (k^2 + l^2) + 9)^{-2}``:

.. math::

    \mu(x, y) = \sum_{\substack{0 \le k, l < K \\ (k, l) \ne (0, 0)}}
        \frac{\xi_{kl}\, c_k c_l \cos(k\pi x)\cos(l\pi y)}{\pi^2 (k^2 + l^2) + 9},
    \qquad \xi_{kl} \sim \mathcal N(0, 1) \text{ i.i.d.}

This is what the FNO data generator ``GRF.m`` (``alpha = 2``, ``tau = 3``) computes with MATLAB's
orthonormal ``idct2``, up to two details. ``GRF.m`` also multiplies by the positive constant
``tau^(alpha-1) = 3`` (no effect on signs, hence on ``a``). ``idct2`` evaluates the series at the cell
centres ``(i + 1/2)/N`` of its grid (the FNO solver script then interpolates the coefficient to its
nodes), whereas here the truncated series is evaluated *exactly at the grid nodes* ``i/(n-1)``.
The constant mode ``(0, 0)`` is dropped as in ``GRF.m`` (mean-zero field), which keeps the
symmetry ``mu -> -mu`` so ``a_pos`` and ``a_neg`` each cover half the square on average. ``K = modes``
(default 421, the FNO generation grid) and the ``(K, K)`` array ``xi`` is drawn as
``np.random.default_rng(seed).standard_normal((K, K))``, indexed ``xi[k, l]``. ``K`` does not depend on
the resolution, so for a given seed ``a`` at any resolution is the sub-sample of ``a`` at 421 (the same
truncated series at the shared nodes).

Discretisation
--------------
Grid of ``n x n`` nodes including the boundary, ``h = 1/(n-1)``, arrays indexed ``[..., i, j]`` with
``x = i h``, ``y = j h`` (like ``heat2d``). Cell-centred-flux 5-point finite differences on the
``(n-2)^2`` interior nodes with harmonic-mean face coefficients,

.. math::

    \frac{1}{h^2}\sum_{\text{4 neighbours } q} a_{pq}\,(u_p - u_q) = f_p, \qquad
    a_{pq} = \frac{2\, a_p a_q}{a_p + a_q},

``u_q = 0`` for boundary neighbours. The harmonic mean is the exact face conductance of two half-cells
in series, so the flux ``a u_x`` is consistent across a jump sitting midway between nodes; the scheme
is second order for smooth ``a`` and for grid-aligned jumps (verified in the tests); the curved
interfaces of the random ``a`` cut cells arbitrarily and the accuracy is lower (see "Solve resolution").
The matrix is symmetric positive
definite and an M-matrix, so ``f > 0`` gives ``u > 0`` inside (discrete maximum principle).

Linear solvers (``method``)
---------------------------
``"pcg"`` (default): conjugate gradients over the batch (in cache-sized sub-batches), preconditioned by the
unit-coefficient 5-point Laplacian ``L`` inverted with two type-I DSTs (a fast Poisson solver). Every
face coefficient lies in ``[min a, max a]``, so ``min(a) L <= A <= max(a) L`` and the preconditioned
condition number is at most ``max a / min a`` = 4 independently of ``h``: about 28 iterations to a
1e-12 relative residual at every resolution. ``"direct"``: the matrices of the whole batch are assembled
in one vectorised expression, then each is factorised with SuperLU (``scipy.sparse.linalg.splu``,
minimum-degree ordering). Both give the same discrete solution to ~1e-12; PCG was measured about 2x
faster at 85 and 4x faster at 421 (batch 8, one core). Neither gains from batching (measured ~1.0x
batched vs one by one): the work of one simulation is already a whole-grid array operation (PCG, memory
bound, so stacking simulations only adds cache pressure) or an irreducible per-matrix factorisation
(direct), and the Python overhead per simulation is small against it. A block-diagonal SuperLU solve of
the whole batch was measured no faster than the loop. There is no torch path (``solve_torch``): the
direct method has no batched torch equivalent and the PCG stays on the numpy path.

Solve resolution
----------------
The FNO data were solved on a 421 grid and sub-sampled every ``r``-th node (421 -> 211: r = 2,
141: r = 3, 85: r = 5; 43: r = 10 is allowed too, for quick experiments). ``solve_resolution = 421``
reproduces this: the recorded ``a`` and ``u`` are
then the 421-grid values at the coarse nodes, i.e. the same function values as the paper's data
(up to the generator differences above). ``solve_resolution = None`` (default) solves directly on the
recorded grid: about 25x cheaper at 85 (~8 ms against ~200 ms per simulation on one core). Measured
relative L2 distance from the 421 solution at the shared nodes (6 seeds): 0.5% at 85 (max 0.9%), 0.2%
at 141, 0.1% at 211; the FNO-2D test error at 85 is about 1%. It is the default because, besides the
cost, it makes ``u`` a deterministic function of the *recorded* ``a`` (the discrete solution for exactly
that coefficient), whereas the 421 solution also depends on sub-grid details of ``a`` that the recorded
input does not show (an irreducible ~0.5% "noise" for a surrogate trained on the coarse grid).

Fields ``("a", "u")``, a single recorded time ``t = 0`` (steady problem). Natural operator:
``a -> u``. No scalar parameters: ``params`` is the empty ``ParamSpace``, all randomness is ``mu``
drawn from the seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg

from solvers import register
from solvers.base import ParamSpace

# The FNO grids (421 sub-sampled by r = 1, 2, 3, 5) and r = 10, a quick grid for laptop experiments.
RESOLUTIONS: tuple[int, ...] = (43, 85, 141, 211, 421)
METHODS: tuple[str, ...] = ("pcg", "direct")
_PCG_CHUNK_POINTS = 2**16  # unknowns per PCG sub-batch (cache-sized, see solve_field)
_PCG_RTOL = 1e-12  # relative 2-norm residual; leaves the solution ~1e-13 relative from the direct solve
_TAU2 = 9.0  # tau^2 of the covariance (-Delta + tau^2 I)^-2, tau = 3 as in the FNO paper


def _check_int(field: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but modes=True is always a configuration mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"darcy2d.{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_resolution(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in RESOLUTIONS:
        allowed = ", ".join(str(r) for r in RESOLUTIONS)
        raise ValueError(f"darcy2d.{field} must be one of {allowed}, got {value!r}")
    return int(value)


def _check_float(field: str, value: object, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"darcy2d.{field} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Darcy2DConfig:
    """Discretisation and coefficient model of :class:`Darcy2D`.

    ``resolution``: recorded nodes per side including the boundary, one of 85, 141, 211, 421 (the FNO
    grids) or 43 (r = 10, for quick experiments). ``solve_resolution``: grid the system is solved on,
    ``None`` (= ``resolution``) or 421 (then
    sub-sampled every ``420/(resolution-1)``-th node, the FNO recipe); 141 and 211 cannot be sub-sampled
    to a coarser allowed grid, so any other value is rejected. ``a_pos`` / ``a_neg``: coefficient where
    ``mu >= 0`` / ``mu < 0``, finite ``> 0``. ``forcing``: constant right-hand side ``f``, finite.
    ``modes``: cosine modes per direction ``K >= 2`` of the Gaussian field (default 421 as in FNO).
    ``method``: linear solver, ``"pcg"`` (default, batched fast-Poisson-preconditioned conjugate gradients)
    or ``"direct"`` (SuperLU per simulation); both give the same discrete solution to ~1e-12 relative.
    """

    resolution: int = 85
    solve_resolution: int | None = None
    a_pos: float = 12.0
    a_neg: float = 3.0
    forcing: float = 1.0
    modes: int = 421
    method: str = "pcg"

    def __post_init__(self) -> None:
        # Normalise numpy scalars / ints-for-floats so that equality and hashing of configs behave.
        res = _check_resolution("resolution", self.resolution)
        object.__setattr__(self, "resolution", res)
        if self.solve_resolution is not None:
            solve_res = _check_resolution("solve_resolution", self.solve_resolution)
            if (solve_res - 1) % (res - 1) != 0:
                raise ValueError(
                    f"darcy2d.solve_resolution must be None, {res} or 421 (a grid whose spacing divides that of "
                    f"resolution={res}), got {solve_res}"
                )
            object.__setattr__(self, "solve_resolution", solve_res)
        object.__setattr__(self, "a_pos", _check_float("a_pos", self.a_pos, positive=True))
        object.__setattr__(self, "a_neg", _check_float("a_neg", self.a_neg, positive=True))
        object.__setattr__(self, "forcing", _check_float("forcing", self.forcing, positive=False))
        object.__setattr__(self, "modes", _check_int("modes", self.modes, 2))
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"darcy2d.method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def solve_n(self) -> int:
        """Nodes per side of the grid the system is solved on."""
        return self.resolution if self.solve_resolution is None else self.solve_resolution

    @property
    def stride(self) -> int:
        """Sub-sampling step from the solve grid to the recorded grid (1 when they coincide)."""
        return (self.solve_n - 1) // (self.resolution - 1)

    @property
    def h(self) -> float:
        """Recorded grid spacing ``1/(resolution-1)``."""
        return 1.0 / (self.resolution - 1)


def _cosine_basis(modes: int, n: int) -> np.ndarray:
    """``[K, n]`` orthonormal Neumann eigenfunctions ``c_k cos(k pi x_i)`` at the nodes ``x_i = i/(n-1)``."""
    k = np.arange(modes, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    # cos(k pi i/(n-1)) with the integer k*i reduced mod 2(n-1) first (exact): the argument stays in [0, 2 pi)
    # instead of reaching 421 pi, so every entry is accurate to ~1e-16 and the field at a node is the same
    # function value (up to rounding) at every resolution.
    arg = np.mod(k * i, 2.0 * (n - 1)) * (np.pi / (n - 1))
    basis = np.cos(arg)
    basis[1:] *= math.sqrt(2.0)
    return basis


def _face_conductances(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic means on the x-faces ``[B, n-1, n]`` (between i and i+1) and y-faces ``[B, n, n-1]``."""
    ax = 2.0 * a[:, 1:, :] * a[:, :-1, :] / (a[:, 1:, :] + a[:, :-1, :])
    ay = 2.0 * a[:, :, 1:] * a[:, :, :-1] / (a[:, :, 1:] + a[:, :, :-1])
    return ax, ay


def _interior_stencil(a: np.ndarray) -> tuple[np.ndarray, ...]:
    """Face coefficients over ``h^2`` seen by each interior node: west, east, south, north, each ``[B, m, m]``."""
    h2 = (1.0 / (a.shape[1] - 1)) ** 2
    ax, ay = _face_conductances(a)
    # Interior node (i, j), i, j = 1..n-2: west face is x-face i-1, east face x-face i; same for y.
    return ax[:, :-1, 1:-1] / h2, ax[:, 1:, 1:-1] / h2, ay[:, 1:-1, :-1] / h2, ay[:, 1:-1, 1:] / h2


def assemble(a: np.ndarray) -> list[scipy.sparse.csc_matrix]:
    """The ``B`` interior matrices ``[(n-2)^2, (n-2)^2]`` (CSC, unknowns in row-major ``(i, j)`` order).

    ``a [B, n, n]`` positive node coefficients. The entries of all ``B`` matrices come from one vectorised
    expression over the batch; they share one index structure, converted to CSC once.
    """
    bsz, m = a.shape[0], a.shape[1] - 2
    west, east, south, north = _interior_stencil(a)
    idx = np.arange(m * m).reshape(m, m)
    # COO pattern: the diagonal, then the four couplings between interior neighbours (boundary ones drop: u=0).
    rows = np.concatenate([idx.ravel(), idx[1:].ravel(), idx[:-1].ravel(), idx[:, 1:].ravel(), idx[:, :-1].ravel()])
    cols = np.concatenate([idx.ravel(), idx[:-1].ravel(), idx[1:].ravel(), idx[:, :-1].ravel(), idx[:, 1:].ravel()])
    vals = np.concatenate(
        [
            (west + east + south + north).reshape(bsz, -1),
            -west[:, 1:, :].reshape(bsz, -1),  # row (i, j), column (i-1, j)
            -east[:, :-1, :].reshape(bsz, -1),  # row (i, j), column (i+1, j)
            -south[:, :, 1:].reshape(bsz, -1),  # row (i, j), column (i, j-1)
            -north[:, :, :-1].reshape(bsz, -1),  # row (i, j), column (i, j+1)
        ],
        axis=1,
    )
    order = np.lexsort((rows, cols))  # column-major, rows sorted within a column: canonical CSC
    indptr = np.searchsorted(cols[order], np.arange(m * m + 1)).astype(np.int32)
    indices = rows[order].astype(np.int32)
    data = np.ascontiguousarray(vals[:, order])
    return [scipy.sparse.csc_matrix((data[b], indices, indptr), shape=(m * m, m * m)) for b in range(bsz)]


def _solve_direct(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Interior solution ``[B, m, m]`` by one SuperLU factorisation per simulation.

    A block-diagonal matrix of the whole batch was measured no faster (the fill-in and the work are per
    block anyway), so the loop over simulations stays; the minimum-degree ordering of ``A + A^T`` suits the
    symmetric 5-point structure (about half the fill-in of the default COLAMD).
    """
    bsz, m = rhs.shape[0], rhs.shape[1]
    flat = rhs.reshape(bsz, -1)
    out = np.empty((bsz, m * m), dtype=np.float64)
    for b, mat in enumerate(assemble(a)):
        out[b] = scipy.sparse.linalg.splu(mat, permc_spec="MMD_AT_PLUS_A").solve(flat[b])
    return out.reshape(bsz, m, m)


def _solve_pcg(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Interior solution ``[B, m, m]`` by conjugate gradients preconditioned with the unit-coefficient Laplacian.

    Every face coefficient lies in ``[min a, max a]``, so ``min(a) L <= A <= max(a) L`` with ``L`` the
    constant-coefficient 5-point matrix: the preconditioned condition number is at most ``max a / min a``
    (4 for 12/3) whatever ``h``, and CG converges in a fixed ~30 iterations. ``L^{-1}`` is two type-I DSTs.
    The whole batch advances together; a simulation stops updating once its own residual is below the
    tolerance, so its result does not depend on which batch it is in.
    """
    m = rhs.shape[1]
    west, east, south, north = _interior_stencil(a)
    diag = west + east + south + north
    h = 1.0 / (m + 1)
    lam1 = (4.0 / h**2) * np.sin(np.arange(1, m + 1) * np.pi * h / 2.0) ** 2
    inv_lam = 1.0 / (lam1[:, None] + lam1[None, :])

    def apply_a(v: np.ndarray) -> np.ndarray:
        out = diag * v
        out[:, 1:, :] -= west[:, 1:, :] * v[:, :-1, :]
        out[:, :-1, :] -= east[:, :-1, :] * v[:, 1:, :]
        out[:, :, 1:] -= south[:, :, 1:] * v[:, :, :-1]
        out[:, :, :-1] -= north[:, :, :-1] * v[:, :, 1:]
        return out

    def precondition(r: np.ndarray) -> np.ndarray:
        # Orthonormal DST-I is its own inverse and diagonalises L.
        r_hat = scipy.fft.dstn(r, type=1, axes=(-2, -1), norm="ortho")
        return scipy.fft.dstn(r_hat * inv_lam, type=1, axes=(-2, -1), norm="ortho")

    def dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.einsum("bij,bij->b", u, v)

    kappa = float(np.max(a) / np.min(a))
    # CG error bound 2((sqrt k - 1)/(sqrt k + 1))^it: ~14 sqrt(k) iterations per 1e-12; generous margin.
    max_iter = 100 + int(40 * math.sqrt(kappa))
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = precondition(r)
    p = z.copy()
    rz = dot(r, z)
    tol = _PCG_RTOL * np.sqrt(dot(rhs, rhs))
    active = np.sqrt(dot(r, r)) > tol
    for _ in range(max_iter):
        if not active.any():
            return x
        ap = apply_a(p)
        pap = dot(p, ap)
        # Converged simulations get alpha = beta = 0: x and r freeze and p stays bounded.
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=active)[:, None, None]
        x += alpha * p
        r -= alpha * ap
        active &= np.sqrt(dot(r, r)) > tol
        z = precondition(r)
        rz_new = dot(r, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=active)[:, None, None]
        p = z + beta * p
        rz = np.where(active, rz_new, rz)
    if active.any():
        raise RuntimeError(f"darcy2d: PCG did not converge in {max_iter} iterations; try method='direct'")
    return x


@register
class Darcy2D:
    """Batched harmonic-mean 5-point solver of steady Darcy flow (see the module docstring).

    Natural operator: coefficient ``a`` (channel 0) -> solution ``u`` (channel 1), one recorded time.
    No ``solve_torch``: the linear solves are scipy (sparse LU or DST-preconditioned CG) only.
    """

    name: ClassVar[str] = "darcy2d"
    Config: ClassVar[type[Darcy2DConfig]] = Darcy2DConfig
    # The default (85, solved on itself) is already short: ~0.07 s for a batch of 8 on one core.
    BENCH: ClassVar[dict] = {}

    def __init__(self, config: Darcy2DConfig = Darcy2DConfig()) -> None:
        if not isinstance(config, Darcy2DConfig):
            raise TypeError(f"Darcy2D expects a Darcy2DConfig, got {type(config).__name__}")
        self._config = config
        self._params = ParamSpace((), (), ())
        k = np.arange(config.modes, dtype=np.float64)
        # KL weights: square roots of the covariance eigenvalues; the constant mode is dropped (mean-zero field).
        weights = 1.0 / (np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2) + _TAU2)
        weights[0, 0] = 0.0
        self._weights = weights
        self._basis = _cosine_basis(config.modes, config.solve_n)

    # ------------------------------------------------------------------ description

    @property
    def config(self) -> Darcy2DConfig:
        return self._config

    @property
    def params(self) -> ParamSpace:
        """Empty: the only randomness is the Gaussian field drawn from the seed."""
        return self._params

    @property
    def grid(self) -> tuple[int, int]:
        return (self._config.resolution, self._config.resolution)

    @property
    def fields(self) -> tuple[str, ...]:
        return ("a", "u")

    @property
    def times(self) -> np.ndarray:
        """``[0.0]``: a steady problem has one recorded state."""
        return np.zeros(1, dtype=np.float64)

    # ------------------------------------------------------------------ random coefficient

    def _check_seeds(self, seeds: np.ndarray, batch: int | None = None) -> np.ndarray:
        s = np.asarray(seeds)
        if s.ndim != 1 or (batch is not None and s.shape[0] != batch):
            want = "[B]" if batch is None else f"[{batch}] (one per parameter row)"
            raise ValueError(f"seeds must have shape {want}, got {list(s.shape)}")
        return s

    def gaussian_field(self, seeds: np.ndarray) -> np.ndarray:
        """``mu`` at the solve-grid nodes, ``[B, solve_n, solve_n]`` float64, one field per seed.

        Each field uses only ``np.random.default_rng(seed)``, so it does not depend on the batch.
        """
        s = self._check_seeds(seeds)
        k = self._config.modes
        coef = np.empty((s.shape[0], k, k), dtype=np.float64)
        for b, seed in enumerate(s):  # one generator per simulation (reproducibility); drawing is cheap
            coef[b] = np.random.default_rng(int(seed)).standard_normal((k, k))
        coef *= self._weights
        # mu[i, j] = sum_kl basis[k, i] coef[k, l] basis[l, j], two batched matrix products.
        return self._basis.T @ coef @ self._basis

    def coefficient(self, seeds: np.ndarray) -> np.ndarray:
        """Coefficient ``a`` on the solve grid, ``[B, solve_n, solve_n]`` float64: ``a_pos`` where ``mu >= 0``."""
        mu = self.gaussian_field(seeds)
        return np.where(mu >= 0.0, self._config.a_pos, self._config.a_neg)

    # ------------------------------------------------------------------ numerics

    def solve_field(self, a: np.ndarray, f: np.ndarray | float) -> np.ndarray:
        """Lower-level solve of ``-div(a grad u) = f``, ``u = 0`` on the boundary, for given fields.

        ``a [B, n, n]``: node coefficient, finite and ``> 0`` (any ``n >= 3``, not tied to the config).
        ``f``: scalar or ``[B, n, n]`` (boundary values ignored). Returns ``u [B, n, n]`` float64 with a
        zero boundary ring, using this solver's ``method``.
        """
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[1] < 3:
            raise ValueError(f"a must have shape [B, n, n] with n >= 3, got {list(a.shape)}")
        if not np.all(np.isfinite(a)) or not np.all(a > 0):
            raise ValueError("a must be finite and > 0 everywhere")
        f_arr = np.asarray(f, dtype=np.float64)
        if f_arr.ndim == 0:
            f_arr = np.broadcast_to(f_arr, a.shape)
        elif f_arr.shape != a.shape:
            raise ValueError(f"f must be a scalar or have the shape of a {list(a.shape)}, got {list(f_arr.shape)}")
        if not np.all(np.isfinite(f_arr)):
            raise ValueError("f must be finite (no NaN or inf)")
        n = a.shape[1]
        u = np.zeros_like(a)
        rhs = np.ascontiguousarray(f_arr[:, 1:-1, 1:-1])
        if self._config.method == "direct":
            if a.shape[0]:
                u[:, 1:-1, 1:-1] = _solve_direct(a, rhs)
            return u
        # PCG is memory-bound: sub-batches of ~2^16 unknowns keep its dozen work arrays in cache (measured
        # 10-30% faster than the whole batch at once; 9 simulations per chunk at 85, one at 211 and 421).
        chunk = max(1, _PCG_CHUNK_POINTS // (n - 2) ** 2)
        for start in range(0, a.shape[0], chunk):
            sl = slice(start, start + chunk)
            u[sl, 1:-1, 1:-1] = _solve_pcg(a[sl], rhs[sl])
        return u

    # ------------------------------------------------------------------ Solver protocol

    def _check_inputs(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        p = self._params.check(params)
        return self._check_seeds(seeds, p.shape[0])

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield the single ``(0, fields [B, 2, n, n] float32)``: channel 0 is ``a``, channel 1 is ``u``.

        ``params`` must have shape ``[B, 0]``; ``seeds [B]`` select the Gaussian fields.
        """
        s = self._check_inputs(params, seeds)
        return self._stream(s)

    def _stream(self, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        # Separate from stream() so that argument errors surface at call time, not at the first next().
        a = self.coefficient(seeds)
        u = self.solve_field(a, self._config.forcing)
        r = self._config.stride
        out = np.empty((seeds.shape[0], 2, *self.grid), dtype=np.float32)
        out[:, 0] = a[:, ::r, ::r]
        out[:, 1] = u[:, ::r, ::r]
        yield 0, out

    def solve(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``params [B, 0]``, ``seeds [B]`` -> ``[B, 1, 2, n, n]`` float32, C-contiguous (channels ``a``, ``u``)."""
        s = self._check_inputs(params, seeds)
        out = np.empty((s.shape[0], 1, 2, *self.grid), dtype=np.float32)
        for k, fields in self._stream(s):
            out[:, k] = fields
        return out
