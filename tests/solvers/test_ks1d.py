"""KS1D checked against mathematics: the conserved mean, Galilean invariance, ETDRK4's fourth order in time,
spectral convergence in space, the contour-integral phi-functions against their closed forms and Taylor limits,
the largest Lyapunov exponent of the L = 22 attractor against the literature, bounded solutions and a spectrum
that decays exponentially."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from solvers.ks1d import KS1D, KS1DConfig, etdrk4_coefficients, largest_lyapunov_exponent

NO_PARAMS = np.zeros((1, 0))


def _no_params(b: int) -> np.ndarray:
    return np.zeros((b, 0))


def _slope(h: list[float], err: list[float]) -> float:
    return float(np.polyfit(np.log(h), np.log(err), 1)[0])


def _kt_initial(n: int, length: float = 22.0) -> np.ndarray:
    """Kassam & Trefethen's smooth initial condition cos(x')(1 + sin(x')), x' = 2 pi x / L, as [1, n]."""
    x = 2.0 * np.pi * np.arange(n) / n
    return (np.cos(x) * (1.0 + np.sin(x)))[None]


def _shift(u: np.ndarray, s: float, length: float) -> np.ndarray:
    """Exact (band-limited) translate u(x - s) of grid functions [..., n] via Fourier phases."""
    n = u.shape[-1]
    k = 2.0 * np.pi * np.arange(n // 2 + 1) / length
    v = np.fft.rfft(u, axis=-1) * np.exp(-1j * k * s)
    v[..., -1] = v[..., -1].real * np.cos(k[-1] * s)  # the Nyquist mode of a real field stays real
    return np.fft.irfft(v, n=n, axis=-1)


def _interpolate(u: np.ndarray, m: int) -> np.ndarray:
    """Trigonometric interpolant of [..., n] sampled on m > n points (coarse Nyquist mode dropped)."""
    n = u.shape[-1]
    v = np.fft.rfft(u, axis=-1) / n
    w = np.zeros((*u.shape[:-1], m // 2 + 1), dtype=np.complex128)
    w[..., : n // 2] = v[..., : n // 2]
    return np.fft.irfft(w * m, n=m, axis=-1)


# ---------------------------------------------------------------------------------------------- invariants


def test_mean_is_conserved_for_nonzero_mean_initial_condition() -> None:
    solver = KS1D(KS1DConfig(resolution=64, burn_in=0.0, snapshots=50, record_every=2.0))
    rng = np.random.default_rng(5)
    u0 = solver.initial_condition(np.array([1, 2])) + rng.uniform(-1.0, 1.0, size=(2, 1))  # means != 0
    states = list(solver.run(u0))
    assert len(states) == 51
    means = np.array([s.mean(axis=-1) for s in states])  # [T+1, B]
    # The mean mode has L_0 = 0, E_0 = 1 and N_0 = 0: only the FFT round trip (~1e-16) can change it.
    np.testing.assert_allclose(means, np.broadcast_to(u0.mean(axis=-1), means.shape), rtol=0, atol=1e-13)
    # ... while the field itself has gone far from the initial condition (chaotic, O(1) changes).
    assert np.abs(states[-1] - u0).max() > 1.0

    # Through the Solver API: the configured mean is the mean of every recorded state (float32 output).
    out = KS1D(KS1DConfig(resolution=32, burn_in=20.0, snapshots=10, mean=0.75)).solve(_no_params(3), np.arange(3))
    np.testing.assert_allclose(out.mean(axis=-1, dtype=np.float64), 0.75, rtol=0, atol=1e-6)


def test_galilean_invariance_fixes_the_sign_of_the_advection() -> None:
    # If w solves KS then u(x, t) = w(x - c t, t) + c does: u u_x with the stated sign makes a mean c advect
    # the pattern to the right at speed c. The spectral discretisation inherits this exactly; only ETDRK4's
    # time error (the advection sits in the nonlinear part for u but not for w) separates the two runs.
    c, t, length, n = 0.8, 4.0, 22.0, 64
    solver = KS1D(KS1DConfig(length=length, resolution=n, dt=1 / 64, burn_in=0.0, record_every=t))
    w0 = KS1D(KS1DConfig(length=length, resolution=n)).evolve(solver.initial_condition(np.array([11])), 50.0)
    w = solver.evolve(w0, t)
    u = solver.evolve(w0 + c, t)
    expected = _shift(w, c * t, length) + c
    assert np.abs(u - expected).max() <= 1e-6
    # The opposite sign would be off by O(1): the test can tell them apart.
    assert np.abs(u - (_shift(w, -c * t, length) + c)).max() > 0.1


def test_etdrk4_contour_coefficients_match_closed_forms_and_limits() -> None:
    h = 0.3
    # Moderate |hL|: the closed forms (Cox & Matthews 2002) are accurate there and must agree with the contour.
    lin = np.array([-40.0, -7.0, -2.0, 1.5, 3.0])
    z = h * lin
    ez = np.exp(z)
    coef = etdrk4_coefficients(lin, h)
    np.testing.assert_allclose(coef["E"], ez, rtol=1e-15)
    np.testing.assert_allclose(coef["E2"], np.exp(z / 2), rtol=1e-15)
    np.testing.assert_allclose(coef["Q"], h * (np.exp(z / 2) - 1) / z, rtol=1e-12)
    np.testing.assert_allclose(coef["f1"], h * (-4 - z + ez * (4 - 3 * z + z**2)) / z**3, rtol=1e-10)
    np.testing.assert_allclose(coef["f2"], h * (2 + z + ez * (-2 + z)) / z**3, rtol=1e-10)
    np.testing.assert_allclose(coef["f3"], h * (-4 - 3 * z - z**2 + ez * (4 - z)) / z**3, rtol=1e-10)
    # hL -> 0, where the closed forms cancel catastrophically: the limits are h/2, h/6, h/6, h/6 (RK4 weights).
    small = etdrk4_coefficients(np.array([0.0, 1e-12]), h)
    np.testing.assert_allclose(small["Q"], h / 2, rtol=1e-12)
    for key in ("f1", "f2", "f3"):
        np.testing.assert_allclose(small[key], h / 6, rtol=1e-12)
    # Very stiff modes: exp(hL) underflows and the coefficients tend to -h/(hL)-type limits without NaNs.
    stiff = etdrk4_coefficients(np.array([-1e4]), h)
    zs = -1e4 * h
    assert all(np.isfinite(v).all() for v in stiff.values())
    np.testing.assert_allclose(stiff["Q"], -h / zs, rtol=1e-12)
    np.testing.assert_allclose(stiff["f1"], h * (-4 - zs) / zs**3, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- convergence


def test_temporal_convergence_is_fourth_order() -> None:
    # Same spatial discretisation throughout, reference with dt = 1/1024 (its error ~1e-14), so only the ETDRK4
    # error is measured. ETDRK4 on KS is pre-asymptotic (order ~3) for dt >~ 1/16 because of the modes with
    # |hL| ~ 1, and reaches order 4 below; n = 32 keeps that range reachable in a short test.
    n, t = 32, 10.0
    u0 = _kt_initial(n)

    def run(dt: float) -> np.ndarray:
        return KS1D(KS1DConfig(resolution=n, dt=dt, burn_in=0.0, record_every=t)).evolve(u0, t)

    ref = run(1 / 1024)
    dts = [1 / 32, 1 / 64, 1 / 128]
    errs = [float(np.abs(run(dt) - ref).max()) for dt in dts]
    order = _slope(dts, errs)
    assert 3.7 <= order <= 4.3, (order, errs)
    assert errs[-1] < 1e-9  # and the constant is small: 4th order, not a large error decaying fast


def test_spatial_convergence_is_exponential() -> None:
    # Fixed small dt; each 8 more grid points must gain more than an order of magnitude (spectral accuracy),
    # against a 128-point reference interpolated exactly (trigonometric interpolation).
    t, dt = 5.0, 0.01

    def run(n: int) -> np.ndarray:
        return KS1D(KS1DConfig(resolution=n, dt=dt, burn_in=0.0, record_every=t)).evolve(_kt_initial(n), t)

    ref = run(128)
    ns = [24, 32, 40, 48]
    errs = [float(np.abs(_interpolate(run(n), 128) - ref).max()) for n in ns]
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert np.all(ratios > 20.0), (errs, ratios)
    assert errs[-1] < 1e-7, errs


# ---------------------------------------------------------------------------------------------- the attractor


def test_largest_lyapunov_exponent_of_l22() -> None:
    # Literature for L = 22: 0.048 (Cvitanović, Davidchack & Siminos 2010), 0.043 (Edson et al. 2019, also the
    # value quoted by e.g. Özalp & Magri). This discretisation (n = 64, dt = 0.25) gives 0.0490 +- 0.0003
    # (64 trajectories x 5000 time units; n = 128, dt = 0.1: 0.0484 +- 0.0003; n = 32: 0.0483), i.e. it agrees
    # with 0.048 and sits 14 % above 0.043 (a test at 0.043 +- 15 % would pass or fail on sampling noise), so the
    # bound is 0.048 +- 15 %: [0.0408, 0.0552], which contains both published values.
    # One trajectory over 2000 time units has a spread of ~0.004 (finite-time fluctuations), so 16 of them are
    # averaged (standard error ~0.001, far inside the bound); renormalisation every 5 time units (growth ~1.3).
    solver = KS1D(KS1DConfig(resolution=64, dt=0.25))
    u0 = solver.evolve(solver.initial_condition(np.arange(100, 116)), 200.0)  # onto the attractor
    lam = largest_lyapunov_exponent(solver, u0, time=2000.0, renormalise_every=5.0, delta=1e-7, seed=0)
    assert lam.shape == (16,)
    assert np.all(lam > 0.02), lam  # every trajectory is chaotic (none fell onto a stable orbit)
    assert abs(lam.mean() - 0.048) <= 0.15 * 0.048, lam.mean()


def test_solutions_are_bounded_with_an_exponentially_decaying_spectrum() -> None:
    solver = KS1D(KS1DConfig(resolution=64, snapshots=150, record_every=2.0))
    out = solver.solve(_no_params(4), np.arange(4))[:, :, 0].astype(np.float64)  # [B, T+1, n]
    assert np.all(np.isfinite(out))
    # On the L = 22 attractor |u| stays below ~3.1 and the RMS is ~1.2 (O(1), independent of the IC scale).
    assert np.abs(out).max() < 5.0
    rms = np.sqrt(np.mean(out**2))
    assert 0.7 < rms < 1.7, rms
    spectrum = np.mean(np.abs(np.fft.rfft(out, axis=-1) / 64) ** 2, axis=(0, 1))  # [n/2+1], time/batch average
    peak = int(np.argmax(spectrum))
    assert 1 <= peak <= 4, spectrum  # energy sits at the linearly unstable k = 2 pi m / 22 < 1, i.e. m <= 3
    tail = spectrum[5:20]  # above float32 round-off (~1e-16)
    assert np.all(np.diff(tail) < 0), tail
    decades_per_mode = np.polyfit(np.arange(5, 20), np.log10(tail), 1)[0]
    assert decades_per_mode < -0.5, decades_per_mode  # exponential decay (analytic solutions), ~-0.85 measured
    assert spectrum[20] < 1e-10 * spectrum[peak]


# ---------------------------------------------------------------------------------------------- the Solver API


SMALL = {"resolution": 32, "burn_in": 10.0, "snapshots": 6, "record_every": 0.5}


def test_batch_equals_individual_solves() -> None:
    solver = KS1D(KS1DConfig(**SMALL))
    seeds = np.array([4, 9, 2])
    batch = solver.solve(_no_params(3), seeds)
    for b in range(3):
        single = solver.solve(NO_PARAMS, seeds[b : b + 1])
        np.testing.assert_allclose(batch[b : b + 1], single, rtol=1e-6, atol=1e-6)


def test_reproducible_from_seed_and_seed_dependent() -> None:
    solver = KS1D(KS1DConfig(**SMALL))
    a = solver.solve(_no_params(3), np.array([1, 2, 3]))
    b = solver.solve(_no_params(3), np.array([3, 1, 2]))  # same seeds, other batch positions
    np.testing.assert_allclose(a[[2, 0, 1]], b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(solver.initial_condition(np.array([7]))[0], solver.initial_condition([3, 7])[1])
    assert np.abs(a[0] - a[1]).max() > 0.1
    # The documented recipe: zero mean (the default), RMS 1, band-limited to modes 1..8.
    ic = KS1D(KS1DConfig()).initial_condition(np.arange(5))
    np.testing.assert_allclose(ic.mean(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(np.sqrt(np.mean(ic**2, axis=-1)), 1.0, rtol=1e-12)
    assert np.abs(np.fft.rfft(ic, axis=-1)[:, 9:]).max() < 1e-12


def test_solve_layout_times_and_stream() -> None:
    solver = KS1D(KS1DConfig(**SMALL))
    seeds = np.array([7, 8, 9])
    out = solver.solve(_no_params(3), seeds)
    assert out.shape == (3, 7, 1, 32)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert solver.grid == (32,) and solver.fields == ("u",) and solver.params.dim == 0
    assert solver.times.dtype == np.float64
    np.testing.assert_allclose(solver.times, np.arange(7) * 0.5, rtol=0, atol=1e-15)
    np.testing.assert_allclose(solver.x, np.arange(32) * 22.0 / 32)
    cfg = solver.config
    assert cfg.dx == pytest.approx(22.0 / 32) and cfg.t_final == pytest.approx(3.0)
    assert cfg.burn_in_steps == 40 and cfg.steps_per_record == 2
    assert isinstance(solver, solvers.Solver)

    items = list(solver.stream(_no_params(3), seeds))
    assert [k for k, _ in items] == list(range(7))
    for k, fields in items:
        assert fields.shape == (3, 1, 32) and fields.dtype == np.float32
        np.testing.assert_array_equal(fields, out[:, k])

    # Time 0 is the end of the burn-in; successive records are record_every apart; run() reproduces them.
    u_burnt = solver.evolve(solver.initial_condition(seeds), 10.0)
    np.testing.assert_allclose(out[:, 0, 0], u_burnt, rtol=0, atol=1e-6)
    again = np.stack(list(solver.run(u_burnt)), axis=1)  # [B, T+1, n]
    np.testing.assert_allclose(out[:, :, 0], again, rtol=0, atol=1e-6)

    empty = solver.solve(_no_params(0), np.zeros(0, dtype=np.int64))
    assert empty.shape == (0, 7, 1, 32)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_path_equals_numpy_path(device: str) -> None:
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    # Default grid and dt over 100 time units: chaotic round-off growth (e^{0.05 * 100} ~ 150) stays << 1e-5.
    solver = KS1D(KS1DConfig(burn_in=50.0, snapshots=50, record_every=1.0))
    seeds = np.array([3, 14, 15])
    ref = solver.solve(_no_params(3), seeds)
    out = solver.solve_torch(_no_params(3), seeds, device=device)
    assert out.dtype == torch.float32 and out.device.type == device and tuple(out.shape) == ref.shape
    got = out.cpu().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("length", 0.0),
        ("length", -22.0),
        ("length", float("nan")),
        ("length", True),
        ("resolution", 8),
        ("resolution", 65),
        ("resolution", True),
        ("resolution", 64.0),
        ("resolution", "64"),
        ("dt", 0.0),
        ("dt", 0.75),
        ("dt", float("inf")),
        ("dt", 0.3),  # record_every = 1 is not a multiple
        ("burn_in", -1.0),
        ("burn_in", 100.1),
        ("burn_in", float("nan")),
        ("snapshots", 0),
        ("snapshots", 2.0),
        ("record_every", 0.0),
        ("record_every", 0.3),
        ("mean", float("inf")),
        ("mean", "0"),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    # dt = 0.3 breaks the record_every/burn_in multiples; which of them is named first does not matter.
    pattern = r"ks1d\.(dt|burn_in|record_every)" if (field, value) == ("dt", 0.3) else rf"ks1d\.{field}"
    with pytest.raises(ValueError, match=pattern):
        KS1DConfig(**{field: value})


def test_config_combinations_and_normalisation() -> None:
    with pytest.raises(ValueError, match=r"ks1d\.resolution"):
        KS1DConfig(length=100.0, resolution=64)  # grid spacing 1.56 > 1: dissipation range unresolved
    KS1DConfig(length=100.0, resolution=128)
    cfg = KS1DConfig(length=np.float32(22), resolution=np.int64(32), dt=np.float64(0.125), burn_in=0, mean=1)
    assert type(cfg.resolution) is int and type(cfg.length) is float and type(cfg.burn_in) is float
    assert type(cfg.mean) is float
    with pytest.raises(AttributeError):
        cfg.dt = 0.5  # type: ignore[misc]


def test_bad_inputs_are_rejected() -> None:
    solver = KS1D(KS1DConfig(**SMALL))
    with pytest.raises(ValueError, match="seeds"):
        solver.solve(_no_params(3), np.arange(2))
    with pytest.raises(ValueError, match="params"):
        solver.solve(np.zeros((3, 1)), np.arange(3))
    with pytest.raises(ValueError, match="u0"):
        solver.run(np.zeros((1, 31)))
    with pytest.raises(ValueError, match="u0"):
        solver.evolve(np.full((1, 32), np.nan), 1.0)
    with pytest.raises(ValueError, match="multiple of dt"):
        solver.evolve(np.zeros((1, 32)), 0.3)
    with pytest.raises(ValueError, match="renormalise_every"):
        largest_lyapunov_exponent(solver, np.zeros((1, 32)), time=10.0, renormalise_every=3.0)


def test_registry() -> None:
    solver = solvers.get("ks1d", resolution=32, snapshots=3, burn_in=5.0)
    assert isinstance(solver, KS1D) and solver.grid == (32,)
    assert "ks1d" in solvers.available() and solvers.config_class("ks1d") is KS1DConfig
    assert solver.solve(_no_params(2), np.arange(2)).shape == (2, 4, 1, 32)
    KS1DConfig(**KS1D.BENCH)
    with pytest.raises(ValueError, match=r"ks1d\.resolution"):
        solvers.get("ks1d", resolution=15)
