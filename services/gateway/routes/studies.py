"""``/v1/studies``: start, follow and stop studies (mutations need the bearer token)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from services.config import ConfigError, StudyConfig, parse_config, parse_yaml
from services.gateway.deps import ManagerDep, SettingsDep, TokenDep, read_body
from services.gateway.schemas import ADMIN_ERRORS, StudyList, StudyPublic, error, inline_schema
from services.study import StudiesUnavailable, StudyLimitError, StudyNotResumable, StudyRunning

router = APIRouter(prefix="/v1/studies", tags=["studies"])

STUDY_NOT_FOUND = "study {id!r} not found"
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")

# Every study route needs a study backend (in this process, or Ray jobs on a cluster).
_UNAVAILABLE = {503: error("the gateway has no study backend (not connected to a Ray cluster), or it is unreachable")}
_NOT_FOUND = {404: error("no study of that id")}
# The route reads the raw body (JSON or YAML), so FastAPI cannot derive it: stated here. An empty body is
# the default study.
_CONFIG_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {"schema": inline_schema(StudyConfig)},
            **{t: {"schema": {"type": "string", "description": "the study config as YAML"}} for t in YAML_TYPES},
        },
    }
}


@router.post(
    "",
    response_model=StudyPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        **ADMIN_ERRORS,
        409: error("as many studies run as the gateway allows (max_running_studies)"),
        413: error("the body is above SURGE_MAX_BODY_BYTES"),
        415: error("the body is neither JSON nor YAML"),
        422: error("the body is not a valid study config (the detail names the field and the allowed values)"),
        **_UNAVAILABLE,
    },
    openapi_extra=_CONFIG_BODY,
)
async def create_study(request: Request, _: TokenDep, manager: ManagerDep, settings: SettingsDep) -> StudyPublic:
    """Start a study from a config body (JSON, or YAML with ``application/yaml``)."""
    body = await read_body(request, settings.max_body_bytes)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    try:
        if ctype in YAML_TYPES:
            cfg = parse_yaml(body.decode("utf-8", errors="replace"), "request body")
        elif ctype == "application/json":
            try:
                data = json.loads(body or b"{}")
            except (ValueError, RecursionError) as e:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"body is not valid JSON: {e}") from None
            cfg = parse_config(data, "request body")
        else:
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"unsupported content type {ctype!r}: send JSON or YAML"
            )
    except ConfigError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None
    try:
        snap = await run_in_threadpool(manager.submit, cfg)
    except StudyLimitError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    except StudiesUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
    return StudyPublic(**snap)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except StudiesUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None


@router.get("", response_model=StudyList, responses=_UNAVAILABLE)
def list_studies(manager: ManagerDep) -> StudyList:
    return StudyList(studies=[StudyPublic(**s) for s in _call(manager.statuses)])


@router.get("/{study_id}", response_model=StudyPublic, responses={**_NOT_FOUND, **_UNAVAILABLE})
def get_study(study_id: str, manager: ManagerDep) -> StudyPublic:
    snap = _call(manager.status, study_id)
    if snap is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, STUDY_NOT_FOUND.format(id=study_id))
    return StudyPublic(**snap)


@router.delete(
    "/{study_id}",
    response_model=StudyPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**ADMIN_ERRORS, **_NOT_FOUND, **_UNAVAILABLE},
)
def stop_study(study_id: str, _: TokenDep, manager: ManagerDep) -> StudyPublic:
    """Stop a study: the trainer publishes a last checkpoint, then everything it started ends."""
    snap = _call(manager.cancel, study_id)
    if snap is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, STUDY_NOT_FOUND.format(id=study_id))
    return StudyPublic(**snap)


@router.post(
    "/{study_id}/resume",
    response_model=StudyPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        **ADMIN_ERRORS,
        **_NOT_FOUND,
        409: error("the study is running, cannot be resumed, or as many studies run as the gateway allows"),
        **_UNAVAILABLE,
    },
)
def resume_study(study_id: str, _: TokenDep, manager: ManagerDep) -> StudyPublic:
    """Go on with a study whose driver stopped or died: no completed simulation runs again, training
    continues from its last checkpoint, the buffer refills from fresh simulations."""
    try:
        snap = _call(manager.resume, study_id)
    except (StudyRunning, StudyLimitError, StudyNotResumable) as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    if snap is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, STUDY_NOT_FOUND.format(id=study_id))
    return StudyPublic(**snap)
