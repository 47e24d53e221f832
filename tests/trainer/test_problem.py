"""The problem spec: how samples are formed from trajectories, and its card round trip."""

from __future__ import annotations

import numpy as np
import pytest

from solvers.base import ParamSpace
from trainer.problem import ProblemSpec

SPACE = ParamSpace(("a", "b"), (0.0, 10.0), (1.0, 20.0))
TIMES = (0.0, 0.5, 1.0, 1.5)


def _spec(**kw) -> ProblemSpec:
    return ProblemSpec(solver="toy", solver_config={}, params=SPACE, fields=("k", "u"), grid=(3, 4), times=TIMES, **kw)


def _traj(b: int) -> np.ndarray:
    # value = 1000*sim + 100*t + 10*channel: every entry says where it came from
    sim = np.arange(b)[:, None, None, None, None]
    t = np.arange(len(TIMES))[None, :, None, None, None]
    c = np.arange(2)[None, None, :, None, None]
    return (1000.0 * sim + 100.0 * t + 10.0 * c + np.zeros((1, 1, 1, 3, 4))).astype(np.float32)


def test_parametric_samples_every_step() -> None:
    spec = _spec(outputs=("u",))
    params = np.array([[0.5, 15.0], [1.0, 10.0]])
    x, y, sid, tix = spec.samples_from_trajectories(params, np.array([7, 9]), _traj(2))
    assert x.shape == (8, 4) and y.shape == (8, 12)
    # Samples come step by step, as the solver streams them: (t0: sims 7, 9), (t1: sims 7, 9), ...
    assert list(sid) == [7, 9] * 4 and list(tix) == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_allclose(x[2], [0.5, 0.5, 0.5 / 1.5, np.sqrt(0.5 / 1.5)], rtol=1e-6)
    assert y[3, 0] == 1000 + 100 * 1 + 10 * 1  # sim 1, t 1, channel u
    assert spec.in_shape == (4,) and spec.out_shape == (1, 3, 4)


def test_operator_final_pairs_input_step_with_output_step() -> None:
    spec = _spec(kind="operator", inputs=("k",), outputs=("u",), input_index=0, output_index=-1)
    params = np.array([[0.0, 10.0], [1.0, 20.0]])
    x, y, sid, tix = spec.samples_from_trajectories(params, np.array([3, 4]), _traj(2))
    assert x.shape == (2, 3 * 12) and y.shape == (2, 12)
    xs = x.reshape(2, 3, 3, 4)
    assert (xs[1, 0] == 1000).all()  # field k of sim 1 at t 0
    assert (xs[0, 1] == 0).all() and (xs[1, 2] == 1).all()  # parameters as constant channels in [0, 1]
    assert (y[0] == 300 + 10).all() and list(tix) == [3, 3] and list(sid) == [3, 4]
    assert spec.in_shape == (3, 3, 4) and spec.samples_per_simulation == 1


def test_operator_next_pairs_every_consecutive_step() -> None:
    spec = _spec(kind="operator", inputs=("u",), outputs=("u",), pairs="next")
    x, y, _, tix = spec.samples_from_trajectories(np.array([[0.0, 10.0]]), np.array([0]), _traj(1))
    assert list(tix) == [1, 2, 3]
    assert (x.reshape(3, 3, 3, 4)[:, 0, 0, 0] == [10, 110, 210]).all()
    assert (y.reshape(3, 3, 4)[:, 0, 0] == [110, 210, 310]).all()


def test_card_round_trip() -> None:
    for spec in (_spec(), _spec(kind="operator", inputs=("k",), pairs="next")):
        assert ProblemSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"kind": "sde"}, "problem.kind must be one of"),
        ({"kind": "operator", "inputs": ("q",)}, "unknown field(s) ['q']"),
        ({"inputs": ("k",)}, "a parametric problem takes parameters and time"),
        ({"kind": "operator", "inputs": ("k",), "output_index": 9}, "problem.output_index must lie in"),
        ({"kind": "operator", "inputs": ("k",), "input_index": 2, "output_index": 1}, "must not come before"),
    ],
)
def test_impossible_problems_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _spec(**kw)
