"""How a run exits when it cannot go on: a provider out of reach before anything was sent has
its own code (69), and every exit rewrites the metrics file with its own code."""

from __future__ import annotations

import contextlib
import re
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.abc
import pytest

from runner.cli import guarded, watch_exit
from runner.config import resolve_settings
from runner.errors import (
    AuthenticationFailed,
    PreflightRefused,
    ProviderError,
    ProviderUnavailable,
    RunStopped,
)
from runner.jobs import load_job
from runner.metrics import RunEnd, RunMetrics, write_metrics
from runner.progress import NoProgress
from runner.run import run_job
from runner.run.job import JobRun
from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import TOKEN, clean_env, run_cli, until, write_job

pytestmark = pytest.mark.anyio

UNAVAILABLE = ProviderUnavailable.exit_code
WHEN = datetime(2026, 11, 21, 3, 0, 0, tzinfo=UTC)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, noted, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def silent_server(reply: bytes = b"") -> AsyncIterator[int]:
    """A loopback server that accepts, sends `reply` (if any) and then never answers; its port."""
    held: list[anyio.abc.SocketStream] = []

    async def hold(stream: anyio.abc.SocketStream) -> None:
        held.append(stream)
        if reply:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(reply)
        await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    await listener.aclose()


def metric(text: str, name: str) -> str | None:
    """The value of the first sample of `name` in a Prometheus text, or None."""
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return None if found is None else found.group(1)


def uncash_run(job: Path, tmp_path: Path, base_url: str, *more: str) -> list[str]:
    return [
        "run", str(job), "--provider", "uncash", "--base-url", base_url,
        "--ledger", str(tmp_path / "ledger.sqlite"), "--output", str(tmp_path / "out.csv"),
        "--cooldown", "0.2", "--timeout", "0.5", "--log-format", "console",
        "--metrics-file", str(tmp_path / "m.prom"), *more,
    ]  # fmt: skip


# -- 2. a provider out of reach before anything was sent -----------------------------------------


@pytest.mark.parametrize("how", ["refused", "timeout", "tls"])
async def test_provider_out_of_reach_before_sending_exits_69(tmp_path: Path, how: str) -> None:
    """Connection refused, no answer, or a failed TLS handshake in preflight: exit 69, not 1."""
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    async with contextlib.AsyncExitStack() as stack:
        if how == "refused":
            url = f"http://127.0.0.1:{closed_port()}/api/v1"
        else:
            # Plain text where a TLS handshake is expected fails it; silence times it out.
            reply = b"HTTP/1.1 200 OK\r\n\r\nnot tls at all\r\n" if how == "tls" else b""
            port = await stack.enter_async_context(silent_server(reply))
            url = f"{'https' if how == 'tls' else 'http'}://127.0.0.1:{port}/api/v1"
        done = await run_cli(
            *uncash_run(job, tmp_path, url), cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN)
        )
    assert done.code == UNAVAILABLE, done.stderr
    assert "nothing was sent" in done.stderr
    assert "internal error" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("topup-runner:")]
    assert len(errors) == 1, done.stderr
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.parametrize("command", ["run", "check"])
async def test_alix_out_of_reach_is_69_before_any_row_is_tried(
    tmp_path: Path, alix_env: dict[str, str], command: str
) -> None:
    """Alix documents no wallet or card read, so its access token is where preflight learns
    the provider cannot be used: exit 69 from run and check alike. Before, `check` passed
    with a warning and `run` tried every row until each failed (exit 1)."""
    job = write_job(
        tmp_path / "job.csv", [(str(uuid.uuid4()), f"{10 + n}.00", "A") for n in range(3)]
    )
    done = await run_cli(
        command, str(job), "--provider", "alix",
        "--base-url", f"http://127.0.0.1:{closed_port()}/api/v2",
        "--ledger", str(tmp_path / "l.sqlite"), "--output", str(tmp_path / "r.csv"),
        "--timeout", "2", "--log-format", "json", cwd=tmp_path, env=alix_env,
    )  # fmt: skip
    assert done.code == UNAVAILABLE, done.stderr[-2000:]
    assert "nothing was sent" in done.stderr
    assert "check passed" not in done.stdout
    assert not (tmp_path / "r.csv").exists()


async def test_dns_failure_before_sending_is_provider_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that does not resolve (resolved by a local fake: no network) is exit 69 too."""
    real = socket.getaddrinfo

    def resolve(host: object, *args: object, **kwargs: object) -> object:
        if host == "payments.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    job = load_job(str(write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])))
    settings = resolve_settings(
        {
            "provider": "uncash",
            "base_url": "https://payments.invalid/api/v1",
            "ledger": str(tmp_path / "l.sqlite"),
            "output": str(tmp_path / "out.csv"),
            "timeout": "0.5",
        },
        env={},
    )
    with pytest.raises(ProviderUnavailable) as caught:
        await run_job(job, settings, env={"UNCASH_API_TOKEN": TOKEN})
    assert caught.value.exit_code == UNAVAILABLE
    assert isinstance(caught.value.cause, ProviderError)
    assert "nothing was sent" in str(caught.value)


@contextlib.asynccontextmanager
async def front_that_dies(sb: RunningSandbox) -> AsyncIterator[str]:
    """A loopback relay to the sandbox that drops every connection, and refuses new ones,
    once the sandbox has applied a topup: the provider lost after money moved."""
    port_of_sandbox = int(sb.base_url.split(":")[2].split("/")[0])
    streams: list[anyio.abc.SocketStream] = []
    down = anyio.Event()

    gone = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)

    async def pipe(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(*gone):
            while True:
                await sink.send(await source.receive())

    async def relay(client: anyio.abc.SocketStream) -> None:
        if down.is_set():
            await client.aclose()
            return
        server = await anyio.connect_tcp("127.0.0.1", port_of_sandbox)
        streams.extend((client, server))
        async with client, server, anyio.create_task_group() as tg:
            tg.start_soon(pipe, client, server)
            tg.start_soon(pipe, server, client)

    async def kill_when_applied() -> None:
        await until(lambda: bool(sb.state.applied), limit=30)
        down.set()
        for stream in streams:
            await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, relay)
        tg.start_soon(kill_when_applied)
        try:
            yield sb.base_url.replace(f":{port_of_sandbox}/", f":{port}/")
        finally:
            tg.cancel_scope.cancel()
    await listener.aclose()


async def test_provider_lost_after_a_topup_is_never_69(tmp_path: Path) -> None:
    """Once a topup went out, a provider out of reach stops the run with exit 1 (resume it)."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    job = write_job(tmp_path / "job.csv", [(c, "10.00", "A") for c in ids])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.2)) as sb:
        async with front_that_dies(sb) as url:
            done = await run_cli(
                *uncash_run(job, tmp_path, url, "--concurrency", "1"),
                cwd=tmp_path,
                env=clean_env(UNCASH_API_TOKEN=TOKEN),
            )
        applied = len(sb.state.applied)
    assert applied >= 1
    assert done.code == 1, done.stderr
    assert "nothing was sent" not in done.stderr
    prom = (tmp_path / "m.prom").read_text()
    assert metric(prom, "topup_runner_exit_code") == "1"


def test_the_exit_error_says_nothing_was_sent_only_when_true(tmp_path: Path) -> None:
    """A provider error is 69 before this process sent a topup, RunStopped (1) after; other
    errors keep their code until something was sent."""
    job = load_job(str(write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])))
    settings = resolve_settings({"ledger": str(tmp_path / "l.sqlite")}, env={})
    run = JobRun(job, settings, NoProgress(), {}, RunEnd("job"))
    lost, refused = ProviderError("cannot connect"), AuthenticationFailed("bad token")
    assert type(run._exit_error(lost)) is ProviderUnavailable
    assert run._exit_error(refused) is refused
    assert run._exit_error(PreflightRefused("wallet")).exit_code == 3
    run.tally.sent = 1
    for error in (lost, refused, ProviderUnavailable(lost), PreflightRefused("wallet")):
        stopped = run._exit_error(error)
        assert type(stopped) is RunStopped
        assert stopped.exit_code == 1


# -- 3. every exit rewrites the metrics file -----------------------------------------------------


async def test_every_failing_exit_rewrites_the_metrics_file(tmp_path: Path) -> None:
    """After a success, exit 3, 2 and 69 each leave their own code; last success is kept."""
    prom = tmp_path / "m.prom"
    small = write_job(tmp_path / "small.csv", [(str(uuid.uuid4()), "10.00", "A")])
    big = write_job(tmp_path / "big.csv", [(str(uuid.uuid4()), "400.00", "B") for _ in range(3)])
    bad = tmp_path / "bad.csv"
    bad.write_text("card_id,amount\nx,abc\n", encoding="utf-8")
    env = clean_env(UNCASH_API_TOKEN=TOKEN)
    codes: list[tuple[int, str | None]] = []
    config = SandboxConfig(token=TOKEN, cooldown=0.2, wallet_balance=Decimal("1000.00"))
    async with serve_sandbox(config) as sb:
        done = await run_cli(*uncash_run(small, tmp_path, sb.base_url), cwd=tmp_path, env=env)
        assert done.code == 0, done.stderr
        success = metric(prom.read_text(), "topup_runner_last_success_timestamp_seconds")
        assert success is not None
        for job in (big, bad):
            done = await run_cli(*uncash_run(job, tmp_path, sb.base_url), cwd=tmp_path, env=env)
            codes.append((done.code, metric(prom.read_text(), "topup_runner_exit_code")))
            after = metric(prom.read_text(), "topup_runner_last_success_timestamp_seconds")
            assert after == success
    gone = f"http://127.0.0.1:{closed_port()}/api/v1"
    # Its rows were just paid through the sandbox: the repeat guard (exit 3) is not the point.
    done = await run_cli(
        *uncash_run(small, tmp_path, gone, "--repeat-window", "0"), cwd=tmp_path, env=env
    )
    codes.append((done.code, metric(prom.read_text(), "topup_runner_exit_code")))
    assert metric(prom.read_text(), "topup_runner_last_success_timestamp_seconds") == success
    assert codes == [(3, "3"), (2, "2"), (UNAVAILABLE, str(UNAVAILABLE))]


async def test_bad_option_with_metrics_file_in_the_environment(tmp_path: Path) -> None:
    """An invalid option is exit 2 in the metrics file named by TOPUP_METRICS_FILE."""
    prom = tmp_path / "env.prom"
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    done = await run_cli(
        "run", str(job), "--concurrency", "0", cwd=tmp_path,
        env=clean_env(TOPUP_METRICS_FILE=str(prom)),
    )  # fmt: skip
    assert done.code == 2
    assert metric(prom.read_text(), "topup_runner_exit_code") == "2"


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPUP_LOG_FORMAT", "console")
    monkeypatch.delenv("TOPUP_DEBUG", raising=False)


@pytest.mark.parametrize(
    ("raised", "code"), [(RuntimeError("a bug"), 1), (KeyboardInterrupt(), 130)]
)
@pytest.mark.usefixtures("console")
def test_internal_error_and_interrupt_rewrite_the_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raised: BaseException, code: int
) -> None:
    """A bug (exit 1) or Ctrl-C (130) still leaves its exit code in the metrics file."""
    prom = tmp_path / "m.prom"
    ok = RunMetrics("pay", "sandbox", "k", {}, 1.0, 0, WHEN)
    write_metrics(prom, ok)

    @guarded
    def command() -> None:
        watch_exit(RunEnd(job="pay", provider="sandbox", run_key="k", metrics_file=prom))
        raise raised

    with pytest.raises(SystemExit) as caught:
        command()
    assert caught.value.code == code
    text = prom.read_text()
    assert metric(text, "topup_runner_exit_code") == str(code)
    assert metric(text, "topup_runner_last_success_timestamp_seconds") == f"{WHEN.timestamp():.3f}"
    capsys.readouterr()


@pytest.mark.parametrize(
    "damage",
    [
        b'topup_runner_last_success_timestamp_seconds{job="pay"} not-a-number\n',
        b'topup_runner_last_success_timestamp_seconds{job="pay"} nan\n',
        b'\x00\xff topup_runner_exit_code{job="pay"} 0\n' + b"# pad\n" * 300_000,  # 2 MB
    ],
)
def test_a_damaged_metrics_file_is_replaced(tmp_path: Path, damage: bytes) -> None:
    """A damaged previous file is no error; no last-success is carried out of it."""
    prom = tmp_path / "m.prom"
    prom.write_bytes(damage)
    write_metrics(prom, RunMetrics("pay", "sandbox", "k", {}, 1.0, 2, WHEN))
    text = prom.read_text()
    assert metric(text, "topup_runner_exit_code") == "2"
    assert metric(text, "topup_runner_last_success_timestamp_seconds") is None


@pytest.mark.parametrize(
    "foreign",
    [
        b"card_id,amount\n6f1c...,10.00\n",  # the job file
        b"SQLite format 3\x00" + bytes(4080),  # the ledger
        b"\x00\xff\xfe garbage \x80\x81\n",
        b"# just a comment\n" * 300_000,  # 5 MB: read no further than a bound
    ],
)
def test_a_file_that_is_not_our_metrics_is_never_written_over(
    tmp_path: Path, foreign: bytes
) -> None:
    """Whatever `--metrics-file` names, a file without our metrics in it stays byte for byte
    as it was: the exit's writer refuses it (and the run refuses it before any topup)."""
    prom = tmp_path / "m.prom"
    prom.write_bytes(foreign)
    with pytest.raises(FileExistsError):
        write_metrics(prom, RunMetrics("pay", "sandbox", "k", {}, 1.0, 2, WHEN))
    assert prom.read_bytes() == foreign
    empty = tmp_path / "empty.prom"
    empty.touch()
    write_metrics(empty, RunMetrics("pay", "sandbox", "k", {}, 1.0, 2, WHEN))
    assert metric(empty.read_text(), "topup_runner_exit_code") == "2"


def test_last_success_is_carried_from_a_file_written_before(tmp_path: Path) -> None:
    """Only a plain number is carried over, from the first sample found."""
    prom = tmp_path / "m.prom"
    ok = RunMetrics("pay", "sandbox", "k", {}, 1.0, 0, WHEN)
    write_metrics(prom, ok)
    write_metrics(prom, replace(ok, exit_code=3, finished=WHEN.replace(hour=5)))
    write_metrics(prom, replace(ok, exit_code=130, finished=WHEN.replace(hour=6)))
    text = prom.read_text()
    assert metric(text, "topup_runner_last_success_timestamp_seconds") == f"{WHEN.timestamp():.3f}"
    assert metric(text, "topup_runner_exit_code") == "130"


# -- click's own usage errors are one line and exit 2 too ------------------------------------

USAGE_ERRORS = {
    "unknown option": (["run", "job.csv", "--bogus"], "No such option '--bogus'"),
    "missing argument": (["run"], "Missing argument 'JOB'"),
    "unknown command": (["nosuch"], "No such command 'nosuch'"),
    "sandbox port not a number": (["sandbox", "--port", "abc"], "'abc' is not a valid integer"),
    "webhook port not a number": (["webhook", "--port", "x"], "'x' is not a valid integer"),
    "bad choice": (["run", "job.csv", "--provider", "paypal"], "'paypal' is not one of"),
    "option without its value": (["report", "--run-key"], "requires an argument"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_2(
    case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An option, argument or command click cannot parse: one line naming the command's
    --help, exit 2; not click's usage block of four lines."""
    from runner.cli import main

    argv, said = USAGE_ERRORS[case]
    monkeypatch.setenv("TOPUP_LOG_FORMAT", "console")
    with pytest.raises(SystemExit) as done:
        main.main(argv, prog_name="topup-runner")
    out, err = capsys.readouterr()
    assert done.value.code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("topup-runner: error: ")
    assert said in err
    assert "--help`" in err
    assert "Usage:" not in err


def test_help_and_version_still_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    from runner.cli import main

    for argv in (["--help"], ["run", "--help"], ["--version"]):
        assert main.main(argv, prog_name="topup-runner") == 0
    assert "Usage: topup-runner run" in capsys.readouterr().out
