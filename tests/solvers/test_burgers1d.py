"""Burgers1D checked against mathematics: the Cole-Hopf exact solution (Bessel series and heat-kernel quadrature),
spectral convergence in space and fourth order in time, conservation of the mean, the energy-dissipation law,
Galilean invariance, and the statistics of the Gaussian random field the initial data are drawn from."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ive

import solvers
from solvers.burgers1d import Burgers1D, Burgers1DConfig

TWO_PI = 2.0 * np.pi


def _last(it):
    *_, last = it
    return last


def _rel_err(u: np.ndarray, exact: np.ndarray) -> float:
    return float(np.abs(u - exact).max() / np.abs(exact).max())


def _cole_hopf_sine(x: np.ndarray, t: float, nu: float, amplitude: float = 1.0, terms: int = 400) -> np.ndarray:
    """Exact solution for ``u0 = A sin(2 pi x)`` by Cole-Hopf, ``u = -2 nu phi_x / phi``.

    ``phi_0 = exp(-(1/2nu) int_0^x u0) ∝ exp(a cos 2 pi x)``, ``a = A / (4 pi nu)``, whose Fourier series is
    ``I_0(a) + 2 sum_n I_n(a) cos(2 pi n x)``; the heat equation ``phi_t = nu phi_xx`` damps mode ``n`` by
    ``exp(-4 pi^2 n^2 nu t)``. Scaled Bessel functions (``ive``) share the factor ``e^a``, which cancels.
    """
    a = amplitude / (4.0 * np.pi * nu)
    n = np.arange(1, terms + 1, dtype=np.float64)[:, None]
    weight = ive(n, a) / ive(0, a) * np.exp(-((TWO_PI * n) ** 2) * nu * t)  # [terms, 1]
    phi = 1.0 + 2.0 * np.sum(weight * np.cos(TWO_PI * n * x), axis=0)
    minus_phi_x_over_2pi = 2.0 * np.sum(weight * n * np.sin(TWO_PI * n * x), axis=0)
    return 2.0 * nu * TWO_PI * minus_phi_x_over_2pi / phi


def _cole_hopf_quadrature(antiderivative, nu: float, t: float, n_quad: int = 8192) -> np.ndarray:
    """Exact solution on ``x_j = j / n_quad`` for a zero-mean ``u0 = U'`` with periodic antiderivative ``U``.

    ``phi_0 = exp(-U / (2 nu))``; its Fourier coefficients are computed by the trapezoidal rule on ``n_quad``
    points (spectrally accurate for a smooth periodic integrand), each damped by the heat kernel
    ``exp(-nu kappa^2 t)``, and ``u = -2 nu phi_x / phi`` is summed back from the series.
    """
    x = np.arange(n_quad) / n_quad
    exponent = -antiderivative(x) / (2.0 * nu)
    phi0 = np.exp(exponent - exponent.max())  # a constant factor of phi cancels in phi_x / phi
    coef = np.fft.rfft(phi0) / n_quad  # trapezoidal quadrature of int phi0 e^{-i kappa x} dx
    kappa = TWO_PI * np.arange(coef.size)
    coef_t = coef * np.exp(-nu * kappa**2 * t)
    phi = np.fft.irfft(coef_t * n_quad, n_quad)
    phi_x = np.fft.irfft(1j * kappa * coef_t * n_quad, n_quad)
    return -2.0 * nu * phi_x / phi


def _mixed_profile(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A smooth zero-mean periodic ``u0`` and its antiderivative ``U(x) = int_0^x u0``."""
    u0 = np.sin(TWO_PI * x) + 0.6 * np.cos(2 * TWO_PI * x) - 0.4 * np.sin(3 * TWO_PI * x + 0.3)
    big_u = (
        (1.0 - np.cos(TWO_PI * x)) / TWO_PI
        + 0.6 * np.sin(2 * TWO_PI * x) / (2 * TWO_PI)
        + 0.4 * (np.cos(3 * TWO_PI * x + 0.3) - np.cos(0.3)) / (3 * TWO_PI)
    )
    return u0, big_u


def _grf_variance(n_fine: int) -> float:
    """``Var u0(x) = sum_k 2 * (1/2) s_k^2`` for ``u0 = sum_k a_k cos + b_k sin``, ``a_k, b_k ~ N(0, s_k^2)``,
    ``s_k = sqrt(625) / (4 pi^2 k^2 + 25)``, modes ``1 <= k < n_fine / 2``."""
    k = np.arange(1, n_fine // 2, dtype=np.float64)
    return float(np.sum((25.0 / (4.0 * np.pi**2 * k**2 + 25.0)) ** 2))


def _no_params(batch: int) -> np.ndarray:
    return np.zeros((batch, 0))


# ---------------------------------------------------------------------------------------------- exact solutions


def test_default_config_matches_cole_hopf_for_a_sine() -> None:
    solver = Burgers1D()  # nu 0.1, 8192 fine points recorded on 1024, t in [0, 1], automatic step
    cfg = solver.config
    assert (cfg.nu, cfg.n_fine, cfg.resolution, cfg.t_final, cfg.snapshots) == (0.1, 8192, 1024, 1.0, 10)
    states = list(solver.run(np.sin(TWO_PI * solver.x_fine)[None]))
    assert len(states) == 11
    for t, state in zip(solver.times, states, strict=True):
        recorded = state[0, :: cfg.stride]  # what solve() records: every 8th point
        exact = _cole_hopf_sine(solver.x, t, cfg.nu)
        # ETDRK4 at the automatic step leaves ~1e-7 relative at t = 0.1 and ~3e-9 at t = 1 (u decays 50-fold).
        assert _rel_err(recorded, exact) <= 1e-6, t


def test_cole_hopf_heat_kernel_quadrature_for_a_mixed_profile() -> None:
    # max |u0| ~ 1.9, above typical GRF draws (std 0.42) that the automatic step is tuned to (which gives 1.3e-6
    # here at t = 0.1): a step of 0.005 brings it to ~2.6e-7.
    solver = Burgers1D(Burgers1DConfig(snapshots=4, t_final=0.4, dt=0.005))
    u0, _ = _mixed_profile(solver.x_fine)

    def antiderivative(x: np.ndarray) -> np.ndarray:
        return _mixed_profile(x)[1]

    # The reference is independent of the solver: at t = 0 it gives back u0 (-2 nu phi0'/phi0 = U') to round-off.
    assert _rel_err(_cole_hopf_quadrature(antiderivative, 0.1, 0.0), u0) <= 1e-10
    for t, state in zip(solver.times, solver.run(u0[None]), strict=True):
        exact = _cole_hopf_quadrature(antiderivative, solver.config.nu, t)
        assert _rel_err(state[0, :: solver.config.stride], exact[:: solver.config.stride]) <= 1e-6, t


def test_spatial_convergence_is_spectral() -> None:
    # nu = 0.02 keeps the solution under-resolved at 16 points; a tiny step makes the time error negligible.
    nu, t = 0.02, 0.1
    errs = []
    for n in (16, 32, 64, 128):
        solver = Burgers1D(Burgers1DConfig(nu=nu, t_final=t, snapshots=1, n_fine=n, resolution=n, dt=2e-4))
        last = _last(solver.run(np.sin(TWO_PI * solver.x_fine)[None]))[0]
        errs.append(_rel_err(last, _cole_hopf_sine(solver.x_fine, t, nu)))
    # Measured ~7.8e-3, 2.3e-4, 6.8e-8, 5e-13: the digits gained per doubling grow (1.5, 3.5, 5.1), which no
    # algebraic order p (a constant p log10(2) digits per doubling) can do.
    gains = -np.diff(np.log10(errs))
    assert errs[-1] <= 1e-11, errs
    assert np.all(gains >= 1.0) and np.all(np.diff(gains) >= 1.0), (errs, gains)


def test_temporal_convergence_is_fourth_order() -> None:
    # 64 points resolve nu = 0.1 to round-off, so only the ETDRK4 error remains.
    nu, t, amplitude = 0.1, 0.4, 2.0
    x = np.arange(64) / 64
    exact = _cole_hopf_sine(x, t, nu, amplitude)
    errs = []
    for substeps in (32, 64, 128, 256):
        solver = Burgers1D(Burgers1DConfig(nu=nu, t_final=t, snapshots=1, n_fine=64, resolution=64, dt=t / substeps))
        assert solver.config.substeps == substeps
        last = _last(solver.run(amplitude * np.sin(TWO_PI * x)[None]))[0]
        errs.append(_rel_err(last, exact))
    # Measured 6.6e-7 .. 2.6e-10, local orders ~3.5, 3.7, 3.85: the stiff pre-asymptotic order reduction of
    # ETDRK4 fading towards its classical order 4.
    orders = -np.diff(np.log2(errs))
    assert np.all((orders >= 3.3) & (orders <= 4.3)) and orders[-1] >= 3.7, (errs, orders)


def test_galilean_invariance() -> None:
    # u(x, t) solves Burgers  =>  u(x - c t, t) + c solves it with initial field u0 + c.
    c, n = 0.7, 256
    # The shift c is advected by the explicit part of ETDRK4, so a small step keeps its error near 1e-9.
    solver = Burgers1D(Burgers1DConfig(t_final=0.3, snapshots=3, n_fine=n, resolution=n, dt=1e-3))
    u0 = solver.sample_initial(np.array([3]))
    moving = list(solver.run(u0 + c))
    still = list(solver.run(u0))
    kappa = TWO_PI * np.arange(n // 2 + 1)
    for t, a, b in zip(solver.times, moving, still, strict=True):
        shifted = np.fft.irfft(np.fft.rfft(b) * np.exp(-1j * kappa * c * t), n)  # exact translation by c t
        np.testing.assert_allclose(a, shifted + c, rtol=0, atol=5e-9 * np.abs(b).max())


# ---------------------------------------------------------------------------------------------- invariants


def test_mean_is_conserved_and_energy_decreases() -> None:
    n = 512
    solver = Burgers1D(Burgers1DConfig(t_final=0.5, snapshots=20, n_fine=n, resolution=n))
    u0 = solver.sample_initial(np.array([0, 1, 2])) + np.array([[0.0], [0.3], [-0.2]])
    traj = np.stack(list(solver.run(u0)), axis=1)  # [B, T+1, n]
    means = np.broadcast_to(u0.mean(axis=-1)[:, None], traj.shape[:2])
    np.testing.assert_allclose(traj.mean(axis=-1), means, rtol=0, atol=1e-13)
    energy = 0.5 * np.mean(traj**2, axis=-1)  # [B, T+1], 1/2 int u^2
    assert np.all(np.diff(energy, axis=-1) < 0)


def test_energy_dissipates_at_the_viscous_rate() -> None:
    # E(T) - E(0) = nu int_0^T int u_x^2 dx dt, with int u_x^2 from Parseval and the time integral by Simpson's
    # rule on 200 intervals (its O(h^4) error is ~1e-6 here; 100 intervals give ~1.8e-5).
    n, nu = 256, 0.1
    solver = Burgers1D(Burgers1DConfig(nu=nu, t_final=0.5, snapshots=200, n_fine=n, resolution=n))
    u0 = _mixed_profile(solver.x_fine)[0][None] + np.array([[0.0], [0.3], [-0.2]])  # smooth, three means
    traj = np.stack(list(solver.run(u0)), axis=1)  # [B, T+1, n]
    energy = 0.5 * np.mean(traj**2, axis=-1)  # [B, T+1]
    coef = np.fft.rfft(traj, axis=-1) / n
    weight = np.full(n // 2 + 1, 2.0)
    weight[0] = 1.0  # the k = 0 mode appears once in Parseval, the others twice (+k and -k); Nyquist is ~0
    grad_sq = np.sum(weight * (TWO_PI * np.arange(n // 2 + 1)) ** 2 * np.abs(coef) ** 2, axis=-1)  # [B, T+1]
    h = solver.times[1]
    simpson = (
        h / 3.0 * (grad_sq[:, 0] + grad_sq[:, -1] + 4 * grad_sq[:, 1:-1:2].sum(-1) + 2 * grad_sq[:, 2:-1:2].sum(-1))
    )
    np.testing.assert_allclose(energy[:, 0] - energy[:, -1], nu * simpson, rtol=1e-5)


def test_solution_obeys_maximum_principle() -> None:
    solver = Burgers1D(Burgers1DConfig(n_fine=1024, resolution=256))
    out = solver.solve(_no_params(4), np.arange(4))
    peak = np.abs(out).max(axis=(2, 3))  # [B, T+1]
    assert np.all(peak[:, 1:] <= peak[:, :1] * (1 + 1e-6))


# ---------------------------------------------------------------------------------------------- random field


def test_grf_variance_matches_the_analytic_spectrum() -> None:
    n = 64
    solver = Burgers1D(Burgers1DConfig(n_fine=n, resolution=n))
    fields = solver.sample_initial(np.arange(10_000))  # [N, n]
    expected = _grf_variance(n)  # ~0.1762
    # The field's own mean square is ~85% one chi^2_2 mode (relative std ~0.87 per field): ~0.9% over 1e4 fields.
    assert np.var(fields) == pytest.approx(expected, rel=0.04)
    np.testing.assert_allclose(fields.mean(axis=-1), 0.0, atol=1e-15)  # the k = 0 mode is zero, as in FNO
    # Each cosine / sine coefficient has std 25 / (4 pi^2 k^2 + 25).
    coef = np.fft.rfft(fields, axis=-1) * (2.0 / n)  # a_k - i b_k
    for k in (1, 2, 3, 5):
        s_k = 25.0 / (4.0 * np.pi**2 * k**2 + 25.0)
        assert np.var(coef[:, k].real) == pytest.approx(s_k**2, rel=0.05)
        assert np.var(coef[:, k].imag) == pytest.approx(s_k**2, rel=0.05)
        assert abs(np.mean(coef[:, k].real * coef[:, k].imag)) <= 0.05 * s_k**2  # a_k, b_k independent
    # Pointwise variance is the same at every x (stationary field).
    np.testing.assert_allclose(fields.var(axis=0), expected, rtol=0.08)


def test_seed_fixes_the_low_modes_at_every_resolution() -> None:
    coarse = Burgers1D(Burgers1DConfig(n_fine=64, resolution=64)).sample_initial(np.array([11]))
    fine = Burgers1D(Burgers1DConfig(n_fine=512, resolution=64)).sample_initial(np.array([11]))
    np.testing.assert_allclose(np.fft.rfft(fine)[0, 1:32] / 512, np.fft.rfft(coarse)[0, 1:32] / 64, atol=1e-14)


# ---------------------------------------------------------------------------------------------- the Solver API

SMALL = {"n_fine": 256, "resolution": 64, "t_final": 0.3, "snapshots": 3}


def test_batch_equals_individual_solves_and_seed_reproduces() -> None:
    solver = Burgers1D(Burgers1DConfig(**SMALL))
    seeds = np.array([5, 9, 2])
    batch = solver.solve(_no_params(3), seeds)
    for b, seed in enumerate(seeds):
        single = solver.solve(_no_params(1), np.array([seed]))
        np.testing.assert_allclose(batch[b : b + 1], single, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(solver.solve(_no_params(3), seeds), batch)
    swapped = solver.solve(_no_params(2), np.array([2, 5]))
    np.testing.assert_allclose(swapped, batch[[2, 0]], rtol=1e-6, atol=1e-7)
    assert not np.allclose(batch[0], batch[1])


def test_layout_times_and_stream() -> None:
    solver = Burgers1D(Burgers1DConfig(**SMALL))
    seeds = np.array([7, 8])
    out = solver.solve(_no_params(2), seeds)
    assert out.shape == (2, 4, 1, 64)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert solver.grid == (64,) and solver.fields == ("u",) and solver.params.dim == 0
    assert solver.times.dtype == np.float64
    np.testing.assert_allclose(solver.times, [0.0, 0.1, 0.2, 0.3], rtol=0, atol=1e-15)
    np.testing.assert_allclose(solver.x, np.arange(64) / 64)
    assert isinstance(solver, solvers.Solver)
    cfg = solver.config
    assert cfg.stride == 4 and cfg.dx == 1 / 64 and cfg.dx_fine == 1 / 256
    assert cfg.step * cfg.substeps == pytest.approx(0.1) and cfg.step <= 0.5 / cfg.advective_rate(cfg.u_ref)
    # Index 0 is the sampled initial field, recorded on every 4th fine point.
    np.testing.assert_array_equal(out[:, 0, 0], solver.sample_initial(seeds)[:, ::4].astype(np.float32))

    items = list(solver.stream(_no_params(2), seeds))
    assert [k for k, _ in items] == [0, 1, 2, 3]
    for k, fields in items:
        assert fields.shape == (2, 1, 64) and fields.dtype == np.float32 and fields.flags.c_contiguous
        np.testing.assert_array_equal(fields, out[:, k])

    empty = solver.solve(_no_params(0), np.zeros(0, dtype=np.int64))
    assert empty.shape == (0, 4, 1, 64)


def _torch_devices() -> list:
    torch = pytest.importorskip("torch")
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", _torch_devices())
def test_torch_path_equals_numpy_path(device: str) -> None:
    import torch

    solver = Burgers1D(Burgers1DConfig(**SMALL))
    seeds = np.array([1, 4, 6])
    ref = solver.solve(_no_params(3), seeds)
    out = solver.solve_torch(_no_params(3), seeds, device=device)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == device
    assert tuple(out.shape) == ref.shape
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("nu", 0.0),
        ("nu", -0.1),
        ("nu", float("nan")),
        ("nu", True),
        ("t_final", 0.0),
        ("t_final", float("inf")),
        ("snapshots", 0),
        ("snapshots", True),
        ("snapshots", 2.0),
        ("n_fine", 4),
        ("n_fine", 1001),
        ("n_fine", "8192"),
        ("resolution", 1000),
        ("resolution", 1),
        ("resolution", 1024.0),
        ("dt", 0.0),
        ("dt", float("nan")),
        ("dt", 0.05),  # beyond the ETDRK4 stability bound ~0.0315 at nu = 0.1
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"burgers1d\.{field}"):
        Burgers1DConfig(**{field: value})


def test_resolution_error_lists_the_valid_values() -> None:
    with pytest.raises(ValueError, match=r"8192, 4096, 2048, 1024, 512, 256, 128, 64, 32 and smaller"):
        Burgers1DConfig(resolution=1000)


def test_config_normalises_numbers_and_steps() -> None:
    cfg = Burgers1DConfig(nu=np.float32(0.5), t_final=2, snapshots=np.int64(4), n_fine=np.int64(64), resolution=32)
    assert type(cfg.nu) is float and type(cfg.t_final) is float and type(cfg.snapshots) is int
    assert cfg.dt is None
    explicit = Burgers1DConfig(t_final=1.0, snapshots=10, dt=0.01)
    assert explicit.substeps == 10 and explicit.step == pytest.approx(0.01)  # 0.1 / 0.01 is not 11 steps
    assert Burgers1DConfig(dt=0.015).step == pytest.approx(0.1 / 7)  # largest step <= dt landing on the records
    with pytest.raises(AttributeError):
        cfg.nu = 1.0  # type: ignore[misc]


def test_bad_inputs_are_rejected() -> None:
    solver = Burgers1D(Burgers1DConfig(**SMALL))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(_no_params(3), np.arange(2))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(_no_params(2), np.array([-1, 2]))
    with pytest.raises(ValueError, match="params"):
        solver.solve(np.zeros((2, 1)), np.arange(2))
    with pytest.raises(ValueError, match="initial"):
        solver.run(np.zeros((1, 64)))
    with pytest.raises(ValueError, match="initial"):
        solver.run(np.full((1, 256), np.nan))
    with pytest.raises(ValueError, match=r"burgers1d\.dt"):
        solver.run(50.0 * np.sin(TWO_PI * solver.x_fine)[None])  # far beyond the stable advection rate


def test_registry() -> None:
    solver = solvers.get("burgers1d", **SMALL)
    assert isinstance(solver, Burgers1D) and solver.grid == (64,)
    assert "burgers1d" in solvers.available() and solvers.config_class("burgers1d") is Burgers1DConfig
    assert Burgers1DConfig(**Burgers1D.BENCH).resolution == Burgers1DConfig().resolution
    with pytest.raises(ValueError, match=r"burgers1d\.resolution"):
        solvers.get("burgers1d", n_fine=256, resolution=100)


def test_module_import_does_not_import_torch() -> None:
    # Checked on the source: importing the module runs solvers/__init__, which imports every other solver too.
    import ast
    import inspect

    import solvers.burgers1d as module

    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` only
            continue
        if isinstance(node, ast.Import):
            assert all(not alias.name.startswith("torch") for alias in node.names)
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("torch")
