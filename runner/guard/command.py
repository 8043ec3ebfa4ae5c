"""`topup-runner approve JOB --by NAME`: check the job as `check` does, then record in the
ledger an approval of its exact content (or, with --revoke, withdraw one)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import click

from runner.cli import run_options
from runner.config import Settings, target_of
from runner.errors import ConfigError
from runner.exits import guarded, say
from runner.guard.approvals import approval_digest, new_approval, person, sign
from runner.guard.options import DEFAULT_APPROVAL_LIFETIME, parse_duration, show_duration
from runner.jobs import Job, load_job
from runner.ledger import Ledger, utcnow
from runner.ledger.guards import approval_insert, approval_revoke
from runner.logs import configure_logging
from runner.money import format_amount
from runner.preflight import PreflightReport

# Longest an approval may be given for: a payroll approved stays approved no longer.
_MAX_LIFETIME = 90 * 86_400.0


@click.command()
@click.argument("job_file", metavar="JOB")
@run_options
@click.option("--by", "approver", required=True, metavar="NAME", help="Who approves.")
@click.option("--revoke", is_flag=True, help="Withdraw NAME's approval of this job instead.")
@click.option(
    "--expires",
    metavar="DURATION",
    default=show_duration(DEFAULT_APPROVAL_LIFETIME),
    show_default=True,
    help="How long the approval holds.",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path),
    metavar="PEM",
    help="Sign the approval with this Ed25519 private key.",
)
@guarded
def approve(
    job_file: str, approver: str, revoke: bool, expires: str, key_file: Path | None,
    **opts: Any,
) -> None:  # fmt: skip
    """Approve the job's exact content (rows, provider, target, run key) for `run
    --require-approval`; any change to it voids the approval. Same provider, target and
    ledger options as `check`."""
    from runner.cli import _settings  # the settings `run` and `check` build

    try:
        lifetime = parse_duration(expires)
    except ValueError as exc:
        raise ConfigError(f"--expires: {expires!r}: {exc}") from None
    if not 0 < lifetime <= _MAX_LIFETIME:
        raise ConfigError("--expires: must be longer than 0 and at most 90d")
    job = load_job(job_file)
    settings = _settings(job, {**opts, "by": approver.strip() or None})
    if settings.by is None:
        raise ConfigError("--by: give the approver's name")
    configure_logging(provider=settings.provider, fmt=settings.log_format)
    if revoke:
        lines = anyio.run(_revoke, job, settings)
    else:
        lines = anyio.run(_approve, job, settings, lifetime, key_file)
    for line in lines:
        say(line, event="approve", provider=settings.provider)


def _ledger(settings: Settings, stack: ExitStack) -> Ledger:
    import os

    from runner.run.record import named_ledger, open_for

    where = named_ledger(settings, os.environ)
    if where is None:  # a sandbox run given no ledger keeps none: nothing could honour it
        raise ConfigError("--ledger: an approval needs the ledger the run will use")
    return open_for(where, stack)


async def _approve(
    job: Job, settings: Settings, lifetime: float, key_file: Path | None
) -> list[str]:
    from runner.run import check_job

    kept: dict[str, object] = {}
    checked = await check_job(job, settings, kept)
    report, run_key = kept["report"], kept["run_key"]
    assert isinstance(report, PreflightReport)
    assert isinstance(run_key, str)
    snapshot = {
        "wallet_balance": _money(report.wallet_balance),
        "estimated_fees": _money(report.estimated_fees),
        "fee_source": report.fee_source,
        "set_aside": str(len(report.set_aside)),
    }
    assert settings.by is not None
    target = target_of(settings.provider, settings.base_url)
    approval = new_approval(job, target, run_key, settings.by, utcnow(), lifetime, snapshot)
    if key_file is not None:
        approval = sign(approval, key_file)
    with ExitStack() as stack:
        ledger = _ledger(settings, stack)
        await ledger.write(approval_insert(approval))
        await ledger.flush()
    fees = _money(report.estimated_fees) or "unknown"
    signed = ", signed" if approval.signature else ""
    return [
        *(line for line in checked[:-1] if not line.startswith("approval:")),
        f"approved by {approval.approver}{signed}: {approval.row_count} rows, total "
        f"{format_amount(approval.total)}, estimated fees {fees}, run key {run_key}, "
        f"digest {approval.digest}, until {approval.expires_at:%Y-%m-%d %H:%M} UTC",
    ]


async def _revoke(job: Job, settings: Settings) -> list[str]:
    from runner.run.resume import choose_run_key

    assert settings.by is not None
    with ExitStack() as stack:
        ledger = _ledger(settings, stack)
        run_key = await choose_run_key(ledger, job, settings)
        digest = approval_digest(job, target_of(settings.provider, settings.base_url), run_key)
        mine = [
            a
            for a in await ledger.call(ledger.approvals, digest, str(job.path.resolve()), run_key)
            if a.digest == digest
            and a.revoked_at is None
            and person(a.approver) == person(settings.by)
        ]
        if not mine:
            raise ConfigError(
                f"{job.path}: no approval by {settings.by} of this exact job to revoke "
                f"(digest {digest[:16]})"
            )
        for a in mine:
            await ledger.write(approval_revoke(digest, a.approver, utcnow()))
        await ledger.flush()
    return [f"revoked: {len(mine)} approval(s) by {settings.by} of {job.path} (digest {digest})"]


def _money(value: Any) -> str | None:
    return None if value is None else format_amount(value)
