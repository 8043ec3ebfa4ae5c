"""The durable record of every run, row and attempt: what makes a run resumable.

SQLite in WAL mode. An attempt's intent is committed before its request is sent; its
outcome is queued and goes out with the next commit. Writers that arrive together share one
transaction (group commit) on a worker thread, so the event loop never waits on the disk for
long nor blocks on it at all. One process at a time may work on a run key: a lock on a byte
of the database file itself says who (`Ledger.lock`), whatever name the file is reached by.

A ledger file is opened only if it is one: stamped with topup-runner's `application_id`
and a schema version this code knows (or an unstamped ledger of an earlier version, which is
then stamped). Anything else, an empty file included, is refused rather than taken for a new
ledger: a new one is only ever created where no file exists, atomically. Every SQLite error
reaches callers as a one-line `LedgerError` naming the ledger.

`Ledger.open(path, readonly=True)` is for commands that only read (status, report, check): it
refuses what a writable open refuses, but never creates, stamps, migrates or locks, and works
where nothing may be written, a read-only mount included (`_connect_readonly` says how).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import sqlite3
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from runner.domain import JobRow, RowRecord, RowStatus
from runner.errors import LedgerError, LedgerLocked
from runner.metrics import StatusTotals
from runner.money import format_amount
from runner.providers.base import CardState, CardStatus

R = TypeVar("R")
# How long a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 10_000

_MONEY_FIELDS = (
    "fee",
    "total_charged",
    "card_balance_before",
    "card_balance_after",
    "wallet_balance_after",
)
# The SQL of each set of fields a row update was asked for (a handful in a run), and which
# of them are money.
_ROW_UPDATES: dict[tuple[str, ...], tuple[str, tuple[bool, ...]]] = {}
_ROW_FIELDS = (
    "status",
    *_MONEY_FIELDS,
    "transaction_id",
    "invoice_id",
    "attempts",
    "error",
    "started_at",
    "finished_at",
    "provider_ref",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    """A time as the ledger stores it: UTC, ISO 8601 to the millisecond."""
    global _iso_second
    if value is None:
        return None
    # utcnow()'s times need no conversion
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    # isoformat() costs two microseconds and a run formats two times a topup, nearly all
    # within the same second as the one before: only the milliseconds are new. One tuple,
    # read once: ledger reads on a worker thread format times too.
    second = (utc.second, utc.minute, utc.hour, utc.day, utc.month, utc.year)
    cached = _iso_second
    if cached[0] != second:
        cached = _iso_second = (second, utc.replace(microsecond=0, tzinfo=None).isoformat())
    return f"{cached[1]}.{utc.microsecond // 1000:03d}+00:00"


_iso_second: tuple[tuple[int, ...], str] = ((), "")


def _from_iso(value: str | datetime | None) -> datetime | None:
    """A stored time: ISO text from SQLite, already a datetime from a database server."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _money(value: Decimal | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    if text[-3:-2] == "." and text[-2:].isdigit() and text != "-0.00":
        # Already exactly in cents, as nearly every amount is: format_amount would give the
        # same text at thirty times the cost, and the ledger formats several per request.
        return text
    return format_amount(value)


def _dec(value: str | Decimal | None) -> Decimal | None:
    return None if value is None else Decimal(value)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What identifies a run: a run key may only ever be resumed with the same job and target."""

    run_key: str
    provider: str
    base_url: str
    job_file: str
    job_digest: str
    extra_columns: tuple[str, ...]
    row_count: int
    # When the run was first recorded (filled by the ledger's reads; not part of what
    # identifies the run, so a spec built from a job still equals the one read back).
    created_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class OpenAttempt:
    """An attempt whose intent was recorded but whose outcome never was (a killed process)."""

    row: int
    attempt: int
    card_id: str
    amount: Decimal
    before: CardState | None
    sent_at: datetime
    # Until when the provider may still apply it (None: not recorded, as before there was
    # a way to say it).
    settle_by: datetime | None = None


@dataclass(frozen=True, slots=True)
class RowProgress:
    """Where a row stands when a run (re)starts."""

    status: RowStatus
    attempts: int


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A row the provider accepted and has not settled yet."""

    run_key: str
    row: int
    card_id: str
    amount: Decimal
    provider_ref: str


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """A verified final status from the provider for the topup (card, amount, ref)."""

    provider: str
    card_id: str
    amount: Decimal
    provider_ref: str
    status: RowStatus  # succeeded or failed
    fee: Decimal | None = None
    balance_after: Decimal | None = None


@dataclass(frozen=True, slots=True)
class RunFacts:
    """The run as the ledger has it, whoever did it: what a report's Summary says of it."""

    created_at: datetime
    last_finished_at: datetime | None
    sent: int  # topup requests recorded, by every process
    first_applied_at: datetime | None
    last_applied_at: datetime | None


@dataclass(frozen=True, slots=True)
class RunOverview:
    """One line of `topup-runner status`."""

    run_key: str
    provider: str
    job_file: str
    row_count: int
    created_at: datetime
    finished_at: datetime | None
    by_status: Mapping[str, int]


# What `_run_spec` reads of a run.
_RUN_COLUMNS = (
    "run_key, provider, base_url, job_file, job_digest, extra_columns, row_count, created_at"
)


def _run_spec(r: Sequence[Any]) -> RunSpec:
    return RunSpec(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), r[6], _from_iso(r[7]))


# What `records` reads of a row, in the order `row_record` takes it.
RECORD_COLUMNS = (
    "row, card_id, amount, reference, extra, status, fee, total_charged, card_balance_before, "
    "card_balance_after, wallet_balance_after, transaction_id, invoice_id, attempts, error, "
    "started_at, finished_at"
)


def row_record(r: Sequence[Any]) -> RowRecord:
    """A report line from a row of RECORD_COLUMNS (money as text or Decimal, times as ISO
    text or datetime: SQLite's or a database server's)."""
    return RowRecord(
        row=r[0],
        card_id=r[1],
        amount=Decimal(r[2]),
        reference=r[3],
        extra=tuple((str(k), str(v)) for k, v in json.loads(r[4])),
        status=RowStatus(r[5]),
        fee=_dec(r[6]),
        total_charged=_dec(r[7]),
        card_balance_before=_dec(r[8]),
        card_balance_after=_dec(r[9]),
        wallet_balance_after=_dec(r[10]),
        transaction_id=r[11],
        invoice_id=r[12],
        attempts=r[13],
        error=r[14],
        started_at=_from_iso(r[15]),
        finished_at=_from_iso(r[16]),
    )


# topup-runner's mark in a SQLite file's header (`PRAGMA application_id`): "TPUP".
APPLICATION_ID = 0x54505550
_SQLITE_HEADER = b"SQLite format 3\x00"
# The name a new ledger is built under, beside its final place, before being linked there.
_BUILDING = ".building"
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


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration, one by one: `executescript` would commit the
    transaction that makes a migration all or nothing."""
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            yield current
            current = ""


def _reason(exc: sqlite3.Error) -> str:
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


def _rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction; an error doing so changes nothing for the caller, who is
    already raising the error that made it fail (SQLite rolls back at close anyway)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))}


def _stamp(conn: sqlite3.Connection, name: object) -> int:
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


def _apply_migrations(conn: sqlite3.Connection, version: int) -> None:
    """Bring the ledger from schema `version` to this one and stamp it; the caller holds a
    write transaction, so the whole upgrade commits or none of it."""
    if version == 0:
        # The earliest ledgers lack the column migration 0001 indexes.
        columns = _columns(conn, "rows")
        if columns and "provider_ref" not in columns:
            conn.execute("ALTER TABLE rows ADD COLUMN provider_ref TEXT")
    for number, script in _migrations():
        if number > version:
            for statement in _statements(script):
                conn.execute(statement)
    # PRAGMA takes no parameters: both are integers of this module.
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")


def _upgrade(conn: sqlite3.Connection, name: object) -> None:
    """Migrate an older ledger, once, whoever else opens it at the same time."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _stamp(conn, name)  # again, now that no other process can be upgrading it
        if version < SCHEMA_VERSION:
            _apply_migrations(conn, version)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _create(real: Path) -> None:
    """A new ledger at `real`, unless a file is there by now.

    It is built whole under another name in the same folder, then hard-linked into place:
    a crash leaves either no file at `real` or a complete ledger, never the empty file that
    would later be refused as damaged; and link(2), unlike rename(2), never replaces a file
    that another process put there meanwhile.
    """
    handle, temp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=_BUILDING)
    os.close(handle)
    try:
        # In rollback-journal mode, so that COMMIT leaves everything in this one file (open
        # turns on WAL); synchronous FULL: it is on the disk before being linked.
        conn = sqlite3.connect(temp, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            _apply_migrations(conn, 0)
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(temp, real)
        except FileExistsError:
            return  # another process created it first: that one is opened
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            if not _copy_into_new(temp, real):
                return
        dir_fd = os.open(real.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name itself survives a power cut
        finally:
            os.close(dir_fd)
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp + suffix)


def _copy_into_new(built: str, real: Path) -> bool:
    """For a file system without hard links (FAT, some network shares): claim the name with
    O_EXCL and copy the built ledger in; False if a file is there already. A crash or a
    concurrent opener mid-copy finds a partial file, which open refuses: a person decides.
    (rename would be atomic, but replaces a ledger created meanwhile, silently.)"""
    try:
        out = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(out, "wb") as target, open(built, "rb") as source:
        shutil.copyfileobj(source, target)
        target.flush()
        os.fsync(target.fileno())
    return True


def _build_links(real: Path, info: os.stat_result) -> list[str]:
    """Names of this file left by `_create` (a crash between link and unlink, or a creator
    caught in between): the only second names a ledger may have had. SQLite never opens a
    ledger by them."""
    prefix = f".{real.name}."
    found: list[str] = []
    with contextlib.suppress(OSError), os.scandir(real.parent) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(_BUILDING)):
                continue
            with contextlib.suppress(OSError):
                seen = entry.stat(follow_symlinks=False)
                if (seen.st_dev, seen.st_ino) == (info.st_dev, info.st_ino):
                    found.append(entry.path)
    return found


def _remove_build_links(real: Path, info: os.stat_result) -> None:
    for name in _build_links(real, info):
        with contextlib.suppress(OSError):
            os.unlink(name)


def _open_file(given: Path, *, readonly: bool = False) -> tuple[Path, int]:
    """The ledger file's real path, and a descriptor of it (what the run locks are taken on:
    open for writing unless `readonly`), checked to be a ledger file with a single name.

    Read-only, a missing file is a LedgerError (never created, nor its folder) and names
    left by an interrupted creation are counted out rather than removed."""
    # The one name SQLite may know the file by: its -wal and -shm files go by the name, and
    # two names of one database would mean two write-ahead logs, which corrupts it.
    real = Path(os.path.realpath(given))
    if readonly:
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise LedgerError(
                f"ledger {given}: no such file: no run was ever recorded there (is --ledger "
                "or TOPUP_LEDGER the ledger's path?)"
            ) from None
    else:
        real.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            _create(real)
            fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LedgerError(f"ledger {given}: is not a regular file")
        leftovers = 0
        if info.st_nlink > 1 and readonly:
            leftovers = len(_build_links(real, info))
        elif info.st_nlink > 1:
            _remove_build_links(real, info)
            info = os.fstat(fd)
        if info.st_nlink - leftovers > 1:
            raise LedgerError(
                f"ledger {given}: the file has {info.st_nlink} names (hard links); SQLite "
                "keeps its write-ahead log by name, and two logs of one file corrupt it: "
                "delete the other links and always use one name"
            )
        if info.st_size == 0:
            raise LedgerError(
                f"ledger {given}: the file is empty (0 bytes), not a ledger: restore the "
                "ledger from a backup if it was one, or delete the file to start a new ledger"
            )
        if os.pread(fd, len(_SQLITE_HEADER), 0) != _SQLITE_HEADER:
            raise LedgerError(
                f"ledger {given}: is not a SQLite database, so not a ledger: restore the "
                "ledger from a backup if it was one, or give a path where no file exists to "
                "start a new ledger"
            )
    except BaseException:
        os.close(fd)
        raise
    return real, fd


def _check_writable(conn: sqlite3.Connection) -> None:
    """A ledger that cannot take a write is found at open, before anything is sent: SQLite
    opens a database it may not write read-only, silently, and says so at the first write.
    Busy (another process is writing) means the database can be written: no waiting."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if not (getattr(exc, "sqlite_errorname", "") or "").startswith("SQLITE_BUSY"):
            raise
    else:
        conn.execute("ROLLBACK")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _readonly_uri(real: Path, immutable: bool) -> str:
    # as_uri() percent-encodes what URI syntax would take from the name (?, #, %).
    return f"{real.as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")


def _reader(uri: str) -> sqlite3.Connection:
    """A connection by `uri`, the file (and a WAL ledger's -wal) opened and readable."""
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_readonly(real: Path, given: Path) -> tuple[sqlite3.Connection, str]:
    """A connection that cannot write the ledger at `real`, and the URI it was opened by
    (`records` opens another by it).

    `mode=ro` first: it reads a WAL ledger as any reader does, the -wal included, in step
    with a run that may be writing it at that moment (through the -shm file). For that
    SQLite needs the -wal and -shm files beside the ledger, and makes them where they are
    missing (leaving them behind, empty: harmless to the next run). In a read-only folder it
    cannot make them, and says CANTOPEN. Then, if there is no -wal (nor rollback journal)
    with anything in it (the last writer closed cleanly: every record is in the file
    itself), the file is opened `immutable=1`, which needs neither file and writes nothing.
    `immutable` ignores a -wal, so a -wal with records in it that SQLite cannot read there is
    refused, never silently left out. (`immutable` also takes no locks: only a writer through
    another, writable mount of the same folder could change the file meanwhile.)
    """
    try:
        uri = _readonly_uri(real, immutable=False)
        return _reader(uri), uri
    except sqlite3.OperationalError as exc:
        if not (getattr(exc, "sqlite_errorname", "") or "").startswith("SQLITE_CANTOPEN"):
            raise
    for suffix in ("-wal", "-journal"):
        beside = f"{real}{suffix}"
        with contextlib.suppress(FileNotFoundError):
            if os.stat(beside).st_size > 0:
                raise LedgerError(
                    f"ledger {given}: its latest records are in {beside}, which SQLite can "
                    "read only in a writable folder (or with the -shm file that went with it): "
                    "copy the ledger with its -wal into a writable folder and read the copy"
                )
    uri = _readonly_uri(real, immutable=True)
    return _reader(uri), uri


def _os_reason(exc: OSError, *, readonly: bool = False) -> str:
    text = exc.strerror or str(exc)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not readonly:
        return f"{text} (the ledger must be writable: every attempt is recorded before it is sent)"
    return text


# The run keys' locks are one byte each of the database file, in [0, _LOCK_SPAN): far below
# the bytes SQLite locks (from 0x40000000, its "pending byte"), so the two never meet.
_LOCK_SPAN = 0x20000000
# Open-file-description locks where the system has them (Linux): owned by our descriptor,
# not by the process, so SQLite closing a descriptor of its own on the same file (a second
# connection's, as `records` opens) cannot drop them, as it would drop a POSIX lock.
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
# (device, inode, byte) of every run lock this process holds: POSIX locks never conflict
# within a process, and one process must not run a key twice either.
_HELD: set[tuple[int, int, int]] = set()
_HELD_LOCK = threading.Lock()


def _lock_byte(fd: int, offset: int, kind: int) -> None:
    """Lock (F_WRLCK) or unlock (F_UNLCK) one byte of the file, without waiting."""
    if _OFD_SETLK is not None:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (0, as OFD locks require),
        # padded past the kernel's size.
        fcntl.fcntl(
            fd, _OFD_SETLK, struct.pack("hhqqi", kind, os.SEEK_SET, offset, 1, 0) + bytes(8)
        )
    else:
        fcntl.lockf(
            fd, fcntl.LOCK_UN if kind == fcntl.F_UNLCK else fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset
        )


class RunLock:
    """Held while a process works on a run key; released by `release`, by the ledger's
    close, or by the process's death (the kernel's doing, even after SIGKILL)."""

    def __init__(self, fd: int, held: tuple[int, int, int]) -> None:
        self._fd = fd
        self._held: tuple[int, int, int] | None = held

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        try:
            _lock_byte(self._fd, held[2], fcntl.F_UNLCK)
        finally:
            with _HELD_LOCK:
                _HELD.discard(held)


URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: str | None) -> bool:
    return bool(value) and str(value).startswith(URL_SCHEMES)


def redact(url: str) -> str:
    """A ledger's URL without its password: what messages and logs may show."""
    return re.sub(r"^(\w+://[^:/@]+):[^@/]*@", r"\1:***@", url)


def open_ledger(where: str | Path, *, readonly: bool = False) -> Ledger:
    """The ledger at `where`: a `postgresql://` URL (shared by workers) or a SQLite path;
    `readonly` for commands that only read it (see `Ledger.open`). The PostgreSQL ledger
    (and its driver) is imported only when asked for."""
    from runner.ledger_pg import PostgresLedger

    if is_postgres_url(str(where)):
        return PostgresLedger.open(str(where), readonly=readonly)
    return Ledger.open(where, readonly=readonly)


class _DiskThread:
    """The thread on which the ledger waits for the disk: COMMIT's fsync, a BEGIN that waits
    for another process's write lock.

    One long-lived thread fed through a queue and answering through the event loop's
    call_soon_threadsafe: a commit every dozen topups made anyio.to_thread's capacity
    limiter, worker pool and backend lookups a measurable share of a fast run's CPU.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_DiskJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, func: Callable[..., R], *args: Any) -> R:
        """`func(*args)` on the thread. Cancelling the caller does not abandon the call: it
        still waits for it to end (the connection is not free before), then re-raises."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ledger-disk", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, done, func, args))
        cancelled: BaseException | None = None
        while True:
            try:
                result: R = await asyncio.shield(done)
            except asyncio.CancelledError as exc:
                if done.done():
                    raise
                cancelled = exc
                continue
            if cancelled is not None:
                raise cancelled
            return result

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, done, func, args = job
            try:
                result = func(*args)
            except BaseException as exc:  # handed to the waiting task, raised there
                _call_soon(loop, _settle, done, None, exc)
            else:
                _call_soon(loop, _settle, done, result, None)


_DiskJob = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]
]


def _call_soon(loop: asyncio.AbstractEventLoop, func: Callable[..., None], *args: Any) -> None:
    # A closed loop raises RuntimeError: nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(func, *args)


def _settle(done: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)


class Ledger:
    """SQLite ledger; use `Ledger.open(path)` and `close()`; writes are async, reads sync."""

    # Whether several processes work on one run together (the PostgreSQL ledger).
    shared = False

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
        self.path = path  # the database's real path: the only name it is opened by
        self.name = str(path) if name is None else name  # what messages call the ledger
        # Opened only to read: no run may take it (`lock`), nothing is written (`post`).
        self.readonly = readonly
        self._uri = uri  # what other connections open the database by, if not its path
        self._conn = conn
        # The database file, open for writing: run keys are locked on it (`lock`).
        self._fd = fd
        self._readers: set[sqlite3.Connection] = set()  # the connections `records` opened
        self._pending: list[tuple[str, Sequence[Any]]] = []
        self._queued = 0  # statements ever queued
        self._written = 0  # statements ever committed (always a prefix of the queued ones)
        self._committing: asyncio.Event | None = None  # set when the commit under way ends
        self._committing_upto = 0  # the statements it carries: those queued before it began
        self._next: asyncio.Event | None = None  # set when the commit after that one ends
        self._broken: LedgerError | None = None
        # One user of the connection at a time among async callers (asyncio's lock, as the
        # events below: taken at every commit).
        self._conn_lock = asyncio.Lock()
        self._locks: list[RunLock] = []
        self._disk = _DiskThread()

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> Ledger:
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
            real, fd = _open_file(given, readonly=readonly)
            if readonly:
                conn, uri = _connect_readonly(real, given)
                _stamp(conn, given)  # refused as a writable open refuses; older: read as is
            else:
                conn = sqlite3.connect(real, check_same_thread=False, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                # Looked at before anything is written: another program's database stays as is.
                version = _stamp(conn, given)
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed intent survives power loss, not only a killed process.
                conn.execute("PRAGMA synchronous=FULL")
                if version < SCHEMA_VERSION:
                    _upgrade(conn, given)
                _check_writable(conn)
            if os.fstat(fd)[1:3] != os.stat(real)[1:3]:  # (inode, device)
                raise LedgerError(f"ledger {given}: was replaced while being opened: try again")
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if fd >= 0:
                os.close(fd)  # after SQLite's connection: see `close`
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"ledger {given}: cannot be opened: {_reason(exc)}") from None
            if isinstance(exc, OSError):
                raise LedgerError(f"ledger {given}: {_os_reason(exc, readonly=readonly)}") from None
            raise
        return cls(real, conn, fd=fd, name=str(given), readonly=readonly, uri=uri)

    def lock(self, run_key: str) -> RunLock:
        """Hold `run_key` for this process until `close` (LedgerLocked if another holds it).

        The lock is a byte of the database file itself, so it is the file's whatever name
        reached it: a symlink, a `..` path, a bind mount (and the file has no other name:
        `open` refuses hard links). The byte is chosen by the key's hash; two keys that
        share one (one chance in half a billion) merely cannot run at the same time.
        """
        if self.readonly:
            raise LedgerError(
                f"ledger {self.name}: opened read-only, so no run may use it: nothing may be "
                "sent on a ledger that cannot record it"
            )
        info = os.fstat(self._fd)
        offset = int.from_bytes(hashlib.sha256(run_key.encode()).digest()[:4]) % _LOCK_SPAN
        held = (info.st_dev, info.st_ino, offset)
        busy = LedgerLocked(
            f"another process is running run key {run_key!r} on ledger {self.name}: "
            "nothing was sent"
        )
        with _HELD_LOCK:
            if held in _HELD:
                raise busy
            try:
                _lock_byte(self._fd, offset, fcntl.F_WRLCK)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise busy from None
                raise LedgerError(
                    f"ledger {self.name}: cannot lock run key {run_key!r}: {_os_reason(exc)}"
                ) from None
            _HELD.add(held)
        lock = RunLock(self._fd, held)
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
        return LedgerError(f"ledger {self.name}: {doing}: {_reason(exc)}")

    async def call(self, func: Callable[..., R], *args: Any) -> R:
        """Run a blocking ledger method off the event loop, one at a time with the writes,
        after everything queued so far is committed (so that it reads what was posted)."""
        await self.flush()
        async with self._conn_lock:
            return await anyio.to_thread.run_sync(func, *args)

    # -- writing -------------------------------------------------------------------------

    async def write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Commit `statements` durably before returning; concurrent callers share one
        transaction, which also carries everything posted before."""
        self.post(statements)
        await self.flush()

    def post(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Queue `statements` for the next commit and return at once.

        For records whose loss in a crash the next run recovers from, such as an attempt's
        outcome (the attempt stays open and is reconciled from the provider's state); never
        for an intent. Statements commit in the order they were queued, so a later intent of
        the same row or card is never durable without the outcomes posted before it.
        """
        if self._broken is not None:
            raise self._broken
        if self.readonly:
            raise LedgerError(f"ledger {self.name}: opened read-only: nothing can be written")
        self._pending.extend(statements)
        self._queued += len(statements)

    async def flush(self) -> None:
        """Return once everything queued so far is committed.

        One commit at a time; whoever finds none under way commits everything pending. A
        caller whose statements are in the commit under way waits for it; one whose
        statements came later needs the next commit: the first such caller waits for the
        current one to end and then makes it, the others wait for that one alone, so that a
        caller wakes once rather than at every commit. A failed commit breaks the ledger for
        good: its statements are lost, so no caller may go on as if they were durable
        (LedgerError from then on).

        asyncio's own events, not anyio's: a writer waits once per topup, and anyio's
        primitives look the running backend and task up on every use.
        """
        target = self._queued
        while self._written < target:
            if self._broken is not None:
                raise self._broken
            if self._committing is None:
                await self._commit_pending()
            elif target <= self._committing_upto:
                await self._committing.wait()
            elif self._next is None:
                self._next = asyncio.Event()
                try:
                    await self._committing.wait()
                except BaseException:
                    self._release_next()  # another waiter makes the next commit
                    raise
            else:
                await self._next.wait()

    def _release_next(self) -> None:
        """Wake the callers waiting for the next commit: one of them will make it."""
        waiting, self._next = self._next, None
        if waiting is not None:
            waiting.set()

    async def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        done = self._committing = self._next or asyncio.Event()
        self._next = None
        self._committing_upto = self._queued
        try:
            # Shielded: a commit cut in half would lose statements others wait on.
            with anyio.CancelScope(shield=True):
                async with self._conn_lock:  # no suspension when it is free
                    await self._commit(batch)
            self._written += len(batch)
        except LedgerError as exc:
            self._broken = exc
            self._release_next()
            raise
        finally:
            self._committing = None
            done.set()

    async def _commit(self, batch: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """One transaction. What may wait, on the ledger's disk thread: the write lock when
        another process holds it, and COMMIT (the fsync). What is only CPU, on the event
        loop: the statements in between.

        On a thread every statement would hand the GIL to the busy event loop and wait for
        it back (up to the 5 ms switch interval each), and every trip to the thread costs
        far more than a statement: a batch is a few dozen statements of microseconds.
        """
        conn = self._conn
        try:
            if not self._begin_at_once():
                await self._disk.run(conn.execute, "BEGIN IMMEDIATE")
            for sql, params in batch:
                conn.execute(sql, params)
            await self._disk.run(conn.execute, "COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self._error("write failed", exc) from None

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

    # -- runs ----------------------------------------------------------------------------

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

    def find_run(self, run_key: str) -> RunSpec | None:
        found = list(self._select(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_key = ?", (run_key,)))
        return _run_spec(found[0]) if found else None

    def runs_with_digest(self, job_digest: str) -> list[RunSpec]:
        """Every run recorded with this job content digest, newest first (`created_at`
        filled in)."""
        return [
            _run_spec(row)
            for row in self._select(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE job_digest = ? "
                "ORDER BY created_at DESC, run_key DESC",
                (job_digest,),
            )
        ]

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
                    _iso(utcnow()),
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
                        _money(r.amount),
                        r.reference,
                        json.dumps(r.extra) if r.extra else "[]",
                        RowStatus.NOT_ATTEMPTED.value,
                    )
                    for r in rows
                ),
            )
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(self._conn)
            raise self._error("cannot record the run", exc) from None

    def progress(self, run_key: str) -> dict[int, RowProgress]:
        """Status and attempts so far of every row that is not final."""
        final = tuple(s.value for s in RowStatus if s.is_final)
        cursor = self._select(
            "SELECT row, status, attempts FROM rows WHERE run_key = ? AND status NOT IN (?, ?, ?)",
            (run_key, *final),
        )
        return {r: RowProgress(RowStatus(s), a) for r, s, a in cursor}

    def open_attempts(self, run_key: str) -> list[OpenAttempt]:
        return self._open_attempts(
            "WHERE run_key = ? AND outcome IS NULL ORDER BY row, attempt", (run_key,)
        )

    def _open_attempts(self, where: str, params: Sequence[Any]) -> list[OpenAttempt]:
        cursor = self._select(
            "SELECT row, attempt, card_id, amount, before_status, before_balance, "
            f"before_deposit, sent_at, settle_by FROM attempts {where}",
            params,
        )
        found = []
        for (
            row,
            attempt,
            card_id,
            amount,
            b_status,
            b_balance,
            b_deposit,
            sent_at,
            settle,
        ) in cursor:
            before = None
            if b_balance is not None:
                before = CardState(
                    card_id=card_id,
                    status=CardStatus(b_status or "unknown"),
                    balance=Decimal(b_balance),
                    deposit=_dec(b_deposit),
                )
            sent = _from_iso(sent_at) or utcnow()
            found.append(
                OpenAttempt(row, attempt, card_id, Decimal(amount), before, sent, _from_iso(settle))
            )
        return found

    def last_attempts(self, run_key: str) -> dict[str, datetime]:
        """When each card's latest attempt was sent: a resumed run honours its cooldown."""
        cursor = self._select(
            "SELECT card_id, MAX(sent_at) FROM attempts WHERE run_key = ? GROUP BY card_id",
            (run_key,),
        )
        return {card: when for card, sent in cursor if (when := _from_iso(sent)) is not None}

    def totals(self, run_key: str) -> dict[RowStatus, StatusTotals]:
        """Rows and money of the run by status, summed exactly."""
        sums: dict[RowStatus, list[Any]] = {
            s: [0, Decimal(0), Decimal(0), Decimal(0)] for s in RowStatus
        }
        cursor = self._select(
            "SELECT status, amount, fee, total_charged FROM rows WHERE run_key = ?", (run_key,)
        )
        for status, amount, fee, total in cursor:
            entry = sums[RowStatus(status)]
            entry[0] += 1
            entry[1] += Decimal(amount)
            entry[2] += Decimal(fee) if fee is not None else 0
            entry[3] += Decimal(total) if total is not None else 0
        return {s: StatusTotals(*values) for s, values in sums.items()}

    def fee_samples(self, provider: str, limit: int = 2000) -> list[tuple[Decimal, Decimal]]:
        """(amount, fee) of the provider's most recent topups that reported a fee."""
        cursor = self._select(
            "SELECT rows.amount, rows.fee FROM rows JOIN runs USING (run_key) "
            "WHERE runs.provider = ? AND rows.fee IS NOT NULL "
            "ORDER BY rows.finished_at DESC LIMIT ?",
            (provider, limit),
        )
        return [(Decimal(a), Decimal(f)) for a, f in cursor]

    def known_refs(self, card_id: str) -> set[str]:
        """Provider references of the card's topups the ledger already accounts for."""
        cursor = self._select(
            "SELECT provider_ref FROM rows WHERE card_id = ? AND provider_ref IS NOT NULL",
            (card_id,),
        )
        return {ref for (ref,) in cursor}

    def pending(self, run_key: str) -> list[PendingRow]:
        cursor = self._select(
            "SELECT row, card_id, amount, provider_ref FROM rows "
            "WHERE run_key = ? AND status = 'pending' ORDER BY row",
            (run_key,),
        )
        return [PendingRow(run_key, r, c, Decimal(a), ref or "") for r, c, a, ref in cursor]

    def apply_event(self, event: ProviderEvent) -> tuple[int, bool]:
        """Keep a verified event and settle the pending rows it names, in one transaction.

        Returns (rows settled now, whether the event had been seen before). Rows already
        final are never touched: a duplicate or late event changes nothing.
        """
        now = _iso(utcnow())
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
                    _money(event.fee),
                    _money(event.balance_after),
                    now,
                ),
            )
            seen = cursor.rowcount == 0
            settled = self._conn.execute(
                # The webhook's fee is unsigned: the topup answer's own fee wins.
                "UPDATE rows SET status = ?, fee = COALESCE(fee, ?), "
                "card_balance_after = COALESCE(?, card_balance_after), finished_at = ?, "
                "error = CASE WHEN ? = 'failed' THEN 'the provider reported the topup failed' "
                "ELSE NULL END "
                "WHERE status = 'pending' AND card_id = ? AND amount = ? AND provider_ref = ? "
                "AND run_key IN (SELECT run_key FROM runs WHERE provider = ?)",
                (
                    event.status.value,
                    _money(event.fee),
                    _money(event.balance_after),
                    now,
                    event.status.value,
                    event.card_id,
                    format_amount(event.amount),
                    event.provider_ref,
                    event.provider,
                ),
            ).rowcount
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(self._conn)
            raise self._error("cannot record the event", exc) from None
        return settled, seen

    def settle_from_events(self, run_key: str, provider: str) -> int:
        """Settle the run's pending rows whose event arrived before they were recorded."""
        found = list(
            self._select(
                "SELECT e.card_id, e.amount, e.provider_ref, e.status, e.fee, e.balance_after "
                "FROM provider_events e JOIN rows r ON r.card_id = e.card_id "
                "AND r.amount = e.amount AND r.provider_ref = e.provider_ref "
                "WHERE r.run_key = ? AND r.status = 'pending' AND e.provider = ?",
                (run_key, provider),
            )
        )
        settled = 0
        for card, amount, ref, status, fee, balance in found:
            event = ProviderEvent(
                provider, card, Decimal(amount), ref, RowStatus(status), _dec(fee), _dec(balance)
            )
            settled += self.apply_event(event)[0]
        return settled

    def finish_run(self, run_key: str) -> None:
        try:
            self._conn.execute(
                "UPDATE runs SET finished_at = ? WHERE run_key = ?", (_iso(utcnow()), run_key)
            )
        except sqlite3.Error as exc:
            raise self._error("write failed", exc) from None

    def run_facts(self, run_key: str) -> RunFacts:
        ((created, finished, first, last),) = self._select(
            "SELECT r.created_at, MAX(w.finished_at), "
            "MIN(CASE WHEN w.status IN ('succeeded', 'pending') THEN w.finished_at END), "
            "MAX(CASE WHEN w.status IN ('succeeded', 'pending') THEN w.finished_at END) "
            "FROM runs r JOIN rows w USING (run_key) WHERE r.run_key = ? GROUP BY r.created_at",
            (run_key,),
        )
        ((sent,),) = self._select("SELECT COUNT(*) FROM attempts WHERE run_key = ?", (run_key,))
        return RunFacts(
            _from_iso(created) or utcnow(),
            _from_iso(finished),
            sent,
            _from_iso(first),
            _from_iso(last),
        )

    def overview(self) -> list[RunOverview]:
        runs = list(
            self._select(
                "SELECT run_key, provider, job_file, row_count, created_at, finished_at "
                "FROM runs ORDER BY created_at"
            )
        )
        result = []
        for key, provider, job_file, count, created, finished in runs:
            by_status = dict(
                self._select(
                    "SELECT status, COUNT(*) FROM rows WHERE run_key = ? GROUP BY status", (key,)
                )
            )
            result.append(
                RunOverview(
                    key,
                    provider,
                    job_file,
                    count,
                    _from_iso(created) or utcnow(),
                    _from_iso(finished),
                    by_status,
                )
            )
        return result

    def status_counts(self, run_key: str) -> dict[RowStatus, int]:
        counts = dict.fromkeys(RowStatus, 0)
        for status, n in self._select(
            "SELECT status, COUNT(*) FROM rows WHERE run_key = ? GROUP BY status", (run_key,)
        ):
            counts[RowStatus(status)] = n
        return counts

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

    # -- statements the engine commits through write() ------------------------------------

    @staticmethod
    def intent(
        run_key: str,
        row: int,
        attempt: int,
        card_id: str,
        amount: Decimal,
        before: CardState | None,
        sent_at: datetime,
        *,
        settle_by: datetime | None = None,
    ) -> list[tuple[str, Sequence[Any]]]:
        """The statements that record an attempt about to be sent (with the card's balance
        before it, when the provider lets cards be read, and the time until which the
        provider may still apply it, when known)."""
        sent = _iso(sent_at)
        balance = None if before is None else _money(before.balance)
        return [
            (
                "INSERT INTO attempts (run_key, row, attempt, card_id, amount, before_status, "
                "before_balance, before_deposit, sent_at, settle_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_key,
                    row,
                    attempt,
                    card_id,
                    _money(amount),
                    None if before is None else before.status.value,
                    balance,
                    None if before is None else _money(before.deposit),
                    sent,
                    _iso(settle_by),
                ),
            ),
            (
                "UPDATE rows SET attempts = ?, started_at = COALESCE(started_at, ?) "
                "WHERE run_key = ? AND row = ?",
                (attempt, sent, run_key, row),
            )
            if before is None
            else (
                "UPDATE rows SET attempts = ?, started_at = COALESCE(started_at, ?), "
                "card_balance_before = ? WHERE run_key = ? AND row = ?",
                (attempt, sent, balance, run_key, row),
            ),
        ]

    @staticmethod
    def attempt_outcome(
        run_key: str, row: int, attempt: int, outcome: str, detail: str, at: datetime
    ) -> tuple[str, Sequence[Any]]:
        return (
            "UPDATE attempts SET outcome = ?, detail = ?, finished_at = ? "
            "WHERE run_key = ? AND row = ? AND attempt = ?",
            (outcome, detail, _iso(at), run_key, row, attempt),
        )

    @staticmethod
    def row_update(run_key: str, row: int, **values: Any) -> tuple[str, Sequence[Any]]:
        """Set some of a row's report fields (money as Decimal, times as datetime)."""
        names = tuple(values)
        cached = _ROW_UPDATES.get(names)
        if cached is None:
            unknown = set(values) - set(_ROW_FIELDS)
            if unknown:
                raise ValueError(f"not row fields: {sorted(unknown)}")
            assignments = ", ".join(f"{name} = ?" for name in values)
            cached = _ROW_UPDATES[names] = (
                f"UPDATE rows SET {assignments} WHERE run_key = ? AND row = ?",
                tuple(name in _MONEY_FIELDS for name in names),
            )
        sql, money = cached
        params: list[Any] = []
        for is_money, value in zip(money, values.values(), strict=True):
            if is_money:
                params.append(_money(value))
            elif value is None or type(value) is str:
                params.append(value)
            elif isinstance(value, datetime):
                params.append(_iso(value))
            elif isinstance(value, RowStatus):
                params.append(value.value)
            else:
                params.append(value)
        params += (run_key, row)
        return sql, params

    @staticmethod
    def close_untouched_row(
        run_key: str, row: int, status: RowStatus, error: str, at: datetime | None
    ) -> tuple[str, Sequence[Any]]:
        """Give a row a status and an error unless it has left `not_attempted` meanwhile (on
        a shared ledger, another worker may have finished it)."""
        return (
            "UPDATE rows SET status = ?, error = ?, finished_at = COALESCE(?, finished_at) "
            "WHERE run_key = ? AND row = ? AND status = 'not_attempted'",
            (status.value, error, _iso(at), run_key, row),
        )
