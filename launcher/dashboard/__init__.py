"""`meetara dashboard`: a local web app over `launcher.api` (Starlette + uvicorn, live updates by
server-sent events, every script and style shipped in the package: it works offline).

Read-only unless started with `allow_launch`; bound to the loopback unless told otherwise, and then
only with a token. `serve` is what the CLI command calls; `app.build_app` builds the ASGI app."""

from __future__ import annotations

import secrets
from pathlib import Path

from train import BadInput

__all__ = ["Refused", "serve"]


class Refused(BadInput):
    """The dashboard will not start (a host other than the loopback without a token, a busy port); its
    `str()` is the one line to print after "error: "."""


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    config: Path | None = None,
    token: str | None = None,
    allow_launch: bool = False,
) -> None:
    """Serve the dashboard until interrupted; prints its URL (with the token, if any) on stdout first.

    A `host` other than the loopback needs a `token`; `allow_launch` without one makes one up. Port 0
    takes a free port (the printed URL names it). Raises `Refused` before listening when it cannot."""
    import socket

    from launcher.dashboard.app import build_app, is_loopback

    loopback = is_loopback(host)
    if not loopback and not token:
        raise Refused(
            f"--host {host} would let other machines in: give a --token, or bind to 127.0.0.1 (the default)"
        )
    if token is not None and not token.strip():
        raise Refused("--token is empty")
    if allow_launch and not token:
        token = secrets.token_urlsafe(18)
    bare = host.strip("[]")
    try:
        info = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise Refused(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    shown = f"[{bare}]" if ":" in bare else bare
    url = f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    mode = "launching enabled (needs the token)" if allow_launch else "read-only"
    print(f"meetara dashboard ({mode}): {url}", flush=True)
    _run(build_app(config, token, allow_launch, loopback_only=loopback), sock)


def _run(app, sock) -> None:
    """uvicorn on an already listening socket, quiet but for warnings; Ctrl-C stops it."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="off"
        )
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
