"""Alix end to end: the real command against the sandbox in Alix mode, webhooks received by
`runner.webhooks.receive` into the same ledger, judged by the sandbox's own record of topups."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import aiohttp
import anyio
import pytest

from runner.ledger import SqliteLedger as Ledger
from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox
from runner.webhooks.receive import serve_webhooks
from tests.alix import Keys, sandbox_config, settled_events, unique_job
from tests.e2e import command, read_csv_report, run_cli, until

pytestmark = pytest.mark.anyio


def alix_args(sb: RunningSandbox, tmp: Path, *more: str) -> list[str]:
    assert sb.alix is not None
    return [
        "--provider", "alix", "--base-url", sb.alix.base_url,
        "--ledger", str(tmp / "ledger.sqlite"), "--output", str(tmp / "report.csv"),
        "--log-format", "json", "--run-key", "alix-test", "--wait-settle", "20", *more,
    ]  # fmt: skip


async def post(url: str, body: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as response:
        return response.status, await response.json()


async def test_alix_run_refreshes_tokens_and_settles_every_row_by_webhook(
    tmp_path: Path, keys: Keys, alix_env: dict[str, str]
) -> None:
    """Tokens expire mid-run and are refreshed, never re-acquired; webhooks settle every row;
    a lost answer is found in the transactions list and not paid twice."""
    job, amounts = unique_job(tmp_path, rows=30, cards=10, seed=1)
    lost_card = next(iter(amounts.values()))
    async with (
        serve_webhooks(tmp_path / "ledger.sqlite", keys.alix_public.encode()) as hook,
        serve_sandbox(sandbox_config(keys, hook.url)) as sb,
    ):
        assert sb.alix is not None
        sb.alix.faults.script(FaultKind.DROP_AFTER, card_id=lost_card)
        done = await run_cli(
                "run", str(job), *alix_args(sb, tmp_path, "--rate-limit", "20"),
                cwd=tmp_path, env=alix_env,
            )  # fmt: skip
        counters = sb.alix.state.counters
        topups = list(sb.alix.state.topups)
    assert done.code == 0, done.stderr
    assert counters.access_tokens_issued == 1
    assert counters.refreshes >= 1
    # Every row paid exactly once, on the right card, and settled.
    paid = Counter(t.amount for t in topups)
    assert set(paid.values()) == {1}
    assert {t.amount: t.card_id for t in topups} == amounts
    assert {t.status.value for t in topups} == {"Success"}
    report = read_csv_report(tmp_path / "report.csv")
    assert {r["status"] for r in report} == {"succeeded"}
    fees = {t.amount: t.fee for t in topups}
    assert all(Decimal(r["fee"]) == fees[Decimal(r["amount"])] for r in report)


async def test_forged_and_replayed_webhooks_change_nothing(
    tmp_path: Path, keys: Keys, alix_env: dict[str, str]
) -> None:
    """A tampered body is refused; a replayed genuine one is a duplicate; rows stay as they are."""
    job, _ = unique_job(tmp_path, rows=4, cards=4, seed=2)
    ledger_path = tmp_path / "ledger.sqlite"
    async with serve_webhooks(ledger_path, keys.alix_public.encode()) as hook:
        async with serve_sandbox(sandbox_config(keys, hook.url)) as sb:
            assert sb.alix is not None
            done = await run_cli(
                "run", str(job), *alix_args(sb, tmp_path), cwd=tmp_path, env=alix_env
            )
            delivered = [d for d in sb.alix.state.deliveries if d.status == 200]
        assert done.code == 0, done.stderr
        genuine = json.loads(delivered[0].body)
        forged = json.loads(delivered[0].body)
        forged["data"]["status"] = "Failed"
        forged_status, _ = await post(hook.url, json.dumps(forged))
        replay_status, replay = await post(hook.url, delivered[0].body)
        unsigned = dict(genuine, signature="AAAA")
        unsigned_status, _ = await post(hook.url, json.dumps(unsigned))
    assert (forged_status, unsigned_status) == (400, 400)
    assert replay_status == 200
    assert replay["duplicate"] is True
    assert replay["settled"] == 0
    ledger = Ledger.open(ledger_path)
    try:
        statuses = {r.status.value for r in ledger.records("alix-test")}
    finally:
        ledger.close()
    assert statuses == {"succeeded"}


async def test_pending_rows_settle_later_by_webhook_and_report(
    tmp_path: Path, keys: Keys, alix_env: dict[str, str]
) -> None:
    """Without --wait-settle the run ends pending (exit 0); the webhook settles the ledger and
    `report` rewrites the spreadsheet."""
    job, _ = unique_job(tmp_path, rows=3, cards=3, seed=4)
    ledger_path = tmp_path / "ledger.sqlite"
    async with (
        serve_webhooks(ledger_path, keys.alix_public.encode()) as hook,
        serve_sandbox(sandbox_config(keys, hook.url, settle_delay=1.5)) as sb,
    ):
        args = [a if a != "20" else "0" for a in alix_args(sb, tmp_path)]
        done = await run_cli("run", str(job), *args, cwd=tmp_path, env=alix_env)
        first = read_csv_report(tmp_path / "report.csv")
        assert sb.alix is not None
        await until(lambda: settled_events(sb) >= 3)
    assert done.code == 0, done.stderr
    assert {r["status"] for r in first} == {"pending"}
    again = await run_cli(
        "report", "--ledger", str(ledger_path), "--run-key", "alix-test",
        "--output", str(tmp_path / "again.csv"), cwd=tmp_path,
    )  # fmt: skip
    assert again.code == 0, again.stderr
    assert {r["status"] for r in read_csv_report(tmp_path / "again.csv")} == {"succeeded"}


async def test_alix_sigkill_twice_then_resume_pays_every_row_exactly_once(
    tmp_path: Path, keys: Keys, alix_env: dict[str, str]
) -> None:
    """The exactly-once fault test in Alix mode: faults, two SIGKILLs, a rerun that settles."""
    job, amounts = unique_job(tmp_path, rows=300, cards=100, seed=9)
    rng = random.Random(5)
    more = ("--rate-limit", "unlimited", "--concurrency", "16", "--timeout", "0.5",
            "--max-attempts", "10")  # fmt: skip
    async with serve_webhooks(tmp_path / "ledger.sqlite", keys.alix_public.encode()) as hook:
        quiet = sandbox_config(keys, hook.url, settle_delay=0.1, webhook_duplicate_rate=0.0)
        config = replace(quiet, fault_rate=0.1, slow_seconds=1.0, seed=8)
        async with serve_sandbox(config) as sb:
            assert sb.alix is not None
            state = sb.alix.state
            for _ in range(2):
                target = len(state.topups) + rng.randint(40, 90)
                process = await start(job, sb, tmp_path, alix_env, *more)

                def reached(t: int = target, p: anyio.abc.Process = process) -> bool:
                    return len(state.topups) >= t or p.returncode is not None

                await until(reached)
                process.send_signal(signal.SIGKILL)
                await process.wait()
            killed_with = len(state.topups)
            final = await run_cli(
                "run", str(job), *alix_args(sb, tmp_path, *more), cwd=tmp_path, env=alix_env
            )
            topups = list(state.topups)
    assert final.code in (0, 1), final.stderr
    assert 0 < killed_with < 300
    report = read_csv_report(tmp_path / "report.csv")
    assert len(report) == 300
    paid = Counter(t.amount for t in topups if t.status.value != "Failed")
    assert all(n == 1 for n in paid.values()), "a row was paid twice"
    for row in report:
        amount = Decimal(row["amount"])
        assert amounts[amount] == row["card_id"]
        if row["status"] == "succeeded":
            assert paid[amount] == 1
        elif row["status"] == "failed":
            assert paid[amount] == 0
        else:
            assert row["status"] == "needs_review", row
    reported = {Decimal(r["amount"]) for r in report if r["status"] != "failed"}
    assert set(paid) <= reported
    assert sum(r["status"] == "needs_review" for r in report) <= 3


async def start(
    job: Path, sb: RunningSandbox, tmp: Path, env: dict[str, str], *more: str
) -> anyio.abc.Process:
    with (tmp / "runner.log").open("ab") as log:
        return await anyio.open_process(
            command("run", str(job), *alix_args(sb, tmp, *more)),
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
