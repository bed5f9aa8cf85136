"""The web console's session: the API token a user typed at the login page, kept in a cookie that
scripts cannot read, so that the console's pages, its `fetch` calls and its event streams (which a
browser opens without custom headers) are made as that user.

A request that a cookie authenticates and that changes something (any method but GET, HEAD, OPTIONS)
must also carry `CSRF_HEADER`: another site can make a browser send the cookie (SameSite=Strict stops
most of that), but not set a custom header without the API's consent.
"""

from __future__ import annotations

from fastapi import Request, Response

SESSION_COOKIE = "stillhouse_session"
CSRF_HEADER = "X-Stillhouse-Console"
SESSION_SECONDS = 12 * 3600
# A token longer than this is not one the API issued; the login form refuses it before hashing.
MAX_TOKEN_LENGTH = 512
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_token(request: Request) -> str | None:
    """The token of the request's session cookie, if it has one of a plausible size."""
    token = request.cookies.get(SESSION_COOKIE)
    return token if token and len(token) <= MAX_TOKEN_LENGTH else None


def needs_csrf_header(request: Request) -> bool:
    """Whether a cookie-authenticated `request` lacks the header that proves it came from the console."""
    return request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != "1"


def start_session(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
