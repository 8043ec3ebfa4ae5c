"""The throwaway PostgreSQL server the ledger's tests run against (tests/pgserver.py)."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import pytest

from tests.pgserver import HOST, SUPERUSER, PostgresServer

pytestmark = pytest.mark.postgres

_seen: list[str] = []


def test_server_listens_on_loopback(postgres_server: PostgresServer) -> None:
    """The server answers on 127.0.0.1 as the superuser, with UTF8 and without fsync."""
    with psycopg.connect(postgres_server.dsn) as conn:
        row = conn.execute(
            "SELECT current_user, inet_server_addr()::text, "
            "pg_encoding_to_char(encoding), current_setting('fsync') "
            "FROM pg_database WHERE datname = current_database()"
        ).fetchone()
    assert row == (SUPERUSER, f"{HOST}/32", "UTF8", "off")


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_a_fresh_database(
    turn: str, pg_url: str, postgres_server: PostgresServer
) -> None:
    """A test's database is new and empty, takes a table and rows; the previous one is gone."""
    assert urlsplit(pg_url).hostname == HOST
    assert urlsplit(pg_url).port == postgres_server.port
    assert pg_url not in _seen
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE topups (row_no integer PRIMARY KEY, amount numeric(12, 2))")
        conn.execute("INSERT INTO topups VALUES (1, 250.00), (2, 10.50)")
    with psycopg.connect(pg_url) as conn:
        total = conn.execute("SELECT sum(amount)::text FROM topups").fetchone()
    assert total == ("260.50",)
    with psycopg.connect(postgres_server.dsn) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert urlsplit(pg_url).path.lstrip("/") in names
    assert not names & {urlsplit(url).path.lstrip("/") for url in _seen}
    _seen.append(pg_url)


def test_server_stops_and_removes_its_folder(postgres_server: PostgresServer) -> None:
    """A second server: stopped and its temporary folder removed on leaving the block."""
    with PostgresServer(binaries=postgres_server.binaries) as server:
        folder = server.folder
        assert folder.is_dir()
        url = server.create_database("mine")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not folder.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
