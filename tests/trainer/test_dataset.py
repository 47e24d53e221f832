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


def _rows(batches) -> list[tuple]:
    return [tuple(r) for b in batches for r in b[0].reshape(b[0].shape[0], -1).numpy()]


def test_data_parallel_epoch_covers_every_sample_once_across_ranks(tmp_path, monkeypatch) -> None:
    # Two ranks, six simulations: one epoch gives each rank three whole simulations, disjoint,
    # together every sample exactly once; read lazily, one chunk per window, never all in memory.
    x, _ = _write(tmp_path / "d.zarr", sims=6)
    ds = Dataset(tmp_path / "d.zarr")
    monkeypatch.setattr(Dataset, "arrays", lambda *a, **k: pytest.fail("epochs loaded the whole store"))
    shares = []
    for rank in range(2):
        it = ds.epochs(batch_size=3, seed=4, rank=rank, world=2, window_bytes=1)
        shares.append(_rows([next(it) for _ in range(3)]))  # 9 rows: this rank's epoch
        assert len(set(shares[-1])) == 9
        owned = {tuple(x[r]) for b in ds.epoch_order(0, 4, rank, 2) for r in range(3 * int(b), 3 * int(b) + 3)}
        assert set(shares[-1]) == owned
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(map(tuple, x))
    # the ranks deal out the same permutation, and the next epoch is another one
    assert sorted(np.concatenate([ds.epoch_order(1, 4, r, 2) for r in range(2)])) == list(range(6))
    orders = {tuple(np.concatenate([ds.epoch_order(e, 4, r, 2) for r in range(2)])) for e in range(8)}
    assert len(orders) > 1


def test_data_parallel_leftover_rows_wait_for_the_next_epoch(tmp_path) -> None:
    # 15 rows, batches of 4: nothing dropped, so 15 batches are exactly four passes over every sample.
    x, _ = _write(tmp_path / "d.zarr")
    ds = Dataset(tmp_path / "d.zarr")
    it = ds.epochs(batch_size=4, seed=2, window_bytes=1)
    counts: dict[tuple, int] = {}
    for r in _rows([next(it) for _ in range(15)]):
        counts[r] = counts.get(r, 0) + 1
    assert counts == {tuple(r): 4 for r in x}


def test_data_parallel_bad_rank_or_too_many_ranks_is_refused(tmp_path) -> None:
    _write(tmp_path / "d.zarr")
    ds = Dataset(tmp_path / "d.zarr")
    with pytest.raises(ValueError, match="rank 2 of world 2"):
        next(ds.epochs(batch_size=3, rank=2, world=2))
    with pytest.raises(DatasetError, match="5 chunks: too few to share among 6"):
        next(ds.epochs(batch_size=3, rank=0, world=6))


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
