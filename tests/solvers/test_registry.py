"""The solver contract, checked on every registered solver (a new solver is covered by adding it to SMALL)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import solvers

# Small settings per solver so that the contract checks stay fast.
SMALL: dict[str, dict] = {
    "heat2d": {"n": 12, "steps": 4, "dt": 0.01},
    "burgers1d": {"n_fine": 128, "resolution": 32, "snapshots": 2},
    "darcy2d": {"resolution": 85, "modes": 32},
    "ns2d": {"n_solve": 16, "resolution": 8, "dt": 1e-3, "record_every": 2e-3, "t_final": 4e-3},
    "ks1d": {"resolution": 32, "burn_in": 1.0, "snapshots": 3},
    "advection1d": {"resolution": 64, "snapshots": 3, "t_final": 0.1},
    "reaction_diffusion1d": {"resolution": 64, "snapshots": 3, "t_final": 0.01},
}


def test_every_registered_solver_is_covered() -> None:
    assert set(solvers.available()) == set(SMALL)


def _draw(solver, b: int) -> tuple[np.ndarray, np.ndarray]:
    space = solver.params
    return space.scale(np.random.default_rng(0).random((b, space.dim))), np.arange(10, 10 + b, dtype=np.int64)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_contract(name: str) -> None:
    solver = solvers.get(name, **SMALL[name])
    params, seeds = _draw(solver, 3)
    traj = solver.solve(params, seeds)
    assert traj.shape == (3, len(solver.times), len(solver.fields), *solver.grid)
    assert traj.dtype == np.float32 and traj.flags.c_contiguous and np.isfinite(traj).all()
    assert (solver.times[0] == 0.0 and np.all(np.diff(solver.times) > 0)) or len(solver.times) == 1
    # The streaming form yields the same steps, in order.
    steps = list(solver.stream(params, seeds))
    assert [k for k, _ in steps] == list(range(len(solver.times)))
    np.testing.assert_array_equal(np.stack([f for _, f in steps], axis=1), traj)
    # Reproducible from (seed, params), whatever the batch it is solved in.
    alone = solver.solve(params[1:2], seeds[1:2])
    np.testing.assert_allclose(alone[0], traj[1], rtol=1e-5, atol=1e-6 * float(np.abs(traj).max()))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_config_is_frozen_and_rejects_unknown_settings(name: str) -> None:
    cfg = solvers.config_class(name)(**SMALL[name])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__(dataclasses.fields(cfg)[0].name, 1)
    with pytest.raises(TypeError):
        solvers.get(name, no_such_setting=1)


@pytest.mark.parametrize("name", [n for n in sorted(SMALL) if solvers.get(n, **SMALL[n]).params.dim])
def test_out_of_bounds_parameters_are_refused(name: str) -> None:
    solver = solvers.get(name, **SMALL[name])
    params, seeds = _draw(solver, 1)
    params[0, 0] = solver.params.high[0] * 10 + 1
    with pytest.raises(ValueError, match=solver.params.names[0]):
        solver.solve(params, seeds)
