"""How the server's handler threads are shared, so that ingest can never take Predict's.

grpcio's sync server runs every call in one thread pool, and an Ingest.Stream holds its thread for its
whole life, also while it waits for staging memory or for a full buffer to take its samples. Left alone,
enough streams stuck in backpressure would take every thread and leave Predict none. So the pool is
sized ``ingest streams + Study calls + predict threads`` and the first two kinds each take a ``Slot``
from their own ``CallSlots`` for as long as they hold a thread: a call finding none free is refused at
once (RESOURCE_EXHAUSTED), never queued, since a queued call would hold a thread too. Predict takes no
slot; at least ``predict threads`` are always left to it.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

T = TypeVar("T")


class Slot:
    """One thread of a kind's share, held by one call; ``release`` is idempotent."""

    def __init__(self, owner: CallSlots) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._owner._give_back()


class CallSlots:
    """At most ``size`` calls of one kind (``what``, for messages) at a time; beyond that ``take`` gives None."""

    def __init__(self, size: int, what: str) -> None:
        if size < 1:
            raise ValueError(f"{what}: at least 1 at a time, not {size}")
        self.size = size
        self.what = what
        self._lock = threading.Lock()
        self._used = 0
        self.refused = 0

    def take(self) -> Slot | None:
        with self._lock:
            if self._used >= self.size:
                self.refused += 1
                return None
            self._used += 1
        return Slot(self)

    def _give_back(self) -> None:
        with self._lock:
            self._used -= 1

    @property
    def in_use(self) -> int:
        return self._used

    @property
    def busy_message(self) -> str:
        return f"this server takes {self.size} {self.what} at a time and all are busy; retry later"


def held_while_running(slot: Slot, calls: Iterator[T]) -> Generator[T, None, None]:
    """``calls`` (a streaming handler's responses), releasing ``slot`` when its thread leaves it for good.

    grpc drops the iterator of a call that ended while it was suspended; the caller also releases the
    slot from the call's termination callback unless the iterator is running (``gi_running``): a thread
    still inside it, blocked in a buffer put say, keeps its slot until it comes out."""
    try:
        yield from calls
    finally:
        slot.release()
