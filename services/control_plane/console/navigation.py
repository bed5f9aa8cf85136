"""Where the console sends a browser: the login page with the path to come back to, and back to that
path, which must be a path of this site (an open redirect would let a link log a user in and then send
them anywhere)."""

from __future__ import annotations

from urllib.parse import quote

from starlette.datastructures import URL

HOME = "/"
MAX_NEXT_LENGTH = 2048


def safe_next(value: str | None) -> str:
    """`value` if it is a local path (one leading '/', no scheme, host, backslash or control character),
    else the jobs list."""
    if not value or len(value) > MAX_NEXT_LENGTH:
        return HOME
    if not value.startswith("/") or value.startswith("//"):
        return HOME
    if "\\" in value or any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        return HOME
    if value == "/login" or value.startswith(("/login?", "/logout")):
        return HOME
    return value


def login_url(url: URL) -> str:
    """The login page, told to come back to `url`'s path and query."""
    here = url.path + (f"?{url.query}" if url.query else "")
    return f"/login?next={quote(safe_next(here), safe='')}"
