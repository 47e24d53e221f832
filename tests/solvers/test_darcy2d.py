"""Darcy2D checked against mathematics: manufactured solutions (smooth and jumping coefficient) and their
convergence orders, the 5-point equations written out, the maximum principle, the Gaussian field's series
and statistics, and the FNO sub-sampling recipe."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from solvers.darcy2d import Darcy2D, Darcy2DConfig, assemble

METHODS = ("pcg", "direct")


def _mesh(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(0.0, 1.0, n)
    return np.meshgrid(x, x, indexing="ij")  # [i, j] <-> (x, y), the solver's layout


def _slope(h: list[float], err: list[float]) -> float:
    return float(np.polyfit(np.log(h), np.log(err), 1)[0])


def _empty_params(b: int) -> np.ndarray:
    return np.zeros((b, 0))


def _solver(method: str = "pcg", **cfg: object) -> Darcy2D:
    return Darcy2D(Darcy2DConfig(method=method, **cfg))


# ---------------------------------------------------------------------------------------------- manufactured solutions


@pytest.mark.parametrize("method", METHODS)
def test_smooth_coefficient_converges_at_second_order(method: str) -> None:
    # a = 1 + sin(pi x) sin(pi y)/2, u = sin(pi x) sin(pi y):
    # f = -(a_x u_x + a_y u_y + a Lap u) = -(pi^2/2)(cos^2(pi x) sin^2(pi y) + sin^2(pi x) cos^2(pi y)) + 2 pi^2 a u.
    solver = _solver(method)
    hs, errs = [], []
    for n in (17, 33, 65, 129):
        x, y = _mesh(n)
        sx, cx, sy, cy = np.sin(np.pi * x), np.cos(np.pi * x), np.sin(np.pi * y), np.cos(np.pi * y)
        a = 1.0 + 0.5 * sx * sy
        u = sx * sy
        f = -0.5 * np.pi**2 * (cx**2 * sy**2 + sx**2 * cy**2) + 2.0 * np.pi**2 * a * u
        uh = solver.solve_field(a[None], f[None])[0]
        errs.append(np.abs(uh - u).max())
        hs.append(1.0 / (n - 1))
    order = _slope(hs, errs)
    # Measured: order 2.00, max error 9.2e-5 at n = 129 (5.9e-3 at n = 17).
    assert 1.8 <= order <= 2.2, (order, errs)
    assert errs[-1] < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_grid_aligned_jump_converges_at_second_order(method: str) -> None:
    # a = a1 for x < 1/2, a2 for x > 1/2. u = sin(2 pi x) sin(pi y) / a(x) is continuous (zero at x = 1/2) with a
    # continuous flux a u_x = 2 pi cos(2 pi x) sin(pi y), and f = -a Lap u = 5 pi^2 sin(2 pi x) sin(pi y) on both sides.
    # With n - 1 odd, x = 1/2 falls midway between two nodes, i.e. on a cell face, where the harmonic mean is the
    # exact series conductance of the two half-cells.
    a1, a2 = 1.0, 10.0
    solver = _solver(method)
    hs, errs = [], []
    for n in (12, 24, 48, 96):
        x, y = _mesh(n)
        assert not np.any(np.isclose(x, 0.5))
        a = np.where(x < 0.5, a1, a2)
        u = np.sin(2 * np.pi * x) * np.sin(np.pi * y) / a
        f = 5 * np.pi**2 * np.sin(2 * np.pi * x) * np.sin(np.pi * y)
        uh = solver.solve_field(a[None], f[None])[0]
        errs.append(np.abs(uh - u).max())
        hs.append(1.0 / (n - 1))
    order = _slope(hs, errs)
    # Measured: order 2.00 (max errors 2.3e-2 at n = 12 down to 3.1e-4 at n = 96).
    assert 1.8 <= order <= 2.2, (order, errs)


@pytest.mark.parametrize("method", METHODS)
def test_solution_satisfies_the_harmonic_mean_five_point_equations(method: str) -> None:
    # Random positive coefficient with a 100x contrast; the stencil is written out here independently.
    n = 23
    rng = np.random.default_rng(3)
    a = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=(2, n, n)))
    f = rng.standard_normal((2, n, n))
    u = _solver(method).solve_field(a, f)
    assert np.all(u[:, 0, :] == 0) and np.all(u[:, -1, :] == 0) and np.all(u[:, :, 0] == 0) and np.all(u[:, :, -1] == 0)

    def hm(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return 2 * p * q / (p + q)

    c = (slice(None), slice(1, -1), slice(1, -1))
    east = (slice(None), slice(2, None), slice(1, -1))
    west = (slice(None), slice(None, -2), slice(1, -1))
    north = (slice(None), slice(1, -1), slice(2, None))
    south = (slice(None), slice(1, -1), slice(None, -2))
    flux = sum(hm(a[c], a[q]) * (u[c] - u[q]) for q in (east, west, north, south)) * (n - 1) ** 2
    assert np.abs(flux - f[c]).max() <= 1e-9 * np.abs(f).max()
    # The assembled matrices are symmetric, weakly diagonally dominant with non-positive off-diagonals (M-matrix).
    for mat in assemble(a):
        dense = mat.toarray()
        np.testing.assert_array_equal(dense, dense.T)
        off = dense - np.diag(np.diag(dense))
        assert np.all(off <= 0) and np.all(dense.sum(axis=1) >= -1e-9 * np.abs(dense).max())


# ---------------------------------------------------------------------------------------------- the random problem


def test_maximum_principle_positive_forcing_gives_positive_interior() -> None:
    solver = _solver()
    out = solver.solve(_empty_params(4), np.arange(4))
    u = out[:, 0, 1]
    assert np.all(u[:, 1:-1, 1:-1] > 0)
    assert np.all(u[:, 0, :] == 0) and np.all(u[:, -1, :] == 0) and np.all(u[:, :, 0] == 0) and np.all(u[:, :, -1] == 0)
    # Negative forcing flips the sign (linearity), so the minimum principle holds too.
    neg = _solver(forcing=-1.0).solve(_empty_params(4), np.arange(4))[:, 0, 1]
    np.testing.assert_array_equal(neg, -u)


def test_coefficient_takes_two_values_about_half_each() -> None:
    solver = _solver(modes=64)
    a = solver.coefficient(np.arange(60))
    assert set(np.unique(a)) == {3.0, 12.0}
    frac = (a == 12.0).mean(axis=(1, 2))
    # mu -> -mu symmetry: the mean fraction is 1/2; per-sample fractions spread (correlation length ~1/3).
    assert 0.4 <= frac.mean() <= 0.6, frac.mean()
    assert np.mean((frac > 0.05) & (frac < 0.95)) > 0.8, frac
    other = _solver(modes=64, a_pos=5.0, a_neg=0.5).coefficient(np.arange(3))
    np.testing.assert_array_equal(other == 5.0, a[:3] == 12.0)
    assert set(np.unique(other)) == {0.5, 5.0}


def test_gaussian_field_is_the_documented_cosine_series() -> None:
    k_modes, n = 6, 85
    mu = _solver(modes=k_modes).gaussian_field(np.array([11]))[0]
    xi = np.random.default_rng(11).standard_normal((k_modes, k_modes))
    x = np.linspace(0.0, 1.0, n)
    expected = np.zeros((n, n))
    for k in range(k_modes):
        for m in range(k_modes):
            if k == m == 0:
                continue
            ck, cm = (1.0 if k == 0 else np.sqrt(2.0)), (1.0 if m == 0 else np.sqrt(2.0))
            weight = 1.0 / (np.pi**2 * (k**2 + m**2) + 9.0)
            expected += xi[k, m] * weight * ck * cm * np.outer(np.cos(k * np.pi * x), np.cos(m * np.pi * x))
    np.testing.assert_allclose(mu, expected, rtol=0, atol=1e-13)


def test_gaussian_field_statistics_match_the_covariance() -> None:
    modes, n, samples = 48, 85, 400
    mu = _solver(modes=modes).gaussian_field(np.arange(samples))
    # Zero mean mode: with fewer than 2(n-1) modes the trapezoidal rule integrates every cos mode exactly to 0.
    w = np.ones(n)
    w[[0, -1]] = 0.5
    means = np.einsum("i,bij,j->b", w, mu, w) / (n - 1) ** 2
    assert np.abs(means).max() < 1e-12
    # Point variance Var mu(x, y) = sum c_k^2 c_l^2 cos^2(k pi x) cos^2(l pi y) / (pi^2 (k^2+l^2) + 9)^2.
    k = np.arange(modes)
    c2 = np.where(k == 0, 1.0, 2.0)
    lam = (1.0 / (np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2) + 9.0)) ** 2
    lam[0, 0] = 0.0
    for i, j in ((42, 42), (0, 0), (10, 70)):
        gx = c2 * np.cos(k * np.pi * i / (n - 1)) ** 2
        gy = c2 * np.cos(k * np.pi * j / (n - 1)) ** 2
        var = gx @ lam @ gy
        emp = mu[:, i, j].var()
        # 400 samples: the relative standard error of a variance is sqrt(2/400) ~ 7%; allow 4 sigma.
        assert abs(emp / var - 1) < 0.3, (i, j, emp, var)


def test_fno_subsampling_recipe() -> None:
    seeds = np.array([5])
    # The field is the same function at every resolution: the coarse a is the 421 a at every 5th node.
    a85 = _solver(resolution=85).coefficient(seeds)
    a421 = _solver(resolution=421).coefficient(seeds)
    np.testing.assert_array_equal(a85, a421[:, ::5, ::5])
    # solve_resolution = 421 records the 421 solution at the coarse nodes. The 85 and 211 grids share the nodes
    # x = 2i/84 = 5i/210, so both sub-samplings of the same 421 solution must agree there.
    fine85 = _solver(resolution=85, solve_resolution=421).solve(_empty_params(1), seeds)[0, 0]
    fine211 = _solver(resolution=211, solve_resolution=421).solve(_empty_params(1), seeds)[0, 0]
    np.testing.assert_array_equal(fine85[:, ::2, ::2], fine211[:, ::5, ::5])
    np.testing.assert_array_equal(fine85[0], a85[0].astype(np.float32))
    # Solving on the coarse grid instead is a consistent discretisation: measured 0.5% relative L2 from the 421 one.
    coarse = _solver(resolution=85).solve(_empty_params(1), seeds)[0, 0]
    rel = np.linalg.norm(coarse[1] - fine85[1]) / np.linalg.norm(fine85[1])
    assert rel < 0.02, rel


def test_methods_agree_and_config_scales() -> None:
    seeds = np.array([1, 2])
    pcg = _solver("pcg").solve(_empty_params(2), seeds)
    direct = _solver("direct").solve(_empty_params(2), seeds)
    np.testing.assert_allclose(pcg, direct, rtol=1e-6, atol=1e-9)
    # Linearity: u scales with the forcing and inversely with the coefficient.
    scaled = _solver(a_pos=24.0, a_neg=6.0, forcing=-3.0).solve(_empty_params(2), seeds)
    np.testing.assert_allclose(scaled[:, :, 1], -1.5 * pcg[:, :, 1], rtol=1e-5, atol=1e-9)
    # x <-> y symmetry of the scheme: the transposed coefficient gives the transposed solution.
    solver = _solver()
    a = solver.coefficient(seeds)
    np.testing.assert_allclose(
        solver.solve_field(a.transpose(0, 2, 1), 1.0), solver.solve_field(a, 1.0).transpose(0, 2, 1), atol=1e-14
    )


# ---------------------------------------------------------------------------------------------- the Solver API


def test_batch_equals_individual_solves_and_seeds_reproduce() -> None:
    solver = _solver()
    seeds = np.array([4, 9, 4])
    batch = solver.solve(_empty_params(3), seeds)
    for b in range(3):
        single = solver.solve(_empty_params(1), seeds[b : b + 1])
        np.testing.assert_array_equal(batch[b : b + 1, :, 0], single[:, :, 0])  # a: exactly the same field
        np.testing.assert_allclose(batch[b : b + 1], single, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(batch[0], batch[2])  # same seed, different position
    assert not np.array_equal(batch[0, 0, 0], batch[1, 0, 0])


def test_solve_layout_and_stream() -> None:
    solver = _solver(resolution=85)
    out = solver.solve(_empty_params(2), np.array([7, 8]))
    assert out.shape == (2, 1, 2, 85, 85)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert solver.grid == (85, 85) and solver.fields == ("a", "u")
    assert solver.times.dtype == np.float64 and solver.times.tolist() == [0.0]
    assert solver.params.dim == 0 and solver.params.names == ()
    assert solver.config.h == pytest.approx(1 / 84) and solver.config.stride == 1
    assert Darcy2DConfig(resolution=141, solve_resolution=421).stride == 3
    assert isinstance(solver, solvers.Solver)
    items = list(solver.stream(_empty_params(2), np.array([7, 8])))
    assert len(items) == 1 and items[0][0] == 0
    assert items[0][1].shape == (2, 2, 85, 85) and items[0][1].dtype == np.float32
    np.testing.assert_array_equal(items[0][1], out[:, 0])
    empty = solver.solve(_empty_params(0), np.zeros(0, dtype=np.int64))
    assert empty.shape == (0, 1, 2, 85, 85)
    assert not hasattr(solver, "solve_torch")  # sparse/iterative numpy solve only, by design


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 84),
        ("resolution", 64),
        ("resolution", True),
        ("resolution", 85.0),
        ("resolution", "85"),
        ("solve_resolution", 141),
        ("solve_resolution", 100),
        ("solve_resolution", 85.0),
        ("a_pos", 0.0),
        ("a_pos", -1.0),
        ("a_pos", float("nan")),
        ("a_pos", True),
        ("a_neg", float("inf")),
        ("a_neg", 0),
        ("forcing", float("nan")),
        ("forcing", True),
        ("modes", 1),
        ("modes", True),
        ("modes", 8.0),
        ("method", "lu"),
        ("method", None),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"darcy2d\.{field}"):
        Darcy2DConfig(**{field: value})


def test_config_rules() -> None:
    with pytest.raises(ValueError, match="43, 85, 141, 211, 421"):
        Darcy2DConfig(resolution=100)
    # Only the 421 grid sub-samples onto the others; a coarser or incommensurate solve grid is impossible.
    for res, solve_res in ((141, 85), (211, 141), (141, 211), (211, 85)):
        with pytest.raises(ValueError, match=r"darcy2d\.solve_resolution"):
            Darcy2DConfig(resolution=res, solve_resolution=solve_res)
    for res in (43, 85, 141, 211, 421):
        assert Darcy2DConfig(resolution=res, solve_resolution=421).solve_n == 421
        assert Darcy2DConfig(resolution=res, solve_resolution=res).stride == 1
    cfg = Darcy2DConfig(resolution=np.int64(141), a_pos=np.float32(2), a_neg=1, forcing=2, modes=np.int32(9))
    assert type(cfg.resolution) is int and type(cfg.a_pos) is float and type(cfg.a_neg) is float
    assert type(cfg.forcing) is float and type(cfg.modes) is int
    with pytest.raises(AttributeError):
        cfg.resolution = 85  # type: ignore[misc]


def test_bad_inputs_are_rejected() -> None:
    solver = _solver()
    with pytest.raises(ValueError, match="params"):
        solver.solve(np.zeros((2, 1)), np.arange(2))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(_empty_params(3), np.arange(2))
    with pytest.raises(ValueError, match="seeds"):
        solver.stream(_empty_params(2), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="a must"):
        solver.solve_field(np.zeros((1, 5, 5)), 1.0)
    with pytest.raises(ValueError, match="a must"):
        solver.solve_field(np.ones((1, 5, 6)), 1.0)
    with pytest.raises(ValueError, match="f must"):
        solver.solve_field(np.ones((1, 5, 5)), np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="f must"):
        solver.solve_field(np.ones((1, 5, 5)), float("nan"))


def test_registry() -> None:
    solver = solvers.get("darcy2d", resolution=141)
    assert isinstance(solver, Darcy2D) and solver.grid == (141, 141)
    assert "darcy2d" in solvers.available() and solvers.config_class("darcy2d") is Darcy2DConfig
    with pytest.raises(ValueError, match=r"darcy2d\.resolution"):
        solvers.get("darcy2d", resolution=128)
