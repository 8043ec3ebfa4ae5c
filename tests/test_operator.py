"""What an operator or a cron entry relies on: templated run keys, fee estimates, the
failed-rows file, metrics, and warnings that come before money moves."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.abc
import pytest

from runner.cli import guarded
from runner.config import expand_run_key, resolve_settings
from runner.domain import JobRow, RowStatus
from runner.errors import AuthenticationFailed, ConfigError, PreflightRefused, ProviderError
from runner.metrics import RunMetrics, StatusTotals, render_metrics, write_metrics
from runner.preflight import duplicate_rows, fit_fee_model
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


class CountingServer:
    """A second HTTP server on 127.0.0.1 that counts every connection made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.url = ""

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        async def answer(stream: anyio.abc.SocketStream) -> None:
            self.connections += 1
            async with stream:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    await stream.receive()
                    await stream.send(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )

        async with listener:
            await listener.serve(answer)


@contextlib.asynccontextmanager
async def counting_server() -> AsyncIterator[CountingServer]:
    server = CountingServer()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    server.url = f"http://127.0.0.1:{port}/api/v1"
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("give_base_url", [True, False])
async def test_job_file_cannot_send_the_token_elsewhere(
    tmp_path: Path, give_base_url: bool
) -> None:
    """A job's settings.base_url is refused (exit 2): the host it names gets nothing."""
    card = str(uuid.uuid4())
    config = SandboxConfig(token=TOKEN)
    async with serve_sandbox(config) as sb, counting_server() as elsewhere:
        job = tmp_path / "job.yaml"
        job.write_text(
            f"settings: {{base_url: '{elsewhere.url}'}}\n"
            f"topups:\n  - {{card_id: '{card}', amount: '10.00'}}\n",
            encoding="utf-8",
        )
        given = ["--base-url", sb.base_url] if give_base_url else []
        done = await run_cli(
            "check", str(job), "--provider", "uncash", *given, "--log-format", "console",
            cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
    assert done.code == 2, done.stderr
    assert elsewhere.connections == 0
    assert "settings.base_url" in done.stderr
    assert "--base-url" in done.stderr
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.anyio
async def test_check_with_a_wrong_token_is_one_line(tmp_path: Path) -> None:
    """A 401 during check is the credentials error (exit 2), not an internal error."""
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    wrong = "uc_" + "W" * 40
    async with serve_sandbox(SandboxConfig(token=TOKEN)) as sb:
        done = await run_cli(
            "check", str(job), "--provider", "uncash", "--base-url", sb.base_url,
            "--log-format", "console", cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=wrong),
        )  # fmt: skip
    assert done.code == 2, done.stderr
    assert "internal error" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "UNCASH_API_TOKEN" in done.stderr
    assert wrong not in done.stdout + done.stderr


@pytest.mark.anyio
async def test_base_url_password_is_refused_and_not_shown(tmp_path: Path) -> None:
    """A base URL with user:password@ is exit 2, and the password appears nowhere."""
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    done = await run_cli(
        "check", str(job), "--provider", "uncash",
        "--base-url", "http://admin:hunter2secret@127.0.0.1:9/api", "--log-format", "console",
        cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
    )  # fmt: skip
    assert done.code == 2
    assert "password" in done.stderr
    assert "hunter2secret" not in done.stdout + done.stderr


@pytest.mark.anyio
async def test_apply_grace_option_and_variable(tmp_path: Path) -> None:
    """--apply-grace and TOPUP_APPLY_GRACE are read and validated by run and check."""
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    flag = await run_cli("check", str(job), "--apply-grace", "-1", cwd=tmp_path)
    variable = await run_cli(
        "check", str(job), cwd=tmp_path, env=clean_env(TOPUP_APPLY_GRACE="nan")
    )
    fine = await run_cli("check", str(job), "--apply-grace", "0", cwd=tmp_path)
    assert (flag.code, variable.code, fine.code) == (2, 2, 0), fine.stderr
    assert "apply-grace" in flag.stderr
    assert "apply-grace" in variable.stderr


def raising(exc: BaseException) -> Callable[[], None]:
    @guarded
    def command() -> None:
        raise exc

    return command


def exit_of(
    command: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as caught:
        command()
    return caught.value.code, capsys.readouterr().err


class TestGuarded:
    @pytest.fixture(autouse=True)
    def console(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TOPUP_LOG_FORMAT", "console")
        monkeypatch.delenv("TOPUP_DEBUG", raising=False)

    def test_group_of_one_runner_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A runner error raised in a task group is reported as itself."""
        group = ExceptionGroup("tg", [AuthenticationFailed("refused the API token")])
        code, err = exit_of(raising(group), capsys)
        assert code == 2
        assert err == "topup-runner: error: refused the API token\n"

    def test_the_most_telling_error_wins(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Of several, exit 2 (nothing sent, fix the input) beats a provider failure (1)."""
        group = ExceptionGroup(
            "tg",
            [
                ProviderError("connection reset"),
                ExceptionGroup("inner", [ValueError("x"), AuthenticationFailed("bad token")]),
                PreflightRefused("wallet"),
            ],
        )
        code, err = exit_of(raising(group), capsys)
        assert code == 2
        assert "bad token" in err
        assert "internal error" not in err

    def test_interrupt_in_a_group(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Ctrl-C inside a task group is an interrupt, exit 130."""
        group = BaseExceptionGroup("tg", [KeyboardInterrupt(), ProviderError("x")])
        code, err = exit_of(raising(group), capsys)
        assert code == 130
        assert "interrupted" in err

    @pytest.mark.parametrize("grouped", [True, False])
    def test_internal_errors_are_one_line_without_secrets(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, grouped: bool
    ) -> None:
        """A bug, alone or in a group, is one internal-error line that shows no secret."""
        monkeypatch.setenv("UNCASH_API_TOKEN", TOKEN)
        bug = RuntimeError(f"header Bearer {TOKEN}\nat https://u:pw123456@host/")
        code, err = exit_of(raising(ExceptionGroup("tg", [bug]) if grouped else bug), capsys)
        assert code == 1
        assert err.count("\n") == 1
        assert "internal error" in err
        assert TOKEN not in err
        assert "pw123456" not in err
