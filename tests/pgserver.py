"""A real, throwaway PostgreSQL server for tests and benchmarks, on 127.0.0.1 only.

`PostgresServer` runs initdb in a temporary folder, starts `postgres` on a free loopback port,
hands out a fresh database per test, and on the way out stops the server and removes the folder,
whatever happened. Nothing here is part of the runner: it is test infrastructure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

HOST = "127.0.0.1"
SUPERUSER = "topup"
# Where Debian puts each major version's server binaries, which are not on PATH there.
DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"
# PostgreSQL refuses to run as root; as root, its processes run as the first of these users.
UNPRIVILEGED_USERS = ("postgres", "nobody")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3  # a free port may be taken by someone else before postgres binds it

# For tests only: a crash may lose the last commits or the whole cluster, which a throwaway
# server does not care about, and every commit no longer waits for a disk flush.
TEST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (or no psycopg) here: tests that need one cannot run."""


class PostgresStartError(RuntimeError):
    """The binaries are there, but the server would not initialise, start or answer."""


@dataclass(frozen=True, slots=True)
class Binaries:
    """The server programs of one PostgreSQL installation."""

    bindir: Path

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"


def _is_bindir(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres"))


def _major(folder: Path) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin: the newest version sorts last."""
    return tuple(int(part) for part in re.findall(r"\d+", folder.parent.name))


def find_binaries() -> Binaries:
    """initdb and postgres from PATH, else the newest of Debian's /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        # Debian's wrappers and hand-made symlinks point into the real bin folder.
        for folder in (Path(on_path).resolve().parent, Path(on_path).parent):
            if _is_bindir(folder):
                return Binaries(folder)
    candidates = sorted(
        (folder for folder in Path("/").glob(DEBIAN_GLOB.lstrip("/")) if _is_bindir(folder)),
        key=_major,
    )
    if candidates:
        return Binaries(candidates[-1])
    raise PostgresUnavailable(
        "no PostgreSQL server found (initdb and postgres, on PATH or in "
        f"{DEBIAN_GLOB}): install Debian's postgresql package"
    )


def _psycopg() -> ModuleType:
    """psycopg, imported when a server is wanted: the SQLite suite runs without it."""
    try:
        import psycopg
    except ImportError as exc:
        raise PostgresUnavailable(
            "psycopg is not installed: pip install -e '.[test]' (or '.[postgres]')"
        ) from exc
    return psycopg


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class _RunAs:
    """Who the server's processes run as: ourselves, or an unprivileged user when we are root."""

    name: str | None = None
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_server(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls()
        for name in UNPRIVILEGED_USERS:
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return cls(name, entry.pw_uid, entry.pw_gid)
        raise PostgresUnavailable(
            "running as root, which PostgreSQL refuses, and no unprivileged user to run it as "
            f"(tried {', '.join(UNPRIVILEGED_USERS)})"
        )

    def own(self, *paths: Path) -> None:
        if self.uid is not None and self.gid is not None:
            for path in paths:
                os.chown(path, self.uid, self.gid)

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        # Drop root's groups too, not only its user id.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


class PostgresServer:
    """One throwaway server: `with PostgresServer() as server: server.create_database()`.

    `start()` and `stop()` are there for fixtures that outlive a `with` block; `stop()` is safe
    to call more than once and after a failed start.
    """

    def __init__(
        self, binaries: Binaries | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        self._binaries = binaries
        self._settings = {**TEST_SETTINGS, **(settings or {})}
        self._folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._run_as = _RunAs()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._process is not None else "stopped"
        return f"<PostgresServer {state} folder={self._folder}>"

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None or self._process is None:
            raise PostgresStartError("the server is not running")
        return self._port

    @property
    def binaries(self) -> Binaries:
        """The installation it runs from (found on `start()` unless given)."""
        if self._binaries is None:
            raise PostgresStartError("the server has not been started")
        return self._binaries

    @property
    def folder(self) -> Path:
        """The temporary folder holding the cluster, its sockets and its log."""
        if self._folder is None:
            raise PostgresStartError("the server is not running")
        return self._folder

    @property
    def dsn(self) -> str:
        """The server's own `postgres` database, as the superuser."""
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{database}"

    # -- databases ---------------------------------------------------------------------------

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database named `prefix` plus a random suffix; returns its URL."""
        name = _database_name(prefix)
        self._execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url_or_name: str) -> None:
        """Drop it, closing whatever connections a test left open to it."""
        name = url_or_name.rsplit("/", 1)[-1]
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _execute(self, statement: str) -> None:
        psycopg = _psycopg()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement)

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """initdb in a temporary folder, then start and wait until it accepts connections."""
        if self._process is not None:
            raise PostgresStartError("the server is already running")
        binaries = self._binaries = self._binaries or find_binaries()
        _psycopg()
        self._run_as = _RunAs.for_server()
        try:
            self._folder = Path(tempfile.mkdtemp(prefix="topup-pg-"))
            data, sockets = self._folder / "data", self._folder / "sockets"
            sockets.mkdir()
            self._run_as.own(self._folder, sockets)
            self._initdb(binaries, data)
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self._launch(binaries, data, sockets)
                    return
                except _PortTaken:
                    if attempt == START_ATTEMPTS:
                        raise PostgresStartError(
                            f"no free port after {START_ATTEMPTS} attempts"
                        ) from None
        except BaseException:
            self.stop()
            raise

    def _initdb(self, binaries: Binaries, data: Path) -> None:
        assert self._folder is not None
        command = [
            str(binaries.initdb),
            "--pgdata",
            str(data),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        ]
        done = subprocess.run(
            command,
            cwd=self._folder,
            env=_server_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            **self._run_as.popen_kwargs(),
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise PostgresStartError(f"initdb exited with {done.returncode}: {output}")

    def _launch(self, binaries: Binaries, data: Path, sockets: Path) -> None:
        assert self._folder is not None
        port = _free_port()
        settings = {
            **self._settings,
            "listen_addresses": HOST,
            "port": str(port),
            "unix_socket_directories": str(sockets),
        }
        command = [str(binaries.postgres), "-D", str(data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        log = self._folder / f"postgres-{port}.log"
        with log.open("wb") as out:
            # Its own session: a Ctrl-C in the terminal reaches pytest, which stops it in order.
            process = subprocess.Popen(
                command,
                cwd=self._folder,
                env=_server_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._run_as.popen_kwargs(),
            )
        self._process, self._port = process, port
        self._wait_ready(log)

    def _wait_ready(self, log: Path) -> None:
        assert self._process is not None
        psycopg = _psycopg()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            code = self._process.poll()
            if code is not None:
                self._process = None
                output = log.read_text(errors="replace").strip()
                if "could not bind" in output or "Address already in use" in output:
                    raise _PortTaken
                raise PostgresStartError(f"postgres exited with {code}: {output}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise PostgresStartError(
                        f"postgres did not accept connections within {READY_TIMEOUT:g} s: "
                        f"{log.read_text(errors='replace').strip()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (immediate, then kill, if it hangs); remove the folder."""
        process, self._process = self._process, None
        try:
            if process is not None:
                _shut_down(process)
        finally:
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None


class _PortTaken(Exception):
    """postgres could not bind the port it was given: try another."""


def _shut_down(process: subprocess.Popen[bytes]) -> None:
    # SIGINT is PostgreSQL's "fast" shutdown, SIGQUIT its "immediate" one.
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
    process.wait()


def _server_env() -> dict[str, str]:
    """The caller's environment without libpq's PG* settings, which would redirect initdb."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _database_name(prefix: str) -> str:
    """A valid, unquoted-safe identifier under PostgreSQL's 63-byte limit, unique per call."""
    clean = re.sub(r"[^a-z0-9_]+", "_", prefix.lower()).strip("_") or "test"
    return f"{clean[:50]}_{secrets.token_hex(4)}"


@contextlib.contextmanager
def running_server(settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """A started server for the length of the block, stopped and removed after it."""
    with PostgresServer(settings=settings) as server:
        yield server
