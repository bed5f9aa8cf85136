"""Which API to talk to: a URL and token given, else the environment, else what `stillhouse up` wrote.

`stillhouse up` writes `<home>/endpoint.json` (`apiUrl`, `tokenFile`, `pid`); home is $STILLHOUSE_HOME or
~/.stillhouse. A URL or token given explicitly (or through STILLHOUSE_API_URL / STILLHOUSE_API_TOKEN) wins
over the file's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stillhouse.client.errors import EndpointNotFound
from stillhouse.common.paths import stillhouse_home

ENDPOINT_FILE = "endpoint.json"
URL_VARIABLE = "STILLHOUSE_API_URL"
TOKEN_VARIABLE = "STILLHOUSE_API_TOKEN"
NO_API_FOUND = (
    "no Stillhouse API found: run `stillhouse up` or set STILLHOUSE_API_URL and STILLHOUSE_API_TOKEN"
)


@dataclass(frozen=True)
class ApiEndpoint:
    url: str
    token: str = field(repr=False)


def find_endpoint(url: str | None = None, token: str | None = None, home: Path | None = None) -> ApiEndpoint:
    """The API given, with whatever is missing from the environment, then from `stillhouse up`'s file."""
    return discover_endpoint(
        url or os.environ.get(URL_VARIABLE) or None,
        token or os.environ.get(TOKEN_VARIABLE) or None,
        home or stillhouse_home(),
    )


def discover_endpoint(api_url: str | None, api_token: str | None, home: Path) -> ApiEndpoint:
    """The API to talk to: the URL and token given, each falling back to what `stillhouse up` wrote into
    `<home>/endpoint.json`."""
    if api_url and api_token:
        return ApiEndpoint(api_url.rstrip("/"), api_token)
    embedded = _read_endpoint_file(home)
    if embedded is None:
        if api_url:
            raise EndpointNotFound(f"no API token for {api_url}: set STILLHOUSE_API_TOKEN")
        raise EndpointNotFound(NO_API_FOUND)
    url = api_url or embedded["apiUrl"]
    if api_token:
        return ApiEndpoint(url.rstrip("/"), api_token)
    token_file = Path(embedded["tokenFile"])
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise EndpointNotFound(f"cannot read the API token file {token_file}: {exc.strerror}") from exc
    if not token:
        raise EndpointNotFound(f"the API token file {token_file} is empty")
    return ApiEndpoint(url.rstrip("/"), token)


def _read_endpoint_file(home: Path) -> dict[str, Any] | None:
    path = home / ENDPOINT_FILE
    try:
        endpoint = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EndpointNotFound(f"cannot read {path}: {exc}") from exc
    if not isinstance(endpoint, dict) or not {"apiUrl", "tokenFile"} <= endpoint.keys():
        raise EndpointNotFound(f"{path} is not an endpoint file written by `stillhouse up`")
    pid = endpoint.get("pid")
    if isinstance(pid, int) and not _process_exists(pid):
        raise EndpointNotFound(
            f"the `stillhouse up` that wrote {path} (pid {pid}) is no longer running: run `stillhouse up`"
        )
    return endpoint


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
