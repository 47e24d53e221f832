"""Advection1D checked against mathematics: the exact shifted profile u0(x - beta t), the measured order of
the finite-volume scheme, its TVD bound and mirror symmetry, and PDEBench's initial-condition recipe."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from solvers.advection1d import Advection1D, Advection1DConfig, cell_centres, draw_initial_condition


def _last(it):
    *_, last = it
    return last


def _slope(h: list[float], err: list[float]) -> float:
    return float(np.polyfit(np.log(h), np.log(err), 1)[0])


def _smooth(x: np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * x) + 0.5 * np.cos(4 * np.pi * x + 1.0)


def _total_variation(u: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(u, axis=-1, append=u[..., :1])).sum(axis=-1)


# ---------------------------------------------------------------------------------------------- spectral: exact


def test_spectral_shift_is_exact_for_trigonometric_polynomials() -> None:
    n = 128
    solver = Advection1D(Advection1DConfig(resolution=n, t_final=1.7, snapshots=5))
    x = cell_centres(n)
    rng = np.random.default_rng(3)
    # Every wavenumber below Nyquist, random amplitudes and phases: the grid data ARE a trig polynomial.
    m = np.arange(1, n // 2)
    amp, phase = rng.normal(size=m.size), rng.uniform(0, 2 * np.pi, size=m.size)

    def f(y: np.ndarray) -> np.ndarray:
        return 0.3 + (amp[:, None] * np.sin(2 * np.pi * m[:, None] * y[None] + phase[:, None])).sum(axis=0)

    beta = np.array([0.1, 1.234567, -2.5, 4.0])
    states = list(solver.run(np.tile(f(x), (beta.size, 1)), beta))
    for k, t in enumerate(solver.times):
        exact = np.stack([f(x - b * t) for b in beta])
        assert np.abs(states[k] - exact).max() <= 1e-11 * np.abs(exact).max()


@pytest.mark.parametrize(("p_abs", "p_window"), [(0.0, 0.0), (0.0, 1.0)])
def test_solve_matches_the_shifted_analytic_initial_condition(p_abs: float, p_window: float) -> None:
    # Basic sine superposition (exactly band-limited) and the tanh-windowed one (resolved: width 0.01 = 10 dx; its
    # periodic wrap is continuous to ~1e-9): the float32 trajectory equals u0((x - beta t) mod 1) to rounding.
    solver = Advection1D(Advection1DConfig(p_abs=p_abs, p_window=p_window, snapshots=20))
    beta = np.array([[0.1], [0.7], [4.0]])
    seeds = np.array([11, 12, 13])
    out = solver.solve(beta, seeds)
    x = solver.x
    for b in range(3):
        ic = solver.initial_condition(seeds[b])
        assert (ic.band_limit is None) == (p_window > 0)
        scale = np.abs(ic(x)).max()
        for k, t in enumerate(solver.times):
            exact = ic(np.mod(x - beta[b, 0] * t, 1.0))
            assert np.abs(out[b, k, 0] - exact).max() <= 1e-6 * scale, (b, k)


def test_absolute_value_kinks_are_resolved_to_first_order() -> None:
    # PDEBench's |.| option puts kinks in u0, so it is no longer band-limited: the exact shift of the trigonometric
    # interpolant rings near a kink with amplitude ~ dx * (slope jump). Where a kink falls between grid points
    # varies with n, so the max error is not monotone; it stays below a few dx, and the mean error converges.
    def f(y: np.ndarray) -> np.ndarray:
        return np.abs(np.sin(2 * np.pi * y) + 0.4 * np.sin(6 * np.pi * y + 0.3))

    beta, t = 1.3, 0.3
    mean_errs, hs = [], []
    for n in (128, 256, 512, 1024, 2048):
        solver = Advection1D(Advection1DConfig(resolution=n, snapshots=1, t_final=t))
        x = cell_centres(n)
        err = np.abs(_last(solver.run(f(x)[None], np.array([beta])))[0] - f(x - beta * t))
        assert err.max() <= 5.0 / n, (n, err.max())  # measured 1.6/n .. 3.8/n
        mean_errs.append(err.mean())
        hs.append(1.0 / n)
    assert _slope(hs, mean_errs) >= 1.0, mean_errs  # measured 1.34


# ---------------------------------------------------------------------------------------------- finite volumes


@pytest.mark.parametrize(("limiter", "low", "high"), [("none", 1.9, 2.1), ("mc", 1.7, 2.1), ("vanleer", 1.7, 2.1)])
def test_fv_converges_at_second_order_in_l1(limiter: str, low: float, high: float) -> None:
    # Point values at cell centres as initial data (as PDEBench does): an O(dx^2) difference from cell averages.
    beta, t = 1.3, 0.5
    errs, hs = [], []
    for n in (64, 128, 256, 512):
        solver = Advection1D(Advection1DConfig(resolution=n, method="fv", limiter=limiter, t_final=t, snapshots=1))
        x = cell_centres(n)
        last = _last(solver.run(_smooth(x)[None], np.array([beta])))[0]
        errs.append(np.abs(last - _smooth(x - beta * t)).mean())
        hs.append(1.0 / n)
    order = _slope(hs, errs)
    assert low <= order <= high, (order, errs)
    assert errs[-1] <= 1e-3


def test_unlimited_fv_is_second_order_in_max_norm() -> None:
    beta, t = 2.0, 0.25
    errs, hs = [], []
    for n in (64, 128, 256, 512):
        solver = Advection1D(Advection1DConfig(resolution=n, method="fv", limiter="none", t_final=t, snapshots=1))
        x = cell_centres(n)
        last = _last(solver.run(_smooth(x)[None], np.array([beta])))[0]
        errs.append(np.abs(last - _smooth(x - beta * t)).max())
        hs.append(1.0 / n)
    assert 1.9 <= _slope(hs, errs) <= 2.1, errs


@pytest.mark.parametrize("limiter", ["mc", "minmod", "vanleer"])
def test_limited_fv_is_tvd_and_bounded_by_the_data(limiter: str) -> None:
    # Rough data (square pulse + noise): SSP-RK2 of a TVD semi-discretisation at cfl <= 0.5 never creates
    # variation or new extrema.
    n = 128
    rng = np.random.default_rng(1)
    x = cell_centres(n)
    u0 = np.stack([((x > 0.3) & (x < 0.6)).astype(float), rng.uniform(-1, 1, n)])
    solver = Advection1D(Advection1DConfig(resolution=n, method="fv", limiter=limiter, cfl=0.5, t_final=0.2))
    tv0 = _total_variation(u0)
    for state in solver.run(u0, np.array([1.0, 3.7])):
        assert np.all(_total_variation(state) <= tv0 + 1e-12)
        assert np.all(state.min(axis=1) >= u0.min(axis=1) - 1e-12)
        assert np.all(state.max(axis=1) <= u0.max(axis=1) + 1e-12)


def test_fv_is_mirror_symmetric_in_the_velocity() -> None:
    # Reflecting x -> 1 - x maps cell i to n-1-i and beta to -beta; the upwind scheme must commute with that.
    n = 64
    rng = np.random.default_rng(2)
    u0 = rng.uniform(0, 1, (1, n))
    solver = Advection1D(Advection1DConfig(resolution=n, method="fv", t_final=0.3, snapshots=3))
    forward = list(solver.run(u0, np.array([1.7])))
    backward = list(solver.run(u0[:, ::-1], np.array([-1.7])))
    for a, b in zip(forward, backward, strict=True):
        np.testing.assert_allclose(a, b[:, ::-1], rtol=0, atol=1e-13)


def test_fv_steps_follow_the_cfl_number() -> None:
    solver = Advection1D(Advection1DConfig(resolution=100, method="fv", cfl=0.25, t_final=1.0, snapshots=10))
    # n = ceil(|beta| dt_save / (cfl dx)): 0.1 * 0.1 / 0.0025 = 4 exactly, 4 * 0.1 / 0.0025 = 160, 0.35 -> 14.
    np.testing.assert_array_equal(solver._fv_substeps(np.array([0.1, 4.0, -0.35, 0.0])), [4, 160, 14, 0])
    u0 = np.random.default_rng(0).normal(size=(1, 100))
    for state in solver.run(u0, np.array([0.0])):  # beta = 0: nothing moves
        np.testing.assert_array_equal(state, u0)


# ---------------------------------------------------------------------------------------------- initial conditions


def test_initial_condition_follows_the_pdebench_recipe() -> None:
    k_max, n_waves = 4, 2
    ics = [draw_initial_condition(s, resolution=256, k_max=k_max, n_waves=n_waves) for s in range(3000)]
    for ic in ics[:200]:
        # Each of k_max modes carries j * (times drawn); the counts sum to n_waves.
        counts = [n // j for j, n in enumerate(ic.wavenumbers, start=1)]
        assert all(n % j == 0 for j, n in enumerate(ic.wavenumbers, start=1)) and sum(counts) == n_waves
        assert all(0 <= a < 1 for a in ic.amplitudes) and all(0 <= p < 2 * np.pi for p in ic.phases)
        assert ic.sign in (1.0, -1.0)
        if ic.window is not None:
            assert 0.1 <= ic.window[0] <= 0.45 and 0.55 <= ic.window[1] <= 0.9
    # Coin flips at PDEBench's probabilities (binomial standard deviation ~0.0055 for p = 0.1, n = 3000).
    assert abs(np.mean([ic.absolute for ic in ics]) - 0.1) < 0.025
    assert abs(np.mean([ic.window is not None for ic in ics]) - 0.1) < 0.025
    assert abs(np.mean([ic.sign > 0 for ic in ics]) - 0.5) < 0.04
    # Index drawn twice (prob 1/k_max): a doubled wavenumber 2j appears.
    doubled = np.mean([any(n == 2 * j for j, n in enumerate(ic.wavenumbers, start=1)) for ic in ics])
    assert abs(doubled - 1 / k_max) < 0.04


def test_initial_condition_is_the_first_state_and_the_formula() -> None:
    solver = Advection1D(Advection1DConfig(resolution=64, snapshots=2, t_final=0.1, p_abs=0.5, p_window=0.5))
    seeds = np.arange(20)
    out = solver.solve(np.full((20, 1), 1.0), seeds)
    x = solver.x
    for b, s in enumerate(seeds):
        ic = solver.initial_condition(s)
        waves = zip(ic.wavenumbers, ic.amplitudes, ic.phases, strict=True)
        u = sum(a * np.sin(2 * np.pi * n * x + p) for n, a, p in waves)
        if ic.absolute:
            u = np.abs(u)
        if ic.window is not None:
            u = u * 0.5 * (np.tanh((x - ic.window[0]) / 0.01) - np.tanh((x - ic.window[1]) / 0.01))
        np.testing.assert_allclose(out[b, 0, 0], (ic.sign * u).astype(np.float32), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the Solver API

SMALL = {"resolution": 64, "snapshots": 6, "t_final": 0.3}


@pytest.mark.parametrize("method", ["spectral", "fv"])
def test_batch_equals_individual_solves(method: str) -> None:
    solver = Advection1D(Advection1DConfig(method=method, **SMALL))
    params = np.array([[0.1], [4.0], [1.3], [0.55]])
    seeds = np.array([3, 1, 4, 1])
    batch = solver.solve(params, seeds)
    for b in range(4):
        np.testing.assert_allclose(batch[b : b + 1], solver.solve(params[b : b + 1], seeds[b : b + 1]), atol=1e-7)
    # Same seed -> same initial field, wherever it sits in the batch.
    np.testing.assert_array_equal(batch[1, 0], batch[3, 0])
    np.testing.assert_array_equal(solver.solve(params, seeds), batch)


def test_layout_times_and_stream() -> None:
    solver = Advection1D(Advection1DConfig(**SMALL))
    params, seeds = np.array([[0.5], [2.0]]), np.array([7, 8])
    out = solver.solve(params, seeds)
    assert out.shape == (2, 7, 1, 64) and out.dtype == np.float32 and out.flags.c_contiguous
    assert solver.grid == (64,) and solver.fields == ("u",) and solver.params.names == ("beta",)
    assert solver.params.low == (0.1,) and solver.params.high == (4.0,)
    np.testing.assert_allclose(solver.times, np.linspace(0.0, 0.3, 7), rtol=0, atol=1e-15)
    np.testing.assert_allclose(solver.x, (np.arange(64) + 0.5) / 64)
    assert solver.config.dx == 1 / 64 and solver.config.dt_save == pytest.approx(0.05)
    assert isinstance(solver, solvers.Solver)
    items = list(solver.stream(params, seeds))
    assert [k for k, _ in items] == list(range(7))
    for k, fields in items:
        assert fields.shape == (2, 1, 64) and fields.dtype == np.float32 and fields.flags.c_contiguous
        np.testing.assert_array_equal(fields, out[:, k])
    empty = solver.solve(np.zeros((0, 1)), np.zeros(0, dtype=np.int64))
    assert empty.shape == (0, 7, 1, 64)


def test_defaults_follow_pdebench() -> None:
    solver = Advection1D()
    assert solver.grid == (1024,) and solver.times.size == 201 and solver.times[-1] == pytest.approx(2.0)
    assert solver.config.method == "spectral" and solver.config.k_max == 4 and solver.config.n_waves == 2
    assert solver.config.p_abs == 0.1 and solver.config.p_window == 0.1


def _devices() -> list[str]:
    torch = pytest.importorskip("torch")
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("method", ["spectral", "fv"])
def test_torch_path_equals_numpy_path(method: str) -> None:
    solver = Advection1D(Advection1DConfig(method=method, **SMALL))
    params, seeds = np.array([[0.1], [3.3], [1.0]]), np.array([0, 1, 2])
    ref = solver.solve(params, seeds)
    for device in _devices():
        out = solver.solve_torch(params, seeds, device=device)
        assert out.dtype.is_floating_point and out.dtype.itemsize == 4 and out.device.type == device
        assert tuple(out.shape) == ref.shape
        np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("torch") or not __import__("torch").cuda.is_available(),
    reason="no CUDA device",
)
def test_torch_cuda_default_device() -> None:
    solver = Advection1D(Advection1DConfig(**SMALL))
    assert solver.solve_torch(np.array([[1.0]]), np.array([0])).device.type == "cuda"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 8),
        ("resolution", 65),
        ("resolution", True),
        ("resolution", 64.0),
        ("t_final", 0.0),
        ("t_final", float("nan")),
        ("t_final", float("inf")),
        ("snapshots", 0),
        ("snapshots", False),
        ("method", "euler"),
        ("limiter", "superbee"),
        ("cfl", 0.0),
        ("cfl", 0.6),
        ("cfl", float("nan")),
        ("k_max", 0),
        ("k_max", 300),
        ("n_waves", 0),
        ("p_abs", -0.1),
        ("p_abs", 1.5),
        ("p_window", float("nan")),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"advection1d\.{field}"):
        Advection1DConfig(**{field: value})


def test_resolution_must_resolve_the_drawn_wavenumbers() -> None:
    with pytest.raises(ValueError, match=r"advection1d\.k_max"):
        Advection1DConfig(resolution=16)  # 2 waves * k_max 4 = wavenumber 8 = Nyquist of 16 cells
    assert Advection1DConfig(resolution=16, k_max=3).resolution == 16


def test_bad_inputs_are_rejected() -> None:
    solver = Advection1D(Advection1DConfig(**SMALL))
    with pytest.raises(ValueError, match="beta"):
        solver.solve(np.array([[5.0]]), np.array([0]))
    with pytest.raises(ValueError, match="beta"):
        solver.stream(np.array([[np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="params"):
        solver.solve(np.array([1.0]), np.array([0]))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(np.array([[1.0]]), np.array([0, 1]))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(np.array([[1.0]]), np.array([-1]))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(np.array([[1.0]]), np.array([0.5]))
    with pytest.raises(ValueError, match="initial"):
        solver.run(np.zeros((1, 63)), np.array([1.0]))
    with pytest.raises(ValueError, match="beta"):
        solver.run(np.zeros((2, 64)), np.array([1.0]))


def test_registry() -> None:
    solver = solvers.get("advection1d", resolution=32, snapshots=3, method="fv")
    assert isinstance(solver, Advection1D) and solver.grid == (32,)
    assert "advection1d" in solvers.available() and solvers.config_class("advection1d") is Advection1DConfig
    assert isinstance(Advection1D.BENCH, dict)
    Advection1DConfig(**Advection1D.BENCH)
    with pytest.raises(ValueError, match=r"advection1d\.resolution"):
        solvers.get("advection1d", resolution=10)
