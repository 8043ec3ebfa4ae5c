"""The `topup-runner` command: parse arguments, build settings, call the run, exit.

How it talks and ends (one line per message, the contract's exit codes, a run's exit told to
its metrics file and notification targets) is runner.exits'.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import click

from runner.config import (
    Settings,
    built_in_default,
    keep_ledgers_apart,
    resolve_settings,
    sandbox_ledger_path,
)
from runner.errors import ConfigError
from runner.exits import F, fail, guarded, interrupted, json_mode, say, watch_exit
from runner.guard.options import guard_options
from runner.jobs import Job, load_job
from runner.jobs.options import JOB_READING, JOB_READING_OPTIONS, job_reading
from runner.logs import configure_logging
from runner.metrics import RunEnd
from runner.progress import LazyStderr, NoProgress, RichProgress

__all__ = ["guarded", "main", "say", "watch_exit"]

if TYPE_CHECKING:
    from runner.run import RunResult

# A run's event loop: uvloop's costs a fast run about a sixth less CPU per topup than
# asyncio's own (benchmarks/README.md, Performance).
LOOP = {"use_uvloop": True}


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
                 "Requests per second, all requests together, 'unlimited', or 'auto[:MAX]' "
                 "to learn the provider's limit from its 429s."),
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
        click.option("--split-over-max", is_flag=True, default=None,
                     help="Pay a row above the provider's maximum in chunks, each once."),
        *JOB_READING_OPTIONS,
        click.option("--audit", is_flag=True, default=None,
                     help="At the end, match the run against the provider's own books."),
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
    cli = {k: v for k, v in opts.items() if k not in ("no_progress", *JOB_READING)}
    cli["notify"] = cli.get("notify") or None  # click gives () when --notify is not given
    cli["allow_repeat_of"] = cli.get("allow_repeat_of") or None  # the same for this one
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


class Commands(click.Group):
    """click's group, whose usage errors (an unknown option, a missing argument, a value of
    the wrong kind) are one line and exit 2 like every other error: not click's four.

    `sandbox` is loaded only when it is the command: the simulator's modules would cost every
    other command's start a seventh of a second."""

    LAZY: ClassVar[dict[str, str]] = {
        "sandbox": "runner.sandbox.command",
        "approve": "runner.guard.command",
        "audit": "runner.audit.command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            module = importlib.import_module(self.LAZY[cmd_name])
            self.add_command(getattr(module, cmd_name))
        return super().get_command(ctx, cmd_name)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "topup-runner"
            fail(ConfigError(f"{exc.format_message().rstrip('.')} (see `{where} --help`)"))
        except click.ClickException as exc:
            fail(ConfigError(exc.format_message()))
        except click.Abort:
            interrupted()


@click.group(cls=Commands)
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
@guard_options
@guarded
def run(job_file: str, **opts: Any) -> None:
    """Execute a job: topups, retries, report."""
    from runner.notify import check_targets
    from runner.run import run_job

    end = _run_end(job_file, opts)
    watch_exit(end)
    job = load_job(job_file, job_reading(opts))
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

    job = load_job(job_file, job_reading(opts))
    settings = _settings(job, opts)
    configure_logging(provider=settings.provider, fmt=settings.log_format)
    summary = anyio.run(check_job, job, settings)
    for line in [*summary, *(f"warning: {job.path}: {note}" for note in job.notes)]:
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
@click.option("--ledger", help=LEDGER_HELP)
@click.option("--run-key", required=True, help="The run to verify.")
@click.option("--report", type=click.Path(path_type=Path), help="Its report, .xlsx or .csv.")
@guarded
def verify(ledger: str | None, run_key: str, report: Path | None) -> None:
    """Recompute the run's ledger hash chain; check a report against the ledger.

    Exit 0 when everything holds, 1 when not (the first record that does not fit first).
    A keyed chain needs TOPUP_LEDGER_KEY, from the environment only.
    """
    from runner.overview import ledger_with_run
    from runner.run.verify import show_verification, verify_run

    where = _ledger_where(ledger)
    sandbox = sandbox_ledger_path(Path.cwd())
    if not (ledger or os.environ.get("TOPUP_LEDGER", "").strip()) and sandbox.exists():
        where = ledger_with_run(run_key, where, sandbox)
    found = verify_run(where, run_key, report, os.environ)
    for line in show_verification(found):
        click.echo(line)
    sys.exit(0 if found.sound else 1)


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
    if json_mode():
        say("; ".join(lines), event="run.summary", **fields)
    else:
        for line in lines:
            click.echo(line)
