"""The ledger on PostgreSQL, shared by every worker of a run (`--ledger postgresql://...`).

The same ledger as `SqliteLedger`: the same tables, the same statements
(their `?` become psycopg's `%s`), the same group commit. What differs is that several
`topup-runner run` processes, on one host or many, work on one run together. They claim the
run's cards in small batches (`FOR UPDATE SKIP LOCKED`) under leases they keep renewing: a
card belongs to one worker at a time, so its cooldown holds across hosts and no row of it is
ever sent by two workers. A worker that dies stops renewing; once its leases expire another
worker takes its cards, and reconciles the attempts it left open exactly as a resumed run
does. The provider's rate limit is shared through `run_pace`: request slots on the database's
clock, reserved a few at a time, so that three workers together send no faster than one may.
Leases and slots are `leases.py`'s; this module is the storage.

psycopg 3's connection is used from worker threads (`call`, the commit), as the SQLite
connection is: the event loop never waits on the database.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from importlib import resources
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from runner.domain import JobRow, RowRecord, RowStatus
from runner.errors import LedgerError
from runner.ledger.chain import touched
from runner.ledger.commit import GroupCommitLedger
from runner.ledger.leases import CardLeases
from runner.ledger.location import redact
from runner.ledger.reads import RECORD_COLUMNS, row_record
from runner.ledger.statements import Statement, money
from runner.ledger.values import ProviderEvent, RunSpec
from runner.money import format_amount

try:  # an optional dependency: `pip install 'topup-runner[postgres]'`
    import psycopg
except ImportError:  # pragma: no cover  (the test extra installs it)
    psycopg = None  # type: ignore[assignment]

_MIGRATIONS = "runner.migrations"
# Taken while migrations are applied, so that workers starting together apply them once.
_MIGRATION_LOCK = 0x746F7075  # "topu"
# Times a commit is tried again after PostgreSQL rolled it back to break a deadlock.
COMMIT_RETRIES = 5
_FINAL = tuple(s.value for s in RowStatus if s.is_final)
_PG_SQL: dict[str, str] = {}
R = TypeVar("R")


def _pg(sql: str) -> str:
    """A statement of the SQLite ledger in psycopg's placeholder style."""
    text = _PG_SQL.get(sql)
    if text is None:
        text = _PG_SQL[sql] = sql.replace("%", "%%").replace("?", "%s")
    return text


class PostgresLedger(CardLeases, GroupCommitLedger):
    """The ledger on PostgreSQL; `PostgresLedger.open(url)` and `close()`. Card leases and
    rate slots: `leases.CardLeases`."""

    shared = True

    def __init__(self, url: str, conn: Any, *, readonly: bool = False) -> None:
        super().__init__(redact(url), conn, readonly=readonly)
        self.url = url
        self._coord: Any = None
        self._coord_lock = anyio.Lock()

    @classmethod
    def open(cls, url: str, *, readonly: bool = False) -> PostgresLedger:
        """The ledger in the database at `url`, migrated to this version.

        `readonly`: no migration, and every transaction of the session read-only (the
        server refuses any write); a database without a ledger's tables is refused.
        """
        if psycopg is None:  # pragma: no cover
            raise LedgerError(
                "a PostgreSQL ledger needs psycopg: pip install 'topup-runner[postgres]'"
            )
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise LedgerError(f"ledger {redact(url)}: cannot connect: {_first_line(exc)}") from None
        ledger = cls(url, conn, readonly=readonly)
        try:
            if readonly:
                ledger._read_only_session()
            else:
                ledger._migrate()
        except psycopg.Error as exc:
            conn.close()
            doing = "cannot be read" if readonly else "cannot migrate"
            raise LedgerError(f"ledger {redact(url)}: {doing}: {_first_line(exc)}") from None
        except LedgerError:
            conn.close()
            raise
        return ledger

    def _read_only_session(self) -> None:
        """Every transaction of the session read-only (autocommit statements included),
        on a database that holds a ledger."""
        conn = self._conn
        conn.execute("SET default_transaction_read_only = on")
        found = conn.execute("SELECT to_regclass('topup_migrations') IS NOT NULL").fetchone()
        if not found or not found[0]:
            raise LedgerError(
                f"ledger {self.name}: holds no topup-runner ledger (no topup_migrations "
                "table): is the URL the ledger's database?"
            )

    def _migrate(self) -> None:
        """Apply the package's migrations not applied yet, one worker at a time."""
        conn = self._conn
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS topup_migrations "
                "(name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {name for (name,) in conn.execute("SELECT name FROM topup_migrations")}
            folder = resources.files(_MIGRATIONS).joinpath("postgresql")
            for entry in sorted(folder.iterdir(), key=lambda e: e.name):
                if not entry.name.endswith(".sql") or entry.name in done:
                    continue
                conn.execute(entry.read_text(encoding="utf-8"))
                conn.execute("INSERT INTO topup_migrations (name) VALUES (%s)", (entry.name,))

    def lock(self, run_key: str) -> None:
        """No exclusive lock: the workers of a run share it through card leases."""
        if self.readonly:
            raise self._no_run()
        return None

    def close(self) -> None:
        if self._coord is not None:
            self._coord.close()
        self._disk.stop()
        self._conn.close()

    async def _commit(self, batch: Sequence[Statement]) -> None:
        """One transaction, pipelined (one round trip for the batch), on a worker thread."""
        try:
            await anyio.to_thread.run_sync(self._commit_sync, batch)
        except psycopg.Error as exc:
            raise LedgerError(f"ledger {self.name}: write failed: {_first_line(exc)}") from None

    def _commit_sync(self, batch: Sequence[Statement]) -> None:
        """The batch in one transaction; again, whole, when PostgreSQL chose it as the victim
        of a deadlock or a serialization conflict (it was rolled back entirely)."""
        conn = self._conn
        subjects = touched(batch)
        runs = {s[1] for s in subjects}
        for attempt in range(1, COMMIT_RETRIES + 1):
            try:
                with conn.transaction():
                    # The run's chain head first: its writers take turns (chain.py).
                    heads = self._chain.lock(self._fetch, runs, True)
                    with conn.pipeline():
                        for sql, params in batch:
                            conn.execute(_pg(sql), params)
                    if heads:
                        self._chain.append(self._fetch, self._many, subjects, heads)
                return
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == COMMIT_RETRIES:
                    raise

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """A portable query on the writing connection (in its transaction): the chain's."""
        rows: list[tuple[Any, ...]] = self._conn.execute(_pg(sql), params).fetchall()
        return rows

    def _many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_pg(sql), params)

    def _query(
        self, sql: str, params: Sequence[Any] = (), *, coordination: bool = False
    ) -> list[tuple[Any, ...]]:
        try:
            conn = self._coordination_conn() if coordination else self._conn
            rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
            return rows
        except psycopg.Error as exc:
            raise LedgerError(f"ledger {self.name}: {_first_line(exc)}") from None

    def _coordination_conn(self) -> Any:
        """A second connection for leases and rate slots: they never wait behind a commit."""
        if self._coord is None:
            self._coord = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        return self._coord

    async def coordinate(self, func: Callable[..., R], *args: Any) -> R:
        """Run a lease or rate-slot method on a worker thread, without waiting for the
        statements queued for the next commit (unlike `call`)."""
        async with self._coord_lock:
            return await anyio.to_thread.run_sync(func, *args)

    def _read_snapshot(self) -> AbstractContextManager[None]:
        return _one_snapshot(self._conn)

    def _select(self, sql: str, params: Sequence[Any] = ()) -> Iterable[tuple[Any, ...]]:
        """The SQLite ledger's reads, as they are: portable SQL with `?` placeholders."""
        return self._query(_pg(sql), params)

    # -- runs ----------------------------------------------------------------------------

    def create_run(self, spec: RunSpec, rows: Sequence[JobRow]) -> None:
        """Record the run, its rows and its cards, unless another worker already has."""
        conn = self._conn
        try:
            with conn.transaction():
                created = conn.execute(
                    "INSERT INTO runs (run_key, provider, base_url, job_file, job_digest, "
                    "extra_columns, row_count, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                    "now()) ON CONFLICT (run_key) DO NOTHING",
                    (
                        spec.run_key,
                        spec.provider,
                        spec.base_url,
                        spec.job_file,
                        spec.job_digest,
                        json.dumps(list(spec.extra_columns)),
                        spec.row_count,
                    ),
                ).rowcount
                if not created:
                    return
                per_card: dict[str, int] = {}
                with (
                    conn.cursor() as cur,
                    cur.copy(
                        "COPY rows (run_key, row, card_id, amount, reference, extra, status) "
                        "FROM STDIN"
                    ) as copy,
                ):
                    for r in rows:
                        per_card[r.card_id] = per_card.get(r.card_id, 0) + 1
                        copy.write_row(
                            (
                                spec.run_key,
                                r.row,
                                r.card_id,
                                money(r.amount),
                                r.reference,
                                json.dumps(r.extra) if r.extra else "[]",
                                RowStatus.NOT_ATTEMPTED.value,
                            )
                        )
                with (
                    conn.cursor() as cur,
                    cur.copy("COPY run_cards (run_key, card_id, rows_total) FROM STDIN") as copy,
                ):
                    for card, count in per_card.items():
                        copy.write_row((spec.run_key, card, count))
                self._chain.start(self._fetch, self._many, spec.run_key)
        except psycopg.Error as exc:
            raise LedgerError(
                f"ledger {self.name}: cannot record the run: {_first_line(exc)}"
            ) from None

    def apply_event(self, event: ProviderEvent) -> tuple[int, bool]:
        conn = self._conn
        try:
            with conn.transaction():
                seen = not conn.execute(
                    "INSERT INTO provider_events (provider, card_id, amount, provider_ref, "
                    "status, fee, balance_after, received_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, now()) ON CONFLICT DO NOTHING",
                    (
                        event.provider,
                        event.card_id,
                        format_amount(event.amount),
                        event.provider_ref,
                        event.status.value,
                        money(event.fee),
                        money(event.balance_after),
                    ),
                ).rowcount
                # The chain heads of the runs it may settle first, as a commit takes them.
                match = (event.card_id, format_amount(event.amount), event.provider_ref)
                runs = self._fetch(
                    "SELECT DISTINCT run_key FROM rows WHERE status = 'pending' AND card_id = ? "
                    "AND amount = ? AND provider_ref = ?",
                    match,
                )
                heads = self._chain.lock(self._fetch, {r for (r,) in runs}, True)
                changed = conn.execute(
                    # The webhook's fee is unsigned: the topup answer's own fee wins.
                    "UPDATE rows SET status = %s, fee = COALESCE(fee, %s), "
                    "card_balance_after = COALESCE(%s, card_balance_after), finished_at = now(), "
                    "error = CASE WHEN %s = 'failed' "
                    "THEN 'the provider reported the topup failed' ELSE NULL END "
                    "WHERE status = 'pending' AND card_id = %s AND amount = %s "
                    "AND provider_ref = %s "
                    "AND run_key IN (SELECT run_key FROM runs WHERE provider = %s) "
                    "RETURNING run_key, row",
                    (
                        event.status.value,
                        money(event.fee),
                        money(event.balance_after),
                        event.status.value,
                        event.card_id,
                        format_amount(event.amount),
                        event.provider_ref,
                        event.provider,
                    ),
                ).fetchall()
                subjects = [("row", run_key, row, None) for run_key, row in changed]
                later = {s[1] for s in subjects} - set(heads)  # a row that became pending since
                heads.update(self._chain.lock(self._fetch, later, True))
                self._chain.append(self._fetch, self._many, subjects, heads)
        except psycopg.Error as exc:
            raise LedgerError(
                f"ledger {self.name}: cannot record the event: {_first_line(exc)}"
            ) from None
        return len(changed), seen

    def finish_run(self, run_key: str) -> None:
        self._query(
            "UPDATE runs SET finished_at = now() WHERE run_key = %s AND finished_at IS NULL "
            "RETURNING run_key",
            (run_key,),
        )

    def records(self, run_key: str, status: RowStatus | None = None) -> Iterator[RowRecord]:
        """Every row of the run (or only those with `status`) in job order, streamed through
        a server-side cursor on a connection of its own."""
        try:
            conn = psycopg.connect(self.url, connect_timeout=10)
        except psycopg.Error as exc:
            raise LedgerError(f"ledger {self.name}: cannot connect: {_first_line(exc)}") from None
        conn.read_only = self.readonly  # BEGIN READ ONLY: the cursor's transaction
        try:
            with conn.cursor(name="records") as cursor:
                cursor.itersize = 5000
                cursor.execute(
                    f"SELECT {RECORD_COLUMNS} FROM rows WHERE run_key = %s "
                    "AND (%s::text IS NULL OR status = %s) ORDER BY row",
                    (
                        run_key,
                        None if status is None else status.value,
                        None if status is None else status.value,
                    ),
                )
                for r in cursor:
                    yield row_record(r)
        except psycopg.Error as exc:  # met while streaming, as the connection breaks
            raise LedgerError(f"ledger {self.name}: read failed: {_first_line(exc)}") from None
        finally:
            conn.close()


@contextlib.contextmanager
def _one_snapshot(conn: Any) -> Iterator[None]:
    """Reads in one REPEATABLE READ transaction: all of them see the same commits."""
    level = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            yield
    finally:
        conn.isolation_level = level


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
