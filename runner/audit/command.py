"""`topup-runner audit --run-key KEY`: match a run, recorded in the ledger, against the
provider's own books; write what it finds; exit 0 when every row matched, 1 when not."""

from __future__ import annotations

import dataclasses
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import anyio
import click

from runner.audit.audit import audit_run
from runner.audit.output import console_lines, summary_lines, write_audit
from runner.audit.values import AuditResult
from runner.config import Settings, resolve_settings
from runner.errors import ConfigError, LedgerError
from runner.exits import guarded
from runner.ledger import Ledger, RunSpec
from runner.logs import configure_logging

SANDBOX_GONE = (
    "the built-in sandbox of a run ends with it: audit a run made against a standalone "
    "`topup-runner sandbox` with --provider uncash --base-url"
)


@click.command()
@click.option("--run-key", required=True, help="The run to audit.")
@click.option("--ledger", help="The run's ledger: a SQLite path or a postgresql:// URL.")
@click.option(
    "--provider",
    type=click.Choice(["sandbox", "uncash", "alix"]),
    help="Which platform [default: the run's]",
)
@click.option("--base-url", metavar="URL", help="The provider's API root [default: the run's]")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Rewrite the report here with an Audit sheet (.xlsx) or <stem>.audit.csv "
    "beside it (.csv) [default: RUN_KEY.audit.csv, no report]",
)
@click.option("--rate-limit", metavar="RATE", help="Requests per second to the provider.")
@click.option("--concurrency", metavar="N", help="Cards read at once.")
@click.option("--timeout", metavar="SECONDS", help="Per request.")
@click.option("--log-format", type=click.Choice(["console", "json"]))
@guarded
def audit(
    run_key: str,
    ledger: str | None,
    provider: str | None,
    base_url: str | None,
    output: Path | None,
    rate_limit: str | None,
    concurrency: str | None,
    timeout: str | None,
    log_format: str | None,
) -> None:
    """Match a run's rows one to one against the provider's own transaction records."""
    from runner.cli import _ledger_where
    from runner.run.record import open_for

    if output is not None and output.suffix.lower() not in (".xlsx", ".csv"):
        raise ConfigError(f"output: {output} must end in .xlsx or .csv")
    where = _ledger_where(ledger)
    if isinstance(where, Path) and not where.exists():
        raise LedgerError(f"ledger {where}: no such file")
    with ExitStack() as stack:
        opened = open_for(where, stack)
        spec = opened.find_run(run_key)
        if spec is None:
            raise LedgerError(f"ledger {opened.name}: no run with key {run_key!r}")
        settings = _settings(spec, provider, base_url, rate_limit, concurrency, timeout)
        if log_format is not None:
            settings = dataclasses.replace(settings, log_format=log_format)
        configure_logging(provider=settings.provider, fmt=settings.log_format)
        result = anyio.run(_audit, opened, settings, spec, output)
    for line in console_lines(result):
        click.echo(line)
    sys.exit(0 if result.ok else 1)


def _settings(
    spec: RunSpec,
    provider: str | None,
    base_url: str | None,
    rate_limit: str | None,
    concurrency: str | None,
    timeout: str | None,
) -> Settings:
    """The run's own provider and API root unless named; a target other than the run's is
    refused: its books are not the run's."""
    from runner.targets import SANDBOX_TARGET, normalize_target, target_of

    stored = normalize_target(spec.base_url)
    if stored == SANDBOX_TARGET or provider == "sandbox":
        raise ConfigError(SANDBOX_GONE)
    run_provider, _, run_url = stored.partition(":")
    chosen = provider or run_provider
    url = base_url or (run_url if chosen == run_provider else None)
    if target_of(chosen, url) != stored:
        raise ConfigError(
            f"run {spec.run_key!r} was made against {stored}, not {target_of(chosen, url)}: "
            "audit it where it paid"
        )
    cli = {
        "provider": chosen,
        "base_url": url,
        "run_key": spec.run_key,
        "rate_limit": rate_limit,
        "concurrency": concurrency,
        "timeout": timeout,
    }
    return resolve_settings(cli, job_file="audit")


async def _audit(
    ledger: Ledger, settings: Settings, spec: RunSpec, output: Path | None
) -> AuditResult:
    from runner.providers.factory import open_provider
    from runner.scheduler import Pacer

    cards = {r.card_id for r in ledger.records(spec.run_key)}
    async with open_provider(settings, cards, Pacer(settings.rate_limit)) as (provider, _):
        result = await audit_run(ledger, spec.run_key, provider, concurrency=settings.concurrency)
    if output is None:
        target = Path(os.getcwd()) / f"{spec.run_key}.audit.csv"
        await anyio.to_thread.run_sync(_write_csv_only, target, result)
    else:
        await anyio.to_thread.run_sync(_rewrite, ledger, spec, output, result)
    return result


def _write_csv_only(target: Path, result: AuditResult) -> None:
    write_audit(target.with_name(target.name.removesuffix(".audit.csv") + ".csv"), result)


def _rewrite(ledger: Ledger, spec: RunSpec, output: Path, result: AuditResult) -> None:
    """The report again from the ledger (with what the audit filled in), its Summary with the
    audit's lines, then the audit itself."""
    from runner.report import write_report
    from runner.run.finish import info_from_facts, report_figures

    facts = ledger.run_facts(spec.run_key)
    figures = report_figures(spec, facts, None, summary_lines(result))
    write_report(output, ledger.records(spec.run_key), info_from_facts(spec, facts), figures)
    write_audit(output, result)
