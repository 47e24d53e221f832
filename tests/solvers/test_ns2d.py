"""NS2D checked against mathematics: exact decaying and forced single-shell solutions, the kinetic-energy
balance, the enstrophy a-priori bound, the Gaussian random field's spectrum, and the time-convergence orders."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import solvers
from solvers.ns2d import NS2D, NS2DConfig


def _mesh(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n) / n
    return np.meshgrid(x, x, indexing="ij")  # [i, j] <-> (x, y), the solver's layout


def _solver(**kw: object) -> NS2D:
    base: dict[str, object] = {"n_solve": 32, "resolution": 32, "dt": 1e-3, "record_every": 0.1, "t_final": 0.5}
    base.update(kw)
    return NS2D(NS2DConfig(**base))


def _no_params(b: int) -> np.ndarray:
    return np.zeros((b, 0))


def _inverse_minus_laplacian_hat(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``1/(4 pi^2 |k|^2)`` (0 at k = 0) and ``4 pi^2 |k|^2`` on the full ``fft2`` grid."""
    k = np.fft.fftfreq(n, 1.0 / n)
    lap = 4.0 * np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2)
    return np.where(lap > 0, 1.0 / np.where(lap > 0, lap, 1.0), 0.0), lap


# ---------------------------------------------------------------------------------------------- exact solutions


@pytest.mark.parametrize("advection", ["heun", "euler"])
def test_taylor_green_modes_decay_at_the_exact_rate(advection: str) -> None:
    # Any vorticity on one shell |k| = const has psi proportional to w, so u.grad(w) = 0 and w(t) = w0 exp(-nu kappa t)
    # with kappa = 4 pi^2 |k|^2 (unit torus). CN's relative error t dt^2 (nu kappa)^3 / 12 stays below 1.5e-7 here.
    nu, n = 5e-3, 32
    solver = _solver(nu=nu, n_solve=n, resolution=n, dt=1e-3, record_every=0.1, t_final=1.0, advection=advection)
    x, y = _mesh(n)
    cases = [
        (np.sin(2 * np.pi * x) * np.sin(2 * np.pi * y), 8 * np.pi**2),  # the classic Taylor-Green vortex
        (2 * (4 * np.pi) * np.cos(4 * np.pi * x) * np.cos(4 * np.pi * y), 32 * np.pi**2),  # m = 2
        (np.cos(2 * np.pi * (x + y)) + 0.5 * np.sin(2 * np.pi * (x - y)), 8 * np.pi**2),  # two modes on one shell
    ]
    w0 = np.stack([c for c, _ in cases])
    kappa = np.array([k for _, k in cases])[:, None, None]
    for k, w in enumerate(solver.run(w0, forcing=False)):
        exact = w0 * np.exp(-nu * kappa * solver.times[k])
        err = np.abs(w - exact).max(axis=(-2, -1)) / np.abs(exact).max(axis=(-2, -1))
        assert err.max() <= 1e-6, (k, err)


def test_forced_shell_solution_from_rest() -> None:
    # f lives on the shell |k|^2 = 2 (kappa = 8 pi^2), so from w0 = 0 the solution stays on it, advection vanishes
    # and w(t) = f (1 - exp(-nu kappa t)) / (nu kappa) exactly.
    nu, n = 1e-2, 32
    solver = _solver(nu=nu, n_solve=n, resolution=n, dt=1e-3, record_every=0.2, t_final=2.0)
    x, y = _mesh(n)
    f = 0.1 * (np.sin(2 * np.pi * (x + y)) + np.cos(2 * np.pi * (x + y)))
    np.testing.assert_allclose(solver.forcing, f, rtol=0, atol=1e-15)
    kappa = 8 * np.pi**2
    for k, w in enumerate(solver.run(np.zeros((1, n, n)), forcing=True)):
        if k == 0:
            continue
        exact = f * (1.0 - np.exp(-nu * kappa * solver.times[k])) / (nu * kappa)
        assert np.abs(w[0] - exact).max() <= 1e-6 * np.abs(exact).max(), k


# ---------------------------------------------------------------------------------------------- invariants


def _energy_terms(w: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E = 1/2 int psi w, Z = int w^2, P = int psi f on the unit torus, from grid values (Parseval)."""
    n = w.shape[-1]
    w_hat = np.fft.fft2(w) / n**2
    inv_lap, _ = _inverse_minus_laplacian_hat(n)
    psi_hat = w_hat * inv_lap
    f_hat = np.fft.fft2(f) / n**2
    energy = 0.5 * np.sum((np.conj(psi_hat) * w_hat).real, axis=(-2, -1))
    enstrophy = np.sum(np.abs(w_hat) ** 2, axis=(-2, -1))
    power = np.sum((np.conj(psi_hat) * f_hat).real, axis=(-2, -1))
    return energy, enstrophy, power


def _energy_residual(w0: np.ndarray, nu: float, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative residual of E(T) - E(0) = int_0^T (-nu int w^2 + int psi f) dt (trapezoid over every step),
    the change E(T) - E(0) and the trajectory."""
    solver = _solver(nu=nu, n_solve=w0.shape[-1], resolution=w0.shape[-1], dt=dt, record_every=dt, t_final=1.0)
    traj = np.stack(list(solver.run(w0)), axis=1)  # [B, T+1, n, n]
    energy, enstrophy, power = _energy_terms(traj, solver.forcing)
    rhs = -nu * enstrophy + power
    integral = np.sum(0.5 * (rhs[:, 1:] + rhs[:, :-1]) * dt, axis=1)
    change = energy[:, -1] - energy[:, 0]
    assert np.all(np.abs(change) > 1e-2 * energy[:, 0])  # the balance is not trivially 0 = 0
    return np.abs(change - integral) / np.abs(change), change, traj


def test_kinetic_energy_balance_and_zero_mean() -> None:
    # dE/dt = -nu int w^2 + int psi f (advection conserves E since u.grad(psi) = 0).
    nu, n = 1e-3, 32
    w0 = 3.0 * _solver(n_solve=n, resolution=n).initial_vorticity(np.array([0, 1]))  # x3: a more nonlinear flow
    # Raw GRF data: w keeps modes above the 2/3 cut (as in the FNO generator, only the advection term is
    # de-aliased), so the discrete advection is not exactly energy-neutral: measured ~4e-6 of |dE|, independent of dt.
    resid, _, traj = _energy_residual(w0, nu, 2e-3)
    assert np.all(resid <= 1e-5), resid
    # Zero mean of vorticity: only round-off (the discrete advection has an exactly zero k = 0 mode).
    assert np.abs(traj.mean(axis=(-2, -1))).max() <= 1e-13
    # Band-limited to the de-aliased modes, the semi-discrete flow conserves E exactly; what is left is the O(dt^2)
    # time error of Heun + CN + trapezoid: measured 1.2e-6 -> 3.0e-7 (order 2.0) from dt = 4e-3 to 2e-3.
    k = np.abs(np.fft.fftfreq(n, 1.0 / n))
    keep = (k[:, None] <= n / 3) & (k[None, :] <= n / 3)
    w0 = np.fft.ifft2(np.fft.fft2(w0) * keep).real
    coarse, _, _ = _energy_residual(w0, nu, 4e-3)
    fine, _, _ = _energy_residual(w0, nu, 2e-3)
    assert np.all(fine <= 1e-6), fine
    orders = np.log2(coarse / fine)
    assert np.all((orders >= 1.8) & (orders <= 2.2)), orders


def test_forced_solution_stays_within_the_enstrophy_bound() -> None:
    # Advection conserves enstrophy in 2D, so d||w||/dt <= -4 pi^2 nu ||w|| + ||f||: hence
    # ||w(t)|| <= max(||w0||, ||f|| / (4 pi^2 nu)) with ||f||_{L2} = 0.1 on the unit torus.
    nu = 1e-3
    solver = _solver(nu=nu, n_solve=32, resolution=32, dt=2e-3, record_every=0.5, t_final=8.0)
    w0 = 5.0 * solver.initial_vorticity(np.array([3, 4]))
    bound = np.maximum(np.sqrt(np.mean(w0**2, axis=(-2, -1))), 0.1 / (4 * np.pi**2 * nu))
    norms = np.stack([np.sqrt(np.mean(w**2, axis=(-2, -1))) for w in solver.run(w0)])
    assert np.all(np.isfinite(norms))
    assert np.all(norms <= bound * (1 + 1e-6)), (norms.max(axis=0), bound)


def test_initial_field_matches_the_analytic_spectrum() -> None:
    # E|w_hat_k|^2 = 2 sigma^2 (4 pi^2 |k|^2 + tau^2)^-alpha, sigma = tau^{alpha-1}, alpha = 2.5, tau = 7, w_hat_0 = 0.
    n, samples = 32, 1000
    w = _solver(n_solve=n, resolution=n).initial_vorticity(np.arange(samples))
    w_hat = np.fft.fft2(w) / n**2
    _, lap = _inverse_minus_laplacian_hat(n)
    expected = 2.0 * 7.0**3 * (lap + 49.0) ** -2.5
    expected[0, 0] = 0.0
    np.testing.assert_allclose(w_hat[:, 0, 0], 0.0, atol=1e-15)
    ratio = np.mean(np.abs(w_hat) ** 2, axis=0) / np.where(expected > 0, expected, 1.0)
    k = np.fft.fftfreq(n, 1.0 / n)
    kinf = np.maximum(np.abs(k)[:, None], np.abs(k)[None, :])
    for lo, hi in [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16)]:
        band = (kinf >= lo) & (kinf <= hi)
        assert abs(ratio[band].mean() - 1.0) <= 0.05, (lo, hi, ratio[band].mean())
    # One-point variance: sum of the spectrum (the field is Gaussian with this covariance).
    assert np.var(w) == pytest.approx(expected.sum(), rel=0.05)


# ---------------------------------------------------------------------------------------------- convergence


def _order_from_refinements(advection: str, dts: list[float], t: float = 0.5) -> tuple[list[float], list[float]]:
    # Self-convergence of the full nonlinear flow (x10 GRF vorticity: |u| ~ 1, strongly advective): the differences
    # between successive halvings of dt shrink like dt^p.
    finals = []
    for dt in dts:
        solver = _solver(nu=1e-3, dt=dt, record_every=t, t_final=t, advection=advection)
        *_, last = solver.run(10.0 * solver.initial_vorticity(np.array([0, 1])))
        finals.append(last)
    diffs = [float(np.abs(a - b).max()) for a, b in itertools.pairwise(finals)]
    return diffs, [math.log2(diffs[i] / diffs[i + 1]) for i in range(len(diffs) - 1)]


def test_heun_crank_nicolson_is_second_order_in_time() -> None:
    diffs, orders = _order_from_refinements("heun", [1e-2, 5e-3, 2.5e-3, 1.25e-3])
    # Measured differences 9.7e-3, 2.4e-3, 6.1e-4: orders 2.00, 2.00.
    assert all(1.9 <= p <= 2.1 for p in orders), (orders, diffs)


def test_euler_crank_nicolson_is_first_order_in_time() -> None:
    # The FNO generator's scheme. Measured differences 3.2e-2, 1.5e-2, 7.0e-3: orders 1.13, 1.06 (-> 1).
    diffs, orders = _order_from_refinements("euler", [2.5e-3, 1.25e-3, 6.25e-4, 3.125e-4])
    assert all(0.9 <= p <= 1.2 for p in orders), (orders, diffs)


# ---------------------------------------------------------------------------------------------- the Solver API


def _small() -> NS2D:
    return _solver(n_solve=32, resolution=16, dt=1e-3, record_every=0.01, t_final=0.03)


def test_solve_layout_times_stream_and_downsampling() -> None:
    solver = _small()
    seeds = np.array([7, 8, 9])
    out = solver.solve(_no_params(3), seeds)
    assert out.shape == (3, 4, 1, 16, 16)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert solver.grid == (16, 16) and solver.fields == ("w",) and solver.params.dim == 0
    np.testing.assert_allclose(solver.times, [0.0, 0.01, 0.02, 0.03], rtol=0, atol=1e-15)
    cfg = solver.config
    assert (cfg.steps_per_record, cfg.records, cfg.stride) == (10, 3, 2)
    assert isinstance(solver, solvers.Solver)

    items = list(solver.stream(_no_params(3), seeds))
    assert [k for k, _ in items] == [0, 1, 2, 3]
    for k, fields in items:
        assert fields.shape == (3, 1, 16, 16) and fields.dtype == np.float32 and fields.flags.c_contiguous
        np.testing.assert_array_equal(fields, out[:, k])
    # Recorded = every second point of the solve grid; index 0 is the drawn initial vorticity.
    full = list(solver.run(solver.initial_vorticity(seeds)))
    for k in range(4):
        np.testing.assert_array_equal(out[:, k, 0], full[k][:, ::2, ::2].astype(np.float32))


def test_batch_equals_individual_solves_and_seeds_reproduce() -> None:
    solver = _small()
    seeds = np.array([3, 11, 5])
    batch = solver.solve(_no_params(3), seeds)
    for b in range(3):
        single = solver.solve(_no_params(1), seeds[b : b + 1])
        np.testing.assert_allclose(batch[b : b + 1], single, rtol=0, atol=1e-6 * np.abs(single).max())
    np.testing.assert_array_equal(solver.solve(_no_params(3), seeds), batch)
    assert not np.allclose(batch[0], batch[1])
    # The same seed in another batch position gives the same simulation.
    swapped = solver.solve(_no_params(2), np.array([5, 3]))
    np.testing.assert_allclose(swapped[1], batch[0], rtol=0, atol=1e-6 * np.abs(batch[0]).max())


def _torch_devices() -> list[object]:
    torch = pytest.importorskip("torch")
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"))
    return ["cpu", cuda]


@pytest.mark.parametrize("device", _torch_devices())
def test_torch_path_equals_numpy_path(device: str) -> None:
    torch = pytest.importorskip("torch")
    solver = _small()
    seeds = np.array([1, 2])
    ref = solver.solve(_no_params(2), seeds)
    out = solver.solve_torch(_no_params(2), seeds, device=device)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == device
    assert tuple(out.shape) == ref.shape
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("nu", {"nu": 0.0}),
        ("nu", {"nu": float("nan")}),
        ("nu", {"nu": True}),
        ("n_solve", {"n_solve": 33, "resolution": 33}),
        ("n_solve", {"n_solve": 4, "resolution": 4}),
        ("n_solve", {"n_solve": True}),
        ("n_solve", {"n_solve": 64.0}),
        ("resolution", {"n_solve": 32, "resolution": 24}),
        ("resolution", {"resolution": 1}),
        ("dt", {"dt": 0.0}),
        ("dt", {"dt": 1e-2}),  # dt * n_solve = 2.56: explicit advection would blow up
        ("dt", {"dt": float("inf")}),
        ("record_every", {"record_every": 1.5e-4}),
        ("record_every", {"record_every": -1.0}),
        ("t_final", {"t_final": 2.5}),
        ("t_final", {"t_final": float("nan")}),
        ("advection", {"advection": "rk4"}),
    ],
)
def test_bad_config_names_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=rf"ns2d\.{field}"):
        NS2DConfig(**kwargs)


def test_config_defaults_and_normalisation() -> None:
    cfg = NS2DConfig()
    assert (cfg.nu, cfg.n_solve, cfg.resolution, cfg.dt, cfg.record_every, cfg.t_final) == (
        1e-3,
        256,
        64,
        1e-4,
        1.0,
        50.0,
    )
    assert cfg.steps_per_record == 10_000 and cfg.records == 50 and cfg.stride == 4
    # Float inputs that are multiples only up to round-off are accepted (0.3 / 1e-4 = 2999.9999999999995).
    assert NS2DConfig(record_every=0.3, t_final=0.9).steps_per_record == 3000
    cfg = NS2DConfig(nu=np.float32(0.5), n_solve=np.int64(32), resolution=16, dt=1e-3, record_every=1, t_final=2)
    assert type(cfg.nu) is float and type(cfg.n_solve) is int and type(cfg.t_final) is float
    with pytest.raises(AttributeError):
        cfg.nu = 1.0  # type: ignore[misc]
    # The benchmark overrides keep the default grids and take a handful of steps.
    bench = NS2DConfig(**NS2D.BENCH)
    assert (bench.n_solve, bench.resolution) == (256, 64)
    assert bench.records * bench.steps_per_record <= 10


def test_bad_arguments_are_rejected() -> None:
    solver = _small()
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(_no_params(3), np.arange(2))
    with pytest.raises(ValueError, match="params"):
        solver.solve(np.zeros((3, 1)), np.arange(3))
    with pytest.raises(ValueError, match="w0"):
        solver.run(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="w0"):
        solver.run(np.full((1, 32, 32), np.nan))


def test_registry() -> None:
    solver = solvers.get("ns2d", n_solve=32, resolution=8, dt=1e-3, record_every=0.01, t_final=0.02)
    assert isinstance(solver, NS2D) and solver.grid == (8, 8)
    assert "ns2d" in solvers.available() and solvers.config_class("ns2d") is NS2DConfig
    with pytest.raises(ValueError, match=r"ns2d\.resolution"):
        solvers.get("ns2d", resolution=48)
    out = solver.solve(_no_params(2), np.array([0, 1]))
    assert out.shape == (2, 3, 1, 8, 8)
