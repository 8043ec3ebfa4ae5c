"""Where a run starts from: its key, and from the ledger and the job the work left, the attempts
left open and the cooldowns still running when an earlier process (or another worker) stopped."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from runner.config import Settings, normalize_target
from runner.config import target_of as config_target_of
from runner.domain import JobRow, RowStatus
from runner.errors import ConfigError, LedgerError
from runner.jobs import Job
from runner.ledger import Ledger, OpenAttempt, RunSpec, utcnow
from runner.run.policy import RowState
from runner.run.record import RunRecord, runs_with_digest

log = structlog.get_logger("runner.run")


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


async def choose_run_key(ledger: Ledger, job: Job, settings: Settings) -> str:
    """The run key a run of `job` takes: the operator's, else the one run of this job already
    in the ledger (resumed, so nothing is paid twice), else a new key derived from content.

    Several runs of this job on this target (each started under an explicit key) leave no
    safe choice: refused, naming them.
    """
    if settings.run_key:
        return settings.run_key
    target = target_of(settings)
    found = [
        spec
        for spec in await runs_with_digest(ledger, job.content_digest)
        if normalize_target(spec.base_url) == target
    ]
    if not found:
        return derive_run_key(job, settings)
    if len(found) == 1:
        return found[0].run_key
    keys = ", ".join(repr(spec.run_key) for spec in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    raise ConfigError(
        f"ledger {ledger.name} holds {len(found)} runs of this exact job on "
        f"{target} ({keys}{more}): pass --run-key to resume one of them, or a new "
        "key to pay the job again on purpose; nothing was sent"
    )


def run_spec(job: Job, settings: Settings, run_key: str) -> RunSpec:
    return RunSpec(
        run_key=run_key,
        provider=settings.provider,
        base_url=target_of(settings),
        job_file=str(job.path),
        job_digest=job.content_digest,
        extra_columns=job.extra_columns,
        row_count=len(job.rows),
    )


def same_run_or_refuse(
    record: RunRecord, found: RunSpec | None, spec: RunSpec, advice: str
) -> None:
    """A run key may only go on with the job and target it was recorded with, split into
    the same ledger rows (`runner.jobs.split`)."""
    if (
        found is not None
        and found.job_digest == spec.job_digest
        and normalize_target(found.base_url) == spec.base_url
    ):
        if found.row_count == spec.row_count:
            return
        # The same rows, but not the same ledger rows: one of the two split rows above the
        # provider's maximum into chunks and the other did not (or split them otherwise).
        raise LedgerError(
            f"run key {record.run_key!r} in {record.name} holds this job as {found.row_count} "
            f"ledger rows, this run makes {spec.row_count}: its rows above the provider's "
            "maximum were split otherwise (--split-over-max); run it as it was recorded, "
            "or under a new run key to pay it again on purpose"
        )
    raise LedgerError(
        f"run key {record.run_key!r} in {record.name} belongs to another job or provider "
        f"({found.job_file if found else '?'} on {found.base_url if found else '?'}): "
        f"{advice}"
    )


@dataclass(slots=True)
class WorkLeft:
    """The rows a run (or this worker of it) still has to take, and what earlier processes
    left of them: attempts sent (the retry budget is the row's, not the process's), attempts
    open (reconciled before anything is sent), and when each card was last sent to."""

    rows: Sequence[JobRow]
    sent_before: dict[int, int] = field(default_factory=dict)
    open_before: dict[int, OpenAttempt] = field(default_factory=dict)
    last_sent: Mapping[str, datetime] = field(default_factory=dict)

    @property
    def fresh_rows(self) -> Sequence[JobRow]:
        """The rows with no attempt in doubt: what preflight checks and counts."""
        if not self.open_before:
            return self.rows
        return [r for r in self.rows if r.row not in self.open_before]

    def row_state(self, item: JobRow | RowState) -> RowState:
        """A queued row becomes a `RowState` only when it is taken: a million waiting rows
        cost the dispatcher a reference each, not an object each."""
        if isinstance(item, RowState):
            return item
        return RowState(
            item,
            sent=self.sent_before.pop(item.row, 0),
            unresolved=self.open_before.pop(item.row, None),
        )


async def work_left(record: RunRecord, job: Job, resuming: bool) -> WorkLeft:
    """What is left of the run: the whole job on a new run, else the rows not attempted and
    those whose attempt was left open."""
    if not resuming:
        return WorkLeft(job.rows)  # not a copy: a million rows are 8 MB of references
    last_sent = await record.last_attempts()
    progress = await record.progress()
    opened = {a.row: a for a in await record.open_attempts()}
    rows = [
        r
        for r in job.rows
        if r.row in opened
        or (r.row in progress and progress[r.row].status is RowStatus.NOT_ATTEMPTED)
    ]
    sent = {row: p.attempts for row, p in progress.items()}
    for attempt in opened.values():
        sent[attempt.row] = max(sent.get(attempt.row, 0), attempt.attempt)
    log.info("run.resuming", rows_left=len(rows), in_doubt=len(opened), rows=len(job.rows))
    return WorkLeft(rows, {row: n for row, n in sent.items() if n}, opened, last_sent)


def cooldowns_left(
    last_sent: Mapping[str, datetime], wait: float, clock: Callable[[], float]
) -> dict[str, float]:
    """Cards an earlier process sent to within `wait` seconds: when, on the run's clock, each
    may go again.

    An attempt left open by a killed process is reconciled no sooner either, so a topup the
    platform was still processing has landed before its card is read.
    """
    now_wall, now = utcnow(), clock()
    return {
        card: now + left
        for card, sent in last_sent.items()
        if (left := wait - (now_wall - sent).total_seconds()) > 0
    }
