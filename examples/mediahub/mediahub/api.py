"""What every mediahub service shares at its HTTP edge: the FastAPI app factory with Shipyard's error bodies, the
caller's identity as the gateway's jwt plugin passes it, the data directory, and the platform's address.

It must never verify tokens itself (the gateway does, and forwards claims as headers) nor talk to another service.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shipyard.sdk import Service

# Headers the gateway's jwt plugin sets from the verified token's claims (claims_to_headers in shipyard.yaml).
USER_ID_HEADER = "X-User-Id"
USER_ROLE_HEADER = "X-User-Role"
USER_NAME_HEADER = "X-User-Name"
IDENTITY_HEADERS = (USER_ID_HEADER, USER_ROLE_HEADER, USER_NAME_HEADER)


def data_dir(service: str) -> Path:
    """Each service keeps its state under $MEDIAHUB_DATA/<service>; its instances share it (one machine)."""
    root = Path(os.environ.get("MEDIAHUB_DATA") or Path(__file__).resolve().parent.parent / ".data")
    path = root / service
    path.mkdir(parents=True, exist_ok=True)
    return path


def shipyard_addr() -> str:
    """The control API: the platform tells its instances SHIPYARD_HTTP_ADDR; by hand, SHIPYARD_ADDR or Consul's."""
    for name in ("SHIPYARD_HTTP_ADDR", "SHIPYARD_ADDR", "CONSUL_HTTP_ADDR"):
        if os.environ.get(name):
            return os.environ[name]
    return "127.0.0.1:8500"


class ApiError(HTTPException):
    """A user error with Shipyard's body: {"error": message, "detail": ...}."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(status, error)
        self.error, self.extra = error, detail


def new_app(title: str, description: str) -> FastAPI:
    app = FastAPI(title=title, version="1.0", description=description)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            body = {"error": exc.error, "detail": exc.extra}
        else:
            body = {"error": str(exc.detail), "detail": None}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"where": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg")}
                    for e in exc.errors()]
        return JSONResponse({"error": "invalid request", "detail": problems}, status_code=422)

    return app


@dataclass(frozen=True)
class Caller:
    """Who is calling, as proven by the token the gateway verified."""

    id: str
    role: str
    name: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def headers(self) -> dict[str, str]:
        """To call another service on this caller's behalf (it applies the same rules as for the caller)."""
        return {USER_ID_HEADER: self.id, USER_ROLE_HEADER: self.role, USER_NAME_HEADER: self.name}

    def may_change(self, owner: str) -> bool:
        return self.is_admin or self.id == owner


def current_caller(request: Request) -> Caller:
    user = request.headers.get(USER_ID_HEADER)
    if not user:
        # Only reachable by calling an instance directly: through the gateway the jwt plugin answers 401 first.
        raise ApiError(401, "not authenticated", "call through the gateway with Authorization: Bearer <token>")
    return Caller(user, request.headers.get(USER_ROLE_HEADER) or "user", request.headers.get(USER_NAME_HEADER) or "")


CallerDep = Annotated[Caller, Depends(current_caller)]


def serve(service: Service) -> None:
    """What `python -m mediahub.<service>` does: timestamped logs on stderr, then serve until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service.run()
