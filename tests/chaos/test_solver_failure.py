"""Chaos: solvers that kill their process (``os.abort()``) or diverge (NaN) for a region of the box.

Each such simulation is tried ``solvers.max_attempts`` times (crash) or once (NaN), then given up and
replaced by a fresh draw: the study completes its budget of done simulations, counts the failures,
and re-runs no completed simulation. Too many failures stop the study with an error naming them.
"""

from __future__ import annotations

import pytest

from services.config import parse_config
from services.sampling import Sampler
from services.study import Study
from tests.chaos.faulty import ABORT_ABOVE, NAN_ABOVE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

STEPS = 6  # recorded steps per simulation: STEPS + 1 samples each
BUDGET = 24


def _config(solver: str, **over: object) -> dict:
    cfg = {
        "name": "faulty",
        "problem": {"solver": solver, "config": {"n": 16, "steps": STEPS, "dt": 0.01}},
        "simulations": BUDGET,
        "sampler": {"seed": 3},
        "solvers": {"actors": 1, "sims_per_call": 4, "chunk_steps": 1, "max_attempts": 2},
        "buffer": {"policy": "fifo", "capacity": 400, "watermark": 20},
        "training": {
            "arch": {"hidden": 16, "layers": 1},
            "batch_size": 8,
            "steps": 100_000,  # the stream ends first
            "validate_every": 50,
            "validation_simulations": 2,
            "threads": 1,
        },
    }
    cfg.update(over)
    return cfg


def _bad_ids(n: int, threshold: float) -> set[int]:
    """Which of the first ``n`` simulation ids fall in the faulty region (the study's draws, replayed)."""
    spec = parse_config(_config("heat2d")).problem.spec()
    params = Sampler(spec.params, "uniform", 3).draw(n)
    return {i for i in range(n) if params[i, 0] > threshold}


@pytest.mark.parametrize(
    ("solver", "threshold", "attempts"),
    [("tests.chaos.faulty:AbortingHeat2D", ABORT_ABOVE, 2), ("tests.chaos.faulty:DivergingHeat2D", NAN_ABOVE, 1)],
    ids=["abort", "nan"],
)
def test_failing_simulations_are_retried_a_bounded_number_of_times_and_replaced(
    tmp_path, solver, threshold, attempts
) -> None:
    study = Study(parse_config(_config(solver)), tmp_path).start()
    assert study.join(300), "study did not finish in time"
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    sims = snap["simulations"]
    handed = study.ids.handed_out
    bad = _bad_ids(handed, threshold)
    assert bad, "the seed must put some simulations in the faulty region"
    # Every simulation in the region was given up, after its attempts; each was replaced by a fresh draw.
    assert sims["failed"] == len(bad) and sims["done"] == BUDGET
    assert handed == BUDGET + len(bad)
    done = study.done_ids
    assert len(done) == len(set(done)) == BUDGET  # no completed simulation ran to completion twice
    assert set(done) == set(range(handed)) - bad
    # Re-run attempts: a crash re-runs its whole call (each simulation alone), a NaN is not re-run.
    if attempts > 1:
        assert sims["retried"] >= len(bad) * (attempts - 1)
    else:
        assert sims["retried"] == 0
    # Every done simulation arrived whole, once; nothing reached the trainer twice (FIFO).
    got = study.received_by_sim()
    assert all(got[i] == STEPS + 1 for i in done)
    assert snap["samples"]["consumed"] == snap["samples"]["received"] == sum(got.values())
    if attempts == 1:  # a diverged simulation's non-finite steps never left the solver
        assert all(got.get(i, 0) < STEPS + 1 for i in bad)
    study.release()


def test_a_study_whose_failures_pass_the_limit_stops_naming_the_cause(tmp_path) -> None:
    cfg = _config(
        "tests.chaos.faulty:DivergingHeat2D",
        problem={
            "solver": "tests.chaos.faulty:DivergingHeat2D",
            "config": {"n": 16, "steps": STEPS, "dt": 0.01},
            "bounds": {"u0": (NAN_ABOVE - 50, 500.0)},  # about half the simulations diverge
        },
    )
    cfg["solvers"] = {**cfg["solvers"], "max_failure_fraction": 0.1}
    study = Study(parse_config(cfg), tmp_path).start()
    assert study.join(300), "study did not stop in time"
    snap = study.snapshot()
    assert snap["state"] == "failed"
    assert "solvers.max_failure_fraction = 0.1" in snap["error"] and "not finite" in snap["error"], snap["error"]
    study.release()
