"""``/v1/models``: the model cards and predictions."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from services import metrics as M
from services.gateway.deps import HubDep, SettingsDep, read_body
from services.gateway.hub import run_model
from services.gateway.schemas import (
    ErrorPublic,
    ModelCardPublic,
    ModelList,
    ModelSummary,
    OperatorPredictRequest,
    ParamPublic,
    PredictRequest,
    PredictResponse,
)
from trainer.problem import ProblemSpec
from trainer.store import LoadedModel

router = APIRouter(prefix="/v1/models", tags=["models"])

NPY = "application/x-npy"
MODEL_NOT_FOUND = "model {name!r} not found"
UNSUPPORTED_TYPE = "unsupported content type {ctype!r}: send application/json or application/x-npy"
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic},
    413: {"model": ErrorPublic},
    415: {"model": ErrorPublic},
    422: {"model": ErrorPublic},
}


def _bad(msg: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, msg)


def _loaded(hub: HubDep, name: str) -> LoadedModel:
    m = hub.get(name)
    if m is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, MODEL_NOT_FOUND.format(name=name))
    return m


def _card(m: LoadedModel) -> ModelCardPublic:
    c = m.card
    spec = ProblemSpec.from_dict(c["problem"])
    return ModelCardPublic(
        name=m.name,
        version=m.version,
        problem=c["problem"],
        parameters=[
            ParamPublic(name=n, low=lo, high=hi)
            for n, lo, hi in zip(spec.params.names, spec.params.low, spec.params.high, strict=True)
        ],
        time_range=(spec.times[0], spec.t_final),
        architecture=c["model"],
        input_shape=c["input_shape"],
        output_shape=c["output_shape"],
        fields=list(spec.fields),
        samples_seen=c.get("samples_seen", 0),
        train_steps=c.get("train_steps", 0),
        validation_error=c.get("validation_error"),
        created_at=c.get("created_at", 0.0),
        study_id=c.get("study_id"),
    )


@router.get("", response_model=ModelList)
def list_models(hub: HubDep) -> ModelList:
    out = []
    for name in hub.names():
        m = hub.get(name)
        if m is not None:
            out.append(
                ModelSummary(
                    name=name,
                    version=m.version,
                    problem=m.card["problem"]["solver"],
                    architecture=m.card["model"]["name"],
                    validation_error=m.card.get("validation_error"),
                    samples_seen=m.card.get("samples_seen", 0),
                )
            )
    return ModelList(models=out)


@router.get("/{name}", response_model=ModelCardPublic, responses=_ERRORS)
def get_model(name: str, hub: HubDep) -> ModelCardPublic:
    return _card(_loaded(hub, name))


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


def _rows_from_json(body: bytes, spec: ProblemSpec, max_rows: int) -> np.ndarray:
    """JSON ``{"params": {...}, "times": [...]}`` -> rows ``[N, P+1]`` (params in card order, then t)."""
    req = _validated(PredictRequest, _json(body))
    p = _param_vector(req.params, spec)
    if len(req.times) > max_rows:
        raise _bad(f"times: at most {max_rows} times per request, got {len(req.times)}")
    t = np.asarray(req.times, dtype=np.float64)
    return np.concatenate([np.tile(p, (len(t), 1)), t[:, None]], axis=1)


def _rows_from_npy(body: bytes, spec: ProblemSpec, max_rows: int) -> np.ndarray:
    """An ``.npy`` array ``[N, P+1]`` (params in card order, then t) -> rows."""
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a malformed header
        raise _bad(f"body is not a valid .npy array: {e}") from None
    width = spec.params.dim + 1
    if arr.dtype.kind not in "fiu":
        raise _bad(f"array dtype must be float or integer, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != width or arr.shape[0] < 1:
        cols = ", ".join((*spec.params.names, "t"))
        raise _bad(f"array shape must be [N, {width}] with columns ({cols}), got {list(arr.shape)}")
    if arr.shape[0] > max_rows:
        raise _bad(f"at most {max_rows} rows per request, got {arr.shape[0]}")
    return arr.astype(np.float64)


def _fields_from_json(body: bytes, spec: ProblemSpec, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """JSON ``{"inputs": {field: [*grid] or [N, *grid]}, "params": {...}}``.

    Returns ``(fields [N, C_in, *grid], params [N, P])``.
    """
    req = _validated(OperatorPredictRequest, _json(body))
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
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a malformed header
        raise _bad(f"body is not a valid .npy array: {e}") from None
    if arr.dtype.kind not in "fiu":
        raise _bad(f"array dtype must be float or integer, got {arr.dtype}")
    want = (len(spec.inputs), *spec.grid)
    if arr.ndim != len(want) + 1 or arr.shape[1:] != want or arr.shape[0] < 1:
        raise _bad(
            f"array shape must be [N, {', '.join(map(str, want))}] (fields {', '.join(spec.inputs)}), "
            f"got {list(arr.shape)}"
        )
    if arr.shape[0] > max_rows:
        raise _bad(f"at most {max_rows} samples per request, got {arr.shape[0]}")
    return arr.astype(np.float64), np.zeros((arr.shape[0], 0))


def _check_fields(fields: np.ndarray, spec: ProblemSpec) -> None:
    bad = ~np.isfinite(fields)
    if bad.any():
        raise _bad(f"inputs.{spec.inputs[int(np.argwhere(bad)[0][1])]} must hold finite numbers (no NaN or inf)")


def _check_rows(rows: np.ndarray, spec: ProblemSpec, with_time: bool = True) -> None:
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


@router.post(
    "/{name}/predict",
    response_model=PredictResponse,
    responses={**_ERRORS, 200: {"content": {NPY: {}}}},
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": PredictRequest.model_json_schema()},
                NPY: {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def predict(name: str, request: Request, hub: HubDep, settings: SettingsDep) -> Response:
    """Predict fields for a parameter set at given times; JSON or ``application/x-npy`` in and out."""
    t0 = time.perf_counter()
    label = "_unknown"
    code = 500
    try:
        m = _loaded(hub, name)  # one version for the whole request, whatever gets swapped in meanwhile
        label = name
        body = await read_body(request, settings.max_body_bytes)
        spec = ProblemSpec.from_dict(m.card["problem"])
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "", NPY):
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED_TYPE.format(ctype=ctype))
        limit = settings.max_predict_rows
        fields = None
        if spec.field_input:
            parse = _fields_from_npy if ctype == NPY else _fields_from_json
            fields, rows = parse(body, spec, limit)
            _check_fields(fields, spec)
            _check_rows(rows, spec, with_time=False)
        else:
            rows = (_rows_from_npy if ctype == NPY else _rows_from_json)(body, spec, limit)
            _check_rows(rows, spec)
        y = await run_in_threadpool(run_model, m, rows, fields)
        headers = {"X-Model-Version": str(m.version), "X-Model-Name": name}
        code = 200
        if NPY in request.headers.get("accept", ""):
            buf = io.BytesIO()
            np.save(buf, y, allow_pickle=False)
            return Response(buf.getvalue(), media_type=NPY, headers=headers)
        if not np.all(np.isfinite(y)):
            code = 500
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "the model produced non-finite values")
        payload = PredictResponse(model=name, version=m.version, shape=list(y.shape), outputs=y.tolist())
        return Response(payload.model_dump_json(), media_type="application/json", headers=headers)
    except HTTPException as e:
        code = e.status_code
        raise
    finally:
        M.PREDICT_REQUESTS.labels(label, str(code)).inc()
        M.PREDICT_LATENCY.labels(label).observe(time.perf_counter() - t0)


__all__ = ["NPY", "router"]
