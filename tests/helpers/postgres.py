"""A private PostgreSQL server for the tests: `initdb` in a temporary directory, a free port.

Never the machine's own server (5432): each `PostgresServer` has its own data directory, its own
port on 127.0.0.1 and its unix socket in its own directory, and is removed whole at the end.
PostgreSQL refuses to run as root, so when the tests run as root (CI does) every server command
runs as the `postgres` system user (`runuser -u postgres --`, which the Debian package creates),
in a directory that user owns; as any other user it runs as that user.

A test that injects a database fault stops the server the way a crash would
(`stop(mode="immediate")`: no shutdown checkpoint, as `pg_ctl stop -m immediate`) and starts it
again on the same port and data (`start()`); connections in use meanwhile fail, new ones are
refused until it is back.

The binaries are looked up in `$EDGE_AGENT_PG_BIN`, else the newest /usr/lib/postgresql/N/bin
(Debian's layout; `scripts/setup --test` installs the `postgresql` package when missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from helpers.ports import free_port

SERVER_USER = "postgres"
"""The system user the server runs as when the tests run as root."""

SUPERUSER = "postgres"
"""The database superuser that `initdb` creates (authentication: trust, local only)."""


def postgres_bin() -> Path:
    """The directory holding `initdb`, `pg_ctl` and `postgres`.

    Raises FileNotFoundError naming the package to install when there is none.
    """
    configured = os.environ.get("EDGE_AGENT_PG_BIN")
    if configured:
        directory = Path(configured)
        if (directory / "initdb").exists():
            return directory
        raise FileNotFoundError(f"EDGE_AGENT_PG_BIN={configured} holds no initdb")
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise FileNotFoundError(
            "PostgreSQL is not installed (scripts/setup --test installs Debian's `postgresql`)"
        )
    return candidates[-1].parent


class PostgresServer:
    """One PostgreSQL server of the tests' own: made, started, stopped (cleanly or as a crash).

    `durable=False` (the default) runs with `fsync=off`: what a COMMIT returned for is still
    kept across `stop(mode="immediate")` (the WAL is in the kernel's page cache, and only the
    server process dies), and tests are faster. The benchmark passes `durable=True`.

    Use as a context manager (`with PostgresServer() as server:`), or `start()` and
    `close()`. `dsn` is a libpq connection string for psycopg (`psycopg.connect(server.dsn)`),
    `url` the same as a URI (what `--dsn` takes), both over TCP to 127.0.0.1:`port`.
    """

    def __init__(
        self, *, port: int | None = None, durable: bool = False, max_connections: int = 100
    ) -> None:
        self.bin = postgres_bin()
        self.port = port or free_port()
        self.durable = durable
        self.max_connections = max_connections
        self.directory = Path(tempfile.mkdtemp(prefix="edge-agent-pg-"))
        self.data = self.directory / "data"
        self.socket_dir = self.directory
        self.log_path = self.directory / "server.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.directory, SERVER_USER, SERVER_USER)
        self._initialised = False
        self.running = False

    # -- addresses -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """libpq key/value connection string to the `postgres` database over TCP."""
        return self.dsn_for("postgres")

    @property
    def url(self) -> str:
        """`postgresql://` URI to the `postgres` database over TCP."""
        return self.url_for("postgres")

    @property
    def socket_dsn(self) -> str:
        """libpq connection string over the unix socket in the server's own directory."""
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname=postgres"

    def dsn_for(self, database: str) -> str:
        """libpq key/value connection string to `database` over TCP."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def url_for(self, database: str) -> str:
        """`postgresql://` URI to `database` over TCP."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    # -- life cycle ------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        command = [*(["runuser", "-u", SERVER_USER, "--"] if self._as_root else []), *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
        )

    def _initdb(self) -> None:
        result = self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr[-2000:]}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(self.max_connections),
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# edge-agent tests (tests/helpers/postgres.py)\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._initialised = True

    def start(self, timeout: float = 30.0) -> None:
        """Make the cluster on first use, start the server, return once it accepts connections.

        Raises RuntimeError with the end of the server's log when it does not start.
        """
        if not self._initialised:
            self._initdb()
        result = self._run(
            str(self.bin / "pg_ctl"),
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(timeout)),
            timeout=timeout + 10,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port} ({result.returncode}): "
                f"{result.stderr[-1000:]}\n{self.log()[-2000:]}"
            )
        self.running = True

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: `fast` (clean, sessions ended) or `immediate` (as a crash would).

        `immediate` kills every server process without a shutdown checkpoint; the next
        `start()` recovers from the WAL. Does nothing when the server is not running.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown pg_ctl stop mode {mode!r}")
        if not self.running:
            return
        result = self._run(
            str(self.bin / "pg_ctl"),
            "stop",
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            timeout=timeout + 10,
        )
        if result.returncode != 0:
            self._kill_postmaster()
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        """`stop(mode)` then `start()`, on the same port and data."""
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        """The running server's process id (from postmaster.pid), or None."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _kill_postmaster(self) -> None:
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)  # another process's exit: nothing to await

    def create_database(self, name: str) -> str:
        """Create database `name` (an identifier: letters, digits, _) and return its DSN."""
        if not name.replace("_", "").isalnum() or not name[0].isalpha():
            raise ValueError(f"not a plain database name: {name!r}")
        result = self._run(
            str(self.bin / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            "-c",
            f'CREATE DATABASE "{name}"',
        )
        if result.returncode != 0:
            raise RuntimeError(f"CREATE DATABASE {name} failed: {result.stderr.strip()}")
        return self.dsn_for(name)

    def log(self) -> str:
        """The server's log so far (start-up, errors, crash recovery)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the server (immediately: its data is thrown away) and remove its directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
