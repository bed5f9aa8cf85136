"""An aiohttp connector whose every connection obeys the teacher's egress policy (`teacher.egress`).

Checking the baseURL before a run is not enough: a name can resolve to a public address when checked
and to a private one when connected (DNS rebinding). So the check sits where sockets are opened.
aiohttp's connector resolves a host (`_resolve_host`) and connects to the addresses that returns; ours
resolves through the policy, which checks every address, so the address connected to is the address
checked. IP literals go the same way: aiohttp's own resolution would answer them without a resolver.
Nothing else about the request changes: it still carries the URL's host in its Host header, and TLS
still sends and verifies that host name (aiohttp gives TLS the URL's host, not the address connected
to). A resolution per new connection costs what the default connector already pays with its DNS cache
off; pooled connections are reused without one.

`_resolve_host` is not public API: aiohttp is pinned, and tests/teacher/test_egress.py fails should an
aiohttp release stop calling it (a loopback literal and a rebinding name would then be connected to).

Proxies from the environment must not be used, so a session on this connector keeps aiohttp's
`trust_env=False`: through a proxy, the address connected to is the proxy's.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult

from stillhouse.teacher.egress import EgressPolicy


class EgressCheckedConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, resolving through `policy`; `options` as for `aiohttp.TCPConnector`."""

    def __init__(self, policy: EgressPolicy, **options: Any) -> None:
        # Every new connection resolves, and is checked, anew.
        super().__init__(use_dns_cache=False, **options)
        self._policy = policy

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Any] | None = None
    ) -> list[ResolveResult]:
        """The addresses of `host`, every one of them allowed; raises `EgressRefused` (before connecting
        anywhere) when one is not, and OSError (which aiohttp reports as a DNS failure) when `host` does
        not resolve."""
        addresses = await asyncio.to_thread(self._policy.addresses_to_connect, host, port)
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        return [
            {
                "hostname": host,
                "host": str(address),
                "port": port,
                "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for address in addresses
        ]
