"""A SQLite ledger's file: found by its one real name, created atomically where none exists,
checked to be a SQLite database with a single name before SQLite opens it, and the run
locks (`RunLock`), one byte each of the file itself, that say which process runs a key.
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


def _remove_build_links(real: Path, info: os.stat_result) -> None:
    """Remove names of this file left by `_create` (a crash between link and unlink, or a
    creator caught in between): they are the only second names a ledger may have had."""
    prefix = f".{real.name}."
    with os.scandir(real.parent) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(_BUILDING)):
                continue
            with contextlib.suppress(OSError):
                found = entry.stat(follow_symlinks=False)
                if (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino):
                    os.unlink(entry.path)


def open_file(given: Path) -> tuple[Path, int]:
    """The ledger file's real path, and a descriptor of it open for writing (what the run
    locks are taken on), checked to be a ledger file with a single name."""
    # The one name SQLite may know the file by: its -wal and -shm files go by the name, and
    # two names of one database would mean two write-ahead logs, which corrupts it.
    real = Path(os.path.realpath(given))
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
        if info.st_nlink > 1:
            _remove_build_links(real, info)
            info = os.fstat(fd)
        if info.st_nlink > 1:
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


def os_reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
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
