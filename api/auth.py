"""Optional API keys: with `RAPID_API_KEYS` set, every /v1 route needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="one of the keys in RAPID_API_KEYS")


def require_api_key(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return
    given = credentials.credentials if credentials is not None else None
    if given is None or not any(secrets.compare_digest(given.encode(), key.encode()) for key in keys):
        message = "missing API key: send Authorization: Bearer <key>" if given is None else "invalid API key"
        raise HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})
