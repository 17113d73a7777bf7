"""Helpers of the infra tests: warehouse roles from the init SQL, local server processes."""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import POSTGRES_ADMIN_URL

REPO = Path(__file__).parents[2]
ROLES_SQL = REPO / "infra" / "postgres" / "warehouse-roles.sql"
PARTS = ("owner", "scoring", "training")


@dataclass(frozen=True)
class Roles:
    """The warehouse's roles in one database; trust auth on loopback checks no password."""

    names: dict[str, str]
    url: sa.URL

    def url_for(self, part: str) -> str:
        """The warehouse URL of one role (``owner``, ``scoring`` or ``training``)."""
        return self.url.set(username=self.names[part]).render_as_string(hide_password=False)

    def engine(self, part: str) -> sa.Engine:
        return sa.create_engine(self.url_for(part))


def apply_roles_sql(database_url: str, names: dict[str, str]) -> None:
    """Run the init SQL with psql, as the container hook does: names and passwords from env."""
    url = sa.make_url(database_url)
    env = {
        **os.environ,
        "PGHOST": url.host or "127.0.0.1",
        "PGPORT": str(url.port or 5432),
        "PGUSER": url.username or "postgres",
        "PGDATABASE": url.database or "",
    }
    for part, name in names.items():
        env[f"ATP_{part.upper()}_ROLE"] = name
        env[f"ATP_{part.upper()}_PASSWORD"] = secrets.token_urlsafe(12)
    subprocess.run(
        ["psql", "-q", "-f", str(ROLES_SQL)], env=env, check=True, capture_output=True, timeout=60
    )


def drop_roles(admin_url: str, names: list[str]) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in names:
            conn.exec_driver_sql(f'DROP OWNED BY "{name}" CASCADE')
            conn.exec_driver_sql(f'DROP ROLE "{name}"')
    engine.dispose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Service:
    """A server or worker process started by a test, in a process group of its own."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 20, *, must_exit_on_sigterm: bool = True) -> None:
        """SIGTERM to its group; SIGKILL if it does not exit in ``timeout`` seconds, which fails
        the test unless ``must_exit_on_sigterm`` is off (then it is what a Kubernetes grace period
        does, and a warning says so). Either way the message shows the group's processes and
        their Python stacks: SIGABRT before SIGKILL makes faulthandler write them to the log."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self.process.returncode is not None:
            return
        ps = ["ps", "-ww", "-o", "pid,ppid,pgid,stat,etime,args", "-s", str(self.process.pid)]
        group = subprocess.run(ps, capture_output=True, text=True).stdout
        for line in group.splitlines()[1:]:  # one by one: their stacks do not interleave
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGABRT)
            time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)
        message = (
            f"{self.name} ignored SIGTERM for {timeout} s; its processes then:\n{group}"
            f"log ({self.log}):\n{self.tail(200)}"
        )
        if must_exit_on_sigterm:
            pytest.fail(message)
        warnings.warn(message, stacklevel=2)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start(name: str, command: list[str], env: dict[str, str], logs: Path) -> Service:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env={**env, "PYTHONFAULTHANDLER": "1"},  # stacks on SIGABRT (stop)
            stdin=subprocess.DEVNULL,  # not the test process's (under xdist: its channel to pytest)
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    resource.prlimit(process.pid, resource.RLIMIT_CORE, (0, 0))  # its group's SIGABRT: no core
    return Service(name, process, log)


def wait_healthy(service: Service, url: str, timeout: float = 90) -> None:
    """Poll ``url`` until it answers 200; fail with the service's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            code = service.process.returncode
            pytest.fail(f"{service.name} exited with {code}:\n{service.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{service.name} not healthy after {timeout} s:\n{service.tail()}")


def create_database(name: str) -> None:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()


def drop_database(name: str) -> None:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def database_url(driver: str, name: str) -> str:
    url = sa.make_url(POSTGRES_ADMIN_URL).set(drivername=f"postgresql+{driver}", database=name)
    return url.render_as_string(hide_password=False)
