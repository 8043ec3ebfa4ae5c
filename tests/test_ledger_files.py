"""The SQLite ledger file: one run lock whatever the file's name, and nothing but a ledger
taken for one (an empty, foreign, damaged, newer, read-only or full one is a LedgerError).

Locks are taken in other processes (POSIX locks never conflict within one): `child` runs a
short script with this worktree's `runner` and reports what it raised.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner.domain import JobRow
from runner.errors import LedgerError, LedgerLocked
from runner.ledger import APPLICATION_ID, SCHEMA_VERSION, RunSpec
from runner.ledger import SqliteLedger as Ledger
from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import serve_sandbox
from tests.e2e import TOKEN, Completed, clean_env, command, read_csv_report, run_cli, write_job

ROOT = Path(__file__).resolve().parents[1]
KEY = "payroll"

# What a child script has before its body: the ledger, and a way to say what happened.
PRELUDE = """\
import json, sys
from runner.errors import LedgerError, LedgerLocked
from runner.ledger import SqliteLedger as Ledger

def report(**fields):
    print(json.dumps(fields))

def attempt(action):
    try:
        action()
    except (LedgerError, LedgerLocked) as exc:
        report(raised=type(exc).__name__, message=str(exc))
    else:
        report(raised=None)
"""


def child(
    body: str, cwd: Path, *, wrap: list[str] | None = None, check: bool = True
) -> dict[str, Any]:
    """Run PRELUDE + `body` in a new Python process (optionally under `wrap`, e.g. unshare);
    the JSON object it printed last."""
    script = PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*(wrap or []), sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    found: dict[str, Any] = json.loads(lines[-1])
    return found


def lock_in_child(spelling: str, cwd: Path) -> dict[str, Any]:
    return child(f"attempt(lambda: Ledger.open({spelling!r}).lock({KEY!r}))", cwd)


def new_ledger(path: Path, rows: int = 3) -> Path:
    ledger = Ledger.open(path)
    try:
        job = [JobRow(n, f"card-{n}", Decimal("10.00")) for n in range(1, rows + 1)]
        ledger.create_run(RunSpec(KEY, "sandbox", "x", "job.csv", "d", (), rows), job)
    finally:
        ledger.close()
    return path


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """A ledger at tmp_path/data/ledger.sqlite whose run key KEY this process holds."""
    path = new_ledger(tmp_path / "data" / "ledger.sqlite")
    ledger = Ledger.open(path)
    ledger.lock(KEY)
    try:
        yield path
    finally:
        ledger.close()


# -- one lock whatever the name --------------------------------------------------------------


def test_second_process_by_the_same_path_is_locked_out(held: Path) -> None:
    """The plain case: the same path in another process gets LedgerLocked."""
    found = lock_in_child(str(held), held.parent)
    assert found["raised"] == "LedgerLocked"
    assert KEY in found["message"]


def test_second_process_through_a_symlink_is_locked_out(held: Path, tmp_path: Path) -> None:
    """A symlink to the ledger names the same lock."""
    (tmp_path / "link.sqlite").symlink_to(held)
    assert lock_in_child("link.sqlite", tmp_path)["raised"] == "LedgerLocked"


def test_second_process_through_a_linked_folder_is_locked_out(held: Path, tmp_path: Path) -> None:
    """A symlink to the ledger's folder names the same lock."""
    (tmp_path / "alias").symlink_to(held.parent, target_is_directory=True)
    assert lock_in_child("alias/ledger.sqlite", tmp_path)["raised"] == "LedgerLocked"


def test_second_process_through_a_dotdot_path_is_locked_out(held: Path, tmp_path: Path) -> None:
    """`sub/../ledger.sqlite`, or a relative path from elsewhere, names the same lock."""
    (held.parent / "sub").mkdir()
    assert lock_in_child("data/sub/../ledger.sqlite", tmp_path)["raised"] == "LedgerLocked"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert lock_in_child("../data/ledger.sqlite", elsewhere)["raised"] == "LedgerLocked"


def test_second_process_through_a_bind_mount_is_locked_out(held: Path, tmp_path: Path) -> None:
    """The ledger's folder mounted a second time elsewhere names the same lock."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    found = in_mount_namespace(
        f"mount --bind {held.parent} {mirror}",
        f"attempt(lambda: Ledger.open({str(mirror / 'ledger.sqlite')!r}).lock({KEY!r}))",
        tmp_path,
    )
    assert found["raised"] == "LedgerLocked"


def test_a_second_ledger_in_the_same_process_is_locked_out(held: Path, tmp_path: Path) -> None:
    """Within one process too, another opening of the file cannot take a held key."""
    (tmp_path / "link.sqlite").symlink_to(held)
    other = Ledger.open(tmp_path / "link.sqlite")
    try:
        with pytest.raises(LedgerLocked):
            other.lock(KEY)
    finally:
        other.close()


def test_closing_another_connection_keeps_the_lock(held: Path, tmp_path: Path) -> None:
    """Opening and closing the ledger again in the lock holder's process (as `records` and a
    report do) leaves the run key locked for other processes."""
    again = Ledger.open(held)
    list(again.records(KEY))
    sqlite3.connect(held).close()
    again.close()
    assert lock_in_child(str(held), tmp_path)["raised"] == "LedgerLocked"


def test_another_run_key_and_a_closed_ledger_are_free(tmp_path: Path) -> None:
    """The lock is per run key, and close releases it."""
    path = new_ledger(tmp_path / "ledger.sqlite")
    ledger = Ledger.open(path)
    ledger.lock(KEY)
    try:
        found = child(f"attempt(lambda: Ledger.open({str(path)!r}).lock('other-key'))", tmp_path)
        assert found["raised"] is None
    finally:
        ledger.close()
    assert lock_in_child(str(path), tmp_path)["raised"] is None


def test_a_hard_linked_ledger_is_refused(tmp_path: Path) -> None:
    """A ledger file with a second name (a hard link) is refused under either name."""
    path = new_ledger(tmp_path / "ledger.sqlite")
    os.link(path, tmp_path / "copy.sqlite")
    for name in ("ledger.sqlite", "copy.sqlite"):
        for readonly in (False, True):
            with pytest.raises(LedgerError, match="2 names") as caught:
                Ledger.open(tmp_path / name, readonly=readonly)
            assert name in str(caught.value)


def test_a_link_left_by_an_interrupted_creation_is_cleared(tmp_path: Path) -> None:
    """A creation killed between linking the built ledger and unlinking its build name leaves
    a second name that the next open removes."""
    path = new_ledger(tmp_path / "ledger.sqlite")
    os.link(path, tmp_path / ".ledger.sqlite.k2j4x9.building")
    Ledger.open(path).close()
    assert os.stat(path).st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir() if "building" in p.name) == []


def test_a_read_only_open_counts_out_a_creation_s_link_and_leaves_it(tmp_path: Path) -> None:
    """Read-only, that second name is no reason to refuse the ledger, nor removed."""
    path = new_ledger(tmp_path / "ledger.sqlite")
    left = tmp_path / ".ledger.sqlite.k2j4x9.building"
    os.link(path, left)
    ledger = Ledger.open(path, readonly=True)
    try:
        assert [r.run_key for r in ledger.overview()] == [KEY]
    finally:
        ledger.close()
    assert left.exists()


# -- nothing but a ledger is taken for one ---------------------------------------------------


def refused(path: Path, match: str, *, readonly: bool = False) -> str:
    """Open must refuse `path` with `match` in its one-line message, leaving it unchanged."""
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=match) as caught:
        Ledger.open(path, readonly=readonly)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert path.read_bytes() == before
    return message


def test_an_empty_file_is_refused_not_initialised(tmp_path: Path) -> None:
    """A zero-byte ledger is not taken for a new one."""
    path = tmp_path / "ledger.sqlite"
    path.touch()
    assert "delete the file" in refused(path, "empty")


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_text("card_id,amount\n", encoding="utf-8")
    refused(path, "not a SQLite database")


def test_a_sqlite_database_of_other_tables_is_refused(tmp_path: Path) -> None:
    """Another program's database (or an empty one) is neither adopted nor converted."""
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    assert "'invoices'" in refused(path, "not a topup-runner ledger")
    empty = tmp_path / "empty.sqlite"
    conn = sqlite3.connect(empty)
    conn.execute("PRAGMA user_version = 0")
    conn.execute("VACUUM")  # writes the header: a database with no table
    conn.close()
    assert empty.stat().st_size > 0
    refused(empty, "not a topup-runner ledger")


def test_another_programs_application_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    new_ledger(path)
    stamp(path, "PRAGMA application_id = 1234")
    refused(path, "another program")


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A ledger written by a newer topup-runner is not opened (nor downgraded)."""
    path = tmp_path / "ledger.sqlite"
    new_ledger(path)
    stamp(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    refused(path, "newer topup-runner")


def test_a_stamped_ledger_missing_a_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    new_ledger(path)
    stamp(path, "DROP TABLE attempts")
    refused(path, "damaged")


def test_a_new_ledger_is_stamped_and_leaves_no_litter(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "ledger.sqlite"
    Ledger.open(path).close()
    assert stamps(path) == (APPLICATION_ID, SCHEMA_VERSION)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.sqlite"]


def test_an_interrupted_creation_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while building a new ledger: no file at the path, so the next run creates it
    again instead of finding an empty one."""
    path = tmp_path / "ledger.sqlite"

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("runner.ledger.files.os.link", killed)
    with pytest.raises(KeyboardInterrupt):
        Ledger.open(path)
    assert list(tmp_path.iterdir()) == []


def test_processes_creating_one_ledger_at_once_share_it(tmp_path: Path) -> None:
    """Four processes opening a new ledger together all get the same one."""
    path = tmp_path / "ledger.sqlite"
    body = f"""
        from decimal import Decimal
        from runner.domain import JobRow
        from runner.ledger import RunSpec
        key = sys.argv[1]
        ledger = Ledger.open({str(path)!r})
        ledger.create_run(RunSpec(key, "sandbox", "x", "j", "d", (), 1),
                          [JobRow(1, "c", Decimal("10.00"))])
        ledger.close()
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = PRELUDE + textwrap.dedent(body)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"run-{n}"], env=env, cwd=tmp_path)
        for n in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    ledger = Ledger.open(path)
    try:
        assert sorted(r.run_key for r in ledger.overview()) == [f"run-{n}" for n in range(4)]
    finally:
        ledger.close()


LEGACY_SCHEMA = """
CREATE TABLE runs (run_key TEXT PRIMARY KEY, provider TEXT NOT NULL, base_url TEXT NOT NULL,
    job_file TEXT NOT NULL, job_digest TEXT NOT NULL, extra_columns TEXT NOT NULL,
    row_count INTEGER NOT NULL, created_at TEXT NOT NULL, finished_at TEXT);
CREATE TABLE rows (run_key TEXT NOT NULL, row INTEGER NOT NULL, card_id TEXT NOT NULL,
    amount TEXT NOT NULL, reference TEXT NOT NULL, extra TEXT NOT NULL, status TEXT NOT NULL,
    fee TEXT, total_charged TEXT, card_balance_before TEXT, card_balance_after TEXT,
    wallet_balance_after TEXT, transaction_id TEXT, invoice_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, started_at TEXT, finished_at TEXT,
    PRIMARY KEY (run_key, row)) WITHOUT ROWID;
CREATE TABLE attempts (run_key TEXT NOT NULL, row INTEGER NOT NULL, attempt INTEGER NOT NULL,
    card_id TEXT NOT NULL, amount TEXT NOT NULL, before_status TEXT, before_balance TEXT,
    before_deposit TEXT, sent_at TEXT NOT NULL, outcome TEXT, detail TEXT, finished_at TEXT,
    PRIMARY KEY (run_key, row, attempt)) WITHOUT ROWID;
INSERT INTO runs VALUES ('old', 'uncash', 'u', 'job.csv', 'd0', '[]', 1,
    '2026-01-02T03:04:05.000+00:00', NULL);
INSERT INTO rows (run_key, row, card_id, amount, reference, extra, status, attempts)
    VALUES ('old', 1, 'c1', '10.00', 'R', '[]', 'not_attempted', 1);
INSERT INTO attempts (run_key, row, attempt, card_id, amount, sent_at)
    VALUES ('old', 1, 1, 'c1', '10.00', '2026-01-02T03:04:06.000+00:00');
"""


def test_an_unstamped_ledger_of_an_earlier_version_opens_and_is_stamped(tmp_path: Path) -> None:
    """The earliest ledgers (no provider_ref, no stamp, WAL) open with their rows intact."""
    path = tmp_path / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(LEGACY_SCHEMA)
    conn.close()
    ledger = Ledger.open(path)
    try:
        [found] = ledger.open_attempts("old")
        assert (found.row, found.card_id, found.settle_by) == (1, "c1", None)
        assert ledger.progress("old")[1].attempts == 1
        assert [r.run_key for r in ledger.runs_with_digest("d0")] == ["old"]
    finally:
        ledger.close()
    assert stamps(path) == (APPLICATION_ID, SCHEMA_VERSION)


# -- every SQLite error is a LedgerError -------------------------------------------------------


def damage(path: Path, start: float, end: float) -> None:
    """Overwrite the part [start, end) of the file (fractions of its size) with garbage."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(int(size * start))
        handle.write(b"\xa5" * (int(size * end) - int(size * start)))


def test_damaged_pages_are_ledger_errors_on_every_read_and_write(tmp_path: Path) -> None:
    """A ledger whose data pages are garbage: reads, streamed records and commits all raise
    LedgerError naming the ledger and saying what it means."""
    path = new_ledger(tmp_path / "ledger.sqlite", rows=3000)
    damage(path, 0.3, 0.7)
    ledger = Ledger.open(path)  # the header and schema are intact
    try:
        for read in (ledger.progress, ledger.totals, ledger.status_counts, list):
            arg: Any = ledger.records(KEY) if read is list else KEY
            with pytest.raises(LedgerError, match="malformed") as caught:
                read(arg)
            assert str(path) in str(caught.value)
            assert "restore" in str(caught.value)
        update = [Ledger.row_update(KEY, n, error="x") for n in range(1, 3001)]
        with pytest.raises(LedgerError, match="malformed"):
            anyio.run(ledger.write, update)
    finally:
        ledger.close()


def test_a_damaged_schema_page_is_a_ledger_error_at_open(tmp_path: Path) -> None:
    path = new_ledger(tmp_path / "ledger.sqlite")
    with path.open("r+b") as handle:
        handle.seek(100)  # past SQLite's header: the schema's own page
        handle.write(b"\xa5" * 3000)
    with pytest.raises(LedgerError, match="cannot be opened"):
        Ledger.open(path)


def test_records_of_a_closed_ledger_is_a_ledger_error(tmp_path: Path) -> None:
    """A report still streaming when the ledger closes gets a LedgerError, not SQLite's."""
    ledger = Ledger.open(new_ledger(tmp_path / "ledger.sqlite"))
    records = ledger.records(KEY)
    next(records)
    ledger.close()
    with pytest.raises(LedgerError):
        list(records)


def test_a_damaged_value_in_a_row_is_a_ledger_error(tmp_path: Path) -> None:
    path = new_ledger(tmp_path / "ledger.sqlite")
    stamp(path, "UPDATE rows SET amount = 'ten' WHERE row = 2")
    ledger = Ledger.open(path)
    try:
        with pytest.raises(LedgerError, match="row 2"):
            list(ledger.records(KEY))
    finally:
        ledger.close()


# -- read-only ledgers are found at open -------------------------------------------------------


def mount_namespace(setup: str) -> list[str]:
    """The command prefix that runs a program in a private mount namespace after the shell
    `setup`; skips where mount namespaces cannot be made (not root, no CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("cannot make a private mount namespace here")
    return ["unshare", "-m", "--propagation", "private", "sh", "-ec", f'{setup}; exec "$@"', "sh"]


def in_mount_namespace(setup: str, body: str, cwd: Path) -> dict[str, Any]:
    """`body` in a child process in a private mount namespace after the shell `setup`."""
    return child(body, cwd, wrap=mount_namespace(setup))


def test_a_ledger_on_a_read_only_mount_is_refused_at_open(tmp_path: Path) -> None:
    """Read-only folder and file (a read-only mount): LedgerError at open, for an existing
    ledger and for a new one."""
    folder = tmp_path / "ro"
    path = new_ledger(folder / "ledger.sqlite")
    setup = f"mount --bind {folder} {folder}; mount -o remount,bind,ro {folder}"
    found = in_mount_namespace(setup, f"attempt(lambda: Ledger.open({str(path)!r}))", tmp_path)
    assert found["raised"] == "LedgerError"
    assert "writable" in found["message"]
    new = folder / "new.sqlite"
    found = in_mount_namespace(setup, f"attempt(lambda: Ledger.open({str(new)!r}))", tmp_path)
    assert found["raised"] == "LedgerError"
    assert not new.exists()


def test_a_read_only_ledger_file_is_refused_at_open(tmp_path: Path) -> None:
    """The file alone read-only (its folder writable)."""
    path = new_ledger(tmp_path / "ledger.sqlite")
    setup = f"mount --bind {path} {path}; mount -o remount,bind,ro {path}"
    found = in_mount_namespace(setup, f"attempt(lambda: Ledger.open({str(path)!r}))", tmp_path)
    assert found["raised"] == "LedgerError"
    assert "writable" in found["message"]


def test_a_ledger_in_a_read_only_folder_is_refused_at_open(tmp_path: Path) -> None:
    """The file writable but its folder not (SQLite cannot make its -wal file there)."""
    folder = tmp_path / "ro"
    path = new_ledger(folder / "ledger.sqlite")
    alt = tmp_path / "alt"
    alt.mkdir()
    setup = (
        f"mount --bind {folder} {alt}; mount --bind {folder} {folder}; "
        f"mount -o remount,bind,ro {folder}; mount --bind {alt}/ledger.sqlite {path}"
    )
    found = in_mount_namespace(setup, f"attempt(lambda: Ledger.open({str(path)!r}))", tmp_path)
    assert found["raised"] == "LedgerError"
    assert "folder must exist and be writable" in found["message"]


# -- read-only opens: status, report and check read a ledger they may not write ------------


def read_only(folder: Path) -> str:
    """The mount-namespace setup that makes `folder` (and all in it) read-only."""
    return f"mount --bind {folder} {folder}; mount -o remount,bind,ro {folder}"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """What is in `folder`: every file's bytes and modification time, by name."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_read_only_open_refuses_what_a_writable_open_refuses(tmp_path: Path) -> None:
    """Empty, not SQLite, another program's, newer, damaged: refused read-only too, unchanged."""
    cases: dict[Path, str] = {}
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    cases[empty] = "empty"
    text = tmp_path / "text.sqlite"
    text.write_text("card_id,amount\n", encoding="utf-8")
    cases[text] = "not a SQLite database"
    other = tmp_path / "other.sqlite"
    stamp(other, "CREATE TABLE invoices (id INTEGER)")
    cases[other] = "not a topup-runner ledger"
    for name, sql, match in (
        ("foreign", "PRAGMA application_id = 1234", "another program"),
        ("newer", f"PRAGMA user_version = {SCHEMA_VERSION + 1}", "newer topup-runner"),
        ("damaged", "DROP TABLE attempts", "damaged"),
    ):
        path = new_ledger(tmp_path / f"{name}.sqlite")
        stamp(path, sql)
        cases[path] = match
    for path, match in cases.items():
        refused(path, match, readonly=True)


def test_a_read_only_open_never_creates_a_ledger(tmp_path: Path) -> None:
    """No file there: a LedgerError saying so; neither the file nor its folder is made."""
    path = tmp_path / "missing" / "ledger.sqlite"
    with pytest.raises(LedgerError, match="no such file"):
        Ledger.open(path, readonly=True)
    assert not path.parent.exists()
    path.parent.mkdir()
    with pytest.raises(LedgerError, match="no such file"):
        Ledger.open(path, readonly=True)
    assert list(path.parent.iterdir()) == []


def test_a_read_only_open_reads_an_old_ledger_as_it_is(tmp_path: Path) -> None:
    """An unstamped ledger of an earlier version is read, neither stamped nor migrated."""
    path = tmp_path / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(LEGACY_SCHEMA)
    conn.close()
    before = path.read_bytes()
    ledger = Ledger.open(path, readonly=True)
    try:
        assert [r.run_key for r in ledger.overview()] == ["old"]
        assert [r.run_key for r in ledger.runs_with_digest("d0")] == ["old"]
        assert ledger.fee_samples("uncash") == []
        [record] = ledger.records("old")
        assert (record.card_id, record.amount) == ("c1", Decimal("10.00"))
    finally:
        ledger.close()
    assert path.read_bytes() == before
    assert stamps(path) == (0, 0)


def test_a_read_only_ledger_takes_no_run_lock_and_writes_nothing(tmp_path: Path) -> None:
    """A reader holds no run key (a run may start meanwhile) and refuses every write."""
    path = new_ledger(tmp_path / "ledger.sqlite")
    before = path.read_bytes()
    ledger = Ledger.open(path, readonly=True)
    try:
        with pytest.raises(LedgerError, match="read-only"):
            ledger.lock(KEY)
        with pytest.raises(LedgerError, match="read-only"):
            anyio.run(ledger.write, [Ledger.row_update(KEY, 1, error="x")])
        with pytest.raises(LedgerError, match=str(path)):
            ledger.finish_run(KEY)
        assert path.read_bytes() == before
        assert lock_in_child(str(path), tmp_path)["raised"] is None
    finally:
        ledger.close()


def test_a_read_only_open_names_the_file_whatever_its_name(tmp_path: Path) -> None:
    """A folder whose name is URI syntax (?, #, %) still names that very file."""
    (tmp_path / "a").mkdir()  # what the name would be cut to if taken as a URI
    path = new_ledger(tmp_path / "a?mode=rwc#b %41" / "ledger.sqlite")
    ledger = Ledger.open(path, readonly=True)
    try:
        assert [r.run_key for r in ledger.overview()] == [KEY]
        assert len(list(ledger.records(KEY))) == 3
    finally:
        ledger.close()
    assert list((tmp_path / "a").iterdir()) == []


def test_a_ledger_in_a_read_only_folder_is_read_and_left_as_it_is(tmp_path: Path) -> None:
    """On a read-only mount, where SQLite can make no -wal or -shm file, a ledger closed
    cleanly is read, its rows streamed, and nothing is written."""
    folder = tmp_path / "ro"
    path = new_ledger(folder / "ledger.sqlite")
    before = snapshot(folder)
    body = f"""
        ledger = Ledger.open({str(path)!r}, readonly=True)
        runs = [r.run_key for r in ledger.overview()]
        rows = [r.row for r in ledger.records({KEY!r})]
        ledger.close()
        report(runs=runs, rows=rows)
    """
    found = in_mount_namespace(read_only(folder), body, tmp_path)
    assert found == {"runs": [KEY], "rows": [1, 2, 3]}
    assert snapshot(folder) == before


def killed_writer(path: Path, cwd: Path) -> None:
    """A process records a second run, `late`, and dies: the run is only in the -wal."""
    body = f"""
        import os
        from decimal import Decimal
        from runner.jobs import JobRow
        from runner.ledger import RunSpec
        ledger = Ledger.open({str(path)!r})
        spec = RunSpec("late", "sandbox", "x", "job2.csv", "d2", (), 1)
        ledger.create_run(spec, [JobRow(1, "card-9", Decimal("5.00"))])
        report(done=True)
        sys.stdout.flush()
        os._exit(0)
    """
    assert child(body, cwd) == {"done": True}
    assert Path(f"{path}-wal").stat().st_size > 0


def test_a_read_only_open_reads_what_a_killed_run_left_in_its_wal(tmp_path: Path) -> None:
    """In a read-only folder, the records still only in the -wal are read (through its
    -shm), not silently left out."""
    folder = tmp_path / "ro"
    path = new_ledger(folder / "ledger.sqlite")
    killed_writer(path, tmp_path)
    before = snapshot(folder)
    body = f"""
        ledger = Ledger.open({str(path)!r}, readonly=True)
        report(runs=sorted(r.run_key for r in ledger.overview()))
        ledger.close()
    """
    assert in_mount_namespace(read_only(folder), body, tmp_path) == {"runs": ["late", KEY]}
    assert snapshot(folder) == before


def test_a_wal_without_its_shm_in_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    """A -wal that SQLite cannot read there (no -shm, none can be made): a LedgerError that
    says what to do, rather than a ledger read without its latest records."""
    folder = tmp_path / "ro"
    path = new_ledger(folder / "ledger.sqlite")
    killed_writer(path, tmp_path)
    Path(f"{path}-shm").unlink()
    body = f"attempt(lambda: Ledger.open({str(path)!r}, readonly=True))"
    found = in_mount_namespace(read_only(folder), body, tmp_path)
    assert found["raised"] == "LedgerError"
    assert f"{path}-wal" in found["message"]
    assert "writable folder" in found["message"]


async def cli_in(wrap: list[str], *args: str, cwd: Path, env: dict[str, str]) -> Completed:
    """`topup-runner ARGS` under `wrap` (a mount namespace), the event loop serving on."""
    done = await anyio.run_process(
        [*wrap, *command(*args)], cwd=cwd, env=env, check=False, stdin=subprocess.DEVNULL
    )
    return Completed(done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.mark.anyio
async def test_status_report_and_check_read_a_ledger_on_a_read_only_mount(
    tmp_path: Path,
) -> None:
    """An auditor's read-only copy of a ledger: status, report and check succeed, and
    nothing is written into the ledger's folder."""
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "ledger.sqlite"
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "X") for _ in range(2)])
    env = clean_env(UNCASH_API_TOKEN=TOKEN)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        target = ["--provider", "uncash", "--base-url", sb.base_url, "--ledger", str(path)]
        done = await run_cli(
            "run",
            str(job),
            *target,
            "--run-key",
            "nov-1",
            "--cooldown",
            "0.3",
            "--output",
            str(tmp_path / "report.csv"),
            "--log-format",
            "json",
            cwd=tmp_path,
            env=env,
        )
        assert done.code == 0, done.stderr
        before = snapshot(folder)
        wrap = mount_namespace(read_only(folder))
        status = await cli_in(wrap, "status", "--ledger", str(path), cwd=tmp_path, env=env)
        assert status.code == 0, status.stderr
        assert "nov-1" in status.stdout
        assert "succeeded=2" in status.stdout
        again = tmp_path / "out" / "again.csv"
        rewritten = await cli_in(
            wrap,
            "report",
            "--ledger",
            str(path),
            "--run-key",
            "nov-1",
            "--output",
            str(again),
            cwd=tmp_path,
            env=env,
        )
        assert rewritten.code == 0, rewritten.stderr
        assert [r["status"] for r in read_csv_report(again)] == ["succeeded"] * 2
        checked = await cli_in(
            wrap, "check", str(job), *target, "--log-format", "json", cwd=tmp_path, env=env
        )
        assert checked.code == 0, checked.stderr
        # The key a run would take is the earlier run's, read from the ledger.
        assert "run key: nov-1" in checked.stdout + checked.stderr
        assert len(sb.state.topup_arrivals) == 2
    assert snapshot(folder) == before


@pytest.mark.anyio
async def test_a_missing_ledger_is_no_runs_to_status_an_error_to_report_none_to_check(
    tmp_path: Path,
) -> None:
    """No ledger there: status says so (no runs, exit 0), report fails (exit 2), check goes
    on without one, and none of them makes the file or its folder."""
    missing = tmp_path / "none" / "ledger.sqlite"
    status = await run_cli("status", "--ledger", str(missing), cwd=tmp_path)
    assert status.code == 0
    assert "no ledger at" in status.stdout
    rewritten = await run_cli(
        "report", "--ledger", str(missing), "--run-key", "k", "--output", "r.csv", cwd=tmp_path
    )
    assert rewritten.code == 2
    assert "no such file" in rewritten.stderr
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "X")])
    checked = await run_cli("check", str(job), "--ledger", str(missing), cwd=tmp_path)
    assert checked.code == 0, checked.stderr
    assert not missing.parent.exists()


@pytest.mark.anyio
async def test_a_run_on_a_read_only_mount_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    """`run` still opens the ledger writable: on a read-only mount it stops with exit 2."""
    folder = tmp_path / "ro"
    path = new_ledger(folder / "ledger.sqlite")
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "X")])
    before = snapshot(folder)
    env = clean_env(UNCASH_API_TOKEN=TOKEN)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await cli_in(
            mount_namespace(read_only(folder)),
            "run",
            str(job),
            "--provider",
            "uncash",
            "--base-url",
            sb.base_url,
            "--ledger",
            str(path),
            "--output",
            str(tmp_path / "report.csv"),
            cwd=tmp_path,
            env=env,
        )
        arrivals = len(sb.state.topup_arrivals)
    assert done.code == 2, done.stderr
    assert "writable" in done.stderr
    assert arrivals == 0
    assert snapshot(folder) == before


# -- a full disk is a LedgerError ---------------------------------------------------------------


def test_a_full_disk_during_commits_is_a_ledger_error(tmp_path: Path) -> None:
    """Writes under a file-size limit (a full disk as the process sees it) end in LedgerError;
    every write that returned is on disk, and the ledger opens again afterwards."""
    path = new_ledger(tmp_path / "ledger.sqlite", rows=5000)
    body = f"""
        import resource, signal
        from decimal import Decimal
        import anyio
        from runner.ledger import utcnow
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        ledger = Ledger.open({str(path)!r})
        limit = {path.stat().st_size} + 96 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        written = []

        async def fill():
            for row in range(1, 5001):
                intent = Ledger.intent({KEY!r}, row, 1, f"card-{{row}}", Decimal("10.00"),
                                       None, utcnow())
                await ledger.write(intent + [Ledger.row_update({KEY!r}, row, error="x" * 300)])
                written.append(row)

        try:
            anyio.run(fill)
        except LedgerError as exc:
            after = None
            try:
                ledger.post([])
            except LedgerError:
                after = "LedgerError"
            report(raised="LedgerError", message=str(exc), written=written, after=after)
        else:
            report(raised=None, written=written)
    """
    found = child(body, tmp_path)
    assert found["raised"] == "LedgerError", found
    assert found["after"] == "LedgerError"
    assert "\n" not in found["message"]
    assert str(path) in found["message"]
    written = found["written"]
    assert written
    conn = sqlite3.connect(path)
    on_disk = {row for (row,) in conn.execute("SELECT row FROM attempts")}
    conn.close()
    assert set(written) <= on_disk
    Ledger.open(path).close()


# -- helpers ----------------------------------------------------------------------------------


def stamp(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql)
    conn.commit()
    conn.close()


def stamps(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    return app, version


def test_without_hard_links_a_new_ledger_is_copied_in_and_never_replaces_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without link(2), creation claims the name with O_EXCL instead: the
    ledger is whole, and a file that appeared meanwhile is kept, not replaced."""

    def no_links(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("runner.ledger.files.os.link", no_links)
    path = tmp_path / "ledger.sqlite"
    new_ledger(path)
    assert stamps(path) == (APPLICATION_ID, SCHEMA_VERSION)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]

    other = tmp_path / "other.sqlite"

    def someone_else_first(*args: object) -> None:
        other.write_bytes(b"theirs")  # appears just before our claim on the name
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("runner.ledger.files.os.link", someone_else_first)
    with pytest.raises(LedgerError, match="not a SQLite database"):
        Ledger.open(other)
    assert other.read_bytes() == b"theirs"


def test_a_ledger_another_process_is_writing_opens_without_waiting(tmp_path: Path) -> None:
    """The write check at open takes another writer's lock as proof the file can be written,
    rather than waiting for it (a large create_run) or failing."""
    path = new_ledger(tmp_path / "ledger.sqlite")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        Ledger.open(path).close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_truly_full_file_system_is_a_ledger_error(tmp_path: Path) -> None:
    """On a small tmpfs that fills up (ENOSPC, SQLite's "disk is full"), writes end in a
    LedgerError that says so; every write that returned can be read back."""
    mount = tmp_path / "small"
    mount.mkdir()
    body = f"""
        import sqlite3
        from decimal import Decimal
        import anyio
        from runner.domain import JobRow
        from runner.ledger import RunSpec, utcnow
        path = {str(mount / "ledger.sqlite")!r}
        ledger = Ledger.open(path)
        ledger.create_run(RunSpec("k", "sandbox", "x", "j", "d", (), 20000),
                          [JobRow(n, f"card-{{n}}", Decimal("10.00")) for n in range(1, 20001)])
        written = []

        async def fill():
            for row in range(1, 20001):
                await ledger.write(Ledger.intent("k", row, 1, f"card-{{row}}", Decimal("10.00"),
                                                 None, utcnow()))
                written.append(row)

        try:
            anyio.run(fill)
        except LedgerError as exc:
            conn = sqlite3.connect(path)
            on_disk = {{row for (row,) in conn.execute("SELECT row FROM attempts")}}
            report(raised="LedgerError", message=str(exc), written=len(written),
                   lost=sorted(set(written) - on_disk))
        else:
            report(raised=None)
    """
    found = in_mount_namespace(f"mount -t tmpfs -o size=2m tmpfs {mount}", body, tmp_path)
    assert found["raised"] == "LedgerError", found
    assert "disk is full" in found["message"]
    assert found["written"] > 0
    assert found["lost"] == []
