"""Notifications (`--notify`, Apprise URLs): one JSON notification to a local receiver when a
run succeeds, is refused or fails; a receiver that hangs or refuses changes nothing."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from runner.cli import guarded, watch_exit
from runner.config import resolve_settings
from runner.domain import RowStatus
from runner.errors import ConfigError
from runner.metrics import RunEnd, StatusTotals
from runner.notify import Notice, check_targets, describe, notice_of, notify_targets, send_notice
from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import serve_sandbox
from tests.e2e import ROOT, TOKEN, clean_env, run_cli, write_job
from tests.test_exits import closed_port, silent_server


class Receiver:
    """A JSON webhook receiver on 127.0.0.1, in a thread: what Apprise's json:// posts."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.paths: list[str] = []
        posts, paths = self.posts, self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                posts.append(json.loads(self.rfile.read(length)))
                paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def url(self, path: str = "hook") -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    def only(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The one notification received, and its body's `name: value` fields."""
        assert len(self.posts) == 1, self.posts
        post = self.posts[0]
        return post, dict(line.split(": ", 1) for line in post["message"].splitlines())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    thread = threading.Thread(target=found.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()
        thread.join()


def card() -> str:
    return str(uuid.uuid4())


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_successful_run_sends_one_notification(tmp_path: Path, receiver: Receiver) -> None:
    """Exit 0: provider, run key, rows by status, totals, makespan and report, as success."""
    job = write_job(tmp_path / "job.csv", [(card(), "10.00", "A"), (card(), "20.00", "B")])
    done = await run_cli(
        "run", str(job), "--run-key", "pay-1", "--output", "out.csv", "--notify", receiver.url(),
        cwd=tmp_path, env=clean_env(CI="true"),
    )  # fmt: skip
    assert done.code == 0, done.stderr
    post, fields = receiver.only()
    assert post["type"] == "success"
    assert "pay-1" in post["title"]
    assert fields["exit code"].startswith("0 ")
    assert fields["provider"] == "sandbox (no real money moved)"
    assert fields["run key"] == "pay-1"
    assert fields["rows"] == "not_attempted=0 pending=0 succeeded=2 failed=0 needs_review=0"
    assert fields["amount paid"] == "30.00"
    assert Decimal(fields["total charged"]) > Decimal("30.00")
    assert float(fields["makespan (s)"]) >= 0
    assert fields["report"] == "out.csv"
    assert receiver.paths == ["/hook"]


@pytest.mark.anyio
async def test_a_refused_and_a_failed_run_each_send_one(tmp_path: Path) -> None:
    """Exit 3 (wallet) is a warning naming the refusal; exit 1 (a row failed) a failure."""
    limited, good = card(), card()
    refused_job = write_job(tmp_path / "big.csv", [(card(), "400.00", "X") for _ in range(3)])
    failing_job = write_job(tmp_path / "job.csv", [(good, "10.00", "A"), (limited, "600.00", "B")])
    config = SandboxConfig(
        token=TOKEN, cooldown=0.2, wallet_balance=Decimal("1000.00"),
        default_card_limit=Decimal("500.00"),
    )  # fmt: skip
    results = []
    async with serve_sandbox(config) as sb:
        for n, job in enumerate((refused_job, failing_job)):
            with ReceiverRunning() as receiver:
                done = await run_cli(
                    "run", str(job), "--provider", "uncash", "--base-url", sb.base_url,
                    "--ledger", str(tmp_path / "l.sqlite"), "--output", str(tmp_path / f"{n}.csv"),
                    "--cooldown", "0.2", "--notify", receiver.url(), "--log-format", "json",
                    cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN),
                )  # fmt: skip
                results.append((done, *receiver.only()))
    (refused, post, fields), (failed, post2, fields2) = results
    assert refused.code == 3, refused.stderr
    assert post["type"] == "warning"
    assert fields["exit code"].startswith("3 ")
    assert fields["provider"] == "uncash"
    assert "wallet" in fields["error"]
    assert failed.code == 1, failed.stderr
    assert post2["type"] == "failure"
    assert fields2["exit code"].startswith("1 ")
    assert fields2["rows"] == "not_attempted=0 pending=0 succeeded=1 failed=1 needs_review=0"
    assert fields2["amount paid"] == "10.00"
    assert fields2["amount not paid"] == "600.00"
    assert fields2["report"] == str(tmp_path / "1.csv")
    assert TOKEN not in json.dumps([post, post2])


class ReceiverRunning:
    """A Receiver served for the length of a `with` block."""

    def __enter__(self) -> Receiver:
        self.receiver = Receiver()
        self.thread = threading.Thread(target=self.receiver.server.serve_forever, daemon=True)
        self.thread.start()
        return self.receiver

    def __exit__(self, *exc: object) -> None:
        self.receiver.server.shutdown()
        self.receiver.server.server_close()
        self.thread.join()


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["hangs", "refuses"])
async def test_a_receiver_that_hangs_or_refuses_changes_nothing(tmp_path: Path, how: str) -> None:
    """The run's exit code stands, the exit waits no more than the deadline, and the warning
    shows the target's scheme and host only, never its password or path."""
    job = write_job(tmp_path / "job.csv", [(card(), "10.00", "A")])
    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(silent_server()) if how == "hangs" else closed_port()
        target = f"json://ops:pw-s3cret@127.0.0.1:{port}/tok3n-in-path?key=qu3ry"
        started = time.monotonic()
        done = await run_cli(
            "run", str(job), "--output", "out.csv", "--notify", target, "--log-format", "console",
            cwd=tmp_path,
        )  # fmt: skip
        took = time.monotonic() - started
    assert done.code == 0, done.stderr
    assert took < 20
    warning = [line for line in done.stderr.splitlines() if "notification" in line]
    assert len(warning) == 1, done.stderr
    assert f"target 1 (json://127.0.0.1:{port})" in warning[0]
    for secret in ("pw-s3cret", "tok3n-in-path", "qu3ry", "ops:"):
        assert secret not in done.stdout + done.stderr


@pytest.mark.anyio
async def test_a_job_file_cannot_add_a_notification_target(
    tmp_path: Path, receiver: Receiver
) -> None:
    """settings.notify in a job file is refused (exit 2) unless the operator named the same."""
    job = tmp_path / "job.yaml"
    job.write_text(
        f"settings: {{notify: '{receiver.url()}'}}\n"
        f"topups:\n  - {{card_id: '{card()}', amount: '10.00'}}\n",
        encoding="utf-8",
    )
    done = await run_cli("run", str(job), "--log-format", "console", cwd=tmp_path)
    assert done.code == 2
    assert "settings.notify" in done.stderr
    assert receiver.posts == []
    same = await run_cli(
        "run", str(job), "--output", "o.csv", cwd=tmp_path,
        env=clean_env(TOPUP_NOTIFY=receiver.url()),
    )  # fmt: skip
    assert same.code == 0, same.stderr
    assert len(receiver.posts) == 1


@pytest.mark.anyio
async def test_an_invalid_job_is_notified_to_the_operator(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A job that cannot be read (exit 2) is told to the targets of TOPUP_NOTIFY."""
    bad = tmp_path / "bad.csv"
    bad.write_text("card_id,amount\nx,abc\n", encoding="utf-8")
    done = await run_cli("run", str(bad), cwd=tmp_path, env=clean_env(TOPUP_NOTIFY=receiver.url()))
    assert done.code == 2
    post, fields = receiver.only()
    assert post["type"] == "failure"
    assert fields["exit code"].startswith("2 ")
    assert "row 1" in fields["error"]


@pytest.mark.anyio
async def test_a_scheme_apprise_does_not_know_is_exit_2(tmp_path: Path) -> None:
    """An unknown notification scheme stops the run before anything is sent, URL unshown."""
    job = write_job(tmp_path / "job.csv", [(card(), "10.00", "A")])
    done = await run_cli(
        "run", str(job), "--notify", "nosuchservice://user:pw-s3cret@example.invalid/x",
        "--log-format", "console", cwd=tmp_path,
    )  # fmt: skip
    assert done.code == 2
    assert "target 1 (nosuchservice://…)" in done.stderr
    assert "pw-s3cret" not in done.stderr
    assert "example.invalid" not in done.stderr


# -- in process -----------------------------------------------------------------------------------


def test_an_internal_error_is_notified(
    receiver: Receiver, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug ends the run with exit 1, and the notification says internal error."""
    monkeypatch.setenv("TOPUP_LOG_FORMAT", "console")
    monkeypatch.delenv("TOPUP_DEBUG", raising=False)

    @guarded
    def command() -> None:
        watch_exit(RunEnd("pay", provider="uncash", run_key="k", notify=(receiver.url(),)))
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit) as caught:
        command()
    assert caught.value.code == 1
    post, fields = receiver.only()
    assert post["type"] == "failure"
    assert fields["error"] == "internal error: RuntimeError: a bug"
    capsys.readouterr()


@pytest.mark.anyio
async def test_sending_is_bounded_by_its_deadline() -> None:
    """A receiver that never answers is let go at the deadline, not at its own timeouts."""
    notice = Notice("t", "info", (("a", "b"),))
    async with silent_server() as port:
        started = time.monotonic()
        problems = send_notice([f"json://127.0.0.1:{port}/x"], notice, deadline=0.5)
        took = time.monotonic() - started
    assert took < 2.0
    assert problems == [f"target 1 (json://127.0.0.1:{port}): no answer within 0.5 s"]


def test_notify_urls_from_the_environment_are_split() -> None:
    """Whitespace or a comma before a new URL separates them; a comma inside one does not."""
    found = notify_targets("json://a/x  ntfy://b/topic,mailto://u:p@c?to=x@y.org,z@y.org")
    assert found == ("json://a/x", "ntfy://b/topic", "mailto://u:p@c?to=x@y.org,z@y.org")
    assert notify_targets(("json://a/x", "json://a/x")) == ("json://a/x",)
    with pytest.raises(ValueError, match="is not a notification URL") as caught:
        notify_targets("not a url")
    assert "not a url" not in str(caught.value)


def test_settings_take_notify_from_flag_and_environment() -> None:
    """--notify (repeatable) beats TOPUP_NOTIFY; a bad value is exit 2 and not echoed."""
    env = {"TOPUP_NOTIFY": "json://e/1 json://e/2"}
    assert resolve_settings({}, env=env).notify == ("json://e/1", "json://e/2")
    assert resolve_settings({"notify": ("json://f/1",)}, env=env).notify == ("json://f/1",)
    with pytest.raises(ConfigError) as caught:
        resolve_settings({}, env={"TOPUP_NOTIFY": "secret-token-here"})
    assert "secret-token-here" not in str(caught.value)


def test_describe_shows_scheme_and_a_server_host_only() -> None:
    """A host is shown only where it names a server; Telegram and Slack keep tokens there."""
    assert describe("slack://T0kenA/B0/tok3n") == "slack://…"
    assert describe("tgram://123:b0ttoken/456") == "tgram://…"
    assert describe("json://u:pw@127.0.0.1:8/p?q=1") == "json://127.0.0.1:8"
    assert describe("json://[::1") == "json://…"


def test_check_targets_refuses_what_apprise_does_not_take() -> None:
    assert check_targets(["json://127.0.0.1:1/x"]) == ("json://127.0.0.1:1/x",)
    with pytest.raises(ConfigError, match="target 2 \\(nosuch://…\\)") as caught:
        check_targets(["json://127.0.0.1:1/x", "nosuch://h0st/p"])
    assert "h0st" not in str(caught.value)


def test_notice_of_a_refusal_names_nothing_paid() -> None:
    end = RunEnd("pay", provider="uncash", run_key="k", totals={}, error="preflight refused")
    notice = notice_of(end, 3)
    assert notice.kind == "warning"
    assert ("amount paid", "0.00") in notice.fields
    assert ("error", "preflight refused") in notice.fields
    ok = RunEnd("pay", provider="uncash", run_key="k",
                totals={RowStatus.SUCCEEDED: StatusTotals(2, Decimal("30"), Decimal("1.5"),
                                                          Decimal("31.5"))})  # fmt: skip
    assert ("total charged", "31.50") in notice_of(ok, 0).fields


def test_loading_the_ledger_or_settings_loads_no_apprise() -> None:
    """Apprise is imported when a notification is due, not by `import runner.ledger`."""
    code = (
        "import sys, runner.ledger, runner.config, runner.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith(('apprise', 'requests'))))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"
