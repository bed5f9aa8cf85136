"""An httpx transport whose every connection obeys the teacher's egress policy (`teacher.egress`).

Checking the baseURL before a run is not enough: a name can resolve to a public address when checked
and to a private one when connected (DNS rebinding). So the check sits where sockets are opened.
httpcore opens every connection through a network backend; ours resolves the host itself, checks
every address with the policy, and connects to a checked address, so the address connected to is
the address checked. Nothing else about the request changes: it still carries the URL's host in its
Host header, and TLS still sends and verifies that host name (httpcore gives TLS the URL's host, not
the address connected to). A resolution per new connection costs what the default backend already
pays; pooled connections are reused without one.

Proxies from the environment are not used: through a proxy, the address connected to is the proxy's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpcore
import httpx

from stillhouse.teacher.egress import EgressPolicy


class EgressCheckedNetworkBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A connection to the first reachable address of `host`, all of which the policy allows;
        raises `EgressRefused` (before connecting anywhere) when one is not allowed."""
        try:
            addresses = await asyncio.to_thread(self._policy.addresses_to_connect, host, port)
        except OSError as error:
            raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from error
        failure: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:
            try:
                return await self._network.connect_tcp(
                    str(address), port, timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


class EgressCheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, connecting through `EgressCheckedNetworkBackend`."""

    def __init__(self, policy: EgressPolicy, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        # httpx's transport takes no network backend, so its pool is rebuilt as httpx builds it, with ours.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=EgressCheckedNetworkBackend(policy),
        )
