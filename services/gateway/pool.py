"""Where predictions run: a bounded pool of threads, never the event loop.

A request is admitted before its body is read, so that at most ``workers + queue`` bodies and
answers are in memory at once; past that it is answered 503 with ``Retry-After`` at once
(shedding load beats queueing it: a client that waits in a long queue times out anyway, and the
gateway's memory would grow with the queue). Model lookups (a first load reads the store),
parsing, the forward pass and serialisation all run in the pool's threads, so the event loop
stays free for ``/healthz`` and the other routes whatever predictions are doing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

T = TypeVar("T")
RETRY_AFTER_S = 1
OVERLOADED = "the gateway is at its limit of {workers} predictions running and {queue} waiting: retry after {retry} s"


class Overloaded(Exception):
    """No room for another prediction; answered 503 with ``Retry-After``."""


class PredictPool:
    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.queue = queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surge-predict")
        self._admitted = 0  # changed on the event loop only: no lock

    @property
    def admitted(self) -> int:
        return self._admitted

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a place for one request (its body, its work, its answer), or raise ``Overloaded``."""
        if self._admitted >= self.workers + self.queue:
            raise Overloaded(OVERLOADED.format(workers=self.workers, queue=self.queue, retry=RETRY_AFTER_S))
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["OVERLOADED", "RETRY_AFTER_S", "Overloaded", "PredictPool"]
