"""Liveness and Prometheus metrics (no API key: load balancers and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.dependencies import ServicesDep
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(services: ServicesDep) -> Health:
    worker = services.worker
    return Health(model=services.generation.model_name, queue_depth=worker.waiting + worker.running,
                  documents=services.storage.count())


@router.get("/metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
