"""A loopback TCP forwarder that a test can cut, to make Label Studio unreachable for real.

Besides `cut()` (everything down), `drop_next()` breaks one HTTP exchange in one of the two
ways a network really does, for a request whose bytes contain a marker:

* `when="request"`: the connection dies while the request is on its way (half of the bytes
  seen are forwarded): the server never handles it;
* `when="response"`: the whole request reaches the server, which handles it and answers;
  the answer is thrown away and the connection closed. The client sees a dropped
  connection although the server did the work: what makes a blind retry store twice.

`delay_next()` holds one request for some seconds before forwarding it whole (a slow link,
or a server too busy to read): the server handles it late, as sent.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Fault:
    marker: bytes
    when: str
    nth: int  # the nth request (1-based) containing `marker` is broken
    fired: bool = False
    delay: float = 0.0  # when="delay": seconds the request is held


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket
    # Set when this connection's pending request is to lose its answer.
    drop_response: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.server.listen(64)
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._open = True
        self._faults: list[_Fault] = []
        self._seen: dict[bytes, int] = {}  # requests seen per marker
        # The first bytes of each answer thrown away (`when="response"`), for the test to
        # check that the server did handle the request ("HTTP/1.1 201 ...").
        self.dropped_responses: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop_next(self, marker: bytes, when: str = "response", skip: int = 0, times: int = 1) -> None:
        """Break the exchange of the next `times` requests containing `marker`, after
        letting `skip` such requests through (see the module docstring for `when`)."""
        if when not in ("request", "response"):
            raise ValueError("when must be 'request' or 'response'")
        with self._lock:
            seen = self._seen.get(marker, 0)
            self._faults += [_Fault(marker, when, seen + skip + i + 1) for i in range(times)]

    def delay_next(self, marker: bytes, seconds: float, skip: int = 0) -> None:
        """Hold the next request containing `marker` (after `skip` such requests) for
        `seconds`, then forward it unchanged."""
        with self._lock:
            seen = self._seen.get(marker, 0)
            self._faults.append(_Fault(marker, "delay", seen + skip + 1, delay=seconds))

    def faults_fired(self) -> int:
        with self._lock:
            return sum(f.fired for f in self._faults)

    def _fault_for(self, data: bytes) -> _Fault | None:
        with self._lock:
            hit = None
            for marker in {f.marker for f in self._faults}:
                if marker in data:
                    self._seen[marker] = self._seen.get(marker, 0) + 1
                    for fault in self._faults:
                        if fault.marker == marker and fault.nth == self._seen[marker]:
                            fault.fired, hit = True, fault
            return hit

    def _accept(self) -> None:
        while self._open:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._open:
                    client.close()
                    upstream.close()
                    return
                self._connections += [client, upstream]
            link = _Link(client, upstream)
            threading.Thread(target=self._to_upstream, args=(link,), daemon=True).start()
            threading.Thread(target=self._to_client, args=(link,), daemon=True).start()

    def _to_upstream(self, link: _Link) -> None:
        try:
            while data := link.client.recv(65536):
                fault = self._fault_for(data) if self._faults else None
                if fault is not None and fault.when == "request":
                    link.upstream.sendall(data[: len(data) // 2])
                    link.close()
                    return
                if fault is not None and fault.when == "delay":
                    time.sleep(fault.delay)
                elif fault is not None:
                    with link.lock:
                        link.drop_response = True
                link.upstream.sendall(data)
        except OSError:
            pass
        finally:
            link.close()

    def _to_client(self, link: _Link) -> None:
        try:
            while data := link.upstream.recv(65536):
                with link.lock:
                    drop = link.drop_response
                if drop:
                    self.dropped_responses.append(data[:200])
                    link.close()
                    return
                link.client.sendall(data)
        except OSError:
            pass
        finally:
            link.close()

    def cut(self) -> None:
        """Stop listening and drop every open connection: new connections are refused."""
        with self._lock:
            self._open = False
            self.server.close()
            for s in self._connections:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self._connections.clear()
