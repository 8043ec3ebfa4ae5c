"""Alix Pay with a shared PostgreSQL ledger, end to end: several `topup-runner run` workers on
one run against the sandbox in Alix mode, webhooks received into the same ledger, one worker
SIGKILLed mid-run, judged by the sandbox's own record of topups."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psycopg
import pytest

from runner.ledger import CardWork
from runner.ledger.postgres import PostgresLedger
from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox
from runner.webhooks.receive import serve_webhooks
from tests.alix import Keys, sandbox_config, settled_events, unique_job
from tests.e2e import command, read_csv_report, run_cli, until
from tests.test_report import csv_summary
from tests.test_shared_ledger import sigkill_when

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

RUN_KEY = "shared-alix"
# Answers lost or replaced by a 5xx, before and after the topup is applied; no SLOW (its
# timeouts only lengthen the run) and no 429 (every refusal counted is one we provoked).
FAULTS = (
    FaultKind.DROP_BEFORE,
    FaultKind.DROP_AFTER,
    FaultKind.ERROR_BEFORE,
    FaultKind.ERROR_AFTER,
)


def worker_args(sb: RunningSandbox, tmp: Path, url: str, name: str) -> list[str]:
    assert sb.alix is not None
    return [
        "--provider", "alix", "--base-url", sb.alix.base_url, "--ledger", url,
        "--output", str(tmp / f"{name}.csv"), "--log-format", "json", "--run-key", RUN_KEY,
        "--rate-limit", "80", "--concurrency", "4", "--timeout", "1", "--max-attempts", "10",
        "--wait-settle", "15", "--lease", "1.5",
    ]  # fmt: skip


async def start_worker(
    job: Path, sb: RunningSandbox, tmp: Path, url: str, name: str, env: dict[str, str]
) -> anyio.abc.Process:
    with (tmp / f"{name}.log").open("ab") as log:
        return await anyio.open_process(
            command("run", str(job), *worker_args(sb, tmp, url, name)),
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


def run_summary(log: Path) -> dict[str, Any]:
    """The worker's `run.summary` event."""
    lines = [json.loads(x) for x in log.read_text().splitlines() if '"run.summary"' in x]
    assert len(lines) == 1, log.read_text()[-2000:]
    found: dict[str, Any] = lines[0]
    return found


def worker_tails(tmp: Path, lines: int = 15) -> str:
    """The last lines each worker wrote (its JSON log and stderr share a file)."""
    tails = []
    for log in sorted(tmp.glob("w*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(tails)


def left_by(url: str, pid: int) -> CardWork:
    """What a killed worker left behind: the rows of the cards it held, with the attempts it
    opened and never closed (a lease names its holder's pid)."""
    ledger = PostgresLedger.open(url)
    try:
        held = ledger._query(
            "SELECT card_id FROM run_cards WHERE run_key = %s AND NOT done "
            "AND split_part(owner, ':', 2) = %s",
            (RUN_KEY, str(pid)),
        )
        return ledger.card_work(RUN_KEY, [card for (card,) in held])
    finally:
        ledger.close()


def sends_now(conn: psycopg.Connection[Any], pid: int) -> bool:
    """Whether the worker `pid` has an attempt open (a topup in flight) on a card it holds."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM attempts a JOIN run_cards c "
        "ON c.run_key = a.run_key AND c.card_id = a.card_id "
        "WHERE a.run_key = %s AND a.outcome IS NULL AND NOT c.done "
        "AND split_part(c.owner, ':', 2) = %s)",
        (RUN_KEY, str(pid)),
    ).fetchone()
    return bool(row and row[0])


def reconciled(log: Path) -> set[int]:
    """Rows whose open attempt the worker settled from the transactions list."""
    events = [json.loads(x) for x in log.read_text().splitlines() if '"reconcile.' in x]
    return {
        e["row"] for e in events if e["event"] in ("reconcile.applied", "reconcile.not_applied")
    }


async def test_three_alix_workers_one_killed_pay_every_row_once_and_settle_it(
    pg_url: str,
    tmp_path: Path,
    keys: Keys,
    alix_env: dict[str, str],
) -> None:
    """Three workers, lost answers and 5xx, webhooks into the shared ledger, one worker
    SIGKILLed mid-run: the other two take over its cards once its leases run out, settle what
    it left open from the transactions list, and every row is paid exactly once and reported
    succeeded, the same by both survivors and by `report`."""
    rows, workers_n = 90, 3
    job, amounts = unique_job(tmp_path, rows=rows, cards=30, seed=11)
    async with serve_webhooks(pg_url, keys.alix_public.encode()) as hook:
        config = replace(
            sandbox_config(keys, hook.url, settle_delay=0.3),
            fault_rate=0.15,
            fault_kinds=FAULTS,
            seed=12,
        )
        async with serve_sandbox(config) as sb:
            assert sb.alix is not None
            state = sb.alix.state
            workers = [
                await start_worker(job, sb, tmp_path, pg_url, f"w{n}", alix_env)
                for n in range(workers_n)
            ]
            # Killed a third of the way through, while a topup of its own is in flight (on a
            # busy machine a worker may have claimed cards and not sent yet).
            victim = workers[0]
            with psycopg.connect(pg_url, autocommit=True) as conn:
                await sigkill_when(
                    victim,
                    lambda: len(state.topups) >= rows // 3 and sends_now(conn, victim.pid),
                    20,
                )
            killed_at = len(state.topups)
            # Read before the survivors take its cards (not before --lease has run out).
            left = await anyio.to_thread.run_sync(left_by, pg_url, victim.pid)
            with anyio.fail_after(30):
                codes = [await workers[1].wait(), await workers[2].wait()]
            # Every topup's webhook reaches the receiver, whether or not polling settled the
            # row first (the receiver answers 200 either way).
            await until(lambda: settled_events(sb) >= len(state.topups), 10)
            topups = list(state.topups)
            faults = dict(state.faults_injected)
            counters = state.counters
        rewritten = await run_cli(
            "report", "--ledger", pg_url, "--run-key", RUN_KEY,
            "--output", str(tmp_path / "rewritten.csv"), cwd=tmp_path,
        )  # fmt: skip
    assert codes == [0, 0], (codes, worker_tails(tmp_path))
    assert 0 < killed_at < rows
    assert not (tmp_path / "w0.csv").exists()  # the victim wrote no report
    assert sum(faults.values()) >= 5, faults
    assert counters.webhooks_delivered >= rows
    # The victim left rows to take over, and attempts open, which a survivor settled from
    # the transactions list before sending anything again.
    assert left.rows, "the victim held no unfinished card when it was killed"
    assert left.open_attempts, "the victim had no attempt open when it was killed"
    settled = reconciled(tmp_path / "w1.log") | reconciled(tmp_path / "w2.log")
    assert {a.row for a in left.open_attempts} <= settled
    # The sandbox's record: every row paid exactly once, on its own card, and settled.
    paid = Counter(t.amount for t in topups)
    assert set(paid.values()) == {1}, "a row was paid twice"
    assert {t.amount: t.card_id for t in topups} == amounts
    assert {t.status.value for t in topups} == {"Success"}
    # Both survivors' reports say so, row for row, and so does `report` from the ledger.
    reports = [read_csv_report(tmp_path / f"w{n}.csv") for n in (1, 2)]
    report = reports[0]
    assert len(report) == rows
    # Every row final and paid: no needs_review either (1 % of 90 rows is none).
    assert {r["status"] for r in report} == {"succeeded"}
    assert {Decimal(r["amount"]): r["card_id"] for r in report} == amounts
    fees = {t.amount: t.fee for t in topups}
    assert all(Decimal(r["fee"]) == fees[Decimal(r["amount"])] for r in report)
    assert reports[1] == report
    assert rewritten.code == 0, rewritten.stderr
    assert read_csv_report(tmp_path / "rewritten.csv") == report
    # Each survivor counts the whole run; the run's count of topups sent includes the
    # victim's, which only the ledger knows.
    events = [run_summary(tmp_path / f"w{n}.log") for n in (1, 2)]
    counted = [{k: n for k, n in e["rows"].items() if n} for e in events]
    assert counted == [{"succeeded": rows}] * 2, counted
    sent = [e["sent"] for e in events]
    assert all(n > 0 for n in sent), sent
    sheets = [csv_summary(tmp_path / f"w{n}.csv") for n in (1, 2)]
    assert sheets[1] == sheets[0]
    assert int(sheets[0]["topups sent (all processes)"]) > sum(sent)
    assert csv_summary(tmp_path / "rewritten.csv").items() <= sheets[0].items()
