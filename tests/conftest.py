"""Shared test configuration: anyio on asyncio for every async test, and a real PostgreSQL.

`postgres_server` starts one throwaway server for the session, the first time a test asks for
it; `pg_url` gives each test a fresh empty database on it. Tests that use either are marked
`postgres` (`pytest -m "not postgres"` runs the SQLite suite alone). Without PostgreSQL they
skip, unless TOPUP_REQUIRE_POSTGRES=1 (as in CI), where they fail instead.
"""

from __future__ import annotations

import compileall
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.alix import Keys, new_keys, partner_env
from tests.pgserver import PostgresServer, PostgresUnavailable

REQUIRE_POSTGRES = "TOPUP_REQUIRE_POSTGRES"


def pytest_configure(config: pytest.Config) -> None:
    """Compile `runner` once, before any test starts a `topup-runner` process: where
    PYTHONDONTWRITEBYTECODE is set (as on this project's machines), an editable install is
    otherwise compiled from source by every one of the suite's hundreds of such processes
    (a quarter of a second each)."""
    if not hasattr(config, "workerinput"):  # the controlling process only, not each worker
        compileall.compile_dir(Path(__file__).parents[1] / "runner", quiet=1)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one test process more than the cores, at most four. Most tests spend much
    of their time waiting on a subprocess or a sandbox's timer, so a third process keeps two
    cores busy: the suite took 226 s with three against 267 s with two, in one sitting."""
    return min(4, (os.cpu_count() or 1) + 1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "postgres_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session, on 127.0.0.1."""
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_POSTGRES) == "1":
            pytest.fail(f"{REQUIRE_POSTGRES}=1 but {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh empty database for this test alone; its URL (dropped after the test)."""
    url = postgres_server.create_database(prefix=request.node.name)
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(scope="session")
def keys() -> Keys:
    """The partner's and Alix's RSA key pairs (two 2048-bit keys: made once a session)."""
    return new_keys()


@pytest.fixture
def alix_env(tmp_path: Path, keys: Keys) -> dict[str, str]:
    """A partner's environment for an Alix run, its key files in this test's folder."""
    return partner_env(tmp_path, keys)
