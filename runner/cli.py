"""The `topup-runner` command: parse arguments, build settings, call the run, exit.

Only `RunnerError` is caught: it is printed as one line per problem and turned into the
contract's exit code. Anything else is a bug, reported as one line too (set TOPUP_DEBUG=1
for the traceback).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio
import click

from runner.config import (
    Settings,
    built_in_default,
    keep_ledgers_apart,
    resolve_settings,
    sandbox_ledger_path,
)
from runner.errors import JobInvalid, RunnerError, leaves, most_telling
from runner.jobs import Job, load_job
from runner.logs import configure_logging
from runner.metrics import RunEnd, write_metrics
from runner.progress import LazyStderr, NoProgress, RichProgress

if TYPE_CHECKING:
    from runner.run import RunResult

F = TypeVar("F", bound=Callable[..., Any])
# A run's event loop: uvloop's costs a fast run about a sixth less CPU per topup than
# asyncio's own (benchmarks/README.md, Performance).
LOOP = {"use_uvloop": True}


def _json_mode() -> bool:
    """Whether output is for machines: --log-format/TOPUP_LOG_FORMAT, else no terminal.

    Then every line the command prints is a JSON object, so that cron mail or a log
    collector gets JSON lines only; each still carries the human sentence as `message`.
    """
    context = click.get_current_context(silent=True)
    chosen = context.params.get("log_format") if context is not None else None
    chosen = chosen or os.environ.get("TOPUP_LOG_FORMAT", "").strip().lower() or None
    if chosen in ("json", "console"):
        return chosen == "json"
    return not sys.stderr.isatty()


def say(message: str, *, event: str, err: bool = False, **fields: Any) -> None:
    """One line of output: the sentence, or a JSON object carrying it."""
    if _json_mode():
        record = {"event": event, "level": "error" if err else "info", **fields}
        click.echo(json.dumps({**record, "message": message}, default=str), err=err)
    else:
        click.echo(message, err=err)


def _fail(exc: RunnerError) -> NoReturn:
    code = exc.exit_code
    if isinstance(exc, JobInvalid):
        for p in exc.problems:
            say(f"topup-runner: error: {p}", event="job.problem", err=True,
                file=p.file, row=p.row, column=p.column)  # fmt: skip
        if exc.truncated:
            say(f"topup-runner: error: … and {exc.truncated} more problems",
                event="job.problem", err=True)  # fmt: skip
        say("topup-runner: the job is invalid: nothing was sent",
            event="job.invalid", err=True, exit_code=code)  # fmt: skip
        _note_error(f"the job is invalid: {_without_secrets(str(exc))}: nothing was sent")
    else:
        say(f"topup-runner: error: {_without_secrets(str(exc))}", event="run.error", err=True,
            error_type=type(exc).__name__, exit_code=code)  # fmt: skip
        _note_error(_without_secrets(str(exc)))
    sys.exit(code)


# Environment variables whose values are secrets: never printed, whatever carries them.
_SECRET_VARIABLES = (
    "UNCASH_API_TOKEN",
    "ALIX_PARTNER_CODE",
    "ALIX_SECRET_KEY",
    "ALIX_USER_EMAIL",
    "TOPUP_LEDGER_KEY",
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_INTERNAL_MESSAGE_LIMIT = 300


def _without_secrets(text: str) -> str:
    """`text` with registered and environment secrets and URL user info taken out."""
    from runner.logs import scrub_secrets

    text = str(scrub_secrets(None, "", {"text": text})["text"])
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name, "").strip()
        if len(value) >= 4:
            text = text.replace(value, "[redacted]")
    return _USERINFO.sub("[redacted]@", text)


def _internal_error(exc: BaseException) -> NoReturn:
    detail = " ".join(_without_secrets(str(exc)).split())
    if len(detail) > _INTERNAL_MESSAGE_LIMIT:
        detail = detail[:_INTERNAL_MESSAGE_LIMIT] + "..."
    say(
        f"topup-runner: internal error: {type(exc).__name__}: {detail} "
        "(set TOPUP_DEBUG=1 for a traceback)",
        event="run.internal_error",
        err=True,
    )
    _note_error(f"internal error: {type(exc).__name__}: {detail}")
    sys.exit(1)


def _interrupted() -> NoReturn:
    say("topup-runner: interrupted", event="run.interrupted", err=True)
    _note_error("interrupted")
    sys.exit(130)


# The run whose every exit is told to monitoring and to people (see `watch_exit`).
_WATCHED: list[RunEnd] = []


def watch_exit(end: RunEnd) -> None:
    """Make the running command's exit, whatever its code, rewrite `end`'s metrics file and
    send its notifications (`guarded` does it as the command exits)."""
    _WATCHED[:] = [end]


def _note_error(message: str) -> None:
    if _WATCHED:
        _WATCHED[0].error = message


def _tell_exit(code: int | str | None) -> None:
    """Rewrite the watched run's metrics and notify: neither changes the exit code."""
    if not _WATCHED:
        return
    end = _WATCHED.pop()
    exit_code = code if isinstance(code, int) else 0 if code is None else 1
    if end.metrics_file is not None:
        try:
            write_metrics(end.metrics_file, end.metrics(exit_code))
        except OSError as exc:
            say(f"topup-runner: warning: metrics file {end.metrics_file} was not written: "
                f"{exc.strerror or exc}", event="metrics.unwritable", err=True)  # fmt: skip
    if end.notify:
        from runner.notify import notice_of, send_notice

        try:
            problems = send_notice(end.notify, notice_of(end, exit_code))
        except KeyboardInterrupt:  # Ctrl-C while waiting for receivers: let them go
            problems = ["interrupted"]
        for problem in problems:
            say(f"topup-runner: warning: notification not delivered: {problem}",
                event="notify.failed", err=True)  # fmt: skip


def guarded(func: F) -> F:
    """Turn the runner's errors into one-line messages and the contract's exit codes.

    Errors raised in a task group arrive wrapped in an ExceptionGroup: an interrupt among
    them is an interrupt (130), runner errors among them are reported as one (see
    runner.errors.EXIT_CODE_RANK), and only a group of nothing else is an internal error.
    Whatever the exit, a run given to `watch_exit` is then told to monitoring and people.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _WATCHED.clear()
        try:
            result = _exits(*args, **kwargs)
        except SystemExit as done:
            _tell_exit(done.code)
            raise
        except BaseException:  # TOPUP_DEBUG's traceback: still an exit 1
            _tell_exit(1)
            raise
        _tell_exit(0)
        return result

    def _exits(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RunnerError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            _interrupted()
        except BaseExceptionGroup as group:
            found = leaves(group)
            if any(isinstance(exc, KeyboardInterrupt) for exc in found):
                _interrupted()
            errors = [exc for exc in found if isinstance(exc, RunnerError)]
            if errors:
                _fail(most_telling(errors))
            exits = [exc for exc in found if isinstance(exc, SystemExit)]
            if exits:
                raise exits[0] from None
            if os.environ.get("TOPUP_DEBUG"):
                raise
            _internal_error(group)
        except Exception as exc:
            if os.environ.get("TOPUP_DEBUG"):
                raise
            _internal_error(exc)
        return None

    return wrapper  # type: ignore[return-value]


LEDGER_HELP = "SQLite ledger path (default: per-user state dir), or a postgresql:// URL."


def _setting(
    flag: str, metavar: str, text: str, shown: str | None = None, **kwargs: Any
) -> Callable[[F], F]:
    """An option of a setting, shown with its kind and its built-in default (`shown` where
    the default is not a value).

    Its value is passed on as typed: `resolve_settings` validates it once, whatever the
    source (flag, TOPUP_* or job file), with the one-line error and exit 2 of a bad setting.
    The default shown is the built-in one; TOPUP_* and the job's settings come before it.
    """
    shown = shown or built_in_default(flag.removeprefix("--").replace("-", "_"))
    return click.option(
        flag, metavar=metavar, help=text + (f" [default: {shown}]" if shown else ""), **kwargs
    )


def run_options(func: F) -> F:
    """The options `run` and `check` share; each also comes from TOPUP_* and the job file."""
    options = [
        _setting("--provider", "[sandbox|uncash|alix]", "Which platform.",
                 type=click.Choice(["sandbox", "uncash", "alix"])),
        _setting("--base-url", "URL", "The provider's API root.", "its public one"),
        _setting("--output", "PATH", "The report, .xlsx or .csv.", "RUN_KEY.xlsx",
                 type=click.Path(path_type=Path)),
        _setting("--ledger", "PATH|URL",
                 "A SQLite ledger, or a postgresql:// URL that workers share.",
                 "one in the per-user state folder; sandbox runs: .topup-sandbox/ here"),
        _setting("--run-key", "KEY", "Names the run; the same key resumes it."),
        _setting("--rate-limit", "RATE",
                 "Requests per second, all requests together, or 'unlimited'."),
        _setting("--cooldown", "SECONDS", "Minimum gap between two topups of one card."),
        _setting("--concurrency", "N", "Requests in flight at once."),
        _setting("--max-attempts", "N", "Attempts per row for failures safe to retry."),
        _setting("--timeout", "SECONDS", "Per request."),
        _setting("--log-format", "[console|json]", "How log lines are written.",
                 "console on a terminal, else json", type=click.Choice(["console", "json"])),
        click.option("--no-progress", "no_progress", is_flag=True, help="No progress bar."),
        _setting("--wait-settle", "SECONDS", "Wait for pending rows to settle."),
        _setting("--lease", "SECONDS",
                 "How long a worker of a shared ledger holds its cards unrenewed."),
        _setting("--apply-grace", "SECONDS",
                 "After a request's timeout, how long the provider may still apply it: a "
                 "lost answer is judged not applied only after timeout + grace."),
        _setting("--metrics-file", "PATH",
                 "Write Prometheus text-format metrics here (node_exporter textfile).",
                 type=click.Path(path_type=Path)),
        _setting("--fee-rate", "FRACTION",
                 "Fee estimate as a fraction of the amount, e.g. 0.025, for preflight.",
                 "learned from the ledger's earlier topups"),
        _setting("--group-by", "COLUMN",
                 "Subtotal the report's Summary by this extra job column (e.g. department)."),
        click.option("--allow-partial", is_flag=True, default=None,
                     help="Run the rows preflight accepts; set aside the rest as failed."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _run_end(job_file: str, opts: dict[str, Any]) -> RunEnd:
    """What the operator named for the run's exit before the job is read: the metrics file
    and the notifications of an exit 2 for a job or an option that cannot be used."""
    from runner.notify import notify_targets

    def given(name: str) -> str:
        value = opts.get(name)
        return str(value) if value else os.environ.get(f"TOPUP_{name.upper()}", "").strip()

    try:
        notify = notify_targets(opts.get("notify") or given("notify"))
    except ValueError:
        notify = ()  # refused with the settings, exit 2, and told to no one
    metrics = given("metrics_file")
    return RunEnd(
        job=Path(job_file).stem,
        provider=given("provider") or "unknown",
        metrics_file=Path(metrics).expanduser() if metrics else None,
        notify=notify,
    )


def _settings(job: Job, opts: dict[str, Any]) -> Settings:
    cli = {k: v for k, v in opts.items() if k != "no_progress"}
    cli["notify"] = cli.get("notify") or None  # click gives () when --notify is not given
    cli["progress"] = False if opts.get("no_progress") else None
    settings = resolve_settings(
        cli,
        job_settings=job.settings,
        job_provider=job.provider,
        job_run_key=job.run_key,
        job_file=str(job.path),
    )
    if settings.group_by is not None:
        from runner.report import check_group_by

        check_group_by(settings.group_by, job.extra_columns)  # before anything is sent
    return _with_ledger(settings)


def _with_ledger(settings: Settings) -> Settings:
    """A sandbox run's ledger is kept in ./.topup-sandbox unless one is named; a named one
    must not mix sandbox runs with real ones (`keep_ledgers_apart`)."""
    from runner.run import default_ledger_path

    if settings.ledger is None:
        if not settings.is_sandbox:
            return settings
        return dataclasses.replace(settings, ledger=str(sandbox_ledger_path(Path.cwd())))
    keep_ledgers_apart(settings.provider, settings.ledger, default_ledger_path(os.environ))
    return settings


@click.group()
@click.version_option(package_name="topup-runner")
def main() -> None:
    """Fund many virtual cards at once, exactly once, with a report that proves it."""


@main.command()
@click.argument("job_file", metavar="JOB")
@run_options
@click.option(
    "--notify",
    multiple=True,
    metavar="URL",
    help="Apprise URL to notify when the run ends, is refused or fails (repeatable).",
)
@guarded
def run(job_file: str, **opts: Any) -> None:
    """Execute a job: topups, retries, report."""
    from runner.notify import check_targets
    from runner.run import run_job

    end = _run_end(job_file, opts)
    watch_exit(end)
    job = load_job(job_file)
    settings = _settings(job, opts)
    end.provider, end.metrics_file = settings.provider, settings.metrics_file
    end.notify = check_targets(settings.notify)
    show_progress = settings.progress if settings.progress is not None else sys.stderr.isatty()
    configure_logging(
        provider=settings.provider,
        fmt=settings.log_format,
        stream=LazyStderr(),
        rows_on_bar=show_progress,
    )
    label = "sandbox" if settings.is_sandbox else settings.provider
    with RichProgress(label) if show_progress else NoProgress() as progress:
        go = functools.partial(run_job, end=end)
        result = anyio.run(go, job, settings, progress, backend_options=LOOP)
    _say_summary(settings, result)
    sys.exit(result.exit_code)


@main.command()
@click.argument("job_file", metavar="JOB")
@run_options
@guarded
def check(job_file: str, **opts: Any) -> None:
    """Validate the job and preflight it against the provider; sends no topup."""
    from runner.run import check_job

    job = load_job(job_file)
    settings = _settings(job, opts)
    configure_logging(provider=settings.provider, fmt=settings.log_format)
    summary = anyio.run(check_job, job, settings)
    for line in summary:
        say(line, event="check", provider=settings.provider)


@main.command()
@click.option("--ledger", help=LEDGER_HELP + " Default: that one and ./.topup-sandbox's.")
@guarded
def status(ledger: str | None) -> None:
    """Show the runs recorded in the ledger and their rows by status.

    Without --ledger (or TOPUP_LEDGER), the default ledger of real runs and the sandbox
    ledger of this folder (./.topup-sandbox), if there is one; sandbox runs say SANDBOX.
    """
    wheres = [_ledger_where(ledger)]
    sandbox = sandbox_ledger_path(Path.cwd())
    if not (ledger or os.environ.get("TOPUP_LEDGER", "").strip()) and sandbox.exists():
        wheres.append(sandbox)
    from runner.overview import runs_lines

    for where in wheres:
        for line in runs_lines(where, heading=len(wheres) > 1):
            click.echo(line)


@main.command()
@click.option("--ledger", help=LEDGER_HELP)
@click.option("--run-key", required=True, help="The run to report on.")
@click.option("--output", type=click.Path(path_type=Path), required=True)
@click.option("--group-by", metavar="COLUMN", help="Subtotal the Summary by this job column.")
@guarded
def report(ledger: str | None, run_key: str, output: Path, group_by: str | None) -> None:
    """Rewrite a run's spreadsheet from the ledger."""
    from runner.overview import ledger_with_run
    from runner.run import rewrite_report

    where = _ledger_where(ledger)
    sandbox = sandbox_ledger_path(Path.cwd())
    if not (ledger or os.environ.get("TOPUP_LEDGER", "").strip()) and sandbox.exists():
        where = ledger_with_run(run_key, where, sandbox)
    written = rewrite_report(where, run_key, output, group_by)
    click.echo(f"report {written}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--ledger", help=LEDGER_HELP)
@click.option("--log-format", type=click.Choice(["console", "json"]))
@guarded
def webhook(host: str, port: int, ledger: str | None, log_format: str | None) -> None:
    """Receive Alix webhooks at POST /webhooks/alix, verify them, settle pending rows.

    The public key that verifies them comes from ALIX_WEBHOOK_PUBLIC_KEY_FILE (PEM).
    """
    from runner.errors import ConfigError
    from runner.providers.alix_auth import load_public_key
    from runner.webhooks.receive import run_receiver

    key_file = os.environ.get("ALIX_WEBHOOK_PUBLIC_KEY_FILE", "").strip()
    if not key_file:
        raise ConfigError("ALIX_WEBHOOK_PUBLIC_KEY_FILE is not set: the PEM key Alix gave you")
    try:
        key = Path(key_file).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"ALIX_WEBHOOK_PUBLIC_KEY_FILE: {key_file}: {exc.strerror}") from None
    load_public_key(key)  # a bad PEM is a configuration error now, not at the first webhook
    where = _ledger_where(ledger)
    configure_logging(provider="alix", fmt=log_format)
    try:
        run_receiver(where, key, host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _ledger_where(ledger: str | None) -> Path | str:
    """--ledger, else TOPUP_LEDGER, else the per-user default: a path, or a database URL."""
    from runner.ledger import is_postgres_url
    from runner.run import default_ledger_path

    given = ledger or os.environ.get("TOPUP_LEDGER", "").strip()
    if given and is_postgres_url(given):
        return given
    return Path(given).expanduser() if given else default_ledger_path(os.environ)


def _say_summary(settings: Settings, result: RunResult) -> None:
    """The end of a run: a few short lines on a console, one `run.summary` object for machines."""
    from runner.overview import summary

    lines, fields = summary(settings, result, os.environ, Path.cwd())
    if _json_mode():
        say("; ".join(lines), event="run.summary", **fields)
    else:
        for line in lines:
            click.echo(line)


def _register_sandbox() -> None:
    from runner.sandbox.command import sandbox

    main.add_command(sandbox)


_register_sandbox()
