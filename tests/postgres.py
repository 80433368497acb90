"""A throwaway PostgreSQL server for tests: ``initdb`` into a temp dir, ``pg_ctl`` on a loopback port.

The server runs as the invoking user, or as user ``postgres`` when that is root (PostgreSQL
refuses to run as root). It listens on 127.0.0.1 on a free port and on a unix socket in its
own directory, trusts local connections, and skips fsync: it is for tests only.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from localnet import free_port

logger = logging.getLogger(__name__)

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
SERVICE_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a throwaway PostgreSQL server (the message says why)."""


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None.

    Looks at ``pg_config --bindir``, then ``/usr/lib/postgresql/*/bin`` (newest first), then PATH.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=_version_key, reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in SERVER_PROGRAMS):
            return bindir
    return None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


class PostgresServer:
    """One PostgreSQL server in a temporary directory; :meth:`stop` removes everything."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = 0
        self._base: Path | None = None
        self._prefix: list[str] = []

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the server's default ``postgres`` database."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        """SQLAlchemy URL of database ``name`` on this server."""
        return f"postgresql+psycopg2://{SERVICE_USER}@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        """Creates a cluster and starts the server (under 2 s on a small machine).

        Raises:
            PostgresUnavailable: If we are root and there is no ``postgres`` user.
            RuntimeError: If initdb or the server fails; the message holds its output.
        """
        self._prefix = _run_as_prefix()
        self._base = Path(tempfile.mkdtemp(prefix="agentloop-pg-"))
        if self._prefix:
            user = pwd.getpwnam(SERVICE_USER)
            os.chown(self._base, user.pw_uid, user.pw_gid)
        data = self._base / "data"
        self._run("initdb", "-D", str(data), "-U", SERVICE_USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        for attempt in range(3):
            self.port = free_port()
            options = f"-h 127.0.0.1 -p {self.port} -k {self._base} -F"
            try:
                self._run("pg_ctl", "-D", str(data), "-l", str(self._base / "server.log"), "-w", "-o", options, "start")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                logger.warning("postgres did not start on port %d; retrying on another port", self.port)
        logger.info("postgres running on 127.0.0.1:%d (data in %s)", self.port, data)

    def create_database(self, name: str) -> str:
        """Creates an empty database and returns its SQLAlchemy URL."""
        import psycopg2

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"not a plain lower-case identifier: {name!r}")
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=SERVICE_USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return self.database_url(name)

    def stop(self) -> None:
        """Stops the server (fast shutdown) and deletes its directory."""
        if self._base is None:
            return
        data = self._base / "data"
        if (data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self._base, ignore_errors=True)
        self._base = None

    def _run(self, program: str, *args: str) -> None:
        command = [*self._prefix, str(self.bindir / program), *args]
        done = subprocess.run(command, cwd=self._base, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self._base / "server.log" if self._base else None
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}")


def _run_as_prefix() -> list[str]:
    """The command prefix that drops root to the ``postgres`` user (empty when not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root and there is no {SERVICE_USER!r} user to run the server") from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", SERVICE_USER, "--"]
    setpriv = shutil.which("setpriv")
    if setpriv:
        user = pwd.getpwnam(SERVICE_USER)
        return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    raise PostgresUnavailable("running as root and neither runuser nor setpriv is available")
