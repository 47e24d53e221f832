"""Bounded sample buffers for online surrogate training (Melissa, ICML 2023), holding samples by reference.

A buffer never holds sample arrays. Producers write a chunk of ``k`` samples once, somewhere the
consumer can read it in place (Ray's object store in a study; the chunk itself in tests), and
hand the buffer an opaque *payload* for it with :meth:`Buffer.put_ref`, together with the
chunk's keys (simulation id and time index per row) and its size in bytes. A slot of the buffer
is a ``(chunk, row)`` pair. :meth:`Buffer.take` returns a :class:`Batch`: the payloads a batch
draws from and, per batch row, which payload and which row of it; the consumer assembles the
batch with one copy (:func:`assemble`). :meth:`Buffer.put` / :meth:`Buffer.get` do the same on
in-process arrays (the payload is the validated chunk itself).

Three policies (see the class docstrings for the exact semantics), at sample granularity:

* ``"fifo"``  -- :class:`FifoBuffer`: oldest samples out first, each sample returned exactly once,
  producers block while the buffer is full (backpressure).
* ``"firo"``  -- :class:`FiroBuffer`: first in, random out; each sample returned exactly once,
  in uniformly random order among those held; producers block while full.
* ``"reservoir"`` -- :class:`ReservoirBuffer`: Vitter's Algorithm R; the buffer always holds a
  uniform random sample of the whole stream; producers never block; batches are drawn
  *without removal*, so samples are revisited across batches.

Common behaviour:

* **Chunks alive.** A chunk is alive while at least one of its rows is held; ``bytes_live`` is
  the sum of the sizes of the live chunks (what the buffer keeps from being freed). When a
  chunk's last row leaves (taken by a FIFO/FIRO get, replaced or discarded by the reservoir, or
  never inserted) its payload is dropped -- in a study that is the last reference to the object,
  which Ray then frees once the consumer is done with it.
* **Bounded in samples and bytes.** ``capacity`` samples; with ``capacity_bytes``, the capacity
  becomes ``min(capacity, capacity_bytes // bytes_per_sample)`` once the first chunk fixes the
  sample size (``bytes_per_sample = 4 * (dx + dy)``), and the watermark is clamped to it. A
  chunk of ``k`` rows keeps all ``k`` alive for one held row, so rows removed at random (FIRO)
  or kept at random (reservoir) would let ``bytes_live`` grow to many times the held samples'
  bytes: whenever ``bytes_live`` exceeds its bound (``capacity_bytes``, or else twice the
  capacity's worth of samples), the sparsest chunks are *compacted* -- their held rows copied
  into one new chunk by the buffer's ``compact`` function and the old ones dropped. Only rows
  that stay in the buffer are ever copied this way (the reservoir, once it has seen many times
  its capacity, keeps few rows of each chunk); FIFO never needs it.
* **Validation.** :func:`check_chunk` rejects a chunk with mismatched row counts, wrong
  dimensions, non-integer ids or any non-finite value (NaN/inf) with ``ValueError``; producers
  run it before they write a chunk, and :meth:`Buffer.put` runs it itself. Nothing of a rejected
  chunk is accepted.
* **Deduplication.** The buffer remembers every ``(sim_id, t_index)`` key it has ever received
  (also after the sample left the buffer). A sample with a known key -- or repeated inside the
  same chunk -- is dropped and counted in ``stats()["duplicates"]``. This makes a producer that
  re-sends a whole simulation after a crash, or retries a timed-out put, idempotent. Keys are
  kept per simulation in a sorted int64 array (8 bytes per key) plus a small set of recent keys
  merged into it in amortised O(1) per key.
* **Watermark.** No ``take`` returns anything until the number of samples held has reached
  ``watermark`` at least once. After that, takes keep serving even when the fill drops below
  the watermark (training must not stall). If the buffer is closed before the watermark is
  reached, takes proceed with whatever is held.
* **Short batches.** Once the watermark has been reached, FIFO/FIRO ``take`` returns
  ``min(batch_size, held)`` samples as soon as at least one is held rather than waiting for a
  full batch. The reservoir always returns exactly ``batch_size`` samples (drawing with
  replacement within the call only when fewer than ``batch_size`` are held).
* **End of stream.** After :meth:`Buffer.close`, puts raise :class:`BufferClosed`; FIFO/FIRO takes
  drain what is left and then return ``None``; reservoir takes keep sampling the held set and
  return ``None`` only if it is empty.
* **Threads.** All methods are safe to call concurrently from several threads (a buffer shard is
  a threaded Ray actor): one lock, with a ``not_full`` condition for producers and a
  ``not_empty`` condition for consumers.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "POLICIES",
    "Batch",
    "Buffer",
    "BufferClosed",
    "Chunk",
    "FifoBuffer",
    "FiroBuffer",
    "PutTimeoutError",
    "ReservoirBuffer",
    "assemble",
    "check_chunk",
    "make_buffer",
]


class BufferClosed(RuntimeError):
    """Raised by ``put`` on a closed buffer (or when the buffer is closed while a put is blocked).

    ``inserted`` is how many samples of the chunk were inserted before the close (0 when the
    buffer was already closed on entry).
    """

    def __init__(self, message: str, inserted: int = 0) -> None:
        super().__init__(message)
        self.inserted = inserted


class PutTimeoutError(TimeoutError):
    """Raised by a blocking ``put`` whose timeout expired before the whole chunk fitted.

    The samples that fitted *are* inserted (``inserted``); the others (``remaining``) are not,
    and their keys are forgotten, so re-sending the same chunk later inserts exactly the missing
    samples (the inserted ones are dropped as duplicates).
    """

    def __init__(self, message: str, inserted: int, remaining: int) -> None:
        super().__init__(message)
        self.inserted = inserted
        self.remaining = remaining


@dataclass(frozen=True)
class Chunk:
    """``k`` samples: ``x [k, dx]`` and ``y [k, dy]`` float32, ``sim_id [k]`` and ``t_index [k]`` int64."""

    x: np.ndarray
    y: np.ndarray
    sim_id: np.ndarray
    t_index: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.x)[0]) if np.ndim(self.x) else 0


@dataclass(frozen=True)
class Batch:
    """What a take hands the consumer: batch row ``i`` is row ``rows[i]`` of payload ``payloads[index[i]]``.

    ``sim_id [b]`` and ``t_index [b]`` are the keys of the batch rows (for counting, never for training).
    """

    payloads: list[Any]
    index: np.ndarray  # (b,) int64 into payloads
    rows: np.ndarray  # (b,) int64 rows of that payload
    sim_id: np.ndarray  # (b,) int64
    t_index: np.ndarray  # (b,) int64

    def __len__(self) -> int:
        return int(self.rows.shape[0])


# Row size above which a batch is always copied row by row (the per-row Python cost is then negligible).
_ROW_COPY_BYTES = 64 * 2**10


def assemble(
    batch: Batch,
    arrays: Sequence[tuple[np.ndarray, np.ndarray]],
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gather a batch from its chunks' arrays (``arrays[j] = (x [k, dx], y [k, dy], ...)`` of ``batch.payloads[j]``).

    One copy per value, straight into ``out`` (``x [>=b, dx]``, ``y [>=b, dy]``; e.g. views of pinned
    tensors) when given; returns ``(x [b, dx], y [b, dy])``. The chunks' arrays are only read, so
    zero-copy read-only views of the object store do.
    """
    b = len(batch)
    dx, dy = arrays[0][0].shape[1], arrays[0][1].shape[1]
    if out is None:
        xo, yo = np.empty((b, dx), np.float32), np.empty((b, dy), np.float32)
    else:
        xo, yo = out[0][:b], out[1][:b]
    if len(arrays) == 1:
        np.take(arrays[0][0], batch.rows, axis=0, out=xo)
        np.take(arrays[0][1], batch.rows, axis=0, out=yo)
        return xo, yo
    if 4 * (dx + dy) >= _ROW_COPY_BYTES or 4 * len(arrays) > b:
        # Large rows, or rows scattered over many chunks (FIRO, reservoir): one copy per row straight
        # into place; grouping by chunk would cost a few numpy calls per chunk and copy each row twice.
        for j, (c, r) in enumerate(zip(batch.index.tolist(), batch.rows.tolist(), strict=True)):
            x, y = arrays[c][:2]
            xo[j] = x[r]
            yo[j] = y[r]
        return xo, yo
    order = np.argsort(batch.index, kind="stable")
    cuts = np.flatnonzero(np.diff(batch.index[order])) + 1
    for pos in np.split(order, cuts):
        x, y = arrays[int(batch.index[pos[0]])][:2]
        r = batch.rows[pos]
        xo[pos] = x[r]
        yo[pos] = y[r]
    return xo, yo


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; `capacity=True` is almost certainly a bug, so reject it.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_keys(sim: Any, t: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    sim, t = np.asarray(sim), np.asarray(t)
    if sim.ndim != 1 or t.ndim != 1:
        raise ValueError(f"chunk.sim_id and chunk.t_index must be 1-D [k], got shapes {sim.shape} and {t.shape}")
    for name, arr in (("sim_id", sim), ("t_index", t)):
        # An empty list becomes float64; that carries no value, so let it through.
        if arr.dtype.kind not in "iu" and arr.size:
            raise ValueError(f"chunk.{name} must be integer, got dtype {arr.dtype}")
    if sim.shape[0] != t.shape[0] or (k is not None and sim.shape[0] != k):
        raise ValueError(
            f"chunk fields disagree on the number of samples k: sim_id {sim.shape[0]}, t_index {t.shape[0]}"
            + (f", x/y {k}" if k is not None else "")
        )
    return sim.astype(np.int64, copy=False), t.astype(np.int64, copy=False)


def check_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x, y, sim_id, t_index)`` as contiguous float32 / int64 arrays or raise ``ValueError``.

    Producers run it before they write a chunk where consumers read it, so that an invalid chunk is
    rejected as a whole and never reaches a buffer or a trainer.
    """
    x = np.asarray(chunk.x)
    y = np.asarray(chunk.y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"chunk.x and chunk.y must be 2-D [k, d], got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"chunk fields disagree on the number of samples k: x {x.shape[0]}, y {y.shape[0]}")
    sim, t = _check_keys(chunk.sim_id, chunk.t_index, x.shape[0])
    for name, arr in (("x", x), ("y", y)):
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"chunk.{name} must be real numeric, got dtype {arr.dtype}")
    # Cast first, then test: a float64 value beyond float32 range would become inf in storage.
    with np.errstate(over="ignore"):  # overflow -> inf, reported just below
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.ascontiguousarray(y, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("chunk.x contains non-finite values (NaN or inf); chunk rejected")
    if not np.isfinite(y).all():
        raise ValueError("chunk.y contains non-finite values (NaN or inf); chunk rejected")
    return x, y, sim, t


def compact_arrays(segments: Sequence[tuple[Any, np.ndarray]]) -> Any:
    """The default ``compact``: payloads are tuples of arrays ``(x, y, ...)``; their held rows in one new tuple."""
    width = len(segments[0][0])
    return tuple(np.concatenate([p[i][r] for p, r in segments]) for i in range(width))


def _first_occurrences(sim: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose ``(sim, t)`` key does not occur earlier in the chunk."""
    k = sim.shape[0]
    mask = np.ones(k, dtype=bool)
    if k < 2:
        return mask
    # Row index as the last key makes the earliest occurrence come first within each key group
    # whatever the stability of the sort.
    order = np.lexsort((np.arange(k), t, sim))
    s, tt = sim[order], t[order]
    repeat = (s[1:] == s[:-1]) & (tt[1:] == tt[:-1])
    mask[order[1:][repeat]] = False
    return mask


def _groups_by_sim(sim: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split row indices by simulation id: ``[(sim_id, rows), ...]``."""
    if sim.size == 0:
        return []
    first = sim[0]
    if (sim == first).all():  # the common case: a chunk comes from one simulation
        return [(int(first), np.arange(sim.size))]
    order = np.argsort(sim, kind="stable")
    s = sim[order]
    cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
    starts = np.concatenate(([0], cuts))
    return [(int(s[a]), rows) for a, rows in zip(starts, np.split(order, cuts), strict=True)]


class _SimKeys:
    """The time indices received from one simulation: a sorted int64 array plus a small pending set.

    Compact (8 bytes per key once merged) and fast for both big and tiny chunks: tiny chunks go
    to the pending Python set (O(1) per key); the set is merged into the sorted array when it
    exceeds 1/8 of it, so the O(n) merge is amortised to O(1) per key. Big chunks merge directly.
    """

    __slots__ = ("merged", "pending")

    def __init__(self) -> None:
        self.merged = np.empty(0, dtype=np.int64)
        self.pending: set[int] = set()

    def __len__(self) -> int:
        return self.merged.size + len(self.pending)

    def contains(self, t: np.ndarray) -> np.ndarray:
        m = self.merged
        if m.size:
            known = m[np.minimum(np.searchsorted(m, t), m.size - 1)] == t
        else:
            known = np.zeros(t.shape[0], dtype=bool)
        if self.pending:
            p = self.pending
            known |= np.fromiter((v in p for v in t.tolist()), dtype=bool, count=t.shape[0])
        return known

    def add(self, t: np.ndarray) -> None:
        """Add keys that are unique and not yet present (the caller deduplicated them)."""
        if len(self.pending) + t.size <= max(256, self.merged.size // 8):
            self.pending.update(t.tolist())
            return
        parts = [self.merged, t]
        if self.pending:
            parts.append(np.fromiter(self.pending, dtype=np.int64, count=len(self.pending)))
            self.pending = set()
        # Stable sort (timsort/radix) exploits the already sorted run.
        self.merged = np.sort(np.concatenate(parts), kind="stable")

    def remove(self, t: np.ndarray) -> None:
        if self.pending:
            self.pending.difference_update(t.tolist())
        if self.merged.size:
            self.merged = self.merged[~np.isin(self.merged, t)]


@dataclass
class _Entry:
    """A chunk the buffer refers to: its payload, row count, size, and how many of its rows are held."""

    payload: Any
    rows: int
    nbytes: int
    live: int = 0


class Buffer:
    """Base class: slots, keys, chunk liveness, compaction, watermark, statistics and locking.

    Subclasses implement the policy hooks ``_insert_locked`` (called from ``put_ref`` with the lock
    held and the deduplicated rows) and ``_take_locked`` (called from ``take`` with the lock held
    and at least one sample present). Use :func:`make_buffer` to construct one.

    ``compact(segments)`` builds one payload from ``[(payload, rows), ...]`` (the held rows of
    sparse chunks, in order); the default reads ``(x, y)`` array payloads.
    """

    policy: ClassVar[str] = ""
    removes: ClassVar[bool] = True  # whether a take removes the samples it returns

    def __init__(
        self,
        capacity: int,
        watermark: int,
        capacity_bytes: int | None = None,
        seed: int = 0,
        compact: Callable[[Sequence[tuple[Any, np.ndarray]]], Any] = compact_arrays,
    ) -> None:
        capacity = _check_int("capacity", capacity, 1)
        watermark = _check_int("watermark", watermark, 0)
        if watermark > capacity:
            raise ValueError(f"watermark must be <= capacity ({capacity}), got {watermark}")
        if capacity_bytes is not None:
            capacity_bytes = _check_int("capacity_bytes", capacity_bytes, 1)
        self._requested_capacity = capacity
        self._requested_watermark = watermark
        self._capacity_bytes = capacity_bytes
        # Effective values; may shrink at the first put when capacity_bytes is given.
        self._capacity = capacity
        self._watermark = watermark
        self._rng = np.random.default_rng(seed)
        self._compact = compact

        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)  # producers wait here (FIFO/FIRO)
        self._not_empty = threading.Condition(self._lock)  # consumers wait here

        # Slots, allocated at the first put (the sample size is unknown before): slot -> (chunk, row).
        self._dx: int | None = None
        self._dy: int | None = None
        self._bps = 0
        self._slot_chunk = np.empty(0, dtype=np.int64)
        self._slot_row = np.empty(0, dtype=np.int64)
        self._slot_sim = np.empty(0, dtype=np.int64)
        self._slot_t = np.empty(0, dtype=np.int64)
        self._seen = np.empty(0, dtype=np.int64)  # per-slot count of times returned by take
        self._held = 0

        self._chunks: dict[int, _Entry] = {}
        self._pinned: set[int] = set()  # chunks whose put is still inserting rows
        self._next_chunk = 0
        self._bytes_live = 0
        self._released = 0
        self._compactions = 0
        self._rows_compacted = 0
        self._compaction_errors = 0

        # Dedup memory: sim_id -> t_index values ever received. For the blocking policies it also
        # holds the keys of a put still waiting for space, so that two concurrent re-sends of the
        # same sample cannot both get in.
        self._keys: dict[int, _SimKeys] = {}
        self._received_by_sim: collections.Counter[int] = collections.Counter()

        self._closed = False
        self._watermark_reached = watermark == 0
        self._received = 0
        self._duplicates = 0
        self._evicted = 0
        self._consumed = 0

    # ------------------------------------------------------------------ public API

    def put(self, chunk: Chunk, timeout: float | None = None) -> int:
        """Validate ``chunk`` (:func:`check_chunk`) and insert it with itself as the payload; see :meth:`put_ref`."""
        x, y, sim, t = check_chunk(chunk)
        return self.put_ref((x, y), sim, t, x.nbytes + y.nbytes, (x.shape[1], y.shape[1]), timeout=timeout)

    def put_ref(
        self,
        payload: Any,
        sim_id: Any,
        t_index: Any,
        nbytes: int,
        dims: tuple[int, int],
        timeout: float | None = None,
    ) -> int:
        """Insert the ``k`` samples of a chunk written elsewhere; return how many new (non-duplicate) ones were taken.

        ``payload`` is what the consumer will read the chunk from (kept, never looked into),
        ``sim_id [k]`` / ``t_index [k]`` the keys of its rows, ``nbytes`` its size and ``dims`` its
        ``(dx, dy)``. Duplicates (keys received before, or repeated inside the chunk) are dropped and
        counted. FIFO/FIRO block while full: they insert what fits, wait for takes to free space, and
        so on until the whole chunk is in. If ``timeout`` (seconds; ``None`` = wait forever, 0 =
        don't wait) expires first, :class:`PutTimeoutError` (a ``TimeoutError``) is raised *after*
        inserting what fitted -- retrying the same chunk is safe thanks to dedup. The reservoir never
        blocks and returns the number of samples offered to it (each is then stored or discarded per
        Algorithm R; discards count as ``evicted``).

        Raises ``ValueError`` for invalid keys, dims or size (nothing inserted) and
        :class:`BufferClosed` if the buffer is closed (also when closed while this put waits).
        """
        sim, t = _check_keys(sim_id, t_index)
        if not (isinstance(dims, (tuple, list)) and len(dims) == 2):
            raise ValueError(f"dims must be (dx, dy), got {dims!r}")
        dx, dy = _check_int("dx", dims[0], 0), _check_int("dy", dims[1], 0)
        nbytes = _check_int("nbytes", nbytes, 0)
        if self._capacity_bytes is not None and nbytes > self._capacity_bytes:
            raise ValueError(
                f"a chunk of {nbytes} bytes is larger than the buffer's capacity_bytes ({self._capacity_bytes}); "
                "send smaller chunks"
            )
        first = _first_occurrences(sim, t)
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        with self._lock:
            if self._closed:
                raise BufferClosed(f"put on a closed {self.policy} buffer")
            if sim.shape[0] == 0:
                if self._dx is not None:
                    self._check_dims(dx, dy)
                return 0
            self._ensure_storage(dx, dy)
            new = first & ~self._known_mask(sim, t)
            rows = np.flatnonzero(new)
            self._duplicates += sim.shape[0] - rows.size
            if rows.size == 0:
                return 0
            cid = self._next_chunk
            self._next_chunk += 1
            self._chunks[cid] = _Entry(payload, int(sim.shape[0]), nbytes)
            self._pinned.add(cid)
            try:
                return self._insert_locked(cid, sim, t, rows, deadline)
            finally:
                self._pinned.discard(cid)
                entry = self._chunks.get(cid)  # gone if drop_all ran while this put waited
                if entry is not None and entry.live == 0:
                    del self._chunks[cid]  # nothing of it held (discarded, or the put gave up)
                    self._released += 1
                self._maybe_compact_locked()

    def take(self, batch_size: int, timeout: float | None = None) -> Batch | None:
        """Return the :class:`Batch` of the next ``batch_size`` samples, or ``None`` at end of stream.

        Waits (up to ``timeout`` seconds; ``None`` = forever) until the watermark has been
        reached once -- or the buffer is closed -- and at least one sample is held; raises
        ``TimeoutError`` if that does not happen in time. Returns ``None`` when the buffer is
        closed and empty. See the policy classes for which samples are returned.
        """
        batch_size = _check_int("batch_size", batch_size, 1)
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        with self._lock:
            while True:
                if self._watermark_reached or self._closed:
                    if self._held > 0:
                        break
                    if self._closed:
                        return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    what = "watermark" if not self._watermark_reached else "data"
                    raise TimeoutError(
                        f"get timed out waiting for {what} (held {self._held}, watermark {self._watermark})"
                    )
                self._not_empty.wait(remaining)
            slots = self._take_locked(batch_size)
            cids = self._slot_chunk[slots]
            uniq, inv = np.unique(cids, return_inverse=True)
            batch = Batch(
                payloads=[self._chunks[int(c)].payload for c in uniq],
                index=inv.astype(np.int64).reshape(-1),
                rows=self._slot_row[slots].copy(),
                sim_id=self._slot_sim[slots].copy(),
                t_index=self._slot_t[slots].copy(),
            )
            if self.removes:
                self._unref_locked(cids)
                self._not_full.notify_all()
            self._consumed += len(batch)
            return batch

    def take_many(self, batch_size: int, count: int, timeout: float | None = None) -> list[Batch] | None:
        """Up to ``count`` batches in one call (waiting, as :meth:`take`, for the first one only).

        The same as ``count`` takes in a row, minus the round trips: once the first batch is drawn
        the rest are taken from what is held without waiting. ``None`` at end of stream.
        """
        count = _check_int("count", count, 1)
        first = self.take(batch_size, timeout)
        if first is None:
            return None
        out = [first]
        while len(out) < count:
            with self._lock:
                if self._held == 0:
                    break
            try:
                b = self.take(batch_size, timeout=0)
            except TimeoutError:
                break
            if b is None:
                break
            out.append(b)
        return out

    def get(self, batch_size: int, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`take` a batch of ``(x, y)``-array payloads and :func:`assemble` it: ``(X [b, dx], Y [b, dy])``."""
        batch = self.take(batch_size, timeout)
        if batch is None:
            return None
        return assemble(batch, batch.payloads)

    def close(self) -> None:
        """Refuse further puts and wake every waiting producer and consumer."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()

    def drop_all(self) -> None:
        """Close and let go of every chunk (the study is over: nothing may keep objects alive)."""
        with self._lock:
            self._closed = True
            self._held = 0
            self._released += len(self._chunks)
            self._chunks = {}
            self._bytes_live = 0
            self._on_allocate_locked()
            self._not_full.notify_all()
            self._not_empty.notify_all()

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    @property
    def capacity(self) -> int:
        """Effective capacity (requested capacity until the first put applies ``capacity_bytes``)."""
        with self._lock:
            return self._capacity

    @property
    def watermark(self) -> int:
        """Effective watermark (clamped to the effective capacity)."""
        with self._lock:
            return self._watermark

    @property
    def dims(self) -> tuple[int, int] | None:
        """``(dx, dy)`` once fixed by the first put, else ``None``."""
        with self._lock:
            return None if self._dx is None else (self._dx, int(self._dy or 0))

    def __len__(self) -> int:
        with self._lock:
            return self._held

    def received_by_sim(self) -> dict[int, int]:
        """``{sim_id: number of distinct time indices delivered}`` over the buffer's lifetime.

        Counts samples taken into the stream (for FIFO/FIRO: inserted; for the reservoir:
        offered, whether stored or discarded); duplicates are not counted.
        """
        with self._lock:
            return dict(self._received_by_sim)

    def stats(self) -> dict[str, Any]:
        """Snapshot of counters (all plain Python types).

        Keys: ``policy``, ``held``, ``capacity`` (effective), ``capacity_requested``,
        ``watermark`` (effective), ``watermark_reached``, ``received`` (non-duplicate samples
        taken into the stream), ``duplicates``, ``evicted`` (reservoir: replaced or discarded
        samples, always ``received - held``; 0 for FIFO/FIRO which never drop), ``consumed``
        (samples returned by take, counting repeats), ``samples_seen_total`` (same as
        ``consumed``), ``seen_mean`` / ``seen_max`` (times the held samples have been returned;
        0 for FIFO/FIRO, whose samples leave on their first return), ``closed``, ``bytes_held``
        (the held samples' own bytes), ``bytes_live`` (the live chunks' bytes), ``chunks_live``,
        ``chunks_released``, ``compactions``, ``rows_compacted``, ``compaction_errors``,
        ``bytes_per_sample`` (0 before the first put), ``dx``, ``dy`` (``None`` before the first
        put), ``n_sims`` (distinct simulation ids received).
        """
        with self._lock:
            if self._held and self._seen.size:
                seen = self._seen[self._held_slots_locked()]
                seen_mean, seen_max = float(seen.mean()), int(seen.max())
            else:
                seen_mean, seen_max = 0.0, 0
            return {
                "policy": self.policy,
                "held": self._held,
                "capacity": self._capacity,
                "capacity_requested": self._requested_capacity,
                "watermark": self._watermark,
                "watermark_reached": self._watermark_reached,
                "received": self._received,
                "duplicates": self._duplicates,
                "evicted": self._evicted,
                "consumed": self._consumed,
                "samples_seen_total": self._consumed,
                "seen_mean": seen_mean,
                "seen_max": seen_max,
                "closed": self._closed,
                "bytes_held": self._held * self._bps,
                "bytes_live": self._bytes_live,
                "chunks_live": sum(1 for e in self._chunks.values() if e.live),
                "chunks_released": self._released,
                "compactions": self._compactions,
                "rows_compacted": self._rows_compacted,
                "compaction_errors": self._compaction_errors,
                "bytes_per_sample": self._bps,
                "dx": self._dx,
                "dy": self._dy,
                "n_sims": len(self._received_by_sim),
            }

    # ------------------------------------------------------------------ policy hooks

    def _insert_locked(self, cid: int, sim: np.ndarray, t: np.ndarray, rows: np.ndarray, deadline: float | None) -> int:
        raise NotImplementedError

    def _take_locked(self, batch_size: int) -> np.ndarray:
        """The slots of the batch, in batch order (removed from the held set by removing policies)."""
        raise NotImplementedError

    def _held_slots_locked(self) -> np.ndarray:
        """Index of the slots currently holding samples."""
        raise NotImplementedError

    def _on_allocate_locked(self) -> None:
        """(Re)set policy-specific slot bookkeeping once the capacity is final."""

    # ------------------------------------------------------------------ shared helpers (lock held)

    def _check_dims(self, dx: int, dy: int) -> None:
        if (dx, dy) != (self._dx, self._dy):
            raise ValueError(f"chunk dims mismatch: expected (dx, dy) = ({self._dx}, {self._dy}), got ({dx}, {dy})")

    def _ensure_storage(self, dx: int, dy: int) -> None:
        if self._dx is not None:
            self._check_dims(dx, dy)
            return
        bps = 4 * (dx + dy)
        capacity = self._requested_capacity
        if self._capacity_bytes is not None:
            # Half the byte budget for the held samples, half for the rest of the chunks they keep alive.
            by_bytes = self._capacity_bytes // (2 * max(1, bps))
            if by_bytes < 1:
                raise ValueError(
                    f"capacity_bytes={self._capacity_bytes} cannot hold one sample of {bps} bytes (dx={dx}, dy={dy}) "
                    "with room for its chunk (twice the sample's bytes)"
                )
            capacity = min(capacity, by_bytes)
        self._capacity = capacity
        # Clamp: a watermark above what the buffer can ever hold would block training forever.
        self._watermark = min(self._requested_watermark, capacity)
        self._slot_chunk = np.full(capacity, -1, dtype=np.int64)
        self._slot_row = np.zeros(capacity, dtype=np.int64)
        self._slot_sim = np.zeros(capacity, dtype=np.int64)
        self._slot_t = np.zeros(capacity, dtype=np.int64)
        self._seen = np.zeros(capacity, dtype=np.int64)
        self._dx, self._dy, self._bps = dx, dy, bps
        self._on_allocate_locked()

    def _fill_slots_locked(self, slots: Any, cid: int, rows: np.ndarray, sim: np.ndarray, t: np.ndarray) -> None:
        """Point ``slots`` at rows ``rows`` of chunk ``cid`` (their keys ``sim``/``t``); the slots were free."""
        self._slot_chunk[slots] = cid
        self._slot_row[slots] = rows
        self._slot_sim[slots] = sim[rows]
        self._slot_t[slots] = t[rows]
        self._seen[slots] = 0
        entry = self._chunks[cid]
        if entry.live == 0:
            self._bytes_live += entry.nbytes
        entry.live += int(rows.size)

    def _unref_locked(self, cids: np.ndarray) -> None:
        """The slots of ``cids`` (one entry per slot) no longer hold their rows; free chunks left with none."""
        if cids.size == 0:
            return
        uniq, counts = np.unique(cids, return_counts=True)
        for cid, n in zip(uniq.tolist(), counts.tolist(), strict=True):
            entry = self._chunks[cid]
            entry.live -= n
            if entry.live == 0:
                self._bytes_live -= entry.nbytes
                if cid not in self._pinned:  # a put still inserting keeps its chunk; it frees it itself
                    del self._chunks[cid]
                    self._released += 1

    def _maybe_compact_locked(self) -> None:
        """When the live bytes exceed their bound, copy the held rows of chunks less than half held into one chunk."""
        if not self._held:
            return
        limit = self._capacity_bytes if self._capacity_bytes is not None else 2 * self._capacity * self._bps
        if self._bytes_live <= limit:
            return
        sparse = [c for c, e in self._chunks.items() if e.live and 2 * e.live < e.rows and c not in self._pinned]
        if not sparse:
            return
        held = np.asarray(self._held_slots_locked(), dtype=np.int64).reshape(-1)
        cids = self._slot_chunk[held]
        mask = np.isin(cids, np.asarray(sparse, dtype=np.int64))
        slots, owners = held[mask], cids[mask]
        order = np.argsort(owners, kind="stable")
        slots, owners = slots[order], owners[order]
        cuts = np.flatnonzero(np.diff(owners)) + 1
        groups = np.split(slots, cuts)
        segments = [(self._chunks[int(self._slot_chunk[g[0]])].payload, self._slot_row[g]) for g in groups]
        try:
            payload = self._compact(segments)
        except Exception:
            # Nothing changed: the sparse chunks stay as they are; the next put tries again.
            self._compaction_errors += 1
            return
        cid = self._next_chunk
        self._next_chunk += 1
        n = int(slots.size)
        self._chunks[cid] = _Entry(payload, n, n * self._bps, live=n)
        self._bytes_live += n * self._bps
        self._slot_chunk[slots] = cid
        self._slot_row[slots] = np.arange(n, dtype=np.int64)
        for old in sparse:
            self._bytes_live -= self._chunks.pop(old).nbytes
        self._released += len(sparse)
        self._compactions += 1
        self._rows_compacted += n

    def _known_mask(self, sim: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Mask of rows whose key is already in the dedup memory."""
        known = np.zeros(sim.shape[0], dtype=bool)
        for s, rows in _groups_by_sim(sim):
            keys = self._keys.get(s)
            if keys is not None:
                known[rows] = keys.contains(t[rows])
        return known

    def _remember_keys(self, sim: np.ndarray, t: np.ndarray) -> None:
        for s, rows in _groups_by_sim(sim):
            keys = self._keys.get(s)
            if keys is None:
                keys = self._keys[s] = _SimKeys()
            keys.add(t[rows])

    def _forget_keys(self, sim: np.ndarray, t: np.ndarray) -> None:
        for s, rows in _groups_by_sim(sim):
            keys = self._keys.get(s)
            if keys is not None:
                keys.remove(t[rows])

    def _count_received(self, sim: np.ndarray) -> None:
        self._received += sim.shape[0]
        for s, rows in _groups_by_sim(sim):
            self._received_by_sim[s] += rows.size

    def _after_insert(self) -> None:
        if not self._watermark_reached and self._held >= self._watermark:
            self._watermark_reached = True
        self._not_empty.notify_all()


class _BlockingBuffer(Buffer):
    """Shared put logic of FIFO and FIRO: insert what fits, wait on ``not_full`` for the rest."""

    def _insert_locked(self, cid: int, sim: np.ndarray, t: np.ndarray, rows: np.ndarray, deadline: float | None) -> int:
        # Reserve all keys now so a concurrent re-send of the same samples is dropped as duplicate
        # while we wait; the keys of rows we end up not inserting are released again below.
        self._remember_keys(sim[rows], t[rows])
        pos = 0
        try:
            while pos < rows.size:
                # Closed first: once closed (or dropped) nothing more goes in, even where space was freed.
                if self._closed:
                    raise BufferClosed(
                        f"{self.policy} buffer closed during put; {pos} of {rows.size} new samples inserted",
                        inserted=pos,
                    )
                free = self._capacity - self._held
                if free > 0:
                    take = rows[pos : pos + free]
                    self._store_locked(cid, take, sim, t)
                    self._count_received(sim[take])
                    pos += take.size
                    self._after_insert()
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PutTimeoutError(
                        f"{self.policy} buffer full: put timed out after inserting {pos} of {rows.size} new samples; "
                        "re-sending the same chunk inserts only the rest",
                        inserted=pos,
                        remaining=int(rows.size - pos),
                    )
                self._not_full.wait(remaining)
        finally:
            if pos < rows.size:
                rest = rows[pos:]
                self._forget_keys(sim[rest], t[rest])
        return int(rows.size)

    def _store_locked(self, cid: int, rows: np.ndarray, sim: np.ndarray, t: np.ndarray) -> None:
        raise NotImplementedError


class FifoBuffer(_BlockingBuffer):
    """FIFO: ``take`` removes and returns the oldest ``min(batch_size, held)`` samples.

    Every sample is returned exactly once, in insertion order. Producers block while the buffer
    is full. The slots are a ring (head + count).
    """

    policy = "fifo"

    def _on_allocate_locked(self) -> None:
        self._head = 0  # slot of the oldest sample

    def _ring(self, start: int, n: int) -> np.ndarray:
        return (start + np.arange(n, dtype=np.int64)) % self._capacity

    def _store_locked(self, cid: int, rows: np.ndarray, sim: np.ndarray, t: np.ndarray) -> None:
        idx = self._ring((self._head + self._held) % self._capacity, rows.size)
        self._fill_slots_locked(idx, cid, rows, sim, t)
        self._held += rows.size

    def _take_locked(self, batch_size: int) -> np.ndarray:
        b = min(batch_size, self._held)
        idx = self._ring(self._head, b)
        self._seen[idx] += 1
        self._head = (self._head + b) % self._capacity
        self._held -= b
        return idx

    def _held_slots_locked(self) -> np.ndarray:
        return self._ring(self._head, self._held)


class FiroBuffer(_BlockingBuffer):
    """FIRO (first in, random out): ``take`` removes and returns ``min(batch_size, held)`` samples
    chosen uniformly at random without replacement among those held, in random order.

    Every sample is returned exactly once. Producers block while the buffer is full. Slots are
    tracked by a permutation ``perm`` of ``0..capacity-1`` whose first ``held`` entries are the
    occupied slots (the rest is the free list); removal is a vectorised swap-remove.
    """

    policy = "firo"

    def _on_allocate_locked(self) -> None:
        self._perm = np.arange(self._capacity, dtype=np.int64)

    def _store_locked(self, cid: int, rows: np.ndarray, sim: np.ndarray, t: np.ndarray) -> None:
        slots = self._perm[self._held : self._held + rows.size]
        self._fill_slots_locked(slots, cid, rows, sim, t)
        self._held += rows.size

    def _take_locked(self, batch_size: int) -> np.ndarray:
        n = self._held
        b = min(batch_size, n)
        picks = self._rng.choice(n, size=b, replace=False)  # positions in perm[:n], random order
        slots = self._perm[picks].copy()
        self._seen[slots] += 1
        # Swap-remove: move the picked positions into the tail perm[n-b:n], then shrink held by b.
        # Picks already in the tail stay; each pick in the head swaps with an unpicked tail position.
        cut = n - b
        in_tail = np.zeros(b, dtype=bool)
        tail_picks = picks[picks >= cut]
        in_tail[tail_picks - cut] = True
        head_picks = picks[picks < cut]
        free_tail = cut + np.flatnonzero(~in_tail)
        self._perm[head_picks], self._perm[free_tail] = self._perm[free_tail], self._perm[head_picks].copy()
        self._held = cut
        return slots

    def _held_slots_locked(self) -> np.ndarray:
        return self._perm[: self._held]


class ReservoirBuffer(Buffer):
    """Reservoir (Vitter's Algorithm R): a uniform random sample of the whole stream.

    Put never blocks (``timeout`` is ignored). The ``i``-th non-duplicate sample of the stream
    (1-based, counting every sample ever offered) is stored while the buffer is not full; once
    full it replaces a uniformly random slot with probability ``capacity / i``, else it is
    discarded. Replaced and discarded samples count as ``evicted``; ``put`` returns the number of
    samples offered. A chunk is processed as if its rows arrived one by one, in order (when two
    rows of a chunk pick the same slot, the later one wins).

    ``take`` returns exactly ``batch_size`` samples drawn uniformly at random *without removal*:
    without replacement within the call when ``held >= batch_size``, with replacement otherwise;
    the same sample may appear in later batches. Each slot's seen-count records how many times
    its sample has been returned.
    """

    policy = "reservoir"
    removes = False

    def _insert_locked(self, cid: int, sim: np.ndarray, t: np.ndarray, rows: np.ndarray, deadline: float | None) -> int:
        self._remember_keys(sim[rows], t[rows])
        m = rows.size
        offered_before = self._received
        # Fill phase: while not full, stream samples go to the next free slot.
        fill = min(m, self._capacity - self._held)
        if fill:
            self._fill_slots_locked(np.arange(self._held, self._held + fill), cid, rows[:fill], sim, t)
            self._held += fill
        rest = rows[fill:]
        if rest.size:
            # Stream index i (1-based) of each remaining row; slot j ~ U{0..i-1} is kept iff
            # j < capacity, which is "replace a uniform slot with probability capacity / i".
            i = offered_before + fill + 1 + np.arange(rest.size, dtype=np.int64)
            j = self._rng.integers(0, i)
            keep = j < self._capacity
            slots, src = j[keep], rest[keep]
            if slots.size:
                # Sequential semantics: for a slot hit several times the last row wins. Keep the
                # last occurrence explicitly (numpy does not promise an order for repeated indices).
                _, last_rev = np.unique(slots[::-1], return_index=True)
                last = slots.size - 1 - last_rev
                slots, src = slots[last], src[last]
                # The occupants let go of their chunks before the new rows take the slots.
                self._unref_locked(self._slot_chunk[slots])
                self._fill_slots_locked(slots, cid, src, sim, t)
            # Each row past the fill phase evicts exactly one sample: the occupant it replaced or itself.
            self._evicted += int(rest.size)
        self._count_received(sim[rows])
        self._after_insert()
        return int(m)

    def _take_locked(self, batch_size: int) -> np.ndarray:
        n = self._held
        if n >= batch_size:
            idx = self._rng.choice(n, size=batch_size, replace=False)
        else:
            idx = self._rng.integers(0, n, size=batch_size)
        # np.add.at counts repeated indices (possible when drawing with replacement).
        np.add.at(self._seen, idx, 1)
        return idx.astype(np.int64)

    def _held_slots_locked(self) -> np.ndarray:
        return np.arange(self._held, dtype=np.int64)


POLICIES: dict[str, type[Buffer]] = {"fifo": FifoBuffer, "firo": FiroBuffer, "reservoir": ReservoirBuffer}


def make_buffer(
    policy: str,
    capacity: int,
    watermark: int,
    capacity_bytes: int | None = None,
    seed: int = 0,
    compact: Callable[[Sequence[tuple[Any, np.ndarray]]], Any] = compact_arrays,
) -> Buffer:
    """Build a buffer.

    ``policy`` is one of ``"fifo"``, ``"firo"``, ``"reservoir"`` (case-insensitive).
    ``capacity >= 1`` samples; ``0 <= watermark <= capacity``; optional ``capacity_bytes`` caps
    the capacity to ``capacity_bytes // (2 * 4 * (dx + dy))`` once the first chunk fixes the dims
    (watermark clamped to the result) and bounds the live chunks' bytes; ``seed`` seeds the
    policy's numpy ``Generator``; ``compact`` builds one payload from the held rows of sparse
    chunks (see :class:`Buffer`). Raises ``ValueError`` naming the offending argument.
    """
    key = policy.lower() if isinstance(policy, str) else policy
    if key not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[key](capacity, watermark, capacity_bytes=capacity_bytes, seed=seed, compact=compact)
