"""Prometheus text-format metrics of a run, for node_exporter's textfile collector.

Written atomically (temporary file, then rename) so the collector never reads half a file,
at every exit of `run` whatever its code; the last success time is carried over from the
previous file when this run did not succeed (read bounded: a damaged file is only replaced).
"""

from __future__ import annotations

import errno
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from runner.domain import RowStatus

_LAST_SUCCESS = re.compile(
    rb"^topup_runner_last_success_timestamp_seconds(?:\{[^\n]*\})? ([0-9]{1,12}(?:\.[0-9]{1,9})?)$",
    re.MULTILINE,
)
# The previous file is read no further than this: ours are a few kB; whatever is longer was
# not written by us, and the sample we look for comes near the end of ours.
_PREVIOUS_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class StatusTotals:
    """Rows of one status and their money."""

    rows: int = 0
    amount: Decimal = Decimal("0")
    fee: Decimal = Decimal("0")
    total_charged: Decimal = Decimal("0")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# What every metrics file this program writes holds near its start: a file without it is
# not one of ours, and is never written over.
_OWN_MARK = b"topup_runner_"
_MARK_WITHIN = 1 << 16


def foreign_file(path: Path) -> bool:
    """Whether `path` holds something other than a metrics file of ours (the job file, a
    report, the ledger, anything else): such a file is never written over, damaged metrics
    or not. Missing, empty, or not readable as a regular file is not foreign."""
    try:
        if not path.is_file():
            return False
        with path.open("rb") as handle:
            start = handle.read(_MARK_WITHIN)
    except OSError:
        return False
    return bool(start) and _OWN_MARK not in start


def _previous_success(path: Path) -> str | None:
    """The last-success time in the file a previous run wrote, if it holds a plain one."""
    try:
        with path.open("rb") as handle:
            text = handle.read(_PREVIOUS_LIMIT)
    except (OSError, ValueError):
        return None
    match = _LAST_SUCCESS.search(text)
    if match is None or not math.isfinite(float(match.group(1))):
        return None
    return match.group(1).decode("ascii")


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """What a finished run reports to monitoring."""

    job: str
    provider: str
    run_key: str
    totals: Mapping[RowStatus, StatusTotals] | None  # None: the rows are not known
    duration: float
    exit_code: int
    finished: datetime
    chain_head: str | None = None  # the ledger's hash-chain head (`topup-runner verify`)


@dataclass(slots=True)
class RunEnd:
    """What is known of a run when its command exits, however it exits: filled in as the run
    goes (the command's options, then its settings, then the ledger), read by the exit's
    metrics and notifications. `totals` None: the run's rows could not be read."""

    job: str
    provider: str = "unknown"
    run_key: str | None = None
    metrics_file: Path | None = None
    notify: tuple[str, ...] = ()
    totals: Mapping[RowStatus, StatusTotals] | None = None
    sent: int | None = None
    makespan: float | None = None
    report: Path | None = None
    stopped: str | None = None
    error: str | None = None
    chain_head: str | None = None
    started: float = field(default_factory=time.monotonic)

    def metrics(self, exit_code: int) -> RunMetrics:
        """The metrics of this run ending now with `exit_code`."""
        return RunMetrics(
            job=self.job,
            provider=self.provider,
            run_key=self.run_key or "",
            totals=self.totals,
            duration=time.monotonic() - self.started,
            exit_code=exit_code,
            finished=datetime.now(UTC),
            chain_head=self.chain_head,
        )


def render_metrics(run: RunMetrics, last_success: str | None) -> str:
    base = f'job="{_label(run.job)}",provider="{_label(run.provider)}"'
    totals = run.totals or {}
    lines = [
        "# HELP topup_runner_run_info The run these metrics describe.",
        "# TYPE topup_runner_run_info gauge",
        f'topup_runner_run_info{{{base},run_key="{_label(run.run_key)}"}} 1',
    ]

    def family(name: str, help_text: str, value_of: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for status in RowStatus:
            value = getattr(totals.get(status, StatusTotals()), value_of)
            lines.append(f'{name}{{{base},status="{status.value}"}} {value}')

    if run.totals is not None:  # rows that cannot be read are left out, not shown as zero
        family("topup_runner_rows", "Rows of the last run by status.", "rows")
        family("topup_runner_amount", "Sum of the amounts of the last run by status.", "amount")
        family("topup_runner_fee", "Sum of the fees of the last run by status.", "fee")
        family(
            "topup_runner_total_charged",
            "Sum of what the wallet was charged in the last run by status.",
            "total_charged",
        )
    if run.chain_head is not None:
        lines += [
            "# HELP topup_runner_chain_info The ledger hash-chain head of the last run.",
            "# TYPE topup_runner_chain_info gauge",
            f'topup_runner_chain_info{{{base},head="{_label(run.chain_head)}"}} 1',
        ]
    stamp = f"{run.finished.timestamp():.3f}"
    success = stamp if run.exit_code == 0 else last_success
    lines += [
        "# HELP topup_runner_duration_seconds Wall time of the last run.",
        "# TYPE topup_runner_duration_seconds gauge",
        f"topup_runner_duration_seconds{{{base}}} {run.duration:.3f}",
        "# HELP topup_runner_exit_code Exit code of the last run.",
        "# TYPE topup_runner_exit_code gauge",
        f"topup_runner_exit_code{{{base}}} {run.exit_code}",
        "# HELP topup_runner_last_run_timestamp_seconds When the last run finished.",
        "# TYPE topup_runner_last_run_timestamp_seconds gauge",
        f"topup_runner_last_run_timestamp_seconds{{{base}}} {stamp}",
    ]
    if success is not None:
        lines += [
            "# HELP topup_runner_last_success_timestamp_seconds When a run last ended with "
            "every row succeeded or pending.",
            "# TYPE topup_runner_last_success_timestamp_seconds gauge",
            f"topup_runner_last_success_timestamp_seconds{{{base}}} {success}",
        ]
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, run: RunMetrics) -> None:
    """Render and atomically replace `path`. Its folder is not made: a run refuses a metrics
    file it could not write before sending anything, and an exit refused for it must not
    make the folder that refusal named."""
    if foreign_file(path):
        raise FileExistsError(
            errno.EEXIST, "it holds something else than topup-runner's metrics: left as it is"
        )
    text = render_metrics(run, _previous_success(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
