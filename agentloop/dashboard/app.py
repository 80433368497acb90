"""The dashboard's web app: FastAPI routes over :class:`agentloop.dashboard.queries.StoreReader`, Jinja2 pages.

Pages (HTML) and their data (JSON)::

    /                          run view: stages, progress, per-iteration per-env figures, charts (live)
    /fragments/run             the run view's tables alone (what the live update swaps in)
    /api/run                   the run view's data: stages, progress, learning curves
    /api/version               a fingerprint that changes whenever the run writes (polled by the pages)
    /trajectories              trajectory browser (filters: stage, iteration, env, task_id, success,
                               source, policy_version; ``before=<id>`` pages back)
    /trajectories/{id}         one trajectory turn by turn
    /pairs, /pairs/{id}        pair list; one pair side by side
    /tasks/{env}/{task_id}     one task's attempts across rounds

Over a directory of runs (:func:`create_runs_app`): ``/`` lists the runs (each a subdirectory holding a
``replay.db``, looked for again on every visit, so a run started meanwhile appears) and ``/runs/<name>/`` is
that run's dashboard, with the pages above.

Safety: the store is read-only (see :mod:`agentloop.dashboard.queries`); Jinja2 escapes every value (agent
output is untrusted text: it lands in ``<pre>`` as text) and a Content-Security-Policy allows only the
dashboard's own scripts, so even markup that slipped through could not run. With a token, every request must
carry it (``Authorization: Bearer``, or ``?token=`` once, which sets a cookie).
"""

from __future__ import annotations

import math
import re
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import URL
from starlette.concurrency import run_in_threadpool

from agentloop.dashboard.queries import PAGE_SIZE, StoreError, StoreReader, parse_filters
from agentloop.replay.store import STORE_FILE

HERE = Path(__file__).parent
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""The names of the runs a dashboard over a directory serves (what agentloop names runs: ``eto-20261122-010203``)."""
COOKIE = "agentloop_dashboard_token"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_app(
    store_url: str | URL, token: str | None = None, allowed_hosts: list[str] | None = None, runs_url: str | None = None
) -> FastAPI:
    """The dashboard over the replay store at ``store_url``, opened read-only.

    Args:
        store_url: A SQLAlchemy URL of a replay store (SQLite or PostgreSQL).
        token: When given, every request must carry it (bind to a non-local address only with one).
        allowed_hosts: When given, requests naming another ``Host`` are refused (DNS rebinding).
        runs_url: The list of runs this dashboard is one of (:func:`create_runs_app`), linked from every page.

    Raises:
        agentloop.dashboard.queries.StoreError: If no readable replay store is there.
    """
    reader = StoreReader(store_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        reader.close()

    app, templates = _app(lifespan, token, allowed_hosts, store=_shown(store_url), runs_url=runs_url)
    app.state.reader = reader

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context)

    @app.get("/", response_class=HTMLResponse)
    def run_view(request: Request) -> HTMLResponse:
        return page(request, "run.html", run=reader.run())

    @app.get("/fragments/run", response_class=HTMLResponse)
    def run_fragment(request: Request) -> HTMLResponse:
        return page(request, "_run_body.html", run=reader.run())

    @app.get("/api/run")
    def run_data() -> JSONResponse:
        return JSONResponse(_finite(reader.run()))

    @app.get("/api/version")
    def version() -> JSONResponse:
        return JSONResponse({"version": reader.version()})

    @app.get("/trajectories", response_class=HTMLResponse)
    def trajectories(request: Request, before: int | None = None) -> HTMLResponse:
        query = dict(request.query_params)
        try:
            filters = parse_filters(query)
        except ValueError as e:
            raise HTTPException(400, f"bad filter: {e}") from e
        rows = reader.trajectories(filters, before)
        shown = {k: v for k, v in query.items() if k != "before" and v}
        older = urlencode({**shown, "before": rows[-1].id}) if len(rows) == PAGE_SIZE else None
        return page(
            request, "trajectories.html", rows=rows, options=reader.options(), query=shown, older=older, before=before
        )

    @app.get("/trajectories/{trajectory_id}", response_class=HTMLResponse)
    def trajectory(request: Request, trajectory_id: int) -> HTMLResponse:
        found = reader.trajectory(trajectory_id)
        if found is None:
            raise HTTPException(404, f"no trajectory {trajectory_id}")
        return page(request, "trajectory.html", t=found)

    @app.get("/pairs", response_class=HTMLResponse)
    def pairs(request: Request, stage: str = "", env: str = "", before: int | None = None) -> HTMLResponse:
        rows = reader.pairs(stage or None, env or None, before)
        shown = {k: v for k, v in {"stage": stage, "env": env}.items() if v}
        older = urlencode({**shown, "before": rows[-1].id}) if len(rows) == PAGE_SIZE else None
        return page(request, "pairs.html", rows=rows, query=shown, older=older)

    @app.get("/pairs/{pair_id}", response_class=HTMLResponse)
    def pair(request: Request, pair_id: int) -> HTMLResponse:
        found = reader.pair(pair_id)
        if found is None:
            raise HTTPException(404, f"no pair {pair_id}")
        return page(request, "pair.html", p=found)

    @app.get("/tasks/{env}/{task_id:path}", response_class=HTMLResponse)
    def task(request: Request, env: str, task_id: str) -> HTMLResponse:
        rows = reader.task(env, task_id)
        if not rows:
            raise HTTPException(404, f"no attempt of task {env}/{task_id}")
        return page(request, "task.html", env_name=env, task_id=task_id, rows=rows)

    return app


def create_runs_app(directory: Path, token: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The dashboards of the runs in ``directory``: its subdirectories holding a ``replay.db``, listed at ``/``
    with their stages and latest held-out success, each run's dashboard (:func:`create_app`) under
    ``/runs/<name>/``. A run's store is opened read-only on its first visit.

    Args:
        directory: A directory of run directories (``runs/``, an ablation's ``--out``).
        token: When given, every request must carry it (bind to a non-local address only with one).
        allowed_hosts: When given, requests naming another ``Host`` are refused (DNS rebinding).
    """
    directory = Path(directory).resolve()
    opened: dict[str, tuple[int, FastAPI]] = {}  # name -> (its store file's inode, its app)
    lock = threading.Lock()

    def runs() -> dict[str, Path]:
        """The runs by name: subdirectories named :data:`RUN_NAME` whose store file, links resolved, is inside."""
        found = {}
        for store in sorted(directory.glob(f"*/{STORE_FILE}")):
            name = store.parent.name
            if RUN_NAME.fullmatch(name) and store.is_file() and store.resolve().is_relative_to(directory):
                found[name] = store
        return found

    def dashboard(name: str, found: dict[str, Path] | None = None) -> FastAPI | None:
        """The run's app, opened on its first visit and again when its store file was replaced; None when gone.
        ``found``: the runs, when just listed.

        Raises:
            StoreError: If the run's store cannot be read (yet).
        """
        store = (runs() if found is None else found).get(name)
        with lock:
            cached = opened.pop(name, None)
            if cached is not None and store is not None and cached[0] == store.stat().st_ino:
                opened[name] = cached
                return cached[1]
            if cached is not None:  # deleted, or replaced by another run of that name
                cached[1].state.reader.close()
            if store is None:
                return None
            app = create_app(URL.create("sqlite", database=str(store)), token, allowed_hosts, "/")
            opened[name] = (store.stat().st_ino, app)
            return app

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        with lock:
            for _, run in opened.values():
                run.state.reader.close()

    app, templates = _app(lifespan, token, allowed_hosts, store=str(directory), runs_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        listed, shown = runs(), []
        for name in listed:  # each opened now: the list shows their stages
            try:
                shown.append(_summary(name, dashboard(name, listed)))
            except StoreError as e:  # another schema, a file being created: listed, not linked
                shown.append({"name": name, "error": str(e)})
        return templates.TemplateResponse(request, "runs.html", {"runs": shown, "directory": str(directory)})

    async def run_dashboard(scope: Any, receive: Any, send: Any) -> None:
        """Hands a request under ``/runs/<name>/`` to that run's app, as its own root (its links carry the
        prefix; its routes, not this app's, resolve them)."""
        name = scope["path_params"]["name"]
        try:
            found = await run_in_threadpool(dashboard, name)
        except StoreError as e:
            await PlainTextResponse(str(e), status_code=503)(scope, receive, send)
            return
        if found is None:
            await PlainTextResponse(f"no run {name!r} in {directory}", status_code=404)(scope, receive, send)
            return
        inner = {k: v for k, v in scope.items() if k not in ("app", "router", "endpoint", "path_params")}
        inner["app_root_path"] = scope["root_path"]
        await found(inner, receive, send)

    app.mount("/runs/{name}", app=run_dashboard, name="run_dashboard")
    return app


def _app(
    lifespan: Any, token: str | None, allowed_hosts: list[str] | None, **page_globals: Any
) -> tuple[FastAPI, Jinja2Templates]:
    """A dashboard app (no API docs; static files; guarded) and its templates (escaping, filters, ``page_globals``)."""
    app = FastAPI(title="agentloop dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html templates
    templates.env.autoescape = True
    templates.env.filters.update(pct=_pct, num=_num, when=_when, duration=_duration)
    templates.env.globals.update(page_size=PAGE_SIZE, **page_globals)
    _guard(app, token, allowed_hosts)
    return app, templates


def _summary(name: str, run: FastAPI | None) -> dict[str, Any]:
    """What the list of runs shows of one: its stages, what runs now, its latest held-out success per env."""
    if run is None:
        return {"name": name, "error": "gone"}
    stages = run.state.reader.stages()
    done = [s for s in stages if s.position is not None]
    evals = [s for s in done if s.family == "eval" and s.envs]
    return {
        "name": name,
        "stages": len(done),
        "last": done[-1] if done else None,
        "running": [s.name for s in stages if s.position is None],
        "stopped": run.state.reader.stopped_since() is not None,
        "eval": evals[-1] if evals else None,
    }


def _guard(app: FastAPI, token: str | None, allowed_hosts: list[str] | None) -> None:
    """Security headers on every response; the token (and the Host check) before every request."""

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        refused = _refusal(request, token, allowed_hosts)
        if refused is None:
            response = await call_next(request)
        else:
            response = refused
        response.headers.update(SECURITY_HEADERS)
        return response


def _refusal(request: Request, token: str | None, allowed_hosts: list[str] | None) -> Response | None:
    """The response refusing ``request``, or None when it may proceed."""
    if allowed_hosts is not None and request.url.hostname not in allowed_hosts:
        return PlainTextResponse("unknown host", status_code=400)
    if token is None:
        return None
    given = request.query_params.get("token")
    if given is not None and secrets.compare_digest(given.encode(), token.encode()):
        kept = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(kept)}" if kept else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response
    header = request.headers.get("authorization", "")
    offered = header.removeprefix("Bearer ") if header.startswith("Bearer ") else request.cookies.get(COOKIE, "")
    if secrets.compare_digest(offered.encode(), token.encode()):
        return None
    return PlainTextResponse("a token is required: open the dashboard's URL with ?token=...", status_code=401)


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _shown(url: str | URL) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _pct(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
