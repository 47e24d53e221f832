"""The Ray actors of a study: thin shells around ``trainer.buffer``, ``solvers`` and ``services.dataplane``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import ray

import solvers
from services.dataplane import ENDED, FAILED, STARTED, chunk_keys, shard_parts
from trainer.buffer import Batch, Chunk, check_chunk, make_buffer
from trainer.problem import ProblemSpec


def _compact_refs(segments: Sequence[tuple[Any, np.ndarray]]) -> Any:
    """A shard's ``compact``: read the sparse chunks in place, write their held rows as one new object."""
    arrays = ray.get([ref for ref, _ in segments])
    pairs = list(zip(arrays, segments, strict=True))
    # (x, y, sim_id, t_index) of the held rows; owned by the shard, which is the only one to refer to it.
    return ray.put(tuple(np.concatenate([a[i][rows] for a, (_, rows) in pairs]) for i in range(4)))


# Separate concurrency groups: producers blocked by backpressure must never starve the
# trainer's takes (that would deadlock the pipeline) nor the monitor's stats calls.
# max_restarts / max_task_retries: a shard whose process dies comes back empty in a new one, and
# the calls that were out on it (producers' puts, the trainer's take) run again there, so that its
# producers and its rank only wait (the rank's wait is data wait). The chunks it held are lost
# (the stream refills it from fresh simulations); the driver re-applies close/abort to the new
# process and carries its counts over (``incarnation`` tells it a restart happened).
@ray.remote(concurrency_groups={"put": 16, "get": 4, "ctl": 4}, max_restarts=-1, max_task_retries=-1)
class BufferShard:
    """The buffer of one trainer rank: object references and row indices, never the arrays."""

    def __init__(
        self, policy: str, capacity: int, watermark: int, capacity_bytes: int | None = None, seed: int = 0
    ) -> None:
        self._buf = make_buffer(
            policy, capacity, watermark, capacity_bytes=capacity_bytes, seed=seed, compact=_compact_refs
        )
        self._aborted = False
        self._incarnation = os.urandom(8).hex()  # new in every process this shard is restarted in

    @ray.method(concurrency_group="put")
    def put(self, refs: list[ray.ObjectRef], keys: tuple[Any, ...] | None = None) -> tuple[int, int]:
        """Take a chunk ``(x, y, sim_id, t_index)`` by reference; returns ``(rows, new rows)``.

        ``refs`` is a one-element list so that Ray hands over the reference, not the object.
        ``keys`` is the chunk's ``(sim_id, t_index, nbytes, (dx, dy))`` as its producer sent it
        (``dataplane.chunk_keys``); without it the chunk is mapped in place (zero-copy) to read them.
        Blocks while a FIFO/FIRO shard is full (backpressure); raises ``BufferClosed`` after ``close``."""
        sid, tix, nbytes, dims = keys if keys is not None else chunk_keys(*ray.get(refs[0]))
        new = self._buf.put_ref(refs[0], sid, tix, nbytes, dims)
        return int(np.asarray(sid).shape[0]), new

    @ray.method(concurrency_group="get")
    def take(self, batch_size: int, count: int = 1, timeout: float = 1.0) -> list[Batch] | tuple[()] | None:
        """Up to ``count`` batches, ``()`` if nothing came within ``timeout`` (watermark not reached),
        ``None`` at end of stream."""
        if self._aborted:
            return None
        try:
            return self._buf.take_many(batch_size, count, timeout=timeout)
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
    def drop(self) -> None:
        """Let go of every chunk (the study is over)."""
        self._aborted = True
        self._buf.drop_all()

    @ray.method(concurrency_group="ctl")
    def stats(self) -> dict[str, Any]:
        return {**self._buf.stats(), "incarnation": self._incarnation, "aborted": self._aborted}

    @ray.method(concurrency_group="ctl")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="ctl")
    def received_by_sim(self) -> dict[int, int]:
        return self._buf.received_by_sim()

    @ray.method(concurrency_group="ctl")
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class StudyControl:
    """What the trainer ranks and the driver share: ranks' nodes, the shards, training progress.

    Rank ``r`` registers its node; the driver creates shard ``r`` on that node and posts the list;
    the ranks and the producers read it. Rank 0 posts its progress here, every rank its final state.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, str] = {}
        self._shards: list[Any] | None = None
        self._training: dict[str, Any] = {}
        self._ranks: dict[int, dict[str, Any]] = {}
        self._pids: dict[int, int] = {}
        self._sim_losses: dict[int, tuple[float, int]] = {}  # sim id -> (loss sum, samples)

    def register_rank(self, rank: int, node: str, pid: int | None = None) -> None:
        """A rank (again, after a restart of the worker group) says where it runs."""
        self._nodes[int(rank)] = node
        if pid is not None:
            self._pids[int(rank)] = int(pid)

    def pids(self) -> dict[int, int]:
        """The process id of each rank's worker, as last registered."""
        return dict(self._pids)

    def nodes(self) -> dict[int, str]:
        return dict(self._nodes)

    def set_shards(self, shards: list[Any]) -> None:
        self._shards = list(shards)

    def shards(self) -> list[Any] | None:
        return self._shards

    def shard(self, rank: int) -> Any:
        return None if self._shards is None else self._shards[rank]

    def report_training(self, stats: dict[str, Any]) -> None:
        """Rank 0 of the trainer posts its progress here; the study driver reads it with ``training``."""
        self._training.update(stats)

    def training(self) -> dict[str, Any]:
        return dict(self._training)

    def report_sim_losses(self, sim_ids: Any, losses: Any, counts: Any) -> None:
        """A rank's mean training loss per simulation since its last report; merged by sample count until
        the study drains them into its sampler."""
        rows = zip(np.asarray(sim_ids).tolist(), np.asarray(losses).tolist(), np.asarray(counts).tolist(), strict=True)
        for i, m, c in rows:
            s, n = self._sim_losses.get(int(i), (0.0, 0))
            self._sim_losses[int(i)] = (s + float(m) * int(c), n + int(c))

    def drain_sim_losses(self) -> tuple[list[int], list[float]]:
        out = self._sim_losses
        self._sim_losses = {}
        return list(out), [s / max(n, 1) for s, n in out.values()]

    def report_rank(self, rank: int, state: dict[str, Any]) -> None:
        """Every rank's state at the end of training (weights digest, normaliser, samples)."""
        self._ranks[int(rank)] = state

    def ranks(self) -> dict[int, dict[str, Any]]:
        return dict(self._ranks)


# max_restarts: Ray restarts a dead solver actor in a new process. Its unfinished call is not
# re-run by Ray (max_task_retries=0): the driver counts the attempt and hands the simulations out
# again, one per call, at most solvers.max_attempts times, so that a simulation that kills its
# process every time is given up instead of re-run for ever. The chunks a call had yielded already
# belong to the driver, and the shards drop the samples they already hold by (simulation id, time
# index), so a re-run loses nothing and counts nothing twice.
@ray.remote(max_restarts=-1, max_task_retries=0)
class SolverActor:
    """Runs batches of simulations and yields their samples in chunks, each written once to the object store.

    ``run`` is a streaming generator: it yields, per chunk, a small inline head -- the index of the
    shard it is for and its keys (``dataplane.chunk_keys``) -- and then the chunk ``(x, y, sim_id,
    t_index)``. A simulation whose output turns non-finite (a diverged solve) is dropped from that
    chunk on, and named once by a head ``(FAILED, sim_ids, reason)`` followed by ``None``; the
    others of its batch go on. The stream opens with ``(STARTED,)`` and ``None`` and closes with
    ``(ENDED,)`` and ``None`` (a stream without its end was cut short). Objects a
    generator yields are owned by the caller (the study driver), so they outlive this actor; the driver hands only their
    references to the shards.
    """

    def __init__(self, problem: dict[str, Any], chunk_steps: int = 10, shards: int = 1, group: int = 1) -> None:
        self.spec = ProblemSpec.from_dict(problem)
        self.solver = solvers.get(self.spec.solver, **self.spec.solver_config)
        self.chunk_steps = chunk_steps
        self.shards, self.group = shards, group

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, sim_ids: np.ndarray, params: np.ndarray, seeds: np.ndarray) -> Iterator[Any]:
        """Solve ``len(sim_ids)`` simulations, yielding ``head, chunk, head, chunk, ...`` (see the class)."""
        parts: list[tuple[np.ndarray, ...]] = []
        asm = self.spec.assembler(params, sim_ids)
        diverged: set[int] = set()
        # First, before any work: the driver then knows this call ran (a dead actor also fails the
        # calls queued behind it, which never ran and cost their simulations no attempt).
        yield (STARTED,)
        yield None
        for k, fields in self.solver.stream(params, seeds):  # fields (B, C, *grid)
            if (s := asm.feed(k, fields)) is not None:
                parts.append(s)
            if parts and (len(parts) >= self.chunk_steps or k == len(self.spec.times) - 1):
                chunk = tuple(np.concatenate(a) for a in zip(*parts, strict=True))
                parts.clear()
                checked, failed = _checked(chunk, diverged)
                if failed.size:
                    yield (FAILED, failed, "the solver's output is not finite (NaN or inf)")
                    yield None
                if checked is None:
                    continue
                for shard, part in shard_parts(checked, self.shards, self.group, self.chunk_steps):
                    yield (shard, *chunk_keys(*part))
                    yield part
        yield (ENDED,)
        yield None


def _checked(chunk: tuple[np.ndarray, ...], diverged: set[int]) -> tuple[tuple[np.ndarray, ...] | None, np.ndarray]:
    """``chunk`` through ``check_chunk`` without the rows of simulations in ``diverged`` (None if no row is left),
    and the ids of simulations it finds non-finite now (added to ``diverged``): their rows never reach a shard."""
    x, y, sid, tix = chunk
    if diverged:
        keep = ~np.isin(sid, np.fromiter(diverged, dtype=np.int64))
        x, y, sid, tix = x[keep], y[keep], sid[keep], tix[keep]
    none = np.empty(0, dtype=np.int64)
    if sid.size == 0:
        return None, none
    try:
        return check_chunk(Chunk(x=x, y=y, sim_id=sid, t_index=tix)), none
    except ValueError:
        # Only on this path are rows looked at one by one: a valid chunk is checked once, as before.
        new = _non_finite_sims(x, y, sid)
        if not new:
            raise  # invalid for another reason (shape, dtype): the solver's own error
    diverged.update(new)
    rest, _ = _checked((x, y, sid, tix), diverged)
    return rest, np.asarray(new, dtype=np.int64)


def _non_finite_sims(x: np.ndarray, y: np.ndarray, sim_id: np.ndarray) -> list[int]:
    """Simulation ids with a non-finite value in any of their rows (as float32, where the buffer stores them)."""
    with np.errstate(over="ignore"):  # overflow -> inf, which is what is looked for
        ok = np.isfinite(np.asarray(x, dtype=np.float32)).all(axis=1) & np.isfinite(
            np.asarray(y, dtype=np.float32)
        ).all(axis=1)
    return [] if ok.all() else [int(v) for v in np.unique(np.asarray(sim_id)[~ok])]
