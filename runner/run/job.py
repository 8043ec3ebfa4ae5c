"""One run of one job from start to end: the ledger and the run key, what is left to do, preflight,
the workers, then the end of the run (`runner.run.finish`)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING

import structlog

from runner.config import Settings
from runner.domain import RowStatus
from runner.errors import (
    ConfigError,
    LedgerError,
    OutputRefused,
    RunnerError,
    RunStopped,
    as_nothing_sent,
    runner_error_of,
)
from runner.guard.confirm import asks, confirm, summary_lines
from runner.guard.gate import before_sending
from runner.jobs import Job
from runner.jobs.split import split_if_asked
from runner.ledger import RunSpec, utcnow
from runner.metrics import RunEnd
from runner.money import format_amount
from runner.preflight import preflight
from runner.progress import NoProgress
from runner.providers.base import Provider
from runner.providers.factory import open_provider
from runner.report import check_group_by
from runner.run.attempt import Attempts
from runner.run.cards import Cards, open_cards
from runner.run.check import (
    busiest,
    check_amounts,
    check_outputs,
    duplicates,
    fee_model,
    fmt,
)
from runner.run.finish import (
    Ending,
    RunProgress,
    RunResult,
    Tally,
    mark_stopped,
    settle_pending,
    write_outputs,
)
from runner.run.policy import RECONCILE_GRACE, Policy
from runner.run.rates import keep_learned, start_at_learned
from runner.run.record import RunRecord, ledger_where, open_for
from runner.run.resume import (
    WorkLeft,
    choose_run_key,
    derive_run_key,
    run_spec,
    same_run_or_refuse,
    work_left,
)
from runner.run.workers import Workers
from runner.scheduler import lower_bound

if TYPE_CHECKING:
    from runner.audit import AuditResult

log = structlog.get_logger("runner.run")


async def run_job(
    job: Job,
    settings: Settings,
    progress: RunProgress | None = None,
    *,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] | None = None,
    end: RunEnd | None = None,
) -> RunResult:
    """Run `job` as `settings` say: every row topped up at most once, the report written.

    `env` holds the secrets (default: the process's environment); `clock` is the run's
    monotonic clock in seconds (default: the event loop's), the one its cooldowns, rate and
    waits are measured on. `end` is filled in with what the command's exit tells (its
    metrics and notifications), however the run ends; the metrics file is written there,
    once, with the exit code.
    """
    env = os.environ if env is None else env
    run = JobRun(job, settings, progress or NoProgress(), env, end or RunEnd(job.path.stem))
    return await run.run(clock or asyncio.get_running_loop().time)


class JobRun:
    """One run of one job against one provider; `await run()` once."""

    def __init__(
        self,
        job: Job,
        settings: Settings,
        progress: RunProgress,
        env: Mapping[str, str],
        end: RunEnd,
    ) -> None:
        self.job = job
        self.settings = settings
        self.end = end
        self.env = env
        self.progress = progress
        self.tally = Tally(progress)
        self.run_key = settings.run_key or derive_run_key(job, settings)
        end.provider, end.run_key = settings.provider, self.run_key
        self.workers: Workers | None = None
        self.fatal: RunnerError | None = None
        self.approved: list[str] = []  # who approved it, for the confirmation

    async def run(self, clock: Callable[[], float]) -> RunResult:
        settings = self.settings
        self.job = job = split_if_asked(self.job, settings.provider, settings.split_over_max)
        check_amounts(job, settings.provider)
        if settings.group_by is not None:
            check_group_by(settings.group_by, job.extra_columns)  # before anything is sent
        with ExitStack() as stack:
            ledger = open_for(ledger_where(settings, self.env, stack), stack)
            record = RunRecord(ledger, self.run_key)
            if record.shared and settings.is_sandbox:
                raise ConfigError(
                    "ledger: a shared ledger needs a provider every worker reaches; the built-in "
                    "sandbox lives inside one process (start `topup-runner sandbox` and use "
                    "--provider uncash --base-url)"
                )
            record.run_key = self.run_key = await choose_run_key(ledger, job, settings)
            try:
                check_outputs(settings, self.run_key, job.path)  # before any topup: exit 2
            except OutputRefused as exc:
                if "--metrics-file" in exc.options:
                    self.end.metrics_file = None  # refused: not written at the exit either
                raise
            if self.run_key != (settings.run_key or derive_run_key(job, settings)):
                log.warning(
                    "run.same_job_found",
                    run_key=self.run_key,
                    message="this job already ran on this target under this key: resuming it, "
                    "so nothing is paid twice (pass a new --run-key to pay it again on purpose)",
                )
            self.end.run_key = self.run_key
            record.lock()
            structlog.contextvars.bind_contextvars(run_key=self.run_key)
            try:
                return await self._run_locked(record, clock)
            except (RunnerError, ExceptionGroup) as exc:
                error = runner_error_of(exc)
                if error is None:
                    raise
                await self._note_end(record)
                exit_error = self._exit_error(error)
                if exit_error is exc:
                    raise
                raise exit_error from exc
        raise AssertionError("unreachable")  # pragma: no cover  (ExitStack swallows nothing)

    def _stopping(self) -> bool:
        return self.workers is not None and bool(self.workers.stopping)

    def _exit_error(self, error: RunnerError) -> RunnerError:
        """The error the run exits with: once a topup was sent, whatever stopped the run is
        RunStopped (exit 1); before, a provider that cannot be used is ProviderUnavailable
        (69), not the "rows failed" of a ProviderError's 1."""
        if self.tally.sent:
            if isinstance(error, RunStopped):
                return error
            # Exit 2, 3 and 69 say nothing was sent: not true any more.
            return RunStopped(error, sent=self.tally.sent, run_key=self.run_key)
        return as_nothing_sent(error)

    async def _note_end(self, record: RunRecord) -> None:
        """What the exit tells of a run stopped by an error: its rows as the ledger has them."""
        self.end.sent = self.tally.sent
        try:
            self.end.totals = await record.totals()
        except (RunnerError, OSError):
            self.end.totals = None  # the error being raised matters more than these figures

    async def _run_locked(self, record: RunRecord, clock: Callable[[], float]) -> RunResult:
        settings, job = self.settings, self.job
        spec = run_spec(job, settings, self.run_key)
        existing = await record.find_run()
        if existing is not None:
            same_run_or_refuse(record, existing, spec, "choose a new run key")
        # Caps, approvals and repeats: refused here, the provider has had no request.
        self.approved = await before_sending(
            record.ledger, job, settings, self.run_key, resuming=existing is not None, env=self.env
        )
        left = await work_left(record, job, existing is not None)
        hold = max(settings.cooldown, RECONCILE_GRACE)
        cards = open_cards(record, settings, job.rows, hold, clock)
        started = utcnow()
        lb = lower_bound(len(left.rows), busiest(left.rows), settings.rate_limit, settings.cooldown)
        audit: AuditResult | None = None
        if left.rows or settings.audit:
            async with open_provider(
                settings, (r.card_id for r in left.rows), cards.pacer, env=self.env
            ) as (provider, base_url):
                await start_at_learned(record.ledger, settings, cards.pacer)
                log.info(
                    "run.started",
                    rows=len(job.rows),
                    rows_to_do=len(left.rows),
                    base_url=base_url,
                    rate_limit=settings.rate_limit,
                    cooldown=settings.cooldown,
                    concurrency=settings.concurrency,
                    lower_bound_s=round(lb, 3),
                )
                if left.rows:
                    try:
                        await self._send(
                            record, provider, cards, left, spec, existing is None, clock
                        )
                    finally:
                        await keep_learned(record.ledger, settings, cards.pacer)
                if settings.audit and self.fatal is None and not self._stopping():
                    from runner.audit.atrun import audit_at_end

                    audit = await audit_at_end(
                        record.ledger,
                        self.run_key,
                        provider,
                        settings,
                        resumed=existing is not None,
                    )
        workers = self.workers
        try:
            if workers is not None:
                await mark_stopped(record, workers.in_doubt, workers.unsent)
        except LedgerError as exc:
            # A ledger that stopped taking writes (a full disk) keeps the attempts open: the
            # next run reconciles them all the same. The report is still worth writing.
            self.fatal = self.fatal or exc
        stopped = None if workers is None else workers.stopping
        ending = Ending(
            started,
            lb,
            stopped,
            complete=not stopped and self.fatal is None,
            rate_used=cards.pacer.used(),
        )
        if audit is not None:
            from runner.audit.output import summary_lines

            ending = dataclasses.replace(ending, audit=summary_lines(audit))
        # The metrics are written by the command's exit, with its exit code (runner.cli).
        result = await write_outputs(record, job, settings, self.tally, ending, clock)
        if audit is not None:
            from runner.audit.atrun import folded

            result = await folded(result, audit)
        end = self.end
        end.report, end.makespan, end.stopped = result.report, result.makespan, result.stopped
        end.chain_head = result.chain_head
        await self._note_end(record)
        if self.fatal is not None:
            raise self.fatal
        return result

    async def _send(
        self,
        record: RunRecord,
        provider: Provider,
        cards: Cards,
        left: WorkLeft,
        spec: RunSpec,
        new: bool,
        clock: Callable[[], float],
    ) -> None:
        """Preflight what is left, record the run if it is new, then send until done."""
        settings, job = self.settings, self.job
        fresh = left.fresh_rows
        twice = duplicates(fresh)
        if twice:
            log.warning("job.duplicates", rows=twice[:20], groups=len(twice))
        fees = fee_model(settings, await record.fee_samples(settings.provider))
        report = await preflight(
            provider, fresh, allow_partial=settings.allow_partial, fees=fees, currency=job.currency
        )
        # Preflight's own dict when it is one (it is not used again): no second copy of a
        # snapshot per card.
        snapshots = report.cards if isinstance(report.cards, dict) else dict(report.cards)
        log.info(
            "preflight.ok",
            wallet_balance=fmt(report.wallet_balance),
            total_amount=format_amount(report.total_amount),
            estimated_fees=fmt(report.estimated_fees),
            fee_source=report.fee_source,
            cards=len(report.cards),
            set_aside=len(report.set_aside),
        )
        if asks(settings):
            lines = summary_lines(settings, len(fresh), report, self.run_key, self.approved)
            confirm(lines, len(fresh), progress=self.progress)
        if new:
            await record.create_run(spec, job.rows)
            # Another worker may have recorded the run first: it must be this job, this target.
            advice = "every worker of a run needs the same job file and provider"
            same_run_or_refuse(record, await record.find_run(), spec, advice)
        self.progress.start(len(job.rows), len(job.rows) - len(left.rows))
        await record.close_untouched(report.set_aside.items(), RowStatus.FAILED, utcnow())
        for _ in report.set_aside:
            self.tally.row_final(RowStatus.FAILED)
        policy = Policy.of(
            max_attempts=settings.max_attempts,
            cooldown=settings.cooldown,
            timeout=settings.timeout,
            apply_grace=settings.apply_grace,
        )
        attempts = Attempts(
            provider, record, policy, self.tally, snapshots, clock=clock, hold=cards.hold
        )
        self.workers = workers = Workers(
            cards,
            attempts,
            self.tally,
            cooldown=settings.cooldown,
            concurrency=settings.concurrency,
            rows=len(job.rows),
            stop_grace=settings.timeout + 5.0,
            clock=clock,
        )
        cards.begin(workers, left, report.set_aside)
        await workers.run()
        self.fatal = workers.fatal
        if not workers.stopping and workers.fatal is None:
            await settle_pending(
                record, provider, settings, self.tally, clock, lambda: bool(workers.stopping)
            )
