"""Prediction requests, parsed and checked once for every transport (REST and gRPC).

Every check raises ``PredictError(status, message)`` with an HTTP status: REST answers it as it
is; gRPC maps it to a status code (``GRPC_CODES``). Both transports therefore reject the same
inputs with the same words, and run the same model on the same rows.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ValidationError

from services.gateway.hub import run_model_std
from services.gateway.schemas import OperatorPredictRequest, PredictRequest
from services.queries import QueryBook
from trainer.problem import ProblemSpec
from trainer.store import LoadedModel

NPY = "application/x-npy"
MODEL_NOT_FOUND = "model {name!r} not found"
VERSION_NOT_FOUND = "model {name!r} has no servable version {version}"
UNSUPPORTED_TYPE = "unsupported content type {ctype!r}: send application/json or application/x-npy"
NON_FINITE_OUTPUT = "the model produced non-finite values"

# HTTP status -> gRPC status code name (grpc.StatusCode member).
GRPC_CODES = {
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    500: "INTERNAL",
}


class PredictError(Exception):
    """A request that cannot be answered: ``status`` (HTTP) and a message saying what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Models(Protocol):
    def get(self, name: str) -> LoadedModel | None: ...

    def get_version(self, name: str, version: int) -> LoadedModel | None: ...


@dataclass(frozen=True)
class PredictInput:
    """Checked model inputs. Parametric: ``rows [N, P+1]`` (parameters in card order, then t), no fields.
    Operator: ``fields [N, C_in, *grid]`` and ``rows [N, P]`` (the scalar parameters, possibly none)."""

    rows: np.ndarray
    fields: np.ndarray | None = None


def _bad(msg: str) -> PredictError:
    return PredictError(422, msg)


def find_model(models: Models, name: str, version: int | None = None) -> LoadedModel:
    """The newest served version of ``name``, or the one asked for; the caller keeps it for the whole request."""
    m = models.get(name)
    if m is None:
        raise PredictError(404, MODEL_NOT_FOUND.format(name=name))
    if version is not None and version != m.version:
        pinned = models.get_version(name, version)
        if pinned is None:
            raise PredictError(404, VERSION_NOT_FOUND.format(name=name, version=version))
        return pinned
    return m


def spec_of(m: LoadedModel) -> ProblemSpec:
    return m.spec


# Parsing ------------------------------------------------------------------------------------------


def parse_body(body: bytes, ctype: str, spec: ProblemSpec, max_rows: int) -> PredictInput:
    """A REST body: JSON (``ctype`` ``application/json`` or empty) or ``.npy``; checked."""
    if ctype not in ("application/json", "", NPY):
        raise PredictError(415, UNSUPPORTED_TYPE.format(ctype=ctype))
    if ctype == NPY:
        if spec.field_input:
            fields, rows = _fields_from_npy(body, spec, max_rows)
            return check(PredictInput(rows, fields), spec)
        return check(PredictInput(_rows_from_npy(body, spec, max_rows)), spec)
    return parse_data(_json(body), spec, max_rows)


def parse_data(data: Any, spec: ProblemSpec, max_rows: int) -> PredictInput:
    """A request as JSON would hold it (``{"params", "times"}`` or ``{"inputs", "params"}``; input fields
    may be nested lists or numpy arrays); checked."""
    if spec.field_input:
        fields, rows = _fields_from_data(data, spec, max_rows)
        return check(PredictInput(rows, fields), spec)
    return check(PredictInput(_rows_from_data(data, spec, max_rows)), spec)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise _bad(f"body is not valid JSON: {e}") from None


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        raise _bad(f"{loc}: {err['msg']}") from None


def _param_vector(given: dict[str, float], spec: ProblemSpec) -> np.ndarray:
    names = spec.params.names
    missing = [n for n in names if n not in given]
    unknown = sorted(set(given) - set(names))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing parameter(s): {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown parameter(s): {', '.join(unknown)}")
        raise _bad("; ".join(parts) + f" (expected: {', '.join(names) or 'none'})")
    return np.array([given[n] for n in names], dtype=np.float64)


def _rows_from_data(data: Any, spec: ProblemSpec, max_rows: int) -> np.ndarray:
    """``{"params": {...}, "times": [...]}`` -> rows ``[N, P+1]`` (params in card order, then t)."""
    req = _validated(PredictRequest, data)
    p = _param_vector(req.params, spec)
    if len(req.times) > max_rows:
        raise _bad(f"times: at most {max_rows} times per request, got {len(req.times)}")
    t = np.asarray(req.times, dtype=np.float64)
    return np.concatenate([np.tile(p, (len(t), 1)), t[:, None]], axis=1)


def _load_npy(body: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a malformed header
        raise _bad(f"body is not a valid .npy array: {e}") from None
    if not isinstance(arr, np.ndarray):  # np.load opens .npz archives too (an NpzFile): refused, not a 500
        raise _bad("body is not a valid .npy array: got an .npz archive (send one array, np.save, not np.savez)")
    if arr.dtype.kind not in "fiu":
        raise _bad(f"array dtype must be float or integer, got {arr.dtype}")
    return arr


def _rows_from_npy(body: bytes, spec: ProblemSpec, max_rows: int) -> np.ndarray:
    """An ``.npy`` array ``[N, P+1]`` (params in card order, then t) -> rows."""
    arr = _load_npy(body)
    width = spec.params.dim + 1
    if arr.ndim != 2 or arr.shape[1] != width or arr.shape[0] < 1:
        cols = ", ".join((*spec.params.names, "t"))
        raise _bad(f"array shape must be [N, {width}] with columns ({cols}), got {list(arr.shape)}")
    if arr.shape[0] > max_rows:
        raise _bad(f"at most {max_rows} rows per request, got {arr.shape[0]}")
    return arr.astype(np.float64)


def _fields_from_data(data: Any, spec: ProblemSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``{"inputs": {field: [*grid] or [N, *grid]}, "params": {...}}``.

    Returns ``(fields [N, C_in, *grid], params [N, P])``.
    """
    req = _validated(OperatorPredictRequest, data)
    missing = [n for n in spec.inputs if n not in req.inputs]
    unknown = sorted(set(req.inputs) - set(spec.inputs))
    if missing or unknown:
        what = f"missing input field(s): {', '.join(missing)}" if missing else f"unknown input field(s): {unknown}"
        raise _bad(f"inputs: {what} (expected: {', '.join(spec.inputs)})")
    arrays = []
    for name in spec.inputs:
        try:
            a = np.asarray(req.inputs[name], dtype=np.float64)
        except (ValueError, TypeError):
            raise _bad(f"inputs.{name}: must be a (nested) list of numbers of shape {list(spec.grid)}") from None
        if a.shape == spec.grid:
            a = a[None]
        if a.shape[1:] != spec.grid or a.shape[0] < 1:
            raise _bad(
                f"inputs.{name}: shape must be {list(spec.grid)} or [N, {', '.join(map(str, spec.grid))}]"
                f", got {list(a.shape)}"
            )
        arrays.append(a)
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise _bad("inputs: all input fields must hold the same number of samples")
    if n > max_rows:
        raise _bad(f"inputs: at most {max_rows} samples per request, got {n}")
    p = _param_vector(req.params, spec)
    return np.stack(arrays, axis=1), np.tile(p, (n, 1))


def _fields_from_npy(body: bytes, spec: ProblemSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """An ``.npy`` array ``[N, C_in, *grid]`` of input fields (models without scalar parameters)."""
    if spec.params.dim:
        raise _bad("this model also takes scalar parameters: send JSON with inputs and params")
    arr = _load_npy(body)
    want = (len(spec.inputs), *spec.grid)
    if arr.ndim != len(want) + 1 or arr.shape[1:] != want or arr.shape[0] < 1:
        raise _bad(
            f"array shape must be [N, {', '.join(map(str, want))}] (fields {', '.join(spec.inputs)}), "
            f"got {list(arr.shape)}"
        )
    if arr.shape[0] > max_rows:
        raise _bad(f"at most {max_rows} samples per request, got {arr.shape[0]}")
    return arr.astype(np.float64), np.zeros((arr.shape[0], 0))


# Checks -------------------------------------------------------------------------------------------


def check(inp: PredictInput, spec: ProblemSpec) -> PredictInput:
    """Finite values, and parameters and times inside the model's box."""
    if inp.fields is not None:
        bad = ~np.isfinite(inp.fields)
        if bad.any():
            raise _bad(f"inputs.{spec.inputs[int(np.argwhere(bad)[0][1])]} must hold finite numbers (no NaN or inf)")
    rows, with_time = inp.rows, inp.fields is None
    names = (*spec.params.names, "t") if with_time else spec.params.names
    bad = ~np.isfinite(rows)
    if bad.any():
        raise _bad(f"{names[int(np.argwhere(bad)[0][1])]} must be a finite number (no NaN or inf)")
    lo = np.array([*spec.params.low, spec.times[0]][: len(names)])
    hi = np.array([*spec.params.high, spec.t_final][: len(names)])
    out = (rows < lo) | (rows > hi)
    if out.any():
        i, j = np.argwhere(out)[0]
        raise _bad(f"{names[j]} = {rows[i, j]:g} is outside [{lo[j]:g}, {hi[j]:g}]")
    return inp


def check_answer_size(m: LoadedModel, inp: PredictInput, max_values: int) -> None:
    """413 when the answer would hold more than ``max_values`` output values, saying how to split the request."""
    rows, per_row = int(inp.rows.shape[0]), m.values_per_row
    if rows * per_row <= max_values:
        return
    if per_row > max_values:
        raise PredictError(
            413,
            f"one row of {m.name!r} predicts {per_row} values, above the gateway's limit of {max_values} "
            "output values per request (SURGE_MAX_PREDICT_VALUES)",
        )
    raise PredictError(
        413,
        f"the answer would hold {rows * per_row} output values ({rows} rows x {per_row} per row), above the "
        f"limit of {max_values}: split the request into requests of at most {max_values // per_row} rows",
    )


def record_query(queries: QueryBook, m: LoadedModel, inp: PredictInput) -> None:
    """Keep the parameter sets of an answered request (each once, whatever its times) for sampler.kind: queries."""
    space = m.spec.params
    if not space.dim:
        return
    params = np.unique(inp.rows[:, : space.dim], axis=0)  # parametric rows end with t; operator rows do not
    queries.record(m.name, params, space.names)


def predict(m: LoadedModel, inp: PredictInput) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's prediction ``[N, C_out, *grid]`` float32 and, for an ensemble, its standard deviation
    (same shape; ``None`` otherwise). Either may hold non-finite values: callers decide."""
    return run_model_std(m, inp.rows, inp.fields)


__all__ = [
    "GRPC_CODES",
    "MODEL_NOT_FOUND",
    "NON_FINITE_OUTPUT",
    "NPY",
    "UNSUPPORTED_TYPE",
    "PredictError",
    "PredictInput",
    "check",
    "check_answer_size",
    "find_model",
    "parse_body",
    "parse_data",
    "predict",
    "record_query",
    "spec_of",
]
