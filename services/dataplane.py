"""The data plane of a study: solver chunks into Ray's object store once, references through buffer shards.

A producer validates a chunk of samples ``(x, y, sim_id, t_index)`` and writes it once into the
object store: a solver actor yields it from a streaming generator (so that the object belongs to
the study driver and outlives a solver that dies), the gRPC ingest server ``ray.put`` s it
(:class:`ShardRouter`). The shard it is for receives only the ``ObjectRef``. Each trainer
rank draws from its own shard: the shard answers with :class:`trainer.buffer.Batch` es (references
and row indices), and the rank gathers the rows from zero-copy views of the chunks into its batch
tensors, the one copy of the way (:class:`ShardBatches`), in a thread that runs ahead of the step.

Routing: sample ``(i, t)`` goes to shard ``(i // group + t // block) % n``, where ``group`` is the
number of simulations a solver call runs together and ``block`` the recorded steps per chunk. A
chunk (``block`` steps of one call's simulations) then lands whole on one shard (no split, no
copy), and the chunks of every call rotate over all shards, so that each trainer rank's shard is
fed by every running call: ranks step together (DDP), and a rank whose shard were fed only by
calls blocked on a full shard would starve the others for ever. The shard of a sample depends on
its key alone, so a sample that is produced again -- a killed actor's call re-run by Ray, a failed
simulation handed out again -- goes back to the shard that has it, whose key memory drops it:
exactly once across shards. The forwarder hands a call's chunks to their shards without waiting
for one before the next (:func:`forward_chunks`), so a full shard holds back only its own chunks.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
import torch

from trainer.buffer import Batch, BufferClosed, Chunk, assemble, check_chunk

FAILED, STARTED, ENDED = -1, -2, -3  # the shard index of message heads in a solver's stream (see forward_chunks)
SHARDS_WAIT_S = 600.0  # how long a producer waits for the trainer ranks to register their shards
VIEW_TTL_CALLS = 8  # a trainer rank lets go of a chunk it has not drawn from in this many requests


class ShardsUnavailable(RuntimeError):
    """The study's buffer shards did not appear in time (the trainer never started)."""


def shard_of(sim_id: np.ndarray, t_index: np.ndarray, n: int, group: int, block: int = 1) -> np.ndarray:
    """The shard index of each sample ``(sim_id, t_index)`` (see the module docstring)."""
    sim, t = np.asarray(sim_id, dtype=np.int64), np.asarray(t_index, dtype=np.int64)
    return (sim // max(1, group) + t // max(1, block)) % n


def _is_closed(e: BaseException) -> bool:
    cause = getattr(e, "cause", None)
    return isinstance(cause, BufferClosed) or "BufferClosed" in str(e)


def split_by_shard(
    sim_id: np.ndarray, t_index: np.ndarray, n: int, group: int, block: int = 1
) -> list[tuple[int, np.ndarray | None]]:
    """``[(shard, rows), ...]`` of a chunk; ``rows`` is None when the whole chunk goes to one shard (no copy)."""
    where = shard_of(sim_id, t_index, n, group, block)
    if where.size == 0 or (where == where[0]).all():
        return [(int(where[0]) if where.size else 0, None)]
    return [(int(s), np.flatnonzero(where == s)) for s in np.unique(where)]


def shard_parts(
    chunk: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], n: int, group: int, block: int = 1
) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
    """``(shard, part)`` for each shard a checked chunk ``(x, y, sim_id, t_index)`` has rows for
    (the chunk itself, uncopied, when it goes whole to one shard)."""
    x, y, sid, tix = chunk
    for s, rows in split_by_shard(sid, tix, n, group, block):
        yield s, chunk if rows is None else (x[rows], y[rows], sid[rows], tix[rows])


def chunk_keys(x: np.ndarray, y: np.ndarray, sim_id: np.ndarray, t_index: np.ndarray) -> tuple[Any, ...]:
    """What a shard needs of a checked chunk, sent beside its reference: ``(sim_id, t_index, nbytes, (dx, dy))``.

    A few bytes per sample, so the shard never maps the chunk itself (that cost a round trip to the
    chunk's owner and a few ms per chunk, the largest share of a small chunk's cost).
    """
    return sim_id, t_index, int(x.nbytes + y.nbytes), (int(x.shape[1]), int(y.shape[1]))


def _settle(pending: Any) -> int:
    """Wait for one ``BufferShard.put``; its rows, or ``BufferClosed`` once the shard is closed."""
    try:
        return int(ray.get(pending)[0])
    except ray.exceptions.RayTaskError as e:
        if _is_closed(e):
            raise BufferClosed(str(e)) from None
        raise


def forward_chunks(
    stream: Any,
    shards: list[Any],
    on_failed: Callable[[np.ndarray, str], None] | None = None,
    on_started: Callable[[], None] | None = None,
    max_pending: int = 64,
    on_ended: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Hand each chunk of a ``SolverActor.run`` stream to its shard; yields the rows of each, in order.

    The stream alternates a small inline ``(shard, *chunk_keys)`` and the chunk itself, which stays
    in the object store and travels only as its reference. Puts are not awaited one by one: a full
    shard holds back its own chunks (backpressure) while the call's chunks for other shards go on,
    up to ``max_pending`` chunks outstanding. Raises ``BufferClosed`` when a shard is closed. Heads
    with a negative shard index are messages followed by no chunk: ``(FAILED, sim_ids, reason)``
    names simulations the solver failed (passed to ``on_failed``), ``(STARTED,)`` says that the call
    has started running (``on_started``), ``(ENDED,)`` that it has yielded everything (``on_ended``):
    a stream that stops without it was cut short (its process died, and Ray may end the stream
    without an error).

    A chunk is put only once the head after it has been read: when the solver's process dies, Ray
    ends the stream with one more reference that holds the error, and it may come where a chunk
    is due. Put as a chunk, it would stand in a shard for samples that were never sent, and the
    shard would drop those samples as duplicates when the simulation is run again. The last
    reference of a stream cut short is therefore never put (its simulations run again).
    """
    pending: deque[Any] = deque()
    head: tuple[Any, ...] = ()
    held: tuple[int, Any, tuple[Any, ...]] | None = None  # (shard, chunk ref, keys) not yet put
    try:
        for i, ref in enumerate(stream):
            if i % 2 == 0:
                head = tuple(ray.get(ref))  # raises the error a cut stream ends with
                if held is not None:
                    pending.append(shards[held[0]].put.remote([held[1]], held[2]))
                    held = None
                    while len(pending) > max_pending:
                        yield _settle(pending.popleft())
                continue
            if int(head[0]) == STARTED:
                if on_started is not None:
                    on_started()
                continue
            if int(head[0]) == ENDED:
                if on_ended is not None:
                    on_ended()
                continue
            if int(head[0]) == FAILED:
                if on_failed is not None:
                    on_failed(np.asarray(head[1]), str(head[2]))
                continue
            held = (int(head[0]), ref, head[1:])
            del ref
        held = None  # no head after it: the stream was cut (a complete one ends with ENDED's head)
        while pending:
            yield _settle(pending.popleft())
    finally:
        # Stopped early (a shard closed, or the caller gave up): collect the puts still out, so that
        # their errors (the shard closed under them) are read here rather than reported as unhandled.
        if pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=5.0)
            for r in ready:
                try:
                    ray.get(r)
                except Exception:  # BufferClosed or a dead shard: the caller already knows the stream ended
                    pass


class ShardRouter:
    """What producers put samples through: validation, one ``ray.put`` per shard part, references to the shards.

    ``shards`` is the list of shard handles, or ``None`` to fetch it from the study's control actor
    on first use (the shards exist once the trainer ranks have registered).
    """

    def __init__(self, shards: list[Any] | None, group: int = 1, control: Any = None, block: int = 1) -> None:
        if shards is None and control is None:
            raise ValueError("a ShardRouter needs its shards or the control actor that knows them")
        self._shards = list(shards) if shards is not None else None
        self._control = control
        self.group = max(1, int(group))
        self.block = max(1, int(block))
        self._lock = threading.Lock()

    @property
    def shards(self) -> list[Any]:
        with self._lock:
            if self._shards is None:
                deadline = time.monotonic() + SHARDS_WAIT_S
                while True:
                    got = ray.get(self._control.shards.remote(), timeout=60)
                    if got:
                        self._shards = list(got)
                        break
                    if time.monotonic() > deadline:
                        raise ShardsUnavailable(
                            f"no buffer shards after {SHARDS_WAIT_S:.0f} s: the trainer ranks never registered"
                        )
                    time.sleep(0.2)
            return self._shards

    def put(self, x: np.ndarray, y: np.ndarray, sim_id: np.ndarray, t_index: np.ndarray) -> int:
        """Validate and send one chunk; blocks while a FIFO/FIRO shard is full. Returns the rows sent.

        Raises ``ValueError`` for an invalid chunk (nothing sent) and ``BufferClosed`` once a shard is closed.
        """
        x, y, sid, tix = check_chunk(Chunk(x=x, y=y, sim_id=sim_id, t_index=t_index))
        if x.shape[0] == 0:
            return 0
        shards = self.shards
        # Each part written once, owned by this process; the trainer only reads it in place.
        pending = [
            shards[s].put.remote([ray.put(part)], chunk_keys(*part))
            for s, part in shard_parts((x, y, sid, tix), len(shards), self.group, self.block)
        ]
        for p in pending:
            _settle(p)
        return int(x.shape[0])


class ShardBatches:
    """Batches of one trainer rank from its shard, assembled ahead of the step in a thread.

    Each request takes ``per_call`` batches from the shard (one round trip for several steps); the
    chunks they refer to are fetched with one ``ray.get`` (zero-copy, read-only views of the object
    store) and their rows copied once into a ring of preallocated tensors -- pinned when the device
    is a GPU, so that the copy to it is asynchronous. Iterating yields ``(x [b, *in_shape],
    y [b, *out_shape])`` on ``device``, or ``None`` once at the end of the stream.
    """

    def __init__(
        self,
        shard: Any,
        batch_size: int,
        device: torch.device,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        prefetch: int = 4,
        per_call: int = 4,
        stop: Callable[[], bool] | None = None,
        view_cache_bytes: int = 256 * 2**20,
        with_ids: bool = False,
    ) -> None:
        self.shard = shard
        self.with_ids = with_ids  # yield (x, y, sim_ids [b]) for per-simulation losses
        self.batch_size = batch_size
        self.device = device
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.per_call = per_call
        self.stop = stop
        self.keys: list[tuple[np.ndarray, np.ndarray]] | None = None  # set to [] to record (sim_id, t_index)
        pin = device.type == "cuda"
        dx, dy = int(np.prod(self.in_shape)), int(np.prod(self.out_shape))
        # The consumer holds one batch while `prefetch` wait in the queue and one is being filled.
        self._ring = [
            (
                torch.empty((batch_size, dx), dtype=torch.float32, pin_memory=pin),
                torch.empty((batch_size, dy), dtype=torch.float32, pin_memory=pin),
            )
            for _ in range(prefetch + 2)
        ]
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.view_cache_bytes = view_cache_bytes
        self._cache: OrderedDict[Any, list[Any]] = OrderedDict()
        self._cache_bytes, self._calls = 0, 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="surge-batches", daemon=True)
        self._started = False

    def _fill(self) -> None:
        slot = 0
        try:
            while not self._halt.is_set():
                got = ray.get(self.shard.take.remote(self.batch_size, self.per_call, 1.0))
                if got is None:
                    self._queue.put(None)
                    return
                if got == ():  # nothing yet (watermark not reached)
                    if self.stop is not None and self.stop():
                        self._queue.put(None)
                        return
                    continue
                views = self._views_for(got)
                for b in got:
                    xt, yt = self._ring[slot]
                    slot = (slot + 1) % len(self._ring)
                    n = len(b)
                    assemble(b, [views[r] for r in b.payloads], out=(xt.numpy(), yt.numpy()))
                    self._queue.put((xt[:n], yt[:n], b))
        except BaseException as e:  # handed to the consumer, which raises it in the training loop
            self._queue.put(e)
        finally:
            self._cache.clear()  # the views: the chunks they keep in the object store can go
            self._cache_bytes = 0

    def _views_for(self, got: list[Batch]) -> dict[Any, Any]:
        """Zero-copy views of the chunks ``got`` refers to, fetched once and kept while in use.

        Successive batches draw from the same chunks (FIRO and reservoir: random rows of the few
        hundred chunks held; FIFO: the next rows of the same chunk), and fetching a chunk costs
        Python time this thread would take from the training step. A view keeps its chunk in the
        object store, so the cache is bounded: a chunk unused for ``VIEW_TTL_CALLS`` requests, or
        beyond ``view_cache_bytes`` (least recently used first), is let go.
        """
        self._calls += 1
        cache = self._cache
        need = list(dict.fromkeys(r for b in got for r in b.payloads))
        missing = [r for r in need if r not in cache]
        for r, v in zip(missing, ray.get(missing) if missing else [], strict=True):
            cache[r] = [v, sum(int(getattr(a, "nbytes", 0)) for a in v), 0]
            self._cache_bytes += cache[r][1]
        for r in need:
            cache[r][2] = self._calls
            cache.move_to_end(r)
        wanted = set(need)
        for r in list(cache):
            if r in wanted:
                break  # the rest were used in this call (most recent last)
            _, nbytes, last = cache[r]
            if self._calls - last <= VIEW_TTL_CALLS and self._cache_bytes <= self.view_cache_bytes:
                break  # and so are all used more recently
            del cache[r]
            self._cache_bytes -= nbytes
        return {r: cache[r][0] for r in need}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        if not self._started:
            self._started = True
            self._thread.start()
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                yield None
                return
            x, y, batch = item
            if self.keys is not None:
                self.keys.append((batch.sim_id, batch.t_index))
            b = x.shape[0]
            nb = self.device.type == "cuda"
            xy = (
                x.view(b, *self.in_shape).to(self.device, non_blocking=nb),  # (B, F) or (B, C, *grid)
                y.view(b, *self.out_shape).to(self.device, non_blocking=nb),  # (B, C, *grid)
            )
            yield (*xy, batch.sim_id) if self.with_ids else xy

    def close(self) -> None:
        self._halt.set()
        try:  # unblock a filler waiting on a full queue
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass


_CUMULATIVE = (
    "received",
    "duplicates",
    "evicted",
    "consumed",
    "samples_seen_total",
    "chunks_released",
    "compactions",
    "rows_compacted",
    "compaction_errors",
)


class ShardCounts:
    """Counts over every process a shard has lived in: a restarted shard starts from zero, and its
    figures are added to what its earlier processes had counted (as last read)."""

    def __init__(self) -> None:
        self._incarnation: dict[int, str] = {}
        self._last: dict[int, dict[str, Any]] = {}
        self._base: dict[int, dict[str, int]] = {}
        self.restarts = 0

    def update(self, parts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
        """The shards' ``stats()`` with earlier lives' counts added, and the shards seen restarted since."""
        restarted: list[int] = []
        out = []
        for r, p in enumerate(parts):
            inc = p.get("incarnation")
            was = self._incarnation.get(r)
            if was is not None and inc != was:
                restarted.append(r)
                self.restarts += 1
                base, last = self._base.setdefault(r, {}), self._last[r]
                for k in _CUMULATIVE:
                    base[k] = base.get(k, 0) + int(last.get(k, 0))
            self._incarnation[r] = inc
            base = self._base.get(r, {})
            out.append({**p, **{k: int(p.get(k, 0)) + base.get(k, 0) for k in _CUMULATIVE}})
            self._last[r] = p
        return out, restarted


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One buffer's figures from its shards' ``stats()``: counts summed, flags all-or-any."""
    if not parts:
        return {}
    out = dict(parts[0])
    for k in (
        "held",
        "capacity",
        "capacity_requested",
        "watermark",
        "received",
        "duplicates",
        "evicted",
        "consumed",
        "samples_seen_total",
        "bytes_held",
        "bytes_live",
        "chunks_live",
        "chunks_released",
        "compactions",
        "rows_compacted",
        "compaction_errors",
        "n_sims",
    ):
        out[k] = sum(int(p.get(k, 0)) for p in parts)
    out["watermark_reached"] = all(p.get("watermark_reached") for p in parts)
    out["closed"] = all(p.get("closed") for p in parts)
    out["seen_max"] = max(int(p.get("seen_max", 0)) for p in parts)
    held = out["held"]
    out["seen_mean"] = sum(p.get("seen_mean", 0.0) * p.get("held", 0) for p in parts) / held if held else 0.0
    out["shards"] = len(parts)
    return out


__all__ = [
    "Batch",
    "ShardBatches",
    "ShardCounts",
    "ShardRouter",
    "ShardsUnavailable",
    "chunk_keys",
    "forward_chunks",
    "merge_stats",
    "shard_of",
    "shard_parts",
    "split_by_shard",
]
