"""Exactly once against ordinary operator mistakes and slow providers, judged by the sandbox.

Each test is one of the holes an adversarial review found (issue 14): a rerun under another file
name or base-URL spelling, a provider that applies a request after its client gave up, an answer
that disagrees with the card's books, an error after topups were sent. The runner runs as a real
subprocess; the sandbox's own record of what it applied is the judge.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import RunningSandbox, serve_sandbox
from runner.webhooks.receive import serve_webhooks
from tests.alix import Keys, sandbox_config, unique_job
from tests.e2e import (
    TOKEN,
    Completed,
    clean_env,
    command,
    read_csv_report,
    run_cli,
    until,
    write_job,
)

pytestmark = pytest.mark.anyio


def rows_of(cards: int, amount: str = "25.00") -> list[tuple[str, str, str]]:
    return [(str(uuid.uuid4()), amount, f"EMP-{n}") for n in range(cards)]


async def run_job(
    job: Path, base_url: str, tmp: Path, *more: str, output: str = "report.csv"
) -> Completed:
    return await run_cli(
        "run", str(job), "--provider", "uncash", "--base-url", base_url,
        "--ledger", str(tmp / "ledger.sqlite"), "--output", str(tmp / output),
        "--log-format", "json", "--cooldown", "0.05", *more,
        cwd=tmp, env=clean_env(UNCASH_API_TOKEN=TOKEN),
    )  # fmt: skip


async def start_run(job: Path, sb: RunningSandbox, tmp: Path, *more: str) -> anyio.abc.Process:
    """The runner as a background process (its output in runner.log), for tests that act on
    the sandbox or the process while it runs."""
    with (tmp / "runner.log").open("ab") as log:  # the child keeps its own descriptor
        return await anyio.open_process(
            command(
                "run", str(job), "--provider", "uncash", "--base-url", sb.base_url,
                "--ledger", str(tmp / "ledger.sqlite"), "--output", str(tmp / "report.csv"),
                "--log-format", "json", *more,
            ),
            cwd=tmp, env=clean_env(UNCASH_API_TOKEN=TOKEN),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip


def paid_per_card(sb: RunningSandbox) -> Counter[str]:
    return Counter(a.card_id for a in sb.state.applied)


# -- one job, one run: whatever the file is called or the URL spelled ----------------------


async def test_a_copy_of_the_job_under_another_name_resumes_instead_of_paying_again(
    tmp_path: Path,
) -> None:
    """`cp j.csv 'j (1).csv'` and run both against one ledger: every card is paid once."""
    job = write_job(tmp_path / "j.csv", rows_of(4))
    copy = tmp_path / "j (1).csv"
    shutil.copy(job, copy)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        first = await run_job(job, sb.base_url, tmp_path)
        second = await run_job(copy, sb.base_url, tmp_path, output="again.csv")
        paid = paid_per_card(sb)
    assert first.code == 0, first.stderr
    assert second.code == 0, second.stderr
    assert len(paid) == 4
    assert set(paid.values()) == {1}
    assert '"sent": 0' in second.stdout
    assert {r["status"] for r in read_csv_report(tmp_path / "again.csv")} == {"succeeded"}


async def test_respelled_base_urls_are_one_target(tmp_path: Path) -> None:
    """`.../api/v1`, `.../api/v1/`, `localhost` and `HTTP://127.0.0.1:port//api/v1`: paid once."""
    job = write_job(tmp_path / "j.csv", rows_of(3))
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        port = sb.base_url.split(":")[2].split("/")[0]
        spellings = [
            sb.base_url,
            sb.base_url + "/",
            sb.base_url.replace("127.0.0.1", "localhost"),
            f"HTTP://127.0.0.1:{port}//api/v1",
        ]
        codes = [(await run_job(job, url, tmp_path)).code for url in spellings]
        paid = paid_per_card(sb)
    assert codes == [0, 0, 0, 0]
    assert len(paid) == 3
    assert set(paid.values()) == {1}


async def test_a_run_recorded_by_an_earlier_version_is_found_by_its_content(
    tmp_path: Path,
) -> None:
    """A run keyed `<file stem>-<hash>` with the URL stored as typed is resumed, not repaid."""
    job = write_job(tmp_path / "j.csv", rows_of(3))
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        first = await run_job(job, sb.base_url, tmp_path, "--run-key", "j-0123456789ab")
        with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
            conn.execute("UPDATE runs SET base_url = ?", (f"uncash:{sb.base_url}/",))
        conn.close()
        again = await run_job(job, sb.base_url + "/", tmp_path)
        paid = paid_per_card(sb)
    assert first.code == 0, first.stderr
    assert again.code == 0, again.stderr
    assert "j-0123456789ab" in again.stdout
    assert set(paid.values()) == {1}
    assert len(paid) == 3


async def test_two_runs_of_the_same_job_leave_a_keyless_run_no_choice(tmp_path: Path) -> None:
    """The job ran under two explicit keys: a run without one is refused, naming both."""
    job = write_job(tmp_path / "j.csv", rows_of(2))
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        for key, more in (("payroll-a", ()), ("payroll-b", ("--allow-repeat-of", "payroll-a"))):
            done = await run_job(job, sb.base_url, tmp_path, "--run-key", key, *more)
            assert done.code == 0, done.stderr
        before = len(sb.state.applied)
        refused = await run_job(job, sb.base_url, tmp_path)
        after = len(sb.state.applied)
    assert refused.code == 2
    assert "payroll-a" in refused.stderr
    assert "payroll-b" in refused.stderr
    assert "nothing was sent" in refused.stderr
    assert after == before == 4


# -- "not applied" only once the provider can no longer apply it -------------------------


async def test_a_provider_still_processing_after_the_timeout_is_not_paid_twice(
    tmp_path: Path,
) -> None:
    """Topups apply 2 s after they arrive; the client gives up at 0.5 s: every card paid once."""
    job = write_job(tmp_path / "j.csv", rows_of(4))
    config = SandboxConfig(token=TOKEN, cooldown=0.05, apply_delay=2.0)
    async with serve_sandbox(config) as sb:
        done = await run_job(
            job, sb.base_url, tmp_path, "--timeout", "0.5", "--apply-grace", "2.5",
            "--max-attempts", "3",
        )  # fmt: skip
        # Whatever the runner did, wait for everything it sent to have been processed.
        arrivals = len(sb.state.topup_arrivals)
        await until(lambda: len(sb.state.applied) >= arrivals, limit=10)
        paid = paid_per_card(sb)
    assert done.code == 0, done.stderr
    assert len(paid) == 4
    assert set(paid.values()) == {1}
    report = read_csv_report(tmp_path / "report.csv")
    assert {r["status"] for r in report} == {"succeeded"}
    assert {r["attempts"] for r in report} == {"1"}


async def test_killed_while_the_provider_is_processing_the_rerun_waits_for_it(
    tmp_path: Path,
) -> None:
    """SIGKILL while answers are outstanding; an immediate rerun does not resend early."""
    job = write_job(tmp_path / "j.csv", rows_of(3))
    config = SandboxConfig(token=TOKEN, cooldown=0.05, apply_delay=3.0)
    async with serve_sandbox(config) as sb:
        process = await start_run(
            job, sb, tmp_path, "--cooldown", "0.05", "--timeout", "0.3", "--apply-grace", "3.5"
        )
        await until(lambda: len(sb.state.topup_arrivals) == 3)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        assert len(sb.state.applied) == 0  # still processing: applied 3 s after arrival
        again = await run_job(job, sb.base_url, tmp_path, "--timeout", "0.3")
        arrivals = len(sb.state.topup_arrivals)
        await until(lambda: len(sb.state.applied) >= arrivals, limit=10)
        paid = paid_per_card(sb)
    assert again.code == 0, again.stderr
    assert arrivals == 3
    assert set(paid.values()) == {1}
    assert len(paid) == 3


# -- answers checked against the card's books ----------------------------------------------


async def test_an_answer_whose_balance_moved_by_more_than_the_amount_is_needs_review(
    tmp_path: Path,
) -> None:
    """Someone else funds the card between two rows: the second row is needs_review."""
    card = str(uuid.uuid4())
    job = write_job(tmp_path / "j.csv", [(card, "10.00", "A"), (card, "20.00", "B")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=1.0)) as sb:
        process = await start_run(job, sb, tmp_path, "--cooldown", "1.0")
        await until(lambda: len(sb.state.applied) == 1)
        account = sb.state.card(card)
        assert account is not None
        sb.state.put_card(
            sb.state.merged_card(
                card,
                deposit=account.deposit + Decimal("7.00"),
                balance=account.balance + Decimal("7.00"),
            )
        )
        code = await process.wait()
        applied = len(sb.state.applied)
    assert code == 1
    assert applied == 2
    first, second = read_csv_report(tmp_path / "report.csv")
    assert first["status"] == "succeeded"
    assert second["status"] == "needs_review"
    assert "deposit moved by 27.00" in second["error"]


async def test_a_card_spent_from_between_two_rows_is_no_discrepancy(tmp_path: Path) -> None:
    """The card's holder spends between two rows: balance lower, deposit exact: succeeded."""
    card = str(uuid.uuid4())
    job = write_job(tmp_path / "j.csv", [(card, "10.00", "A"), (card, "20.00", "B")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=1.0)) as sb:
        process = await start_run(job, sb, tmp_path, "--cooldown", "1.0")
        await until(lambda: len(sb.state.applied) == 1)
        account = sb.state.card(card)
        assert account is not None
        sb.state.put_card(sb.state.merged_card(card, balance=account.balance - Decimal("3.00")))
        code = await process.wait()
    assert code == 0
    assert [r["status"] for r in read_csv_report(tmp_path / "report.csv")] == [
        "succeeded",
        "succeeded",
    ]


# -- the exit code says whether anything was sent --------------------------------------------


async def test_a_ledger_that_fills_up_mid_run_exits_1_not_2(tmp_path: Path) -> None:
    """The disk fills after some topups: exit 1 (something was sent), a resumable run."""
    job = write_job(tmp_path / "j.csv", rows_of(300))
    limited = (
        "import os, resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'runner', *sys.argv[1:]])"
    )
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        full = await anyio.run_process(
            [
                sys.executable, "-c", limited,
                "run", str(job), "--provider", "uncash", "--base-url", sb.base_url,
                "--ledger", str(tmp_path / "ledger.sqlite"),
                "--output", str(tmp_path / "report.csv"), "--log-format", "json",
                "--cooldown", "0.05", "--rate-limit", "unlimited",
            ],
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN), check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        sent = len(sb.state.applied)
        again = await run_job(job, sb.base_url, tmp_path, "--rate-limit", "unlimited")
        paid = paid_per_card(sb)
    stderr = full.stderr.decode()
    assert 0 < sent < 300, stderr
    assert full.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert "rerun the same command" in stderr
    assert again.code == 0, again.stderr
    assert len(paid) == 300
    assert set(paid.values()) == {1}


async def test_alix_killed_while_the_provider_is_processing_the_rerun_waits_for_it(
    tmp_path: Path, keys: Keys, alix_env: dict[str, str]
) -> None:
    """Alix applies 3 s after arrival; SIGKILL before, rerun at once: 4 topups for 4 cards."""
    job, amounts = unique_job(tmp_path, rows=4, cards=4, seed=2)
    async with serve_webhooks(tmp_path / "ledger.sqlite", keys.alix_public.encode()) as hook:
        config = replace(sandbox_config(keys, hook.url), apply_delay=3.0)
        async with serve_sandbox(config) as sb:
            assert sb.alix is not None
            alix = sb.alix
            more = ("--provider", "alix", "--base-url", alix.base_url, "--timeout", "0.3",
                    "--apply-grace", "3.5", "--wait-settle", "0")  # fmt: skip
            with (tmp_path / "runner.log").open("ab") as log:
                process = await anyio.open_process(
                    command(
                        "run", str(job), "--ledger", str(tmp_path / "ledger.sqlite"),
                        "--output", str(tmp_path / "report.csv"), "--log-format", "json", *more,
                    ),
                    cwd=tmp_path, env=alix_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            await until(lambda: len(alix.state.topup_arrivals) >= 4)
            assert not alix.state.topups  # still processing: applied 3 s after arrival
            process.send_signal(signal.SIGKILL)
            await process.wait()
            again = await run_cli(
                "run", str(job), "--ledger", str(tmp_path / "ledger.sqlite"),
                "--output", str(tmp_path / "report.csv"), "--log-format", "json", *more,
                cwd=tmp_path, env=alix_env,
            )  # fmt: skip
            arrivals = len(alix.state.topup_arrivals)
            await until(lambda: len(alix.state.topups) >= arrivals, limit=10)
            accepted = Counter(t.amount for t in alix.state.topups)
    assert again.code == 0, again.stderr
    assert set(accepted) == set(amounts)
    assert set(accepted.values()) == {1}
