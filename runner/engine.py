"""Runs a job: preflight, dispatch under the scheduler's rules, every outcome into the ledger.

`--concurrency` long-lived workers take turns choosing what goes next (`runner.scheduler`),
one chooser at a time as a single dispatch loop would; each sends its row and records what came
back. An intent is committed before its request goes; an outcome is posted to the ledger and
goes out with the next commit (a lost one leaves the attempt open for the next run to
reconcile). A row's fate is decided here by the outcome's type, never by reading messages, and
an unknown outcome is always reconciled from provider state before the row is touched again.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread
import numpy as np
import structlog

from runner.config import Settings, normalize_target
from runner.config import target_of as config_target_of
from runner.domain import JobRow, RowStatus, RunInfo
from runner.errors import (
    AuthenticationFailed,
    ConfigError,
    JobInvalid,
    LedgerError,
    Problem,
    ProviderError,
    RunnerError,
    RunStopped,
)
from runner.jobs import Job
from runner.ledger import (
    Ledger,
    OpenAttempt,
    PendingRow,
    ProviderEvent,
    RunFacts,
    RunSpec,
    is_postgres_url,
    open_ledger,
    utcnow,
)
from runner.logs import row_logger
from runner.metrics import RunMetrics, write_metrics
from runner.money import format_amount
from runner.preflight import (
    FeeModel,
    check_amount_rules,
    duplicate_rows,
    fit_fee_model,
    preflight,
)
from runner.progress import NoProgress
from runner.providers.base import (
    Applied,
    CardState,
    CardStatus,
    NotApplied,
    Refused,
    RetryKind,
    RetryLater,
    StillPending,
    Unknown,
)
from runner.providers.factory import open_provider, rules_for
from runner.report import failed_rows_path_for, write_failed_rows, write_report
from runner.sandbox.config import SandboxConfig
from runner.scheduler import Dispatcher, Pacer, backoff_delay, lower_bound

if TYPE_CHECKING:
    from runner.ledger.leases import SharedRun

log = structlog.get_logger("runner.engine")

# A provider that keeps answering "wait" for one row is not making progress: give up on
# the row after this many waits rather than loop for ever.
MAX_WAITS_PER_ROW = 50
# A refusal that says "wait N seconds" is honoured with a little slack for clock skew.
WAIT_SLACK = 0.05
# How often a worker of a shared run with no card left looks at the cards others hold (s).
IDLE_POLL = 0.5
# How often a run logs `run.progress` (per-row success events are debug in JSON mode).
PROGRESS_EVERY = 10.0


def default_ledger_path(env: Mapping[str, str]) -> Path:
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "topup-runner" / "ledger.sqlite"


def target_of(settings: Settings) -> str:
    """What a run is bound to besides the job: the platform and its API root, normalised so
    that every spelling of one target is one target (`runner.config.target_of`)."""
    return config_target_of(settings.provider, settings.base_url)


def derive_run_key(job: Job, settings: Settings) -> str:
    """The key of a job run without one: from the rows and the target alone. The file's name
    is left out on purpose: a copy of the file under another name is the same payroll, and
    two processes starting it at once must meet on one key (and one lock)."""
    digest = hashlib.sha256(f"{target_of(settings)}\n{job.content_digest}".encode()).hexdigest()
    return f"job-{digest[:12]}"


def same_job_runs(ledger: Ledger, job: Job, settings: Settings) -> list[RunSpec]:
    """Runs in the ledger of this exact job (its content digest) on this target, whatever
    their key, the file's name or the spelling of the base URL they were started with."""
    target = target_of(settings)
    return [
        spec
        for spec in ledger.runs_with_digest(job.content_digest)
        if normalize_target(spec.base_url) == target
    ]


def choose_run_key(ledger: Ledger, job: Job, settings: Settings) -> str:
    """The run key a run of `job` takes: the operator's, else the one run of this job already
    in the ledger (resumed, so nothing is paid twice), else a new key derived from content.

    Several runs of this job on this target (each started under an explicit key) leave no
    safe choice: refused, naming them.
    """
    if settings.run_key:
        return settings.run_key
    found = same_job_runs(ledger, job, settings)
    if not found:
        return derive_run_key(job, settings)
    if len(found) == 1:
        return found[0].run_key
    keys = ", ".join(repr(spec.run_key) for spec in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    raise ConfigError(
        f"ledger {ledger.name} holds {len(found)} runs of this exact job on "
        f"{target_of(settings)} ({keys}{more}): pass --run-key to resume one of them, or a new "
        "key to pay the job again on purpose; nothing was sent"
    )


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

    @property
    def exit_code(self) -> int:
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


@dataclass(slots=True)
class _Work:
    """A row on its way: what this process knows of it between attempts."""

    job_row: JobRow
    sent: int = 0  # topup requests recorded for the row, by any process
    spent: int = 0  # of the retry budget (transient failures, proven non-applications)
    waits: int = 0  # cooldown and rate-limit refusals (cost no budget)
    unresolved: OpenAttempt | None = None  # an attempt whose outcome is not known yet
    # When (this process's clock) a reading first showed the unresolved attempt not applied
    # after the provider could no longer apply it: a second such reading proves it.
    not_applied_at: float | None = None


class JobRunner:
    """One run of one job against one provider; `await run()` once."""

    def __init__(
        self,
        job: Job,
        settings: Settings,
        *,
        env: Mapping[str, str] | None = None,
        sandbox_config: SandboxConfig | None = None,
        clock: Callable[[], float] = anyio.current_time,
        handle_signals: bool = True,
        stop_grace: float | None = None,
        reconcile_grace: float = 1.0,
        settle_poll: float = 1.0,
        backoff_base: float = 0.5,
        progress: RunProgress | None = None,
    ) -> None:
        self.job = job
        self.settings = settings
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.sandbox_config = sandbox_config
        self.clock = clock
        self.handle_signals = handle_signals
        self.stop_grace = settings.timeout + 5.0 if stop_grace is None else stop_grace
        self.reconcile_grace = reconcile_grace
        # How long after it is sent a request may still be applied by the provider: its
        # timeout plus the grace the operator allows for a provider still processing it.
        self._apply_window = settings.timeout + settings.apply_grace
        # The gap between the two readings that must agree before "not applied" is believed.
        self._confirm_gap = min(1.0, max(0.05, settings.apply_grace / 10))
        self.settle_poll = settle_poll
        self.backoff_base = backoff_base
        self.progress: RunProgress = progress or NoProgress()
        self.run_key = settings.run_key or derive_run_key(job, settings)
        self.sent = 0
        self._stopping: str | None = None
        self._fatal: RunnerError | None = None
        self._in_flight = 0
        self._changed: anyio.Event | None = None  # set when the waiting chooser should look
        # asyncio's lock, not anyio's: taken once a topup, and anyio's looks the current task
        # up twice each time (a few percent of an unlimited run's CPU).
        self._choosing = asyncio.Lock()
        self._workers: anyio.abc.TaskGroup | None = None
        self._cards: dict[str, CardState] = {}
        self._stale: set[str] = set()
        # When the first and the latest applied topup were seen (the run's makespan).
        self._first_applied: float | None = None
        self._last_applied = 0.0
        # The cooldown measured from an answer: the gap a card's rows really have between them.
        self._dispatcher: Dispatcher[JobRow | _Work] = Dispatcher(settings.cooldown)
        # What an earlier process left of rows not yet taken: attempts sent, attempts open.
        self._sent_before: dict[int, int] = {}
        self._open_before: dict[int, OpenAttempt] = {}
        self._in_doubt: dict[int, _Work] = {}
        self._final: Counter[RowStatus] = Counter()  # rows this process brought to a status
        self._log_row: Callable[..., Any] = log.info
        self._rows_logged = True  # False when row events are filtered out (no need to format)
        # A shared (PostgreSQL) ledger: this worker's cards, claimed as it goes.
        self._shared: SharedRun | None = None
        self._feeding = False  # more cards may still be claimed
        self._feed_wake: anyio.Event | None = None
        self._rows_by_number: dict[int, JobRow] = {}
        self._set_aside_rows: Mapping[int, str] = {}

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> RunResult:
        if self.clock is anyio.current_time:
            # The same clock without anyio's backend lookup on every call (several a request).
            self.clock = asyncio.get_running_loop().time
        self._log_row, self._rows_logged = row_logger(log)
        settings = self.settings
        rules = rules_for(settings.provider)
        bad = check_amount_rules(self.job.rows, rules.min_amount, rules.max_amount)
        if bad:
            raise JobInvalid(
                [Problem(str(self.job.path), why, row.row, "amount") for row, why in bad[:50]],
                truncated=max(0, len(bad) - 50),
            )
        with ExitStack() as stack:
            ledger = open_ledger(self._ledger_where(stack))
            stack.callback(ledger.close)
            if ledger.shared and settings.is_sandbox:
                raise ConfigError(
                    "ledger: a shared ledger needs a provider every worker reaches; the built-in "
                    "sandbox lives inside one process (start `topup-runner sandbox` and use "
                    "--provider uncash --base-url)"
                )
            self.run_key = choose_run_key(ledger, self.job, settings)
            if self.run_key != (settings.run_key or derive_run_key(self.job, settings)):
                log.warning(
                    "run.same_job_found",
                    run_key=self.run_key,
                    message="this job already ran on this target under this key: resuming it, "
                    "so nothing is paid twice (pass a new --run-key to pay it again on purpose)",
                )
            ledger.lock(self.run_key)
            self.ledger = ledger
            structlog.contextvars.bind_contextvars(run_key=self.run_key)
            try:
                return await self._run_locked(ledger)
            except RunnerError as exc:
                if self.sent and not isinstance(exc, RunStopped):
                    # Exit 2 and 3 say nothing was sent: not true any more.
                    raise RunStopped(exc, sent=self.sent, run_key=self.run_key) from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover  (ExitStack swallows nothing)

    def _ledger_where(self, stack: ExitStack) -> str | Path:
        """The ledger's path, or its URL when it is a database server's."""
        if self.settings.ledger:
            if is_postgres_url(self.settings.ledger):
                return self.settings.ledger
            return Path(self.settings.ledger).expanduser()
        if self.settings.is_sandbox:
            # A sandbox's state dies with the run, so its ledger does too unless asked to keep it.
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="topup-sandbox-"))
            return Path(tmp) / "ledger.sqlite"
        return default_ledger_path(self.env)

    async def _run_locked(self, ledger: Ledger) -> RunResult:
        settings = self.settings
        job = self.job
        spec = RunSpec(
            run_key=self.run_key,
            provider=settings.provider,
            base_url=target_of(settings),
            job_file=str(job.path),
            job_digest=job.content_digest,
            extra_columns=job.extra_columns,
            row_count=len(job.rows),
        )
        existing = await ledger.call(ledger.find_run, self.run_key)
        if existing is not None:
            self._same_run_or_refuse(ledger, existing, spec, "choose a new run key")
        last_sent: dict[str, datetime] = {}
        todo_rows: Sequence[JobRow]
        if existing is None:
            todo_rows = job.rows  # not a copy: a million rows are 8 MB of references
            open_attempts: dict[int, OpenAttempt] = {}
            sent_so_far: dict[int, int] = {}
        else:
            last_sent = await ledger.call(ledger.last_attempts, self.run_key)
            progress = await ledger.call(ledger.progress, self.run_key)
            found = await ledger.call(ledger.open_attempts, self.run_key)
            open_attempts = {a.row: a for a in found}
            todo_rows = [
                r
                for r in job.rows
                if r.row in open_attempts
                or (r.row in progress and progress[r.row].status is RowStatus.NOT_ATTEMPTED)
            ]
            sent_so_far = {row: p.attempts for row, p in progress.items()}
            for row in open_attempts.values():
                sent_so_far[row.row] = max(sent_so_far.get(row.row, 0), row.attempt)
            log.info(
                "run.resuming",
                rows_left=len(todo_rows),
                in_doubt=len(open_attempts),
                rows=len(job.rows),
            )

        pacer = self._pacer(ledger)
        self.pacer = pacer
        started = utcnow()
        counts_rows = (
            [r for r in todo_rows if r.row not in open_attempts] if open_attempts else todo_rows
        )
        busiest = _busiest(todo_rows)
        lb = lower_bound(len(todo_rows), busiest, settings.rate_limit, settings.cooldown)
        makespan: float | None = None
        if todo_rows:
            async with open_provider(
                settings,
                (r.card_id for r in todo_rows),
                pacer,
                env=self.env,
                sandbox_config=self.sandbox_config,
            ) as (provider, base_url):
                self.provider = provider
                log.info(
                    "run.started",
                    rows=len(job.rows),
                    rows_to_do=len(todo_rows),
                    base_url=base_url,
                    rate_limit=settings.rate_limit,
                    cooldown=settings.cooldown,
                    concurrency=settings.concurrency,
                    lower_bound_s=round(lb, 3),
                )
                duplicates = _duplicate_rows(counts_rows)
                if duplicates:
                    log.warning("job.duplicates", rows=duplicates[:20], groups=len(duplicates))
                fees = fee_model(settings, await ledger.call(ledger.fee_samples, settings.provider))
                report = await preflight(
                    provider, counts_rows, allow_partial=settings.allow_partial, fees=fees
                )
                # Preflight's own dict when it is one (it is not used again): no second copy of
                # a snapshot per card.
                cards = report.cards
                self._cards = cards if isinstance(cards, dict) else dict(cards)
                log.info(
                    "preflight.ok",
                    wallet_balance=_fmt(report.wallet_balance),
                    total_amount=format_amount(report.total_amount),
                    estimated_fees=_fmt(report.estimated_fees),
                    fee_source=report.fee_source,
                    cards=len(report.cards),
                    set_aside=len(report.set_aside),
                )
                if existing is None:
                    await ledger.call(ledger.create_run, spec, job.rows)
                    if ledger.shared:
                        await self._check_same_run(ledger, spec)
                self.progress.start(len(job.rows), len(job.rows) - len(todo_rows))
                await self._set_aside(report.set_aside)
                if ledger.shared:
                    # Rows come as this worker claims their cards (`_feed`).
                    self._set_aside_rows = report.set_aside
                    self._rows_by_number = {r.row: r for r in job.rows}
                else:
                    hold = self._cooldowns_left(last_sent)
                    self._sent_before = {row: n for row, n in sent_so_far.items() if n}
                    self._open_before = open_attempts
                    for r in todo_rows:
                        if r.row in report.set_aside:
                            continue
                        self._dispatcher.add(r.card_id, r, r.row, hold.get(r.card_id, -math.inf))
                await self._dispatch_all()
                if not self._stopping and self._fatal is None:
                    await self._settle_pending()
                if self._first_applied is not None:
                    makespan = self._last_applied - self._first_applied
        try:
            await self._mark_in_doubt()
        except LedgerError as exc:
            # A ledger that stopped taking writes (a full disk) keeps the attempts open: the
            # next run reconciles them all the same. The report is still worth writing.
            self._fatal = self._fatal or exc
        counts = await ledger.call(ledger.status_counts, self.run_key)
        if not self._stopping and self._fatal is None and counts[RowStatus.NOT_ATTEMPTED] == 0:
            await ledger.call(ledger.finish_run, self.run_key)
        output = settings.output or Path(f"{self.run_key}.xlsx")
        if ledger.shared:
            info = await self._shared_run_info(ledger)
        else:
            info = RunInfo(
                run_key=self.run_key,
                provider=settings.provider,
                job_file=str(job.path),
                started_at=started,
                finished_at=utcnow(),
                extra_columns=job.extra_columns,
                notes=self._notes(makespan, lb),
            )
        # A million-row report takes a while (see the README's performance section): say so.
        log.info("report.writing", report=str(output), rows=len(job.rows))
        writing = self.clock()
        await anyio.to_thread.run_sync(write_report, output, ledger.records(self.run_key), info)
        log.info("report.written", report=str(output), seconds=round(self.clock() - writing, 1))
        failed_file = failed_rows_path_for(output)
        failed = await anyio.to_thread.run_sync(
            write_failed_rows,
            failed_file,
            ledger.records(self.run_key, RowStatus.FAILED),
            job.extra_columns,
        )
        result = RunResult(
            run_key=self.run_key,
            provider=settings.provider,
            report=output,
            counts=counts,
            sent=self.sent,
            makespan=makespan,
            lower_bound=lb,
            stopped=self._stopping,
        )
        log.info(
            "run.finished",
            report=str(output),
            sent=self.sent,
            makespan_s=None if makespan is None else round(makespan, 3),
            lower_bound_s=round(lb, 3),
            makespan_ratio=_ratio(makespan, lb),
            stopped=self._stopping,
            failed_rows_job=str(failed_file) if failed else None,
            **{f"rows_{s.value}": n for s, n in counts.items()},
        )
        if settings.metrics_file is not None:
            totals = await ledger.call(ledger.totals, self.run_key)
            metrics = RunMetrics(
                job=job.path.stem,
                provider=settings.provider,
                run_key=self.run_key,
                totals=totals,
                duration=(utcnow() - started).total_seconds(),
                exit_code=result.exit_code,
                finished=utcnow(),
            )
            await anyio.to_thread.run_sync(write_metrics, settings.metrics_file, metrics)
        if self._fatal is not None:
            raise self._fatal
        return result

    def _pacer(self, ledger: Ledger) -> Pacer:
        """The rate limit: this process's own, or the run's, shared by every worker."""
        if not ledger.shared:
            return Pacer(self.settings.rate_limit, clock=self.clock)
        from runner.ledger.leases import SharedPacer, SharedRun
        from runner.ledger.postgres import PostgresLedger

        assert isinstance(ledger, PostgresLedger)
        self._shared = SharedRun(ledger, self.run_key, lease=self.settings.lease, clock=self.clock)
        log.info("worker.joined", worker=self._shared.owner, ledger=ledger.name)
        return SharedPacer(self.settings.rate_limit, ledger, self.run_key, clock=self.clock)

    async def _check_same_run(self, ledger: Ledger, spec: RunSpec) -> None:
        """Another worker may have recorded the run first: it must be this job, this target."""
        found = await ledger.call(ledger.find_run, self.run_key)
        advice = "every worker of a run needs the same job file and provider"
        self._same_run_or_refuse(ledger, found, spec, advice)

    def _same_run_or_refuse(
        self, ledger: Ledger, found: RunSpec | None, spec: RunSpec, advice: str
    ) -> None:
        """A run key may only go on with the job and target it was recorded with."""
        if (
            found is not None
            and found.job_digest == spec.job_digest
            and normalize_target(found.base_url) == spec.base_url
        ):
            return
        raise LedgerError(
            f"run key {self.run_key!r} in {ledger.name} belongs to another job or provider "
            f"({found.job_file if found else '?'} on {found.base_url if found else '?'}): "
            f"{advice}"
        )

    async def _feed(self) -> None:
        """Claim cards while any are left (`_claim_cards`); on a ledger that cannot be used,
        stop cleanly as a worker does: what was not committed stays open, to be reconciled by
        whoever takes the cards."""
        shared = self._shared
        assert shared is not None
        try:
            await self._claim_cards(shared)
        except RunnerError as exc:
            self._fatal = self._fatal or exc
            self._stop(f"error: {exc}")
        finally:
            self._feeding = False
            self._wake_chooser()

    async def _claim_cards(self, shared: SharedRun) -> None:
        """The busiest free cards first, a few at a time, enough in hand to fill every request
        slot across a cooldown. Then wait while other workers hold cards: should one die, its
        leases run out and its cards come here."""
        settings = self.settings
        target = min(
            1000,
            2 * settings.concurrency + math.ceil((settings.rate_limit or 0) * settings.cooldown),
        )
        # How often a worker with no card left looks again at the cards others hold.
        idle_poll = min(settings.lease / 4, IDLE_POLL)
        while not self._stopping:
            await shared.commit_finished()
            if shared.in_hand <= target // 2:
                cards = await shared.claim(target - shared.in_hand)
                if cards:
                    await self._take_cards(cards)
                    continue
                if not shared.held:
                    left = await shared.cards_left()
                    if left.free == 0 and left.held_by_others == 0:
                        return
                    wait = idle_poll
                    if left.soonest_expiry is not None:
                        wait = min(wait, left.soonest_expiry + 0.05)
                    if left.free:
                        wait = 0.05  # freed meanwhile, or taken by a faster worker
                    await self._feeder_sleep(max(wait, 0.01))
                    continue
            await self._feeder_sleep(settings.lease / 4)

    async def _feeder_sleep(self, seconds: float) -> None:
        self._feed_wake = wake = anyio.Event()
        with anyio.move_on_after(seconds):
            await wake.wait()
        self._feed_wake = None

    async def _take_cards(self, cards: list[str]) -> None:
        """Queue the rows of cards just claimed, as a resumed run would: what other workers
        sent counts, attempts they left open are reconciled first, cooldowns are honoured."""
        shared = self._shared
        assert shared is not None
        work = await shared.work_for(cards)
        hold = self._cooldowns_left(work.last_sent)
        opened = {a.row: a for a in work.open_attempts}
        queued: set[str] = set()
        for number in sorted(work.rows):
            row = self._rows_by_number.get(number)
            if row is None or number in self._set_aside_rows:
                continue
            if work.rows[number]:
                self._sent_before[number] = work.rows[number]
            if number in opened:
                self._open_before[number] = opened[number]
            self._dispatcher.add(row.card_id, row, number, hold.get(row.card_id, -math.inf))
            queued.add(row.card_id)
        # Another worker topped these up: what this one read at preflight is out of date.
        self._stale.update(work.last_sent)
        for card in cards:
            if card not in queued:
                shared.finished(card)
        self._wake_chooser()

    async def _keep_leases(self) -> None:
        shared = self._shared
        assert shared is not None
        await shared.keep_leases()
        if shared.lost is not None:
            self._fatal = self._fatal or shared.lost
            self._stop(f"error: {shared.lost}")

    async def _shared_run_info(self, ledger: Ledger) -> RunInfo:
        """The Summary of a shared run: the run as all workers did it, from the ledger, so
        that every worker writes the same report."""
        facts = await ledger.call(ledger.run_facts, self.run_key)
        settings, job = self.settings, self.job
        lb = lower_bound(len(job.rows), _busiest(job.rows), settings.rate_limit, settings.cooldown)
        spec = RunSpec(self.run_key, settings.provider, "", str(job.path), "", job.extra_columns, 0)
        return _info_from_facts(spec, facts, (("estimated minimum duration (s)", f"{lb:.1f}"),))

    async def _settle_pending(self) -> None:
        """Settle rows the provider accepted as pending: from webhook events already in the
        ledger, then, for up to --wait-settle seconds, by polling the provider."""
        ledger, provider_name = self.ledger, self.settings.provider
        deadline = self.clock() + self.settings.wait_settle
        while True:
            await ledger.call(ledger.settle_from_events, self.run_key, provider_name)
            pending = await ledger.call(ledger.pending, self.run_key)
            if not pending or self._stopping:
                break
            if self.clock() >= deadline:
                log.info("settle.waiting_ended", pending=len(pending))
                break
            limiter = anyio.CapacityLimiter(self.settings.concurrency)
            async with anyio.create_task_group() as tg:
                for row in pending:
                    tg.start_soon(self._poll_settlement, row, limiter)
            left = deadline - self.clock()
            still = await ledger.call(ledger.pending, self.run_key)
            if left > 0 and still:
                await anyio.sleep(min(self.settle_poll, left))

    async def _poll_settlement(self, row: PendingRow, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            final = await self.provider.settle(row.card_id, row.amount, row.provider_ref)
        if isinstance(final, StillPending):
            return
        if isinstance(final, Applied) and final.discrepancy is not None:
            # Settled, but not as it was sent: money moved, so never failed, never resent.
            why = f"the provider's record disagrees: {final.discrepancy}"
            log.warning("settle.discrepancy", row=row.row, card_id=row.card_id, error=why)
            await self.ledger.write(
                [
                    Ledger.row_update(
                        self.run_key,
                        row.row,
                        status=RowStatus.NEEDS_REVIEW,
                        finished_at=utcnow(),
                        error=why,
                    )
                ]
            )
            self._row_final(RowStatus.NEEDS_REVIEW)
            return
        status = RowStatus.SUCCEEDED if isinstance(final, Applied) else RowStatus.FAILED
        event = ProviderEvent(
            self.settings.provider,
            row.card_id,
            row.amount,
            row.provider_ref,
            status,
            final.fee if isinstance(final, Applied) else None,
            final.card_balance_after if isinstance(final, Applied) else None,
        )
        settled, _ = await self.ledger.call(self.ledger.apply_event, event)
        if settled:
            self._log_row("settle.polled", row=row.row, card_id=row.card_id, status=status.value)
            self._row_final(status)

    def _cooldowns_left(self, last_sent: Mapping[str, datetime]) -> dict[str, float]:
        """Cards an earlier process sent to recently: when, on our clock, each may go again.

        An attempt left open by a killed process is reconciled no sooner either, so a topup
        the platform was still processing has landed before its card is read.
        """
        now_wall, now = utcnow(), self.clock()
        wait = max(self.settings.cooldown, self.reconcile_grace)
        return {
            card: now + left
            for card, sent in last_sent.items()
            if (left := wait - (now_wall - sent).total_seconds()) > 0
        }

    def _notes(self, makespan: float | None, lb: float) -> tuple[tuple[str, str], ...]:
        notes = [
            ("topups sent by this process", str(self.sent)),
            ("estimated minimum duration (s)", f"{lb:.1f}"),
        ]
        if makespan is not None:
            notes.append(("first to last applied topup (s)", f"{makespan:.1f}"))
        if self._stopping:
            notes.append(("stopped", self._stopping))
        return tuple(notes)

    async def _set_aside(self, set_aside: Mapping[int, str]) -> None:
        if not set_aside:
            return
        now = utcnow()
        await self.ledger.write(
            [
                Ledger.close_untouched_row(self.run_key, row, RowStatus.FAILED, why, now)
                for row, why in set_aside.items()
            ]
        )
        for _ in set_aside:
            self._row_final(RowStatus.FAILED)

    async def _mark_in_doubt(self) -> None:
        """Rows whose last answer was lost when the run stopped: the resume will settle them."""
        if not self._in_doubt:
            return
        await self.ledger.write(
            [
                Ledger.close_untouched_row(
                    self.run_key,
                    row,
                    RowStatus.NEEDS_REVIEW,
                    "outcome unknown when the run stopped: rerun the same run key to settle it",
                    None,
                )
                for row in self._in_doubt
            ]
        )

    # -- dispatching ---------------------------------------------------------------------

    async def _dispatch_all(self) -> None:
        async with anyio.create_task_group() as outer:
            if self.handle_signals:
                outer.start_soon(self._watch_signals)
            outer.start_soon(self._log_progress)
            if self._shared is not None:
                self._feeding = True
                outer.start_soon(self._feed)
                outer.start_soon(self._keep_leases)
            async with anyio.create_task_group() as workers:
                self._workers = workers
                # One long-lived worker per request allowed in flight: no task per request.
                for _ in range(self.settings.concurrency):
                    workers.start_soon(self._work_loop)
            outer.cancel_scope.cancel()
        # Whatever is still queued was never sent: it stays not_attempted in the ledger.
        self._dispatcher.drain()
        if self._shared is not None:
            # Cards not finished go back at once: another worker takes them (and reconciles
            # what is in doubt) without waiting for the leases to run out.
            with anyio.CancelScope(shield=True):
                await self._shared.release()

    def _grace_deadline(self) -> None:
        """Requests in flight get `stop_grace` to finish once the run is stopping."""
        if self._workers is not None:
            deadline = self.clock() + self.stop_grace
            scope = self._workers.cancel_scope
            scope.deadline = min(scope.deadline, deadline)

    async def _log_progress(self) -> None:
        """Every PROGRESS_EVERY seconds, what the run has done so far (info, in every mode)."""
        started = last_at = self.clock()
        last_sent = self.sent
        while True:
            await anyio.sleep(PROGRESS_EVERY)
            now = self.clock()
            log.info(
                "run.progress",
                rows=len(self.job.rows),
                rows_left=self._dispatcher.queued,
                in_flight=self._in_flight,
                sent=self.sent,
                topups_per_s=round((self.sent - last_sent) / max(now - last_at, 1e-9), 1),
                elapsed_s=round(now - started, 1),
                **{f"rows_{status.value}": n for status, n in self._final.items()},
            )
            last_at, last_sent = now, self.sent

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._stopping:
                    log.warning("run.stop_now", signal=name)
                    if self._workers is not None:
                        self._workers.cancel_scope.cancel()
                else:
                    self._stop(f"{name} received")

    def _stop(self, reason: str) -> None:
        if self._stopping is None:
            self._stopping = reason
            log.warning(
                "run.stopping",
                reason=reason,
                in_flight=self._in_flight,
                grace_s=self.stop_grace,
            )
            self._grace_deadline()
        self._wake_chooser()
        self._wake_feeder()

    def _wake_feeder(self) -> None:
        if self._feed_wake is not None:
            self._feed_wake.set()

    def _wake_chooser(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _work_loop(self) -> None:
        """Take the next row that may go, take it one step, again, until none is left."""
        while True:
            # One worker at a time chooses, as one dispatch loop would: the others queue
            # behind it, so a rate slot wakes one worker, not all of them.
            async with self._choosing:
                taken = await self._choose()
            if taken is None:
                return
            await self._serve(*taken)

    async def _choose(self) -> tuple[str, _Work, float] | None:
        """The next (card, row, rate slot), waiting for the slot first so that the card is
        chosen at send time; None once nothing is left or the run is stopping."""
        dispatcher = self._dispatcher
        while not self._stopping and (len(dispatcher) or self._feeding):
            now = self.clock()
            wake_at = math.inf
            if dispatcher.queued:
                if self._shared is not None:
                    await self.pacer.refill()  # slots of the shared rate limit, when none held
                    now = self.clock()
                free_at = self.pacer.next_free()
                if free_at > now:
                    await anyio.sleep(free_at - now)
                    continue
                rate = self.pacer.current_rate
                taken = dispatcher.take(now, 1.0 / rate if rate else 0.0)
                if taken is not None:
                    card, item = taken
                    self._in_flight += 1
                    return str(card), self._work_of(item), self.pacer.reserve()
                wake_at = dispatcher.next_ready_at() or math.inf
            # Nothing may go now: wait for a row to come back or a card to be ready.
            self._changed = changed = anyio.Event()
            with anyio.move_on_after(max(0.0, wake_at - now) if wake_at < math.inf else None):
                await changed.wait()
            self._changed = None
        return None

    def _work_of(self, item: JobRow | _Work) -> _Work:
        """A queued row becomes a `_Work` only when it is taken: a million waiting rows cost
        the dispatcher a reference each, not an object each."""
        if isinstance(item, _Work):
            return item
        return _Work(
            item,
            sent=self._sent_before.pop(item.row, 0),
            unresolved=self._open_before.pop(item.row, None),
        )

    async def _serve(self, card: str, work: _Work, slot: float) -> None:
        ready_at = self.clock()
        put_back = False
        try:
            if self.pacer.rate is None:
                # Unlimited: the slot is "now" (or the end of a 429's pause), whoever asks.
                ready_at, put_back = await self._handle(card, work)
            else:
                # The slot reserved when the card was chosen goes to this step's first request.
                with self.pacer.prepaid(slot):
                    ready_at, put_back = await self._handle(card, work)
        except RunnerError as exc:
            # The provider or the ledger cannot be used at all: stop cleanly, keep the row.
            self._fatal = self._fatal or exc
            put_back = work.unresolved is None
            self._stop(f"error: {exc}")
        finally:
            if work.unresolved is not None:
                self._in_doubt[work.job_row.row] = work
            else:
                self._in_doubt.pop(work.job_row.row, None)
            self._dispatcher.release(
                card, ready_at, put_back=work if put_back else None, order=work.job_row.row
            )
            self._in_flight -= 1
            if self._shared is not None and not self._dispatcher.holds(card):
                if not self._stopping:
                    self._shared.finished(card)
                self._wake_feeder()
            self._wake_chooser()

    # -- one row, one step ---------------------------------------------------------------

    async def _handle(self, card: str, work: _Work) -> tuple[float, bool]:
        """Take the row one step further; returns when its card may go next and whether
        the row goes back in the queue."""
        row = work.job_row
        if work.unresolved is not None:
            verdict = await self._reconcile(card, work)
            if verdict is not None:
                return verdict
        before: CardState | None = None
        if self.provider.rules.reads_cards:
            # The snapshot preflight or the last answer left, without a coroutine to get it.
            before = self._cards.get(card)
            if before is None or card in self._stale:
                before = await self._snapshot(card)
            if before is None:
                self._finish(
                    work, RowStatus.FAILED, error="card_not_found: the card is no longer visible"
                )
                return self.clock(), False
            if before.status in (CardStatus.FROZEN, CardStatus.CLOSED):
                # Read again since preflight (after a lost answer, say) and no longer active:
                # a topup would be refused, and sending one only to learn that costs a wait.
                self._finish(
                    work,
                    RowStatus.FAILED,
                    error=f"card_inactive: the card is {before.status.value}: not sent",
                )
                return self.clock(), False

        if self._shared is not None:
            self._shared.check()  # never send on a card another worker may hold by now
        attempt = work.sent + 1
        sent_at = utcnow()
        settle_by = sent_at + timedelta(seconds=self._apply_window)
        intent = Ledger.intent(
            self.run_key, row.row, attempt, card, row.amount, before, sent_at, settle_by=settle_by
        )
        await self.ledger.write(intent)
        # From here until the outcome is recorded, the attempt is open in the ledger.
        work.sent = attempt
        work.not_applied_at = None
        work.unresolved = OpenAttempt(
            row.row, attempt, card, row.amount, before, sent_at, settle_by=settle_by
        )
        self.sent += 1
        sent_mono = self.clock()
        try:
            outcome = await self.provider.topup(card, row.amount)
        except AuthenticationFailed as exc:
            # Refused at the door: nothing was applied, so the attempt is closed, not in doubt.
            work.unresolved = None
            await self.ledger.write(
                [
                    Ledger.attempt_outcome(
                        self.run_key, row.row, attempt, "unauthorized", str(exc), utcnow()
                    )
                ]
            )
            raise
        received = self.clock()
        # The card's next request waits a full cooldown after this answer: the provider saw
        # this request no later than now, so the gap it measures can only be longer.
        cool = received + self.settings.cooldown

        if type(outcome) is Applied and (
            outcome.discrepancy is not None
            or (
                before is not None
                and outcome.card_balance_after is not None
                and outcome.card_balance_after != before.balance + row.amount
            )
        ):
            why = outcome.discrepancy
            if why is None:
                assert before is not None
                why = await self._balance_doubt(card, before, row.amount, outcome)
            if why:
                # The provider says it applied a topup, but not the one that was sent, or
                # not as the card's books show: believed neither way, never sent again.
                work.unresolved = None
                self._stale.add(card)
                log.warning(
                    "topup.discrepancy", row=row.row, card_id=card, attempt=attempt, error=why
                )
                fields = {**_applied_fields(outcome), "error": f"the answer disagrees: {why}"}
                self._finish(
                    work,
                    RowStatus.NEEDS_REVIEW,
                    attempt=attempt,
                    outcome="applied (discrepancy)",
                    **fields,
                )
                return cool, False

        if type(outcome) is Applied:
            work.unresolved = None
            if self._first_applied is None:
                self._first_applied = received
            if received > self._last_applied:
                self._last_applied = received
            if before is not None:
                self._cards[card] = _after(before, row.amount, outcome.card_balance_after)
            status = RowStatus.PENDING if outcome.pending else RowStatus.SUCCEEDED
            if self._rows_logged:
                self._log_row(
                    "topup.applied",
                    row=row.row,
                    card_id=card,
                    amount=format_amount(row.amount),
                    fee=_fmt(outcome.fee),
                    attempt=attempt,
                    pending=outcome.pending,
                )
            # What _finish would post, without its keyword plumbing: this is every topup.
            now = utcnow()
            self.ledger.post(
                (
                    Ledger.attempt_outcome(self.run_key, row.row, attempt, "applied", "", now),
                    _applied_update(self.run_key, row.row, status, now, outcome),
                )
            )
            self._final[status] += 1
            self.progress.row_final(status)
            return cool, False

        if isinstance(outcome, Refused):
            work.unresolved = None
            error = f"{outcome.code.value}: {outcome.message}"
            log.warning("topup.refused", row=row.row, card_id=card, attempt=attempt, error=error)
            self._finish(work, RowStatus.FAILED, attempt=attempt, outcome="refused", error=error)
            return cool, False

        if isinstance(outcome, RetryLater):
            work.unresolved = None
            self.ledger.post(
                [
                    Ledger.attempt_outcome(
                        self.run_key,
                        row.row,
                        attempt,
                        outcome.kind.value,
                        outcome.message,
                        utcnow(),
                    )
                ]
            )
            return await self._retry_later(card, work, outcome, received, cool)

        assert isinstance(outcome, Unknown)
        # Money may have moved. The attempt stays open in the ledger; the row goes back and
        # is reconciled, not resent, when its card's turn comes again.
        self._stale.add(card)
        log.warning(
            "topup.unknown", row=row.row, card_id=card, attempt=attempt, error=outcome.message
        )
        return max(cool, sent_mono + self.reconcile_grace), True

    async def _retry_later(
        self, card: str, work: _Work, outcome: RetryLater, received: float, cool: float
    ) -> tuple[float, bool]:
        row = work.job_row
        if outcome.kind in (RetryKind.COOLDOWN, RetryKind.RATE_LIMITED):
            work.waits += 1
            if work.waits > MAX_WAITS_PER_ROW:
                self._finish(
                    work,
                    RowStatus.FAILED,
                    error=f"gave up after {work.waits} refusals to wait: {outcome.message}",
                )
                return cool, False
            wait = outcome.after if outcome.after is not None else 1.0
            ready = received + wait * (1 + WAIT_SLACK) + WAIT_SLACK
            log.info(
                "topup.wait",
                row=row.row,
                card_id=card,
                kind=outcome.kind.value,
                wait_s=round(wait, 3),
            )
            return ready, True
        work.spent += 1
        if work.spent >= self.settings.max_attempts:
            self._finish(
                work,
                RowStatus.FAILED,
                error=f"gave up after {work.spent} attempts: {outcome.message}",
            )
            return cool, False
        delay = backoff_delay(work.spent, base=self.backoff_base)
        log.info(
            "topup.retry",
            row=row.row,
            card_id=card,
            attempt=work.sent,
            delay_s=round(delay, 3),
            error=outcome.message,
        )
        return max(cool, received + delay), True

    async def _reconcile(self, card: str, work: _Work) -> tuple[float, bool] | None:
        """Settle an attempt whose answer was lost. None: proven not applied, send it again
        now; else when the card may go next and whether the row goes back in the queue.

        "Not applied" is a verdict about the future too: the provider may still be working on
        a request its client gave up on. So it is only believed once the provider can no
        longer apply the attempt (its `settle_by`: sent + timeout + --apply-grace, recorded
        with the intent, so a later process keeps to it) and a second reading, taken after
        that, agrees. Until then the row waits, and its card with it.
        """
        pending = work.unresolved
        assert pending is not None
        row = work.job_row
        known = await self.ledger.call(self.ledger.known_refs, card)
        settled = await self.provider.reconcile(
            card, row.amount, pending.before, sent_at=pending.sent_at, known_refs=known
        )
        self._stale.add(card)
        if isinstance(settled, Applied):
            work.unresolved = None
            self._note_applied(self.clock())
            log.info("reconcile.applied", row=row.row, card_id=card, attempt=pending.attempt)
            if settled.discrepancy is not None:
                self._finish(
                    work,
                    RowStatus.NEEDS_REVIEW,
                    attempt=pending.attempt,
                    outcome="applied (discrepancy)",
                    **{
                        **_applied_fields(settled),
                        "error": f"the provider's record disagrees: {settled.discrepancy}",
                    },
                )
                return self.clock(), False
            self._finish(
                work,
                RowStatus.PENDING if settled.pending else RowStatus.SUCCEEDED,
                attempt=pending.attempt,
                outcome="applied (reconciled)",
                **_applied_fields(settled),
            )
            return self.clock(), False
        if isinstance(settled, NotApplied):
            left = (self._settle_by(pending) - utcnow()).total_seconds()
            if left > 0:
                # Not yet: the provider may still apply it. Read again once it cannot.
                work.not_applied_at = None
                log.info(
                    "reconcile.waiting",
                    row=row.row,
                    card_id=card,
                    attempt=pending.attempt,
                    wait_s=round(left, 3),
                )
                return self.clock() + left, True
            if work.not_applied_at is None:
                work.not_applied_at = self.clock()
                return self.clock() + self._confirm_gap, True
            work.unresolved = None
            work.not_applied_at = None
            work.spent += 1
            log.info("reconcile.not_applied", row=row.row, card_id=card, attempt=pending.attempt)
            self.ledger.post(
                [
                    Ledger.attempt_outcome(
                        self.run_key,
                        row.row,
                        pending.attempt,
                        "not_applied",
                        settled.message,
                        utcnow(),
                    )
                ]
            )
            if work.spent >= self.settings.max_attempts:
                self._finish(
                    work,
                    RowStatus.FAILED,
                    error=f"gave up after {work.spent} attempts: {settled.message}",
                )
                return self.clock(), False
            return None
        work.unresolved = None
        log.warning(
            "reconcile.unknown",
            row=row.row,
            card_id=card,
            attempt=pending.attempt,
            error=settled.message,
        )
        self._finish(
            work,
            RowStatus.NEEDS_REVIEW,
            attempt=pending.attempt,
            outcome="unknown",
            error=f"outcome could not be established: {settled.message}",
        )
        return self.clock(), False

    def _settle_by(self, attempt: OpenAttempt) -> datetime:
        """When the provider can no longer apply `attempt`: what its intent recorded, and
        never sooner than this process's own timeout and grace allow (a rerun may be given a
        longer --timeout than the process that sent it)."""
        own = attempt.sent_at + timedelta(seconds=self._apply_window)
        recorded = attempt.settle_by
        return own if recorded is None else max(own, recorded)

    async def _balance_doubt(
        self, card: str, before: CardState, amount: Decimal, outcome: Applied
    ) -> str:
        """Why an applied answer whose balance did not move by the amount is in doubt, or ""
        when the card's deposit (which spending does not lower) shows exactly this topup:
        the card was spent from meanwhile, which is no discrepancy."""
        said = outcome.card_balance_after
        assert said is not None
        try:
            now = await self.provider.get_card(card)
        except AuthenticationFailed:
            raise
        except ProviderError:
            now = None
        if now is not None:
            self._cards[card] = now
            self._stale.discard(card)
            if before.deposit is not None and now.deposit is not None:
                deposit_moved = now.deposit - before.deposit
                if deposit_moved == amount:
                    return ""
                return (
                    f"the card's balance went from {format_amount(before.balance)} to "
                    f"{format_amount(said)} and its deposit moved by "
                    f"{format_amount(deposit_moved)}, for a topup of {format_amount(amount)}"
                )
        return (
            f"the card's balance went from {format_amount(before.balance)} to "
            f"{format_amount(said)}, not by the topup's {format_amount(amount)}"
        )

    async def _snapshot(self, card: str) -> CardState | None:
        if card in self._cards and card not in self._stale:
            return self._cards[card]
        state = await self.provider.get_card(card)
        self._stale.discard(card)
        if state is None:
            self._cards.pop(card, None)
        else:
            self._cards[card] = state
        return state

    def _finish(
        self,
        work: _Work,
        status: RowStatus,
        *,
        attempt: int | None = None,
        outcome: str | None = None,
        **fields: Any,
    ) -> None:
        row = work.job_row.row
        now = utcnow()
        statements = []
        if attempt is not None and outcome is not None:
            detail = str(fields.get("error") or "")
            statements.append(
                Ledger.attempt_outcome(self.run_key, row, attempt, outcome, detail, now)
            )
        fields.setdefault("error", None)
        statements.append(
            Ledger.row_update(self.run_key, row, status=status, finished_at=now, **fields)
        )
        # Posted, not awaited: the row's worker moves on at once. Should the process die
        # before the next commit, the attempt is still open and the next run reconciles it.
        self.ledger.post(statements)
        self._row_final(status)

    def _note_applied(self, at: float) -> None:
        if self._first_applied is None:
            self._first_applied = at
        self._last_applied = max(self._last_applied, at)

    def _row_final(self, status: RowStatus) -> None:
        self._final[status] += 1
        self.progress.row_final(status)


def _applied_update(
    run_key: str, row: int, status: RowStatus, now: datetime, outcome: Applied
) -> tuple[str, Sequence[Any]]:
    """The row update of an applied topup: `_finish`'s, in the same order of fields."""
    if outcome.card_balance_before is None and outcome.provider_ref is None:
        return Ledger.row_update(
            run_key,
            row,
            status=status,
            finished_at=now,
            fee=outcome.fee,
            total_charged=outcome.total_charged,
            card_balance_after=outcome.card_balance_after,
            wallet_balance_after=outcome.wallet_balance_after,
            transaction_id=outcome.transaction_id,
            invoice_id=outcome.invoice_id,
            error=None,
        )
    return Ledger.row_update(
        run_key, row, status=status, finished_at=now, **_applied_fields(outcome), error=None
    )


def _applied_fields(outcome: Applied) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "fee": outcome.fee,
        "total_charged": outcome.total_charged,
        "card_balance_after": outcome.card_balance_after,
        "wallet_balance_after": outcome.wallet_balance_after,
        "transaction_id": outcome.transaction_id,
        "invoice_id": outcome.invoice_id,
    }
    if outcome.card_balance_before is not None:
        fields["card_balance_before"] = outcome.card_balance_before
    if outcome.provider_ref is not None:
        fields["provider_ref"] = outcome.provider_ref
    return fields


def _after(before: CardState, amount: Decimal, balance_after: Decimal | None) -> CardState:
    balance = balance_after if balance_after is not None else before.balance + amount
    return CardState(
        before.card_id,
        before.status,
        _shared_money(balance),
        None if before.deposit is None else _shared_money(before.deposit + amount),
        before.currency,
        before.limit,
    )


_SHARED_MONEY: dict[str, Decimal] = {}


def _shared_money(value: Decimal) -> Decimal:
    """One Decimal for equal amounts (by exact text) across cards' snapshots: 200,000 cards
    topped up alike otherwise hold 400,000 Decimals (80 MB) after their first topup."""
    text = str(value)
    shared = _SHARED_MONEY.get(text)
    if shared is not None:
        return shared
    if len(_SHARED_MONEY) < 4_096:
        _SHARED_MONEY[text] = value
    return value


def fee_model(settings: Settings, samples: list[tuple[Decimal, Decimal]]) -> FeeModel | None:
    """The fee estimate preflight uses: the configured rate, else one learned from the ledger."""
    if settings.fee_rate is not None:
        return FeeModel(Decimal(0), settings.fee_rate, f"--fee-rate {settings.fee_rate}")
    return fit_fee_model(samples)


def _duplicate_rows(rows: Sequence[JobRow]) -> list[list[int]]:
    """`duplicate_rows`, for a million rows too: only rows whose (card, amount, reference)
    hash occurs twice are grouped, so a job without duplicates costs one array of hashes
    rather than a dict of a million keys and a list each (over 200 MB)."""
    hashes = np.fromiter(
        (hash((r.card_id, r.amount, r.reference)) for r in rows), dtype=np.int64, count=len(rows)
    )
    hashes.sort()
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    if not len(repeated):
        return []
    again = set(repeated.tolist())
    return duplicate_rows(r for r in rows if hash((r.card_id, r.amount, r.reference)) in again)


def _job_stats(rows: Sequence[JobRow]) -> tuple[int, int, list[list[int]]]:
    """The busiest card's rows, how many cards, and the groups of rows pasted twice."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.card_id] = counts.get(r.card_id, 0) + 1
    return max(counts.values(), default=0), len(counts), _duplicate_rows(rows)


def _busiest(rows: Sequence[JobRow]) -> int:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.card_id] = counts.get(r.card_id, 0) + 1
    return max(counts.values(), default=0)


def _fmt(value: Decimal | None) -> str | None:
    return None if value is None else format_amount(value)


def _ratio(makespan: float | None, lb: float) -> float | None:
    if makespan is None or lb <= 0:
        return None
    return round(makespan / lb, 4)


async def check_job(
    job: Job,
    settings: Settings,
    *,
    env: Mapping[str, str] | None = None,
    sandbox_config: SandboxConfig | None = None,
) -> list[str]:
    """Validate and preflight a job without sending a topup; the lines `check` prints."""
    rules = rules_for(settings.provider)
    bad = check_amount_rules(job.rows, rules.min_amount, rules.max_amount)
    if bad:
        raise JobInvalid(
            [Problem(str(job.path), why, row.row, "amount") for row, why in bad[:50]],
            truncated=max(0, len(bad) - 50),
        )
    pacer = Pacer(settings.rate_limit)
    samples: list[tuple[Decimal, Decimal]] = []
    where: Path | str | None = settings.ledger
    if where is not None and not is_postgres_url(str(where)):
        where = Path(where).expanduser()  # noqa: ASYNC240  (no I/O: the home folder's name)
    if where is None and not settings.is_sandbox:
        where = default_ledger_path(os.environ if env is None else env)
    run_key = settings.run_key or derive_run_key(job, settings)
    if where is not None and (not isinstance(where, Path) or where.exists()):
        ledger = open_ledger(where, readonly=True)
        try:
            samples = await ledger.call(ledger.fee_samples, settings.provider)
            # The key `run` would take: an earlier run of this job is resumed, not repaid.
            run_key = await ledger.call(choose_run_key, ledger, job, settings)
        finally:
            ledger.close()
    fees = fee_model(settings, samples)
    stats: list[tuple[int, int, list[list[int]]]] = []

    async def describe() -> None:
        # What needs no provider is worked out on a thread while the provider answers
        # preflight: for a million rows, a second of the wait for its card listing.
        stats.append(await anyio.to_thread.run_sync(_job_stats, job.rows))

    async with (
        open_provider(
            settings, (r.card_id for r in job.rows), pacer, env=env, sandbox_config=sandbox_config
        ) as (provider, base_url),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(describe)
        report = await preflight(
            provider, job.rows, allow_partial=settings.allow_partial, fees=fees
        )
    busiest, cards, duplicates = stats[0]
    lb = lower_bound(len(job.rows), busiest, settings.rate_limit, settings.cooldown)
    label = "SANDBOX (no real money moves)" if settings.is_sandbox else settings.provider
    lines = [
        f"provider: {label} at {base_url}",
        f"job: {job.path}: {len(job.rows)} rows, {cards} cards, "
        f"busiest card {busiest} rows, total {format_amount(report.total_amount)}",
        f"wallet: {_fmt(report.wallet_balance) or 'not readable from ' + provider.name}; "
        + (
            f"estimated fees {format_amount(report.estimated_fees)} ({report.fee_source})"
            if report.estimated_fees is not None
            else "fees unknown in advance: they come on top of the amounts (see --fee-rate)"
        ),
        f"estimated minimum duration: {lb:.1f} s "
        f"(rate {settings.rate_limit or 'unlimited'}/s, cooldown {settings.cooldown:g} s)",
        f"run key: {run_key}",
    ]
    if report.set_aside:
        lines.append(f"set aside by preflight: {len(report.set_aside)} rows")
    for group in duplicates:
        lines.append(
            f"warning: {job.path}: rows {', '.join(map(str, group))} have the same card, "
            "amount and reference: pasted twice?"
        )
    lines.append("check passed: nothing was sent")
    return lines


def rewrite_report(ledger_where: Path | str, run_key: str, output: Path) -> Path:
    """Write a run's spreadsheet again from the ledger alone."""
    if isinstance(ledger_where, Path) and not ledger_where.exists():
        raise LedgerError(f"ledger {ledger_where}: no such file")
    ledger = open_ledger(ledger_where, readonly=True)
    try:
        spec = ledger.find_run(run_key)
        if spec is None:
            raise LedgerError(f"ledger {ledger.name}: no run with key {run_key!r}")
        info = _info_from_facts(spec, ledger.run_facts(run_key))
        return write_report(output, ledger.records(run_key), info)
    finally:
        ledger.close()


def _info_from_facts(
    spec: RunSpec, facts: RunFacts, notes: tuple[tuple[str, str], ...] = ()
) -> RunInfo:
    """A Summary from the ledger alone: the same whichever process writes it."""
    lines = [("topups sent (all processes)", str(facts.sent)), *notes]
    if facts.first_applied_at is not None and facts.last_applied_at is not None:
        span = (facts.last_applied_at - facts.first_applied_at).total_seconds()
        lines.append(("first to last applied topup (s)", f"{span:.1f}"))
    return RunInfo(
        run_key=spec.run_key,
        provider=spec.provider,
        job_file=spec.job_file,
        started_at=facts.created_at,
        finished_at=facts.last_finished_at,
        extra_columns=spec.extra_columns,
        notes=tuple(lines),
    )
