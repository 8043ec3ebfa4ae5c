"""The `run` command end to end: job file in, topups against a sandbox over HTTP, report out."""

from __future__ import annotations

import uuid
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import openpyxl
import pytest

from runner.ledger import SqliteLedger as Ledger
from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import (
    ROOT,
    TOKEN,
    clean_env,
    files_containing,
    money,
    read_csv_report,
    run_cli,
    write_job,
)
from tests.test_report import xlsx_summary

pytestmark = pytest.mark.anyio

EXAMPLE = ROOT / "jobs" / "payroll-2026-11.csv"


def cards(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def uncash_args(sb: RunningSandbox, tmp_path: Path, *more: str) -> list[str]:
    return [
        "--provider",
        "uncash",
        "--base-url",
        sb.base_url,
        "--ledger",
        str(tmp_path / "ledger.sqlite"),
        "--output",
        str(tmp_path / "report.csv"),
        "--cooldown",
        "0.3",
        "--rate-limit",
        "200",
        "--log-format",
        "json",
        *more,
    ]


def expected_fee(amount: Decimal) -> Decimal:
    return (amount * Decimal("0.025") + Decimal("0.50")).quantize(Decimal("0.01"), ROUND_HALF_UP)


async def test_example_job_runs_on_the_built_in_sandbox(tmp_path: Path) -> None:
    """With no provider named, the example job runs on the sandbox: exit 0, all succeeded."""
    done = await run_cli("run", str(EXAMPLE), "--output", "out.xlsx", cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert "SANDBOX" in done.stdout
    assert "Traceback" not in done.stderr
    book = openpyxl.load_workbook(tmp_path / "out.xlsx")
    sheet = book["Results"]
    header = [c.value for c in sheet[1]]
    rows = [
        dict(zip(header, (c.value for c in r), strict=True)) for r in sheet.iter_rows(min_row=2)
    ]
    assert len(rows) == 37
    assert {r["status"] for r in rows} == {"succeeded"}
    for r in rows:
        amount = Decimal(str(r["amount"]))
        assert Decimal(str(r["fee"])) == expected_fee(amount)
        assert Decimal(str(r["total_charged"])) == amount + expected_fee(amount)
        after = Decimal(str(r["card_balance_after"]))
        assert after == Decimal(str(r["card_balance_before"])) + amount
        assert isinstance(r["amount"], int | float)  # a number in the sheet, not text
    # The card that appears twice was topped up twice, the second on top of the first.
    twice = Counter(r["card_id"] for r in rows).most_common(1)[0][0]
    balances = [Decimal(str(r["card_balance_after"])) for r in rows if r["card_id"] == twice]
    assert balances[1] > balances[0]
    summary = {r[0].value: r[1].value for r in book["Summary"].iter_rows() if r[0].value}
    assert any("SANDBOX" in str(k) or "SANDBOX" in str(v) for k, v in summary.items())


async def test_run_matches_what_the_sandbox_applied(tmp_path: Path) -> None:
    """Against a standalone sandbox: each row's fee, balances and ids are the sandbox's own."""
    ids = cards(6)
    job = write_job(
        tmp_path / "job.csv",
        [(c, f"{10 + n}.{n}5", f"EMP-{n}") for n, c in enumerate(ids)]
        + [(ids[0], "7.00", "EMP-0-B")],
        extra="name",
    )
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        applied = list(sb.state.applied)
    assert done.code == 0, done.stderr
    report = read_csv_report(tmp_path / "report.csv")
    assert len(applied) == len(report) == 7
    by_tx = {a.transaction_id: a for a in applied}
    for row in report:
        record = by_tx[row["transaction_id"]]
        assert row["status"] == "succeeded"
        assert record.card_id == row["card_id"]
        assert money(row["amount"]) == record.amount
        assert money(row["fee"]) == record.fee
        assert money(row["total_charged"]) == record.total_charged
        assert money(row["card_balance_after"]) == record.card_balance_after
        assert money(row["wallet_balance_after"]) == record.wallet_balance_after
        assert row["invoice_id"] == str(record.invoice_id)
        assert row["name"].startswith("value-")
    assert report[0]["row"] == "1"
    assert [r["reference"] for r in report][-1] == "EMP-0-B"


BAD_JOBS: dict[str, bytes] = {
    "missing-amount-column": b"card_id,reference\nc-1,EMP-1\n",
    "bad-amount": b"card_id,amount\nc-1,12.345\n",
    "nan-amount": b"card_id,amount\nc-1,NaN\n",
    "exponent": b"card_id,amount\nc-1,1e3\n",
    "negative": b"card_id,amount\nc-1,-5.00\n",
    "ambiguous-separator": b'card_id,amount\nc-1,"1.250,00"\n',
    "duplicated-header": b"card_id,amount,amount\nc-1,5.00,6.00\n",
    "latin-1": "card_id,amount,name\nc-1,5.00,José\n".encode("latin-1"),
    "semicolons": b"card_id;amount\nc-1;5.00\n",
    "empty": b"",
    "header-only": b"card_id,amount\n",
    "extra-field": b"card_id,amount\nc-1,5.00,oops\n",
    "empty-card": b"card_id,amount\n,5.00\n",
}


@pytest.mark.parametrize("name", sorted(BAD_JOBS))
async def test_bad_job_exits_2_and_sends_nothing(tmp_path: Path, name: str) -> None:
    """Every class of bad input: one line per problem naming the file, exit 2, no request."""
    job = tmp_path / f"{name}.csv"
    job.write_bytes(BAD_JOBS[name])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        requests = sum(sb.state.requests.values())
    assert done.code == 2, done.stderr
    assert requests == 0
    assert "Traceback" not in done.stderr
    assert f"{name}.csv" in done.stderr
    assert not (tmp_path / "report.csv").exists()


async def test_yaml_float_amount_exits_2(tmp_path: Path) -> None:
    """An unquoted YAML float is refused with its row and column, and nothing is sent."""
    job = tmp_path / "job.yaml"
    job.write_text("topups:\n  - {card_id: 'c-1', amount: 250.5}\n", encoding="utf-8")
    done = await run_cli("run", str(job), cwd=tmp_path)
    assert done.code == 2
    assert "row 1" in done.stderr
    assert "amount" in done.stderr


async def test_amount_outside_provider_rules_exits_2_before_sending(tmp_path: Path) -> None:
    """Uncash's 5.00–10,000.00 rule is checked before anything is sent."""
    ids = cards(2)
    job = write_job(tmp_path / "job.csv", [(ids[0], "10.00", "A"), (ids[1], "10000.01", "B")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        topups = sb.state.topup_arrivals
    assert done.code == 2, done.stderr
    assert "row 2" in done.stderr
    assert len(topups) == 0


async def test_wallet_that_cannot_cover_exits_3(tmp_path: Path) -> None:
    """Preflight refuses a job the wallet cannot cover: exit 3, zero topups."""
    ids = cards(3)
    job = write_job(tmp_path / "job.csv", [(c, "400.00", "X") for c in ids])
    config = SandboxConfig(token=TOKEN, cooldown=0.3, wallet_balance=Decimal("1000.00"))
    async with serve_sandbox(config) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        topups = len(sb.state.topup_arrivals)
    assert done.code == 3, done.stderr
    assert "wallet" in done.stderr
    assert topups == 0


async def test_unknown_and_frozen_cards_exit_3(tmp_path: Path) -> None:
    """Cards the provider does not know or that are frozen stop the job before it starts."""
    ids = cards(3)
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in ids])
    config = SandboxConfig(
        token=TOKEN,
        cooldown=0.3,
        missing_cards=frozenset({ids[0]}),
        cards=(SandboxCard(ids[1], status="frozen"),),
    )
    async with serve_sandbox(config) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        topups = len(sb.state.topup_arrivals)
    assert done.code == 3, done.stderr
    assert ids[0] in done.stderr
    assert "frozen" in done.stderr
    assert topups == 0


async def test_allow_partial_sets_bad_cards_aside(tmp_path: Path) -> None:
    """--allow-partial runs the good rows and reports the others as failed, never sent."""
    ids = cards(3)
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in ids])
    config = SandboxConfig(token=TOKEN, cooldown=0.3, missing_cards=frozenset({ids[0]}))
    async with serve_sandbox(config) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path, "--allow-partial"),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        applied = {a.card_id for a in sb.state.applied}
    assert done.code == 1, done.stderr
    statuses = {r["card_id"]: r["status"] for r in read_csv_report(tmp_path / "report.csv")}
    assert statuses == {ids[0]: "failed", ids[1]: "succeeded", ids[2]: "succeeded"}
    assert applied == {ids[1], ids[2]}


async def test_bad_token_exits_2_and_the_token_is_never_shown(tmp_path: Path) -> None:
    """A refused token stops the run before any topup; the token appears nowhere."""
    wrong = "uc_" + "W" * 40
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in cards(2)])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=wrong),
        )
        applied = len(sb.state.applied)
    assert done.code == 2, done.stderr
    assert "UNCASH_API_TOKEN" in done.stderr
    assert wrong not in done.stderr + done.stdout
    assert applied == 0


async def test_missing_token_exits_2(tmp_path: Path) -> None:
    """Running against Uncash without UNCASH_API_TOKEN is a configuration error."""
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in cards(1)])
    done = await run_cli(
        "run",
        str(job),
        "--provider",
        "uncash",
        "--base-url",
        "http://127.0.0.1:9/api/v1",
        "--ledger",
        str(tmp_path / "l.sqlite"),
        cwd=tmp_path,
    )
    assert done.code == 2
    assert "UNCASH_API_TOKEN" in done.stderr


async def test_secrets_stay_out_of_logs_report_and_ledger(tmp_path: Path) -> None:
    """The token is in none of the log lines, the report or the ledger file."""
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in cards(3)])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
    assert done.code == 0, done.stderr
    assert TOKEN not in done.stderr + done.stdout
    assert files_containing(tmp_path, TOKEN) == []


async def test_second_run_of_a_finished_key_sends_nothing(tmp_path: Path) -> None:
    """Rerunning a finished job resumes it: nothing is sent, exit 0, same report."""
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in cards(4)])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        env = clean_env(UNCASH_API_TOKEN=TOKEN)
        first = await run_cli("run", str(job), *uncash_args(sb, tmp_path), cwd=tmp_path, env=env)
        arrivals = len(sb.state.topup_arrivals)
        second = await run_cli("run", str(job), *uncash_args(sb, tmp_path), cwd=tmp_path, env=env)
        assert len(sb.state.topup_arrivals) == arrivals == 4
    assert (first.code, second.code) == (0, 0), second.stderr
    assert "0 topups sent by this process" in second.stdout
    assert {r["status"] for r in read_csv_report(tmp_path / "report.csv")} == {"succeeded"}


async def test_run_key_of_another_job_is_refused(tmp_path: Path) -> None:
    """An explicit run key already used for a different job is refused (exit 2)."""
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        env = clean_env(UNCASH_API_TOKEN=TOKEN)
        a = write_job(tmp_path / "a.csv", [(c, "10.00", "X") for c in cards(1)])
        b = write_job(tmp_path / "b.csv", [(c, "11.00", "X") for c in cards(1)])
        args = uncash_args(sb, tmp_path, "--run-key", "payroll-nov")
        first = await run_cli("run", str(a), *args, cwd=tmp_path, env=env)
        second = await run_cli("run", str(b), *args, cwd=tmp_path, env=env)
        assert len(sb.state.applied) == 1
    assert first.code == 0
    assert second.code == 2
    assert "payroll-nov" in second.stderr


async def test_lock_held_by_another_process_exits_75(tmp_path: Path) -> None:
    """While another process holds the run key, a second one exits 75 and sends nothing."""
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in cards(1)])
    ledger = Ledger.open(tmp_path / "ledger.sqlite")
    ledger.lock("held-key")
    try:
        async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
            done = await run_cli(
                "run",
                str(job),
                *uncash_args(sb, tmp_path, "--run-key", "held-key"),
                cwd=tmp_path,
                env=clean_env(UNCASH_API_TOKEN=TOKEN),
            )
            requests = sum(sb.state.requests.values())
    finally:
        ledger.close()
    assert done.code == 75, done.stderr
    assert requests == 0


async def test_faults_end_with_every_row_applied_once(tmp_path: Path) -> None:
    """Drops, 5xx, slow answers and 429s before and after applying: nothing paid twice."""
    ids = cards(30)
    rows = [(c, f"{5 + n}.00", f"R{n}") for n, c in enumerate(ids)] + [
        (c, "6.50", "second") for c in ids[:10]
    ]
    job = write_job(tmp_path / "job.csv", rows)
    config = SandboxConfig(token=TOKEN, cooldown=0.3, fault_rate=0.3, slow_seconds=2.0, seed=7)
    async with serve_sandbox(config) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path, "--timeout", "1", "--max-attempts", "8"),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        applied = Counter((a.card_id, a.amount) for a in sb.state.applied)
        faults = sum(sb.state.faults_injected.values())
    assert faults > 5
    report = read_csv_report(tmp_path / "report.csv")
    succeeded = Counter(
        (r["card_id"], Decimal(r["amount"])) for r in report if r["status"] == "succeeded"
    )
    # Judged by the sandbox's own record: every success is money that moved, once.
    assert succeeded == applied
    assert all(r["status"] in ("succeeded", "failed", "needs_review") for r in report)
    assert sum(1 for r in report if r["status"] == "needs_review") == 0
    assert done.code in (0, 1)


async def test_scripted_lost_answer_is_reconciled_not_resent(tmp_path: Path) -> None:
    """A topup applied but whose answer was dropped is found applied, and not sent again."""
    ids = cards(2)
    job = write_job(tmp_path / "job.csv", [(ids[0], "20.00", "A"), (ids[1], "30.00", "B")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        sb.faults.script(FaultKind.DROP_AFTER, card_id=ids[0])
        sb.faults.script(FaultKind.DROP_BEFORE, card_id=ids[1])
        done = await run_cli(
            "run",
            str(job),
            # A lost answer is "not applied" only after timeout + grace: keep both short.
            *uncash_args(sb, tmp_path, "--timeout", "2"),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        applied = Counter(a.card_id for a in sb.state.applied)
        arrivals = len(sb.state.topup_arrivals)
    assert done.code == 0, done.stderr
    assert applied == {ids[0]: 1, ids[1]: 1}
    assert arrivals == 3  # the dropped-after one was not sent again; the dropped-before was
    report = {r["card_id"]: r for r in read_csv_report(tmp_path / "report.csv")}
    assert report[ids[0]]["status"] == "succeeded"
    assert report[ids[0]]["attempts"] == "1"
    assert report[ids[1]]["attempts"] == "2"


async def test_status_and_report_commands_read_the_ledger(tmp_path: Path) -> None:
    """`status` lists the run with its counts; `report` rewrites the spreadsheet from the ledger."""
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "X") for c in cards(3)])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash_args(sb, tmp_path, "--run-key", "nov-1"),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
    assert done.code == 0, done.stderr
    ledger = str(tmp_path / "ledger.sqlite")
    status = await run_cli("status", "--ledger", ledger, cwd=tmp_path)
    assert status.code == 0
    assert "nov-1" in status.stdout
    assert "succeeded=3" in status.stdout
    again = await run_cli(
        "report", "--ledger", ledger, "--run-key", "nov-1", "--output", "again.csv", cwd=tmp_path
    )
    assert again.code == 0, again.stderr
    first = read_csv_report(tmp_path / "report.csv")
    second = read_csv_report(tmp_path / "again.csv")
    keep = ("row", "card_id", "amount", "status", "fee", "transaction_id")
    assert [{k: r[k] for k in keep} for r in first] == [{k: r[k] for k in keep} for r in second]
    rewritten = await run_cli(
        "report", "--ledger", ledger, "--run-key", "nov-1", "--output", "again.xlsx", cwd=tmp_path
    )
    assert rewritten.code == 0, rewritten.stderr
    summary = xlsx_summary(tmp_path / "again.xlsx")
    # From the ledger alone: when the run was recorded and its last row finished, what was sent.
    assert summary["started (UTC)"] is not None
    assert summary["finished (UTC)"] >= summary["started (UTC)"]
    assert summary["topups sent (all processes)"] == 3
    missing = await run_cli(
        "report", "--ledger", ledger, "--run-key", "nope", "--output", "x.csv", cwd=tmp_path
    )
    assert missing.code == 2
