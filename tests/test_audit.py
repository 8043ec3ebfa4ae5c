"""`topup-runner audit` and `run --audit` against the sandbox, judged by the sandbox's own record:
clean runs match, money from outside or taken out of the record is named by its card, fills
make the report's totals what the wallet paid, and faults, kills and a lagging list leave no
discrepancy once the run is done."""

from __future__ import annotations

import csv
import random
import signal
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp
import anyio
import pytest

from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.faults import FaultKind
from runner.sandbox.outside import revoke
from runner.sandbox.server import RunningSandbox, serve_sandbox
from runner.webhooks.receive import serve_webhooks
from tests.alix import Keys, sandbox_config, unique_job
from tests.e2e import (
    TOKEN,
    Completed,
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


def run_args(sb: RunningSandbox, tmp: Path, *more: str) -> list[str]:
    return [
        "--provider", "uncash", "--base-url", sb.base_url,
        "--ledger", str(tmp / "ledger.sqlite"), "--output", str(tmp / "report.csv"),
        "--log-format", "json", "--run-key", "audited", "--cooldown", "0.05", *more,
    ]  # fmt: skip


async def run_job(job: Path, sb: RunningSandbox, tmp: Path, *more: str) -> Completed:
    return await run_cli(
        "run", str(job), *run_args(sb, tmp, *more), cwd=tmp, env=clean_env(UNCASH_API_TOKEN=TOKEN)
    )


async def audit(sb: RunningSandbox, tmp: Path, *more: str) -> Completed:
    return await run_cli(
        "audit", "--run-key", "audited", "--ledger", str(tmp / "ledger.sqlite"),
        "--log-format", "json", *more,
        cwd=tmp, env=clean_env(UNCASH_API_TOKEN=TOKEN),
    )  # fmt: skip


def audit_lines(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def summary(tmp: Path) -> dict[str, str]:
    with (tmp / "report.summary.csv").open(newline="", encoding="utf-8") as handle:
        return {row[0]: row[1] for row in csv.reader(handle) if len(row) > 1}


def wallet_paid(sb: RunningSandbox) -> Decimal:
    return sum((a.total_charged for a in sb.state.applied), Decimal(0))


def reported_total(report: list[dict[str, str]]) -> Decimal:
    return sum((Decimal(r["total_charged"] or "0") for r in report), Decimal(0))


def cards_job(tmp: Path, cards: int, per_card: int = 1) -> tuple[Path, list[str]]:
    ids = [str(uuid.uuid4()) for _ in range(cards)]
    rows = [
        (c, f"{10 + n + k / 100:.2f}", f"R{n}-{k}")
        for n, c in enumerate(ids)
        for k in range(per_card)
    ]
    return write_job(tmp / "job.csv", rows), ids


# -- a clean run -----------------------------------------------------------------------------


async def test_a_clean_run_audits_with_every_row_matched(tmp_path: Path) -> None:
    """A clean run: audit exits 0, every row matched by the transactions list."""
    job, _ = cards_job(tmp_path, 4, per_card=2)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        done = await run_job(job, sb, tmp_path)
        checked = await audit(sb, tmp_path)  # the run's own provider and API root
    assert done.code == 0, done.stderr
    assert checked.code == 0, checked.stdout + checked.stderr
    lines = audit_lines(tmp_path / "audited.audit.csv")
    assert len(lines) == 8
    assert {line["verdict"] for line in lines} == {"matched"}
    assert {line["proof"] for line in lines} == {"transactions list"}


async def test_an_audit_elsewhere_than_the_run_paid_or_of_no_run_is_refused(
    tmp_path: Path,
) -> None:
    """Another API root, the built-in sandbox, or an unknown run key: exit 2, one line."""
    job, _ = cards_job(tmp_path, 1)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        await run_job(job, sb, tmp_path)
        elsewhere = await audit(sb, tmp_path, "--base-url", "http://127.0.0.1:9/api/v1")
        sandbox = await audit(sb, tmp_path, "--provider", "sandbox")
        unknown = await run_cli(
            "audit", "--run-key", "nope", "--ledger", str(tmp_path / "ledger.sqlite"),
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
    assert (elsewhere.code, sandbox.code, unknown.code) == (2, 2, 2)
    assert "audit it where it paid" in elsewhere.stderr
    assert "built-in sandbox" in sandbox.stderr
    assert "no run with key 'nope'" in unknown.stderr
    assert "Traceback" not in elsewhere.stderr + sandbox.stderr + unknown.stderr


async def test_run_audit_folds_the_verdict_into_the_summary(tmp_path: Path) -> None:
    """`run --audit` writes report.audit.csv and the audit's lines into the Summary."""
    job, _ = cards_job(tmp_path, 3)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        done = await run_job(job, sb, tmp_path, "--audit")
    assert done.code == 0, done.stderr
    assert {line["verdict"] for line in audit_lines(tmp_path / "report.audit.csv")} == {"matched"}
    assert summary(tmp_path)["audit: discrepancies"] == "0"
    assert "every row matched" in summary(tmp_path)["audit"]


# -- detection -------------------------------------------------------------------------------


async def test_a_topup_from_outside_during_the_run_is_named_by_its_card(tmp_path: Path) -> None:
    """A second client tops up a run card while the run goes on: audit exits 1, names it."""
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    rows = [(ids[0], "12.00", "A")] + [(ids[1], f"20.0{k}", f"B{k}") for k in range(4)]
    job = write_job(tmp_path / "job.csv", rows)
    config = SandboxConfig(token=TOKEN, cooldown=0.3)
    async with serve_sandbox(config) as sb:
        process = await anyio.open_process(
            command("run", str(job), *run_args(sb, tmp_path, "--cooldown", "0.3")),
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        target = ids[0]
        await until(lambda: any(a.card_id == target for a in sb.state.applied))
        async with aiohttp.ClientSession() as http:
            for _ in range(50):  # the card's cooldown may refuse it, as it would anyone
                answer = await http.post(
                    f"{sb.root_url}/_sandbox/outside-topup",
                    json={"card_id": target, "amount": "77.00"},
                )
                if answer.status == 200:
                    break
                await anyio.sleep(0.05)
        assert answer.status == 200
        assert await process.wait() == 0
        checked = await audit(sb, tmp_path, "--base-url", sb.base_url)
    assert checked.code == 1
    assert f"card {target}" in checked.stdout
    assert "provider_topup_unaccounted" in checked.stdout
    assert "77.00" in checked.stdout


async def test_money_taken_out_of_the_providers_record_is_named(tmp_path: Path) -> None:
    """A paid row whose topup the sandbox no longer holds: audit exits 1 and names its card."""
    job, ids = cards_job(tmp_path, 3)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        done = await run_job(job, sb, tmp_path)
        gone = next(a for a in sb.state.applied if a.card_id == ids[1])
        assert revoke(sb.state, gone.transaction_id) is not None
        checked = await audit(sb, tmp_path, "--base-url", sb.base_url)
    assert done.code == 0
    assert checked.code == 1
    assert f"paid_no_provider_record: card {ids[1]}" in checked.stdout
    assert checked.stdout.count("card ") == 1


async def test_a_failed_row_the_provider_paid_is_named(tmp_path: Path) -> None:
    """A row the ledger says failed, which the provider shows paid inside its attempt's window."""
    job, ids = cards_job(tmp_path, 2)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        done = await run_job(job, sb, tmp_path)
        import sqlite3

        with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
            db.execute("UPDATE rows SET status = 'failed' WHERE card_id = ?", (ids[0],))
        checked = await audit(sb, tmp_path, "--base-url", sb.base_url)
    assert done.code == 0
    assert checked.code == 1
    assert f"unpaid_row_provider_paid: card {ids[0]}" in checked.stdout


# -- what the match fills in -----------------------------------------------------------------


async def test_after_a_kill_and_resume_the_report_totals_are_what_the_wallet_paid(
    tmp_path: Path,
) -> None:
    """Answers lost then a SIGKILL: the rerun reconciles rows without fees; `--audit` fills
    them in from the list, so the report's total charged is what the wallet paid."""
    job, amounts = unique_amount_job(tmp_path, rows=60, cards=30, seed=4)
    config = SandboxConfig(
        token=TOKEN, cooldown=0.05, fault_rate=0.3, fault_kinds=("drop_after", "error_after"),
        seed=2,
    )  # fmt: skip
    more = ("--timeout", "0.5", "--apply-grace", "0.2", "--max-attempts", "10",
            "--rate-limit", "200", "--concurrency", "16")  # fmt: skip
    async with serve_sandbox(config) as sb:
        process = await anyio.open_process(
            command("run", str(job), *run_args(sb, tmp_path, *more)),
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        await until(lambda: len(sb.state.applied) >= 20 or process.returncode is not None)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        final = await run_job(job, sb, tmp_path, *more, "--audit")
        report = read_csv_report(tmp_path / "report.csv")
        judge(sb, report, amounts)
        paid = wallet_paid(sb)
    assert final.code == 0, final.stderr
    assert reported_total(report) == paid
    assert summary(tmp_path)["audit: discrepancies"] == "0"
    assert int(summary(tmp_path)["audit: rows filled in from the provider"]) > 0
    # What the audit wrote into the ledger is part of the run's hash chain, and the report
    # written after it is the ledger's: verify holds.
    verified = await run_cli(
        "verify", "--ledger", str(tmp_path / "ledger.sqlite"), "--run-key", "audited",
        "--report", str(tmp_path / "report.csv"), cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert verified.code == 0, verified.stdout + verified.stderr


# -- the sandbox -----------------------------------------------------------------------------


async def test_a_lagging_list_shows_a_topup_only_after_the_lag() -> None:
    """list_lag: the transactions list shows a topup once that many seconds have passed."""
    now = [100.0]
    config = SandboxConfig(token=TOKEN, cooldown=0, list_lag=5.0, clock=lambda: now[0])
    card = str(uuid.uuid4())
    async with serve_sandbox(config) as sb:
        sb.state.put_card(SandboxCard(card))
        sb.state.topup(card, Decimal("20.00"))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        url = f"{sb.base_url}/cards/transactions?card_id={card}"
        async with aiohttp.ClientSession(headers=headers) as http:
            before = await (await http.get(url)).json()
            now[0] += 5.0
            after = await (await http.get(url)).json()
    assert before["data"]["transactions"] == []
    assert [t["amount"] for t in after["data"]["transactions"]] == [20.0]
    assert after["data"]["transactions"][0]["platform_fee_amount"] == 1.0


async def test_revoking_a_topup_takes_its_money_back(tmp_path: Path) -> None:
    """POST /_sandbox/revoke-topup: out of the record, off the card, back in the wallet."""
    card = str(uuid.uuid4())
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0)) as sb:
        wallet = sb.state.wallet
        async with aiohttp.ClientSession() as http:
            answer = await http.post(
                f"{sb.root_url}/_sandbox/outside-topup", json={"card_id": card, "amount": "30.00"}
            )
            txn = (await answer.json())["applied"]["transaction_id"]
            revoked = await http.post(
                f"{sb.root_url}/_sandbox/revoke-topup", json={"transaction_id": txn}
            )
            again = await http.post(
                f"{sb.root_url}/_sandbox/revoke-topup", json={"transaction_id": txn}
            )
        deposit = sb.state.card(card).deposit  # type: ignore[union-attr]
    assert revoked.status == 200
    assert again.status == 404
    assert sb.state.applied == []
    assert deposit == Decimal("0.00")
    assert sb.state.wallet == wallet


# -- under faults ----------------------------------------------------------------------------


async def kill_twice_then_finish(
    job: Path, sb: RunningSandbox, tmp: Path, more: tuple[str, ...], seed: int
) -> Completed:
    """Two runs SIGKILLed mid-way, then a rerun with `--audit` that finishes the run."""
    rng = random.Random(seed)
    for _ in range(2):
        seen = len(sb.state.applied)
        process = await anyio.open_process(
            command("run", str(job), *run_args(sb, tmp, *more)),
            cwd=tmp, env=clean_env(UNCASH_API_TOKEN=TOKEN), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        target = seen + rng.randint(20, 50)

        def reached(t: int = target, p: anyio.abc.Process = process) -> bool:
            return len(sb.state.applied) >= t or p.returncode is not None

        await until(reached, limit=60)
        process.send_signal(signal.SIGKILL)
        await process.wait()
    return await run_job(job, sb, tmp, *more, "--audit")


FAULTY = ("--timeout", "0.5", "--apply-grace", "0.3", "--max-attempts", "10",
          "--rate-limit", "2000", "--concurrency", "16")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("lag", [0.0, 1.5])
async def test_faults_and_two_kills_leave_no_discrepancy(tmp_path: Path, lag: float) -> None:
    """~10 % faults of every kind, two SIGKILLs, a final rerun: the audit finds nothing, also
    when the list lags behind the money (the deposit proves what the list does not show)."""
    job, amounts = unique_amount_job(tmp_path, rows=100, cards=40, seed=9)
    config = SandboxConfig(
        token=TOKEN, cooldown=0.05, fault_rate=0.1, slow_seconds=0.8, seed=6, list_lag=lag
    )
    async with serve_sandbox(config) as sb:
        for card in set(amounts.values()):
            sb.state.put_card(SandboxCard(card))
        final = await kill_twice_then_finish(job, sb, tmp_path, FAULTY, seed=1)
        report = read_csv_report(tmp_path / "report.csv")
        judge(sb, report, amounts)
        kinds = {k for k, n in sb.state.faults_injected.items() if n}
        again = await audit(sb, tmp_path, "--base-url", sb.base_url)
        paid = wallet_paid(sb)
    lines = audit_lines(tmp_path / "report.audit.csv")
    assert final.code in (0, 1), final.stderr
    assert len(kinds) >= 6, kinds
    assert [line for line in lines if line["verdict"] not in ("matched",) and
            not line["verdict"].startswith("review")] == []  # fmt: skip
    assert summary(tmp_path)["audit: discrepancies"] == "0"
    assert again.code == 0, again.stdout
    if lag:
        assert int(summary(tmp_path)["audit: rows proven by the card deposit"]) > 0
    else:
        assert reported_total(report) == paid


# -- one rule for a topup the provider settled Failed ----------------------------------------


async def test_a_topup_settled_failed_fails_its_row_by_webhook_and_by_reconciliation(
    tmp_path: Path, keys: Keys, alix_env: dict[str, str]
) -> None:
    """Alix settles every topup Failed. One row's answer is lost and reconciled from the list,
    the other's is settled by webhook: both rows fail, neither is sent again, and the audit
    of the run (Alix's TopupCard list) matches both."""
    job, amounts = unique_job(tmp_path, rows=2, cards=2, seed=3)
    lost = next(iter(amounts.values()))
    async with (
        serve_webhooks(tmp_path / "ledger.sqlite", keys.alix_public.encode()) as hook,
        serve_sandbox(sandbox_config(keys, hook.url, settle_failure_rate=1.0)) as sb,
    ):
        assert sb.alix is not None
        sb.alix.faults.script(FaultKind.DROP_AFTER, card_id=lost)
        done = await run_cli(
            "run", str(job), "--provider", "alix", "--base-url", sb.alix.base_url,
            "--ledger", str(tmp_path / "ledger.sqlite"), "--output", str(tmp_path / "report.csv"),
            "--log-format", "json", "--run-key", "audited", "--wait-settle", "20", "--audit",
            cwd=tmp_path, env=alix_env,
        )  # fmt: skip
        topups = list(sb.alix.state.topups)
    report = {r["card_id"]: r for r in read_csv_report(tmp_path / "report.csv")}
    assert done.code == 1, done.stderr
    assert len(topups) == 2  # nothing sent again
    assert {t.status.value for t in topups} == {"Failed"}
    assert {r["status"] for r in report.values()} == {"failed"}
    assert {r["attempts"] for r in report.values()} == {"1"}
    assert "reported the topup Failed" in report[lost]["error"]
    assert summary(tmp_path)["audit: discrepancies"] == "0"


# -- a shared PostgreSQL ledger ----------------------------------------------------------------


@pytest.mark.slow
async def test_two_workers_on_postgresql_one_killed_audit_clean(
    pg_url: str, tmp_path: Path
) -> None:
    """Two workers share a PostgreSQL ledger under ~10 % faults; one is SIGKILLed and started
    again: `audit` of the shared run finds every row matched."""
    job, amounts = unique_amount_job(tmp_path, rows=120, cards=50, seed=13)
    config = SandboxConfig(token=TOKEN, cooldown=0.1, fault_rate=0.1, slow_seconds=0.8, seed=4)
    # Rate and concurrency as tests/test_shared_ledger.py's: at 2,000/s and 16 in flight the
    # shared pacer fails ("SharedPacer.reserve() without a slot"), a bug outside the audit.
    more = ("--ledger", pg_url, "--cooldown", "0.1", "--lease", "1.5", "--timeout", "0.5",
            "--apply-grace", "0.3", "--max-attempts", "10", "--rate-limit", "80",
            "--concurrency", "8")  # fmt: skip

    async def worker(name: str) -> anyio.abc.Process:
        args = run_args(sb, tmp_path, *more)
        args[args.index("--output") + 1] = str(tmp_path / f"{name}.csv")
        with (tmp_path / f"{name}.log").open("ab") as log:  # the child keeps its own
            return await anyio.open_process(
                command("run", str(job), *args),
                cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN, TOPUP_DEBUG="1"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    async with serve_sandbox(config) as sb:
        for card in set(amounts.values()):
            sb.state.put_card(SandboxCard(card))
        first, second = await worker("w0"), await worker("w1")
        await until(lambda: len(sb.state.applied) >= 30 or first.returncode is not None, 60)
        assert first.returncode is None, (tmp_path / "w0.log").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        await first.wait()
        again = await worker("w2")
        with anyio.fail_after(120):
            codes = [await second.wait(), await again.wait()]
        report = read_csv_report(tmp_path / "w2.csv")
        judge(sb, report, amounts)
        checked = await run_cli(
            "audit", "--run-key", "audited", "--ledger", pg_url, "--base-url", sb.base_url,
            "--output", str(tmp_path / "audited.xlsx"),
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
        paid = wallet_paid(sb)
    assert set(codes) <= {0, 1}
    assert checked.code == 0, checked.stdout + checked.stderr
    from openpyxl import load_workbook

    book = load_workbook(tmp_path / "audited.xlsx")
    verdicts = {row[7] for row in book["Audit"].iter_rows(min_row=2, values_only=True)}
    assert verdicts <= {"matched", "review: the provider shows it paid"}
    results = list(book["Results"].iter_rows(values_only=True))
    total = results[0].index("total_charged")
    assert sum(Decimal(str(r[total] or 0)) for r in results[1:]) == paid
