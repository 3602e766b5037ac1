"""Proxies on 127.0.0.1 in front of a real server.

`FlakyProxy` (TCP) makes network faults the client cannot tell from real ones: the first N connections
reset, an outage that starts after a given number of HTTP requests (open connections are reset, new
ones refused) and ends after some refused connections, or a response cut off mid-body.

`ChecksumRefusingS3` (HTTP) is an S3-compatible server as several are: it answers 501 NotImplemented
to any request that carries boto3's flexible-checksum headers, and forwards the rest to a real one.
`FailingS3` (HTTP) answers 500 to the requests that name a given key and counts them; `S3Proxy` only
counts what goes through."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends a RST


class FlakyProxy:
    def __init__(self, target_host: str, target_port: int, drop_first: int = 0) -> None:
        self.target = (target_host, target_port)
        self.drop_left: float = drop_first
        self.dropped = 0
        self.requests = 0
        self._outage_at: int | None = None
        self._outage_refuse: float = 0
        self._cut_left: int | None = None
        self._cut_every, self._cuts_left = 0, 0
        self.cut = 0
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

    def cut_next_response(self, after_bytes: int, times: int = 1) -> None:
        """Reset the connection once `after_bytes` more bytes went back to the client: the next
        response (headers and the start of its body) arrives cut off, as when a link drops mid-read;
        `times` such cuts in a row (each after `after_bytes` more)."""
        with self._lock:
            self._cut_left, self._cut_every, self._cuts_left = after_bytes, after_bytes, times - 1

    def _cut(self, data: bytes) -> bytes | None:
        """The part of a downstream chunk to pass on before the cut, or None when there is no cut."""
        with self._lock:
            if self._cut_left is None:
                return None
            if len(data) < self._cut_left:
                self._cut_left -= len(data)
                return None
            head, self._cut_left = data[: self._cut_left], None
            self.cut += 1
            if self._cuts_left > 0:
                self._cut_left, self._cuts_left = self._cut_every, self._cuts_left - 1
            return head

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
                head = None if upstream else self._cut(data)
                if head is not None:
                    dst.sendall(head)
                    return  # the finally below closes both ends: the body stops short
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


CHECKSUM_HEADERS = ("x-amz-checksum-", "x-amz-sdk-checksum-algorithm", "x-amz-trailer")
NOT_IMPLEMENTED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code><Message>A header you'
    b" provided implies functionality that is not implemented</Message></Error>"
)


class S3Proxy:
    """An HTTP proxy in front of a real S3 server, recording every request ("METHOD /path?query") in
    `requests`; a subclass answers some itself (`_answer`: a status and an XML error body, or None to
    forward), counted in `refused`, the rest in `forwarded`."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        proxy = self
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.forwarded = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests.append(f"{self.command} {self.path}")
                answer = proxy._answer(self)
                if answer is not None:
                    status, error = answer
                    with proxy._lock:
                        proxy.refused.append(f"{self.command} {self.path}")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    self.close_connection = True
                    return
                with proxy._lock:
                    proxy.forwarded += 1
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding", "content-length", "date"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer(self, request: BaseHTTPRequestHandler) -> tuple[int, bytes] | None:
        return None

    def lists(self) -> int:
        """ListObjectsV2 requests so far."""
        with self._lock:
            return sum(r.startswith("GET ") and "list-type=2" in r for r in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ChecksumRefusingS3(S3Proxy):
    """Refuses checksum headers with a 501, as several S3-compatible servers do."""

    def _answer(self, request: BaseHTTPRequestHandler) -> tuple[int, bytes] | None:
        names = [k.lower() for k in request.headers]
        return (501, NOT_IMPLEMENTED) if any(n.startswith(CHECKSUM_HEADERS) for n in names) else None


INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>We encountered an'
    b" internal error. Please try again.</Message></Error>"
)


class FailingS3(S3Proxy):
    """Answers 500 InternalError (a transient error, to be retried) to every request whose path or query
    contains `marker`, and counts them in `refused`; forwards the rest."""

    def __init__(self, target: str, marker: str) -> None:
        self.marker = marker
        super().__init__(target)

    def _answer(self, request: BaseHTTPRequestHandler) -> tuple[int, bytes] | None:
        return (500, INTERNAL_ERROR) if self.marker in request.path else None
