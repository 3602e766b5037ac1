"""A TCP proxy on 127.0.0.1 in front of a real server, for network faults the client cannot tell from
real ones: the first N connections reset, or an outage that starts after a given number of HTTP
requests (open connections are reset, new ones refused) and ends after some refused connections."""

from __future__ import annotations

import contextlib
import socket
import threading

LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends a RST


class FlakyProxy:
    def __init__(self, target_host: str, target_port: int, drop_first: int = 0) -> None:
        self.target = (target_host, target_port)
        self.drop_left: float = drop_first
        self.dropped = 0
        self.requests = 0
        self._outage_at: int | None = None
        self._outage_refuse: float = 0
        self._open: set[socket.socket] = set()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage(self, after_requests: int, refuse: int | None = None) -> None:
        """Once `after_requests` more HTTP requests went through, reset every open connection and
        refuse the next `refuse` connections (None: until `heal`)."""
        with self._lock:
            self._outage_at = self.requests + after_requests
            self._outage_refuse = float("inf") if refuse is None else refuse

    def heal(self) -> None:
        with self._lock:
            self.drop_left, self._outage_at = 0, None

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                drop = self.drop_left > 0
                if drop:
                    self.drop_left -= 1
                    self.dropped += 1
            if drop:
                self._reset(client)
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            s.close()

    def _count(self, data: bytes) -> bool:
        """Count request lines going upstream; True if this chunk starts the outage."""
        with self._lock:
            self.requests += data.count(b" HTTP/1.1\r\n")
            if self._outage_at is None or self.requests <= self._outage_at:
                return False
            self._outage_at = None
            self.drop_left = self._outage_refuse
            doomed, self._open = self._open, set()
        for s in doomed:
            self._reset(s)
        return True

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and self._count(data):
                    return  # the request that crossed the line never reaches the server
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.difference_update((src, dst))

    def close(self) -> None:
        self.sock.close()
