"""The gRPC server of external solvers: Study (next simulation, failures) and Ingest (the fields).

One ``SurgeServer`` per ``host:port`` and process serves every study attached to it, plus the
Predict service when the gateway lends it its models (``services.ingest.predict``). A study
attaches a ``StudyFeed``: its problem spec, buffer actor, id sequence and limits.

An external simulation's life:

1. ``Study.NextSimulation`` takes the next id from the study's ``SimulationIds`` (the sequence the
   solver actors use too, re-queued failures first) and hands out its parameters and seed: a lease
   (``leases``).
2. ``Ingest.Stream`` opens with a header naming it. The server *admits* the stream once it can
   reserve the whole simulation's staging memory in the study's pool (``ingest.max_staged_mb``;
   reserving it whole, not chunk by chunk, is what keeps two half-staged simulations from waiting
   on each other forever), then grants credit in bytes, replenished as chunks arrive (``credit``).
   A client that outruns the trainer therefore waits: the study's FIFO buffer blocks the puts of
   completed simulations, their staging stays reserved, and new streams are not admitted until it frees.
3. Each chunk is checked against the problem spec (``chunks``) and staged as float32 (``staging``).
4. At ``End``, once every (field, time index) the problem uses is there, the study's
   ``StepAssembler`` turns the simulation into samples, which are put into the buffer in chunks of up
   to ``put_bytes`` (the buffer drops repeated (simulation, time index) keys, so a retried put is
   harmless). Only then is the simulation done.

A rejected, incomplete, cancelled or broken stream drops what it staged: nothing of it reaches the
buffer; the simulation is counted failed and re-queued (at most ``solvers.max_attempts`` tries).

A stream holds a server thread for its whole life, also while it waits in steps 2 and 4; Ingest and
Study calls therefore each have a fixed share of the threads and Predict has threads of its own that
they cannot take (``capacity``). With ``ServerTLS`` (``tls``) the port speaks TLS instead of plaintext.

This module holds the gRPC side: the services, the token check, ``SurgeServer`` and the per-port
``serve`` / ``release``. What a study does with a call lives in ``feed`` (``StudyFeed``), ``leases``,
``chunks``, ``credit`` and ``staging``; their public names are importable from here too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from services.auth import TOKEN_MISSING, bearer_ok
from services.ingest import surge_pb2 as pb
from services.ingest import surge_pb2_grpc as rpc
from services.ingest.capacity import CallSlots, held_while_running
from services.ingest.chunks import DTYPES, check_chunk, required_steps
from services.ingest.credit import Credit
from services.ingest.errors import Reject
from services.ingest.feed import StudyFeed
from services.ingest.leases import Lease, Leases
from services.ingest.staging import PUT_BYTES, Phase, Staging, StagingPool, StreamState
from services.ingest.tls import ServerTLS, TLSError

log = logging.getLogger("surge.ingest")

NO_TOKEN = "ingest is disabled: the server has no ingest token (set SURGE_INGEST_TOKEN)"
_OPEN_METHODS = ("/surge.v1.Predict/",)  # like REST predict: the predict token, when there is one
INGEST_STREAMS = 64  # Ingest.Stream calls at once (each holds a thread while it lives)
STUDY_CALLS = 8  # Study calls at once (short: a hand-out or a failure report)
PREDICT_THREADS = 16  # threads that only Predict can use

__all__ = [
    "DTYPES",
    "INGEST_STREAMS",
    "NO_TOKEN",
    "PREDICT_THREADS",
    "PUT_BYTES",
    "STUDY_CALLS",
    "TOKEN_MISSING",
    "IngestService",
    "Lease",
    "Leases",
    "Phase",
    "Reject",
    "ServerTLS",
    "Staging",
    "StagingPool",
    "StreamState",
    "StudyFeed",
    "StudyService",
    "SurgeServer",
    "TLSError",
    "check_chunk",
    "release",
    "required_steps",
    "serve",
]


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
    def __init__(self, registry: _Registry, slots: CallSlots) -> None:
        self.registry = registry
        self.slots = slots

    def NextSimulation(self, request: pb.NextSimulationRequest, context: grpc.ServicerContext) -> pb.Simulation:
        slot = self.slots.take()
        if slot is None:
            _abort(context, Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, self.slots.busy_message))
        try:
            return self.registry.feed(request.study_id).next_simulation()
        except Reject as r:
            _abort(context, r)
            raise  # unreachable: abort raises
        finally:
            slot.release()

    def ReportFailure(
        self, request: pb.ReportFailureRequest, context: grpc.ServicerContext
    ) -> pb.ReportFailureResponse:
        slot = self.slots.take()
        if slot is None:
            _abort(context, Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, self.slots.busy_message))
        try:
            again = self.registry.feed(request.study_id).report_failure(int(request.simulation_id), request.reason)
        except Reject as r:
            _abort(context, r)
            raise
        finally:
            slot.release()
        return pb.ReportFailureResponse(requeued=again)


class IngestService(rpc.IngestServicer):
    def __init__(self, registry: _Registry, slots: CallSlots) -> None:
        self.registry = registry
        self.slots = slots

    def Stream(self, request_iterator: Iterator[pb.IngestRequest], context: grpc.ServicerContext) -> Iterator[pb.Ack]:
        slot = self.slots.take()
        if slot is None:  # refused before it reads anything: its simulation stays handed out to the client
            log.info("ingest stream refused: %d streams open", self.slots.size)
            _abort(context, Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, self.slots.busy_message))
        acks = held_while_running(slot, self._stream(request_iterator, context))
        # A call that ended while suspended holds no thread, whether or not grpc closes its iterator.
        if not context.add_callback(lambda: None if acks.gi_running else slot.release()):
            slot.release()  # the call has ended already: nothing will run
            return iter(())
        return acks

    def _stream(self, request_iterator: Iterator[pb.IngestRequest], context: grpc.ServicerContext) -> Iterator[pb.Ack]:
        st = StreamState(context)
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
            credit = Credit(feed.window)
            yield pb.Ack(
                credit_bytes=feed.window,
                message=f"simulation {sim_id}: send {len(feed.pairs)} chunks, then End",
            )
            for req in request_iterator:
                kind = req.WhichOneof("kind")
                if kind == "chunk":
                    chunk = req.chunk
                    data = chunk.data  # a copy of the message's bytes at every access: once only
                    credit.take(len(data), sim_id)
                    feed.stage(st, chunk, data)
                    if grant := credit.received(len(data)):
                        yield pb.Ack(credit_bytes=grant)
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
    """One gRPC server: Ingest and Study for the studies attached, Predict for the models lent to it.

    Its thread pool is ``ingest_streams + study_calls + predict_threads``: Ingest.Stream and Study calls
    beyond their share are refused (RESOURCE_EXHAUSTED), so ``predict_threads`` threads stay Predict's
    however many streams wait for the trainer. With ``tls`` the port speaks TLS, else plaintext."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None,
        max_message_bytes: int = 64 * 2**20,
        *,
        tls: ServerTLS | None = None,
        ingest_streams: int = INGEST_STREAMS,
        study_calls: int = STUDY_CALLS,
        predict_threads: int = PREDICT_THREADS,
    ) -> None:
        from services.ingest.predict import PredictService

        if predict_threads < 1:
            raise ValueError(f"predict_threads: at least 1, not {predict_threads}")
        self.host = host
        self.token = token
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.registry = _Registry()
        self.predict = PredictService()
        self.streams = CallSlots(ingest_streams, "ingest streams")
        self.study_calls = CallSlots(study_calls, "Study calls")
        self.workers = ingest_streams + study_calls + predict_threads
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
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="surge-grpc"),
            interceptors=[self._check],
            options=options,
        )
        rpc.add_IngestServicer_to_server(IngestService(self.registry, self.streams), self._server)
        rpc.add_StudyServicer_to_server(StudyService(self.registry, self.study_calls), self._server)
        rpc.add_PredictServicer_to_server(self.predict, self._server)
        where = f"{host}:{port}"
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(where)
            else:  # the pair was checked when loaded: a failure here is the port's
                self.port = self._server.add_secure_port(where, tls.credentials())
        except RuntimeError as e:
            raise OSError(f"gRPC: cannot listen on {where} (in use?): {e}") from None
        if not self.port:
            raise OSError(f"gRPC: cannot listen on {where} (in use?)")
        self.address = f"{host}:{self.port}"
        self._server.start()
        log.info("gRPC server on %s (%s)", self.address, f"TLS, {tls.cert_path}" if tls else "plaintext")

    def attach(self, feed: StudyFeed) -> None:
        self.registry.feeds[feed.study_id] = feed

    def detach(self, feed: StudyFeed) -> None:
        """The study has ended (its feed stays known, closed, so that late clients hear that it ended)."""
        feed.close(f"study {feed.study_id} has ended")

    def serve_predictions(
        self, models: Any, max_rows: int, max_values: int = 2**22, token: str | None = None, queries: Any = None
    ) -> None:
        """Answer Predict from ``models``; with ``token``, only calls that carry it; the parameter points asked
        are kept in ``queries`` (a ``QueryBook``) when given."""
        self._check.predict_token = token
        self.predict.lend(models, max_rows, max_values, queries)

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait(grace + 1)


_SERVERS: dict[tuple[str, int], SurgeServer] = {}
_SERVERS_LOCK = threading.Lock()


def serve(
    host: str, port: int, *, token: str | None, max_message_bytes: int = 64 * 2**20, tls: ServerTLS | None = None
) -> SurgeServer:
    """The process's server on ``host:port``, started if there is none yet (``port`` 0: a free one).

    Callers sharing a port share one server (its message limit, token and TLS are the first caller's);
    each calls ``release`` once when done, and the last one stops it.
    """
    with _SERVERS_LOCK:
        srv = _SERVERS.get((host, port)) if port else None
        if srv is None:
            srv = SurgeServer(host, port, token, max_message_bytes, tls=tls)
            _SERVERS[(host, srv.port)] = srv
        else:
            if token != srv.token:
                log.warning("gRPC server on %s keeps the API token it was started with", srv.address)
            if tls != srv.tls:
                log.warning(
                    "gRPC server on %s keeps the TLS it was started with (%s)",
                    srv.address,
                    f"certificate {srv.tls.cert_path}" if srv.tls else "none: plaintext",
                )
        srv._users += 1
        return srv


def release(srv: SurgeServer) -> None:
    with _SERVERS_LOCK:
        srv._users -= 1
        if srv._users > 0:
            return
        _SERVERS.pop((srv.host, srv.port), None)
    srv.stop()
