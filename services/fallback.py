"""Predict fallbacks: a point the ensemble is unsure of is solved at once by the study's cluster.

``POST /v1/models/{name}/predict?fallback=solve&max_std=X`` answers from the solver where the served
ensemble's standard deviation exceeds ``X``. The study running for that model solves the point as a
Ray task on its cluster, hands the recorded fields back for the answer, and puts the simulation's
samples into its buffer like any other simulation: one fresh id in the ledger (journaled, so that a
resumed study knows it), its samples put once under their ``(sim_id, t_index)`` keys, which the
shards deduplicate, so the simulation joins the training stream exactly once.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import ray

from services.dispatch import first_line
from trainer.buffer import BufferClosed
from trainer.problem import ProblemSpec

log = logging.getLogger("surge.fallback")

SOURCE = "fallback"  # the ledger's name for who holds such a simulation


class FallbackError(RuntimeError):
    """A fallback that cannot be answered from the solver; ``status`` is the HTTP status to answer."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FallbackUnavailable(FallbackError):
    """No study runs for the model in this process, or it cannot take the point."""


class FallbackBusy(FallbackError):
    """As many fallback solves in flight as allowed: retry later."""


class FallbackTimeout(FallbackError):
    """The solver did not answer in time (the simulation still joins the stream when it ends)."""

    status = 504


class FallbackFailed(FallbackError):
    """The solver failed for this point (raised, died, or produced non-finite values)."""

    status = 502


@ray.remote(max_retries=0)
def solve_point(problem: dict[str, Any], params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The trajectories ``[1, T+1, C, *grid]`` of one simulation, on whichever node has a CPU for it."""
    import solvers

    spec = ProblemSpec.from_dict(problem)
    return solvers.get(spec.solver, **spec.solver_config).solve(params, seeds)


def at_times(spec: ProblemSpec, y: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Fields ``y [T+1, C, *grid]`` recorded at ``spec.times``, linearly interpolated to ``times [N]`` (inside
    the recorded range) -> ``[N, C, *grid]`` float32. A time the solver records is answered exactly."""
    rec = np.asarray(spec.times, dtype=np.float64)
    t = np.clip(np.asarray(times, dtype=np.float64), rec[0], rec[-1])
    hi = np.clip(np.searchsorted(rec, t, side="left"), 1, len(rec) - 1)
    lo = hi - 1
    w = (t - rec[lo]) / (rec[hi] - rec[lo])  # (N,) in [0, 1]
    w = w.reshape(-1, *([1] * (y.ndim - 1)))
    return ((1.0 - w) * y[lo] + w * y[hi]).astype(np.float32)


class Fallbacks:
    """A running study's fallback solves: at most ``max_in_flight`` at once, each answered within a timeout.

    ``ids`` is the study's ``SimulationIds``, ``dispatch`` its ``Dispatcher`` (counts and failure limits),
    ``sink`` a ``ShardRouter`` to its buffer shards."""

    def __init__(
        self, spec: ProblemSpec, ids: Any, dispatch: Any, sink: Any, num_cpus: float = 1.0, max_in_flight: int = 4
    ) -> None:
        self.spec = spec
        self._problem = spec.to_dict()
        self.ids = ids
        self.dispatch = dispatch
        self.sink = sink
        self.num_cpus = num_cpus
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._in_flight = 0
        self.solved = 0

    def solve(self, params: np.ndarray, timeout: float) -> tuple[int, np.ndarray]:
        """``(sim_id, fields [T+1, C_out, *grid])`` of the simulation at ``params [P]``; raises a ``FallbackError``."""
        try:
            p = self.spec.params.check(np.asarray(params, dtype=np.float64).reshape(1, -1))[0]
        except ValueError as e:
            raise FallbackUnavailable(f"the study cannot solve this point: {e}") from None
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                raise FallbackBusy(
                    f"{self._in_flight} fallback solves are running already (limit {self.max_in_flight})"
                )
            self._in_flight += 1
        try:
            got = self.ids.add(p, SOURCE)
        except Exception:
            self._release()
            raise
        done: Future[tuple[int, np.ndarray]] = Future()
        threading.Thread(target=self._run, args=(got, done), name=f"fallback-{int(got.ids[0])}", daemon=True).start()
        try:
            return done.result(timeout)
        except FutureTimeout:
            raise FallbackTimeout(
                f"the solver did not answer within {timeout:g} s (simulation {int(got.ids[0])} still joins the "
                "training stream when it ends)"
            ) from None

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _run(self, got: Any, done: Future[tuple[int, np.ndarray]]) -> None:
        """Solve, answer, then put the samples into the buffer; settle the id however it ends."""
        ids = got.ids
        try:
            try:
                traj = ray.get(solve_point.options(num_cpus=self.num_cpus).remote(self._problem, got.params, got.seeds))
            except Exception as e:  # the solver raised, or its worker died: the actors run it again later
                why = first_line(e)
                self.dispatch.solved_apart(0)
                self.dispatch.settle(ids, "failed", f"a fallback solve failed: {why}", requeue=True)
                done.set_exception(FallbackFailed(f"the solver failed for this point: {why}"))
                return
            x, y, sid, tix = self.spec.samples_from_trajectories(got.params, ids, traj)
            if not (np.isfinite(x).all() and np.isfinite(y).all()):
                self.dispatch.solved_apart(0)
                self.dispatch.settle(ids, "failed", "the solver's output is not finite (NaN or inf)")
                done.set_exception(FallbackFailed("the solver's output for this point is not finite (NaN or inf)"))
                return
            order = np.argsort(tix, kind="stable")
            done.set_result((int(ids[0]), y[order].reshape(len(order), *self.spec.out_shape)))  # answer first
            try:
                rows = self.sink.put(x, y, sid, tix)
            except BufferClosed:  # the study is ending: the answer stands, the stream is over
                self.dispatch.solved_apart(0)
                self.dispatch.settle(ids, "cancelled")
                return
            except Exception as e:  # a shard that cannot take it now: the actors run it again
                log.warning("fallback simulation %d could not reach the buffer: %s", int(ids[0]), first_line(e))
                self.dispatch.solved_apart(0)
                self.dispatch.settle(ids, "failed", first_line(e), requeue=True)
                return
            self.dispatch.solved_apart(rows)
            self.dispatch.settle(ids, "done")
            with self._lock:
                self.solved += 1
        except Exception as e:  # never leave the caller waiting on a future nobody sets
            if not done.done():
                done.set_exception(FallbackFailed(f"the fallback solve failed: {first_line(e)}"))
            log.exception("fallback simulation %d", int(ids[0]))
        finally:
            self._release()


__all__ = [
    "FallbackBusy",
    "FallbackError",
    "FallbackFailed",
    "FallbackTimeout",
    "FallbackUnavailable",
    "Fallbacks",
    "at_times",
    "solve_point",
]
