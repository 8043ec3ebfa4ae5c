"""A job looked over before anything is sent: the provider's amount rules, the fee estimate, the
shape of the job (cards, busiest card, rows pasted twice) and the lines `check` prints."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np

from runner.config import Settings
from runner.domain import JobRow
from runner.errors import (
    JobInvalid,
    OutputRefused,
    Problem,
    RunnerError,
    as_nothing_sent,
    runner_error_of,
)
from runner.guard.gate import approval_lines
from runner.jobs import Job
from runner.jobs.split import split_if_asked
from runner.metrics import foreign_file
from runner.money import format_amount
from runner.preflight import (
    FeeModel,
    PreflightReport,
    check_amount_rules,
    duplicate_rows,
    fit_fee_model,
    preflight,
)
from runner.providers.base import Provider
from runner.providers.factory import open_provider, rules_for
from runner.report import failed_rows_path_for, subtotals_path_for, summary_path_for
from runner.run.rates import check_lines, learned_rate
from runner.run.record import fee_samples, named_ledger, open_for
from runner.run.resume import choose_run_key, derive_run_key
from runner.scheduler import Pacer


def check_amounts(job: Job, provider: str) -> None:
    """Refuse the job (exit 2) if an amount breaks the provider's documented rules."""
    rules = rules_for(provider)
    bad = check_amount_rules(job.rows, rules.min_amount, rules.max_amount)
    if bad:
        raise JobInvalid(
            [Problem(str(job.path), why, row.row, "amount") for row, why in bad[:50]],
            truncated=max(0, len(bad) - 50),
        )


def output_path(settings: Settings, run_key: str) -> Path:
    """Where the run's report goes: --output, else `<run key>.xlsx` in the current folder."""
    return settings.output or Path(f"{run_key}.xlsx")


def check_outputs(settings: Settings, run_key: str, job_file: Path | None = None) -> None:
    """Refuse the run (exit 2) if a file it writes at the end could not be written: the report
    (with a CSV's summary and subtotals), its failed-rows job and the metrics file. Found after
    the topups, the report would be lost with the money already moved. None of them may be
    the job file, the ledger or one another: the approved file, or the run's own record,
    would be overwritten."""
    report = output_path(settings, run_key)
    targets = [("--output", report, report), ("--output", report, failed_rows_path_for(report))]
    if report.suffix.lower() == ".csv":
        targets.append(("--output", report, summary_path_for(report)))
        if settings.group_by is not None:
            targets.append(("--output", report, subtotals_path_for(report)))
    if settings.metrics_file is not None:
        metrics = settings.metrics_file
        targets.append(("--metrics-file", metrics, metrics))
        if foreign_file(metrics):
            raise OutputRefused(
                f"--metrics-file {metrics}: the file holds something else than topup-runner's "
                "metrics: name a new file or one an earlier run wrote",
                "--metrics-file",
            )
    _refuse_overwrites(targets, _kept_files(settings, job_file))
    folders: dict[Path, tuple[str, Path]] = {}
    for option, given, target in targets:
        if target.is_dir():
            what = "" if target == given else f"{target}, the file written beside it, "
            raise OutputRefused(f"{option} {given}: {what}is a folder: name a file", option)
        if target.exists() and not target.is_file():
            raise OutputRefused(f"{option} {given}: {target} is not a regular file", option)
        folders.setdefault(target.parent, (option, given))
    for folder, (option, given) in folders.items():
        _check_folder(option, given, folder)


def _kept_files(settings: Settings, job_file: Path | None) -> list[tuple[str, Path]]:
    """The files a run must never write over: the job file, and a SQLite ledger with the
    files SQLite keeps beside it."""
    kept = [] if job_file is None else [("the job file", job_file)]
    ledger = named_ledger(settings, os.environ)
    if isinstance(ledger, Path):
        kept += [("the ledger", Path(f"{ledger}{end}")) for end in ("", "-wal", "-shm", "-journal")]
    return kept


def _same_file(a: Path, b: Path) -> bool:
    """The same file however spelled: through links and `..`, or a second hard link."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _refuse_overwrites(
    targets: Sequence[tuple[str, Path, Path]], kept: Sequence[tuple[str, Path]]
) -> None:
    written: list[tuple[str, Path, Path]] = []
    for option, given, target in targets:
        for what, path in kept:
            if _same_file(target, path):
                beside = "" if target == given else f" ({target}, written beside it)"
                raise OutputRefused(
                    f"{option} {given}{beside} would overwrite {what} {path}", option
                )
        for other_option, other, earlier in written:
            if _same_file(target, earlier):
                raise OutputRefused(
                    f"{option} {given} and {other_option} {other} name the same file {target}",
                    option,
                    other_option,
                )
        written.append((option, given, target))


def _check_folder(option: str, given: Path, folder: Path) -> None:
    """`folder` exists, is a folder, and takes a new file (tried: permissions, a read-only
    mount and root's bypass of permissions all show only when a file is made)."""
    place = folder if str(folder) not in ("", ".") else Path.cwd()
    if not place.exists():
        raise OutputRefused(
            f"{option} {given}: the folder {place} does not exist: create it first", option
        )
    if not place.is_dir():
        raise OutputRefused(f"{option} {given}: {place} is not a folder", option)
    probe = place / f".topup-runner-probe.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise OutputRefused(
            f"{option} {given}: cannot write in the folder {place}: {exc.strerror or exc}", option
        ) from None


def fee_model(settings: Settings, samples: list[tuple[Decimal, Decimal]]) -> FeeModel | None:
    """The fee estimate preflight uses: the configured rate, else one learned from the ledger."""
    if settings.fee_rate is not None:
        return FeeModel(Decimal(0), settings.fee_rate, f"--fee-rate {settings.fee_rate}")
    return fit_fee_model(samples)


def duplicates(rows: Sequence[JobRow]) -> list[list[int]]:
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


def _rows_per_card(rows: Sequence[JobRow]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.card_id] = counts.get(r.card_id, 0) + 1
    return counts


def busiest(rows: Sequence[JobRow]) -> int:
    """The number of rows of the card with the most."""
    return max(_rows_per_card(rows).values(), default=0)


def _job_stats(rows: Sequence[JobRow]) -> tuple[int, int, list[list[int]]]:
    """The busiest card's rows, how many cards, and the groups of rows pasted twice."""
    counts = _rows_per_card(rows)
    return max(counts.values(), default=0), len(counts), duplicates(rows)


def fmt(value: Decimal | None) -> str | None:
    return None if value is None else format_amount(value)


async def check_job(
    job: Job, settings: Settings, keep: dict[str, object] | None = None
) -> list[str]:
    """Validate and preflight a job without sending a topup; the lines `check` prints.
    `keep` is given what `approve` records: preflight's report and the run key.

    Errors are `run`'s, with its exit codes: `check` never sends, so a provider that cannot be
    used is ProviderUnavailable (69), as it is for `run` before its first topup."""
    try:
        return await _check_job(job, settings, {} if keep is None else keep)
    except (RunnerError, BaseExceptionGroup) as exc:
        error = runner_error_of(exc)
        if error is None:
            raise
        exit_error = as_nothing_sent(error)
        if exit_error is exc:
            raise
        raise exit_error from exc


async def _check_job(job: Job, settings: Settings, keep: dict[str, object]) -> list[str]:
    job = split_if_asked(job, settings.provider, settings.split_over_max)
    check_amounts(job, settings.provider)
    samples: list[tuple[Decimal, Decimal]] = []
    learned: float | None = None
    where = named_ledger(settings, os.environ)
    run_key = settings.run_key or derive_run_key(job, settings)
    if where is not None and (not isinstance(where, Path) or where.exists()):
        with ExitStack() as stack:
            ledger = open_for(where, stack, readonly=True)
            samples = await fee_samples(ledger, settings.provider)
            learned = await learned_rate(ledger, settings)
            # The key `run` would take: an earlier run of this job is resumed, not repaid.
            run_key = await choose_run_key(ledger, job, settings)
            approval = await approval_lines(ledger, job, settings, run_key, os.environ)
    else:
        approval = await approval_lines(None, job, settings, run_key, os.environ)
    check_outputs(settings, run_key, job.path)
    fees = fee_model(settings, samples)
    stats: list[tuple[int, int, list[list[int]]]] = []

    async def describe() -> None:
        # What needs no provider is worked out on a thread while the provider answers
        # preflight: for a million rows, a second of the wait for its card listing.
        stats.append(await anyio.to_thread.run_sync(_job_stats, job.rows))

    verdict: list[PreflightReport | RunnerError] = []

    async def judge(provider: Provider) -> None:
        # The refusal travels out of the task group as a value and is raised as itself below,
        # as `run` raises it: out of a task group it would be an ExceptionGroup.
        try:
            verdict.append(
                await preflight(
                    provider,
                    job.rows,
                    allow_partial=settings.allow_partial,
                    fees=fees,
                    currency=job.currency,
                )
            )
        except RunnerError as exc:
            verdict.append(exc)

    pacer = Pacer(settings.rate_limit)
    async with (
        open_provider(settings, (r.card_id for r in job.rows), pacer) as (
            provider,
            base_url,
        ),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(describe)
        tg.start_soon(judge, provider)
    report = verdict[0]
    if isinstance(report, RunnerError):
        raise report
    keep.update(report=report, run_key=run_key)
    most, cards, groups = stats[0]
    label = "SANDBOX (no real money moves)" if settings.is_sandbox else settings.provider
    lines = [
        f"provider: {label} at {base_url}",
        f"job: {job.path}: {len(job.rows)} rows, {cards} cards, "
        f"busiest card {most} rows, total {format_amount(report.total_amount)}",
        f"wallet: {fmt(report.wallet_balance) or 'not readable from ' + provider.name}; "
        + (
            f"estimated fees {format_amount(report.estimated_fees)} ({report.fee_source})"
            if report.estimated_fees is not None
            else "fees unknown in advance: they come on top of the amounts (see --fee-rate)"
        ),
        *check_lines(settings, len(job.rows), most, learned),
        f"run key: {run_key}",
    ]
    if report.set_aside:
        lines.append(f"set aside by preflight: {len(report.set_aside)} rows")
    for group in groups:
        lines.append(
            f"warning: {job.path}: rows {', '.join(map(str, group))} have the same card, "
            "amount and reference: pasted twice?"
        )
    lines += approval
    lines.append("check passed: nothing was sent")
    return lines
