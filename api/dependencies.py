"""FastAPI dependencies: the services built in the lifespan, as typed parameters for the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.service import DocumentService, GenerationService, Services


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_documents(request: Request) -> DocumentService:
    return get_services(request).documents


def get_generation(request: Request) -> GenerationService:
    return get_services(request).generation


ServicesDep = Annotated[Services, Depends(get_services)]
DocumentsDep = Annotated[DocumentService, Depends(get_documents)]
GenerationDep = Annotated[GenerationService, Depends(get_generation)]
