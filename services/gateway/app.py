"""The FastAPI gateway: serves the model store over REST while studies train."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from services.gateway.deps import PREDICT_SCHEME
from services.gateway.fallback import FallbackGate
from services.gateway.hub import ModelHub
from services.gateway.pool import PredictPool
from services.gateway.routes import models, studies, system
from services.gateway.settings import GatewaySettings
from services.metrics import StudyCollector
from services.queries import QueryBook
from services.study import StudyBackend

STUDIES_STOP_WAIT_S = 90.0  # at shutdown, for studies run in this process to publish their last checkpoint


def create_app(settings: GatewaySettings | None = None, manager: StudyBackend | None = None) -> FastAPI:
    """Build the gateway. ``manager`` runs studies (in this process, or as Ray jobs on a cluster);
    without one, the study routes answer 503 and models are served all the same."""
    settings = settings or GatewaySettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each predict worker gets its share of the cores: N concurrent forwards with torch's default
        # (every core each) would oversubscribe them and make every request slower.
        threads_before = torch.get_num_threads()
        torch.set_num_threads(settings.intra_op_threads())
        await asyncio.to_thread(app.state.hub.start)  # loads every model: not on the event loop
        flusher = asyncio.create_task(_flush_queries(app.state.queries, settings.query_flush_s))
        try:
            yield
        finally:
            flusher.cancel()
            if app.state.queries is not None:
                await asyncio.to_thread(app.state.queries.flush)  # what was asked since the last flush
            app.state.predict_pool.shutdown()
            torch.set_num_threads(threads_before)  # the process may go on (an embedding program, tests)
            # Studies run in this process (embedded) stop as a DELETE would: each publishes a last checkpoint.
            stop_all = getattr(app.state.manager, "stop_all", None)
            if stop_all is not None:
                await asyncio.to_thread(stop_all, STUDIES_STOP_WAIT_S)
            app.state.hub.stop()

    app = FastAPI(title="Surge", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.hub = ModelHub(settings.store, settings.poll_interval_s)
    app.state.manager = manager
    app.state.predict_pool = PredictPool(settings.predict_workers, settings.predict_queue)
    app.state.fallbacks = FallbackGate(settings.max_fallbacks)
    # The points users ask about, per model, for studies with sampler.kind: queries (None: not kept).
    app.state.queries = (
        QueryBook(settings.store, settings.query_sample, settings.query_flush_s, seed=_replica_seed())
        if settings.query_sample
        else None
    )
    app.state.study_registry = CollectorRegistry(auto_describe=True)
    app.state.study_registry.register(StudyCollector(settings.store))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return JSONResponse({"detail": f"{loc}: {err['msg']}"}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    routers = (models.router, studies.router, system.router)
    for router in routers:
        app.include_router(router)
    # Every route that answers, whatever the FastAPI version keeps in app.routes (the routes themselves,
    # or included routers that hold them).
    routes = [
        r for r in (*app.router.routes, *(r for router in routers for r in router.routes)) if isinstance(r, Route)
    ]

    @app.exception_handler(status.HTTP_405_METHOD_NOT_ALLOWED)
    async def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
        # Starlette answers 405 from the first route whose path matches, with that route's methods: on a
        # path several routes serve (GET and POST /v1/studies) Allow named only one of them.
        allowed = allowed_methods(routes, request.scope)
        headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)} if allowed else exc.headers
        return await http_exception_handler(request, StarletteHTTPException(exc.status_code, exc.detail, headers))

    def openapi() -> dict[str, Any]:
        return _conform(FastAPI.openapi(app), settings)

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _replica_seed() -> int:
    """Gateway replicas sharing a store must not make the same reservoir choices (QueryBook)."""
    return int.from_bytes(os.urandom(8), "little")


async def _flush_queries(book: QueryBook | None, every_s: float) -> None:
    """Merge the kept query points into the store every ``every_s`` (QueryBook.flush never raises)."""
    if book is None:
        return
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(book.flush)


def allowed_methods(routes: Iterable[Route], scope: dict[str, Any]) -> list[str]:
    """The methods of every route whose path matches the request's (a 405's ``Allow``), sorted."""
    return sorted({m for r in routes if r.methods and r.matches(scope)[0] is not Match.NONE for m in r.methods})


def _conform(doc: dict[str, Any], settings: GatewaySettings) -> dict[str, Any]:
    """The OpenAPI document as this gateway answers (in place, and idempotent: FastAPI caches the document).

    FastAPI adds a 422 with its ``HTTPValidationError`` body to every route that takes a parameter; this
    gateway answers validation errors as ``{"detail": str}`` (``_validation``), and each route declares its
    own 422 where it can answer one (a string path segment cannot fail). Predictions need a token only if
    the gateway has one: without, their security requirement is optional."""
    for operations in doc.get("paths", {}).values():
        for op in operations.values():
            responses = op.get("responses", {})
            schema = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            if not settings.predict_token and {PREDICT_SCHEME: []} in op.get("security", []):
                op["security"] = [{}, {PREDICT_SCHEME: []}]
    if "/HTTPValidationError" not in json.dumps(doc.get("paths", {})):  # ValidationError is only its part
        for unused in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(unused, None)
    return doc
