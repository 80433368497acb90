"""``agentloop dashboard``: a read-only web app over a run's replay store that stays live while the run writes.

:func:`create_app` builds the app (:mod:`agentloop.dashboard.app`); :mod:`agentloop.dashboard.queries` holds
the SQL. The server libraries (FastAPI, Starlette, uvicorn, Jinja2) load only with these modules, never with
``import agentloop`` or the CLI's ``--help``. Chart.js (MIT) is vendored under ``static/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from fastapi import FastAPI


def create_app(store_url: str, token: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The dashboard app over the replay store at ``store_url`` (see :func:`agentloop.dashboard.app.create_app`)."""
    from agentloop.dashboard.app import create_app as build

    return build(store_url, token=token, allowed_hosts=allowed_hosts)


def create_runs_app(directory: Path, token: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The dashboards of every run in ``directory`` (see :func:`agentloop.dashboard.app.create_runs_app`)."""
    from agentloop.dashboard.app import create_runs_app as build

    return build(directory, token=token, allowed_hosts=allowed_hosts)


__all__ = ["create_app", "create_runs_app"]
