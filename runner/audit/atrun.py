"""`run --audit`: the audit of a run at its end, through the run's own provider client (its
pacing included), folded into the run's result, its Summary and its exit code."""

from __future__ import annotations

import dataclasses

import anyio

from runner.audit.audit import audit_run
from runner.audit.output import verdict_text, write_audit
from runner.audit.values import AuditResult
from runner.config import Settings
from runner.ledger import Ledger
from runner.providers.base import Provider
from runner.run.finish import RunResult


async def audit_at_end(
    ledger: Ledger, run_key: str, provider: Provider, settings: Settings
) -> AuditResult:
    return await audit_run(ledger, run_key, provider, concurrency=settings.concurrency)


async def folded(result: RunResult, audit: AuditResult) -> RunResult:
    """The run's result with the audit's verdict; the Audit sheet (or CSV) written beside
    the report."""
    await anyio.to_thread.run_sync(write_audit, result.report, audit)
    return dataclasses.replace(result, audit=verdict_text(audit), audit_ok=audit.ok)
