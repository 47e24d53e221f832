"""The FastAPI gateway: serves the model store over REST while studies train."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from services.gateway.hub import ModelHub
from services.gateway.pool import PredictPool
from services.gateway.routes import models, studies, system
from services.gateway.settings import GatewaySettings
from services.metrics import StudyCollector
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
        try:
            yield
        finally:
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
    app.state.study_registry = CollectorRegistry(auto_describe=True)
    app.state.study_registry.register(StudyCollector(settings.store))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return JSONResponse({"detail": f"{loc}: {err['msg']}"}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    app.include_router(models.router)
    app.include_router(studies.router)
    app.include_router(system.router)
    return app
