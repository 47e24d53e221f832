"""Staging: the memory of simulations being received, and the commit of a complete one into the buffer.

``StagingPool`` bounds the bytes staged over all streams of a study; ``StreamState`` is one Ingest.Stream
call (its lease, its staged fields, its phase); ``Staging`` holds a study's pool and turns a complete
simulation into samples (``samples``) and puts them into the buffer (``put``), freeing staged memory as
it goes."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import ray

from trainer.problem import ProblemSpec

if TYPE_CHECKING:
    from services.ingest.leases import Lease

PUT_BYTES = 32 * 2**20  # samples per buffer put: few puts for small fields, bounded memory for large ones
_PUT_TRIES = 3


class StagingPool:
    """Bytes of staged simulations, bounded; ``reserve`` waits for room (that wait is the backpressure)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._used = 0
        self.peak = 0
        self.wait_s = 0.0
        self.waits = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def reserve(self, n: int, alive: Callable[[], bool], poll_s: float = 0.1) -> bool:
        """Take ``n`` bytes once they fit; False if ``alive()`` turns false first."""
        t0 = None
        with self._cond:
            try:
                while self._used + n > self.max_bytes:
                    if not alive():
                        return False
                    if t0 is None:
                        t0 = time.monotonic()
                        self.waiting += 1
                    self._cond.wait(poll_s)
                self._used += n
                self.peak = max(self.peak, self._used)
                return True
            finally:
                if t0 is not None:
                    self.waiting -= 1
                    self.waits += 1
                    self.wait_s += time.monotonic() - t0

    def release(self, n: int) -> None:
        if n:
            with self._cond:
                self._used -= n
                self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


class Phase(enum.Enum):
    """Where a stream is: receiving chunks, putting its samples into the buffer (End accepted), or over."""

    OPEN = "open"
    COMMITTING = "committing"
    ENDED = "ended"


@dataclass
class StreamState:
    """One Ingest.Stream call: the simulation it carries and what it has staged."""

    context: grpc.ServicerContext
    sim: Lease | None = None
    reserved: int = 0  # bytes of the pool held
    staged: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (field, k) -> grid, float32
    phase: Phase = Phase.OPEN
    killed: str | None = None  # why the call must end (its simulation was reported failed)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Staging:
    """A study's staged simulations: the pool they share, and how a complete one becomes buffer puts."""

    def __init__(
        self,
        spec: ProblemSpec,
        required: dict[str, tuple[int, ...]],
        buffer: Any,
        max_bytes: int,
        put_bytes: int = PUT_BYTES,
    ) -> None:
        self.spec = spec
        self.buffer = buffer
        self.put_bytes = put_bytes
        self.pairs = frozenset((f, k) for f, ks in required.items() for k in ks)
        self.field_bytes = int(np.prod(spec.grid)) * 4
        self.sim_bytes = len(self.pairs) * self.field_bytes  # staged as float32
        self.pool = StagingPool(max_bytes)

    def reserve(self, st: StreamState, alive: Callable[[], bool]) -> bool:
        """The whole simulation's memory for ``st``, waiting while others hold it; False if ``alive()`` fails first.

        Whole, not chunk by chunk: two half-staged simulations would otherwise wait on each other forever."""
        if not self.pool.reserve(self.sim_bytes, alive):
            return False
        st.reserved = self.sim_bytes
        return True

    def keep(self, st: StreamState, key: tuple[str, int], a: np.ndarray) -> None:
        """A checked chunk: kept until End if the problem uses it; a field or step it does not use is dropped."""
        if key in self.pairs:
            st.staged[key] = a

    def missing(self, st: StreamState) -> list[tuple[str, int]]:
        """The (field, time index) pairs ``st`` has not sent, by time index."""
        return sorted(self.pairs - set(st.staged), key=lambda p: (p[1], p[0]))

    def samples(self, st: StreamState) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
        """``(x, y, sim_id, t_index, staged bytes they free)``, in chunks of about ``put_bytes``."""
        spec, sim = self.spec, st.sim
        assert sim is not None
        asm = spec.assembler(sim.params[None], np.array([sim.sim_id], dtype=np.int64))
        steps = sorted({k for _, k in self.pairs})
        parts: list[tuple[np.ndarray, ...]] = []
        freed = held = 0
        for i, k in enumerate(steps):
            here = [(j, st.staged.pop((f, k))) for j, f in enumerate(spec.fields) if (f, k) in self.pairs]
            freed += len(here) * self.field_bytes
            if len(spec.fields) == 1:
                fields = here[0][1][None, None]  # (1, 1, *grid), no copy
            else:
                fields = np.zeros((1, len(spec.fields), *spec.grid), dtype=np.float32)  # (1, C, *grid)
                for j, a in here:
                    fields[0, j] = a
            if (s := asm.feed(k, fields)) is not None:
                parts.append(s)
                held += s[0].nbytes + s[1].nbytes
            if parts and (held >= self.put_bytes or i == len(steps) - 1):
                x, y, sid, tix = (np.concatenate(a) for a in zip(*parts, strict=True))
                parts.clear()
                yield x, y, sid, tix, freed
                freed = held = 0

    def put(self, x: np.ndarray, y: np.ndarray, sid: np.ndarray, tix: np.ndarray) -> None:
        if x.shape[0] == 0:
            return
        for attempt in range(_PUT_TRIES):
            try:
                # Blocks while a FIFO/FIRO shard is full: the backpressure that reaches the clients.
                self.buffer.put(x, y, sid, tix)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                # The same keys again are dropped as duplicates, so trying again is safe.
                if attempt == _PUT_TRIES - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def free(self, st: StreamState, nbytes: int) -> None:
        """Samples worth ``nbytes`` of ``st``'s staging are in the buffer: that memory is others' now."""
        self.pool.release(nbytes)
        st.reserved -= nbytes

    def drop(self, st: StreamState) -> None:
        """Whatever ``st`` still stages or holds of the pool goes (its call has ended)."""
        st.staged.clear()
        self.pool.release(st.reserved)
        st.reserved = 0
