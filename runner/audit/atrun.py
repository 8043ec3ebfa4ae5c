"""`run --audit`: the audit of a run at its end, through the run's own provider client (its
pacing included), folded into the run's result, its Summary and its exit code."""

from __future__ import annotations

import dataclasses

import anyio
import structlog

from runner.audit.audit import audit_run
from runner.audit.output import verdict_text, write_audit
from runner.audit.values import AuditResult
from runner.config import Settings
from runner.ledger import Ledger
from runner.providers.base import Provider
from runner.run.finish import RunResult

log = structlog.get_logger("runner.audit")


async def audit_at_end(
    ledger: Ledger, run_key: str, provider: Provider, settings: Settings, *, resumed: bool
) -> AuditResult | None:
    """The audit of the run now; None (said in the log) on a shared ledger while the run is not
    done: another worker's topup in flight would look like money no row accounts for; and for
    a resumed run on the built-in sandbox, which is not the one that paid its earlier rows."""
    if settings.is_sandbox and resumed:
        log.warning(
            "audit.skipped",
            reason="the built-in sandbox that paid this run's earlier rows ended with them",
        )
        return None
    if ledger.shared:
        await ledger.flush()
        open_attempts = await ledger.call(ledger.open_attempts, run_key)
        left = await ledger.call(ledger.progress, run_key)
        if open_attempts or left:
            log.warning(
                "audit.skipped",
                reason="other workers are still on the run: audit it once it is done",
                rows_left=len(left),
                attempts_open=len(open_attempts),
            )
            return None
    return await audit_run(ledger, run_key, provider, concurrency=settings.concurrency)


async def folded(result: RunResult, audit: AuditResult) -> RunResult:
    """The run's result with the audit's verdict; the Audit sheet (or CSV) written beside
    the report."""
    await anyio.to_thread.run_sync(write_audit, result.report, audit)
    return dataclasses.replace(result, audit=verdict_text(audit), audit_ok=audit.ok)
