"""How a report file is written: into a temporary file beside the target that replaces it
only once complete; temporary files a killed writer left on this host are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path


def temp_host() -> str:
    """This machine's name as temporary file names carry it: letters, digits and hyphens."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists here (a pid reused since counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # not ours to signal, or not a pid at all: keep its file
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Remove temporary files of `target` left by writers on this host that no longer run.

    A writer killed outright (SIGKILL, a power cut) never runs its cleanup; without this its
    half-written file would sit beside the report for good.
    """
    own = re.compile(
        rf"\.{re.escape(target.name)}\.{re.escape(temp_host())}\.(\d{{1,10}})\.[0-9a-f]{{12}}\.tmp"
    )
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return  # an unreadable folder: the write itself will say what is wrong
    for entry in entries:
        match = own.fullmatch(entry.name)
        if match is None or int(match[1]) == os.getpid() or _pid_alive(int(match[1])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target`; on success move it onto `target`.

    The temporary file is removed however the block ends (an error, a cancellation); its name
    carries this host and pid, so that the next write can remove one a killed writer left.
    """
    _remove_stale_temps(target)
    tmp = target.with_name(f".{target.name}.{temp_host()}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600: the report is shared.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        # Flushed to disk before the rename, or a power cut could leave an empty report.
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
