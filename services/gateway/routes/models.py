"""``/v1/models``: the model cards and predictions."""

from __future__ import annotations

import io
import time
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from services import metrics as M
from services.fallback import FallbackError
from services.gateway import fallback as FB
from services.gateway import predict as P
from services.gateway.deps import HubDep, PoolDep, PredictTokenDep, SettingsDep, TokenDep, read_body
from services.gateway.pool import RETRY_AFTER_S, Overloaded
from services.gateway.schemas import (
    ADMIN_ERRORS,
    WWW_AUTHENTICATE,
    ModelCardPublic,
    ModelList,
    ModelSummary,
    OperatorPredictRequest,
    ParamPublic,
    PredictRequest,
    PredictResponse,
    PromoteRequest,
    PromoteResponse,
    VersionList,
    VersionPublic,
    error,
    inline_schema,
)
from services.gateway.settings import GatewaySettings
from services.queries import QueryBook
from trainer.store import LoadedModel, StoreError

router = APIRouter(prefix="/v1/models", tags=["models"])
FALLBACK_RETRY_S = 5  # a fallback refused for want of a free solver slot: retry after this

# The error texts live with the checks shared by REST and gRPC; the tests import them from here too.
NPY, MODEL_NOT_FOUND, UNSUPPORTED_TYPE = P.NPY, P.MODEL_NOT_FOUND, P.UNSUPPORTED_TYPE
JSON_ONLY = "unsupported content type {ctype!r}: send application/json"
_NOT_FOUND = {404: error("no model of that name is served")}
_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the predicted fields: JSON, or a float32 ``.npy`` array [N, C_out, *grid] when the "
        "request's Accept names application/x-npy; an ensemble's answer adds std to the JSON, and its .npy is "
        "[2, N, C_out, *grid] (mean, then std) with the header X-Model-Ensemble",
        "content": {NPY: {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            "X-Model-Name": {"description": "the model that answered", "required": True, "schema": {"type": "string"}},
            "X-Model-Version": {
                "description": "the version that answered",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            },
            "X-Prediction-Source": {
                "description": "with fallback=solve: surrogate or solver",
                "schema": {"type": "string", "enum": ["surrogate", "solver"]},
            },
            "X-Simulation-Id": {
                "description": "the solver answered: the study's id of the simulation it ran",
                "schema": {"type": "integer", "minimum": 0},
            },
            "X-Model-Ensemble": {
                "description": "an ensemble's members: the answer holds the mean and the standard deviation",
                "schema": {"type": "integer", "minimum": 2},
            },
        },
    },
    401: error("the gateway has a predict token (SURGE_PREDICT_TOKEN) and the request lacks it", WWW_AUTHENTICATE),
    404: error("no model of that name is served, or it has no servable version of that number"),
    413: error(
        "the body is above SURGE_MAX_BODY_BYTES, or the answer would hold more than SURGE_MAX_PREDICT_VALUES "
        "output values (the detail says how to split the request)"
    ),
    415: error("the body is neither application/json nor application/x-npy"),
    422: error(
        "the body or ?version is malformed, names other parameters or inputs than the model's card, holds a value "
        "outside the model's box, or more rows than SURGE_MAX_PREDICT_ROWS; fallback=solve without max_std (or "
        "the reverse), for a single model or an operator, or with rows of several parameter points"
    ),
    500: error("the model produced non-finite values"),
    502: error("fallback=solve: the solver failed for this point (it raised, died, or gave non-finite values)"),
    504: error("fallback=solve: the solver did not answer within SURGE_FALLBACK_TIMEOUT_S"),
    503: error(
        "too many predictions (or fallback solves) at once, or fallback=solve with no running study of the model "
        "that can solve the point: retry after Retry-After seconds",
        {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    ),
}
# The route reads the raw body (JSON or .npy), so FastAPI cannot derive it: stated here. Which JSON form
# applies is the model's (its card: parametric models take params and times, operators take inputs).
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"anyOf": [inline_schema(PredictRequest), inline_schema(OperatorPredictRequest)]}
            },
            NPY: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "a float or integer array [N, P+1] (the parameters in card order, then t), or "
                    "[N, C_in, *grid] input fields for an operator without scalar parameters",
                }
            },
        },
    }
}


def _loaded(hub: HubDep, name: str, version: int | None = None) -> LoadedModel:
    try:
        return P.find_model(hub, name, version)
    except P.PredictError as e:
        raise HTTPException(e.status, e.message) from None


def _card(m: LoadedModel) -> ModelCardPublic:
    c, spec, t = m.card, m.card.problem, m.card.training
    return ModelCardPublic(
        name=m.name,
        version=m.version,
        problem=c.problem_dict,
        parameters=[
            ParamPublic(name=n, low=lo, high=hi)
            for n, lo, hi in zip(spec.params.names, spec.params.low, spec.params.high, strict=True)
        ],
        time_range=(spec.times[0], spec.t_final),
        architecture=c.architecture.to_dict(),
        input_shape=list(c.input_shape),
        output_shape=list(c.output_shape),
        fields=list(spec.fields),
        samples_seen=t.samples_seen,
        train_steps=t.train_steps,
        validation_error=t.validation_error,
        created_at=c.created_at,
        study_id=t.study_id,
        ensemble=c.ensemble.to_dict() if c.ensemble is not None else None,
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
                    problem=m.spec.solver,
                    architecture=m.card.architecture.name,
                    validation_error=m.card.training.validation_error,
                    samples_seen=m.card.training.samples_seen,
                )
            )
    return ModelList(models=out)


@router.get("/{name}", response_model=ModelCardPublic, responses=_NOT_FOUND)
def get_model(name: str, hub: HubDep) -> ModelCardPublic:
    return _card(_loaded(hub, name))


@router.get(
    "/{name}/versions", response_model=VersionList, responses={404: error("no version of that name is published")}
)
def list_versions(name: str, hub: HubDep) -> VersionList:
    """Every published version of ``name``, with the study that made it and its validation error."""
    store = hub.store
    versions = store.versions(name)
    if not versions:
        raise HTTPException(status.HTTP_404_NOT_FOUND, MODEL_NOT_FOUND.format(name=name))
    served = store.serving(name)
    out = []
    for v in versions:
        try:
            c = store.card(name, v)
        except StoreError:
            continue  # removed by a prune meanwhile, or unreadable: not a version one can ask for
        out.append(
            VersionPublic(
                version=v,
                study_id=c.training.study_id,
                validation_error=c.training.validation_error,
                validation_set=c.training.validation_set,
                train_steps=c.training.train_steps,
                samples_seen=c.training.samples_seen,
                created_at=c.created_at,
                served=v == served,
            )
        )
    return VersionList(name=name, served=served, versions=out)


@router.post(
    "/{name}/promote",
    response_model=PromoteResponse,
    responses={
        **ADMIN_ERRORS,
        404: error("no such model, or no published version of that number"),
        413: error("the body is above SURGE_MAX_BODY_BYTES"),
        415: error("the body is not application/json"),
        422: error("the body is not a JSON object holding only a version >= 1"),
    },
    # The route reads the raw body itself (see promote), so FastAPI cannot derive it: stated here.
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(PromoteRequest)}}}
    },
)
async def promote(name: str, request: Request, hub: HubDep, settings: SettingsDep, _: TokenDep) -> PromoteResponse:
    """Serve ``version`` from now on, whatever its validation error (the admin token is needed)."""
    # Read here, not as a FastAPI body parameter: FastAPI parses the body before any dependency runs
    # (malformed JSON was answered before the token was checked), sets no size limit on it, and answers
    # a body that is not UTF-8 with a 400 of its own.
    body = _promote_request(await read_body(request, settings.max_body_bytes), _ctype(request))
    return await run_in_threadpool(_promote, hub, name, body.version)  # the store is files: not on the event loop


def _ctype(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _promote_request(body: bytes, ctype: str) -> PromoteRequest:
    if ctype not in ("application/json", ""):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, JSON_ONLY.format(ctype=ctype))
    try:
        return PromoteRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]  # the same words as FastAPI's validation of a body parameter (app._validation)
        loc = ".".join(str(p) for p in ("body", *err["loc"]))
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{loc}: {err['msg']}") from None


def _promote(hub: HubDep, name: str, version: int) -> PromoteResponse:
    if version not in hub.store.versions(name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, P.VERSION_NOT_FOUND.format(name=name, version=version))
    try:
        before = hub.store.promote(name, version)
    except StoreError as e:  # pruned between the check and the promotion
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
    hub.refresh(name)  # served by this replica at once; others when they next poll the store
    return PromoteResponse(name=name, served=version, previous=before)


@router.post(
    "/{name}/predict",
    response_model=PredictResponse,
    responses=_PREDICT_RESPONSES,
    openapi_extra=_PREDICT_BODY,
)
async def predict(
    name: str,
    request: Request,
    hub: HubDep,
    settings: SettingsDep,
    pool: PoolDep,
    _: PredictTokenDep,
    version: Annotated[int | None, Query(ge=1, description="a published version (default: the newest)")] = None,
    fallback: Annotated[
        Literal["solve"] | None,
        Query(description="solve: where the ensemble's std exceeds max_std, the study's solver answers"),
    ] = None,
    max_std: Annotated[
        float | None,
        Query(gt=0, allow_inf_nan=False, description="with fallback=solve: the largest std the ensemble may answer"),
    ] = None,
) -> Response:
    """Predict fields for a parameter set at given times; JSON or ``application/x-npy`` in and out.

    ``?version=N`` pins a published version, so that results stay reproducible while training goes on.
    An ensemble's answer carries its standard deviation; with ``?fallback=solve&max_std=X`` a point where
    it exceeds ``X`` is solved by the study's solver instead (``"source": "solver"``), and that simulation
    joins the training stream. An answer holds at most ``SURGE_MAX_PREDICT_VALUES`` output values (413
    says how to split the request); a gateway at its limit of concurrent predictions answers 503 with
    ``Retry-After``."""
    t0 = time.perf_counter()
    code = 500
    label = ["_unknown"]  # set in the worker once the model is found
    try:
        threshold = FB.check_query(fallback, max_std)
        async with pool.admit():
            body = await read_body(request, settings.max_body_bytes)
            ctype = _ctype(request)
            npy_out = NPY in request.headers.get("accept", "")
            got = await pool.run(
                _answer, hub, name, version, body, ctype, npy_out, settings, label, threshold, request.app.state.queries
            )
            if isinstance(got, FB.Unsure):
                gate: FB.FallbackGate = request.app.state.fallbacks
                sim_id, fields = await gate.solve(request.app.state.manager, got, settings)
                got = await pool.run(_solver_answer, got, fields, sim_id, npy_out)
        content, media, headers = got
        code = 200
        return Response(content, media_type=media, headers=headers)
    except Overloaded as e:
        code = status.HTTP_503_SERVICE_UNAVAILABLE
        raise HTTPException(code, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except FallbackError as e:
        code = e.status
        retry = {"Retry-After": str(FALLBACK_RETRY_S)} if e.status == 503 else None
        raise HTTPException(e.status, e.message, headers=retry) from None
    except P.PredictError as e:
        code = e.status
        raise HTTPException(e.status, e.message) from None
    except HTTPException as e:
        code = e.status_code
        raise
    finally:
        M.PREDICT_REQUESTS.labels(label[0], str(code)).inc()
        M.PREDICT_LATENCY.labels(label[0]).observe(time.perf_counter() - t0)


def _answer(
    hub: HubDep,
    name: str,
    version: int | None,
    body: bytes,
    ctype: str,
    npy_out: bool,
    settings: GatewaySettings,
    label: list[str],
    max_std: float | None = None,
    queries: QueryBook | None = None,
) -> tuple[bytes, str, dict[str, str]] | FB.Unsure:
    """One prediction, in a worker thread: model, parsing, the forward pass and the serialised answer (or,
    with ``max_std``, what the solver must answer instead when the ensemble is less sure than that)."""
    m = P.find_model(hub, name, version)  # one version for the whole request, whatever gets swapped in meanwhile
    label[0] = name
    inp = P.parse_body(body, ctype, m.spec, settings.max_predict_rows)
    P.check_answer_size(m, inp, settings.max_predict_values)
    y, std = P.predict(m, inp)
    if queries is not None:
        P.record_query(queries, m, inp)
    if max_std is not None and FB.unsure(m, inp, std, max_std):
        return FB.Unsure(m, inp, max_std)
    return _serialise(m, y, std, npy_out, "surrogate" if max_std is not None else None)


def _solver_answer(u: FB.Unsure, fields: np.ndarray, sim_id: int, npy_out: bool) -> tuple[bytes, str, dict[str, str]]:
    """The solver's fields as the answer, with a zero std (the solver is the reference the std estimates)."""
    std = np.zeros_like(fields)
    content, media, headers = _serialise(u.model, fields, std, npy_out, "solver", sim_id)
    return content, media, headers


def _serialise(
    m: LoadedModel,
    y: np.ndarray,
    std: np.ndarray | None,
    npy_out: bool,
    source: str | None = None,
    simulation: int | None = None,
) -> tuple[bytes, str, dict[str, str]]:
    name = m.name
    headers = {"X-Model-Version": str(m.version), "X-Model-Name": name}
    if std is not None:
        headers["X-Model-Ensemble"] = str(m.members)
    if source is not None:
        headers["X-Prediction-Source"] = source
    if simulation is not None:
        headers["X-Simulation-Id"] = str(simulation)
    if npy_out:
        buf = io.BytesIO()
        # An ensemble answers [2, N, C, *grid]: the mean, then the standard deviation.
        np.save(buf, y if std is None else np.stack([y, std]), allow_pickle=False)
        return buf.getvalue(), NPY, headers
    if not np.all(np.isfinite(y)) or (std is not None and not np.all(np.isfinite(std))):
        raise P.PredictError(500, P.NON_FINITE_OUTPUT)
    # orjson writes the float32 array straight from its buffer (no Python list of floats, which
    # took about 100 bytes and a Python object per value).
    payload: dict[str, Any] = {
        "model": name,
        "version": m.version,
        "shape": list(y.shape),
        "outputs": np.ascontiguousarray(y),
    }
    if std is not None:
        payload.update(std=np.ascontiguousarray(std), ensemble=m.members)
    if source is not None:
        payload["source"] = source
    if simulation is not None:
        payload["simulation"] = simulation
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), "application/json", headers


__all__ = ["JSON_ONLY", "MODEL_NOT_FOUND", "NPY", "UNSUPPORTED_TYPE", "router"]
