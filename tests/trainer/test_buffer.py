"""Semantics of the FIFO / FIRO / Reservoir sample buffers (trainer/buffer.py)."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from trainer.buffer import (
    POLICIES,
    Batch,
    Buffer,
    BufferClosed,
    Chunk,
    FifoBuffer,
    FiroBuffer,
    PutTimeoutError,
    ReservoirBuffer,
    assemble,
    compact_arrays,
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


BPS = 4 * (DX + DY)  # bytes per sample


def keyed_chunk(t_index: Sequence[int], sim: int = 0) -> Chunk:
    """Samples with the given t_index values (in that order, repeats allowed) of simulation `sim`."""
    t = np.asarray(t_index, dtype=np.int64)
    x = np.repeat(t.astype(np.float32)[:, None], DX, axis=1)
    x[:, -1] = sim
    y = np.repeat(t.astype(np.float32)[:, None] * 2, DY, axis=1)
    return Chunk(x=x, y=y, sim_id=np.full(t.size, sim, dtype=np.int64), t_index=t)


def check_assembled(batch: Batch, arrays: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[int]:
    """Assemble `batch` from `arrays` and check every row holds the sample its keys name; return its t_index."""
    x, y = assemble(batch, arrays)
    assert x.shape == (len(batch), DX) and y.shape == (len(batch), DY)
    np.testing.assert_array_equal(x[:, 0], batch.t_index)
    np.testing.assert_array_equal(x[:, -1], batch.sim_id)
    np.testing.assert_array_equal(y, np.repeat(batch.t_index[:, None] * 2.0, DY, axis=1))
    return batch.t_index.tolist()


class Token:
    """An opaque payload (stands for an object-store reference): no arrays, weak-referenceable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Token({self.name!r})"


class Store:
    """Where the chunks behind `Token` payloads live: name -> (x, y). It never holds a token itself.

    `refs` has a weak reference to every token it made (chunks put and chunks built by `compact`),
    so a test can tell which payloads something still keeps alive.
    """

    def __init__(self) -> None:
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.nbytes: dict[str, int] = {}
        self.refs: dict[str, weakref.ref[Token]] = {}
        self.compactions = 0

    def _new(self, name: str, x: np.ndarray, y: np.ndarray) -> Token:
        assert name not in self.arrays
        tok = Token(name)
        self.arrays[name] = (x, y)
        self.nbytes[name] = x.nbytes + y.nbytes
        self.refs[name] = weakref.ref(tok)
        return tok

    def put(self, buf: Buffer, c: Chunk, name: str, timeout: float | None = None) -> int:
        """Write `c` here and hand `buf` a token for it (dropped on return: `buf` holds the only reference)."""
        tok = self._new(name, c.x, c.y)
        return buf.put_ref(tok, c.sim_id, c.t_index, self.nbytes[name], (c.x.shape[1], c.y.shape[1]), timeout)

    def compact(self, segments: Sequence[tuple[Any, np.ndarray]]) -> Token:
        """A `compact` callable for token payloads: the held rows, written as one new chunk."""
        assert segments and all(isinstance(p, Token) for p, _ in segments)
        self.compactions += 1
        x = np.concatenate([self.arrays[p.name][0][r] for p, r in segments])
        y = np.concatenate([self.arrays[p.name][1][r] for p, r in segments])
        return self._new(f"compact{self.compactions}", x, y)

    def alive(self, collect: bool = True) -> set[str]:
        """Names of the tokens something still refers to (after a full collection unless `collect` is false:
        tokens are in no reference cycle, so one let go of is freed at once)."""
        if collect:
            gc.collect()
        return {n for n, r in self.refs.items() if r() is not None}

    def arrays_of(self, batch: Batch) -> list[tuple[np.ndarray, np.ndarray]]:
        assert all(isinstance(p, Token) for p in batch.payloads)
        return [self.arrays[p.name] for p in batch.payloads]


def pairs(batch: Batch) -> list[tuple[str, int]]:
    """The batch as ``(payload name, row)`` pairs, in batch order."""
    assert batch.index.shape == batch.rows.shape == (len(batch),)
    assert len({id(p) for p in batch.payloads}) == len(batch.payloads)  # each payload listed once
    assert set(batch.index.tolist()) == set(range(len(batch.payloads)))  # and used
    return [(batch.payloads[i].name, r) for i, r in zip(batch.index.tolist(), batch.rows.tolist(), strict=True)]


def check_live_accounting(buf: Buffer, store: Store, collect: bool = True) -> set[str]:
    """With no batch held by the test: the payloads alive are exactly the live chunks' ones, bytes included."""
    alive = store.alive(collect)
    s = buf.stats()
    assert s["chunks_live"] == len(alive), (s["chunks_live"], sorted(alive))
    assert s["bytes_live"] == sum(store.nbytes[n] for n in alive)
    return alive


# ---------------------------------------------------------------- construction / validation


def test_make_buffer_policies() -> None:
    assert isinstance(make_buffer("fifo", 4, 0), FifoBuffer)
    assert isinstance(make_buffer("firo", 4, 0), FiroBuffer)
    assert isinstance(make_buffer("reservoir", 4, 0), ReservoirBuffer)
    assert isinstance(make_buffer("FIFO", 4, 0), Buffer)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_make_buffer_builds_every_registered_policy(policy: str) -> None:
    for name in (policy, policy.upper()):
        buf = make_buffer(name, 4, 0)
        assert type(buf) is POLICIES[policy] and buf.policy == policy


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


@pytest.mark.parametrize("policy", sorted(POLICIES))
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


@pytest.mark.parametrize("policy", sorted(POLICIES))
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


@pytest.mark.parametrize("policy", sorted(POLICIES))
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


@pytest.mark.parametrize("policy", sorted(POLICIES))
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


# ---------------------------------------------------------------- policy registry

# The tests that pin down each registered policy's semantics. A policy added to POLICIES without
# an entry here (and the tests it names) fails test_every_policy_has_semantics_tests.
SEMANTICS: dict[str, tuple[str, ...]] = {
    "fifo": (
        "test_fifo_order_and_no_repeats",
        "test_fifo_put_blocks_until_get_frees_space",
        "test_fifo_opaque_payloads_come_back_in_order",
        "test_fifo_retried_chunks_compacted_keep_order",
    ),
    "firo": (
        "test_firo_every_sample_exactly_once_in_random_order",
        "test_firo_removal_is_uniform_over_held",
        "test_firo_opaque_payloads_each_once",
        "test_firo_capacity_bytes_bounds_live_bytes",
    ),
    "reservoir": (
        "test_reservoir_is_uniform_sample_of_stream",
        "test_reservoir_with_single_sample_puts_matches_algorithm_r_marginals",
        "test_reservoir_opaque_payloads_among_received",
        "test_reservoir_capacity_bytes_bounds_live_bytes",
    ),
}


def test_every_policy_has_semantics_tests() -> None:
    assert set(POLICIES) == set(SEMANTICS), "every registered policy needs its semantics tests listed in SEMANTICS"
    for policy, names in SEMANTICS.items():
        assert names, policy
        missing = [n for n in names if not callable(globals().get(n))]
        assert not missing, f"{policy}: no such tests {missing}"


# ---------------------------------------------------------------- reference semantics (opaque payloads)


def test_fifo_opaque_payloads_come_back_in_order() -> None:
    buf = make_buffer("fifo", 40, 0, seed=0)
    store = Store()
    rng = np.random.default_rng(0)
    expected: list[tuple[str, int]] = []
    got: list[tuple[str, int]] = []
    keys: list[int] = []
    start = dup_chunks = 0
    for i in range(30):
        k = int(min(rng.integers(1, 20), 40 - len(buf)))
        if k >= 2 and i % 7 == 3:
            # A repeat inside the chunk and a key received before: the slots skip those rows.
            t = [start, start + 1, start, start - 1, *range(start + 2, start + k)]
            assert store.put(buf, keyed_chunk(t), f"c{i}") == k
            rows = [0, 1, *range(4, k + 2)]
            dup_chunks += 1
        else:
            assert store.put(buf, chunk(start, k), f"c{i}") == k
            rows = list(range(k))
        expected += [(f"c{i}", r) for r in rows]
        start += k
        b = buf.take(int(rng.integers(1, 25)), timeout=1)
        assert b is not None
        got += pairs(b)
        keys += check_assembled(b, store.arrays_of(b))
    buf.close()
    while (b := buf.take(7)) is not None:
        got += pairs(b)
        keys += check_assembled(b, store.arrays_of(b))
    assert got == expected  # exactly the slots put, oldest first
    assert keys == list(range(start))
    assert dup_chunks and buf.stats()["duplicates"] == 2 * dup_chunks


def test_firo_opaque_payloads_each_once() -> None:
    buf = make_buffer("firo", 60, 0, seed=4)
    store = Store()
    rng = np.random.default_rng(1)
    expected: list[tuple[str, int]] = []
    got: list[tuple[str, int]] = []
    start = 0
    for i in range(40):
        k = int(min(rng.integers(1, 15), 60 - len(buf)))
        assert store.put(buf, chunk(start, k, sim=i % 3), f"c{i}") == k
        expected += [(f"c{i}", r) for r in range(k)]
        start += k
        b = buf.take(int(rng.integers(1, 20)), timeout=1)
        assert b is not None
        got += pairs(b)
        check_assembled(b, store.arrays_of(b))
    buf.close()
    while (b := buf.take(16)) is not None:
        got += pairs(b)
        check_assembled(b, store.arrays_of(b))
    assert len(got) == len(set(got)) and set(got) == set(expected)
    assert got != expected  # random out


def test_reservoir_opaque_payloads_among_received() -> None:
    cap = 30
    store = Store()
    buf = make_buffer("reservoir", cap, 0, seed=2, compact=store.compact)
    rng = np.random.default_rng(2)
    received: set[tuple[int, int]] = set()
    start = 0
    for i in range(60):
        k = int(rng.integers(1, 25))
        c = chunk(start, k, sim=i % 4)
        assert store.put(buf, c, f"c{i}") == k
        received |= set(zip(c.sim_id.tolist(), c.t_index.tolist(), strict=True))
        start += k
        b = buf.take(16)
        assert b is not None and len(b) == 16
        for name, row in pairs(b):
            assert name in store.arrays and 0 <= row < store.arrays[name][0].shape[0]
        assert set(zip(b.sim_id.tolist(), b.t_index.tolist(), strict=True)) <= received
        check_assembled(b, store.arrays_of(b))  # each (payload, row) is the sample its keys name
    assert store.compactions > 0 and buf.stats()["compactions"] == store.compactions
    b = buf.take(cap)  # everything held, each once
    assert b is not None and len(set(pairs(b))) == cap and len(set(b.t_index.tolist())) == cap
    check_assembled(b, store.arrays_of(b))


# ---------------------------------------------------------------- chunk release


def fill_and_consume(buf: Buffer, store: Store, policy: str) -> None:
    """Put chunks and consume/evict them all, checking after each step that nothing else keeps payloads alive."""
    if POLICIES[policy].removes:
        for i in range(6):
            store.put(buf, chunk(10 * i, 10), f"c{i}")
        assert check_live_accounting(buf, store) == {f"c{i}" for i in range(6)}
        assert buf.stats()["bytes_live"] == 60 * BPS
        last_bytes = 60 * BPS
        while len(buf):
            b = buf.take(7)
            assert b is not None
            in_batch = {p.name for p in b.payloads}
            assert in_batch <= store.alive(collect=False)  # the batch keeps its payloads alive...
            del b
            check_live_accounting(buf, store, collect=False)  # ...and only the batch
            s = buf.stats()
            assert s["bytes_live"] <= last_bytes and s["chunks_live"] + s["chunks_released"] == 6
            last_bytes = s["bytes_live"]
    else:
        # 50 times the capacity: early chunks are replaced away (or compacted into new chunks).
        for i in range(100):
            store.put(buf, chunk(10 * i, 10), f"c{i}")
            check_live_accounting(buf, store, collect=i % 25 == 24)
            assert buf.stats()["bytes_live"] <= 2 * buf.capacity * BPS
        s = buf.stats()
        assert s["chunks_live"] <= buf.capacity < 100 and s["chunks_released"] >= 100 - buf.capacity
        assert len({f"c{i}" for i in range(100)} & store.alive()) <= buf.capacity


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_released_chunks_let_go_of_their_payloads(policy: str) -> None:
    store = Store()
    buf = make_buffer(policy, 20 if policy == "reservoir" else 100, 0, seed=0, compact=store.compact)
    fill_and_consume(buf, store, policy)
    alive = check_live_accounting(buf, store)
    if POLICIES[policy].removes:
        assert alive == set()
        s = buf.stats()
        assert s["bytes_live"] == 0 and s["chunks_live"] == 0 and s["chunks_released"] == 6
    # A batch handed out before drop_all keeps its own payloads alive, and nothing else does.
    store.put(buf, chunk(10_000, 10), "late")
    b = buf.take(5)
    assert b is not None
    in_batch = {p.name for p in b.payloads}
    buf.drop_all()
    s = buf.stats()
    assert s["bytes_live"] == 0 and s["chunks_live"] == 0 and s["held"] == 0 and s["closed"]
    assert store.alive() == in_batch
    del b
    assert store.alive() == set()
    assert buf.take(5) is None
    with pytest.raises(BufferClosed):
        store.put(buf, chunk(20_000, 1), "after")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_drop_all_lets_go_of_every_payload(policy: str) -> None:
    store = Store()
    buf = make_buffer(policy, 50, 0, compact=store.compact)
    for i in range(4):
        store.put(buf, chunk(10 * i, 10), f"c{i}")
    assert store.alive() == {f"c{i}" for i in range(4)}
    buf.drop_all()
    assert store.alive() == set()
    s = buf.stats()
    assert s["bytes_live"] == 0 and s["chunks_live"] == 0 and s["chunks_released"] == 4 and len(buf) == 0
    assert buf.take(3) is None and buf.take_many(3, 2) is None


# ---------------------------------------------------------------- bytes bound and compaction


def test_reservoir_capacity_bytes_bounds_live_bytes() -> None:
    cap = 50
    cap_bytes = 2 * BPS * cap + 17  # room for 50 held samples (plus a few bytes that fit no sample)
    n = 50 * cap
    means = []
    for seed in range(10):
        buf = make_buffer("reservoir", 1000, 0, capacity_bytes=cap_bytes, seed=seed)
        for start in range(0, n, 20):
            assert buf.put(chunk(start, 20, sim=seed)) == 20
            assert buf.stats()["bytes_live"] <= cap_bytes
        s = buf.stats()
        assert s["capacity"] == cap and s["held"] == cap and s["received"] == n and s["evicted"] == n - cap
        assert s["compactions"] > 0 and s["rows_compacted"] > 0 and s["compaction_errors"] == 0
        assert s["bytes_held"] == cap * BPS <= s["bytes_live"]
        b = buf.take(cap)  # all held, each once
        assert b is not None and len(set(b.t_index.tolist())) == cap
        assert len(b.payloads) > 1  # rows of the compacted chunk and of chunks still more than half held
        assert set(b.sim_id.tolist()) == {seed} and b.t_index.min() >= 0 and b.t_index.max() < n
        check_assembled(b, b.payloads)
        # Assembling into caller buffers (as into pinned tensors) over several batches.
        out = (np.full((64, DX), -1, np.float32), np.full((64, DY), -1, np.float32))
        for _ in range(3):
            bb = buf.take(24)
            assert bb is not None
            x, y = assemble(bb, bb.payloads, out=out)
            assert np.shares_memory(x, out[0]) and np.shares_memory(y, out[1])  # written in place
            np.testing.assert_array_equal(out[0][:24, 0], bb.t_index)
            np.testing.assert_array_equal(out[1][:24], np.repeat(bb.t_index[:, None] * 2.0, DY, axis=1))
        means.append(float(b.t_index.mean()))
        # One held sample's mean position: sd ~ 722 / sqrt(50) ~ 102 around 1249.5.
        assert abs(means[-1] - (n - 1) / 2) < 500
    assert abs(np.mean(means) - (n - 1) / 2) < 160  # sd of the mean of 10 ~ 32


def test_firo_capacity_bytes_bounds_live_bytes() -> None:
    cap = 50
    cap_bytes = 2 * BPS * cap
    buf = make_buffer("firo", 500, 0, capacity_bytes=cap_bytes, seed=5)
    rng = np.random.default_rng(5)
    out: list[int] = []
    n = 50 * cap
    for start in range(0, n, 20):
        while buf.dims and buf.capacity - len(buf) < 20:
            b = buf.take(int(rng.integers(1, 30)))
            assert b is not None
            out += check_assembled(b, b.payloads)
            assert buf.stats()["bytes_live"] <= cap_bytes
        assert buf.put(chunk(start, 20), timeout=0) == 20
        assert buf.stats()["bytes_live"] <= cap_bytes
        assert buf.capacity == cap
    buf.close()
    while (b := buf.take(17)) is not None:
        out += check_assembled(b, b.payloads)
    assert sorted(out) == list(range(n))
    s = buf.stats()
    assert s["compactions"] > 0 and s["compaction_errors"] == 0 and s["bytes_live"] == 0 and s["chunks_live"] == 0


@pytest.mark.parametrize("fail", [False, True])
def test_fifo_retried_chunks_compacted_keep_order(fail: bool) -> None:
    # A chunk twice the capacity goes in by retries; each retry registers the chunk again, which
    # keeps the whole 20-row chunk alive for the rows it inserted: compaction must step in.
    cap = 10
    cap_bytes = 2 * BPS * cap
    calls: list[int] = []

    def compact(segments: Sequence[tuple[Any, np.ndarray]]) -> Any:
        calls.append(len(segments))
        if fail:
            raise RuntimeError("object store full")
        return compact_arrays(segments)

    buf = make_buffer("fifo", 100, 0, capacity_bytes=cap_bytes, compact=compact)
    out: list[int] = []
    for base in range(0, 100, 20):
        c = chunk(base, 20)
        while True:
            try:
                buf.put(c, timeout=0)
                break
            except PutTimeoutError:
                pass
            if not fail:
                assert buf.stats()["bytes_live"] <= cap_bytes
            b = buf.take(3)
            assert b is not None
            out += check_assembled(b, b.payloads)
    buf.close()
    while (b := buf.take(4)) is not None:
        out += check_assembled(b, b.payloads)
    assert out == list(range(100))  # FIFO order, each sample once, also across compactions
    s = buf.stats()
    assert calls and s["bytes_live"] == 0 and s["chunks_live"] == 0
    if fail:
        assert s["compaction_errors"] == len(calls) and s["compactions"] == 0
    else:
        assert s["compactions"] == len(calls) and s["compaction_errors"] == 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_chunk_larger_than_capacity_bytes_refused_and_changes_nothing(policy: str) -> None:
    cap_bytes = 2 * BPS * 10
    store = Store()
    buf = make_buffer(policy, 100, 0, capacity_bytes=cap_bytes, compact=store.compact)
    too_big = chunk(0, 21)  # 21 * 32 = 672 > 640 bytes
    with pytest.raises(ValueError, match="capacity_bytes"):
        buf.put(too_big)
    with pytest.raises(ValueError, match="capacity_bytes"):
        store.put(buf, too_big, "big")
    s = buf.stats()
    assert buf.dims is None and s["capacity"] == 100 and s["received"] == 0 and s["duplicates"] == 0
    assert s["bytes_live"] == 0 and s["chunks_live"] == 0 and s["chunks_released"] == 0
    assert store.alive() == set()  # the refused payload is not kept
    assert buf.put(chunk(0, 10)) == 10
    if not POLICIES[policy].removes:
        assert buf.put(chunk(10, 20)) == 20  # exactly capacity_bytes: accepted
    before = buf.stats()
    with pytest.raises(ValueError, match="capacity_bytes"):
        buf.put(chunk(100, 21))
    with pytest.raises(ValueError, match="capacity_bytes"):
        store.put(buf, chunk(200, 21), "big2")
    assert buf.stats() == before and store.alive() == set()
    # Its keys were not remembered: the same samples in smaller chunks are all new.
    buf.drop_all()
    buf = make_buffer(policy, 100, 0, capacity_bytes=cap_bytes)
    with pytest.raises(ValueError, match="capacity_bytes"):
        buf.put(chunk(0, 21))
    assert buf.put(chunk(0, 7)) == 7 and buf.stats()["duplicates"] == 0


def failing_compact(segments: Sequence[tuple[Any, np.ndarray]]) -> Any:
    raise RuntimeError("object store full")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_compaction_failure_loses_nothing(policy: str) -> None:
    cap = 20
    cap_bytes = 2 * BPS * cap
    buf = make_buffer(policy, 1000, 0, capacity_bytes=cap_bytes, seed=7, compact=failing_compact)
    rng = np.random.default_rng(7)
    n = 50 * cap
    out: list[int] = []
    if policy == "fifo":
        # FIFO keeps its rows contiguous; chunks re-registered by retries are what leaves them sparse.
        for base in range(0, n, 2 * cap):
            c = chunk(base, 2 * cap)
            while True:
                try:
                    buf.put(c, timeout=0)
                    break
                except PutTimeoutError:
                    pass
                b = buf.take(int(rng.integers(1, cap)))
                assert b is not None
                out += check_assembled(b, b.payloads)
    else:
        for start in range(0, n, 10):
            while POLICIES[policy].removes and buf.dims and buf.capacity - len(buf) < 10:
                b = buf.take(int(rng.integers(1, 10)))
                assert b is not None
                out += check_assembled(b, b.payloads)
            assert buf.put(chunk(start, 10), timeout=0) == 10  # puts go on despite the failures
    s = buf.stats()
    assert s["compaction_errors"] > 0 and s["compactions"] == 0 and s["rows_compacted"] == 0
    assert s["received"] == n and s["chunks_live"] > 0
    if POLICIES[policy].removes:
        buf.close()
        while (b := buf.take(13)) is not None:
            out += check_assembled(b, b.payloads)
        assert (out if policy == "fifo" else sorted(out)) == list(range(n))  # each sample exactly once
        assert buf.stats()["bytes_live"] == 0
    else:
        b = buf.take(cap)
        assert b is not None and s["held"] == cap and len(set(b.t_index.tolist())) == cap
        check_assembled(b, b.payloads)  # every held row still reads from its (uncompacted) chunk


def test_compaction_recovers_after_failures() -> None:
    cap = 20
    cap_bytes = 2 * BPS * cap
    calls = 0

    def flaky(segments: Sequence[tuple[Any, np.ndarray]]) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError("object store busy")
        return compact_arrays(segments)

    buf = make_buffer("reservoir", 1000, 0, capacity_bytes=cap_bytes, seed=1, compact=flaky)
    for start in range(0, 50 * cap, 20):
        buf.put(chunk(start, 20))
        s = buf.stats()
        if s["compactions"]:
            assert s["bytes_live"] <= cap_bytes  # one success compacts every sparse chunk
    s = buf.stats()
    assert s["compaction_errors"] == 3 and s["compactions"] == calls - 3 > 0
    b = buf.take(cap)
    assert b is not None
    check_assembled(b, b.payloads)


# ---------------------------------------------------------------- take_many


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_take_many_matches_consecutive_takes(policy: str) -> None:
    bufs = [make_buffer(policy, 64, 0, seed=11) for _ in range(2)]
    for buf in bufs:
        buf.put(chunk(0, 30))
        buf.put(chunk(30, 20, sim=1))
    many, one = bufs
    removes = POLICIES[policy].removes
    got: list[Batch] = []
    for count in (3, 10):
        batches = many.take_many(8, count, timeout=1)
        assert batches is not None and 1 <= len(batches) <= count
        expect = []
        while len(expect) < count and (not removes or len(one)):
            b = one.take(8, timeout=1)
            assert b is not None
            expect.append(b)
        assert len(batches) == len(expect)
        for b, e in zip(batches, expect, strict=True):
            np.testing.assert_array_equal(b.t_index, e.t_index)
            np.testing.assert_array_equal(b.sim_id, e.sim_id)
            np.testing.assert_array_equal(b.rows, e.rows)
            check_assembled(b, b.payloads)
        got += batches
    if removes:
        assert [len(b) for b in got] == [8] * 6 + [2]  # up to count: stops when nothing is left, without waiting
        keys = [t for b in got for t in b.t_index.tolist()]
        assert (keys if policy == "fifo" else sorted(keys)) == list(range(50))
    else:
        assert [len(b) for b in got] == [8] * 13
    many.close()
    if removes:
        assert many.take_many(8, 4) is None  # end of stream
    else:
        batches = many.take_many(8, 4)
        assert batches is not None and len(batches) == 4  # keeps sampling what it holds
        many.drop_all()
        assert many.take_many(8, 4) is None


def test_take_many_waits_for_the_first_batch_only() -> None:
    buf = make_buffer("fifo", 20, 10)
    with pytest.raises(ValueError, match="count"):
        buf.take_many(4, 0)
    buf.put(chunk(0, 5))
    with pytest.raises(TimeoutError):
        buf.take_many(4, 3, timeout=0.05)  # below the watermark
    th, out = run_thread(buf.take_many, 4, 3, timeout=5)
    th.join(SHORT)
    assert th.is_alive()
    buf.put(chunk(5, 5))
    th.join(2)
    assert not th.is_alive()
    assert [b.t_index.tolist() for b in out["result"]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    buf.put(chunk(10, 3))
    batches = buf.take_many(4, 3, timeout=1)
    assert batches is not None and [b.t_index.tolist() for b in batches] == [[10, 11, 12]]
    buf.close()
    assert buf.take_many(4, 3) is None


# ---------------------------------------------------------------- end of a study while a put waits


@pytest.mark.parametrize("policy", ["fifo", "firo"])
def test_drop_all_wakes_blocked_producer_with_buffer_closed(policy: str) -> None:
    buf = make_buffer(policy, 4, 0)
    buf.put(chunk(0, 4))
    th, out = run_thread(buf.put, chunk(4, 2))
    th.join(SHORT)
    assert th.is_alive(), "put into a full buffer must block"
    buf.drop_all()
    th.join(2)
    assert not th.is_alive()
    assert isinstance(out.get("error"), BufferClosed), out
    assert out["error"].inserted == 0
    s = buf.stats()
    assert s["held"] == 0 and s["bytes_live"] == 0 and s["chunks_live"] == 0


def test_assemble_large_rows_from_several_chunks_row_by_row() -> None:
    # Rows over 64 KB (a 1000² field is 4 MB) take the row-by-row copy; the rows must still land
    # in batch order, whichever chunk each comes from, and only the first b rows of `out` be written.
    dx, dy = 3, 20_000
    rng = np.random.default_rng(5)
    chunks = [(rng.random((4, dx), dtype=np.float32), rng.random((4, dy), dtype=np.float32)) for _ in range(3)]
    index = np.array([2, 0, 2, 1, 0], dtype=np.int64)
    rows = np.array([3, 1, 0, 2, 1], dtype=np.int64)
    batch = Batch(payloads=[0, 1, 2], index=index, rows=rows, sim_id=index, t_index=rows)
    out = (np.full((8, dx), -1, np.float32), np.full((8, dy), -1, np.float32))
    x, y = assemble(batch, chunks, out=out)
    np.testing.assert_array_equal(x, np.stack([chunks[c][0][r] for c, r in zip(index, rows, strict=True)]))
    np.testing.assert_array_equal(y, np.stack([chunks[c][1][r] for c, r in zip(index, rows, strict=True)]))
    assert np.shares_memory(y, out[1]) and (out[1][5:] == -1).all()
