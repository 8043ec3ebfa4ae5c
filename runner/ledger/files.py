"""A SQLite ledger's file: found by its one real name, created atomically where none exists,
checked to be a SQLite database with a single name before SQLite opens it, connected to
read-only where nothing may be written (`connect_readonly`), and the run locks (`RunLock`),
one byte each of the file itself, that say which process runs a key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import sqlite3
import stat
import struct
import tempfile
import threading
from pathlib import Path

from runner.errors import LedgerError, LedgerLocked
from runner.ledger.schema import BUSY_TIMEOUT_MS, apply_migrations

_SQLITE_HEADER = b"SQLite format 3\x00"
# The name a new ledger is built under, beside its final place, before being linked there.
_BUILDING = ".building"


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
            apply_migrations(conn, 0)
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


def open_file(given: Path, *, readonly: bool = False) -> tuple[Path, int]:
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


def check_writable(conn: sqlite3.Connection) -> None:
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


def connect_readonly(real: Path, given: Path) -> tuple[sqlite3.Connection, str]:
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


def os_reason(exc: OSError, *, readonly: bool = False) -> str:
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


def lock_run(fd: int, name: str, run_key: str) -> RunLock:
    """Hold `run_key` for this process until released or the ledger is closed
    (LedgerLocked if another process holds it).

    The lock is a byte of the database file itself, so it is the file's whatever name
    reached it: a symlink, a `..` path, a bind mount (and the file has no other name:
    `open` refuses hard links). The byte is chosen by the key's hash; two keys that
    share one (one chance in half a billion) merely cannot run at the same time.
    """
    info = os.fstat(fd)
    offset = int.from_bytes(hashlib.sha256(run_key.encode()).digest()[:4]) % _LOCK_SPAN
    held = (info.st_dev, info.st_ino, offset)
    busy = LedgerLocked(
        f"another process is running run key {run_key!r} on ledger {name}: nothing was sent"
    )
    with _HELD_LOCK:
        if held in _HELD:
            raise busy
        try:
            _lock_byte(fd, offset, fcntl.F_WRLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise busy from None
            raise LedgerError(
                f"ledger {name}: cannot lock run key {run_key!r}: {os_reason(exc)}"
            ) from None
        _HELD.add(held)
    return RunLock(fd, held)
