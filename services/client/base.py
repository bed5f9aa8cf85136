"""What `Client` and `AsyncClient` share: finding the API and opening the httpx client that talks to it."""

from __future__ import annotations

from pathlib import Path
from typing import Generic, TypeVar

import httpx

from stillhouse.client import protocol as api
from stillhouse.client.endpoint import find_endpoint

HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class HttpApiClient(Generic[HttpT]):
    """Without `url` and `token`, finds the API as the CLI does: STILLHOUSE_API_URL and
    STILLHOUSE_API_TOKEN, else the endpoint file `stillhouse up` wrote in `home`."""

    http_class: type[HttpT]

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        home: Path | None = None,
        timeout: float = api.REQUEST_TIMEOUT,
    ) -> None:
        endpoint = find_endpoint(url, token, home)
        self.url = endpoint.url
        self._http: HttpT = self.http_class(**api.http_options(endpoint, timeout))
