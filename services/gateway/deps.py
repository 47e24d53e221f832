"""Shared dependencies of the gateway's routes, as named ``Annotated`` aliases.

They are ``async`` because they only read application state: FastAPI runs a plain ``def``
dependency in its thread pool, and a thread hop per dependency was most of a one-row
prediction's latency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.auth import TOKEN_MISSING, bearer_ok
from services.gateway.hub import ModelHub
from services.gateway.pool import PredictPool
from services.gateway.settings import GatewaySettings
from services.study import StudyBackend

MUTATIONS_DISABLED = "study mutations are disabled: the gateway has no API token (set SURGE_API_TOKEN)"
STUDIES_UNAVAILABLE = "studies are unavailable: this gateway is not connected to a Ray cluster"
BODY_TOO_LARGE = "request body exceeds the limit of {limit} bytes"

# The two REST scopes as OpenAPI security schemes (the names clients and fuzzers look them up by). They
# only document and never refuse (auto_error=False): the token is checked by ``bearer_ok``, the one
# check REST and gRPC share, so that both accept and refuse the same headers.
ADMIN_SCHEME, PREDICT_SCHEME = "adminToken", "predictToken"
_ADMIN_BEARER = HTTPBearer(
    scheme_name=ADMIN_SCHEME, description="SURGE_API_TOKEN: studies and model promotion", auto_error=False
)
_PREDICT_BEARER = HTTPBearer(
    scheme_name=PREDICT_SCHEME,
    description="SURGE_PREDICT_TOKEN: predictions, when the gateway has one (else they are open)",
    auto_error=False,
)
_AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_ADMIN_BEARER)]
_PredictCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_PREDICT_BEARER)]


async def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


async def get_hub(request: Request) -> ModelHub:
    return request.app.state.hub


async def get_manager(request: Request) -> StudyBackend:
    manager = request.app.state.manager
    if manager is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, STUDIES_UNAVAILABLE)
    return manager


async def require_token(
    request: Request, settings: Annotated[GatewaySettings, Depends(get_settings)], _: _AdminCredentials
) -> None:
    if not settings.api_token:
        raise HTTPException(status.HTTP_403_FORBIDDEN, MUTATIONS_DISABLED)
    _require_bearer(request, settings.api_token)


async def require_predict_token(
    request: Request, settings: Annotated[GatewaySettings, Depends(get_settings)], _: _PredictCredentials
) -> None:
    """Predictions are open unless the gateway has a predict token (``SURGE_PREDICT_TOKEN``)."""
    if settings.predict_token:
        _require_bearer(request, settings.predict_token)


def _require_bearer(request: Request, token: str) -> None:
    if not bearer_ok(request.headers.get("authorization"), token):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, TOKEN_MISSING, headers={"WWW-Authenticate": "Bearer"})


async def get_pool(request: Request) -> PredictPool:
    return request.app.state.predict_pool


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` (chunked bodies too)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, BODY_TOO_LARGE.format(limit=limit))
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, BODY_TOO_LARGE.format(limit=limit))
        parts.append(chunk)
    return b"".join(parts)


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
HubDep = Annotated[ModelHub, Depends(get_hub)]
ManagerDep = Annotated[StudyBackend, Depends(get_manager)]
TokenDep = Annotated[None, Depends(require_token)]
PredictTokenDep = Annotated[None, Depends(require_predict_token)]
PoolDep = Annotated[PredictPool, Depends(get_pool)]
