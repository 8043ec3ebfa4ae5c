"""The report a run writes, end to end: after a kill and a rerun it tells the whole run, as
`topup-runner report` does; subtotals by a job column; the run's currency."""

from __future__ import annotations

import signal
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import TOKEN, clean_env, command, read_csv_report, run_cli, until, write_job
from tests.test_report import xlsx_summary

pytestmark = pytest.mark.anyio

# Lines a run's own report may add to what the ledger alone gives: this process's share and
# the estimate from its settings, each labelled as such.
RUN_ONLY = {
    "topups sent by this process",
    "estimated minimum duration (s)",
    "stopped",
    "request rate used",
}


def args(sb: RunningSandbox, tmp: Path, *more: str) -> list[str]:
    return [
        "--provider", "uncash", "--base-url", sb.base_url,
        "--ledger", str(tmp / "ledger.sqlite"), "--output", str(tmp / "report.xlsx"),
        "--log-format", "json", "--run-key", "whole-run", "--cooldown", "0.05",
        "--rate-limit", "500", "--concurrency", "8", *more,
    ]  # fmt: skip


async def test_rerun_after_a_kill_reports_the_whole_run_as_the_report_command_does(
    tmp_path: Path,
) -> None:
    """Killed, then rerun: the rerun's Summary gives the whole run's start, topups sent and
    totals, equal to `topup-runner report --run-key`'s; its own share is labelled so."""
    ids = [str(uuid.uuid4()) for _ in range(60)]
    job = write_job(tmp_path / "job.csv", [(c, f"{10 + n}.00", f"R{n}") for n, c in enumerate(ids)])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        with (tmp_path / "first.log").open("ab") as log:
            process = await anyio.open_process(
                command("run", str(job), *args(sb, tmp_path, "--rate-limit", "40")),
                cwd=tmp_path,
                env=clean_env(UNCASH_API_TOKEN=TOKEN),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        await until(lambda: len(sb.state.applied) >= 15)
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        rerun_at = datetime.now(UTC).replace(tzinfo=None)
        done = await run_cli(
            "run", str(job), *args(sb, tmp_path), cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
        arrivals = len(sb.state.topup_arrivals)
        applied = len(sb.state.applied)
    assert done.code == 0, done.stderr
    assert applied == 60
    again = await run_cli(
        "report", "--ledger", str(tmp_path / "ledger.sqlite"), "--run-key", "whole-run",
        "--output", str(tmp_path / "again.xlsx"), cwd=tmp_path,
    )  # fmt: skip
    assert again.code == 0, again.stderr
    run_summary = xlsx_summary(tmp_path / "report.xlsx")
    ledger_summary = xlsx_summary(tmp_path / "again.xlsx")
    common = {k: v for k, v in run_summary.items() if k not in RUN_ONLY}
    assert common == ledger_summary
    assert run_summary["topups sent (all processes)"] == arrivals
    assert run_summary["started (UTC)"] < rerun_at
    assert 0 < run_summary["topups sent by this process"] < 60


async def test_unknown_group_by_column_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """--group-by naming no column of the job: exit 2, nothing sent."""
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "R")], extra="team")
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        done = await run_cli(
            "run", str(job), *args(sb, tmp_path, "--group-by", "department"), cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
        arrivals = len(sb.state.topup_arrivals)
    assert done.code == 2, done.stderr
    assert "department" in done.stderr
    assert "team" in done.stderr
    assert arrivals == 0


async def test_group_by_adds_subtotals_and_the_report_command_takes_it_too(
    tmp_path: Path,
) -> None:
    """--group-by team: the run's Summary has subtotals by team, as `report --group-by` does."""
    job = write_job(
        tmp_path / "job.csv", [(str(uuid.uuid4()), f"{10 + n}.00", f"R{n}") for n in range(3)],
        extra="team",
    )  # fmt: skip
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        done = await run_cli(
            "run", str(job), *args(sb, tmp_path, "--group-by", "team",
                                   "--output", str(tmp_path / "r.csv")),
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
    assert done.code == 0, done.stderr
    subtotals = read_csv_report(tmp_path / "r.subtotals.csv")
    assert [(s["team"], s["status"], s["rows"]) for s in subtotals if s["status"] != "all"] == [
        ("value-0", "succeeded", "1"),
        ("value-1", "succeeded", "1"),
        ("value-2", "succeeded", "1"),
    ]
    again = await run_cli(
        "report", "--ledger", str(tmp_path / "ledger.sqlite"), "--run-key", "whole-run",
        "--output", str(tmp_path / "again.csv"), "--group-by", "team", cwd=tmp_path,
    )  # fmt: skip
    assert again.code == 0, again.stderr
    assert read_csv_report(tmp_path / "again.subtotals.csv") == subtotals
    wrong = await run_cli(
        "report", "--ledger", str(tmp_path / "ledger.sqlite"), "--run-key", "whole-run",
        "--output", str(tmp_path / "x.csv"), "--group-by", "nope", cwd=tmp_path,
    )  # fmt: skip
    assert wrong.code == 2
    assert not (tmp_path / "x.csv").exists()
