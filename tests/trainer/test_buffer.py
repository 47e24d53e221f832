"""Semantics of the FIFO / FIRO / Reservoir sample buffers (trainer/buffer.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import stats as sps

from trainer.buffer import (
    Buffer,
    BufferClosed,
    Chunk,
    FifoBuffer,
    FiroBuffer,
    PutTimeoutError,
    ReservoirBuffer,
    make_buffer,
)

DX, DY = 3, 5
SHORT = 0.1  # seconds a thread is given to (not) make progress


def chunk(start: int, k: int, sim: int = 0, dx: int = DX, dy: int = DY) -> Chunk:
    """Samples with t_index start..start+k-1 of simulation `sim`; x[:, 0] encodes the position."""
    pos = np.arange(start, start + k, dtype=np.float32)
    x = np.repeat(pos[:, None], dx, axis=1)
    x[:, -1] = sim
    y = np.repeat(pos[:, None] * 2, dy, axis=1)
    return Chunk(x=x, y=y, sim_id=np.full(k, sim, dtype=np.int64), t_index=np.arange(start, start + k, dtype=np.int64))


def ids(batch: tuple[np.ndarray, np.ndarray] | None) -> list[int]:
    assert batch is not None
    x, y = batch
    np.testing.assert_array_equal(y[:, 0], x[:, 0] * 2)  # x and y rows travel together
    return x[:, 0].astype(int).tolist()


def run_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run fn in a daemon thread; the returned dict receives 'result' or 'error'."""
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # reported to the test
            out["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, out


# ---------------------------------------------------------------- construction / validation


def test_make_buffer_policies() -> None:
    assert isinstance(make_buffer("fifo", 4, 0), FifoBuffer)
    assert isinstance(make_buffer("firo", 4, 0), FiroBuffer)
    assert isinstance(make_buffer("reservoir", 4, 0), ReservoirBuffer)
    assert isinstance(make_buffer("FIFO", 4, 0), Buffer)


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("lifo", 4, 0), "fifo"),  # message lists the allowed values
        (("fifo", 0, 0), "capacity"),
        (("fifo", -3, 0), "capacity"),
        (("fifo", 4, 5), "watermark"),
        (("fifo", 4, -1), "watermark"),
        (("fifo", 4.5, 0), "capacity"),
    ],
)
def test_bad_arguments_name_the_argument(args: tuple, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        make_buffer(*args)


def test_bad_capacity_bytes() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        make_buffer("fifo", 4, 0, capacity_bytes=0)


@pytest.mark.parametrize("policy", ["fifo", "firo", "reservoir"])
@pytest.mark.parametrize("field", ["x", "y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_chunk_rejected_entirely(policy: str, field: str, bad: float) -> None:
    buf = make_buffer(policy, 100, 0)
    c = chunk(0, 10)
    arr = getattr(c, field).copy()
    arr[7, 1] = bad
    c = Chunk(**{**c.__dict__, field: arr})
    with pytest.raises(ValueError, match="non-finite"):
        buf.put(c)
    s = buf.stats()
    assert len(buf) == 0 and s["received"] == 0 and s["duplicates"] == 0
    assert buf.received_by_sim() == {}
    # Nothing of it was remembered either: the clean chunk with the same keys goes in in full.
    assert buf.put(chunk(0, 10)) == 10


def test_wrong_dims_rejected() -> None:
    buf = make_buffer("fifo", 100, 0)
    buf.put(chunk(0, 4))
    with pytest.raises(ValueError, match=r"expected.*\(3, 5\).*got.*\(3, 6\)"):
        buf.put(chunk(4, 4, dy=6))
    with pytest.raises(ValueError, match="expected"):
        buf.put(chunk(4, 4, dx=2))
    assert len(buf) == 4 and buf.stats()["received"] == 4


def test_mismatched_k_and_bad_shapes_rejected() -> None:
    buf = make_buffer("firo", 100, 0)
    c = chunk(0, 5)
    with pytest.raises(ValueError, match="number of samples"):
        buf.put(Chunk(x=c.x, y=c.y[:4], sim_id=c.sim_id, t_index=c.t_index))
    with pytest.raises(ValueError, match="number of samples"):
        buf.put(Chunk(x=c.x, y=c.y, sim_id=c.sim_id, t_index=c.t_index[:3]))
    with pytest.raises(ValueError, match="2-D"):
        buf.put(Chunk(x=c.x[:, 0], y=c.y, sim_id=c.sim_id, t_index=c.t_index))
    with pytest.raises(ValueError, match="integer"):
        buf.put(Chunk(x=c.x, y=c.y, sim_id=c.sim_id.astype(float), t_index=c.t_index))
    assert len(buf) == 0 and buf.dims is None


def test_bad_batch_size() -> None:
    buf = make_buffer("fifo", 10, 0)
    buf.put(chunk(0, 3))
    with pytest.raises(ValueError, match="batch_size"):
        buf.get(0)


def test_float64_input_is_stored_as_float32() -> None:
    buf = make_buffer("fifo", 10, 0)
    c = chunk(0, 3)
    buf.put(Chunk(x=c.x.astype(np.float64), y=c.y.astype(np.float64), sim_id=c.sim_id, t_index=c.t_index))
    x, y = buf.get(3)
    assert x.dtype == np.float32 and y.dtype == np.float32 and x.shape == (3, DX) and y.shape == (3, DY)
    # float64 beyond float32 range would be inf in storage: rejected.
    big = c.x.astype(np.float64)
    big[0, 0] = 1e300
    with pytest.raises(ValueError, match="non-finite"):
        buf.put(Chunk(x=big, y=c.y, sim_id=c.sim_id, t_index=c.t_index + 10))


# ---------------------------------------------------------------- capacity_bytes


def test_capacity_bytes_caps_capacity_and_clamps_watermark() -> None:
    bps = 4 * (DX + DY)  # 32 bytes per sample
    # Half the byte budget holds samples, the other half is room for the rest of their chunks.
    buf = make_buffer("fifo", 100, 50, capacity_bytes=20 * bps + 7)
    assert buf.capacity == 100  # not known until the first chunk fixes the sample size
    assert buf.put(chunk(0, 10)) == 10
    s = buf.stats()
    assert s["capacity"] == 10 and s["capacity_requested"] == 100
    assert s["watermark"] == 10 and s["watermark_reached"]  # clamped, so training can start
    assert s["bytes_held"] == 10 * bps and s["bytes_per_sample"] == bps
    assert s["bytes_live"] == 10 * bps and s["chunks_live"] == 1
    with pytest.raises(TimeoutError):
        buf.put(chunk(10, 1), timeout=0)
    assert len(buf) == 10


def test_capacity_bytes_larger_than_capacity_keeps_capacity() -> None:
    buf = make_buffer("reservoir", 5, 0, capacity_bytes=10**6)
    buf.put(chunk(0, 20))
    assert buf.capacity == 5 and len(buf) == 5


def test_capacity_bytes_below_one_sample() -> None:
    buf = make_buffer("firo", 100, 0, capacity_bytes=40)
    with pytest.raises(ValueError, match="capacity_bytes"):
        buf.put(chunk(0, 2))
    assert len(buf) == 0


# ---------------------------------------------------------------- FIFO


def test_fifo_order_and_no_repeats() -> None:
    buf = make_buffer("fifo", 50, 0)
    out: list[int] = []
    nxt = 0
    rng = np.random.default_rng(0)
    # Interleave puts and gets of assorted sizes so the ring wraps around many times.
    while nxt < 1000 or len(buf):
        if nxt < 1000 and len(buf) < 50:
            k = int(min(rng.integers(1, 30), 50 - len(buf), 1000 - nxt))
            assert buf.put(chunk(nxt, k)) == k
            nxt += k
        assert len(buf) <= 50
        out += ids(buf.get(int(rng.integers(1, 40)), timeout=1))
    assert out == list(range(1000))
    s = buf.stats()
    assert s["consumed"] == 1000 and s["received"] == 1000 and s["held"] == 0 and s["evicted"] == 0


def test_fifo_returns_short_batch_and_copies() -> None:
    buf = make_buffer("fifo", 10, 0)
    buf.put(chunk(0, 3))
    x, y = buf.get(64)
    assert x.shape == (3, DX) and y.shape == (3, DY)
    assert x.flags.c_contiguous and y.flags.c_contiguous
    x[:] = -1  # must not affect the buffer
    buf.put(chunk(3, 10))
    assert ids(buf.get(10)) == list(range(3, 13))


def test_fifo_put_blocks_until_get_frees_space() -> None:
    buf = make_buffer("fifo", 4, 0)
    buf.put(chunk(0, 4))
    th, out = run_thread(buf.put, chunk(4, 2))
    th.join(SHORT)
    assert th.is_alive(), "put into a full FIFO must block"
    assert ids(buf.get(1)) == [0]
    th.join(SHORT)
    assert th.is_alive(), "one free slot: inserts one, still waits for the second"
    assert len(buf) == 4
    assert ids(buf.get(1)) == [1]
    th.join(2)
    assert not th.is_alive() and out == {"result": 2}
    assert ids(buf.get(10)) == [2, 3, 4, 5]


@pytest.mark.parametrize("policy", ["fifo", "firo"])
def test_put_timeout_inserts_what_fits_and_retry_is_idempotent(policy: str) -> None:
    buf = make_buffer(policy, 4, 0)
    buf.put(chunk(0, 3))
    with pytest.raises(TimeoutError) as ei:
        buf.put(chunk(3, 3), timeout=0.05)
    assert isinstance(ei.value, PutTimeoutError)
    assert ei.value.inserted == 1 and ei.value.remaining == 2
    assert len(buf) == 4 and buf.stats()["received"] == 4
    buf.get(4)
    # Retrying the same chunk inserts exactly the two that did not fit.
    assert buf.put(chunk(3, 3), timeout=0.05) == 2
    s = buf.stats()
    assert s["duplicates"] == 1 and s["received"] == 6
    assert buf.received_by_sim() == {0: 6}
    assert sorted(ids(buf.get(10))) == [4, 5]


@pytest.mark.parametrize("policy", ["fifo", "firo"])
def test_close_wakes_blocked_producer(policy: str) -> None:
    buf = make_buffer(policy, 2, 0)
    buf.put(chunk(0, 2))
    th, out = run_thread(buf.put, chunk(2, 3))
    th.join(SHORT)
    assert th.is_alive()
    buf.close()
    th.join(2)
    assert not th.is_alive()
    assert isinstance(out.get("error"), BufferClosed)
    with pytest.raises(BufferClosed):
        buf.put(chunk(10, 1))
    # The held samples are still drained after close, then end of stream.
    assert sorted(ids(buf.get(10))) == [0, 1]
    assert buf.get(10) is None


@pytest.mark.parametrize("policy", ["fifo", "firo", "reservoir"])
def test_close_wakes_blocked_consumer(policy: str) -> None:
    buf = make_buffer(policy, 4, 0)
    th, out = run_thread(buf.get, 2)
    th.join(SHORT)
    assert th.is_alive(), "get on an empty buffer must wait"
    buf.close()
    th.join(2)
    assert not th.is_alive() and out == {"result": None}
    assert buf.stats()["closed"]


# ---------------------------------------------------------------- watermark


@pytest.mark.parametrize("policy", ["fifo", "firo", "reservoir"])
def test_watermark_gates_first_get(policy: str) -> None:
    buf = make_buffer(policy, 20, 10)
    buf.put(chunk(0, 5))
    with pytest.raises(TimeoutError):
        buf.get(4, timeout=0.05)
    assert not buf.stats()["watermark_reached"]
    th, out = run_thread(buf.get, 4, timeout=5)
    th.join(SHORT)
    assert th.is_alive(), "below the watermark get must wait"
    buf.put(chunk(5, 5))  # reaches the watermark
    th.join(2)
    assert not th.is_alive() and len(ids(out["result"])) == 4
    assert buf.stats()["watermark_reached"]


@pytest.mark.parametrize("policy", ["fifo", "firo"])
def test_watermark_reached_once_keeps_training_going(policy: str) -> None:
    buf = make_buffer(policy, 20, 10)
    buf.put(chunk(0, 10))
    got = ids(buf.get(4)) + ids(buf.get(4))  # 2 left, below watermark: still served
    got += ids(buf.get(4))
    assert sorted(got) == list(range(10))
    buf.put(chunk(10, 1))  # far below watermark
    assert ids(buf.get(4, timeout=0.5)) == [10]
    with pytest.raises(TimeoutError):
        buf.get(4, timeout=0.05)  # empty and open: waits for data, then times out


def test_close_before_watermark_releases_what_there_is() -> None:
    buf = make_buffer("fifo", 20, 10)
    buf.put(chunk(0, 3))
    buf.close()
    assert ids(buf.get(8, timeout=0.5)) == [0, 1, 2]
    assert buf.get(8, timeout=0.5) is None


# ---------------------------------------------------------------- FIRO


def test_firo_every_sample_exactly_once_in_random_order() -> None:
    n = 1000
    buf = make_buffer("firo", n, 0, seed=1)
    buf.put(chunk(0, n))
    out: list[int] = []
    while len(buf):
        out += ids(buf.get(64))
    assert len(out) == n and set(out) == set(range(n))
    assert out != sorted(out)
    tau = sps.kendalltau(np.arange(n), out).statistic
    assert abs(tau) < 0.1, f"FIRO output correlates with insertion order (tau={tau:.3f})"
    buf.close()
    assert buf.get(64) is None


def test_firo_removal_is_uniform_over_held() -> None:
    # First batch of 100 from 1000 held: the mean position must be near 499.5 (sd ~ 27.5).
    means = []
    for seed in range(20):
        buf = make_buffer("firo", 1000, 0, seed=seed)
        buf.put(chunk(0, 1000))
        means.append(np.mean(ids(buf.get(100))))
    assert abs(np.mean(means) - 499.5) < 30  # sd of the mean of 20 ~ 6.2


def test_firo_interleaved_with_puts_keeps_exactly_once() -> None:
    buf = make_buffer("firo", 64, 0, seed=3)
    out: list[int] = []
    for start in range(0, 2000, 40):
        buf.put(chunk(start, 40), timeout=1)
        out += ids(buf.get(40))
    buf.close()
    while (b := buf.get(50)) is not None:
        out += ids(b)
    assert sorted(out) == list(range(2000))


def test_firo_seen_counts_one_at_removal() -> None:
    buf = make_buffer("firo", 10, 0)
    buf.put(chunk(0, 10))
    buf.get(4)
    s = buf.stats()
    assert s["seen_max"] == 0 and s["consumed"] == 4 and s["samples_seen_total"] == 4
    assert buf._seen is not None and buf._seen.sum() == 4  # each removed slot was returned once


# ---------------------------------------------------------------- Reservoir


def test_reservoir_never_blocks_and_holds_at_most_capacity() -> None:
    buf = make_buffer("reservoir", 100, 0, seed=0)
    total = 0
    for start in range(0, 2000, 250):
        total += buf.put(chunk(start, 250), timeout=0)  # would raise if it tried to wait
        assert len(buf) <= 100
    assert total == 2000
    s = buf.stats()
    assert s["held"] == 100 and s["received"] == 2000 and s["evicted"] == 1900
    x, _ = buf.get(100)
    assert len(set(x[:, 0].astype(int).tolist())) == 100  # without replacement within a call


def reservoir_contents(seed: int, n: int, cap: int, chunk_size: int) -> np.ndarray:
    buf = make_buffer("reservoir", cap, 0, seed=seed)
    for start in range(0, n, chunk_size):
        buf.put(chunk(start, min(chunk_size, n - start)))
    x, _ = buf.get(cap)  # all held samples, each once
    return x[:, 0].astype(int)


def bucket_chisquare(positions: np.ndarray, n: int, n_buckets: int = 10) -> float:
    counts = np.bincount(positions * n_buckets // n, minlength=n_buckets)
    return float(sps.chisquare(counts).pvalue)


def test_reservoir_is_uniform_sample_of_stream() -> None:
    n, cap, reps = 2000, 100, 300
    # Chunk sizes exercise the fill phase, many chunks, and a whole stream in one chunk
    # (many rows of one chunk hitting the same slot: the later must win).
    held = [reservoir_contents(seed, n, cap, (13, 50, n)[seed % 3]) for seed in range(reps)]
    positions = np.concatenate(held)
    assert positions.size == reps * cap
    assert all(np.unique(h).size == cap for h in held)
    p = bucket_chisquare(positions, n)
    assert p > 1e-3, f"reservoir inclusion frequency not uniform over stream position (p={p:.2e})"
    # The test has power: a naive "always replace a random slot" buffer fails it.
    rng = np.random.default_rng(0)
    naive = np.tile(np.arange(cap), (reps, 1))  # one row per repetition
    for i in range(cap, n):
        naive[np.arange(reps), rng.integers(cap, size=reps)] = i
    assert bucket_chisquare(naive.ravel(), n) < 1e-6


def test_reservoir_with_single_sample_puts_matches_algorithm_r_marginals() -> None:
    # Item i (1-based) survives with probability cap/n for every i; check first vs last quarter.
    n, cap, reps = 200, 20, 150
    first_q = last_q = 0
    for seed in range(reps):
        pos = reservoir_contents(seed, n, cap, 1)
        first_q += int((pos < n // 4).sum())
        last_q += int((pos >= 3 * n // 4).sum())
    expected = reps * cap / 4  # 750, sd ~ 24
    assert abs(first_q - expected) < 120 and abs(last_q - expected) < 120


def test_reservoir_seen_counts_grow_with_repeated_gets() -> None:
    buf = make_buffer("reservoir", 10, 0, seed=0)
    buf.put(chunk(0, 10))
    for _ in range(5):
        assert sorted(ids(buf.get(10))) == list(range(10))  # no removal: same set every time
    s = buf.stats()
    assert s["seen_mean"] == 5.0 and s["seen_max"] == 5 and s["consumed"] == 50
    for _ in range(7):
        buf.get(3)
    s = buf.stats()
    assert s["consumed"] == 71 and s["samples_seen_total"] == 71
    assert s["seen_mean"] == pytest.approx(7.1) and len(buf) == 10


def test_reservoir_small_fill_returns_full_batch() -> None:
    buf = make_buffer("reservoir", 100, 0)
    buf.put(chunk(0, 3))
    x, y = buf.get(16)
    assert x.shape == (16, DX) and y.shape == (16, DY)
    assert set(x[:, 0].astype(int).tolist()) <= {0, 1, 2}
    assert buf.stats()["seen_mean"] == pytest.approx(16 / 3)
    buf.close()
    assert buf.get(4) is not None  # closed but not empty: keeps sampling
    with pytest.raises(BufferClosed):
        buf.put(chunk(3, 1))


def test_reservoir_replaced_samples_reset_seen_count() -> None:
    buf = make_buffer("reservoir", 5, 0, seed=0)
    buf.put(chunk(0, 5))
    for _ in range(4):
        buf.get(5)
    buf.put(chunk(5, 2000))  # almost surely replaces every slot
    assert buf.stats()["seen_max"] == 0


# ---------------------------------------------------------------- dedup


@pytest.mark.parametrize("policy", ["fifo", "firo", "reservoir"])
def test_duplicates_dropped_and_counted(policy: str) -> None:
    buf = make_buffer(policy, 1000, 0)
    assert buf.put(chunk(0, 10, sim=0)) == 10
    assert buf.put(chunk(5, 10, sim=0)) == 5  # t 5..9 already received
    assert buf.put(chunk(0, 10, sim=1)) == 10  # other simulation: new keys
    # Duplicates inside one chunk: only the first occurrence counts.
    c = chunk(20, 3, sim=0)
    twice = Chunk(*(np.concatenate([a, a]) for a in (c.x, c.y, c.sim_id, c.t_index)))
    assert buf.put(twice) == 3
    s = buf.stats()
    assert s["duplicates"] == 5 + 3 and s["received"] == 28 and len(buf) == 28
    assert buf.received_by_sim() == {0: 18, 1: 10}
    # Memory outlives the samples: after draining, a re-sent simulation is still dropped.
    buf.get(1000)
    assert buf.put(chunk(0, 10, sim=1)) == 0
    assert buf.stats()["duplicates"] == 18 and buf.received_by_sim() == {0: 18, 1: 10}


def test_dedup_mixed_sims_in_one_chunk() -> None:
    buf = make_buffer("fifo", 1000, 0)
    buf.put(chunk(0, 4, sim=7))
    rng = np.random.default_rng(0)
    sims = rng.integers(5, 9, size=200)
    ts = rng.integers(0, 30, size=200)
    c = Chunk(x=np.zeros((200, DX), np.float32), y=np.zeros((200, DY), np.float32), sim_id=sims, t_index=ts)
    keys = set(zip(sims.tolist(), ts.tolist(), strict=True)) - {(7, t) for t in range(4)}
    assert buf.put(c) == len(keys)
    expect: dict[int, int] = {7: 4}
    for s, _ in keys:
        expect[s] = expect.get(s, 0) + 1
    assert buf.received_by_sim() == expect
    assert buf.stats()["duplicates"] == 200 - len(keys)


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize("policy", ["fifo", "firo"])
def test_concurrent_producers_and_consumers_lose_nothing(policy: str) -> None:
    buf = make_buffer(policy, 64, 16, seed=0)
    n_prod, per_prod = 4, 500
    results: list[list[int]] = [[] for _ in range(2)]

    def produce(sim: int) -> None:
        for start in range(0, per_prod, 25):
            buf.put(chunk(sim * per_prod + start, 25, sim=sim), timeout=5)
        # A crashed-and-restarted producer re-sends everything: all duplicates.
        buf.put(chunk(sim * per_prod, per_prod, sim=sim), timeout=5)

    def consume(i: int) -> None:
        while (b := buf.get(32, timeout=5)) is not None:
            results[i] += ids(b)

    producers = [threading.Thread(target=produce, args=(s,)) for s in range(n_prod)]
    consumers = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for th in producers + consumers:
        th.start()
    for th in producers:
        th.join(10)
    buf.close()
    for th in consumers:
        th.join(10)
    assert not any(th.is_alive() for th in producers + consumers)
    out = results[0] + results[1]
    assert sorted(out) == list(range(n_prod * per_prod))
    s = buf.stats()
    assert s["received"] == s["consumed"] == n_prod * per_prod and s["duplicates"] == n_prod * per_prod
    assert buf.received_by_sim() == {s: per_prod for s in range(n_prod)}
    assert s["held"] == 0
