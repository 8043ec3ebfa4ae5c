"""A job file's bytes read safely (a regular file, within a size bound, never blocking on a
FIFO) and decoded to text: UTF-8, or UTF-16 announced by a byte-order mark, never guessed.
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path

from runner.jobs.table import Problems

# Far above any payroll (a million rows is about 60 MB); a FIFO, a device or a runaway file
# is refused before it can fill memory.
MAX_JOB_BYTES = 256 * 1024 * 1024
_GROWTH_CHUNK = 1024 * 1024


def read_text(path: Path, problems: Problems) -> str:
    return _decode(_read_bytes(path, problems), problems)


def read_bytes(path: Path, problems: Problems) -> bytes:
    """The file's bytes, read as safely as a text job's (a workbook is parsed from them)."""
    return _read_bytes(path, problems)


def _read_bytes(path: Path, problems: Problems) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_JOB_BYTES.

    Opened without blocking (a FIFO would wait for a writer) and judged by what was opened,
    not by the name (a name can be swapped for a link to /dev/zero between a check and a
    read). At most the limit plus one byte is read, as a file may grow while it is read.
    """
    limit = MAX_JOB_BYTES
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        problems.fail("no such file")
    except OSError as exc:
        problems.fail(f"cannot be read: {exc.strerror or exc}")
    parts: list[bytes] = []
    total = 0
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            problems.fail("is a directory, not a job file")
        if not stat.S_ISREG(status.st_mode):
            problems.fail(f"is {_file_kind(status.st_mode)}, not a regular file: give a job file")
        if status.st_size > limit:
            problems.fail(
                f"is {status.st_size:,} bytes: a job file may be at most {_size_text(limit)}"
            )
        # Reads of the size the file had (one, as a rule), then small ones only if it grew.
        first = min(status.st_size, limit) + 1
        while total <= limit:
            wanted = first - total if total < first else min(_GROWTH_CHUNK, limit + 1 - total)
            chunk = os.read(fd, wanted)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    except OSError as exc:
        problems.fail(f"cannot be read: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if total > limit:
        problems.fail(f"grew past {_size_text(limit)} while it was read: the limit for a job file")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device (such as /dev/zero)"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


def _size_text(size: int) -> str:
    mib = 1024 * 1024
    return f"{size // mib} MiB" if size % mib == 0 else f"{size:,} bytes"


def _decode(data: bytes, problems: Problems) -> str:
    """The file's text; anything but UTF-8 (or UTF-16 announced by a BOM) is refused, never
    guessed, because a wrong guess would silently change card ids and references."""
    if data.startswith(b"PK\x03\x04"):
        problems.fail(
            "looks like an Excel workbook, not text: name it .xlsx, or save it as CSV UTF-8"
        )
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            problems.fail("starts with a UTF-16 byte-order mark but is not valid UTF-16")
    else:
        skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        try:
            text = data[skip:].decode("utf-8")
        except UnicodeDecodeError as exc:
            offset = skip + exc.start
            line = data.count(b"\n", 0, offset) + 1
            problems.fail(
                f"is not UTF-8: byte 0x{data[offset]:02x} on line {line} (offset {offset}) "
                "is not valid UTF-8; save the file as UTF-8 (Excel: CSV UTF-8)"
            )
    if "\x00" in text:
        problems.fail(
            "contains NUL characters: it looks like UTF-16 without a byte-order mark; "
            "save it as UTF-8"
        )
    text = text.lstrip("\ufeff")
    if "\r" in text:
        # One line-ending convention, so that CRLF and LF files (and multi-line cells in
        # them) read identically and give the same content digest.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text or text.isspace():
        problems.fail("the file is empty")
    return text
