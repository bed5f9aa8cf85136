"""A TCP proxy in front of a real PostgreSQL server, for tests of what its clients do when the network
fails them: `cut()` drops every connection and refuses new ones until `heal()` (an outage, a failover);
`stall()` lets every connection hang, the bytes sent going nowhere (a network partition), until
`heal()`; `stall_at_next_commit()` stalls so from the next COMMIT on, that COMMIT lost (a partition in the
middle of a transaction: its writes done, their row locks held), and `stall_at_commit_after(statement)`
from the COMMIT of a transaction that sent `statement`; and `lose_next_commit_answer()` lets the
next COMMIT reach the server but drops the server's answer with the connection (the commit landed; the
client cannot know)."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

# PostgreSQL's simple query protocol sends COMMIT as this text, NUL-terminated (psycopg does so).
_COMMIT_QUERY = b"COMMIT\x00"


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.drop_next_answer = False
        self.sent_stall_statement = False

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._cut = False
        self._stalled = False
        self._held: list[socket.socket] = []  # connections accepted while stalled, never answered
        self._closed = False
        self._commit_armed = False
        self._stall_at_commit = False
        self._stall_statement: bytes | None = None
        self.dropped_connections = 0
        self.lost_commit_answers = 0
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def cut(self) -> None:
        """Close every connection now and every new one at once, until `heal()`."""
        with self._lock:
            self._cut = True
            links, self._links = self._links, set()
            self.dropped_connections += len(links)
        for link in links:
            link.close()

    def stall(self) -> None:
        """Forward nothing more either way, and accept new connections without ever answering them."""
        with self._lock:
            self._stalled = True

    def stall_at_next_commit(self) -> None:
        """`stall()` as the next COMMIT arrives, before it goes on: its transaction stays open."""
        with self._lock:
            self._stall_at_commit = True

    def stall_at_commit_after(self, statement: bytes) -> None:
        """`stall()` as a COMMIT arrives on a connection that sent `statement` (SQL text, as the client
        sends it the first time it runs it there) since this call: that transaction stays open."""
        with self._lock:
            self._stall_statement = statement
            for link in self._links:
                link.sent_stall_statement = False

    @property
    def stalled(self) -> bool:
        with self._lock:
            return self._stalled

    def heal(self) -> None:
        with self._lock:
            self._cut = self._stalled = self._stall_at_commit = False
            self._stall_statement = None
            held, self._held = self._held, []
        for client in held:
            client.close()

    def lose_next_commit_answer(self) -> None:
        with self._lock:
            self._commit_armed = True

    def close(self) -> None:
        self._closed = True
        self._acceptor.join()
        self._listener.close()
        self.cut()
        self.heal()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                if self._stalled:
                    self._held.append(client)
                    continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            link = _Link(client, server)
            with self._lock:
                cut = self._cut
                if cut:
                    self.dropped_connections += 1
                else:
                    self._links.add(link)
            if cut:
                link.close()
                continue
            threading.Thread(target=self._pump, args=(link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, False), daemon=True).start()

    def _pump(self, link: _Link, upstream: bool) -> None:
        source, sink = (link.client, link.server) if upstream else (link.server, link.client)
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if upstream and self._stall_statement is not None and self._stall_statement in data:
                    link.sent_stall_statement = True
                if upstream and _COMMIT_QUERY in data:
                    with self._lock:
                        # Marked before the COMMIT goes on, so its answer cannot overtake the mark.
                        link.drop_next_answer, self._commit_armed = self._commit_armed, False
                        self._stalled = self._stalled or self._stall_at_commit or link.sent_stall_statement
                elif not upstream and link.drop_next_answer:
                    with self._lock:
                        self.lost_commit_answers += 1
                    break  # the server has committed; its answer goes nowhere
                if self._stalled:
                    continue  # partitioned: the bytes are lost, the connection stays open
                sink.sendall(data)
        with self._lock:
            self._links.discard(link)
        link.close()
