"""What an operator or a cron entry relies on: templated run keys, fee estimates, the
failed-rows file, metrics, and warnings that come before money moves."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from runner.config import expand_run_key, resolve_settings
from runner.errors import ConfigError
from runner.jobs import JobRow
from runner.metrics import RunMetrics, StatusTotals, render_metrics, write_metrics
from runner.preflight import duplicate_rows, fit_fee_model
from runner.records import RowStatus
from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import serve_sandbox
from tests.e2e import TOKEN, clean_env, read_csv_report, run_cli, write_job

WHEN = datetime(2026, 11, 21, 3, 0, 0).astimezone()


def test_run_key_template_fields() -> None:
    """Recurring jobs get one run key per period: {date}, {month}, {week}, {job}."""
    assert expand_run_key("daily-{date}", "jobs/pay.csv", WHEN) == "daily-2026-11-21"
    assert expand_run_key("{job}-{month}", "jobs/pay.csv", WHEN) == "pay-2026-11"
    assert expand_run_key("w-{week}", "x.csv", WHEN) == "w-2026-W47"


def test_run_key_template_unknown_field_is_a_config_error() -> None:
    """A typo in a template is caught before anything runs, naming the valid fields."""
    with pytest.raises(ConfigError, match=r"\{date\}"):
        expand_run_key("daily-{dat}", "x.csv", WHEN)


def test_templated_run_key_from_the_environment() -> None:
    """TOPUP_RUN_KEY is expanded like the flag."""
    settings = resolve_settings({}, env={"TOPUP_RUN_KEY": "nightly-{year}"}, job_file="j.csv")
    assert settings.run_key == f"nightly-{datetime.now().astimezone().year}"


def test_fee_model_never_underestimates_what_it_has_seen() -> None:
    """The learned line lies on or above every earlier fee."""
    samples = [(Decimal(a), Decimal(a) * Decimal("0.025") + Decimal("0.50")) for a in (10, 99, 450)]
    samples.append((Decimal("20.00"), Decimal("1.20")))  # an outlier above the line
    model = fit_fee_model(samples)
    assert model is not None
    for amount, fee in samples:
        assert model.fee(amount) >= fee


def test_fee_model_from_one_amount_is_a_rate() -> None:
    """With a single distinct amount, the estimate is its fee rate."""
    model = fit_fee_model([(Decimal("100.00"), Decimal("3.00"))])
    assert model is not None
    assert model.fee(Decimal("200.00")) == Decimal("6.00")


def test_duplicate_rows_are_grouped() -> None:
    """Rows with the same card, amount and reference are reported together."""
    rows = [
        JobRow(1, "a", Decimal("5.00"), "R"),
        JobRow(2, "b", Decimal("5.00"), "R"),
        JobRow(3, "a", Decimal("5.00"), "R"),
        JobRow(4, "a", Decimal("5.00"), "S"),
    ]
    assert duplicate_rows(rows) == [[1, 3]]


def test_metrics_text_format_and_last_success_carried_over(tmp_path: Path) -> None:
    """Metrics name every status; a failed run keeps the previous last-success time."""
    path = tmp_path / "topup.prom"
    ok = RunMetrics(
        job="pay",
        provider="uncash",
        run_key="k1",
        totals={RowStatus.SUCCEEDED: StatusTotals(3, Decimal("30.00"), Decimal("1.50"))},
        duration=2.5,
        exit_code=0,
        finished=WHEN,
    )
    write_metrics(path, ok)
    first = path.read_text()
    assert 'topup_runner_rows{job="pay",provider="uncash",status="succeeded"} 3' in first
    assert 'topup_runner_rows{job="pay",provider="uncash",status="failed"} 0' in first
    assert 'topup_runner_amount{job="pay",provider="uncash",status="succeeded"} 30.00' in first
    later = replace(ok, exit_code=1, finished=WHEN.replace(hour=4))
    write_metrics(path, later)
    second = path.read_text()
    stamp = f"{WHEN.timestamp():.3f}"
    assert (
        f'topup_runner_last_success_timestamp_seconds{{job="pay",provider="uncash"}} {stamp}'
        in second
    )
    assert 'topup_runner_exit_code{job="pay",provider="uncash"} 1' in second


def test_metrics_escape_label_values() -> None:
    """Quotes and backslashes in a job name cannot break the text format."""
    run = RunMetrics('a"b\\c', "sandbox", "k", {}, 0.0, 0, WHEN)
    assert 'job="a\\"b\\\\c"' in render_metrics(run, None)


@pytest.mark.anyio
async def test_failed_rows_job_and_metrics_after_a_run(tmp_path: Path) -> None:
    """Refused rows land in `<report>.failed.csv`, a job that reruns as it stands."""
    good, limited = str(uuid.uuid4()), str(uuid.uuid4())
    job = write_job(
        tmp_path / "job.csv", [(good, "10.00", "A"), (limited, "600.00", "B")], extra="name"
    )
    config = SandboxConfig(token=TOKEN, cooldown=0.2, default_card_limit=Decimal("500.00"))
    async with serve_sandbox(config) as sb:
        done = await run_cli(
            "run", str(job), "--provider", "uncash", "--base-url", sb.base_url,
            "--ledger", str(tmp_path / "l.sqlite"), "--output", str(tmp_path / "out.csv"),
            "--metrics-file", str(tmp_path / "m.prom"), "--cooldown", "0.2",
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
    assert done.code == 1
    failed = read_csv_report(tmp_path / "out.failed.csv")
    assert [(r["card_id"], r["amount"], r["reference"]) for r in failed] == [
        (limited, "600.00", "B")
    ]
    assert failed[0]["original_row"] == "2"
    assert "card_limit" in failed[0]["original_error"]
    assert failed[0]["name"] == "value-1"
    metrics = (tmp_path / "m.prom").read_text()
    assert 'status="failed"} 1' in metrics
    assert "topup_runner_exit_code" in metrics


@pytest.mark.anyio
async def test_check_warns_of_duplicates_and_estimates_fees(tmp_path: Path) -> None:
    """`check` names rows pasted twice and the fee estimate it compared with the wallet."""
    card = str(uuid.uuid4())
    job = write_job(tmp_path / "job.csv", [(card, "10.00", "A"), (card, "10.00", "A")])
    done = await run_cli("check", str(job), "--fee-rate", "0.05", cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert "rows 1, 2 have the same card" in done.stdout
    assert "estimated fees 1.00" in done.stdout
    assert "estimated minimum duration" in done.stdout


@pytest.mark.anyio
async def test_without_a_terminal_every_output_line_is_json(tmp_path: Path) -> None:
    """Under cron or CI (no terminal) stdout and stderr hold JSON lines only, no ANSI codes."""
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    done = await run_cli(
        "run", str(job), "--output", "out.xlsx", cwd=tmp_path, env=clean_env(CI="true")
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("card_id,amount\nx,abc\n", encoding="utf-8")
    refused = await run_cli("run", str(bad), cwd=tmp_path, env=clean_env(CI="true"))
    assert (done.code, refused.code) == (0, 2)
    lines = (done.stdout + done.stderr + refused.stdout + refused.stderr).splitlines()
    records = [json.loads(line) for line in lines]
    assert "\x1b[" not in "".join(lines)
    summary = next(r for r in records if r["event"] == "run.summary")
    assert summary["sandbox"] is True
    assert all(r["provider"] == "sandbox" for r in records if r["event"].startswith("topup."))
    problem = next(r for r in records if r["event"] == "job.problem")
    assert (problem["row"], problem["column"]) == (1, "amount")
