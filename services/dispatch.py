"""The dispatcher of a study: hands simulations to the solver actors and follows each call to its end.

Every solver actor is kept busy with ``CALLS_IN_FLIGHT`` calls, each forwarded by a thread of its
own: the chunks a call yields go to their buffer shards by reference (the backpressure waits
there), and how the call ended is settled in the ledger -- done, cancelled (the buffer closed), a
crash or an error (re-queued while attempts are left), or a non-finite output (given up at once).
Once too many simulations have failed, the study is stopped with an error naming the cause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from services.config import StudyConfig
from services.dataplane import forward_chunks
from services.ledger import Assignment, SimulationIds
from trainer.buffer import BufferClosed

log = logging.getLogger("surge.study")

CALLS_IN_FLIGHT = 2  # per solver actor: one running, one queued, so an actor never idles between calls
FAILURES_JUDGED_AFTER = 20  # simulations ended before solvers.max_failure_fraction is applied


class StreamCut(RuntimeError):
    """A solver call's stream that stopped before its end: the process died mid-call."""


class Dispatcher:
    """Hands out a study's simulations and counts how they end (thread-safe ``figures()``)."""

    def __init__(
        self,
        study_id: str,
        config: StudyConfig,
        ids: SimulationIds,
        stop: threading.Event,
        on_limit: Callable[[str], None],
        abort_shards: Callable[[], None],
    ) -> None:
        self.study_id = study_id
        self.config = config
        self.ids = ids
        self._stop = stop
        self._on_limit = on_limit  # too many failures: stop the study with this message
        self._abort_shards = abort_shards
        self.actors: list[Any] = []
        self.shards: list[Any] = []
        self.external_capped: Callable[[], bool] = lambda: False  # the external clients ran all they may
        self._lock = threading.Lock()
        # failed: given up (every attempt failed, or a non-finite output); retried: attempts handed out again.
        self._sims = {
            "dispatched": ids.handed_out,
            **{k: ids.counts[k] for k in ("done", "failed", "cancelled", "retried")},
        }
        self.done_ids: list[int] = list(ids.done)  # from an earlier life of the study, when resumed
        self._last_failure: str | None = None
        self.produced = 0  # samples offered to the buffer by the solver actors (as their calls end)
        self.produced_external = 0  # ... and by external clients over gRPC
        self._external = {"done": 0, "failed": 0}
        self.solve_s = 0.0

    def figures(self) -> dict[str, Any]:
        """``{"simulations": counts, "external": counts, "produced": n, "produced_external": n}`` (copies)."""
        with self._lock:
            return {
                "simulations": dict(self._sims),
                "external": dict(self._external),
                "produced": self.produced,
                "produced_external": self.produced_external,
            }

    def feeding_done(self) -> bool:
        """No simulation out, and none left to hand out (or the external clients have all they may run)."""
        if self.ids.outstanding():
            return False
        if self.ids.exhausted:
            return True
        return not self.actors and self.external_capped()

    def run(self, trainer_alive: Callable[[], bool]) -> None:
        """Dispatch until the simulations are spent, the study stops or the trainer ends."""
        n = self.config.solvers.sims_per_call
        done = threading.Condition()
        finished: list[int] = []  # actor indices whose call has ended
        running: list[threading.Thread] = []
        load = [0] * len(self.actors)

        def forward(a: int, got: Assignment) -> None:
            try:
                self.forward(self.actors[a], got)
            finally:
                with done:
                    finished.append(a)
                    done.notify()

        while not self._stop.is_set() and trainer_alive():
            for a in range(len(self.actors)):
                while load[a] < CALLS_IN_FLIGHT:
                    got = self.ids.take(n, "actors")
                    if got is None:
                        break
                    load[a] += 1
                    with self._lock:
                        self._sims["dispatched"] += len(got.ids)
                    name = f"forward-{self.study_id}"
                    th = threading.Thread(target=forward, args=(a, got), name=name, daemon=True)
                    th.start()
                    running.append(th)
            if not any(load):
                if self.feeding_done():
                    return
                # External clients hold the rest (or may hand failed simulations back to the actors).
                self._stop.wait(0.2)
                continue
            with done:
                done.wait_for(lambda: bool(finished), timeout=0.5)
                for a in finished:
                    load[a] -= 1
                finished.clear()
        # Stopping: the shards are aborted, so that blocked forwarders see the end; wait for them.
        if self._stop.is_set() or not trainer_alive():
            self._abort_shards()
        for th in running:
            th.join(30)

    def forward(self, actor: Any, got: Assignment) -> None:
        """Run one call and hand each chunk it yields to its shard, by reference (the backpressure waits here)."""
        ids = got.ids
        produced, closed = 0, False
        diverged: list[int] = []
        t0 = time.perf_counter()

        def on_failed(sims: np.ndarray, reason: str) -> None:
            # Deterministic for its (parameters, seed): given up at once, not re-run.
            log.warning("simulations %s failed: %s", sims.tolist(), reason)
            diverged.extend(int(i) for i in sims)
            self.settle(sims, "failed", reason)

        started: list[bool] = []
        ended: list[bool] = []
        try:
            # At most a few chunks ahead of the shard: a solver never makes memory grow without bound.
            gen = actor.run.options(num_returns="streaming", _generator_backpressure_num_objects=4).remote(
                ids, got.params, got.seeds
            )
            try:
                chunks = forward_chunks(
                    gen, self.shards, on_failed, lambda: started.append(True), on_ended=lambda: ended.append(True)
                )
                for rows in chunks:
                    produced += rows
            except BufferClosed:
                closed = True
            if not closed and not ended:
                # Ray may end the stream of an actor killed mid-call without an error: not done.
                raise StreamCut("the solver's stream stopped before its end")
        except Exception as e:
            # The solver raised, or its process died (a crash, an OOM kill): this attempt failed. The
            # simulations go back to be run again, each alone, while they have attempts left.
            crashed = isinstance(e, ray.exceptions.RayActorError | StreamCut)
            with self._lock:
                self.produced += produced
            rest = np.setdiff1d(ids, diverged)
            # A dead actor fails its queued calls too: a call that never started (the actor's first
            # message says it has) goes back without counting an attempt.
            if crashed and not started:
                self.ids.settle(rest, "interrupted")
                return
            what = "the solver process died" if crashed else f"the solver raised {first_line(e)}"
            log.warning("simulations %s..%s, attempt %s: %s", ids[0], ids[-1], int(got.attempts.max()), what)
            self.settle(rest, "failed", what, requeue=True)
            return
        self.settle(np.setdiff1d(ids, diverged), "cancelled" if closed else "done")
        with self._lock:
            self.produced += produced
            self.solve_s += time.perf_counter() - t0

    def settle(self, ids: np.ndarray, outcome: str, reason: str | None = None, requeue: bool = False) -> None:
        """Record how simulations ended; stop the study once failures pass ``solvers.max_failure_fraction``."""
        if len(ids) == 0:
            return
        again = set(self.ids.settle(ids, outcome, requeue=requeue))
        given_up = [int(i) for i in ids if int(i) not in again]
        with self._lock:
            self._sims["retried"] += len(again)
            self._sims[outcome] += len(given_up)
            if outcome == "done":
                self.done_ids.extend(given_up)
            if outcome == "failed" and given_up:
                self._last_failure = reason
            failed, settled = self._sims["failed"], self._sims["failed"] + self._sims["done"]
        limit = self.config.solvers.max_failure_fraction
        # Judged once enough have ended for a fraction to mean something (or the whole budget has).
        if failed and settled >= min(FAILURES_JUDGED_AFTER, self.config.simulations) and failed > limit * settled:
            self._on_limit(
                f"{failed} of {settled} simulations failed, more than solvers.max_failure_fraction = {limit:g}; "
                f"last failure: {self._last_failure}"
            )

    def solved_apart(self, produced: int) -> None:
        """A simulation solved outside the actors' calls (a predict fallback) was handed out and offered
        ``produced`` samples; its outcome goes through ``settle`` like any other."""
        with self._lock:
            self._sims["dispatched"] += 1
            self.produced += produced

    def external_event(self, kind: str, sim_id: int, produced: int = 0) -> None:
        """Called by the ingest server: a simulation handed out to, or settled by, an external client."""
        with self._lock:
            self.produced_external += produced
            if kind == "assigned":
                self._sims["dispatched"] += 1
                return
            self._sims[kind] += 1
            if kind in self._external:
                self._external[kind] += 1
            if kind == "done":
                self.done_ids.append(sim_id)


def first_line(e: BaseException) -> str:
    """An exception as one short line (a Ray task error carries the remote traceback)."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]
