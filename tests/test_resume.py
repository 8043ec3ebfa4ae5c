"""Exactly once when the process dies or is stopped: resume, reconciliation, SIGTERM, SIGKILL.

The runner runs as a real subprocess; the sandbox runs in the test's event loop, outlives
every runner process, and its own record of applied topups is the judge.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from runner.sandbox.config import SandboxConfig
from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import (
    TOKEN,
    clean_env,
    command,
    judge,
    read_csv_report,
    run_cli,
    unique_amount_job,
    until,
    write_job,
)

pytestmark = pytest.mark.anyio


def args(sb: RunningSandbox, tmp: Path, *more: str) -> list[str]:
    return [
        "--provider", "uncash", "--base-url", sb.base_url,
        "--ledger", str(tmp / "ledger.sqlite"), "--output", str(tmp / "report.csv"),
        "--log-format", "json", "--run-key", "resume-test", *more,
    ]  # fmt: skip


async def start(job: Path, sb: RunningSandbox, tmp: Path, *more: str) -> anyio.abc.Process:
    with (tmp / "runner.log").open("ab") as log:  # the child keeps its own descriptor
        return await anyio.open_process(
            command("run", str(job), *args(sb, tmp, *more)),
            cwd=tmp,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


async def test_sigkill_twice_then_resume_pays_every_row_exactly_once(tmp_path: Path) -> None:
    """1,000 rows, ~10 % faults of every kind, SIGKILL twice: the rerun settles everything."""
    job, amounts = unique_amount_job(tmp_path, rows=1000, cards=300, seed=11)
    config = SandboxConfig(token=TOKEN, cooldown=0.05, fault_rate=0.1, slow_seconds=1.0, seed=5)
    # The sandbox applies before it answers (slowly or not at all), never later: a grace of
    # 1 s past the timeout covers it, where the default 30 s would make the rerun wait for it.
    more = ("--cooldown", "0.05", "--rate-limit", "2000", "--concurrency", "16",
            "--timeout", "0.5", "--max-attempts", "10", "--apply-grace", "1")  # fmt: skip
    rng = random.Random(3)
    async with serve_sandbox(config) as sb:
        for _ in range(2):
            seen = len(sb.state.applied)
            process = await start(job, sb, tmp_path, *more)
            target = seen + rng.randint(100, 300)

            def reached(t: int = target, p: anyio.abc.Process = process) -> bool:
                return len(sb.state.applied) >= t or p.returncode is not None

            await until(reached)
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
        killed_with = len(sb.state.applied)
        final = await run_cli("run", str(job), *args(sb, tmp_path, *more), cwd=tmp_path,
                              env=clean_env(UNCASH_API_TOKEN=TOKEN))  # fmt: skip
        report = read_csv_report(tmp_path / "report.csv")
        judge(sb, report, amounts)
        kinds = {k for k, n in sb.state.faults_injected.items() if n}
    assert 0 < killed_with < 1000
    assert final.code in (0, 1), final.stderr
    assert len(report) == 1000
    assert {r["status"] for r in report} <= {"succeeded", "failed", "needs_review"}
    assert sum(r["status"] == "needs_review" for r in report) <= 10
    assert len(kinds) >= 6, kinds


async def test_killed_while_an_answer_was_outstanding_is_reconciled_on_resume(
    tmp_path: Path,
) -> None:
    """SIGKILL while a topup's answer is delayed: the rerun finds it applied and does not resend."""
    card = str(uuid.uuid4())
    job = write_job(tmp_path / "job.csv", [(card, "42.00", "A")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.1, slow_seconds=30)) as sb:
        sb.faults.script(FaultKind.SLOW, card_id=card)
        process = await start(job, sb, tmp_path, "--cooldown", "0.1", "--timeout", "60")
        await until(lambda: len(sb.state.applied) == 1)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        done = await run_cli("run", str(job), *args(sb, tmp_path, "--cooldown", "0.1"),
                             cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN))  # fmt: skip
        applied = list(sb.state.applied)
        arrivals = len(sb.state.topup_arrivals)
    assert done.code == 0, done.stderr
    assert len(applied) == 1
    assert arrivals == 1
    (row,) = read_csv_report(tmp_path / "report.csv")
    assert row["status"] == "succeeded"
    assert row["attempts"] == "1"
    assert row["transaction_id"] == applied[0].transaction_id


async def test_unexplained_card_movement_is_needs_review_not_retried(tmp_path: Path) -> None:
    """A lost answer after which the card moved by neither 0 nor the amount: needs_review."""
    card = str(uuid.uuid4())
    job = write_job(tmp_path / "job.csv", [(card, "42.00", "A")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.1)) as sb:
        sb.faults.script(FaultKind.DROP_AFTER, card_id=card)
        process = await start(job, sb, tmp_path, "--cooldown", "0.1")
        await until(lambda: len(sb.state.applied) == 1)
        # Someone else funds the card before the runner reconciles.
        account = sb.state.card(card)
        assert account is not None
        sb.state.put_card(sb.state.merged_card(card, deposit=account.deposit + Decimal("1.00")))
        code = await process.wait()
        arrivals = len(sb.state.topup_arrivals)
    assert code == 1
    assert arrivals == 1
    (row,) = read_csv_report(tmp_path / "report.csv")
    assert row["status"] == "needs_review"
    assert "moved by 43.00" in row["error"]


async def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path: Path) -> None:
    """SIGTERM mid-run: no new topups, a report, exit 1; the rerun pays only what is left."""
    ids = [str(uuid.uuid4()) for _ in range(4)]
    rows = [(ids[n % 4], f"{10 + n}.00", f"R{n}") for n in range(40)]
    job = write_job(tmp_path / "job.csv", rows)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        process = await start(job, sb, tmp_path, "--cooldown", "0.3")
        await until(lambda: len(sb.state.applied) >= 6)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            code = await process.wait()
        stopped_at = len(sb.state.applied)
        first = read_csv_report(tmp_path / "report.csv")
        again = await run_cli("run", str(job), *args(sb, tmp_path, "--cooldown", "0.3"),
                              cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN))  # fmt: skip
        applied = Counter(a.amount for a in sb.state.applied)
    assert code == 1
    assert stopped_at < 40
    statuses = Counter(r["status"] for r in first)
    assert statuses["succeeded"] == stopped_at
    assert statuses["not_attempted"] == 40 - stopped_at
    lines = (tmp_path / "runner.log").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
    assert "run.stopping" in events
    assert again.code == 0, again.stderr
    assert len(applied) == 40
    assert set(applied.values()) == {1}
