"""The Python client of Surge's gRPC API, in the shape of Melissa's client (init / send / finalize).

An external solver takes part in a running study like this::

    from services.ingest.client import connect

    with connect("head-node:50051", token) as client:      # token: SURGE_INGEST_TOKEN
        while (sim := client.next_simulation(study_id)) is not None:
            u = initial_state(sim.params, sim.seed)          # the solver's own code
            for k in range(len(sim.times)):
                if k:
                    u = step(u)
                sim.send("u", k, u)                           # blocks while the server has no room
            sim.finish()                                      # the samples go to the buffer now

``next_simulation`` hands out the study's next simulation (id, parameters, seed: the study's
own sampling), or None once the study needs no more. ``send`` streams one field at one recorded
time index; it waits for credit from the server, so a solver faster than the trainer slows down
instead of filling the server's memory. ``finish`` ends the simulation: the server checks that
every (field, time index) the problem uses arrived (``Simulation.required``) and only then puts
its samples into the study's buffer. ``fail(reason)`` gives a simulation up: nothing of it is
used, and the study hands it out again. A simulation left without ``finish`` or ``fail`` (the
process died, the connection broke) is treated as failed too.

Errors from the server raise ``IngestError`` with the gRPC status code and the server's message.
A server whose share of threads for streams is taken refuses a new stream with RESOURCE_EXHAUSTED
(``send`` raises it; try again later); ``next_simulation`` and ``report_failure`` wait and ask again.

Over TLS: ``connect(address, token, root_cert=...)`` with the server's certificate (or its CA), PEM
bytes or a path, by default the file ``$SURGE_GRPC_TLS_ROOT_CERT``; ``server_name=`` (default
``$SURGE_GRPC_TLS_SERVER_NAME``) when the certificate names a host other than ``address``'s.
Only ``grpc`` and ``numpy`` are needed (no Ray, no torch).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import grpc
import numpy as np

from services import auth
from services.ingest import surge_pb2 as pb
from services.ingest import surge_pb2_grpc as rpc
from services.ingest import tls

__all__ = ["Client", "IngestError", "Simulation", "connect"]


class IngestError(RuntimeError):
    """A call the server refused or that broke: ``code`` (``grpc.StatusCode``) and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def of(cls, e: grpc.RpcError) -> IngestError:
        return cls(e.code(), e.details() or "")  # type: ignore[attr-defined]


def connect(
    address: str,
    token: str | None = None,
    *,
    root_cert: bytes | str | PathLike[str] | None = None,
    server_name: str | None = None,
    max_message_mb: float = 64.0,
) -> Client:
    """A client of the server at ``address`` (``host:port``); ``token`` defaults to the ingest token
    (``$SURGE_INGEST_TOKEN``, or the file named by ``$SURGE_INGEST_TOKEN_FILE``). A server with a predict
    token wants that one on Predict calls: pass it as ``token``.

    TLS when there is a ``root_cert`` (PEM bytes or a path; default: the file ``$SURGE_GRPC_TLS_ROOT_CERT``):
    the server's certificate must be signed by it (a self-signed one: itself) and name ``server_name``
    (default ``$SURGE_GRPC_TLS_SERVER_NAME``, else the host of ``address``). Plaintext otherwise."""
    return Client(
        address,
        token if token is not None else auth.secret(auth.INGEST),
        max_message_mb,
        root_cert=tls.root_cert(root_cert),
        server_name=tls.server_name(server_name),
    )


class Client:
    """A connection to a Surge gRPC server: simulations to run, and predictions."""

    def __init__(
        self,
        address: str,
        token: str | None,
        max_message_mb: float = 64.0,
        *,
        root_cert: bytes | None = None,
        server_name: str | None = None,
    ) -> None:
        limit = int(max_message_mb * 2**20)
        self.address = address
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
        if root_cert is None:
            if server_name:
                raise tls.TLSError(
                    f"a server name ({tls.SERVER_NAME} or server_name=) is for TLS, which needs a root certificate "
                    f"({tls.ROOT_CERT} or root_cert=)"
                )
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._study = rpc.StudyStub(self._channel)
        self._ingest = rpc.IngestStub(self._channel)
        self._predict = rpc.PredictStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def next_simulation(self, study_id: str, wait_s: float = 300.0, connect_s: float = 10.0) -> Simulation | None:
        """The study's next simulation, or None when it needs no more.

        While none is free (the last ones are in flight elsewhere and might still fail) asks again for up
        to ``wait_s`` seconds; while the server cannot be reached, for up to ``connect_s`` seconds. Then
        raises ``IngestError`` (``UNAVAILABLE`` also once the study has ended and its server is gone).
        """
        t0 = time.monotonic()
        delay = 0.05
        while True:
            try:
                msg = self._study.NextSimulation(
                    pb.NextSimulationRequest(study_id=study_id), metadata=self._metadata, timeout=60
                )
                return Simulation._from_message(self, msg)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    return None
                patience = {
                    grpc.StatusCode.ABORTED: wait_s,
                    grpc.StatusCode.RESOURCE_EXHAUSTED: wait_s,  # the server's Study calls are all busy
                    grpc.StatusCode.UNAVAILABLE: connect_s,
                }.get(code)
                if patience is None or time.monotonic() - t0 + delay > patience:
                    raise IngestError.of(e) from None
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    def report_failure(self, study_id: str, simulation_id: int, reason: str, wait_s: float = 30.0) -> bool:
        """Give a simulation up; returns whether the study hands it out again.

        While the server's Study calls are all busy (RESOURCE_EXHAUSTED) asks again for up to ``wait_s``."""
        req = pb.ReportFailureRequest(study_id=study_id, simulation_id=simulation_id, reason=reason)
        t0 = time.monotonic()
        delay = 0.05
        while True:
            try:
                r = self._study.ReportFailure(req, metadata=self._metadata, timeout=60)
                return bool(r.requeued)
            except grpc.RpcError as e:
                busy = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
                if not busy or time.monotonic() - t0 + delay > wait_s:
                    raise IngestError.of(e) from None
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    def predict(
        self,
        model: str,
        params: dict[str, float] | None = None,
        times: list[float] | np.ndarray | None = None,
        inputs: dict[str, np.ndarray] | None = None,
        timeout: float = 60.0,
    ) -> tuple[np.ndarray, int]:
        """``(outputs [N, C_out, *grid] float32, model version)``, as REST predict answers (an ensemble's mean).

        Parametric models: ``params`` and ``times``. Operator models: ``inputs`` (each field shaped like
        the grid or ``[N, *grid]``) and their scalar ``params``, if any.
        """
        r = self._predict_call(model, params, times, inputs, timeout)
        return np.frombuffer(r.data, dtype="<f4").reshape(tuple(r.shape)), int(r.version)

    def predict_std(
        self,
        model: str,
        params: dict[str, float] | None = None,
        times: list[float] | np.ndarray | None = None,
        inputs: dict[str, np.ndarray] | None = None,
        timeout: float = 60.0,
    ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """``(mean, std, model version)``: ``std`` is an ensemble's calibrated standard deviation, shaped like
        the mean, or ``None`` for a single model."""
        r = self._predict_call(model, params, times, inputs, timeout)
        shape = tuple(r.shape)
        std = np.frombuffer(r.std, dtype="<f4").reshape(shape) if r.ensemble else None
        return np.frombuffer(r.data, dtype="<f4").reshape(shape), std, int(r.version)

    def _predict_call(
        self,
        model: str,
        params: dict[str, float] | None,
        times: list[float] | np.ndarray | None,
        inputs: dict[str, np.ndarray] | None,
        timeout: float,
    ) -> pb.PredictResponse:
        req = pb.PredictRequest(model=model, params=params or {}, times=list(times) if times is not None else [])
        for name, a in (inputs or {}).items():
            arr = np.asarray(a)
            dt = "<f8" if arr.dtype == np.float64 else "<f4"
            arr = np.ascontiguousarray(arr, dtype=dt)
            req.inputs[name].CopyFrom(pb.Array(dtype=_dtype_name(arr), shape=list(arr.shape), data=arr.tobytes()))
        try:
            return self._predict.Predict(req, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise IngestError.of(e) from None


def _dtype_name(a: np.ndarray) -> str:
    return "float64" if a.dtype == np.float64 else "float32"


@dataclass
class Simulation:
    """One simulation handed out by a study: what to run, and the stream its fields go into."""

    study_id: str
    id: int
    params: dict[str, float]
    param_names: tuple[str, ...]
    seed: int
    attempt: int
    solver: str
    solver_config: dict[str, Any]
    fields: tuple[str, ...]
    grid: tuple[int, ...]
    times: np.ndarray
    required: dict[str, tuple[int, ...]]  # field -> the time indices to send
    credit_wait_s: float = 0.0  # time ``send`` waited for credit
    bytes_sent: int = 0
    _client: Client | None = field(default=None, repr=False)
    _stream: _Stream | None = field(default=None, repr=False)
    _ended: bool = field(default=False, repr=False)

    @classmethod
    def _from_message(cls, client: Client, m: pb.Simulation) -> Simulation:
        return cls(
            study_id=m.study_id,
            id=int(m.simulation_id),
            params=dict(m.params),
            param_names=tuple(m.param_names),
            seed=int(m.seed),
            attempt=int(m.attempt),
            solver=m.solver,
            solver_config=json.loads(m.solver_config_json or "{}"),
            fields=tuple(m.fields),
            grid=tuple(int(g) for g in m.grid),
            times=np.asarray(m.times, dtype=np.float64),
            required={fs.field: tuple(int(k) for k in fs.time_indices) for fs in m.send},
            _client=client,
        )

    @property
    def param_vector(self) -> np.ndarray:
        """The parameters in the solver's order ``[P]``."""
        return np.array([self.params[n] for n in self.param_names], dtype=np.float64)

    def wants(self, field: str, t_index: int) -> bool:
        """Whether the study uses ``field`` at ``t_index`` (what it does not use may be sent; it is dropped)."""
        return t_index in self.required.get(field, ())

    @property
    def chunks(self) -> int:
        return sum(len(v) for v in self.required.values())

    def send(self, field: str, t_index: int, array: np.ndarray) -> None:
        """Stream ``field`` at recorded time index ``t_index`` (an array shaped like ``grid``, sent as float32).

        Opens the simulation's stream at the first call; blocks while the server grants no credit.
        """
        self._check_open()
        a = np.ascontiguousarray(array, dtype="<f4")
        st = self._stream
        if st is None:
            st = self._stream = _Stream(self)
        data = a.tobytes()
        self.credit_wait_s += st.wait_credit(len(data))
        st.put(
            pb.IngestRequest(
                chunk=pb.Chunk(time_index=t_index, field=field, dtype="float32", shape=list(a.shape), data=data)
            )
        )
        self.bytes_sent += len(data)

    def finish(self) -> int:
        """End the simulation; returns the samples the study's buffer accepted (raises ``IngestError`` if refused)."""
        self._check_open()
        self._ended = True
        st = self._stream or _Stream(self)
        st.put(pb.IngestRequest(end=pb.End()))
        return st.close()

    def fail(self, reason: str) -> bool:
        """Give the simulation up; returns whether the study hands it out again."""
        if self._ended:
            return False
        self._ended = True
        assert self._client is not None
        try:
            again = self._client.report_failure(self.study_id, self.id, reason)
        finally:
            if self._stream is not None:
                self._stream.cancel()
        return again

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._ended:
            return
        if exc is not None:
            try:
                self.fail(f"{type(exc).__name__}: {exc}")
            except IngestError:
                pass
        else:
            self.finish()

    def _check_open(self) -> None:
        if self._ended:
            raise RuntimeError(f"simulation {self.id} has been finished or failed already")


class _Stream:
    """One Ingest.Stream call: requests from a queue, acks (credit) read by a thread."""

    def __init__(self, sim: Simulation) -> None:
        assert sim._client is not None
        self._queue: queue.SimpleQueue[pb.IngestRequest | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._credit = 0
        self._accepted = 0
        self._done = False
        self._error: IngestError | None = None
        header = pb.Header(study_id=sim.study_id, simulation_id=sim.id, params=sim.params)
        self._queue.put(pb.IngestRequest(header=header))
        self._call = sim._client._ingest.Stream(self._requests(), metadata=sim._client._metadata)
        self._reader = threading.Thread(target=self._read, name=f"surge-ingest-{sim.id}", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.IngestRequest]:
        while (req := self._queue.get()) is not None:
            yield req

    def _read(self) -> None:
        try:
            for ack in self._call:
                with self._cond:
                    self._credit += ack.credit_bytes
                    self._accepted += ack.accepted_samples
                    self._cond.notify_all()
        except grpc.RpcError as e:
            with self._cond:
                self._error = IngestError.of(e)
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def wait_credit(self, n: int) -> float:
        """Take ``n`` bytes of credit, waiting for the server to grant them; returns the seconds waited."""
        t0 = time.perf_counter()
        with self._cond:
            while self._credit < n and not self._done:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if self._done:
                raise IngestError(grpc.StatusCode.ABORTED, "the server ended the stream")
            self._credit -= n
        return time.perf_counter() - t0

    def put(self, req: pb.IngestRequest) -> None:
        self._queue.put(req)

    def close(self) -> int:
        self._queue.put(None)
        self._reader.join()
        if self._error is not None:
            raise self._error
        return self._accepted

    def cancel(self) -> None:
        self._call.cancel()
        self._queue.put(None)
        self._reader.join(10)
