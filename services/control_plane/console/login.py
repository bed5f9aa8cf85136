"""Signing in and out of the console: the login form takes an API token, checks it as the API would,
and keeps it in the session cookie (`api.session`); logging out drops the cookie."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import structlog
from fastapi import APIRouter, Query, Request
from starlette.responses import RedirectResponse, Response

from stillhouse.control_plane.api.session import MAX_TOKEN_LENGTH, end_session, start_session
from stillhouse.control_plane.console.navigation import safe_next
from stillhouse.control_plane.console.rendering import page, signed_in
from stillhouse.control_plane.principals import AccessControl

log = structlog.get_logger(__name__)

# A login form holds a token and a path: anything much larger is not one.
MAX_FORM_BYTES = 8192

router = APIRouter(include_in_schema=False)


class FormRefused(Exception):
    pass


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form in the body (each field's first value), refused when over MAX_FORM_BYTES."""
    if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
        raise FormRefused("the login form must be sent as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormRefused(f"the login form is larger than {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def from_another_site(request: Request) -> bool:
    """Whether the browser says the form was posted by a page of another site. Hosts are compared, not
    schemes: behind a proxy that ends TLS the request arrives as http while the page was https."""
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc != request.headers.get("host")


def _login_form(request: Request, next_path: str, error: str | None, status_code: int) -> Response:
    return page(request, "login.html.j2", None, status_code=status_code, next_path=next_path, error=error)


@router.get("/login")
async def login_page(request: Request, next: Annotated[str | None, Query()] = None) -> Response:
    next_path = safe_next(next)
    if signed_in(request) is not None:
        return RedirectResponse(next_path, status_code=303)
    return _login_form(request, next_path, None, 200)


@router.post("/login")
async def log_in(request: Request) -> Response:
    try:
        form = await read_form(request)
    except FormRefused as refused:
        return _login_form(request, "/", str(refused), 400)
    next_path = safe_next(form.get("next"))
    if from_another_site(request):
        return _login_form(request, next_path, "This form was sent from another site: sign in here.", 403)
    token = form.get("token", "").strip()
    if not token:
        return _login_form(request, next_path, "Enter your API token.", 401)
    if len(token) > MAX_TOKEN_LENGTH:
        message = f"That is not a Stillhouse API token: tokens are at most {MAX_TOKEN_LENGTH} characters."
        return _login_form(request, next_path, message, 401)
    access: AccessControl = request.app.state.access
    principal = access.authenticate(token)
    if principal is None:
        log.warning("console login refused")
        message = "That token is not valid. Use the API token you were given (or `stillhouse up` wrote)."
        return _login_form(request, next_path, message, 401)
    log.info("console login", principal=principal.name, tenant=principal.tenant)
    response = RedirectResponse(next_path, status_code=303)
    start_session(response, request, token)
    return response


@router.post("/logout")
async def log_out(request: Request) -> Response:
    if from_another_site(request):
        return Response("logging out needs a form of this site", status_code=403, media_type="text/plain")
    response = RedirectResponse("/login", status_code=303)
    end_session(response)
    return response
