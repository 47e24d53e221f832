"""ReactionDiffusion1D checked against mathematics: exact heat-mode decay (rho = 0), the exact logistic curve
(nu = 0 or constant data), the Ablowitz-Zeppetella Fisher-KPP travelling wave with its rescaling in (nu, rho),
the second-order convergence of Strang splitting, and the [0, 1] bound."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from solvers.advection1d import cell_centres
from solvers.reaction_diffusion1d import ReactionDiffusion1D, ReactionDiffusion1DConfig


def _slope(h: list[float], err: list[float]) -> float:
    return float(np.polyfit(np.log(h), np.log(err), 1)[0])


def _logistic(u0: np.ndarray, rho: float, t: float) -> np.ndarray:
    e = np.exp(rho * t)
    return u0 * e / (1.0 - u0 + u0 * e)


def _wave(x: np.ndarray, t: float, nu: float, rho: float, x0: float) -> np.ndarray:
    """Ablowitz-Zeppetella: u = (1 + exp(z / sqrt 6))^-2, z = x - 5 t / sqrt 6, solves u_t = u_xx + u(1 - u);
    x -> x sqrt(rho/nu), t -> rho t turns it into a solution of u_t = nu u_xx + rho u(1 - u), speed 5 sqrt(nu rho/6)."""
    z = np.sqrt(rho / (6.0 * nu)) * (x - x0 - 5.0 * np.sqrt(nu * rho / 6.0) * t)
    return 1.0 / (1.0 + np.exp(z)) ** 2


def _plateau(x: np.ndarray, t: float, nu: float, rho: float, length: float) -> tuple[np.ndarray, np.ndarray]:
    """On a periodic domain a single front cannot exist: put u ~ 1 on [L/4, 3L/4] with two outgoing fronts
    (mirror images). Returns the exact right-front profile and the mask of x in (L/2 + L/20, L - L/20), where the
    other front and the periodic wrap are exponentially far (>= 45 front widths, error < 1e-15)."""
    c = length / 2
    window = (x > c + length / 20) & (x < length - length / 20)
    return _wave(np.abs(x - c), t, nu, rho, length / 4), window


# ---------------------------------------------------------------------------------------------- exact special cases


@pytest.mark.parametrize("length", [1.0, 3.0])
def test_pure_diffusion_decays_each_fourier_mode_exactly(length: float) -> None:
    n, t_final = 64, 0.02 * length**2
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(resolution=n, t_final=t_final, snapshots=4, substeps=3))
    x = cell_centres(n, length)
    nu = np.array([0.5, 5.0, 1.7])
    modes = (1, 3, 31)  # 31 = the highest non-Nyquist mode of 64 cells
    u0 = np.stack([np.cos(2 * np.pi * m * x / length + 0.3) for m in modes])
    states = list(solver.run(u0, nu, np.zeros(3), length=length))
    for k, t in enumerate(solver.times):
        for b, m in enumerate(modes):
            exact = np.exp(-nu[b] * (2 * np.pi * m / length) ** 2 * t) * u0[b]
            assert np.abs(states[k][b] - exact).max() <= 1e-13, (k, m)


def test_pointwise_logistic_without_diffusion_is_exact() -> None:
    # nu = 0: every grid value follows the logistic ODE; Strang composes exact logistic flows -> exact, up to the
    # round-off of the (identity) FFT round trip of the diffusion step.
    n = 32
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(resolution=n, t_final=1.0, snapshots=5, substeps=2))
    u0 = np.random.default_rng(0).uniform(0, 1, (2, n))
    u0[0, :3] = (0.0, 1.0, 1e-9)  # both fixed points and a tiny seed
    rho = np.array([1.0, 10.0])
    states = list(solver.run(u0, np.zeros(2), rho))
    for k, t in enumerate(solver.times):
        for b in range(2):
            np.testing.assert_allclose(states[k][b], _logistic(u0[b], rho[b], t), rtol=1e-13, atol=1e-14)


def test_spatially_constant_data_follow_the_logistic_curve() -> None:
    # Diffusion leaves a constant untouched, so even with nu > 0 the solution is the logistic curve.
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(resolution=64, snapshots=10, substeps=3))
    u0 = np.array([0.01, 0.5, 0.999])[:, None] * np.ones((3, 64))
    nu, rho = np.array([0.5, 5.0, 2.0]), np.array([10.0, 1.0, 3.0])
    for k, state in enumerate(solver.run(u0, nu, rho)):
        exact = _logistic(u0[:, :1], rho[:, None], solver.times[k])
        np.testing.assert_allclose(state, np.broadcast_to(exact, state.shape), rtol=1e-13)


# ---------------------------------------------------------------------------------------------- travelling wave


def test_fisher_kpp_travelling_wave_and_second_order_in_time() -> None:
    nu, rho, length, t_final, n = 1.0, 1.0, 200.0, 2.0, 512
    x = cell_centres(n, length)
    u0, _ = _plateau(x, 0.0, nu, rho, length)
    exact, window = _plateau(x, t_final, nu, rho, length)
    errs, hs = [], []
    for substeps in (5, 10, 20, 40):
        cfg = ReactionDiffusion1DConfig(resolution=n, t_final=t_final, snapshots=1, substeps=substeps)
        last = list(ReactionDiffusion1D(cfg).run(u0[None], np.array([nu]), np.array([rho]), length=length))[-1][0]
        errs.append(np.abs(last[window] - exact[window]).max())
        hs.append(t_final / substeps)
    # Spatial error is spectrally small (front width sqrt 6 ~ 6 dx); what remains is the splitting error.
    assert errs[-1] <= 2e-6, errs  # measured 9.7e-7 at h = 0.05
    assert 1.9 <= _slope(hs, errs) <= 2.1, errs  # measured 2.003


@pytest.mark.parametrize(("nu", "rho"), [(0.5, 10.0), (5.0, 1.0), (2.0, 5.0)])
def test_travelling_wave_speed_scales_with_sqrt_nu_rho(nu: float, rho: float) -> None:
    # Same wave in units of front width and 1/rho: the domain is 200 sqrt(nu/rho) long, the run 2/rho.
    n, length, t_final = 1024, 200.0 * np.sqrt(nu / rho), 2.0 / rho
    x = cell_centres(n, length)
    u0, _ = _plateau(x, 0.0, nu, rho, length)
    cfg = ReactionDiffusion1DConfig(resolution=n, t_final=t_final, snapshots=4, substeps=25)
    solver = ReactionDiffusion1D(cfg)
    for k, state in enumerate(solver.run(u0[None], np.array([nu]), np.array([rho]), length=length)):
        exact, window = _plateau(x, solver.times[k], nu, rho, length)
        assert np.abs(state[0, window] - exact[window]).max() <= 2e-7  # measured 4e-8 at the end


# ---------------------------------------------------------------------------------------------- the PDEBench problem


def test_solution_stays_in_unit_interval_and_approaches_one() -> None:
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(p_abs=0.5, p_window=0.5))
    params = np.array([[0.5, 1.0], [5.0, 10.0], [0.5, 10.0], [5.0, 1.0], [2.0, 5.0]])
    seeds = np.arange(5)
    out = solver.solve(params, seeds)
    # Both exact flows map [0, 1] into itself; only FFT round-off (~1e-16) can step outside.
    assert out.min() >= -1e-12 and out.max() <= 1.0 + 1e-12
    for b in range(5):
        assert out[b, 0].min() == 0.0 and out[b, 0].max() == 1.0  # PDEBench's min/max normalisation
    # Diffusion flattens within ~1/(nu 4 pi^2) and the mean then obeys the logistic ODE: at rho = 10, t = 1 it is ~1.
    assert out[1, -1].min() > 0.999 and out[2, -1].min() > 0.99
    # Spatial mean never decreases: d/dt mean(u) = rho mean(u(1-u)) >= 0 on [0, 1].
    means = out[:, :, 0].mean(axis=-1)
    assert np.all(np.diff(means, axis=1) >= -1e-6)


def test_initial_condition_is_the_normalised_recipe() -> None:
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(resolution=64, snapshots=1, substeps=1))
    out = solver.solve(np.array([[1.0, 1.0]] * 6), np.arange(6))
    for s in range(6):
        ic = solver.initial_condition(s)
        raw = ic.raw(solver.x)
        np.testing.assert_allclose(out[s, 0, 0], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-7)


# ---------------------------------------------------------------------------------------------- the Solver API

SMALL = {"resolution": 64, "snapshots": 5, "t_final": 0.2, "substeps": 4}


def test_batch_equals_individual_solves() -> None:
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(**SMALL))
    params = np.array([[0.5, 1.0], [5.0, 10.0], [1.2, 3.4], [0.5, 1.0]])
    seeds = np.array([9, 2, 6, 9])
    batch = solver.solve(params, seeds)
    for b in range(4):
        np.testing.assert_allclose(batch[b : b + 1], solver.solve(params[b : b + 1], seeds[b : b + 1]), atol=1e-7)
    np.testing.assert_array_equal(batch[0], batch[3])  # same seed and parameters, wherever in the batch
    np.testing.assert_array_equal(solver.solve(params, seeds), batch)


def test_layout_times_and_stream() -> None:
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(**SMALL))
    params, seeds = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1, 2])
    out = solver.solve(params, seeds)
    assert out.shape == (2, 6, 1, 64) and out.dtype == np.float32 and out.flags.c_contiguous
    assert solver.grid == (64,) and solver.fields == ("u",) and solver.params.names == ("nu", "rho")
    assert solver.params.low == (0.5, 1.0) and solver.params.high == (5.0, 10.0)
    np.testing.assert_allclose(solver.times, np.linspace(0.0, 0.2, 6), rtol=0, atol=1e-15)
    assert solver.config.dt == pytest.approx(0.01) and solver.config.dx == 1 / 64
    assert isinstance(solver, solvers.Solver)
    items = list(solver.stream(params, seeds))
    assert [k for k, _ in items] == list(range(6))
    for k, fields in items:
        assert fields.shape == (2, 1, 64) and fields.dtype == np.float32 and fields.flags.c_contiguous
        np.testing.assert_array_equal(fields, out[:, k])
    assert solver.solve(np.zeros((0, 2)), np.zeros(0, dtype=np.int64)).shape == (0, 6, 1, 64)


def test_defaults_follow_pdebench() -> None:
    solver = ReactionDiffusion1D()
    assert solver.grid == (1024,) and solver.times.size == 101 and solver.times[-1] == pytest.approx(1.0)
    assert solver.config.dt == pytest.approx(5e-4)


def _devices() -> list[str]:
    torch = pytest.importorskip("torch")
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def test_torch_path_equals_numpy_path() -> None:
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(**SMALL))
    params, seeds = np.array([[0.5, 10.0], [5.0, 1.0], [2.2, 4.4]]), np.array([0, 1, 2])
    ref = solver.solve(params, seeds)
    for device in _devices():
        out = solver.solve_torch(params, seeds, device=device)
        assert out.dtype.itemsize == 4 and out.dtype.is_floating_point and out.device.type == device
        assert tuple(out.shape) == ref.shape
        np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 14),
        ("resolution", 33),
        ("resolution", True),
        ("t_final", -1.0),
        ("t_final", float("inf")),
        ("snapshots", 0),
        ("snapshots", 1.0),
        ("substeps", 0),
        ("substeps", True),
        ("k_max", 0),
        ("k_max", 300),
        ("n_waves", -1),
        ("p_abs", 2.0),
        ("p_window", -0.5),
        ("nu_min", 0.0),
        ("nu_min", 5.0),
        ("nu_min", float("nan")),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"reaction_diffusion1d\.{field}"):
        ReactionDiffusion1DConfig(**{field: value})


def test_bad_inputs_are_rejected() -> None:
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(**SMALL))
    with pytest.raises(ValueError, match="nu"):
        solver.solve(np.array([[0.1, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="rho"):
        solver.stream(np.array([[1.0, np.inf]]), np.array([0]))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(np.array([[1.0, 1.0]]), np.array([1, 2]))
    with pytest.raises(ValueError, match="initial"):
        solver.run(np.zeros((1, 32)), np.ones(1), np.ones(1))
    with pytest.raises(ValueError, match="nu"):
        solver.run(np.zeros((1, 64)), -np.ones(1), np.ones(1))
    with pytest.raises(ValueError, match="rho"):
        solver.run(np.zeros((1, 64)), np.ones(1), np.ones(2))
    with pytest.raises(ValueError, match="length"):
        solver.run(np.zeros((1, 64)), np.ones(1), np.ones(1), length=0.0)


def test_nu_min_widens_the_box_to_thin_fronts() -> None:
    # Below PDEBench's nu = 0.5 only when asked: the box follows nu_min, and such a point is solved.
    assert ReactionDiffusion1D(ReactionDiffusion1DConfig(**SMALL)).params.low == (0.5, 1.0)
    solver = ReactionDiffusion1D(ReactionDiffusion1DConfig(**SMALL, nu_min=0.01))
    assert solver.params.low == (0.01, 1.0) and solver.params.high == (5.0, 10.0)
    traj = solver.solve(np.array([[0.01, 10.0]]), np.array([0]))
    assert np.isfinite(traj).all() and traj.min() >= 0.0 and traj.max() <= 1.0


def test_registry() -> None:
    solver = solvers.get("reaction_diffusion1d", resolution=32, snapshots=2)
    assert isinstance(solver, ReactionDiffusion1D) and solver.grid == (32,)
    assert solvers.config_class("reaction_diffusion1d") is ReactionDiffusion1DConfig
    ReactionDiffusion1DConfig(**ReactionDiffusion1D.BENCH)
    with pytest.raises(ValueError, match=r"reaction_diffusion1d\.resolution"):
        solvers.get("reaction_diffusion1d", resolution=7)
