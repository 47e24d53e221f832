"""zarr datasets: round trip, attributes, and clear errors for stores that cannot be used."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from solvers.base import ParamSpace
from trainer.dataset import Dataset, DatasetError, DatasetWriter
from trainer.problem import ProblemSpec

SPEC = ProblemSpec(
    solver="toy",
    solver_config={"n": 4},
    params=ParamSpace(("a",), (0.0,), (1.0,)),
    fields=("u",),
    grid=(4, 3),
    times=(0.0, 0.5, 1.0),
)


def _write(path, sims: int = 5, close: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w = DatasetWriter(path, SPEC, sims, extra={"sampler": {"kind": "uniform", "seed": 3}})
    xs, ys = [], []
    for s in range(sims):
        traj = rng.standard_normal((1, 3, 1, 4, 3)).astype(np.float32)
        x, y, sid, tix = SPEC.samples_from_trajectories(rng.random((1, 1)), np.array([s]), traj)
        w.write(x, y, sid, tix)
        xs.append(x)
        ys.append(y)
        if not close and s == sims - 2:
            return np.concatenate(xs), np.concatenate(ys)
    w.close()
    return np.concatenate(xs), np.concatenate(ys)


def test_round_trip_is_identical_and_keeps_attributes(tmp_path) -> None:
    x, y = _write(tmp_path / "d.zarr")
    ds = Dataset(tmp_path / "d.zarr")
    assert len(ds) == 15 and ds.simulations == 5
    gx, gy = ds.arrays()
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
    assert ds.spec == SPEC
    assert ds.attrs["sampler"] == {"kind": "uniform", "seed": 3}
    assert list(ds.sim_id[:6]) == [0, 0, 0, 1, 1, 1]
    # chunked by simulation: one chunk holds one simulation's samples
    assert ds.x.chunks[0] == SPEC.samples_per_simulation


def test_epochs_cycle_over_every_sample(tmp_path) -> None:
    x, _ = _write(tmp_path / "d.zarr")
    ds = Dataset(tmp_path / "d.zarr")
    it = ds.epochs(batch_size=5, seed=1)
    seen = np.concatenate([next(it)[0].reshape(5, -1).numpy() for _ in range(3)])  # one epoch: 15 samples
    assert sorted(map(tuple, seen)) == sorted(map(tuple, x))
    more = next(it)[0]
    assert more.shape == (5, *SPEC.in_shape)  # and on into the next epoch


def test_a_batch_larger_than_the_dataset_is_refused(tmp_path) -> None:
    # Epochs hold whole batches only: 16 of 15 samples could never be drawn (a silent endless loop before).
    _write(tmp_path / "d.zarr")
    ds = Dataset(tmp_path / "d.zarr")
    with pytest.raises(DatasetError, match="holds 15 samples: no batch of 16"):
        next(ds.epochs(batch_size=16))
    assert next(ds.epochs(batch_size=15))[0].shape == (15, *SPEC.in_shape)


def test_truncated_store_is_refused(tmp_path) -> None:
    _write(tmp_path / "t.zarr", close=False)
    with pytest.raises(DatasetError, match="incomplete"):
        Dataset(tmp_path / "t.zarr")


def test_writer_refuses_to_mark_a_short_store_complete(tmp_path) -> None:
    w = DatasetWriter(tmp_path / "s.zarr", SPEC, 2)
    with pytest.raises(ValueError, match="wrote 0 of 6 samples"):
        w.close()


def test_foreign_and_missing_stores_are_refused(tmp_path) -> None:
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    g.create_array("x", shape=(2,), dtype="float32")
    with pytest.raises(DatasetError, match="not a Surge dataset"):
        Dataset(tmp_path / "f.zarr")
    with pytest.raises(DatasetError, match="no dataset at"):
        Dataset(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError):
        Dataset(tmp_path / "plain")


def test_other_problem_is_incompatible(tmp_path) -> None:
    import dataclasses

    _write(tmp_path / "d.zarr")
    ds = Dataset(tmp_path / "d.zarr")
    ds.check_compatible(SPEC)
    with pytest.raises(DatasetError, match="differs in grid"):
        ds.check_compatible(dataclasses.replace(SPEC, grid=(4, 4)))
