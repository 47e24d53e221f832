"""The Ray actors of a study: thin shells around ``trainer.buffer`` and ``solvers``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

import solvers
from trainer.buffer import BufferClosed, Chunk, make_buffer
from trainer.problem import ProblemSpec


# Separate concurrency groups: producers blocked by backpressure must never starve the
# trainer's gets (that would deadlock the pipeline) nor the monitor's stats calls.
@ray.remote(concurrency_groups={"put": 16, "get": 8, "ctl": 4})
class BufferActor:
    """One bounded buffer between the solver actors and the Ray Train workers."""

    def __init__(
        self, policy: str, capacity: int, watermark: int, capacity_bytes: int | None = None, seed: int = 0
    ) -> None:
        self._buf = make_buffer(policy, capacity, watermark, capacity_bytes=capacity_bytes, seed=seed)
        self._aborted = False
        self._training: dict[str, Any] = {}

    @ray.method(concurrency_group="put")
    def put(self, x: np.ndarray, y: np.ndarray, sim_id: np.ndarray, t_index: np.ndarray) -> int:
        """Blocks while a FIFO/FIRO buffer is full (backpressure); raises ``BufferClosed`` after ``close``."""
        return self._buf.put(Chunk(x=x, y=y, sim_id=sim_id, t_index=t_index))

    @ray.method(concurrency_group="get")
    def get(self, batch_size: int, timeout: float = 1.0) -> tuple[np.ndarray, np.ndarray] | tuple[()] | None:
        """A batch, ``()`` if nothing came within ``timeout`` (watermark not reached), ``None`` at end of stream."""
        if self._aborted:
            return None
        try:
            return self._buf.get(batch_size, timeout=timeout)
        except TimeoutError:
            return ()

    @ray.method(concurrency_group="ctl")
    def close(self) -> None:
        """No more samples will come: consumers drain what is left (FIFO/FIRO) and then see the end."""
        self._buf.close()

    @ray.method(concurrency_group="ctl")
    def abort(self) -> None:
        """Stop now: producers and consumers both see the end."""
        self._aborted = True
        self._buf.close()

    @ray.method(concurrency_group="ctl")
    def stats(self) -> dict[str, Any]:
        return {**self._buf.stats(), "training": dict(self._training)}

    @ray.method(concurrency_group="ctl")
    def received_by_sim(self) -> dict[int, int]:
        return self._buf.received_by_sim()

    @ray.method(concurrency_group="ctl")
    def report_training(self, stats: dict[str, Any]) -> None:
        """Rank 0 of the trainer posts its progress here; the study driver reads it with ``stats``."""
        self._training.update(stats)


# max_restarts/max_task_retries: Ray restarts a dead solver actor and re-runs its unfinished
# call with the same (sim ids, params, seeds); the buffer drops the samples it already holds
# by (simulation id, time index), so nothing is lost and nothing is counted twice.
@ray.remote(max_restarts=-1, max_task_retries=-1)
class SolverActor:
    """Runs batches of simulations and streams their samples to the buffer in chunks."""

    def __init__(self, problem: dict[str, Any], buffer: ray.actor.ActorHandle, chunk_steps: int = 10) -> None:
        self.spec = ProblemSpec.from_dict(problem)
        self.solver = solvers.get(self.spec.solver, **self.spec.solver_config)
        self.buffer = buffer
        self.chunk_steps = chunk_steps

    def pid(self) -> int:
        import os

        return os.getpid()

    def run(self, sim_ids: np.ndarray, params: np.ndarray, seeds: np.ndarray) -> dict[str, Any]:
        """Solve ``len(sim_ids)`` simulations; returns samples produced and seconds spent solving."""
        t0 = time.perf_counter()
        solve_s = 0.0
        produced = 0
        parts: list[tuple[np.ndarray, ...]] = []
        asm = self.spec.assembler(params, sim_ids)
        t_solve = time.perf_counter()
        try:
            for k, fields in self.solver.stream(params, seeds):  # fields (B, C, *grid)
                if (s := asm.feed(k, fields)) is not None:
                    parts.append(s)
                if parts and (len(parts) >= self.chunk_steps or k == len(self.spec.times) - 1):
                    solve_s += time.perf_counter() - t_solve
                    x, y, sid, tix = (np.concatenate(a) for a in zip(*parts, strict=True))
                    parts.clear()
                    # Waiting on the put is the backpressure: a full FIFO stalls this solver.
                    ray.get(self.buffer.put.remote(x, y, sid, tix))
                    produced += x.shape[0]
                    t_solve = time.perf_counter()
        except ray.exceptions.RayTaskError as e:
            if not (isinstance(e.cause, BufferClosed) or "BufferClosed" in str(e)):
                raise
            closed = True
        else:
            closed = False
        return {
            "produced": produced,
            "solve_s": solve_s,
            "wall_s": time.perf_counter() - t0,
            "closed": closed,
            "node": ray.get_runtime_context().get_node_id(),
        }
