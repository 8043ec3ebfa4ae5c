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


# -- the files a run writes at its end are checked before its first topup --------------------

import os  # noqa: E402  (this section's own imports: the file is appended to, not edited)


def _output_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """The options of one unwritable-output case and a fragment of its refusal."""
    out = tmp_path / "out.csv"
    if case == "report folder missing":
        return ["--output", str(tmp_path / "nowhere" / "out.csv")], "does not exist"
    if case == "report folder is a file":
        (tmp_path / "afile").write_text("x", encoding="utf-8")
        return ["--output", str(tmp_path / "afile" / "out.csv")], "is not a folder"
    if case == "report is a folder":
        out.mkdir()
        return ["--output", str(out)], "is a folder"
    if case == "failed-rows job is a folder":
        (tmp_path / "out.failed.csv").mkdir()
        return ["--output", str(out)], "out.failed.csv, the file written beside it, is a folder"
    if case == "metrics folder missing":
        metrics = tmp_path / "none" / "m.prom"
        return ["--output", str(out), "--metrics-file", str(metrics)], "does not exist"
    if case == "metrics file is a folder":
        (tmp_path / "m.prom").mkdir()
        return ["--output", str(out), "--metrics-file", str(tmp_path / "m.prom")], "is a folder"
    assert case == "report folder not writable"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return ["--output", str(folder / "out.csv")], "cannot write in the folder"


OUTPUT_CASES = [
    "report folder missing",
    "report folder is a file",
    "report is a folder",
    "failed-rows job is a folder",
    "metrics folder missing",
    "metrics file is a folder",
    pytest.param(
        "report folder not writable",
        marks=pytest.mark.skipif(
            hasattr(os, "geteuid") and os.geteuid() == 0,
            reason="running as root: permissions are not enforced",
        ),
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize("case", OUTPUT_CASES)
async def test_unwritable_outputs_are_refused_before_any_topup(tmp_path: Path, case: str) -> None:
    """A report, failed-rows job or metrics file that cannot be written: exit 2 from run and
    from check, the same line, and the provider gets no topup."""
    options, fragment = _output_case(tmp_path, case)
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.2)) as sb:
        done = {}
        for command in ("run", "check"):
            done[command] = await run_cli(
                command, str(job), "--provider", "uncash", "--base-url", sb.base_url,
                "--ledger", str(tmp_path / "l.sqlite"), "--log-format", "console", *options,
                cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
            )  # fmt: skip
        assert not sb.state.applied
    errors = {c: [x for x in d.stderr.splitlines() if "error:" in x] for c, d in done.items()}
    assert (done["run"].code, done["check"].code) == (2, 2), (
        done["run"].stderr,
        done["check"].stdout,
        done["check"].stderr,
    )
    assert errors["run"] == errors["check"]
    assert len(errors["run"]) == 1
    assert fragment in errors["run"][0]


@pytest.mark.anyio
async def test_a_report_lost_at_the_end_says_how_to_write_it_again(tmp_path: Path) -> None:
    """The report folder vanishes during the run: exit 1, and the command the message gives
    writes the report from the ledger."""
    from runner.config import Settings
    from runner.errors import RunnerError
    from runner.jobs import load_job
    from runner.run import run_job

    folder = tmp_path / "reports"
    folder.mkdir()
    output = folder / "out.csv"

    class FolderThief:
        """A progress watcher that, once a row is done, puts a file where the folder was."""

        def start(self, total: int, done: int) -> None:
            return None

        def row_final(self, status: RowStatus) -> None:
            if folder.is_dir():
                folder.rmdir()
                folder.write_text("not a folder any more", encoding="utf-8")

    job = load_job(write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")]))
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.2)) as sb:
        settings = Settings(
            provider="uncash", base_url=sb.base_url, ledger=str(tmp_path / "l.sqlite"),
            output=output, run_key="lost-report", cooldown=0.2, timeout=5.0, apply_grace=0.2,
        )  # fmt: skip
        with pytest.raises(RunnerError) as caught:
            await run_job(job, settings, FolderThief(), env={"UNCASH_API_TOKEN": TOKEN})
        assert len(sb.state.applied) == 1
    message = str(caught.value)
    assert caught.value.exit_code == 1
    again = f"topup-runner report --run-key lost-report --output {output} --ledger "
    assert again in message
    folder.unlink()
    folder.mkdir()
    hint = message.split("`")[1].split()
    assert hint[0] == "topup-runner"
    rewritten = await run_cli(*hint[1:], cwd=tmp_path)
    assert rewritten.code == 0, rewritten.stderr
    assert [r["status"] for r in read_csv_report(output)] == ["succeeded"]


# -- a row's status, attempts and error never contradict each other ---------------------------

import signal  # noqa: E402
import subprocess  # noqa: E402

from tests.e2e import command, until  # noqa: E402

# Every fault kind but the slow ones, which would hold a test for seconds per fault.
FAST_FAULTS = (
    "drop_before",
    "drop_after",
    "error_before",
    "error_after",
    "rate_limited",
    "cooldown",
)
MONEY_FIELDS = ("fee", "total_charged", "card_balance_after", "transaction_id", "invoice_id")


def contradictions(row: dict[str, str]) -> list[str]:
    """What in a report row contradicts its status (empty: the row holds together).

    attempts counts the requests sent; a row with none has no start time; a row that moved
    money has no error and its money; a row that did not has none, and any request it sent
    is explained in its error."""
    status, error, started = row["status"], row["error"], row["started_at"]
    attempts = int(row["attempts"])
    found = []
    if (attempts == 0) != (started == ""):
        found.append(f"attempts {attempts} but started_at {started!r}")
    if status in ("succeeded", "pending"):
        if attempts < 1:
            found.append(f"{status} with no request sent")
        if error:
            found.append(f"{status} with an error")
    elif status in ("failed", "needs_review"):
        if not error:
            found.append(f"{status} without an error")
        if status == "needs_review" and attempts < 1:
            found.append("needs_review with no request sent")
    else:
        assert status == "not_attempted", status
        if attempts and f"{attempts} request" not in error:
            found.append(f"not_attempted after {attempts} requests, error {error!r}")
        if not attempts and error:
            found.append(f"not_attempted, nothing sent, error {error!r}")
    if status in ("failed", "not_attempted"):
        found.extend(f"{status} with {name}" for name in MONEY_FIELDS if row[name])
    return found


@pytest.mark.parametrize(
    "row",
    [
        {"status": "not_attempted", "attempts": "3", "started_at": "t", "error": ""},
        {"status": "succeeded", "attempts": "0", "started_at": "", "error": ""},
        {"status": "failed", "attempts": "1", "started_at": "t", "error": ""},
        {"status": "needs_review", "attempts": "0", "started_at": "", "error": "x"},
        {"status": "not_attempted", "attempts": "0", "started_at": "t", "error": ""},
    ],
)
def test_the_row_invariants_catch_contradictions(row: dict[str, str]) -> None:
    """The checker itself: each of these rows contradicts its status."""
    assert contradictions({**dict.fromkeys(MONEY_FIELDS, ""), **row})


@pytest.mark.anyio
async def test_rows_stopped_after_wait_refusals_say_so(tmp_path: Path) -> None:
    """SIGTERM while a row is refused with "wait" again and again: the row stays
    not_attempted (no money moved, the rerun sends it) and its error says how many requests
    were refused with "wait"; every row of the report holds together."""
    card = str(uuid.uuid4())
    job = write_job(tmp_path / "job.csv", [(card, "10.00", "A"), (card, "11.00", "B")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.2)) as sb:
        sb.faults.script("cooldown", card, count=1000)
        with (tmp_path / "runner.log").open("ab") as log:
            process = await anyio.open_process(
                command(
                    "run", str(job), "--provider", "uncash", "--base-url", sb.base_url,
                    "--ledger", str(tmp_path / "l.sqlite"), "--output", str(tmp_path / "r.csv"),
                    "--cooldown", "0.2", "--log-format", "json",
                ),
                cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        await until(lambda: len(sb.state.topup_arrivals) >= 3)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            code = await process.wait()
        assert not sb.state.applied
    assert code == 1
    first, second = read_csv_report(tmp_path / "r.csv")
    assert first["status"] == "not_attempted"
    assert int(first["attempts"]) >= 3
    assert f'{first["attempts"]} refused with "wait"' in first["error"]
    assert "rerun the same run key" in first["error"]
    assert (second["status"], second["attempts"], second["error"]) == ("not_attempted", "0", "")
    assert [contradictions(row) for row in (first, second)] == [[], []]


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2])
async def test_every_report_row_holds_together(tmp_path: Path, seed: int) -> None:
    """Faults of every kind, a refusal, a card set aside by preflight, a stop: whatever each
    row went through, its status, attempts, start time and error agree."""
    cards = [str(uuid.uuid4()) for _ in range(6)]
    frozen = str(uuid.uuid4())
    rows = [(cards[n % 6], f"{5 + n}.00", f"R{n}") for n in range(30)]
    rows += [(frozen, "7.00", "F"), (cards[0], "600.00", "L")]
    job = write_job(tmp_path / "job.csv", rows)
    from runner.sandbox.config import SandboxCard

    config = SandboxConfig(
        token=TOKEN, cooldown=0.2, fault_rate=0.4, seed=seed, fault_kinds=FAST_FAULTS,
        default_card_limit=Decimal("500.00"), cards=(SandboxCard(frozen, status="frozen"),),
    )  # fmt: skip
    async with serve_sandbox(config) as sb:
        done = await run_cli(
            "run", str(job), "--provider", "uncash", "--base-url", sb.base_url,
            "--ledger", str(tmp_path / "l.sqlite"), "--output", str(tmp_path / "r.csv"),
            "--cooldown", "0.2", "--rate-limit", "200", "--allow-partial", "--max-attempts", "2",
            # The sandbox applies before it answers or not at all, never later: a short grace.
            "--timeout", "2", "--apply-grace", "0.5",
            "--log-format", "json", cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )  # fmt: skip
    assert done.code in (0, 1), done.stderr[-2000:]
    report = read_csv_report(tmp_path / "r.csv")
    assert {r["status"] for r in report} >= {"succeeded", "failed"}
    assert {r["row"]: contradictions(r) for r in report if contradictions(r)} == {}


# -- nothing a run writes may land on the job file, the ledger or another of its files ------


def _overwrite_case(tmp_path: Path, case: str, job: Path, ledger: Path) -> list[str]:
    """The options of one case: a file the run writes named as one it must keep."""
    out = tmp_path / "out.csv"
    if case == "report is the job file":
        return ["--output", str(job)]
    if case == "report is the job file through a symlink":
        (tmp_path / "link.csv").symlink_to(job)
        return ["--output", str(tmp_path / "link.csv")]
    if case == "report is a hard link of the job file":
        os.link(job, tmp_path / "hard.csv")
        return ["--output", str(tmp_path / "hard.csv")]
    if case == "metrics file is the job file":
        return ["--output", str(out), "--metrics-file", str(tmp_path / "sub" / ".." / job.name)]
    if case == "metrics file is the ledger":
        return ["--output", str(out), "--metrics-file", str(ledger)]
    if case == "metrics file is the ledger's WAL":
        return ["--output", str(out), "--metrics-file", f"{ledger}-wal"]
    assert case == "metrics file is the report's failed-rows job"
    return ["--output", str(out), "--metrics-file", str(tmp_path / "out.failed.csv")]


OVERWRITE_CASES = [
    "report is the job file",
    "report is the job file through a symlink",
    "report is a hard link of the job file",
    "metrics file is the job file",
    "metrics file is the ledger",
    "metrics file is the ledger's WAL",
    "metrics file is the report's failed-rows job",
]


@pytest.mark.anyio
@pytest.mark.parametrize("case", OVERWRITE_CASES)
async def test_no_output_overwrites_the_job_the_ledger_or_another_output(
    tmp_path: Path, case: str
) -> None:
    """Exit 2 before any topup, one line, and the job file and the ledger byte for byte as
    they were: before, the report or the exit's metrics replaced the approved job file."""
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    ledger = tmp_path / "l.sqlite"
    (tmp_path / "sub").mkdir()
    common = ["--provider", "uncash", "--ledger", str(ledger), "--log-format", "console"]
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.2)) as sb:
        env = clean_env(UNCASH_API_TOKEN=TOKEN)
        first = await run_cli(
            "check", str(job), *common, "--base-url", sb.base_url, cwd=tmp_path, env=env
        )  # fmt: skip  (makes nothing, reads)
        assert first.code == 0, first.stderr
        seed = await run_cli(
            "run",
            str(write_job(tmp_path / "other.csv", [(str(uuid.uuid4()), "11.00", "B")])),
            *common,
            "--base-url",
            sb.base_url,
            "--output",
            str(tmp_path / "other-report.csv"),
            cwd=tmp_path,
            env=env,
        )  # fmt: skip  (the ledger now exists, with a run in it)
        assert seed.code == 0, seed.stderr
        before = (job.read_bytes(), ledger.read_bytes())
        applied = len(sb.state.applied)
        options = _overwrite_case(tmp_path, case, job, ledger)
        done = await run_cli("run", str(job), *common, "--base-url", sb.base_url, *options,
                             cwd=tmp_path, env=env)  # fmt: skip
        assert len(sb.state.applied) == applied
    assert done.code == 2, done.stderr
    assert (job.read_bytes(), ledger.read_bytes()) == before
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert (
        "would overwrite" in errors[0]
        or "name the same file" in errors[0]
        or ("holds something else" in errors[0])
    )
    assert _existing(Path(f"{ledger}-wal"), tmp_path / "out.failed.csv") == []


def _existing(*paths: Path) -> list[Path]:
    return [path for path in paths if path.exists()]
