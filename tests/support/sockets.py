"""The addresses processes listen on, for tests of what a platform exposes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import psutil


def listening_sockets(processes: Iterable[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and every bound UDP socket."""
    sockets = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN or not connection.raddr:
                sockets.append((name, connection.laddr.ip, connection.laddr.port))
    return sockets


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms (::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback
