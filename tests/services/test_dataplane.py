"""The data plane on a real local Ray: shards per trainer rank, references only, data-parallel training that agrees.

Tests whose names contain ``data_parallel`` run ``training.workers: 2`` on CPU (gloo):
``pytest -k data_parallel`` runs them all.
"""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest
import ray

import solvers
from services.config import parse_config
from services.sampling import Sampler, simulation_seeds
from services.study import Study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

STEPS = 20  # recorded steps per simulation -> 21 samples each


def _config(**over) -> dict:
    base = {
        "name": "dp",
        "problem": {"config": {"n": 16, "steps": STEPS, "dt": 0.005}},
        "simulations": 120,
        "solvers": {"actors": 2, "sims_per_call": 4, "chunk_steps": 5},
        "buffer": {"policy": "fifo", "capacity": 1000, "watermark": 200},
        "training": {
            "model": "mlp",
            "arch": {"hidden": 32, "layers": 2},
            "batch_size": 16,
            "steps": 100_000,  # the FIFO stream ends first
            "lr": 2e-3,
            "validate_every": 25,
            "validation_simulations": 3,
            "workers": 2,
        },
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return base


def _run(cfg: dict, store, record_keys: bool = False, timeout: float = 300) -> Study:
    study = Study(parse_config(cfg), store)
    study.record_keys = record_keys
    study.start()
    assert study.join(timeout), "study did not finish in time"
    return study


def _plasma() -> tuple[float, int]:
    """(MiB, objects) in the object store of the local node."""
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", memory_summary(stats_only=True))
    assert m, "no plasma figures in Ray's memory summary"
    return float(m.group(1)), int(m.group(2))


def _keys(state: dict) -> set[tuple[int, int]]:
    k = state["keys"]
    return set(zip(k[0].tolist(), k[1].tolist(), strict=True))


@pytest.mark.parametrize("policy", ["fifo", "firo"])
def test_data_parallel_no_sample_reaches_two_ranks_and_the_ranks_agree(tmp_path, policy: str) -> None:
    study = _run(_config(buffer={"policy": policy}), tmp_path, record_keys=True)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    ranks = study.rank_states
    assert sorted(ranks) == [0, 1]
    a, b = ranks[0], ranks[1]
    # Both ranks took the same steps and end with the same weights and the same normaliser.
    assert a["steps"] == b["steps"] > 0
    assert a["digest"] == b["digest"]
    assert a["normalisation"] == b["normalisation"]
    # Each sample reached one rank at most, and once; the count is exact.
    ka, kb = _keys(a), _keys(b)
    assert len(ka) == a["keys"].shape[1] and len(kb) == b["keys"].shape[1]
    assert not ka & kb
    assert a["samples_seen"] == b["samples_seen"] == len(ka) + len(kb) == snap["training"]["samples_seen"]
    # Every call fed both shards (its chunks rotate over them), so that neither rank can starve.
    parts = ray.get([s.received_by_sim.remote() for s in study.shards])
    assert set(parts[0]) == set(parts[1]) == set(range(120))
    assert all(parts[0][i] + parts[1][i] == STEPS + 1 for i in range(120))
    study.release()


def test_data_parallel_normaliser_is_the_union_statistics_of_every_ranks_batches(tmp_path) -> None:
    # A stream longer than training: both ranks train exactly `steps` batches, all of them normalising.
    steps = 30
    cfg = _config(
        simulations=400,
        buffer={"policy": "firo"},
        training={"steps": steps, "norm_steps": steps, "validate_every": steps},
    )
    study = _run(cfg, tmp_path, record_keys=True)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    a, b = study.rank_states[0], study.rank_states[1]
    assert a["normalisation"] == b["normalisation"]
    assert a["digest"] == b["digest"]
    keys = sorted(_keys(a) | _keys(b))
    assert len(keys) == a["samples_seen"] == 2 * steps * 16
    # The samples both ranks trained on, solved again from their ids (same parameters and seeds).
    spec = study.spec
    sims = np.array(sorted({s for s, _ in keys}), dtype=np.int64)
    params = Sampler(spec.params, "uniform", 0).draw(int(sims.max()) + 1)[sims]
    solver = solvers.get(spec.solver, **spec.solver_config)
    traj = solver.solve(params, simulation_seeds(0, sims))
    _, y, sid, tix = spec.samples_from_trajectories(params, sims, traj)
    row = {(int(s), int(t)): i for i, (s, t) in enumerate(zip(sid, tix, strict=True))}
    ys = y[[row[k] for k in keys]].astype(np.float64)
    assert a["normalisation"]["y_mean"] == pytest.approx(ys.mean(), rel=1e-6)
    assert a["normalisation"]["y_std"] == pytest.approx(ys.std(), rel=1e-5)
    study.release()


def test_data_parallel_exactly_once_across_shards_with_a_solver_killed_mid_call(tmp_path) -> None:
    cfg = _config(
        name="kill",
        simulations=96,
        problem={"config": {"n": 48, "steps": STEPS, "dt": 0.005}},
        solvers={"actors": 2, "sims_per_call": 8, "chunk_steps": 1},
        buffer={"capacity": 400, "watermark": 100},
    )
    study = Study(parse_config(cfg), tmp_path).start()
    deadline = time.time() + 120
    while time.time() < deadline and study.snapshot()["samples"]["received"] < 150:
        time.sleep(0.05)
    pid = ray.get(study.actors[0].pid.remote(), timeout=120)
    os.kill(pid, signal.SIGKILL)  # dies mid-call; Ray restarts it and re-runs that call
    assert study.join(300)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    assert snap["simulations"]["done"] == 96 and snap["simulations"]["failed"] == 0
    got = study.received_by_sim()
    assert sorted(got) == list(range(96))
    assert set(got.values()) == {STEPS + 1}
    assert snap["samples"]["received"] == 96 * (STEPS + 1)
    assert snap["samples"]["consumed"] == 96 * (STEPS + 1)
    study.release()


def test_chunks_are_released_and_the_object_store_returns_to_its_baseline(tmp_path) -> None:
    mib0, objects0 = _plasma()
    cfg = _config(
        name="release",
        simulations=60,
        problem={"config": {"n": 32, "steps": STEPS, "dt": 0.005}},
        buffer={"policy": "reservoir", "capacity": 300, "watermark": 100},
        training={"steps": 80, "workers": 1},
    )
    study = _run(cfg, tmp_path)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    st = ray.get(study.shards[0].stats.remote())
    assert st["chunks_live"] == 0 and st["bytes_live"] == 0  # the study let go of every chunk
    assert st["chunks_released"] > 0
    study.release()
    deadline = time.time() + 30
    while time.time() < deadline and _plasma()[1] > objects0:
        time.sleep(0.5)
    mib, objects = _plasma()
    assert objects <= objects0 and mib <= mib0 + 1


@ray.remote
def _raises() -> None:
    raise RuntimeError("the solver's process died")


def test_a_stream_cut_short_puts_no_chunk_in_place_of_its_error() -> None:
    # When a solver's process dies, Ray ends its stream with one more reference holding the error,
    # which may come where a chunk is due. Put as a chunk, it would stand in the shard for samples
    # never sent, and the shard would drop them as duplicates when the simulation runs again.
    from services.actors import BufferShard
    from services.dataplane import chunk_keys, forward_chunks

    shard = BufferShard.options(num_cpus=0).remote("fifo", 1000, 1)
    chunks = [
        (np.full((3, 2), c, np.float32), np.full((3, 4), c, np.float32), np.full(3, c), np.arange(3)) for c in range(3)
    ]
    heads = [ray.put((0, *chunk_keys(*c))) for c in chunks]
    error = _raises.remote()
    try:
        # Two chunks, the third chunk's head, then the error where its chunk is due.
        stream = [heads[0], ray.put(chunks[0]), heads[1], ray.put(chunks[1]), heads[2], error]
        assert list(forward_chunks(iter(stream), [shard])) == [3, 3]
        # The third chunk was never put: sent again by a re-run, it is taken; the first two are
        # held, so a re-run's copies of them are dropped.
        assert ray.get(shard.put.remote([ray.put(chunks[2])], chunk_keys(*chunks[2]))) == (3, 3)
        assert ray.get(shard.put.remote([ray.put(chunks[0])], chunk_keys(*chunks[0]))) == (3, 0)
        # A stream that stops after a chunk, with no head after it, puts nothing of that chunk.
        fresh = (np.full((3, 2), 9, np.float32), np.full((3, 4), 9, np.float32), np.full(3, 9), np.arange(3))
        assert list(forward_chunks(iter([ray.put((0, *chunk_keys(*fresh))), ray.put(fresh)]), [shard])) == []
        assert ray.get(shard.put.remote([ray.put(fresh)], chunk_keys(*fresh))) == (3, 3)
        # An error where a head is due is raised to the caller, after the chunks before it.
        with pytest.raises(ray.exceptions.RayTaskError):
            list(forward_chunks(iter([error, ray.put(chunks[0])]), [shard]))
    finally:
        ray.kill(shard)


def test_a_rank_keeps_views_of_its_chunks_bounded_and_lets_go_at_the_end() -> None:
    # A trainer rank caches zero-copy views of the chunks it draws from (so a chunk is fetched once,
    # not once per batch); the views keep chunks in the object store, so the cache must stay within
    # its byte bound while it runs and be empty once the stream ends.
    import torch

    from services.actors import BufferShard
    from services.dataplane import ShardBatches, ShardRouter

    objects0 = _plasma()[1]
    dy, rows = 2048, 50  # 400 KB chunks
    shard = BufferShard.options(num_cpus=0).remote("fifo", 10_000, 1)
    router = ShardRouter([shard])
    for c in range(40):
        x = np.full((rows, 2), c, np.float32)
        y = np.repeat(np.arange(rows, dtype=np.float32)[:, None] + 1000 * c, dy, axis=1)
        router.put(x, y, np.full(rows, c), np.arange(rows))
    ray.get(shard.close.remote())
    bound = 3 * rows * 4 * (2 + dy)  # three chunks
    feed = ShardBatches(shard, 20, torch.device("cpu"), (2,), (dy,), view_cache_bytes=bound)
    seen, peak = [], 0
    for b in feed:
        if b is None:
            break
        seen.extend(b[1][:, 0].tolist())
        peak = max(peak, feed._cache_bytes)
    assert sorted(seen) == sorted(float(r + 1000 * c) for c in range(40) for r in range(rows))  # each once
    assert 0 < peak <= bound + 2 * rows * 4 * (2 + dy)  # the bound, plus the chunks of the call in hand
    feed._thread.join(10)
    assert not feed._cache and feed._cache_bytes == 0
    ray.kill(shard)
    del router
    deadline = time.time() + 30
    while time.time() < deadline and _plasma()[1] > objects0:
        time.sleep(0.5)
    assert _plasma()[1] <= objects0


def test_data_parallel_offline_epoch_covers_the_store_once_across_ranks(tmp_path) -> None:
    # Two ranks on a stored dataset: in the first epoch each stored sample reaches exactly one rank,
    # once; the ranks end in agreement, and samples_seen counts both.
    from services.datasets import build_dataset

    base = _config(name="offline-dp", simulations=12)
    data = build_dataset(parse_config(base), 12, tmp_path / "train.zarr")  # 12 x 21 = 252 samples
    steps = 7  # 7 steps x 16 rows x 2 ranks = 224 rows: inside the first epoch of 126 rows per rank
    cfg = {**base, "dataset": str(data), "training": {**base["training"], "steps": steps, "validate_every": steps}}
    study = _run(cfg, tmp_path / "store", record_keys=True)
    snap = study.snapshot()
    assert snap["state"] == "finished", snap["error"]
    a, b = study.rank_states[0], study.rank_states[1]
    assert a["steps"] == b["steps"] == steps and a["digest"] == b["digest"]
    ka, kb = _keys(a), _keys(b)
    assert len(ka) == len(kb) == steps * 16  # no sample twice on a rank
    assert not ka & kb  # nor on both
    # Each rank drew from whole simulations of its own share.
    assert not {s for s, _ in ka} & {s for s, _ in kb}
    assert a["samples_seen"] == 2 * steps * 16 == snap["training"]["samples_seen"]
    study.release()
