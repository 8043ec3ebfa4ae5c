"""`topup-runner verify` end to end: real runs against the sandbox, then the ledger changed by
SQL or the report edited, and verify's exit code and the first problem it names."""

from __future__ import annotations

import csv
import signal
import sqlite3
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from openpyxl import load_workbook

from runner.ledger.chain import KEY_ENV
from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import TOKEN, Completed, clean_env, command, run_cli, until, write_job

pytestmark = pytest.mark.anyio

KEY = "verify-test-key-4b3c2a1d"
RUN_KEY = "verified"


def job(tmp: Path, rows: int = 4) -> Path:
    cards = [str(uuid.uuid4()) for _ in range(rows)]
    return write_job(tmp / "job.csv", [(c, f"{10 + n}.25", f"R{n}") for n, c in enumerate(cards)])


def run_args(sb: RunningSandbox, tmp: Path, output: str, ledger: str | None = None) -> list[str]:
    return [
        "--provider", "uncash", "--base-url", sb.base_url,
        "--ledger", ledger or str(tmp / "ledger.sqlite"), "--output", str(tmp / output),
        "--log-format", "json", "--run-key", RUN_KEY, "--cooldown", "0.05",
    ]  # fmt: skip


async def paid_run(tmp: Path, output: str, **env: str) -> Completed:
    """A finished sandbox run of `job` with its report at `output`."""
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        done = await run_cli(
            "run", str(job(tmp)), *run_args(sb, tmp, output),
            "--metrics-file", str(tmp / "run.prom"),
            cwd=tmp, env=clean_env(UNCASH_API_TOKEN=TOKEN, **env),
        )  # fmt: skip
    assert done.code == 0, done.stderr
    return done


async def verify(tmp: Path, *more: str, ledger: str | None = None, **env: str) -> Completed:
    where = ledger or str(tmp / "ledger.sqlite")
    return await run_cli(
        "verify", "--ledger", where, "--run-key", RUN_KEY, *more, cwd=tmp, env=clean_env(**env)
    )


def first_problem(done: Completed) -> str:
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("NOT VERIFIED")]
    return line


def sql(tmp: Path, statement: str) -> None:
    conn = sqlite3.connect(tmp / "ledger.sqlite")
    with conn:
        conn.execute(statement)
    conn.close()


def everything_in(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


# -- a clean run --------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["report.xlsx", "report.csv"])
async def test_a_clean_run_verifies_with_its_report(tmp_path: Path, output: str) -> None:
    """Ledger and report as the run left them: exit 0, and one head everywhere it is shown."""
    done = await paid_run(tmp_path, output)
    checked = await verify(tmp_path, "--report", str(tmp_path / output))
    status = await run_cli("status", "--ledger", str(tmp_path / "ledger.sqlite"), cwd=tmp_path)
    assert checked.code == 0, checked.stdout + checked.stderr
    assert "verified" in checked.stdout.splitlines()[-1]
    head = checked.stdout.split(" head ")[1].split()[0]
    algo, seq, _hash = head.split(":")
    assert (algo, int(seq) > 4) == ("sha256", True)
    assert f'"chain_head": "{head}"' in done.stderr + done.stdout  # the run.summary object
    assert f'head="{head}"' in (tmp_path / "run.prom").read_text()
    assert f"chain {head}" in status.stdout


# -- the ledger changed by SQL --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        ("UPDATE rows SET amount = '99.25' WHERE row = 3", "ledger: row 3 differs from its record"),
        (
            "UPDATE rows SET status = 'failed' WHERE row = 2",
            "ledger: row 2 differs from its record",
        ),
    ],
)
async def test_a_ledger_changed_by_sql_fails_and_names_the_row(
    tmp_path: Path, statement: str, named: str
) -> None:
    """One amount or one status changed by SQL: exit 1, the row and its record named."""
    await paid_run(tmp_path, "report.xlsx")
    sql(tmp_path, statement)
    checked = await verify(tmp_path)
    assert checked.code == 1, checked.stdout + checked.stderr
    assert named in first_problem(checked)


# -- the report edited --------------------------------------------------------------------------


async def test_an_xlsx_cell_edited_fails_and_names_the_cell(tmp_path: Path) -> None:
    """One Results cell changed with openpyxl: exit 1, its row and column named."""
    await paid_run(tmp_path, "report.xlsx")
    path = tmp_path / "report.xlsx"
    book = load_workbook(path)
    book["Results"]["C3"] = 20  # row 2's amount, 11.25 as written
    book.save(path)
    checked = await verify(tmp_path, "--report", str(path))
    assert checked.code == 1, checked.stdout + checked.stderr
    assert "Results row 3 (row 2), column amount" in first_problem(checked)
    assert "do not give the results digest" in checked.stdout


async def test_a_csv_cell_edited_fails_and_names_the_cell(tmp_path: Path) -> None:
    """One cell of the CSV report changed: exit 1, its line and column named."""
    await paid_run(tmp_path, "report.csv")
    path = tmp_path / "report.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    lines[4][lines[0].index("status")] = "failed"  # row 4
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(lines)
    checked = await verify(tmp_path, "--report", str(path))
    assert checked.code == 1, checked.stdout + checked.stderr
    assert "line 5 (row 4), column status" in first_problem(checked)


async def test_a_report_whose_ledger_was_rewritten_after_it_fails(tmp_path: Path) -> None:
    """The report's chain head is no longer in the chain: a rewritten ledger shows."""
    await paid_run(tmp_path, "report.csv")
    sql(tmp_path, "UPDATE chain SET hash = 'f00d' || substr(hash, 5) WHERE seq = "
                  "(SELECT MAX(seq) FROM chain)")  # fmt: skip
    checked = await verify(tmp_path, "--report", str(tmp_path / "report.csv"))
    assert checked.code == 1
    assert "is not in the ledger's chain" in checked.stdout


@pytest.mark.parametrize(
    ("report", "says"),
    [("missing.xlsx", "no such file"), ("job.csv", "job.summary.csv"), ("ledger.sqlite", "format")],
)
async def test_a_report_that_cannot_be_read_is_one_line_and_exit_2(
    tmp_path: Path, report: str, says: str
) -> None:
    """No traceback: one line naming the file, exit 2."""
    await paid_run(tmp_path, "report.csv")
    checked = await verify(tmp_path, "--report", str(tmp_path / report))
    assert checked.code == 2, checked.stderr
    assert says in checked.stderr
    assert "Traceback" not in checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1


async def test_an_unknown_run_or_ledger_is_exit_2(tmp_path: Path) -> None:
    """Nothing to verify is not a verdict: one line, exit 2."""
    missing = await verify(tmp_path)
    assert (missing.code, "no such file" in missing.stderr) == (2, True)


# -- the key ------------------------------------------------------------------------------------


async def test_a_keyed_run_verifies_only_with_its_key_which_is_nowhere_written(
    tmp_path: Path,
) -> None:
    """TOPUP_LEDGER_KEY keys the chain: the same key verifies (0), another does not (1), none
    cannot (2); the key is in no file the run wrote and in none of its output."""
    done = await paid_run(tmp_path, "report.xlsx", **{KEY_ENV: KEY})
    right = await verify(tmp_path, "--report", str(tmp_path / "report.xlsx"), **{KEY_ENV: KEY})
    wrong = await verify(tmp_path, **{KEY_ENV: "not-the-key"})
    none = await verify(tmp_path)
    assert right.code == 0, right.stdout + right.stderr
    assert "hmac-sha256" in right.stdout
    assert wrong.code == 1
    assert "record #1 (the run's start) does not fit" in first_problem(wrong)
    assert (none.code, KEY_ENV in none.stderr) == (2, True)
    written = await anyio.to_thread.run_sync(everything_in, tmp_path)
    said = (done.stdout + done.stderr + right.stdout + right.stderr + wrong.stdout).encode()
    assert KEY.encode() not in written + said
    assert KEY[:10].encode() not in written + said


# -- after a kill, and with two workers -----------------------------------------------------


async def test_a_run_killed_and_resumed_verifies(tmp_path: Path) -> None:
    """SIGKILL mid-run, then the rerun: the chain holds across both processes."""
    path = job(tmp_path, rows=30)
    config = SandboxConfig(token=TOKEN, cooldown=0.05, slow_seconds=0.3, fault_rate=0.2, seed=3)
    async with serve_sandbox(config) as sb:
        args = [*run_args(sb, tmp_path, "report.csv"), "--timeout", "0.2", "--apply-grace", "1"]
        with (tmp_path / "killed.log").open("ab") as log:
            process: anyio.abc.Process = await anyio.open_process(
                command("run", str(path), *args, "--rate-limit", "20"),
                cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        await until(lambda: len(sb.state.applied) >= 5 or process.returncode is not None)
        assert process.returncode is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        rerun = await run_cli(
            "run", str(path), *args, cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN)
        )
    assert rerun.code in (0, 1), rerun.stderr
    checked = await verify(tmp_path, "--report", str(tmp_path / "report.csv"))
    assert checked.code == 0, checked.stdout + checked.stderr


async def test_two_workers_on_postgresql_verify(pg_url: str, tmp_path: Path) -> None:
    """Two workers sharing a PostgreSQL ledger: one chain, and each worker's report holds."""
    path = job(tmp_path, rows=24)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:

        async def worker(name: str) -> None:
            done = await run_cli(
                "run", str(path), *run_args(sb, tmp_path, f"{name}.csv", pg_url),
                cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
            )  # fmt: skip
            assert done.code == 0, done.stderr

        async with anyio.create_task_group() as group:
            group.start_soon(worker, "w0")
            group.start_soon(worker, "w1")
    checked = await verify(tmp_path, "--report", str(tmp_path / "w1.csv"), ledger=pg_url)
    assert checked.code == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("output", ["report.xlsx", "report.csv"])
async def test_a_split_run_verifies_with_its_joined_report(tmp_path: Path, output: str) -> None:
    """--split-over-max: Results shows job rows joined from their chunks, and still verifies;
    a chunk's amount changed by SQL is named by its ledger row."""
    cards = [str(uuid.uuid4()) for _ in range(2)]
    path = write_job(tmp_path / "job.csv", [(cards[0], "25000.00", "A"), (cards[1], "12.00", "B")])
    config = SandboxConfig(token=TOKEN, cooldown=0.05, default_card_limit=Decimal("100000"))
    async with serve_sandbox(config) as sb:
        done = await run_cli(
            "run", str(path), *run_args(sb, tmp_path, output), "--split-over-max",
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
    assert done.code == 0, done.stderr
    checked = await verify(tmp_path, "--report", str(tmp_path / output))
    assert checked.code == 0, checked.stdout + checked.stderr
    sql(tmp_path, "UPDATE rows SET amount = '1.00' WHERE row = 2")
    tampered = await verify(tmp_path, "--report", str(tmp_path / output))
    assert tampered.code == 1
    assert "ledger: row 2 differs from its record" in first_problem(tampered)


async def test_given_a_key_an_unkeyed_chain_does_not_verify(tmp_path: Path) -> None:
    """A keyed chain rewritten without its key is unkeyed: with the key set, that fails."""
    await paid_run(tmp_path, "report.csv")
    keyed = await verify(tmp_path, **{KEY_ENV: KEY})
    plain = await verify(tmp_path)
    assert keyed.code == 1
    assert "the chain is unkeyed but TOPUP_LEDGER_KEY is set" in first_problem(keyed)
    assert plain.code == 0, plain.stdout
