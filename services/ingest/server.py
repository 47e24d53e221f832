"""The gRPC server of external solvers: Study (next simulation, failures) and Ingest (the fields).

One ``SurgeServer`` per ``host:port`` and process serves every study attached to it, plus the
Predict service when the gateway lends it its models (``services.ingest.predict``). A study
attaches a ``StudyFeed``: its problem spec, buffer actor, id sequence and limits.

An external simulation's life:

1. ``Study.NextSimulation`` takes the next id from the study's ``SimulationIds`` (the sequence the
   solver actors use too, re-queued failures first) and hands out its parameters and seed.
2. ``Ingest.Stream`` opens with a header naming it. The server *admits* the stream once it can
   reserve the whole simulation's staging memory in the study's pool (``ingest.max_staged_mb``;
   reserving it whole, not chunk by chunk, is what keeps two half-staged simulations from waiting
   on each other forever), then grants credit in bytes, replenished as chunks arrive. A client
   that outruns the trainer therefore waits: the study's FIFO buffer blocks the puts of completed
   simulations, their staging stays reserved, and new streams are not admitted until it frees.
3. Each chunk is checked against the problem spec and staged as float32.
4. At ``End``, once every (field, time index) the problem uses is there, the study's
   ``StepAssembler`` turns the simulation into samples, which are put into the buffer in chunks of up
   to ``put_bytes`` (the buffer drops repeated (simulation, time index) keys, so a retried put is
   harmless). Only then is the simulation done.

A rejected, incomplete, cancelled or broken stream drops what it staged: nothing of it reaches the
buffer; the simulation is counted failed and re-queued (at most ``solvers.max_attempts`` tries).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import ray

from services.auth import TOKEN_MISSING, bearer_ok
from services.config import IngestConfig
from services.ingest import surge_pb2 as pb
from services.ingest import surge_pb2_grpc as rpc
from trainer.buffer import BufferClosed
from trainer.problem import ProblemSpec

log = logging.getLogger("surge.ingest")

NO_TOKEN = "ingest is disabled: the server has no ingest token (set SURGE_INGEST_TOKEN)"
DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_OPEN_METHODS = ("/surge.v1.Predict/",)  # like REST predict: the predict token, when there is one
_MIN_WINDOW = 32 * 2**20  # credit granted per stream at a time, at least (and at least one float64 field)
_PUT_TRIES = 3
PUT_BYTES = 32 * 2**20  # samples per buffer put: few puts for small fields, bounded memory for large ones


class Reject(Exception):
    """Ends a call with a gRPC status and a message saying what is wrong."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def required_steps(spec: ProblemSpec) -> dict[str, tuple[int, ...]]:
    """The time indices of each field that the problem turns into samples (what a client must send)."""
    every = tuple(range(len(spec.times)))
    if spec.kind == "parametric":
        return {f: every for f in spec.outputs}
    if spec.pairs == "next":
        return {f: every for f in spec.fields if f in spec.inputs or f in spec.outputs}
    need: dict[str, set[int]] = {}
    for f in spec.inputs:
        need.setdefault(f, set()).add(spec._in_k)
    for f in spec.outputs:
        need.setdefault(f, set()).add(spec._out_k)
    return {f: tuple(sorted(need[f])) for f in spec.fields if f in need}


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


@dataclass
class _Out:
    """A simulation handed out to an external client and not settled yet."""

    sim_id: int
    params: np.ndarray  # (P,)
    seed: int
    attempt: int
    since: float
    stream: _Stream | None = None


@dataclass
class _Stream:
    """One Ingest.Stream call: the simulation it carries and what it has staged."""

    context: grpc.ServicerContext
    sim: _Out | None = None
    reserved: int = 0  # bytes of the pool held
    staged: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (field, k) -> grid, float32
    phase: str = "open"  # -> "committing" (End accepted, samples going into the buffer) -> "ended"
    killed: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class StudyFeed:
    """A study as its external clients see it: the checks, staging and commit of their simulations."""

    def __init__(
        self,
        study_id: str,
        spec: ProblemSpec,
        buffer: Any,
        ids: Any,
        config: IngestConfig,
        on_event: Callable[..., None],
        put_bytes: int = PUT_BYTES,
    ) -> None:
        self.study_id = study_id
        self.spec = spec
        self.buffer = buffer
        self.ids = ids  # services.study.SimulationIds
        self.config = config
        self.put_bytes = put_bytes
        self.on_event = on_event  # (kind, sim_id, produced): "assigned", "done", "failed", "cancelled"
        self.required = required_steps(spec)
        self.pairs = frozenset((f, k) for f, ks in self.required.items() for k in ks)
        self.field_bytes = int(np.prod(spec.grid)) * 4
        self.sim_bytes = len(self.pairs) * self.field_bytes  # staged as float32
        self.pool = StagingPool(int(config.max_staged_mb * 2**20))
        self.window = max(_MIN_WINDOW, 2 * int(np.prod(spec.grid)) * 8)
        self.open = True
        self.closed_reason = ""
        self._lock = threading.Lock()
        self._out: dict[int, _Out] = {}
        self._streams = 0
        self._counts = {"assigned": 0, "done": 0, "failed": 0, "cancelled": 0, "rejected_streams": 0, "chunks": 0}
        self._solver_config = json.dumps(spec.solver_config)

    # Simulations ------------------------------------------------------------------------------------
    @property
    def cap_reached(self) -> bool:
        cap = self.config.max_simulations
        return cap is not None and self._counts["done"] >= cap

    def next_simulation(self) -> pb.Simulation:
        self.reap()
        cap = self.config.max_simulations
        with self._lock:
            if not self.open:
                raise Reject(grpc.StatusCode.OUT_OF_RANGE, f"study {self.study_id} has ended: {self.closed_reason}")
            if self.cap_reached:
                raise Reject(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"study {self.study_id} has all the external simulations it takes ({cap})",
                )
            if cap is not None and self._counts["done"] + len(self._out) >= cap:
                raise Reject(
                    grpc.StatusCode.ABORTED,
                    f"study {self.study_id}: its last external simulations are in flight and may still fail; "
                    "ask again later",
                )
            got = self.ids.take(1, "external")
            if got is None:
                if self.ids.outstanding() == 0:
                    raise Reject(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"study {self.study_id} has handed out all its {self.ids.budget} simulations",
                    )
                raise Reject(
                    grpc.StatusCode.ABORTED,
                    f"study {self.study_id}: no simulation free now; {self.ids.outstanding()} in flight may "
                    "still fail; ask again later",
                )
            sim = _Out(int(got.ids[0]), got.params[0], int(got.seeds[0]), int(got.attempts[0]), time.monotonic())
            self._out[sim.sim_id] = sim
            self._counts["assigned"] += 1
        self.on_event("assigned", sim.sim_id)
        spec = self.spec
        return pb.Simulation(
            study_id=self.study_id,
            simulation_id=sim.sim_id,
            params={n: float(v) for n, v in zip(spec.params.names, sim.params, strict=True)},
            param_names=list(spec.params.names),
            seed=sim.seed,
            solver=spec.solver,
            solver_config_json=self._solver_config,
            fields=list(spec.fields),
            grid=list(spec.grid),
            times=list(spec.times),
            send=[pb.FieldSteps(field=f, time_indices=list(ks)) for f, ks in self.required.items()],
            attempt=sim.attempt,
        )

    def report_failure(self, sim_id: int, reason: str) -> bool:
        """The client gave up on ``sim_id``; returns whether it is handed out again."""
        with self._lock:
            sim = self._out.get(sim_id)
        if sim is None:
            raise self._not_out(sim_id)
        st = sim.stream
        if st is not None:
            with st.lock:
                if st.phase == "committing":
                    raise Reject(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"simulation {sim_id} is complete and being put into the buffer",
                    )
                st.killed = f"simulation {sim_id} was reported failed: {reason}"
        log.info("study %s: simulation %d reported failed: %s", self.study_id, sim_id, reason)
        return self._settle(sim_id, "failed", expect=sim)

    def reap(self) -> None:
        """Simulations handed out but never streamed within ``lease_s`` are handed out again."""
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._out.values() if s.stream is None and now - s.since > self.config.lease_s]
        for sim in stale:
            log.warning("study %s: simulation %d was never streamed; handing it out again", self.study_id, sim.sim_id)
            self._settle(sim.sim_id, "failed", expect=sim)

    def _not_out(self, sim_id: int) -> Reject:
        if self.ids.is_out(sim_id):
            return Reject(grpc.StatusCode.NOT_FOUND, f"simulation {sim_id} is run by a solver actor, not by you")
        return Reject(
            grpc.StatusCode.NOT_FOUND,
            f"simulation {sim_id} is not handed out to an external client of study {self.study_id} "
            "(ask Study.NextSimulation for one; a finished or failed simulation cannot be sent again)",
        )

    def _settle(self, sim_id: int, outcome: str, produced: int = 0, expect: _Out | None = None) -> bool:
        """Once per hand-out: ``done``, ``failed`` (re-queued if tries are left) or ``cancelled``.

        With ``expect``, only that hand-out is settled (not a later one of the same, re-queued, id).
        Returns whether the simulation is handed out again."""
        with self._lock:
            if sim_id not in self._out or (expect is not None and self._out[sim_id] is not expect):
                return False
            del self._out[sim_id]
            self._counts[outcome] += 1
        again = self.ids.settle([sim_id], outcome, requeue=outcome == "failed")
        self.on_event(outcome, sim_id, produced)
        return bool(again)

    # Streams ----------------------------------------------------------------------------------------
    def begin(self, st: _Stream, header: pb.Header) -> None:
        if not self.open:
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"study {self.study_id} has ended: {self.closed_reason}")
        sim_id = int(header.simulation_id)
        with self._lock:
            sim = self._out.get(sim_id)
            if sim is None:
                raise self._not_out(sim_id)
            if sim.stream is not None:
                raise Reject(
                    grpc.StatusCode.FAILED_PRECONDITION, f"simulation {sim_id} is being streamed by another call"
                )
            sim.stream = st
            st.sim = sim
            self._streams += 1
        if header.params:
            names = self.spec.params.names
            given = dict(header.params)
            if set(given) != set(names) or not np.allclose([given[n] for n in names], sim.params, rtol=1e-9, atol=0.0):
                raise Reject(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"header params {given} differ from those of simulation {sim_id}: "
                    f"{dict(zip(names, map(float, sim.params), strict=True))}",
                )
        if self.sim_bytes > self.pool.max_bytes:
            raise Reject(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a simulation needs {self.sim_bytes / 2**20:.1f} MiB staged, more than ingest.max_staged_mb "
                f"({self.pool.max_bytes / 2**20:.1f} MiB)",
            )

    def admit(self, st: _Stream) -> None:
        """Reserve the whole simulation's staging memory; waits while other simulations hold it."""

        def alive() -> bool:
            return self.open and st.killed is None and st.context.is_active()

        if not self.pool.reserve(self.sim_bytes, alive):
            raise self._gone(st)
        st.reserved = self.sim_bytes

    def _gone(self, st: _Stream) -> Reject:
        if st.killed is not None:
            return Reject(grpc.StatusCode.ABORTED, st.killed)
        if not self.open:
            return Reject(grpc.StatusCode.ABORTED, f"study {self.study_id} has ended: {self.closed_reason}")
        return Reject(grpc.StatusCode.CANCELLED, "the call was cancelled")

    def stage(self, st: _Stream, chunk: pb.Chunk, data: bytes) -> None:
        """Check one chunk (``data``: its bytes, read once) against the problem spec; keep it (float32) until End."""
        if st.killed is not None or not self.open:
            raise self._gone(st)
        spec, sim_id = self.spec, st.sim.sim_id if st.sim else -1
        name, k = chunk.field, int(chunk.time_index)
        where = f"simulation {sim_id}, chunk {name!r} at time_index {k}"
        if name not in spec.fields:
            raise Reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: unknown field {name!r}; {spec.solver} records {', '.join(spec.fields)}",
            )
        nt = len(spec.times)
        if not 0 <= k < nt:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: time_index must lie in [0, {nt - 1}]")
        dtype = DTYPES.get(chunk.dtype)
        if dtype is None:
            raise Reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: dtype {chunk.dtype!r} is not supported; send float32 or float64",
            )
        if tuple(chunk.shape) != spec.grid:
            raise Reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: shape {list(chunk.shape)} does not match the grid {list(spec.grid)}",
            )
        want = int(np.prod(spec.grid)) * dtype.itemsize
        if len(data) != want:
            raise Reject(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: data holds {len(data)} bytes; {list(spec.grid)} {chunk.dtype} takes {want}",
            )
        if (name, k) in st.staged:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: sent twice")
        a = np.frombuffer(data, dtype=dtype).reshape(spec.grid)
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported below
            a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: holds non-finite values (NaN or inf)")
        if (name, k) in self.pairs:  # a field or step the problem does not use is checked, then dropped
            st.staged[(name, k)] = a
        with self._lock:
            self._counts["chunks"] += 1

    def commit(self, st: _Stream) -> int:
        """At End: the samples of a complete simulation into the buffer; returns how many were put."""
        sim = st.sim
        assert sim is not None
        missing = sorted(self.pairs - set(st.staged), key=lambda p: (p[1], p[0]))
        if missing:
            f, k = missing[0]
            raise Reject(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"simulation {sim.sim_id} is incomplete at End: {len(missing)} of {len(self.pairs)} chunks "
                f"missing (the first: {f!r} at time_index {k})",
            )
        with st.lock:
            if st.phase != "open" or st.killed is not None or not self.open:
                raise self._gone(st)
            st.phase = "committing"
        produced, error = 0, None
        try:
            for x, y, sid, tix, nbytes in self._samples(st):
                self._put(x, y, sid, tix)
                produced += x.shape[0]
                self.pool.release(nbytes)
                st.reserved -= nbytes
        except BufferClosed:
            error = f"study {self.study_id} has ended; simulation {sim.sim_id} was not used"
            self._settle(sim.sim_id, "cancelled", produced, expect=sim)
            raise Reject(grpc.StatusCode.ABORTED, error) from None
        except Exception as e:
            log.exception("study %s: cannot put simulation %d into the buffer", self.study_id, sim.sim_id)
            error = f"the study's buffer failed: {type(e).__name__}: {e}"
            self._settle(sim.sim_id, "failed", produced, expect=sim)
            raise Reject(grpc.StatusCode.UNAVAILABLE, error) from None
        finally:
            with st.lock:
                st.phase = "ended"
            self._release(st, error)
        self._settle(sim.sim_id, "done", produced, expect=sim)
        return produced

    def _samples(self, st: _Stream) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
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

    def _put(self, x: np.ndarray, y: np.ndarray, sid: np.ndarray, tix: np.ndarray) -> None:
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

    def end_stream(self, st: _Stream, error: str | None) -> None:
        """When a call ends, however it ends: its staging is freed and its simulation, unless settled, failed.

        Idempotent; a call whose commit is under way is left to the commit, which ends it itself."""
        with st.lock:
            if st.phase != "open":
                return
            st.phase = "ended"
        self._release(st, error)
        sim = st.sim
        if sim is not None:
            log.info("study %s: simulation %d: %s", self.study_id, sim.sim_id, error or "the stream ended early")
            self._settle(sim.sim_id, "failed" if self.open else "cancelled", expect=sim)

    def _release(self, st: _Stream, error: str | None) -> None:
        st.staged.clear()
        self.pool.release(st.reserved)
        st.reserved = 0
        if st.sim is None:
            return
        with self._lock:
            self._streams -= 1
            if error is not None:
                self._counts["rejected_streams"] += 1
            if st.sim.stream is st:
                st.sim.stream = None

    def close(self, reason: str) -> None:
        """No more simulations: new calls are refused, streams still open end, their simulations are cancelled."""
        with self._lock:
            if not self.open:
                return
            self.open = False
            self.closed_reason = reason
            left = [s.sim_id for s in self._out.values() if s.stream is None]
        for sim_id in left:
            self._settle(sim_id, "cancelled")

    def stats(self) -> dict[str, Any]:
        """For the study snapshot: staging memory (bound, now, peak), waits for credit, simulations."""
        with self._lock:
            counts = dict(self._counts)
            out = len(self._out)
            streams = self._streams
        return {
            "open": self.open,
            "streams": streams,
            "simulations_out": out,
            **counts,
            "staged_bytes": self.pool.used,
            "peak_staged_bytes": self.pool.peak,
            "max_staged_bytes": self.pool.max_bytes,
            "simulation_bytes": self.sim_bytes,
            "credit_waits": self.pool.waits,
            "credit_wait_s": self.pool.wait_s,
            "streams_waiting": self.pool.waiting,
        }


# Services ---------------------------------------------------------------------------------------------


class _Registry:
    """The studies attached to one server, by id."""

    def __init__(self) -> None:
        self.feeds: dict[str, StudyFeed] = {}

    def feed(self, study_id: str) -> StudyFeed:
        f = self.feeds.get(study_id)
        if f is None:
            known = ", ".join(sorted(self.feeds)) or "none"
            raise Reject(
                grpc.StatusCode.NOT_FOUND, f"study {study_id!r} is not fed through this server (studies: {known})"
            )
        return f


def _abort(context: grpc.ServicerContext, r: Reject) -> None:
    context.abort(r.code, r.message)


class StudyService(rpc.StudyServicer):
    def __init__(self, registry: _Registry) -> None:
        self.registry = registry

    def NextSimulation(self, request: pb.NextSimulationRequest, context: grpc.ServicerContext) -> pb.Simulation:
        try:
            return self.registry.feed(request.study_id).next_simulation()
        except Reject as r:
            _abort(context, r)
            raise  # unreachable: abort raises

    def ReportFailure(
        self, request: pb.ReportFailureRequest, context: grpc.ServicerContext
    ) -> pb.ReportFailureResponse:
        try:
            again = self.registry.feed(request.study_id).report_failure(int(request.simulation_id), request.reason)
        except Reject as r:
            _abort(context, r)
            raise
        return pb.ReportFailureResponse(requeued=again)


class IngestService(rpc.IngestServicer):
    def __init__(self, registry: _Registry) -> None:
        self.registry = registry

    def Stream(self, request_iterator: Iterator[pb.IngestRequest], context: grpc.ServicerContext) -> Iterator[pb.Ack]:
        st = _Stream(context)
        feed: StudyFeed | None = None
        error: str | None = "stream ended before End"
        # However the call ends (also a client that vanished while this generator was suspended).
        context.add_callback(lambda: feed.end_stream(st, error) if feed is not None else None)
        try:
            first = next(request_iterator, None)
            if first is None:
                return
            if first.WhichOneof("kind") != "header":
                raise Reject(grpc.StatusCode.FAILED_PRECONDITION, "the first message of a stream must be a header")
            feed = self.registry.feed(first.header.study_id)
            feed.begin(st, first.header)
            feed.admit(st)
            sim_id = st.sim.sim_id if st.sim else -1
            credit, unacked = feed.window, 0
            yield pb.Ack(
                credit_bytes=feed.window,
                message=f"simulation {sim_id}: send {len(feed.pairs)} chunks, then End",
            )
            for req in request_iterator:
                kind = req.WhichOneof("kind")
                if kind == "chunk":
                    chunk = req.chunk
                    data = chunk.data  # a copy of the message's bytes at every access: once only
                    n = len(data)
                    if n > credit:
                        raise Reject(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"simulation {sim_id}: a chunk of {n} bytes exceeds the credit left ({credit} bytes); "
                            "wait for an Ack",
                        )
                    credit -= n
                    feed.stage(st, chunk, data)
                    unacked += n
                    if unacked >= feed.window // 2:
                        credit += unacked
                        yield pb.Ack(credit_bytes=unacked)
                        unacked = 0
                elif kind == "end":
                    accepted = feed.commit(st)
                    error = None
                    yield pb.Ack(accepted_samples=accepted, message=f"simulation {sim_id}: {accepted} samples in")
                    return
                else:
                    raise Reject(
                        grpc.StatusCode.FAILED_PRECONDITION, "one simulation per stream: a second header was sent"
                    )
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"simulation {sim_id}: the stream ended without End")
        except Reject as r:
            error = r.message
            if feed is not None:
                feed.end_stream(st, error)
            _abort(context, r)
        except grpc.RpcError:  # the client went away (cancelled, killed, connection lost)
            error = "the client went away mid-stream"
        finally:
            if feed is not None:
                feed.end_stream(st, error)


class _TokenCheck(grpc.ServerInterceptor):
    """``authorization: Bearer <token>``: the ingest token on Ingest and Study calls (external solvers);
    on Predict the predict token, when the server has one (predictions are open otherwise, as on REST)."""

    def __init__(self, token: str | None, predict_token: str | None = None) -> None:
        self.token = token
        self.predict_token = predict_token

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        auth = dict(details.invocation_metadata or ()).get("authorization", "")
        if details.method.startswith(_OPEN_METHODS):
            if not self.predict_token or bearer_ok(str(auth), self.predict_token):
                return continuation(details)
            code, msg = grpc.StatusCode.UNAUTHENTICATED, TOKEN_MISSING
        elif self.token:
            if bearer_ok(str(auth), self.token):
                return continuation(details)
            code, msg = grpc.StatusCode.UNAUTHENTICATED, TOKEN_MISSING
        else:
            code, msg = grpc.StatusCode.PERMISSION_DENIED, NO_TOKEN
        handler = continuation(details)
        if handler is None:
            return None

        def deny(_: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, msg)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class SurgeServer:
    """One gRPC server: Ingest and Study for the studies attached, Predict for the models lent to it."""

    def __init__(
        self, host: str, port: int, token: str | None, max_message_bytes: int = 64 * 2**20, workers: int = 64
    ) -> None:
        from services.ingest.predict import PredictService

        self.host = host
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.registry = _Registry()
        self.predict = PredictService()
        self._users = 0
        self._check = _TokenCheck(token)
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use must fail here, not be shared silently
            ("grpc.keepalive_time_ms", 20_000),  # notice peers that vanished without closing
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surge-grpc"),
            interceptors=[self._check],
            options=options,
        )
        rpc.add_IngestServicer_to_server(IngestService(self.registry), self._server)
        rpc.add_StudyServicer_to_server(StudyService(self.registry), self._server)
        rpc.add_PredictServicer_to_server(self.predict, self._server)
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise OSError(f"gRPC: cannot listen on {host}:{port} (in use?): {e}") from None
        if not self.port:
            raise OSError(f"gRPC: cannot listen on {host}:{port} (in use?)")
        self.address = f"{host}:{self.port}"
        self._server.start()
        log.info("gRPC server on %s", self.address)

    def attach(self, feed: StudyFeed) -> None:
        self.registry.feeds[feed.study_id] = feed

    def detach(self, feed: StudyFeed) -> None:
        """The study has ended (its feed stays known, closed, so that late clients hear that it ended)."""
        feed.close(f"study {feed.study_id} has ended")

    def serve_predictions(self, models: Any, max_rows: int, max_values: int = 2**22, token: str | None = None) -> None:
        """Answer Predict from ``models``; with ``token``, only calls that carry it."""
        self._check.predict_token = token
        self.predict.lend(models, max_rows, max_values)

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait(grace + 1)


_SERVERS: dict[tuple[str, int], SurgeServer] = {}
_SERVERS_LOCK = threading.Lock()


def serve(host: str, port: int, *, token: str | None, max_message_bytes: int = 64 * 2**20) -> SurgeServer:
    """The process's server on ``host:port``, started if there is none yet (``port`` 0: a free one).

    Callers sharing a port share one server (its message limit is the first caller's); each calls
    ``release`` once when done, and the last one stops it.
    """
    with _SERVERS_LOCK:
        srv = _SERVERS.get((host, port)) if port else None
        if srv is None:
            srv = SurgeServer(host, port, token, max_message_bytes)
            _SERVERS[(host, srv.port)] = srv
        elif token != srv.token:
            log.warning("gRPC server on %s keeps the API token it was started with", srv.address)
        srv._users += 1
        return srv


def release(srv: SurgeServer) -> None:
    with _SERVERS_LOCK:
        srv._users -= 1
        if srv._users > 0:
            return
        _SERVERS.pop((srv.host, srv.port), None)
    srv.stop()
