"""The guardrails a run passes before it opens its provider, and what `check` says of them:
caps, approvals, repeats. Every refusal is one `GuardRefused`, one line a reason."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from runner.config import Settings, target_of
from runner.errors import GuardRefused, LedgerError
from runner.guard.approvals import (
    Standing,
    approval_digest,
    approval_problems,
    judge,
    os_user,
    trusted_keys,
)
from runner.guard.caps import cap_problems
from runner.guard.repeats import job_cards, repeat_problems, window_of
from runner.jobs import Job
from runner.ledger import Ledger, utcnow


def runner_name(settings: Settings) -> str:
    """Who runs the job: --by (TOPUP_BY), else the OS user."""
    return settings.by or os_user()


async def standing_of(
    ledger: Ledger, job: Job, settings: Settings, run_key: str, runner: str | None,
    env: Mapping[str, str],
) -> Standing:  # fmt: skip
    digest = approval_digest(job, target_of(settings.provider, settings.base_url), run_key)
    found = await ledger.call(ledger.approvals, digest, str(job.path.resolve()), run_key)
    return judge(found, digest, runner, utcnow(), trusted_keys(env))


async def before_sending(
    ledger: Ledger,
    job: Job,
    settings: Settings,
    run_key: str,
    *,
    resuming: bool,
    env: Mapping[str, str],
) -> list[str]:
    """Refuse the job (GuardRefused, exit 3) if a cap, the approvals or the repeat guard
    says no; else the lines that say who approved it (for the confirmation)."""
    problems = cap_problems(job.rows, settings.max_total, settings.max_row)
    approved: list[str] = []
    if settings.require_approval:
        runner = runner_name(settings)
        standing = await standing_of(ledger, job, settings, run_key, runner, env)
        problems += approval_problems(standing, settings.require_approval, runner)
        if standing.counted:
            approved.append(f"approved by {standing.approvers()}")
    window = window_of(settings.repeat_window, settings.recurring)
    # A run already recorded passed this guard when it started: resuming it (or joining it,
    # on a shared ledger) pays only its own rows, which never count as repeats.
    if window > 0 and not resuming:
        since = utcnow() - timedelta(seconds=window)
        paid = await ledger.call(
            ledger.paid_elsewhere, job_cards(job.rows), run_key, settings.provider, since
        )
        problems += repeat_problems(job.rows, paid, settings.allow_repeat_of, window)
    if problems:
        raise GuardRefused(problems)
    return approved


async def approval_lines(
    ledger: Ledger | None, job: Job, settings: Settings, run_key: str, env: Mapping[str, str]
) -> list[str]:
    """What `check` says of the approvals of this exact job."""
    needed = settings.require_approval
    wanted = f"; {needed} required by people other than who runs it" if needed else ""
    if ledger is None:
        return [f"approval: none recorded (no ledger yet){wanted}"]
    try:
        standing = await standing_of(ledger, job, settings, run_key, None, env)
    except LedgerError:
        return [f"approval: unknown (this ledger keeps no approvals yet){wanted}"]
    digest = standing.digest[:16]
    if standing.counted:
        lines = [f"approval: approved by {standing.approvers()} (digest {digest}){wanted}"]
    else:
        lines = [f"approval: not approved (digest {digest}){wanted}"]
    return lines + [f"approval: {reason}" for reason in standing.not_counted[:10]]
