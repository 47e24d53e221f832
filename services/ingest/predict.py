"""``surge.v1.Predict``: the gateway's models over gRPC, with the REST checks and error texts.

The request is turned into what a REST JSON body would hold and goes through the same parsing
and checks (``services.gateway.predict``); HTTP statuses map to gRPC codes (404 -> NOT_FOUND,
422/415 -> INVALID_ARGUMENT, 413 -> RESOURCE_EXHAUSTED, by gRPC's own message-size limit).
Requests are counted in ``surge_predict_requests_total`` with the HTTP-equivalent code.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import numpy as np

from services import metrics as M
from services.gateway import predict as P
from services.ingest import surge_pb2 as pb
from services.ingest import surge_pb2_grpc as rpc
from trainer.problem import ProblemSpec

NO_MODELS = "this server serves no models (start it with `surge run` or `surge serve` and --grpc-port)"
_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


def decode_array(name: str, a: pb.Array) -> np.ndarray:
    """An ``Array`` message -> numpy, or ``PredictError(422)`` naming the input."""
    dtype = _DTYPES.get(a.dtype)
    if dtype is None:
        raise P.PredictError(422, f"inputs.{name}: dtype {a.dtype!r} is not supported; send float32 or float64")
    shape = tuple(int(s) for s in a.shape)
    if any(s < 0 for s in shape):
        raise P.PredictError(422, f"inputs.{name}: shape {list(shape)} has a negative size")
    want = int(np.prod(shape)) * dtype.itemsize
    if len(a.data) != want:
        raise P.PredictError(
            422, f"inputs.{name}: data holds {len(a.data)} bytes; shape {list(shape)} of {a.dtype} takes {want}"
        )
    return np.frombuffer(a.data, dtype=dtype).reshape(shape)


def request_data(request: pb.PredictRequest, spec: ProblemSpec) -> dict[str, Any]:
    """The JSON body REST would get for this request (fields a transport cannot leave empty are left out
    when empty, so that an input the model does not take is refused with REST's words)."""
    data: dict[str, Any] = {"params": dict(request.params)}
    if spec.field_input:
        data["inputs"] = {name: decode_array(name, a) for name, a in request.inputs.items()}
        if request.times:
            data["times"] = list(request.times)
    else:
        data["times"] = list(request.times)
        if request.inputs:
            data["inputs"] = {name: "…" for name in request.inputs}
    return data


class PredictService(rpc.PredictServicer):
    """Answers from the models lent by the gateway (``lend``); UNAVAILABLE until then."""

    def __init__(self) -> None:
        self._models: Any = None
        self._max_rows = 4096
        self._max_values = 2**22
        self._queries: Any = None  # a QueryBook: the parameter points asked, for sampler.kind: queries
        self._lock = threading.Lock()

    def lend(self, models: Any, max_rows: int, max_values: int = 2**22, queries: Any = None) -> None:
        with self._lock:
            self._models, self._max_rows, self._max_values = models, max_rows, max_values
            self._queries = queries

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        models, max_rows = self._models, self._max_rows
        if models is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, NO_MODELS)
        t0 = time.perf_counter()
        label, code = "_unknown", 500
        try:
            m = P.find_model(models, request.model)  # one version for the whole request
            label = request.model
            spec = P.spec_of(m)
            inp = P.parse_data(request_data(request, spec), spec, max_rows)
            P.check_answer_size(m, inp, self._max_values)
            y, std = P.predict(m, inp)  # (N, C_out, *grid) each
            if self._queries is not None:
                P.record_query(self._queries, m, inp)
            if not np.all(np.isfinite(y)) or (std is not None and not np.all(np.isfinite(std))):
                raise P.PredictError(500, P.NON_FINITE_OUTPUT)
            code = 200
            return pb.PredictResponse(
                model=request.model,
                version=m.version,
                shape=list(y.shape),
                data=np.ascontiguousarray(y, dtype="<f4").tobytes(),
                std=b"" if std is None else np.ascontiguousarray(std, dtype="<f4").tobytes(),
                ensemble=m.members,
            )
        except P.PredictError as e:
            code = e.status
            context.abort(getattr(grpc.StatusCode, P.GRPC_CODES.get(e.status, "INTERNAL")), e.message)
            raise  # unreachable: abort raises
        finally:
            M.PREDICT_REQUESTS.labels(label, str(code)).inc()
            M.PREDICT_LATENCY.labels(label).observe(time.perf_counter() - t0)
