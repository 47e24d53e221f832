"""``/healthz`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.deps import HubDep
from services.gateway.schemas import Health

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health)
async def healthz(request: Request, hub: HubDep) -> Health:
    # On the event loop and from memory only: it answers at once whatever predictions or a slow
    # (network) store are doing, which is what a liveness probe must see.
    return Health(status="ok", models=hub.served_names(), studies_enabled=request.app.state.manager is not None)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition: this process's predictions, then the studies' figures",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics(request: Request) -> Response:
    # The process's own metrics (predictions), then the studies' figures read from their snapshots.
    body = generate_latest() + generate_latest(request.app.state.study_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
