"""``StudyFeed``: a study as its external clients see it. It ties a stream's steps together: the lease it
carries (``leases``), the chunk checks (``chunks``), the memory it stages and the commit of a complete
simulation into the study's buffer (``staging``). The gRPC services in ``server`` call it; it knows
nothing of threads or transports beyond the call context a stream carries."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from services.config import IngestConfig
from services.ingest import surge_pb2 as pb
from services.ingest.chunks import check_chunk, required_steps
from services.ingest.credit import window_bytes
from services.ingest.errors import Reject
from services.ingest.leases import Leases
from services.ingest.staging import PUT_BYTES, Phase, Staging, StreamState
from trainer.buffer import BufferClosed
from trainer.problem import ProblemSpec

log = logging.getLogger("surge.ingest")


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
        self.config = config
        self.required = required_steps(spec)
        # ids: services.ledger.SimulationIds; on_event(kind, sim_id, produced): "assigned", "done", "failed", ...
        self.leases = Leases(study_id, ids, config, on_event)
        self.staging = Staging(spec, self.required, buffer, int(config.max_staged_mb * 2**20), put_bytes)
        self.pairs = self.staging.pairs
        self.sim_bytes = self.staging.sim_bytes
        self.window = window_bytes(spec)
        self._chunks = 0
        self._chunks_lock = threading.Lock()
        self._solver_config = json.dumps(spec.solver_config)

    @property
    def open(self) -> bool:
        return self.leases.open

    @property
    def closed_reason(self) -> str:
        return self.leases.closed_reason

    # Simulations ------------------------------------------------------------------------------------
    @property
    def cap_reached(self) -> bool:
        return self.leases.cap_reached

    def next_simulation(self) -> pb.Simulation:
        self.reap()
        sim = self.leases.hand_out()
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
        sim = self.leases.get(sim_id)
        if sim is None:
            raise self.leases.not_out(sim_id)
        st = sim.stream
        if st is not None:
            with st.lock:
                if st.phase is Phase.COMMITTING:
                    raise Reject(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"simulation {sim_id} is complete and being put into the buffer",
                    )
                st.killed = f"simulation {sim_id} was reported failed: {reason}"
        log.info("study %s: simulation %d reported failed: %s", self.study_id, sim_id, reason)
        return self.leases.settle(sim_id, "failed", expect=sim)

    def reap(self) -> None:
        """Simulations handed out but never streamed within ``lease_s`` are handed out again."""
        self.leases.reap()

    # Streams ----------------------------------------------------------------------------------------
    def begin(self, st: StreamState, header: pb.Header) -> None:
        if not self.open:
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"study {self.study_id} has ended: {self.closed_reason}")
        sim_id = int(header.simulation_id)
        sim = self.leases.claim(sim_id, st)
        if header.params:
            names = self.spec.params.names
            given = dict(header.params)
            if set(given) != set(names) or not np.allclose([given[n] for n in names], sim.params, rtol=1e-9, atol=0.0):
                raise Reject(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"header params {given} differ from those of simulation {sim_id}: "
                    f"{dict(zip(names, map(float, sim.params), strict=True))}",
                )
        pool = self.staging.pool
        if self.sim_bytes > pool.max_bytes:
            raise Reject(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a simulation needs {self.sim_bytes / 2**20:.1f} MiB staged, more than ingest.max_staged_mb "
                f"({pool.max_bytes / 2**20:.1f} MiB)",
            )

    def admit(self, st: StreamState) -> None:
        """Reserve the whole simulation's staging memory; waits while other simulations hold it."""

        def alive() -> bool:
            return self.open and st.killed is None and st.context.is_active()

        if not self.staging.reserve(st, alive):
            raise self._gone(st)

    def _gone(self, st: StreamState) -> Reject:
        if st.killed is not None:
            return Reject(grpc.StatusCode.ABORTED, st.killed)
        if not self.open:
            return Reject(grpc.StatusCode.ABORTED, f"study {self.study_id} has ended: {self.closed_reason}")
        return Reject(grpc.StatusCode.CANCELLED, "the call was cancelled")

    def stage(self, st: StreamState, chunk: pb.Chunk, data: bytes) -> None:
        """Check one chunk (``data``: its bytes, read once) against the problem spec; keep it (float32) until End."""
        if st.killed is not None or not self.open:
            raise self._gone(st)
        key, a = check_chunk(self.spec, chunk, data, st.sim.sim_id if st.sim else -1, st.staged)
        self.staging.keep(st, key, a)
        with self._chunks_lock:
            self._chunks += 1

    def commit(self, st: StreamState) -> int:
        """At End: the samples of a complete simulation into the buffer; returns how many were put."""
        sim = st.sim
        assert sim is not None
        missing = self.staging.missing(st)
        if missing:
            f, k = missing[0]
            raise Reject(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"simulation {sim.sim_id} is incomplete at End: {len(missing)} of {len(self.pairs)} chunks "
                f"missing (the first: {f!r} at time_index {k})",
            )
        with st.lock:
            if st.phase is not Phase.OPEN or st.killed is not None or not self.open:
                raise self._gone(st)
            st.phase = Phase.COMMITTING
        produced, error = 0, None
        try:
            for x, y, sid, tix, nbytes in self.staging.samples(st):
                self.staging.put(x, y, sid, tix)
                produced += x.shape[0]
                self.staging.free(st, nbytes)
        except BufferClosed:
            error = f"study {self.study_id} has ended; simulation {sim.sim_id} was not used"
            self.leases.settle(sim.sim_id, "cancelled", produced, expect=sim)
            raise Reject(grpc.StatusCode.ABORTED, error) from None
        except Exception as e:
            log.exception("study %s: cannot put simulation %d into the buffer", self.study_id, sim.sim_id)
            error = f"the study's buffer failed: {type(e).__name__}: {e}"
            self.leases.settle(sim.sim_id, "failed", produced, expect=sim)
            raise Reject(grpc.StatusCode.UNAVAILABLE, error) from None
        finally:
            with st.lock:
                st.phase = Phase.ENDED
            self._release(st, error)
        self.leases.settle(sim.sim_id, "done", produced, expect=sim)
        return produced

    def end_stream(self, st: StreamState, error: str | None) -> None:
        """When a call ends, however it ends: its staging is freed and its simulation, unless settled, failed.

        Idempotent; a call whose commit is under way is left to the commit, which ends it itself."""
        with st.lock:
            if st.phase is not Phase.OPEN:
                return
            st.phase = Phase.ENDED
        self._release(st, error)
        sim = st.sim
        if sim is not None:
            log.info("study %s: simulation %d: %s", self.study_id, sim.sim_id, error or "the stream ended early")
            self.leases.settle(sim.sim_id, "failed" if self.open else "cancelled", expect=sim)

    def _release(self, st: StreamState, error: str | None) -> None:
        self.staging.drop(st)
        self.leases.unclaim(st, rejected=error is not None)

    def close(self, reason: str) -> None:
        """No more simulations: new calls are refused, streams still open end, their simulations are cancelled."""
        self.leases.close(reason)

    def stats(self) -> dict[str, Any]:
        """For the study snapshot: staging memory (bound, now, peak), waits for credit, simulations."""
        streams, out, counts = self.leases.counts()
        with self._chunks_lock:
            chunks = self._chunks
        pool = self.staging.pool
        return {
            "open": self.open,
            "streams": streams,
            "simulations_out": out,
            **counts,
            "chunks": chunks,
            "staged_bytes": pool.used,
            "peak_staged_bytes": pool.peak,
            "max_staged_bytes": pool.max_bytes,
            "simulation_bytes": self.sim_bytes,
            "credit_waits": pool.waits,
            "credit_wait_s": pool.wait_s,
            "streams_waiting": pool.waiting,
        }
