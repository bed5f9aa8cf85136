"""Where the teacher service may connect: public addresses, and what the operator allow-lists.

A job spec names the teacher's `baseURL`, so without a policy a spec could point the teacher service
at the cloud metadata endpoint (169.254.169.254), at loopback or at cluster-internal services. Every
address a host resolves to must be globally routable, unless it lies in an allow-listed network or
the host name itself is allow-listed (`TeacherSettings.egress_allow`). A host that resolves to one
public and one private address is refused: either could be the one connected to.

The policy is checked twice: on the baseURL before a teacher stage or call starts (so that a refused
spec fails at once, with a message naming the address), and on every connection the HTTP client
opens (`backends/egress_connector.py`), where the address connected to is the address checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses the host resolves to, as text.
Resolver = Callable[[str, int], Sequence[str]]

ALLOW_SETTING = "STILLHOUSE_TEACHER_EGRESS_ALLOW"

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE = tuple(
    ipaddress.ip_network(cidr) for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_HOST_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


class EgressRefused(Exception):
    """A teacher host that resolves to an address the policy does not allow."""

    def __init__(self, host: str, address: Address, kind: str) -> None:
        self.host = host
        self.address = address
        self.kind = kind
        where = "is" if _literal_address(host) == address else f"resolves to {_shown(address)},"
        # An allow-listed IPv4 network also holds the IPv4-mapped forms of its addresses.
        example = getattr(address, "ipv4_mapped", None) or type(address)(int(address))
        super().__init__(
            f"teacher egress refused: the baseURL host {host} {where} a {kind} address; only public "
            f"addresses may be reached unless {ALLOW_SETTING} lists the host name or a network that "
            f"holds the address (e.g. {example}/{example.max_prefixlen})"
        )


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order, as a connection would resolve it
    (`getaddrinfo`, which also reads odd spellings such as 2852039166 or 0xa9.0xfe.0xa9.0xfe)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refusal_kind(address: Address) -> str | None:
    """Why `address` is not a public address (its kind, e.g. "link-local"); None when it is one."""
    if isinstance(address, ipaddress.IPv6Address):
        # Traffic to these reaches the IPv4 address inside them.
        if address.ipv4_mapped is not None:
            return refusal_kind(address.ipv4_mapped)
        if address.sixtofour is not None and (kind := refusal_kind(address.sixtofour)):
            return kind
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _SHARED:
        return "shared (carrier-grade NAT)"
    if any(address in network for network in _PRIVATE):
        return "private"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "special-purpose"
    return None


def parse_allow_entry(entry: str) -> Network | str:
    """One allow-list entry: a network in CIDR notation (an address alone is its own network) or an exact
    host name, lower-cased. Raises ValueError naming the entry and what is accepted."""
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    name = _normal_host(text)
    if len(name) <= 253 and _HOST_NAME.fullmatch(name):
        return name
    raise ValueError(
        f"egress allow-list entry {entry!r} is neither a network (CIDR such as 10.8.0.0/16 or fd00::/8, "
        "or one address) nor a host name (such as vllm.models.svc.cluster.local)"
    )


@dataclass(frozen=True)
class EgressPolicy:
    """Public addresses, plus the allow-listed `networks` and exact host names (`hosts`)."""

    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()
    resolve: Resolver = system_resolver

    @classmethod
    def from_entries(cls, entries: Iterable[str], resolve: Resolver = system_resolver) -> EgressPolicy:
        parsed = [parse_allow_entry(entry) for entry in entries]
        return cls(
            networks=tuple(entry for entry in parsed if not isinstance(entry, str)),
            hosts=frozenset(entry for entry in parsed if isinstance(entry, str)),
            resolve=resolve,
        )

    def allows_host(self, host: str) -> bool:
        return _normal_host(host) in self.hosts

    def refusal(self, host: str, address: Address) -> EgressRefused | None:
        """Why connecting to `address` for `host` is refused; None when it is allowed."""
        if self.allows_host(host):
            return None
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        if any(candidate in network for candidate in candidates for network in self.networks):
            return None
        kind = refusal_kind(address)
        return None if kind is None else EgressRefused(host, address, kind)

    def addresses_to_connect(self, host: str, port: int) -> list[Address]:
        """The addresses `host` resolves to, every one of them allowed. Blocks while resolving; raises
        `EgressRefused` for the first address refused, and `OSError` when the host does not resolve."""
        addresses = [ipaddress.ip_address(text) for text in self.resolve(host, port)]
        for address in addresses:
            if (refused := self.refusal(host, address)) is not None:
                raise refused
        return addresses

    async def check_url(self, url: str) -> None:
        """Refuse (`EgressRefused`) a teacher URL whose host resolves to an address not allowed; the
        resolution runs in a worker thread. Raises ValueError for a URL that is not http(s) with a host.
        A host that does not resolve passes: nothing can connect to it, and a connection checks again."""
        host, port = _host_and_port(url)
        if self.allows_host(host):
            return
        try:
            await asyncio.to_thread(self.addresses_to_connect, host, port)
        except OSError:
            return


def _host_and_port(url: str) -> tuple[str, int]:
    # httpx's parser refuses what is no URL host (such as an octal address); whatever host the HTTP client
    # reads from the URL, the connection checks that one again (backends/egress_connector.py).
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ValueError(f"baseURL {url!r} is not a valid URL: {error}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"baseURL must be an http(s) URL such as https://api.openai.com/v1; got {url!r}")
    return parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)


def _normal_host(host: str) -> str:
    return host.strip().lower().removesuffix(".")


def _shown(address: Address) -> str:
    """The address as people write it: an IPv4-mapped IPv6 address with its IPv4 part dotted."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(address) if mapped is None else f"::ffff:{mapped}"


def _literal_address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
