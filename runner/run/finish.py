"""How a run ends: pending rows settled, rows in doubt marked, then the report, the failed-rows
job written from the ledger, and the result the command exits with."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread
import structlog

from runner.config import Settings
from runner.domain import JobRow, RowStatus, RunInfo
from runner.errors import ConfigError, LedgerError, RunnerError
from runner.jobs import Job
from runner.ledger import PendingRow, ProviderEvent, RunFacts, RunSpec, redact
from runner.providers.base import Applied, Provider, StillPending
from runner.providers.factory import rules_for
from runner.report import Figures, Seconds, failed_rows_path_for, write_failed_rows
from runner.report.chunks import job_rows, write_run_report
from runner.report.rows import Value
from runner.run.check import busiest
from runner.run.policy import RowState
from runner.run.record import RunRecord, open_for, read_run
from runner.scheduler import lower_bound

log = structlog.get_logger("runner.run")

# How often rows the provider accepted as pending are polled while --wait-settle lasts (s).
SETTLE_POLL = 1.0


class ReportNotWritten(RunnerError):
    """The run is recorded but its report could not be written at the end (exit 1: topups may
    have been sent); the message says how to write it again from the ledger."""

    exit_code = 1

    def __init__(
        self, why: str, run_key: str, output: Path, ledger: str | None, kept: bool
    ) -> None:
        self.run_key, self.output = run_key, output
        where = f" --ledger {shlex.quote(redact(ledger))}" if ledger else ""
        again = (
            f"the run is in the ledger: write its report with `topup-runner report "
            f"--run-key {run_key} --output {shlex.quote(str(output))}{where}`"
            if kept
            else "the sandbox's ledger was temporary: run again with --ledger PATH to keep one"
        )
        super().__init__(f"{why} ({again})")


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run ended with; `exit_code` follows the contract."""

    run_key: str
    provider: str
    report: Path
    counts: Mapping[RowStatus, int]
    sent: int
    makespan: float | None
    lower_bound: float
    stopped: str | None = None
    # `run --audit`: the audit's verdict in words, and whether every row matched.
    audit: str | None = None
    audit_ok: bool | None = None
    chain_head: str | None = None  # the ledger's hash-chain head as the report was written

    @property
    def exit_code(self) -> int:
        if self.audit_ok is False:
            return 1
        unfinished = (
            self.counts.get(RowStatus.FAILED, 0)
            + self.counts.get(RowStatus.NEEDS_REVIEW, 0)
            + self.counts.get(RowStatus.NOT_ATTEMPTED, 0)
        )
        return 0 if unfinished == 0 else 1


class RunProgress(Protocol):
    """Who watches a run: told the size once, then each row that reaches a final status."""

    def start(self, total: int, done: int) -> None: ...

    def row_final(self, status: RowStatus) -> None: ...


class Tally:
    """What this process did: topups sent, rows brought to a final status, and when the first
    and the latest applied topup were seen (the run's makespan)."""

    __slots__ = ("final", "first_applied", "last_applied", "progress", "sent")

    def __init__(self, progress: RunProgress) -> None:
        self.progress = progress
        self.sent = 0
        self.final: Counter[RowStatus] = Counter()
        self.first_applied: float | None = None
        self.last_applied = 0.0

    def row_final(self, status: RowStatus) -> None:
        self.final[status] += 1
        self.progress.row_final(status)

    def applied_at(self, at: float) -> None:
        if self.first_applied is None:
            self.first_applied = at
        if at > self.last_applied:
            self.last_applied = at

    @property
    def makespan(self) -> float | None:
        return None if self.first_applied is None else self.last_applied - self.first_applied


async def settle_pending(
    record: RunRecord,
    provider: Provider,
    settings: Settings,
    tally: Tally,
    clock: Callable[[], float],
    stopping: Callable[[], bool],
) -> None:
    """Settle rows the provider accepted as pending: from webhook events already in the
    ledger, then, for up to --wait-settle seconds, by polling the provider."""
    deadline = clock() + settings.wait_settle
    while True:
        await record.settle_from_events(settings.provider)
        pending = await record.pending()
        if not pending or stopping():
            break
        if clock() >= deadline:
            log.info("settle.waiting_ended", pending=len(pending))
            break
        limiter = anyio.CapacityLimiter(settings.concurrency)
        async with anyio.create_task_group() as tg:
            for row in pending:
                tg.start_soon(_poll_settlement, record, provider, settings, tally, row, limiter)
        left = deadline - clock()
        still = await record.pending()
        if left > 0 and still:
            await anyio.sleep(min(SETTLE_POLL, left))


async def _poll_settlement(
    record: RunRecord,
    provider: Provider,
    settings: Settings,
    tally: Tally,
    row: PendingRow,
    limiter: anyio.CapacityLimiter,
) -> None:
    async with limiter:
        final = await provider.settle(row.card_id, row.amount, row.provider_ref)
    if isinstance(final, StillPending):
        return
    if isinstance(final, Applied) and final.discrepancy is not None:
        # Settled, but not as it was sent: money moved, so never failed, never resent.
        why = f"the provider's record disagrees: {final.discrepancy}"
        log.warning("settle.discrepancy", row=row.row, card_id=row.card_id, error=why)
        await record.write_row(row.row, RowStatus.NEEDS_REVIEW, why)
        tally.row_final(RowStatus.NEEDS_REVIEW)
        return
    applied = final if isinstance(final, Applied) else None
    status = RowStatus.FAILED if applied is None else RowStatus.SUCCEEDED
    event = ProviderEvent(
        settings.provider,
        row.card_id,
        row.amount,
        row.provider_ref,
        status,
        None if applied is None else applied.fee,
        None if applied is None else applied.card_balance_after,
    )
    if await record.apply_event(event):
        log.info("settle.polled", row=row.row, card_id=row.card_id, status=status.value)
        tally.row_final(status)


IN_DOUBT = "outcome unknown when the run stopped: rerun the same run key to settle it"


async def mark_in_doubt(record: RunRecord, rows: Iterable[int]) -> None:
    """Rows whose last answer was lost when the run stopped: the resume will settle them."""
    await record.close_untouched(((row, IN_DOUBT) for row in rows), RowStatus.NEEDS_REVIEW, None)


async def mark_stopped(
    record: RunRecord, in_doubt: Iterable[int], unsent: Sequence[JobRow | RowState]
) -> None:
    """Give every row the stop left behind a status, attempts and error that agree.

    A row with an attempt still open may have moved money: `needs_review` (the resume
    reconciles it). A row whose requests were all answered without moving money (refused with
    "wait", failed before applying, found not applied) stays `not_attempted`, to go out on the
    rerun, and its error says how many were sent and why none applied. `unsent` is what the
    workers still held when they stopped.
    """
    states = {item.job_row.row: item for item in unsent if isinstance(item, RowState)}
    rows = {item.row if isinstance(item, JobRow) else item.job_row.row for item in unsent}
    doubt = set(in_doubt)
    if rows:
        doubt |= rows & {a.row for a in await record.open_attempts()}
    await mark_in_doubt(record, doubt)
    if not rows:
        return

    def sent_before_stop() -> list[tuple[int, int]]:
        return [
            (r.row, r.attempts)
            for r in record.records(RowStatus.NOT_ATTEMPTED)
            if r.attempts and r.row in rows and r.row not in doubt
        ]

    stopped = await anyio.to_thread.run_sync(sent_before_stop)
    errors = ((row, stopped_error(sent, states.get(row))) for row, sent in stopped)
    await record.close_untouched(errors, RowStatus.NOT_ATTEMPTED, None)


def stopped_error(sent: int, state: RowState | None) -> str:
    """The error of a `not_attempted` row whose `sent` requests moved no money: how many were
    sent, why none applied as far as this process saw, and what to do."""
    requests = f"{sent} request{'s' if sent != 1 else ''} sent, none applied"
    why = []
    if state is not None:
        if state.waits:
            why.append(f'{state.waits} refused with "wait" by the provider')
        if state.spent:
            why.append(f"{state.spent} failed before applying or found not applied")
    reason = f" ({'; '.join(why)})" if why else ""
    return f"{requests}{reason}; stopped before sending it again: rerun the same run key to send it"


@dataclass(frozen=True, slots=True)
class Ending:
    """How the run ended, for its report and its last log line."""

    started: datetime
    lower_bound: float
    stopped: str | None
    complete: bool  # no error and no stop: the run may be marked finished
    audit: tuple[tuple[str, Value], ...] = ()  # `run --audit`: its lines for the Summary
    # The request rate the run paced at: "configured 5/s", "learned 23.1/s (auto)"...
    rate_used: str | None = None


async def write_outputs(
    record: RunRecord,
    job: Job,
    settings: Settings,
    tally: Tally,
    ending: Ending,
    clock: Callable[[], float],
) -> RunResult:
    """Close the run in the ledger if nothing is left, then write its report and the job of its
    failed rows; log `run.finished`. (The metrics are written at the command's exit.)"""
    counts = await record.status_counts()
    if ending.complete and counts[RowStatus.NOT_ATTEMPTED] == 0:
        await record.finish_run()
    output = settings.output or Path(f"{record.run_key}.xlsx")
    lb = ending.lower_bound
    makespan = tally.makespan
    # The Summary tells the whole run as the ledger has it, whichever process writes it and
    # however often the run was resumed: the same as `topup-runner report` writes. Only lines
    # this process alone knows follow, each labelled so.
    whole = lower_bound(len(job.rows), busiest(job.rows), settings.rate_limit, settings.cooldown)
    spec = await record.find_run() or RunSpec(
        record.run_key, settings.provider, "", str(job.path), "", job.extra_columns, 0
    )
    facts = await record.facts()
    info = info_from_facts(spec, facts)
    own: list[tuple[str, Value]] = [("estimated minimum duration (s)", _seconds(whole))]
    if ending.rate_used is not None:
        own.append(("request rate used", ending.rate_used))
    if not record.shared:
        # Workers of a shared ledger each write the same Summary: no line of one of them.
        own.insert(0, ("topups sent by this process", tally.sent))
        if ending.stopped:
            own.append(("stopped", ending.stopped))
    own += ending.audit
    group_by = settings.group_by
    if group_by is not None and group_by not in job.extra_columns:
        # The command refuses this before anything is sent; a caller that did not check must
        # still get its report once money moved, only without the subtotals.
        log.warning("report.group_by_unknown", group_by=group_by)
        group_by = None
    figures = report_figures(spec, facts, group_by, tuple(own))
    # A million-row report takes a while (see the README's performance section): say so.
    log.info("report.writing", report=str(output), rows=len(job.rows))
    writing = clock()
    failed_file = failed_rows_path_for(output)
    try:
        split = await anyio.to_thread.run_sync(
            write_run_report, output, record.records, info, figures
        )
        log.info("report.written", report=str(output), seconds=round(clock() - writing, 1))
        failed = await anyio.to_thread.run_sync(
            write_failed_rows,
            failed_file,
            # A split row failed only if all its chunks did: judged on the joined rows.
            job_rows(record.records()) if split else record.records(RowStatus.FAILED),
            job.extra_columns,
            job.currency,
        )
    except (OSError, RunnerError) as exc:
        why = str(exc)
        if isinstance(exc, OSError):
            why = f"{failed_file}: cannot write the failed-rows job: {exc.strerror or exc}"
        kept = not settings.is_sandbox or settings.ledger is not None
        raise ReportNotWritten(why, record.run_key, output, settings.ledger, kept) from exc
    result = RunResult(
        run_key=record.run_key,
        provider=settings.provider,
        report=output,
        counts=counts,
        sent=tally.sent,
        makespan=makespan,
        lower_bound=lb,
        stopped=ending.stopped,
        chain_head=facts.chain_head,
    )
    log.info(
        "run.finished",
        report=str(output),
        sent=tally.sent,
        makespan_s=None if makespan is None else round(makespan, 3),
        lower_bound_s=round(lb, 3),
        makespan_ratio=None if makespan is None or lb <= 0 else round(makespan / lb, 4),
        stopped=ending.stopped,
        rate_used=ending.rate_used,
        failed_rows_job=str(failed_file) if failed else None,
        **{f"rows_{s.value}": n for s, n in counts.items()},
    )
    return result


def rewrite_report(
    ledger_where: Path | str, run_key: str, output: Path, group_by: str | None = None
) -> Path:
    """Write a run's spreadsheet again from the ledger alone."""
    if isinstance(ledger_where, Path) and not ledger_where.exists():
        raise LedgerError(f"ledger {ledger_where}: no such file")
    with ExitStack() as stack:
        record = RunRecord(open_for(ledger_where, stack, readonly=True), run_key)
        spec, facts = read_run(record.ledger, run_key)
        if spec is None or facts is None:
            raise LedgerError(f"ledger {record.name}: no run with key {run_key!r}")
        figures = report_figures(spec, facts, group_by)
        write_run_report(output, record.records, info_from_facts(spec, facts), figures)
        return output
    raise AssertionError("unreachable")  # pragma: no cover  (ExitStack swallows nothing)


def info_from_facts(spec: RunSpec, facts: RunFacts) -> RunInfo:
    """What a Summary says of the run from the ledger alone: the same whichever process
    writes it, and after any number of resumes."""
    return RunInfo(
        run_key=spec.run_key,
        provider=spec.provider,
        job_file=spec.job_file,
        started_at=facts.created_at,
        finished_at=facts.last_finished_at,
        extra_columns=spec.extra_columns,
    )


def report_figures(
    spec: RunSpec,
    facts: RunFacts,
    group_by: str | None,
    own: tuple[tuple[str, Value], ...] = (),
) -> Figures:
    """The run's currency, subtotal column and figures from the ledger (numbers as numbers),
    then `own`: the lines only the writing process knows."""
    lines: list[tuple[str, Value]] = [("topups sent (all processes)", facts.sent)]
    if facts.first_applied_at is not None and facts.last_applied_at is not None:
        span = (facts.last_applied_at - facts.first_applied_at).total_seconds()
        lines.append(("first to last applied topup (s)", _seconds(span)))
    # The run's hash-chain head as the report was written: an anchor `verify` checks.
    lines.append(("ledger chain head", facts.chain_head or "unchained"))
    return Figures(currency=_currency(spec.provider), group_by=group_by, lines=(*lines, *own))


def _currency(provider: str) -> str:
    try:
        return rules_for(provider).currency  # the sandbox's is the provider it simulates
    except ConfigError:
        return ""  # a provider this version does not know: no currency rather than a wrong one


def _seconds(value: float) -> Seconds:
    # Durations come from clocks as float seconds; the Summary shows them to a tenth.
    return Seconds(f"{value:.1f}")
