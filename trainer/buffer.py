"""Bounded in-memory sample buffers for online surrogate training (Melissa, ICML 2023).

Solver processes stream samples into a buffer with :meth:`Buffer.put`; trainer processes pull
mini-batches with :meth:`Buffer.get`. A sample is a pair of float32 vectors ``x [dx]`` and
``y [dy]`` (``y`` is a flattened field; callers reshape) identified by an integer simulation id
and an integer time index. Samples travel in :class:`Chunk` s of ``k`` rows.

Three policies (see the class docstrings for the exact semantics):

* ``"fifo"``  -- :class:`FifoBuffer`: oldest samples out first, each sample returned exactly once,
  producers block while the buffer is full (backpressure).
* ``"firo"``  -- :class:`FiroBuffer`: first in, random out; each sample returned exactly once,
  in uniformly random order among those held; producers block while full.
* ``"reservoir"`` -- :class:`ReservoirBuffer`: Vitter's Algorithm R; the buffer always holds a
  uniform random sample of the whole stream; producers never block; batches are drawn
  *without removal*, so samples are revisited across batches.

Common behaviour:

* **Storage.** Samples live in preallocated contiguous ``X[capacity, dx]`` / ``Y[capacity, dy]``
  float32 arrays allocated at the first non-empty put, which fixes ``dx`` / ``dy`` for good.
  ``get`` returns contiguous copies, so callers never alias buffer memory.
* **Byte cap.** With ``capacity_bytes``, the effective capacity becomes
  ``min(capacity, capacity_bytes // bytes_per_sample)`` once the first chunk fixes the sample
  size, where ``bytes_per_sample = 4 * (dx + dy)`` (the X/Y payload; the 8-byte per-slot
  seen-counter is not counted). If that is < 1 the put raises ``ValueError``. If the watermark
  exceeds the effective capacity it is clamped to it (otherwise training could never start).
* **Validation.** A chunk with mismatched row counts, wrong dimensions, non-integer ids or any
  non-finite value (NaN/inf) in ``x`` or ``y`` raises ``ValueError`` and *nothing* of it is
  accepted.
* **Deduplication.** The buffer remembers every ``(sim_id, t_index)`` key it has ever received
  (also after the sample left the buffer). A sample with a known key -- or repeated inside the
  same chunk -- is dropped silently and counted in ``stats()["duplicates"]``. This makes a
  producer that re-sends a whole simulation after a crash, or retries a timed-out put,
  idempotent. Keys are kept per simulation in a sorted int64 array (8 bytes per key) plus a small
  set of recent keys merged into it in amortised O(1) per key.
* **Watermark.** No ``get`` returns anything until the number of samples held has reached
  ``watermark`` at least once. After that, gets keep serving even when the fill drops below
  the watermark (training must not stall). If the buffer is closed before the watermark is
  reached, gets proceed with whatever is held.
* **Short batches.** Once the watermark has been reached, FIFO/FIRO ``get`` returns
  ``min(batch_size, held)`` samples as soon as at least one is held rather than waiting for a
  full batch. The reservoir always returns exactly ``batch_size`` samples (drawing with
  replacement within the call only when fewer than ``batch_size`` are held).
* **End of stream.** After :meth:`Buffer.close`, puts raise :class:`BufferClosed`; FIFO/FIRO gets
  drain what is left and then return ``None``; reservoir gets keep sampling the held set and
  return ``None`` only if it is empty.
* **Threads.** All methods are safe to call concurrently from several threads (the buffer is
  served by a threaded Ray actor): one lock, with a ``not_full`` condition for producers and a
  ``not_empty`` condition for consumers.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "POLICIES",
    "Buffer",
    "BufferClosed",
    "Chunk",
    "FifoBuffer",
    "FiroBuffer",
    "PutTimeoutError",
    "ReservoirBuffer",
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


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; `capacity=True` is almost certainly a bug, so reject it.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _validate_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x, y, sim_id, t_index)`` as float32 / int64 arrays or raise ``ValueError``.

    Done before the lock is taken (it only reads the chunk) so that an invalid chunk is
    rejected as a whole and never holds up other threads.
    """
    x = np.asarray(chunk.x)
    y = np.asarray(chunk.y)
    sim = np.asarray(chunk.sim_id)
    t = np.asarray(chunk.t_index)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"chunk.x and chunk.y must be 2-D [k, d], got shapes {x.shape} and {y.shape}")
    if sim.ndim != 1 or t.ndim != 1:
        raise ValueError(f"chunk.sim_id and chunk.t_index must be 1-D [k], got shapes {sim.shape} and {t.shape}")
    k = x.shape[0]
    if not (y.shape[0] == sim.shape[0] == t.shape[0] == k):
        raise ValueError(
            f"chunk fields disagree on the number of samples k: x {x.shape[0]}, y {y.shape[0]}, "
            f"sim_id {sim.shape[0]}, t_index {t.shape[0]}"
        )
    for name, arr in (("x", x), ("y", y)):
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"chunk.{name} must be real numeric, got dtype {arr.dtype}")
    for name, arr in (("sim_id", sim), ("t_index", t)):
        # An empty list becomes float64; that carries no value, so let it through.
        if arr.dtype.kind not in "iu" and arr.size:
            raise ValueError(f"chunk.{name} must be integer, got dtype {arr.dtype}")
    # Cast first, then test: a float64 value beyond float32 range would become inf in storage.
    with np.errstate(over="ignore"):  # overflow -> inf, reported just below
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("chunk.x contains non-finite values (NaN or inf); chunk rejected")
    if not np.isfinite(y).all():
        raise ValueError("chunk.y contains non-finite values (NaN or inf); chunk rejected")
    return x, y, sim.astype(np.int64, copy=False), t.astype(np.int64, copy=False)


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


class Buffer:
    """Base class: storage, validation, deduplication, watermark, statistics and locking.

    Subclasses implement the policy hooks ``_insert_locked`` (called from ``put`` with the lock
    held and the deduplicated rows) and ``_take_locked`` (called from ``get`` with the lock held
    and at least one sample present). Use :func:`make_buffer` to construct one.
    """

    policy: ClassVar[str] = ""

    def __init__(self, capacity: int, watermark: int, capacity_bytes: int | None = None, seed: int = 0) -> None:
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

        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)  # producers wait here (FIFO/FIRO)
        self._not_empty = threading.Condition(self._lock)  # consumers wait here

        # Storage, allocated at the first put (dims unknown before).
        self._dx: int | None = None
        self._dy: int | None = None
        self._X: np.ndarray | None = None
        self._Y: np.ndarray | None = None
        self._seen: np.ndarray | None = None  # per-slot count of times returned by get
        self._held = 0

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
        """Insert the samples of ``chunk``; return how many new (non-duplicate) samples were taken.

        Duplicates (keys received before, or repeated inside the chunk) are dropped and counted.
        FIFO/FIRO block while full: they insert what fits, wait for gets to free space, and so
        on until the whole chunk is in. If ``timeout`` (seconds; ``None`` = wait forever, 0 =
        don't wait) expires first, :class:`PutTimeoutError` (a ``TimeoutError``) is raised
        *after* inserting what fitted -- retrying the same chunk is safe thanks to dedup. The
        reservoir never blocks and returns the number of samples offered to the reservoir
        (each is then stored or discarded per Algorithm R; discards count as ``evicted``).

        Raises ``ValueError`` for an invalid chunk (nothing inserted) and :class:`BufferClosed`
        if the buffer is closed (also when closed while this put waits for space).
        """
        x, y, sim, t = _validate_chunk(chunk)
        first = _first_occurrences(sim, t)
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        with self._lock:
            if self._closed:
                raise BufferClosed(f"put on a closed {self.policy} buffer")
            if x.shape[0] == 0:
                if self._dx is not None:
                    self._check_dims(x.shape[1], y.shape[1])
                return 0
            self._ensure_storage(x.shape[1], y.shape[1])
            new = first & ~self._known_mask(sim, t)
            rows = np.flatnonzero(new)
            self._duplicates += sim.shape[0] - rows.size
            if rows.size == 0:
                return 0
            return self._insert_locked(x, y, sim, t, rows, deadline)

    def get(self, batch_size: int, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Return a batch ``(X [b, dx], Y [b, dy])`` of copies, or ``None`` at end of stream.

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
            xb, yb = self._take_locked(batch_size)
            self._consumed += xb.shape[0]
            return xb, yb

    def close(self) -> None:
        """Refuse further puts and wake every waiting producer and consumer."""
        with self._lock:
            self._closed = True
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
        (samples returned by get, counting repeats), ``samples_seen_total`` (same as
        ``consumed``), ``seen_mean`` / ``seen_max`` (times the held samples have been returned;
        0 for FIFO/FIRO, whose samples leave on their first return), ``closed``, ``bytes_held``,
        ``bytes_per_sample`` (0 before the first put), ``dx``, ``dy`` (``None`` before the first
        put), ``n_sims`` (distinct simulation ids received).
        """
        with self._lock:
            bps = 0 if self._dx is None else 4 * (self._dx + int(self._dy or 0))
            if self._held and self._seen is not None:
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
                "bytes_held": self._held * bps,
                "bytes_per_sample": bps,
                "dx": self._dx,
                "dy": self._dy,
                "n_sims": len(self._received_by_sim),
            }

    # ------------------------------------------------------------------ policy hooks

    def _insert_locked(
        self, x: np.ndarray, y: np.ndarray, sim: np.ndarray, t: np.ndarray, rows: np.ndarray, deadline: float | None
    ) -> int:
        raise NotImplementedError

    def _take_locked(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _held_slots_locked(self) -> np.ndarray | slice:
        """Index of the slots currently holding samples (for statistics)."""
        raise NotImplementedError

    def _on_allocate_locked(self) -> None:
        """Allocate policy-specific slot bookkeeping once the capacity is final."""

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
            by_bytes = self._capacity_bytes // bps
            if by_bytes < 1:
                raise ValueError(
                    f"capacity_bytes={self._capacity_bytes} cannot hold one sample of {bps} bytes (dx={dx}, dy={dy})"
                )
            capacity = min(capacity, by_bytes)
        self._capacity = capacity
        # Clamp: a watermark above what the buffer can ever hold would block training forever.
        self._watermark = min(self._requested_watermark, capacity)
        self._X = np.empty((capacity, dx), dtype=np.float32)
        self._Y = np.empty((capacity, dy), dtype=np.float32)
        self._seen = np.zeros(capacity, dtype=np.int64)
        self._dx, self._dy = dx, dy
        self._on_allocate_locked()

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

    def _insert_locked(
        self, x: np.ndarray, y: np.ndarray, sim: np.ndarray, t: np.ndarray, rows: np.ndarray, deadline: float | None
    ) -> int:
        # Reserve all keys now so a concurrent re-send of the same samples is dropped as duplicate
        # while we wait; the keys of rows we end up not inserting are released again below.
        self._remember_keys(sim[rows], t[rows])
        pos = 0
        try:
            while pos < rows.size:
                free = self._capacity - self._held
                if free > 0:
                    take = rows[pos : pos + free]
                    self._store_locked(x[take], y[take])
                    self._count_received(sim[take])
                    pos += take.size
                    self._after_insert()
                    continue
                if self._closed:
                    raise BufferClosed(
                        f"{self.policy} buffer closed during put; {pos} of {rows.size} new samples inserted",
                        inserted=pos,
                    )
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

    def _store_locked(self, x: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _removed_locked(self) -> None:
        self._not_full.notify_all()


class FifoBuffer(_BlockingBuffer):
    """FIFO: ``get`` removes and returns the oldest ``min(batch_size, held)`` samples.

    Every sample is returned exactly once, in insertion order. Producers block while the buffer
    is full. Storage is a ring over the preallocated arrays (head + count).
    """

    policy = "fifo"

    def _on_allocate_locked(self) -> None:
        self._head = 0  # slot of the oldest sample

    def _ring(self, start: int, n: int) -> np.ndarray | slice:
        # A plain slice (cheap view/copy) unless the range wraps around the end.
        if start + n <= self._capacity:
            return slice(start, start + n)
        return (start + np.arange(n)) % self._capacity

    def _store_locked(self, x: np.ndarray, y: np.ndarray) -> None:
        assert self._X is not None and self._Y is not None and self._seen is not None
        idx = self._ring((self._head + self._held) % self._capacity, x.shape[0])
        self._X[idx] = x
        self._Y[idx] = y
        self._seen[idx] = 0
        self._held += x.shape[0]

    def _take_locked(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._X is not None and self._Y is not None and self._seen is not None
        b = min(batch_size, self._held)
        idx = self._ring(self._head, b)
        xb, yb = self._X[idx].copy(), self._Y[idx].copy()  # copy: the slots get reused
        self._seen[idx] += 1
        self._head = (self._head + b) % self._capacity
        self._held -= b
        self._removed_locked()
        return xb, yb

    def _held_slots_locked(self) -> np.ndarray | slice:
        return self._ring(self._head, self._held)


class FiroBuffer(_BlockingBuffer):
    """FIRO (first in, random out): ``get`` removes and returns ``min(batch_size, held)`` samples
    chosen uniformly at random without replacement among those held, in random order.

    Every sample is returned exactly once. Producers block while the buffer is full. Slots are
    tracked by a permutation ``perm`` of ``0..capacity-1`` whose first ``held`` entries are the
    occupied slots (the rest is the free list); removal is a vectorised swap-remove.
    """

    policy = "firo"

    def _on_allocate_locked(self) -> None:
        self._perm = np.arange(self._capacity, dtype=np.int64)

    def _store_locked(self, x: np.ndarray, y: np.ndarray) -> None:
        assert self._X is not None and self._Y is not None and self._seen is not None
        n = x.shape[0]
        slots = self._perm[self._held : self._held + n]
        self._X[slots] = x
        self._Y[slots] = y
        self._seen[slots] = 0
        self._held += n

    def _take_locked(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._X is not None and self._Y is not None and self._seen is not None
        n = self._held
        b = min(batch_size, n)
        picks = self._rng.choice(n, size=b, replace=False)  # positions in perm[:n], random order
        slots = self._perm[picks]
        xb, yb = self._X[slots], self._Y[slots]  # fancy indexing copies
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
        self._removed_locked()
        return xb, yb

    def _held_slots_locked(self) -> np.ndarray | slice:
        return self._perm[: self._held]


class ReservoirBuffer(Buffer):
    """Reservoir (Vitter's Algorithm R): a uniform random sample of the whole stream.

    Put never blocks (``timeout`` is ignored). The ``i``-th non-duplicate sample of the stream
    (1-based, counting every sample ever offered) is stored while the buffer is not full; once
    full it replaces a uniformly random slot with probability ``capacity / i``, else it is
    discarded. Replaced and discarded samples count as ``evicted``; ``put`` returns the number of
    samples offered. A chunk is processed as if its rows arrived one by one, in order (when two
    rows of a chunk pick the same slot, the later one wins).

    ``get`` returns exactly ``batch_size`` samples drawn uniformly at random *without removal*:
    without replacement within the call when ``held >= batch_size``, with replacement otherwise;
    the same sample may appear in later batches. Each slot's seen-count records how many times
    its sample has been returned.
    """

    policy = "reservoir"

    def _insert_locked(
        self, x: np.ndarray, y: np.ndarray, sim: np.ndarray, t: np.ndarray, rows: np.ndarray, deadline: float | None
    ) -> int:
        assert self._X is not None and self._Y is not None and self._seen is not None
        self._remember_keys(sim[rows], t[rows])
        m = rows.size
        offered_before = self._received
        # Fill phase: while not full, stream samples go to the next free slot.
        fill = min(m, self._capacity - self._held)
        if fill:
            head = rows[:fill]
            sl = slice(self._held, self._held + fill)
            self._X[sl] = x[head]
            self._Y[sl] = y[head]
            self._seen[sl] = 0
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
                self._X[slots] = x[src]
                self._Y[slots] = y[src]
                self._seen[slots] = 0
            # Each row past the fill phase evicts exactly one sample: the occupant it replaced or itself.
            self._evicted += int(rest.size)
        self._count_received(sim[rows])
        self._after_insert()
        return int(m)

    def _take_locked(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._X is not None and self._Y is not None and self._seen is not None
        n = self._held
        if n >= batch_size:
            idx = self._rng.choice(n, size=batch_size, replace=False)
        else:
            idx = self._rng.integers(0, n, size=batch_size)
        # np.add.at counts repeated indices (possible when drawing with replacement).
        np.add.at(self._seen, idx, 1)
        return self._X[idx], self._Y[idx]

    def _held_slots_locked(self) -> np.ndarray | slice:
        return slice(0, self._held)


POLICIES: dict[str, type[Buffer]] = {"fifo": FifoBuffer, "firo": FiroBuffer, "reservoir": ReservoirBuffer}


def make_buffer(policy: str, capacity: int, watermark: int, capacity_bytes: int | None = None, seed: int = 0) -> Buffer:
    """Build a buffer.

    ``policy`` is one of ``"fifo"``, ``"firo"``, ``"reservoir"`` (case-insensitive).
    ``capacity >= 1`` samples; ``0 <= watermark <= capacity``; optional ``capacity_bytes`` caps
    the capacity to ``capacity_bytes // (4 * (dx + dy))`` once the first chunk fixes the dims
    (watermark clamped to the result); ``seed`` seeds the policy's numpy ``Generator``.
    Raises ``ValueError`` naming the offending argument.
    """
    key = policy.lower() if isinstance(policy, str) else policy
    if key not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[key](capacity, watermark, capacity_bytes=capacity_bytes, seed=seed)
