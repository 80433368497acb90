"""``agentloop dashboard``: serve the read-only web dashboard of a run's replay store (:mod:`agentloop.dashboard`).

    agentloop dashboard --store runs/eto-20250101-120000            http://127.0.0.1:8765
    agentloop dashboard --store runs/                               every run in runs/, listed at /
    agentloop dashboard --store postgresql://user@db/run --host 0.0.0.0 --token "$(openssl rand -hex 16)"

The server (FastAPI, uvicorn) loads only when the command runs, so ``--help`` stays light.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import click

from agentloop.dashboard.launch import LOCAL_HOSTS, STORE_ENV, TOKEN_ENV


@click.command("dashboard")
@click.option(
    "--store",
    required=True,
    envvar=STORE_ENV,
    help=f"the run's replay store: a run directory, a SQLite file or a URL; or a directory of run directories, "
    f"each listed and shown [env: {STORE_ENV}]",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (not local: needs --token)")
@click.option("--port", default=8765, show_default=True, type=int, help="port to bind")
@click.option(
    "--token",
    default=None,
    envvar=TOKEN_ENV,
    help=f"secret every request must carry (open the URL with ?token=...); required off localhost [env: {TOKEN_ENV}]",
)
@click.option("--exit-with", type=int, default=None, hidden=True, help="stop when the process with this pid is gone")
def dashboard(store: str, host: str, port: int, token: str | None, exit_with: int | None) -> None:
    """A live web dashboard of a run: stages, learning curves, trajectories, pairs, tasks (read-only)."""
    if host not in LOCAL_HOSTS and not token:
        raise click.BadParameter(
            f"binding to {host} exposes the run beyond this machine: give a secret with --token "
            f"(or {TOKEN_ENV}), or keep the default --host 127.0.0.1",
            param_hint="--token",
        )
    import uvicorn

    from agentloop.cli.files import store_url
    from agentloop.dashboard import create_app, create_runs_app
    from agentloop.dashboard.queries import StoreError
    from agentloop.replay.store import STORE_FILE

    hosts = list(LOCAL_HOSTS) if host in LOCAL_HOSTS else None
    runs = Path(store).expanduser()
    if "://" not in store and runs.is_dir() and not (runs / STORE_FILE).exists():  # a directory of runs
        if not any(runs.glob(f"*/{STORE_FILE}")):
            raise click.BadParameter(
                f"{store} is neither a run directory nor a directory of runs (no {STORE_FILE} in it or in its "
                "subdirectories)",
                param_hint="--store",
            )
        app = create_runs_app(runs, token=token, allowed_hosts=hosts)
    else:
        try:
            app = create_app(store_url(store, existing=True), token=token, allowed_hosts=hosts)
        except StoreError as e:
            raise click.ClickException(str(e)) from e
    shown = f"[{host}]" if ":" in host else host
    suffix = "?token=..." if token else ""
    if "://" in store:
        from sqlalchemy.engine import make_url

        store = make_url(store).render_as_string(hide_password=True)
    click.echo(f"agentloop dashboard of {store}: http://{shown}:{port}/{suffix}  (Ctrl-C stops it)")
    if exit_with is not None:  # started by a run: stop with it, even when it was killed
        threading.Thread(target=_exit_with, args=(exit_with,), daemon=True).start()
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("AGENTLOOP_DASHBOARD_LOG", "warning"))


def _exit_with(pid: int) -> None:
    """Stops the server (as Ctrl-C does) once its parent, process ``pid``, is gone: the orphan is adopted by
    another process (its pid cannot be reused meanwhile, as a pid compared with ``os.kill`` could)."""
    while os.getppid() == pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
