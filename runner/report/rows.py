"""What a report holds, typed, whatever the format: the contract's columns, one row's values
(money as cents, times in UTC), and the Summary's lines with totals by status and by group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

from runner.domain import RowRecord, RowStatus, RunInfo
from runner.errors import ConfigError

RESULT_COLUMNS: Final[tuple[str, ...]] = (
    "row",
    "card_id",
    "amount",
    "reference",
    "status",
    "fee",
    "total_charged",
    "card_balance_before",
    "card_balance_after",
    "wallet_balance_after",
    "transaction_id",
    "invoice_id",
    "attempts",
    "error",
    "started_at",
    "finished_at",
    # Added after the contract's columns, so that readers by position keep theirs: the
    # provider's currency of every money column of the row (Uncash USD, Alix USDT).
    "currency",
)
MONEY_COLUMNS: Final = frozenset(
    {
        "amount",
        "fee",
        "total_charged",
        "card_balance_before",
        "card_balance_after",
        "wallet_balance_after",
    }
)


# The order finance reads statuses in: money that moved, then problems, then what never ran.
STATUS_ORDER: Final = (
    RowStatus.SUCCEEDED,
    RowStatus.PENDING,
    RowStatus.FAILED,
    RowStatus.NEEDS_REVIEW,
    RowStatus.NOT_ATTEMPTED,
)

RESULTS_SHEET: Final = "Results"
SUMMARY_SHEET: Final = "Summary"
SANDBOX_NOTICE: Final = "SANDBOX — no real money moved"

_CENT: Final = Decimal("0.01")
ZERO: Final = Decimal("0.00")
SUMMARY_HEADER: Final = ("item", "value")

# OWASP's list for CSV injection: a cell starting with one of these may be run as a formula.
# The guard is reversible: text that already starts with quotes and then a trigger gets one
# more quote, so that taking one quote off (`restore`, and the CSV job reader's own copy of
# it) gives back exactly the text that was guarded.
_GUARDED: Final = re.compile(r"'*[=+\-@\t\r]")
_RESTORABLE: Final = re.compile(r"'+[=+\-@\t\r]")


class Seconds(Decimal):
    """A duration in seconds on the Summary: a number, but not money."""

    __slots__ = ()


Value = str | int | Decimal | datetime | None


def neutralise(text: str) -> str:
    """`text` safe from formula injection in CSV: a leading trigger character (after any
    quotes) gets a `'` first. Only CSV needs it: an xlsx cell's type is explicit."""
    return "'" + text if _GUARDED.match(text) else text


def restore(text: str) -> str:
    """The text `neutralise` was given: its guard quote taken off."""
    return text[1:] if _RESTORABLE.match(text) else text


@dataclass(frozen=True, slots=True)
class Figures:
    """What a report shows besides the rows and `RunInfo`: the run's currency, the job column
    the Summary subtotals by, and run-level lines whose numbers stay numbers."""

    currency: str = ""
    group_by: str | None = None
    lines: tuple[tuple[str, Value], ...] = ()


def _zero_by_status() -> dict[RowStatus, Decimal]:
    return dict.fromkeys(RowStatus, ZERO)


@dataclass(slots=True)
class Totals:
    """What the Summary needs, accumulated while the rows stream past."""

    rows: int = 0
    by_status: dict[RowStatus, int] = field(default_factory=lambda: dict.fromkeys(RowStatus, 0))
    # Money is summed per status only; the overall and moved totals add those up at the end.
    amount_by_status: dict[RowStatus, Decimal] = field(default_factory=_zero_by_status)
    fee_by_status: dict[RowStatus, Decimal] = field(default_factory=_zero_by_status)
    charged_by_status: dict[RowStatus, Decimal] = field(default_factory=_zero_by_status)
    # Rows that moved money (succeeded, pending) whose fee or total charged the provider did
    # not tell (Alix never reports a total charged; a reconciled Uncash topup has no fee): the
    # sums leave them out, and the Summary must say so rather than let 0.00 read as "free".
    fee_unknown: int = 0
    charged_unknown: int = 0
    digest: str | None = None  # of the Results rows as written (report/digest.py)

    def add(self, record: RowRecord) -> None:
        # Totals add the cent-rounded values the report shows, so they match a sum of the column.
        status = record.status
        self.rows += 1
        self.by_status[status] += 1
        self.amount_by_status[status] += cents(record.amount)
        moved = status is RowStatus.SUCCEEDED or status is RowStatus.PENDING
        if record.fee is not None:
            self.fee_by_status[status] += cents(record.fee)
        elif moved:
            self.fee_unknown += 1
        if record.total_charged is not None:
            self.charged_by_status[status] += cents(record.total_charged)
        elif moved:
            self.charged_unknown += 1

    @property
    def amount(self) -> Decimal:
        return sum(self.amount_by_status.values(), ZERO)

    @property
    def fee(self) -> Decimal:
        return sum(self.fee_by_status.values(), ZERO)

    @property
    def charged(self) -> Decimal:
        return sum(self.charged_by_status.values(), ZERO)

    @property
    def moved_amount(self) -> Decimal:
        return self.amount_by_status[RowStatus.SUCCEEDED] + self.amount_by_status[RowStatus.PENDING]

    @property
    def moved_fee(self) -> Decimal:
        return self.fee_by_status[RowStatus.SUCCEEDED] + self.fee_by_status[RowStatus.PENDING]

    @property
    def moved_charged(self) -> Decimal:
        return (
            self.charged_by_status[RowStatus.SUCCEEDED] + self.charged_by_status[RowStatus.PENDING]
        )


def cents(value: Decimal) -> Decimal:
    return value.quantize(_CENT, rounding=ROUND_HALF_UP)


def utc(value: datetime) -> datetime:
    # A naive datetime is taken to be UTC already, which is what the ledger stores.
    return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)


def header(info: RunInfo) -> list[str]:
    # An extra job column named like a contract column would make the header ambiguous.
    extras = [f"{name} (job)" if name in RESULT_COLUMNS else name for name in info.extra_columns]
    return [*RESULT_COLUMNS, *extras]


def values(
    record: RowRecord, extra_columns: tuple[str, ...], currency: str | None = None
) -> list[Value]:
    """The record's values in column order, still typed (money Decimal, times datetime)."""
    values: list[Value] = [
        record.row,
        record.card_id,
        cents(record.amount),
        record.reference,
        record.status.value,
        None if record.fee is None else cents(record.fee),
        None if record.total_charged is None else cents(record.total_charged),
        None if record.card_balance_before is None else cents(record.card_balance_before),
        None if record.card_balance_after is None else cents(record.card_balance_after),
        None if record.wallet_balance_after is None else cents(record.wallet_balance_after),
        record.transaction_id,
        record.invoice_id,
        record.attempts,
        record.error,
        record.started_at,
        record.finished_at,
        currency,
    ]
    if extra_columns:
        extra = dict(record.extra)
        values.extend(extra.get(name) for name in extra_columns)
    return values


def summary_lines(
    info: RunInfo,
    totals: Totals,
    sheets: int,
    figures: Figures | None = None,
    subtotals: Subtotals | None = None,
) -> list[tuple[str, Value]]:
    figures = figures or Figures()
    lines: list[tuple[str, Value]] = []
    if info.is_sandbox:
        lines.append((SANDBOX_NOTICE, None))
    lines.append(("provider", info.provider))
    if figures.currency:
        lines.append(("currency", figures.currency))
    lines += [
        ("run key", info.run_key),
        ("job file", info.job_file),
        ("times", "UTC"),
        ("started (UTC)", info.started_at),
        ("finished (UTC)", info.finished_at),
        ("rows", totals.rows),
    ]
    lines += [(f"rows {status.value}", count) for status, count in totals.by_status.items()]
    lines += [
        ("amount, all rows", totals.amount),
        ("fee, all rows", totals.fee),
        ("total charged, all rows", totals.charged),
        ("amount, succeeded + pending", totals.moved_amount),
        ("fee, succeeded + pending", totals.moved_fee),
        ("total charged, succeeded + pending", totals.moved_charged),
    ]
    for what, unknown in (("fee", totals.fee_unknown), ("total charged", totals.charged_unknown)):
        if unknown:
            lines.append((f"{what} not known", _unknown_note(what, unknown)))
    if sheets > 1:
        names = ", ".join(results_sheet_title(n) for n in range(1, sheets + 1))
        lines.append(("Results sheets", f"{sheets} ({names}): more rows than one sheet holds"))
    if subtotals is not None and subtotals.overflow:
        lines.append(
            (
                f"subtotals by {subtotals.column}",
                f"left out: more than {MAX_GROUPS:,} different values",
            )
        )
    lines += list(info.notes)
    lines += list(figures.lines)
    if totals.digest is not None:
        lines.append(("results digest", totals.digest))
    return lines


# Subtotals by a job column stop at this many groups: past it the column is an id, not a
# grouping, and a partial table would mislead.
MAX_GROUPS: Final = 1000
SUBTOTAL_STATUS_ALL: Final = "all"


class Subtotals:
    """Totals by status for each value of one extra job column, gathered as rows stream past."""

    __slots__ = ("column", "groups", "overflow")

    def __init__(self, column: str) -> None:
        self.column = column
        self.groups: dict[str, Totals] = {}
        self.overflow = False

    def add(self, record: RowRecord) -> None:
        if self.overflow:
            return
        key = next((value for name, value in record.extra if name == self.column), "")
        totals = self.groups.get(key)
        if totals is None:
            if len(self.groups) >= MAX_GROUPS:
                self.overflow = True
                self.groups.clear()
                return
            totals = self.groups[key] = Totals()
        totals.add(record)

    def lines(self) -> list[tuple[str, str, int, Decimal, Decimal, Decimal]]:
        """(group, status, rows, amount, fee, total charged): each status a group has rows
        in, then the group's `all` line; groups in sorted order."""
        out: list[tuple[str, str, int, Decimal, Decimal, Decimal]] = []
        for key in sorted(self.groups):
            totals = self.groups[key]
            for status in STATUS_ORDER:
                if totals.by_status[status]:
                    out.append(
                        (
                            key,
                            status.value,
                            totals.by_status[status],
                            totals.amount_by_status[status],
                            totals.fee_by_status[status],
                            totals.charged_by_status[status],
                        )
                    )
            out.append(
                (key, SUBTOTAL_STATUS_ALL, totals.rows, totals.amount, totals.fee, totals.charged)
            )
        return out


def subtotals_for(figures: Figures, extra_columns: tuple[str, ...]) -> Subtotals | None:
    """Subtotals by `figures.group_by`, or None; ConfigError when it is no column of the job."""
    if figures.group_by is None:
        return None
    check_group_by(figures.group_by, extra_columns)
    return Subtotals(figures.group_by)


def check_group_by(column: str, extra_columns: tuple[str, ...]) -> None:
    """Refuse a --group-by that names no extra column of the job (before anything is sent)."""
    if column not in extra_columns:
        have = ", ".join(extra_columns) if extra_columns else "none"
        raise ConfigError(
            f"group-by: {column!r} is not a column of the job; its extra columns: {have}"
        )


def _unknown_note(what: str, rows: int) -> str:
    rows_text = "1 succeeded or pending row" if rows == 1 else f"{rows} succeeded or pending rows"
    return f"for {rows_text}: the provider did not report it; the {what} totals leave them out"


def results_sheet_title(number: int) -> str:
    return RESULTS_SHEET if number == 1 else f"{RESULTS_SHEET} {number}"
