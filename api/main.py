"""The FastAPI app: `create_app(settings, backend=None)`; models load in the lifespan.

Layout as in FastAPI's "bigger applications" guide: this module wires the routers (`api.routers`),
the dependencies (`api.dependencies`) and the services built in the lifespan (`api.service`).
Run it with `rapid serve`, or `uvicorn --factory api.main:app_from_env`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.backend import Backend
from api.body_limit import BodyLimitMiddleware
from api.http_errors import install_error_handlers
from api.routers import documents, health, openai
from api.service import Services
from api.settings import Settings, load_settings

log = logging.getLogger(__name__)
BODY_OVERHEAD_BYTES = 1 << 20  # JSON escaping or multipart framing around a document of the maximum size


def create_app(settings: Settings, backend: Backend | None = None) -> FastAPI:
    """The app; without `backend`, the lifespan loads a `LocalBackend` from `settings`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_backend = backend
        if model_backend is None:
            from api.local_backend import LocalBackend

            log.info("loading %s", settings.model)
            model_backend = await asyncio.to_thread(LocalBackend.from_settings, settings)
        services = await asyncio.to_thread(Services.open, settings, model_backend)
        app.state.services = services
        log.info("serving %s from %s", services.generation.model_name, settings.data_dir)
        try:
            yield
        finally:
            await asyncio.to_thread(services.close)

    app = FastAPI(title="rapid", version="0.1.0", lifespan=lifespan,
                  summary="Long-document question answering with retrieval-augmented speculative decoding")
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_document_bytes + BODY_OVERHEAD_BYTES)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(documents.router)
    app.include_router(openai.router)
    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory api.main:app_from_env`: settings from RAPID_* only."""
    import torch

    settings = load_settings()
    torch.set_num_threads(settings.threads)
    return create_app(settings)
