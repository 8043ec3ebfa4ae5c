"""What an operator sees on an 80-column terminal: log lines and the progress bar fit it, the
bar's times are whole, and applied rows go to the bar; JSON log lines keep their content."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from rich.console import Console

from runner.domain import RowStatus
from runner.logs import configure_logging, row_logger
from runner.progress import RichProgress
from tests.e2e import ROOT, clean_env, run_cli

EXAMPLE = ROOT / "jobs" / "payroll-2026-11.csv"
WIDTH = 80
CARD = "cf223023-ede9-4392-a276-06baf51ebf68"
TIME = re.compile(r"(?<![\d:])\d+:\d\d:\d\d(?![\d:])")


class TextStream(io.StringIO):
    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def emit_typical_events() -> None:
    """The events of a run, with realistic values (a UUID card, long messages)."""
    log = structlog.get_logger("runner.run")
    structlog.contextvars.bind_contextvars(run_key="job-629f2696e6ab")
    log.info(
        "run.started", rows=37, rows_to_do=37, base_url="http://127.0.0.1:34123/api/v1",
        rate_limit=20.0, cooldown=2.0, concurrency=8, lower_bound_s=1.8,
    )  # fmt: skip
    log.info(
        "preflight.ok", wallet_balance="1000000.00", total_amount="9555.62",
        estimated_fees=None, fee_source="unknown", cards=36, set_aside=0,
    )  # fmt: skip
    emit, enabled = row_logger(log)
    if enabled:
        for row in (1, 14, 1234, 1_000_000):
            emit(
                "topup.applied", row=row, card_id=CARD, amount="10000.00", fee="263.00",
                attempt=1, pending=False,
            )  # fmt: skip
    log.warning(
        "topup.refused", row=7, card_id=CARD, attempt=2,
        error="Topup would exceed card limit. Current deposit: 500, Limit: 1000, Available: 500",
    )  # fmt: skip
    log.warning("topup.unknown", row=9, card_id=CARD, detail="x" * 200)
    log.info("report.written", report="/home/someone/payroll/" + "deep/" * 20 + "out.xlsx")


def console_lines(monkeypatch: pytest.MonkeyPatch, tty: bool = False, **options: bool) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    stream = TextStream(tty)
    configure_logging(provider="sandbox", fmt="console", stream=stream, **options)
    emit_typical_events()
    return re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue()).splitlines()


class TestConsoleLogs:
    def test_no_line_is_wider_than_the_terminal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every console log line fits 80 columns, long values included."""
        lines = console_lines(monkeypatch)
        assert lines
        assert [line for line in lines if len(line) > WIDTH] == []

    def test_colours_do_not_count(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a terminal (colours on) the visible text still fits 80 columns."""
        lines = console_lines(monkeypatch, tty=True)
        assert [line for line in lines if len(line) > WIDTH] == []

    def test_an_applied_row_is_one_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a bar, each applied topup is one compact line naming row, amount and fee."""
        lines = console_lines(monkeypatch)
        applied = [i for i, line in enumerate(lines) if "topup.applied" in line]
        assert len(applied) == 4
        for i in applied:
            assert "amount=10000.00" in lines[i]
            assert "fee=263.00" in lines[i]
            assert "row=" in lines[i]
            follows = lines[i + 1] if i + 1 < len(lines) else ""
            assert not follows.startswith(" "), (lines[i], follows)

    def test_applied_rows_go_to_the_bar(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With a progress bar, applied rows are counted by the bar, not logged line by line."""
        lines = console_lines(monkeypatch, rows_on_bar=True)
        assert not any("topup.applied" in line for line in lines)
        assert any("topup.refused" in line for line in lines)

    def test_a_sandbox_line_says_so(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every console line of a sandbox run names the sandbox, but a row's success."""
        lines = console_lines(monkeypatch)
        firsts = [line for line in lines if not line.startswith(" ") and "applied" not in line]
        assert firsts
        assert all("sandbox" in line for line in firsts)

    def test_nothing_is_lost(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Wrapped values come back whole when the continuation lines are joined."""
        text = "".join(line.strip() for line in console_lines(monkeypatch))
        assert "x" * 200 in text
        assert "Available: 500" in text.replace(" ", "").replace("Available:500", "Available: 500")
        assert "deep/" * 20 + "out.xlsx" in text


class TestJsonLogs:
    def test_content_is_unchanged(self) -> None:
        """A JSON event keeps every field, the provider, an ISO UTC timestamp, one line each."""
        stream = TextStream()
        configure_logging(provider="sandbox", fmt="json", stream=stream, rows_on_bar=True)
        structlog.contextvars.bind_contextvars(run_key="job-1")
        structlog.get_logger("x").warning("topup.refused", row=7, card_id=CARD, error="e" * 300)
        (line,) = stream.getvalue().splitlines()
        event = json.loads(line)
        assert event.pop("timestamp").endswith("Z")
        assert event == {
            "event": "topup.refused", "level": "warning", "provider": "sandbox",
            "run_key": "job-1", "row": 7, "card_id": CARD, "error": "e" * 300,
        }  # fmt: skip


def render_bar(total: int, done: int, statuses: list[RowStatus], elapsed: float) -> list[str]:
    """The bar after `statuses` rows, the last of them in its final 10 seconds of `elapsed`."""
    console = Console(width=WIDTH, record=True, file=io.StringIO(), color_system=None)
    now = [1000.0]
    bar = RichProgress("sandbox", console=console, get_time=lambda: now[0])
    bar.start(total, done)
    for i in range(len(statuses)):
        now[0] = 1000.0 + elapsed - 10 + 10 * (i + 1) / len(statuses)
        bar.row_final(statuses[i])
    console.print(bar)
    return console.export_text().splitlines()


class TestProgressBar:
    @pytest.mark.parametrize(
        ("total", "done", "statuses", "elapsed"),
        [
            (37, 0, [RowStatus.SUCCEEDED] * 12, 1.5),
            (1_000_000, 0, [RowStatus.SUCCEEDED] * 50 + [RowStatus.FAILED] * 5, 3700.0),
            (
                250_000,
                100_000,
                [RowStatus.SUCCEEDED, RowStatus.NEEDS_REVIEW, RowStatus.PENDING] * 30,
                36_000.0,
            ),
        ],
    )
    def test_fits_80_columns_with_whole_times(
        self, total: int, done: int, statuses: list[RowStatus], elapsed: float
    ) -> None:
        """The bar fits 80 columns, and its elapsed and remaining times are whole, never cut."""
        lines = [line for line in render_bar(total, done, statuses, elapsed) if line.strip()]
        assert lines
        assert [line for line in lines if len(line) > WIDTH] == []
        text = "\n".join(lines)
        assert "…" not in text
        assert len(TIME.findall(text)) == 2, text
        assert f"/{total}" in text

    def test_counts_what_is_not_ok(self) -> None:
        """Failed, review and pending rows are shown by count once there are any."""
        text = "\n".join(
            render_bar(10, 0, [RowStatus.FAILED, RowStatus.NEEDS_REVIEW, RowStatus.PENDING], 1.0)
        )
        for shown in ("failed 1", "review 1", "pending 1"):
            assert shown in text


@pytest.mark.anyio
async def test_a_console_run_fits_80_columns(tmp_path: Path) -> None:
    """A whole sandbox run logged for a console (no terminal: no bar) fits 80 columns."""
    done = await run_cli(
        "run", str(EXAMPLE), "--output", "out.xlsx", "--log-format", "console",
        "--cooldown", "0.1", cwd=tmp_path, env=clean_env(COLUMNS=str(WIDTH)),
    )  # fmt: skip
    assert done.code == 0, done.stderr
    logs, ends = done.stderr.splitlines(), done.stdout.splitlines()
    assert any("topup.applied" in line for line in logs)
    assert [line for line in logs if len(line) > WIDTH] == []
    # The end lines fit too, but for a path, which is shown whole however long it is.
    paths = ("report: ", "ledger: ")
    assert [line for line in ends if len(line) > WIDTH and not line.startswith(paths)] == []


class TestFirstRun:
    """The README's first command, then `status` and `report`, as a new user types them."""

    @pytest.mark.anyio
    async def test_status_and_report_find_the_sandbox_run(self, tmp_path: Path) -> None:
        """The sandbox run is kept in ./.topup-sandbox: the end lines name the report and the
        ledger; `status` there lists the run as a sandbox run; `report` rewrites it."""
        env = clean_env(COLUMNS=str(WIDTH), TOPUP_LOG_FORMAT="console")
        done = await run_cli("run", str(EXAMPLE), "--output", "pay.xlsx", cwd=tmp_path, env=env)
        assert done.code == 0, done.stderr
        ledger = tmp_path / ".topup-sandbox" / "ledger.sqlite"
        assert ledger.exists()
        assert f"report: {tmp_path / 'pay.xlsx'}" in done.stdout
        assert f"ledger: {ledger}" in done.stdout
        key = re.search(r"\b(job-[0-9a-f]{12})\b", done.stdout)
        assert key is not None
        status = await run_cli("status", cwd=tmp_path, env=env)
        assert status.code == 0, status.stderr
        line = next(line for line in status.stdout.splitlines() if key[1] in line)
        assert "SANDBOX" in line
        assert "succeeded=37" in line
        again = await run_cli(
            "report", "--run-key", key[1], "--output", "again.csv", cwd=tmp_path, env=env
        )
        assert again.code == 0, again.stderr
        assert (tmp_path / "again.csv").exists()

    @pytest.mark.anyio
    async def test_a_rerun_says_nothing_was_left(self, tmp_path: Path) -> None:
        """Running the first command again resumes the kept run: nothing sent, and it says why."""
        env = clean_env(COLUMNS=str(WIDTH), TOPUP_LOG_FORMAT="console")
        args = ("run", str(EXAMPLE), "--output", "pay.xlsx", "--cooldown", "0.1")
        first = await run_cli(*args, cwd=tmp_path, env=env)
        second = await run_cli(*args, cwd=tmp_path, env=env)
        assert (first.code, second.code) == (0, 0), second.stderr
        assert "0 topups sent by this process" in second.stdout
        assert "--run-key" in second.stdout

    @pytest.mark.anyio
    async def test_json_summary_names_the_ledger(self, tmp_path: Path) -> None:
        """Under cron, the one summary line carries the report's and the ledger's paths."""
        env = clean_env(TOPUP_LOG_FORMAT="json")
        done = await run_cli("run", str(EXAMPLE), "--cooldown", "0.1", cwd=tmp_path, env=env)
        assert done.code == 0, done.stderr
        (summary,) = [json.loads(line) for line in done.stdout.splitlines()]
        assert summary["event"] == "run.summary"
        assert summary["ledger"] == str(tmp_path / ".topup-sandbox" / "ledger.sqlite")
        assert Path(summary["report"]).is_absolute()


class TestLedgersKeptApart:
    def run_settings(self, tmp_path: Path, *args: str) -> str:
        from click.testing import CliRunner

        from runner.cli import main

        done = CliRunner().invoke(
            main,
            ["check", str(EXAMPLE), *args],
            env={"XDG_STATE_HOME": str(tmp_path / "state"), "TOPUP_LOG_FORMAT": "console"},
        )
        assert done.exit_code == 2, done.output
        (line,) = done.output.splitlines()
        return line

    def test_a_real_provider_refuses_the_sandbox_ledger(self, tmp_path: Path) -> None:
        """A real provider's run never writes to a sandbox ledger."""
        sandbox = tmp_path / ".topup-sandbox" / "ledger.sqlite"
        line = self.run_settings(tmp_path, "--provider", "uncash", "--ledger", str(sandbox))
        assert "sandbox" in line

    def test_the_sandbox_refuses_the_real_ledger(self, tmp_path: Path) -> None:
        """A sandbox run never writes to the ledger real runs use by default."""
        real = tmp_path / "state" / "topup-runner" / "ledger.sqlite"
        line = self.run_settings(tmp_path, "--ledger", str(real))
        assert "sandbox" in line
