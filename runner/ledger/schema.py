"""A SQLite ledger's schema: the stamp that says a file is a ledger of a version this code
knows (`application_id`, `user_version`), the migrations that bring an older one up to it,
and SQLite's errors said in a line.

Migrations are runner/migrations/sqlite/NNNN_*.sql; a ledger's version is its last one.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Iterator
from importlib import resources

from runner.errors import LedgerError

# topup-runner's mark in a SQLite file's header (`PRAGMA application_id`): "TPUP".
APPLICATION_ID = 0x54505550
# How long a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 10_000
# What every ledger holds, however old: the tables and columns this code relies on. A file
# without them is not a ledger (or a damaged one), whatever else it holds.
_CORE_COLUMNS = {
    "runs": {"run_key", "provider", "base_url", "job_file", "job_digest", "extra_columns"},
    "rows": {"run_key", "row", "card_id", "amount", "reference", "extra", "status", "attempts"},
    "attempts": {"run_key", "row", "attempt", "card_id", "amount", "sent_at", "outcome"},
}


@functools.cache
def _migrations() -> tuple[tuple[int, str], ...]:
    """The SQLite migrations, `(number, script)` in order: runner/migrations/sqlite/NNNN_*.sql."""
    folder = resources.files("runner.migrations").joinpath("sqlite")
    found = [
        (int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return tuple(sorted(found))


# The schema version of a ledger this code writes (`PRAGMA user_version`): its last migration.
SCHEMA_VERSION = _migrations()[-1][0]


def split_statements(script: str) -> Iterator[str]:
    """The statements of a migration, one by one: `executescript` would commit the
    transaction that makes a migration all or nothing."""
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            yield current
            current = ""


def reason(exc: sqlite3.Error) -> str:
    """SQLite's complaint on one line, with what it means for the ledger."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    code: str = getattr(exc, "sqlite_errorname", "") or ""
    for prefix, meaning in _MEANINGS:
        if code.startswith(prefix):
            return f"{text} ({meaning})"
    return text


_MEANINGS = (
    ("SQLITE_CORRUPT", "the file is damaged: restore the ledger from a backup"),
    ("SQLITE_NOTADB", "the file is damaged or not a ledger: restore the ledger from a backup"),
    ("SQLITE_FULL", "the disk is full: free space, then run again to resume"),
    ("SQLITE_IOERR", "the disk failed to read or write: check it, then run again to resume"),
    ("SQLITE_READONLY", "the ledger cannot be written here"),
    (
        "SQLITE_CANTOPEN",
        "its folder must exist and be writable: SQLite keeps -wal and -shm files beside it",
    ),
    ("SQLITE_BUSY", "another process kept the ledger's write lock too long"),
)


def rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction; an error doing so changes nothing for the caller, who is
    already raising the error that made it fail (SQLite rolls back at close anyway)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))}


def stamp(conn: sqlite3.Connection, name: object) -> int:
    """The schema version of the ledger open on `conn` (0: written before ledgers were
    stamped), or LedgerError if the database is not a ledger this code can use."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app not in (0, APPLICATION_ID) or (app == 0 and version != 0):
        raise LedgerError(
            f"ledger {name}: is the SQLite database of another program (application_id "
            f"{app:#x}, user_version {version}), not a topup-runner ledger: give the ledger "
            "a path of its own"
        )
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {name}: was written by a newer topup-runner (ledger schema {version}; "
            f"this one knows up to {SCHEMA_VERSION}): run it with that version or newer"
        )
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    lacking = [t for t, needed in _CORE_COLUMNS.items() if not needed <= _columns(conn, t)]
    if lacking and app == APPLICATION_ID:
        raise LedgerError(
            f"ledger {name}: is marked as a topup-runner ledger but its {'/'.join(lacking)} "
            "table is missing or incomplete: the file is damaged; restore it from a backup"
        )
    if lacking:
        shown = ", ".join(repr(t) for t in sorted(tables)[:5]) or "none"
        more = f" and {len(tables) - 5} more" if len(tables) > 5 else ""
        raise LedgerError(
            f"ledger {name}: is a SQLite database but not a topup-runner ledger (tables: "
            f"{shown}{more}): restore the ledger from a backup if it was one, or give a path "
            "where no file exists to start a new ledger"
        )
    return int(version)


def apply_migrations(conn: sqlite3.Connection, version: int) -> None:
    """Bring the ledger from schema `version` to this one and stamp it; the caller holds a
    write transaction, so the whole upgrade commits or none of it."""
    if version == 0:
        # The earliest ledgers lack the column migration 0001 indexes.
        columns = _columns(conn, "rows")
        if columns and "provider_ref" not in columns:
            conn.execute("ALTER TABLE rows ADD COLUMN provider_ref TEXT")
    for number, script in _migrations():
        if number > version:
            for statement in split_statements(script):
                conn.execute(statement)
    # PRAGMA takes no parameters: both are integers of this module.
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")


def upgrade(conn: sqlite3.Connection, name: object) -> None:
    """Migrate an older ledger, once, whoever else opens it at the same time."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = stamp(conn, name)  # again, now that no other process can be upgrading it
        if version < SCHEMA_VERSION:
            apply_migrations(conn, version)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
