"""The dashboard's Starlette app: HTTP requests in, `launcher.api` calls, HTML (or JSON) out.

Routes
    /                 spend against the caps, and the runs (live)
    /runs/{run_id}    one run: jobs, domains, loss curves, time line, validation, files, cost (live)
    /report           cost by provider / domain / day / run, with a chart (live)
    /offers           offers under the preferences; /plan: a plan preview
    POST /launch      start a run (only with --allow-launch, and the token in the form or a Bearer header)
    /events/...       server-sent events of a live page: its <main> fragment, pushed when it changes
    /api/...          the same data as JSON (the api's models)

A live page's stream calls the api about once a second and pushes the re-rendered fragment only when it
differs from what the page shows (the page sends its fragment's digest). Unknown paths and runs get a
404 page; a refusal (bad input, a cap) a 400 page with its one line; a bug a 500 page, never a traceback.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from launcher import api
from launcher.dashboard import views

log = logging.getLogger("meetara.dashboard")
STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 1.0


def cookie_name(port: int | None) -> str:
    """One cookie per port: two dashboards on one machine keep their own tokens."""
    return f"meetara_dashboard_{port or 0}"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, '[::1]' too) is this machine's loopback."""
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host of a Host header, without its port ('[::1]:8765' -> '::1')."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Gate:
    """Every request passes here first.

    - loopback_only: the Host header must name this machine (a web page elsewhere cannot reach the
      dashboard through DNS rebinding).
    - token: the request carries it as `Authorization: Bearer <token>`, as the dashboard's cookie, or
      once as `?token=`, which sets the cookie (HttpOnly, SameSite=Strict) and redirects to the same
      URL without it. Anything else gets 401."""

    def __init__(self, app: ASGIApp, token: str | None, loopback_only: bool) -> None:
        self.app, self.token, self.loopback_only = app, token, loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.loopback_only and not is_loopback(_host_name(request.headers.get("host", ""))):
            page = views.error_page(400, "Bad host", "this dashboard answers on this machine's loopback only")
            return await HTMLResponse(page, 400)(scope, receive, send)
        if self.token:
            answer = self.check(request)
            if answer is not None:
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)

    def _is(self, given: str | None) -> bool:
        return bool(given) and secrets.compare_digest(str(given).encode(), str(self.token).encode())

    def check(self, request: Request) -> Response | None:
        """None when the request may pass; else the answer (a redirect setting the cookie, or 401)."""
        port = request.url.port or (request.scope.get("server") or (None, None))[1]
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self._is(auth[7:].strip()):
            return None
        if self._is(request.cookies.get(cookie_name(port))):
            return None
        if self._is(request.query_params.get("token")):
            if request.method != "GET":
                return None
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            answer = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), 303)
            answer.set_cookie(cookie_name(port), str(self.token), httponly=True, samesite="strict")
            return answer
        message = (
            "this dashboard needs its token: open the URL it printed (…?token=…) or send a Bearer header"
        )
        if request.url.path.startswith(("/api/", "/events/")):
            return JSONResponse({"error": message}, 401)
        return HTMLResponse(views.error_page(401, "Token needed", message), 401)


def _query(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items() if k not in ("token", "digest")}


def _int(query: dict[str, str], name: str, default: int) -> int:
    try:
        return int(query.get(name) or default)
    except ValueError:
        raise api.BadInput(f"{name} must be a whole number, not {query.get(name)!r}") from None


def _float(query: dict[str, str], name: str, default: float) -> float:
    from train.bounds import finite

    try:
        value = float(query.get(name) or default)
    except ValueError:
        raise api.BadInput(f"{name} must be a number, not {query.get(name)!r}") from None
    return finite(value, name)


def build_app(
    config: Path | None = None,
    token: str | None = None,
    allow_launch: bool = False,
    loopback_only: bool = True,
) -> Starlette:
    """The dashboard app over `launcher.api` (`config`: the preferences file). With `token`, every
    request must carry it; `allow_launch` lets POST /launch start runs (token required: without one it
    stays off); `loopback_only` answers only requests addressed to this machine's loopback names."""
    from sse_starlette.sse import EventSourceResponse
    from starlette.middleware import Middleware

    refusals = api.refusals()

    # ---- what each page shows: api calls (blocking: run in the thread pool) and rendering ----

    def overview_fragment(query: dict[str, str]) -> str:
        runs = api.runs(max_age_s=api.LISTING_MAX_AGE_S)  # the stores' listings shared by open pages
        return views.overview(api.budget(config).model_dump(mode="json"), runs.model_dump(mode="json"))

    def run_fragment(query: dict[str, str], run_id: str) -> str:
        return views.run_page(api.run_detail(run_id, max_age_s=api.LISTING_MAX_AGE_S).model_dump(mode="json"))

    def report_fragment(query: dict[str, str]) -> str:
        rep = api.report(
            query.get("by") or "provider",
            query.get("since"),
            query.get("until"),
            config=config,
            max_age_s=api.LISTING_MAX_AGE_S,
        )
        return views.report_page(rep.model_dump(mode="json"), query)

    def offers_doc(query: dict[str, str]) -> dict[str, Any]:
        providers = [p.strip() for p in query.get("providers", "").split(",") if p.strip()]
        view = api.offers(
            gpu=query.get("gpu") or None,
            spot=True if query.get("spot") else None,
            providers=providers or None,
            live=bool(query.get("live")),
            limit=_int(query, "limit", 25),
            config=config,
        )
        return view.model_dump(mode="json")

    def plan_doc(query: dict[str, str]) -> dict[str, Any]:
        if not query.get("domains"):
            raise api.BadInput("name the domains to plan (domains=all, a category, or names)")
        p = api.plan(
            query["domains"],
            backend=query.get("backend") or None,
            run_id=query.get("run_id") or "default",
            samples=_int(query, "samples", 200),
            epochs=_float(query, "epochs", 2.0),
            config=config,
        )
        return p.model_dump(mode="json")

    def page(title: str, body: str, path: str, live: str | None = None) -> HTMLResponse:
        return HTMLResponse(views.layout(title, body, path=path, live=live, allow_launch=allow_launch))

    def events_url(name: str, query: dict[str, str]) -> str:
        rest = views.query_string(query)
        return f"/events/{name}" + (f"?{rest}" if rest else "")

    # ---- pages ----

    async def home(request: Request) -> Response:
        q = _query(request)
        body = await run_in_threadpool(overview_fragment, q)
        return page("Overview", body, "/", live=events_url("overview", q))

    async def run(request: Request) -> Response:
        run_id, q = request.path_params["run_id"], _query(request)
        body = await run_in_threadpool(run_fragment, q, run_id)
        return page(f"Run {run_id}", body, "/runs", live=events_url(f"runs/{run_id}", q))

    async def report(request: Request) -> Response:
        q = _query(request)
        body = await run_in_threadpool(report_fragment, q)
        return page("Reports", body, "/report", live=events_url("report", q))

    async def offers(request: Request) -> Response:
        q = _query(request)
        body = views.offers_page(await run_in_threadpool(offers_doc, q), q)
        return page("Offers", body, "/offers")

    async def plan(request: Request) -> Response:
        q = _query(request)
        doc, error = None, None
        if q.get("domains"):
            try:
                doc = await run_in_threadpool(plan_doc, q)
            except refusals as e:
                error = api.message(e)
        body = views.plan_page(doc, q, error=error, allow_launch=allow_launch, token=token)
        return page("Plan", body, "/plan")

    async def launch(request: Request) -> Response:
        """Start a run (it spends money): only with --allow-launch, and the token in the form or a Bearer
        header (a cookie alone is not enough: another site's form cannot launch)."""
        form = await request.form()
        auth = request.headers.get("authorization", "")
        given = str(form.get("token") or (auth[7:].strip() if auth.lower().startswith("bearer ") else ""))
        if not allow_launch or not token:
            raise HTTPException(403, "launching is off: start the dashboard with --allow-launch")
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "a launch needs the dashboard's token in the form or a Bearer header")
        q = {k: str(v) for k, v in form.items() if k != "token"}
        if not q.get("domains"):
            raise api.BadInput("name the domains to launch")
        if not q.get("budget"):
            raise api.BadInput("a launch needs a budget: the most it may spend, in dollars")
        started = await run_in_threadpool(
            lambda: api.start_launch(
                q["domains"],
                _float(q, "budget", 0.0),
                backend=q.get("backend") or None,
                run_id=q.get("run_id") or "default",
                samples=_int(q, "samples", 200),
                epochs=_float(q, "epochs", 2.0),
                config=config,
            )
        )
        if request.headers.get("accept", "").startswith("application/json"):
            return JSONResponse(started.model_dump(mode="json"))
        return RedirectResponse(f"/runs/{started.run_id}", 303)

    # ---- live updates ----

    def stream(render: Callable[[], str], request: Request) -> Response:
        """Push `render()` as an 'update' event whenever it changes (checked every POLL_SECONDS); end
        the stream cleanly when the server stops."""
        import anyio

        stopping = anyio.Event()  # set by sse-starlette when uvicorn shuts down

        async def updates() -> AsyncIterator[dict[str, str]]:
            last = request.query_params.get("digest")
            while not stopping.is_set():
                try:
                    html = await run_in_threadpool(render)
                except api.NotFound as e:
                    yield {"event": "gone", "data": str(e)}
                    return
                except refusals as e:
                    html = f'<p class="bad refusal">{escape(api.message(e))}</p>'
                if (d := views.digest(html)) != last:
                    last = d
                    yield {"event": "update", "data": html}
                with anyio.move_on_after(POLL_SECONDS):
                    await stopping.wait()

        return EventSourceResponse(updates(), ping=15, shutdown_event=stopping, shutdown_grace_period=2)

    async def events_overview(request: Request) -> Response:
        q = _query(request)
        return stream(lambda: overview_fragment(q), request)

    async def events_run(request: Request) -> Response:
        q, run_id = _query(request), request.path_params["run_id"]
        await run_in_threadpool(api.load, run_id)  # an unknown run: 404 before the stream starts
        return stream(lambda: run_fragment(q, run_id), request)

    async def events_report(request: Request) -> Response:
        q = _query(request)
        return stream(lambda: report_fragment(q), request)

    # ---- JSON ----

    def json_route(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return JSONResponse(await run_in_threadpool(fn, request))

        return endpoint

    api_routes = [
        Route("/api/budget", json_route(lambda r: api.budget(config).model_dump(mode="json"))),
        Route("/api/runs", json_route(lambda r: api.runs().model_dump(mode="json"))),
        Route(
            "/api/runs/{run_id}",
            json_route(lambda r: api.run_detail(r.path_params["run_id"]).model_dump(mode="json")),
        ),
        Route(
            "/api/report",
            json_route(
                lambda r: api.report(
                    r.query_params.get("by") or "provider",
                    r.query_params.get("since"),
                    r.query_params.get("until"),
                    config=config,
                ).model_dump(mode="json")
            ),
        ),
        Route("/api/offers", json_route(lambda r: offers_doc(_query(r)))),
        Route("/api/plan", json_route(lambda r: plan_doc(_query(r)))),
    ]

    # ---- errors: a page (or JSON under /api/), never a traceback ----

    def error(request: Request, status: int, title: str, message: str) -> Response:
        if request.url.path.startswith(("/api/", "/events/")):
            return JSONResponse({"error": message}, status)
        return HTMLResponse(views.error_page(status, title, message), status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error(request, 404, "Not found", f"nothing at {request.url.path}")
        return error(request, exc.status_code, "Refused" if exc.status_code < 500 else "Not here", exc.detail)

    async def refused(request: Request, exc: Exception) -> Response:
        if isinstance(exc, api.NotFound):
            return error(request, 404, "Not found", str(exc))
        return error(request, 400, "Refused", api.message(exc))

    async def bug(request: Request, exc: Exception) -> Response:
        log.error("dashboard: %s %s failed", request.method, request.url.path, exc_info=exc)
        return error(request, 500, "Something went wrong", f"{type(exc).__name__}: see the dashboard's log")

    handlers: dict[Any, Callable] = {HTTPException: http_error, Exception: bug}
    handlers.update(dict.fromkeys(refusals, refused))
    routes = [
        Route("/", home),
        Route("/runs/{run_id}", run),
        Route("/report", report),
        Route("/offers", offers),
        Route("/plan", plan),
        Route("/launch", launch, methods=["POST"]),
        Route("/events/overview", events_overview),
        Route("/events/runs/{run_id}", events_run),
        Route("/events/report", events_report),
        *api_routes,
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    gate = Middleware(Gate, token=token, loopback_only=loopback_only)
    return Starlette(routes=routes, exception_handlers=handlers, middleware=[gate])
