"""How a console page is made: who is signed in (the session cookie's principal), and a template
rendered with that principal, escaped and served with the console's security headers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.responses import Response

from stillhouse.control_plane.api.session import session_token
from stillhouse.control_plane.console.security_headers import secured
from stillhouse.control_plane.console.static_files import STATIC_PREFIX
from stillhouse.control_plane.principals import AccessControl, Principal

TEMPLATES = Jinja2Templates(
    env=Environment(
        loader=FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
)


def signed_in(request: Request) -> Principal | None:
    """The principal whose API token the session cookie holds, if it holds a valid one."""
    token = session_token(request)
    access: AccessControl = request.app.state.access
    return access.authenticate(token) if token else None


def page(
    request: Request,
    template: str,
    principal: Principal | None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    response = TEMPLATES.TemplateResponse(
        request,
        template,
        {"principal": principal, "static": STATIC_PREFIX, **context},
        status_code=status_code,
    )
    return secured(response)


def not_found(request: Request, principal: Principal, what: str) -> Response:
    return page(request, "not_found.html.j2", principal, status_code=404, what=what)
