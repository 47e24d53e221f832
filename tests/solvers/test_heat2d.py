"""Heat2D checked against mathematics: exact decay of sine modes, the analytic Laplace solution,
convergence orders of the scheme, and the backward-Euler equations themselves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import solvers
from solvers.heat2d import Heat2D, Heat2DConfig

ZERO_SIDES = np.zeros((1, 4))


def _mesh(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(0.0, 1.0, n)
    return np.meshgrid(x, x, indexing="ij")  # [i, j] <-> (x, y), the solver's layout


def _sine_mode(n: int, p: int = 1, q: int = 1) -> np.ndarray:
    x, y = _mesh(n)
    return np.sin(p * np.pi * x) * np.sin(q * np.pi * y)


def _last(it):
    *_, last = it
    return last


def _slope(h: list[float], err: list[float]) -> float:
    return float(np.polyfit(np.log(h), np.log(err), 1)[0])


def _laplace_side(temp: float, a: np.ndarray, b: np.ndarray, terms: int = 401) -> np.ndarray:
    """Harmonic function on the unit square equal to ``temp`` on the side b=1 and 0 on the other three:
    sum over odd m of 4T/(m pi) sin(m pi a) sinh(m pi b)/sinh(m pi)."""
    m = np.arange(1, terms + 1, 2, dtype=np.float64)[:, None]
    # sinh(m pi b)/sinh(m pi) rewritten with decaying exponentials so large m cannot overflow.
    ratio = np.exp(m * np.pi * (b - 1.0)) * (1.0 - np.exp(-2.0 * m * np.pi * b)) / (1.0 - np.exp(-2.0 * m * np.pi))
    return (4.0 * temp / (m * np.pi) * np.sin(m * np.pi * a) * ratio).sum(axis=0)


def _laplace_exact(x: np.ndarray, y: np.ndarray, left: float, right: float, bottom: float, top: float) -> np.ndarray:
    """Analytic steady state: superpose one Fourier series per side (rotated/reflected copies)."""
    return (
        _laplace_side(top, x, y)
        + _laplace_side(bottom, x, 1.0 - y)
        + _laplace_side(right, y, x)
        + _laplace_side(left, y, 1.0 - x)
    )


def _away_from_boundary(n: int, margin: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of the nodes at distance >= margin from every side, and their x and y."""
    x, y = _mesh(n)
    eps = 1e-12
    inside = (x >= margin - eps) & (x <= 1 - margin + eps) & (y >= margin - eps) & (y <= 1 - margin + eps)
    return inside, x[inside], y[inside]


# ---------------------------------------------------------------------------------------------- time evolution


@pytest.mark.parametrize(("p", "q"), [(1, 1), (2, 1)])
def test_sine_mode_decays_at_the_continuous_rate(p: int, q: int) -> None:
    alpha, n, dt, steps = 0.7, 65, 1e-4, 300
    solver = Heat2D(Heat2DConfig(n=n, alpha=alpha, dt=dt, steps=steps))
    f = _sine_mode(n, p, q)
    states = list(solver.run(f[None], ZERO_SIDES))
    assert len(states) == steps + 1
    rate = (p**2 + q**2) * np.pi**2 * alpha
    for k in (0, 100, 300):
        exact = np.exp(-rate * k * dt) * f
        # Error is O(h^2) (eigenvalue of the 5-point stencil) + O(dt) (backward Euler), here ~1e-3 relative.
        assert np.abs(states[k][0] - exact).max() <= 1e-2 * np.abs(exact).max()


def test_steady_state_matches_analytic_laplace_solution() -> None:
    left, right, bottom, top = 100.0, 500.0, 200.0, 400.0
    params = np.array([[300.0, left, right, bottom, top]])
    n = 65
    inside, x, y = _away_from_boundary(n)
    exact = _laplace_exact(x, y, left, right, bottom, top)

    steady = Heat2D(Heat2DConfig(n=n)).steady_state(params)[0]
    # 5-point scheme is O(h^2) away from the corner discontinuities: ~5e-5 of the scale at h=1/64.
    assert np.abs(steady[inside] - exact).max() <= 2e-4 * 500.0

    # Long time: the slowest mode is damped by (1 + dt*2pi^2)^-40 ~ 1e-12, so the trajectory must be there.
    final = Heat2D(Heat2DConfig(n=n, alpha=1.0, dt=0.05, steps=40)).solve(params, np.zeros(1, dtype=np.int64))[0, -1, 0]
    assert np.abs(final[inside] - exact).max() <= 2e-4 * 500.0
    # float32 output is the only difference from the float64 discrete steady state.
    np.testing.assert_allclose(final, steady, rtol=0, atol=1e-3)


def test_steady_state_converges_at_second_order() -> None:
    sides = (100.0, 500.0, 200.0, 400.0)
    params = np.array([[300.0, *sides]])
    hs, errs = [], []
    for n in (33, 65, 129, 257):
        inside, x, y = _away_from_boundary(n)
        steady = Heat2D(Heat2DConfig(n=n)).steady_state(params)[0]
        errs.append(np.abs(steady[inside] - _laplace_exact(x, y, *sides)).max())
        hs.append(1.0 / (n - 1))
    order = _slope(hs, errs)
    assert 1.8 <= order <= 2.2, (order, errs)


def test_spatial_convergence_is_second_order() -> None:
    # dt = t/steps with steps proportional to (n-1)^2, i.e. dt ~ h^2: the O(dt) backward-Euler error then also
    # scales like h^2, and both errors have the same sign (both decay too slowly), so the total is C h^2.
    t = 0.02
    hs, errs = [], []
    for n in (17, 33, 65, 129):
        steps = 4 * (n - 1) ** 2 // 256
        solver = Heat2D(Heat2DConfig(n=n, alpha=1.0, dt=t / steps, steps=steps))
        f = _sine_mode(n)
        last = _last(solver.run(f[None], ZERO_SIDES))[0]
        errs.append(np.abs(last - np.exp(-2.0 * np.pi**2 * t) * f).max())
        hs.append(1.0 / (n - 1))
    order = _slope(hs, errs)
    assert 1.8 <= order <= 2.2, (order, errs)


def test_temporal_convergence_is_first_order() -> None:
    # Compare with the exact-in-time solution of the semi-discrete system, exp(alpha lambda_h t) times the mode,
    # so that only the backward-Euler error remains.
    n, alpha, t = 33, 0.5, 0.1
    h = 1.0 / (n - 1)
    lam_h = -2.0 * (4.0 / h**2) * np.sin(np.pi * h / 2.0) ** 2
    f = _sine_mode(n)
    dts, errs = [], []
    for steps in (10, 20, 40, 80):
        solver = Heat2D(Heat2DConfig(n=n, alpha=alpha, dt=t / steps, steps=steps))
        last = _last(solver.run(f[None], ZERO_SIDES))[0]
        errs.append(np.abs(last - np.exp(alpha * lam_h * t) * f).max())
        dts.append(t / steps)
    order = _slope(dts, errs)
    assert 0.9 <= order <= 1.1, (order, errs)


def test_every_step_solves_the_backward_euler_five_point_equations() -> None:
    # A rough, non-modal initial field and unequal sides: check the defining equations directly,
    # (u^{k+1} - u^k)/dt = alpha * Laplacian_h(u^{k+1}) at every interior node, with the stencil written out here.
    n, alpha, dt, steps = 20, 1.3, 2e-3, 4
    solver = Heat2D(Heat2DConfig(n=n, alpha=alpha, dt=dt, steps=steps))
    rng = np.random.default_rng(0)
    initial = rng.uniform(100.0, 500.0, size=(2, n, n))
    sides = np.array([[100.0, 500.0, 200.0, 400.0], [450.0, 150.0, 300.0, 120.0]])
    states = list(solver.run(initial, sides))
    h2 = (1.0 / (n - 1)) ** 2
    for prev, cur in itertools.pairwise(states):
        lap = (
            cur[:, 2:, 1:-1] + cur[:, :-2, 1:-1] + cur[:, 1:-1, 2:] + cur[:, 1:-1, :-2] - 4 * cur[:, 1:-1, 1:-1]
        ) / h2
        residual = (cur[:, 1:-1, 1:-1] - prev[:, 1:-1, 1:-1]) / dt - alpha * lap
        # Terms are ~1e5..1e7 (u/h^2 ~ 1.8e5 per neighbour); round-off leaves ~1e-7 relative.
        assert np.abs(residual).max() <= 1e-6 * np.abs(lap).max() + 1e-6
    np.testing.assert_array_equal(states[0][:, 1:-1, 1:-1], initial[:, 1:-1, 1:-1])


# ---------------------------------------------------------------------------------------------- the Solver API


def _params() -> np.ndarray:
    return np.array(
        [
            [300.0, 100.0, 500.0, 200.0, 400.0],
            [100.0, 500.0, 500.0, 100.0, 250.0],
            [500.0, 123.0, 321.0, 456.0, 111.0],
        ]
    )


def test_batch_equals_individual_solves() -> None:
    solver = Heat2D(Heat2DConfig(n=17, dt=1e-3, steps=10))
    params = _params()
    batch = solver.solve(params, np.arange(3))
    for b in range(3):
        single = solver.solve(params[b : b + 1], np.array([b]))
        np.testing.assert_allclose(batch[b : b + 1], single, rtol=1e-6, atol=0)


def test_solve_layout_times_boundaries_and_stream() -> None:
    n, steps, dt = 9, 5, 2e-3
    solver = Heat2D(Heat2DConfig(n=n, dt=dt, steps=steps))
    params = _params()
    out = solver.solve(params, np.array([7, 8, 9]))
    assert out.shape == (3, steps + 1, 1, n, n)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert solver.grid == (n, n) and solver.fields == ("u",)
    assert solver.times.dtype == np.float64
    np.testing.assert_allclose(solver.times, np.arange(steps + 1) * dt, rtol=0, atol=1e-15)
    assert solver.config.t_final == pytest.approx(steps * dt) and solver.config.h == pytest.approx(1 / (n - 1))
    assert isinstance(solver, solvers.Solver)

    u0, left, right, bottom, top = (params[:, c, None, None].astype(np.float32) for c in range(5))
    u = out[:, :, 0]
    np.testing.assert_array_equal(u[:, :, 0, 1:-1], np.broadcast_to(left, u[:, :, 0, 1:-1].shape))  # x = 0
    np.testing.assert_array_equal(u[:, :, -1, 1:-1], np.broadcast_to(right, u[:, :, -1, 1:-1].shape))  # x = 1
    np.testing.assert_array_equal(u[:, :, 1:-1, 0], np.broadcast_to(bottom, u[:, :, 1:-1, 0].shape))  # y = 0
    np.testing.assert_array_equal(u[:, :, 1:-1, -1], np.broadcast_to(top, u[:, :, 1:-1, -1].shape))  # y = 1
    np.testing.assert_allclose(u[:, :, 0, 0], np.broadcast_to((left + bottom)[:, :, 0] / 2, (3, steps + 1)))
    np.testing.assert_allclose(u[:, :, -1, -1], np.broadcast_to((right + top)[:, :, 0] / 2, (3, steps + 1)))
    np.testing.assert_array_equal(u[:, 0, 1:-1, 1:-1], np.broadcast_to(u0[:, :, :], (3, n - 2, n - 2)))
    # Maximum principle: the implicit scheme never leaves the range of the data.
    assert u.min() >= params.min() - 1e-3 and u.max() <= params.max() + 1e-3

    items = list(solver.stream(params, np.array([7, 8, 9])))
    assert [k for k, _ in items] == list(range(steps + 1))
    for k, fields in items:
        assert fields.shape == (3, 1, n, n) and fields.dtype == np.float32
        np.testing.assert_array_equal(fields, out[:, k])

    # Seeds are ignored (deterministic problem).
    np.testing.assert_array_equal(solver.solve(params, np.array([0, 0, 0])), out)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 3),
        ("n", True),
        ("n", 16.0),
        ("n", "64"),
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("alpha", float("inf")),
        ("alpha", True),
        ("dt", 0.0),
        ("dt", float("nan")),
        ("steps", 0),
        ("steps", 2.0),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"heat2d\.{field}"):
        Heat2DConfig(**{field: value})


def test_config_normalises_numbers() -> None:
    cfg = Heat2DConfig(n=np.int64(8), alpha=2, dt=np.float32(0.5), steps=3)
    assert type(cfg.n) is int and type(cfg.alpha) is float and type(cfg.dt) is float
    with pytest.raises(AttributeError):
        cfg.n = 9  # type: ignore[misc]


@pytest.mark.parametrize(("column", "value"), [(4, 50.0), (0, 501.0), (2, float("nan")), (1, float("inf"))])
def test_bad_params_name_the_parameter(column: int, value: float) -> None:
    solver = Heat2D(Heat2DConfig(n=8, steps=2))
    params = _params()
    params[1, column] = value
    name = solver.params.names[column]
    with pytest.raises(ValueError, match=name):
        solver.solve(params, np.arange(3))
    with pytest.raises(ValueError, match=name):
        solver.stream(params, np.arange(3))
    with pytest.raises(ValueError, match=name):
        solver.steady_state(params)


def test_bad_shapes_are_rejected() -> None:
    solver = Heat2D(Heat2DConfig(n=8, steps=2))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(_params(), np.arange(2))
    with pytest.raises(ValueError, match="params"):
        solver.solve(_params()[:, :4], np.arange(3))
    with pytest.raises(ValueError, match="initial"):
        solver.run(np.zeros((1, 7, 8)), ZERO_SIDES)
    with pytest.raises(ValueError, match="batch"):
        solver.run(np.zeros((2, 8, 8)), ZERO_SIDES)
    with pytest.raises(ValueError, match="boundary"):
        solver.run(np.zeros((1, 8, 8)), np.zeros((1, 3)))


def test_registry() -> None:
    solver = solvers.get("heat2d", n=16)
    assert isinstance(solver, Heat2D) and solver.grid == (16, 16)
    assert "heat2d" in solvers.available() and solvers.config_class("heat2d") is Heat2DConfig
    with pytest.raises(ValueError, match=r"heat2d\.n"):
        solvers.get("heat2d", n=2)
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.get("no-such-solver")
