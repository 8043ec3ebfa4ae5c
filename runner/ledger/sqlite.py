"""The ledger on SQLite: one file, one host (`--ledger PATH`, the default).

WAL mode, synchronous FULL: a committed intent survives power loss. Commits go through the
group commit (`commit.py`) with COMMIT's fsync on the ledger's disk thread, so the event loop
never blocks on the disk. One process at a time may work on a run key: a lock on a byte of
the database file itself says who (`files.lock_run`), whatever name the file is reached by.
A file is opened only if it is a ledger (`files.py`, `schema.py`); every SQLite error
reaches callers as a one-line `LedgerError` naming the ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from runner.domain import JobRow, RowRecord, RowStatus
from runner.errors import LedgerError
from runner.ledger.chain import Query, touched
from runner.ledger.commit import GroupCommitLedger
from runner.ledger.files import (
    RunLock,
    check_writable,
    connect_readonly,
    lock_run,
    open_file,
    os_reason,
)
from runner.ledger.reads import RECORD_COLUMNS, row_record
from runner.ledger.schema import BUSY_TIMEOUT_MS, SCHEMA_VERSION, reason, rollback, stamp, upgrade
from runner.ledger.statements import Statement, iso, money
from runner.ledger.values import ProviderEvent, RunSpec, utcnow
from runner.money import format_amount


class SqliteLedger(GroupCommitLedger):
    """SQLite ledger; use `SqliteLedger.open(path)` and `close()`; writes are async, reads sync."""

    def __init__(
        self,
        path: Path,
        conn: Any,
        *,
        fd: int = -1,
        name: str | None = None,
        readonly: bool = False,
        uri: str | None = None,
    ) -> None:
        super().__init__(str(path) if name is None else name, conn, readonly=readonly)
        self.path = path  # the database's real path: the only name it is opened by
        self._uri = uri  # what other connections open the database by, if not its path
        # The database file, open for writing: run keys are locked on it (`lock`).
        self._fd = fd
        self._readers: set[sqlite3.Connection] = set()  # the connections `records` opened
        self._locks: list[RunLock] = []

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> SqliteLedger:
        """The ledger at `path`, created if no file is there; LedgerError if the file is
        not a ledger, is damaged, is from a newer version, or cannot be written.

        `readonly`: for reading only, where the ledger may not be writable (a read-only
        mount, an auditor's copy). The file is refused as above, but a missing one is a
        LedgerError, never created; an older ledger is read as it is, neither stamped nor
        migrated; no run lock can be taken and nothing written.
        """
        given = Path(path).expanduser()
        fd = -1
        conn: sqlite3.Connection | None = None
        uri: str | None = None
        try:
            real, fd = open_file(given, readonly=readonly)
            if readonly:
                conn, uri = connect_readonly(real, given)
                stamp(conn, given)  # refused as a writable open refuses; older: read as is
            else:
                conn = _connect_writable(real, given)
            if os.fstat(fd)[1:3] != os.stat(real)[1:3]:  # (inode, device)
                raise LedgerError(f"ledger {given}: was replaced while being opened: try again")
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if fd >= 0:
                os.close(fd)  # after SQLite's connection: see `close`
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"ledger {given}: cannot be opened: {reason(exc)}") from None
            if isinstance(exc, OSError):
                raise LedgerError(f"ledger {given}: {os_reason(exc, readonly=readonly)}") from None
            raise
        return cls(real, conn, fd=fd, name=str(given), readonly=readonly, uri=uri)

    def lock(self, run_key: str) -> RunLock:
        """Hold `run_key` for this process until `close` (LedgerLocked if another holds it):
        a byte of the database file itself (`files.lock_run`)."""
        if self.readonly:
            raise self._no_run()
        lock = lock_run(self._fd, self.name, run_key)
        self._locks.append(lock)
        return lock

    def close(self) -> None:
        try:
            for lock in self._locks:
                with contextlib.suppress(OSError):  # closing the descriptor releases it too
                    lock.release()
            self._locks.clear()
            self._disk.stop()
        finally:
            try:
                for reader in list(self._readers):
                    reader.close()
                self._conn.close()
            finally:
                self._close_file()

    def _close_file(self) -> None:
        """Close the descriptor the run locks are on: only once SQLite's connections are.

        POSIX drops every lock a process holds on a file when the process closes *any*
        descriptor of that file. Closing ours first would silently take SQLite's own locks
        away from under its open connection (another process could then checkpoint or reset
        the WAL it is reading). SQLite defers closing its own descriptors for this reason;
        ours waits for its connections to end.
        """
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _error(self, doing: str, exc: sqlite3.Error) -> LedgerError:
        return LedgerError(f"ledger {self.name}: {doing}: {reason(exc)}")

    async def _commit(self, batch: Sequence[Statement]) -> None:
        """One transaction. What may wait, on the ledger's disk thread: the write lock when
        another process holds it, and COMMIT (the fsync). What is only CPU, on the event
        loop: the statements in between.

        On a thread every statement would hand the GIL to the busy event loop and wait for
        it back (up to the 5 ms switch interval each), and every trip to the thread costs
        far more than a statement: a batch is a few dozen statements of microseconds.
        """
        conn = self._conn
        subjects = touched(batch)
        try:
            if not self._begin_at_once():
                await self._disk.run(conn.execute, "BEGIN IMMEDIATE")
            heads = self._chain.lock(_fetcher(conn), {s[1] for s in subjects}, False)
            for sql, params in batch:
                conn.execute(sql, params)
            if heads:
                self._chain.append(_fetcher(self._conn), conn.executemany, subjects, heads)
            await self._disk.run(conn.execute, "COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            raise self._error("write failed", exc) from None
        except LedgerError:
            rollback(conn)
            raise

    def _begin_at_once(self) -> bool:
        """BEGIN IMMEDIATE if no other process holds the write lock; False if one does."""
        conn = self._conn
        conn.execute("PRAGMA busy_timeout=0")
        try:
            conn.execute("BEGIN IMMEDIATE")
            return True
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return False
        finally:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _read_snapshot(self) -> AbstractContextManager[None]:
        return _one_snapshot(self._conn)

    def _select(self, sql: str, params: Sequence[Any] = ()) -> Iterable[tuple[Any, ...]]:
        """The rows a query of the ledger's reads gives (`?` placeholders, portable SQL);
        an error, even one met while iterating (a damaged page), is a LedgerError."""
        try:
            cursor = self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._error("read failed", exc) from None
        return self._rows(cursor)

    def _rows(self, cursor: sqlite3.Cursor) -> Iterator[tuple[Any, ...]]:
        try:
            yield from cursor
        except sqlite3.Error as exc:
            raise self._error("read failed", exc) from None

    def create_run(self, spec: RunSpec, rows: Sequence[JobRow]) -> None:
        """Record a new run and all its rows as not attempted, in one transaction."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT INTO runs (run_key, provider, base_url, job_file, job_digest, "
                "extra_columns, row_count, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    spec.run_key,
                    spec.provider,
                    spec.base_url,
                    spec.job_file,
                    spec.job_digest,
                    json.dumps(list(spec.extra_columns)),
                    spec.row_count,
                    iso(utcnow()),
                ),
            )
            self._conn.executemany(
                "INSERT INTO rows (run_key, row, card_id, amount, reference, extra, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        spec.run_key,
                        r.row,
                        r.card_id,
                        money(r.amount),
                        r.reference,
                        json.dumps(r.extra) if r.extra else "[]",
                        RowStatus.NOT_ATTEMPTED.value,
                    )
                    for r in rows
                ),
            )
            self._chain.start(_fetcher(self._conn), self._conn.executemany, spec.run_key)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(self._conn)
            raise self._error("cannot record the run", exc) from None
        except LedgerError:
            rollback(self._conn)
            raise

    def apply_event(self, event: ProviderEvent) -> tuple[int, bool]:
        """Keep a verified event and settle the pending rows it names, in one transaction.

        Returns (rows settled now, whether the event had been seen before). Rows already
        final are never touched: a duplicate or late event changes nothing.
        """
        now = iso(utcnow())
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            cursor = self._conn.execute(
                "INSERT OR IGNORE INTO provider_events (provider, card_id, amount, provider_ref, "
                "status, fee, balance_after, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.provider,
                    event.card_id,
                    format_amount(event.amount),
                    event.provider_ref,
                    event.status.value,
                    money(event.fee),
                    money(event.balance_after),
                    now,
                ),
            )
            seen = cursor.rowcount == 0
            changed = self._conn.execute(
                # The webhook's fee is unsigned: the topup answer's own fee wins.
                "UPDATE rows SET status = ?, fee = COALESCE(fee, ?), "
                "card_balance_after = COALESCE(?, card_balance_after), finished_at = ?, "
                "error = CASE WHEN ? = 'failed' THEN 'the provider reported the topup failed' "
                "ELSE NULL END "
                "WHERE status = 'pending' AND card_id = ? AND amount = ? AND provider_ref = ? "
                "AND run_key IN (SELECT run_key FROM runs WHERE provider = ?) "
                "RETURNING run_key, row",
                (
                    event.status.value,
                    money(event.fee),
                    money(event.balance_after),
                    now,
                    event.status.value,
                    event.card_id,
                    format_amount(event.amount),
                    event.provider_ref,
                    event.provider,
                ),
            ).fetchall()
            subjects = [("row", run_key, row, None) for run_key, row in changed]
            heads = self._chain.lock(_fetcher(self._conn), {s[1] for s in subjects}, False)
            self._chain.append(_fetcher(self._conn), self._conn.executemany, subjects, heads)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(self._conn)
            raise self._error("cannot record the event", exc) from None
        except LedgerError:
            rollback(self._conn)
            raise
        return len(changed), seen

    def finish_run(self, run_key: str) -> None:
        try:
            self._conn.execute(
                "UPDATE runs SET finished_at = ? WHERE run_key = ?", (iso(utcnow()), run_key)
            )
        except sqlite3.Error as exc:
            raise self._error("write failed", exc) from None

    def records(self, run_key: str, status: RowStatus | None = None) -> Iterator[RowRecord]:
        """Every row of the run (or only those with `status`) in job order, streamed (opens
        its own connection)."""
        try:
            if self._uri is None:
                conn = sqlite3.connect(self.path, check_same_thread=False)
            else:
                conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error("read failed", exc) from None
        self._readers.add(conn)  # closed by `close` before the file's descriptor
        try:
            cursor = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM rows WHERE run_key = ? "
                "AND (? IS NULL OR status = ?) ORDER BY row",
                (
                    run_key,
                    None if status is None else status.value,
                    None if status is None else status.value,
                ),
            )
            for r in cursor:
                try:
                    record = row_record(r)
                except (ValueError, ArithmeticError) as exc:  # Decimal's, JSON's, statuses'
                    raise LedgerError(
                        f"ledger {self.name}: row {r[0]!r} of run {run_key!r} holds what a "
                        f"ledger never writes ({exc}): the file is damaged; restore it from "
                        "a backup"
                    ) from None
                yield record
        except sqlite3.Error as exc:
            raise self._error("read failed", exc) from None
        finally:
            self._readers.discard(conn)
            conn.close()


@contextlib.contextmanager
def _one_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Reads in one transaction: in WAL mode, all of them see the commit the first one saw."""
    began = not conn.in_transaction
    if began:
        conn.execute("BEGIN")
    try:
        yield
    finally:
        if began:
            rollback(conn)  # nothing was written: ending it is all


def _fetcher(conn: sqlite3.Connection) -> Query:
    """Queries on the writing connection, in its transaction: the hash chain's."""
    return lambda sql, params: conn.execute(sql, params).fetchall()


def _connect_writable(real: Path, given: Path) -> sqlite3.Connection:
    """A connection to the ledger at `real`, stamped and migrated to this version, in WAL
    mode, checked to take writes.

    Several processes opening one ledger together may find it busy in ways SQLite's busy
    handler does not wait out (`PRAGMA journal_mode` and WAL recovery answer SQLITE_BUSY at
    once): the whole opening is tried again, for as long as a statement would wait.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.01
    while True:
        try:
            return _connect_writable_once(real, given)
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _connect_writable_once(real: Path, given: Path) -> sqlite3.Connection:
    """One try of `_connect_writable`; the connection is closed if it raises."""
    conn = sqlite3.connect(real, check_same_thread=False, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Looked at before anything is written: another program's database stays as is.
        version = stamp(conn, given)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed intent survives power loss, not only a killed process.
        conn.execute("PRAGMA synchronous=FULL")
        if version < SCHEMA_VERSION:
            upgrade(conn, given)
        check_writable(conn)
    except BaseException:
        conn.close()
        raise
    return conn
