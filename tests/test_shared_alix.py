"""Alix Pay with a shared PostgreSQL ledger, end to end: several `topup-runner run` workers on
one run against the sandbox in Alix mode, webhooks received into the same ledger, judged by
the sandbox's own record of topups."""

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
import pytest

from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox
from runner.webhook import serve_webhooks
from tests.e2e import command, read_csv_report, run_cli
from tests.test_alix_e2e import (  # noqa: F401  (the fixtures keys and alix_env)
    Keys,
    alix_env,
    keys,
    sandbox_config,
    settled_events,
    unique_job,
    until,
)
from tests.test_report import csv_summary

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
        "--wait-settle", "15",
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


async def test_three_alix_workers_with_faults_pay_every_row_once_and_settle_it(
    pg_url: str,
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    alix_env: dict[str, str],  # noqa: F811
) -> None:
    """Three workers, lost answers and 5xx, webhooks into the shared ledger: every row paid
    exactly once and reported succeeded, the same by every worker and by `report`."""
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
            with anyio.fail_after(30):
                codes = [await w.wait() for w in workers]
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
    assert codes == [0] * workers_n, codes
    assert sum(faults.values()) >= 5, faults
    assert counters.webhooks_delivered >= rows
    # The sandbox's record: every row paid exactly once, on its own card, and settled.
    paid = Counter(t.amount for t in topups)
    assert set(paid.values()) == {1}, "a row was paid twice"
    assert {t.amount: t.card_id for t in topups} == amounts
    assert {t.status.value for t in topups} == {"Success"}
    # Every worker's report says so, row for row, and so does `report` from the ledger.
    reports = [read_csv_report(tmp_path / f"w{n}.csv") for n in range(workers_n)]
    report = reports[0]
    assert len(report) == rows
    assert {r["status"] for r in report} == {"succeeded"}
    assert {Decimal(r["amount"]): r["card_id"] for r in report} == amounts
    fees = {t.amount: t.fee for t in topups}
    assert all(Decimal(r["fee"]) == fees[Decimal(r["amount"])] for r in report)
    assert all(other == report for other in reports[1:])
    assert rewritten.code == 0, rewritten.stderr
    assert read_csv_report(tmp_path / "rewritten.csv") == report
    # Each worker counts the whole run, and its own topups, which together are all of them.
    events = [run_summary(tmp_path / f"w{n}.log") for n in range(workers_n)]
    counted = [{k: n for k, n in e["rows"].items() if n} for e in events]
    assert counted == [{"succeeded": rows}] * workers_n, counted
    sent = [e["sent"] for e in events]
    assert sum(n > 0 for n in sent) >= 2, sent  # the run was shared, not done by one worker
    sheets = [csv_summary(tmp_path / f"w{n}.csv") for n in range(workers_n)]
    assert all(other == sheets[0] for other in sheets[1:])
    assert sheets[0]["topups sent (all processes)"] == str(sum(sent))
    assert csv_summary(tmp_path / "rewritten.csv").items() <= sheets[0].items()
