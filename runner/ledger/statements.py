"""The statements a run's writes are made of (an intent, an outcome, a row's fields, a row
closed untouched, a card done), and how values are stored: times as ISO text, money as text.

Built once per topup or more: this is the hot path, so SQL is cached and values are encoded
without the general-purpose formatters where a shortcut gives the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from runner.domain import RowStatus
from runner.money import format_amount

if TYPE_CHECKING:
    from runner.providers.base import CardState

# One statement: SQL with `?` placeholders (portable: PostgreSQL's turn them into `%s`), and
# its parameters.
Statement = tuple[str, Sequence[Any]]

MONEY_FIELDS = (
    "fee",
    "total_charged",
    "card_balance_before",
    "card_balance_after",
    "wallet_balance_after",
)
ROW_FIELDS = (
    "status",
    *MONEY_FIELDS,
    "transaction_id",
    "invoice_id",
    "attempts",
    "error",
    "started_at",
    "finished_at",
    "provider_ref",
)
# The SQL of each set of fields a row update was asked for (a handful in a run), and which
# of them are money.
_ROW_UPDATES: dict[tuple[str, ...], tuple[str, tuple[bool, ...]]] = {}


class Charged(Protocol):
    """What a provider said of an applied topup (`providers.base.Applied` is one)."""

    @property
    def fee(self) -> Decimal | None: ...
    @property
    def total_charged(self) -> Decimal | None: ...
    @property
    def card_balance_before(self) -> Decimal | None: ...
    @property
    def card_balance_after(self) -> Decimal | None: ...
    @property
    def wallet_balance_after(self) -> Decimal | None: ...
    @property
    def transaction_id(self) -> str | None: ...
    @property
    def invoice_id(self) -> str | None: ...
    @property
    def provider_ref(self) -> str | None: ...


def iso(value: datetime | None) -> str | None:
    """A time as the ledger stores it: UTC, ISO 8601 to the millisecond."""
    global _iso_second
    if value is None:
        return None
    # utcnow()'s times need no conversion
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    # isoformat() costs two microseconds and a run formats two times a topup, nearly all
    # within the same second as the one before: only the milliseconds are new. One tuple,
    # read once: ledger reads on a worker thread format times too.
    second = (utc.second, utc.minute, utc.hour, utc.day, utc.month, utc.year)
    cached = _iso_second
    if cached[0] != second:
        cached = _iso_second = (second, utc.replace(microsecond=0, tzinfo=None).isoformat())
    return f"{cached[1]}.{utc.microsecond // 1000:03d}+00:00"


_iso_second: tuple[tuple[int, ...], str] = ((), "")


def money(value: Decimal | None) -> str | None:
    """An amount as the ledger stores it: text with two decimals."""
    if value is None:
        return None
    text = str(value)
    if text[-3:-2] == "." and text[-2:].isdigit() and text != "-0.00":
        # Already exactly in cents, as nearly every amount is: format_amount would give the
        # same text at thirty times the cost, and the ledger formats several per request.
        return text
    return format_amount(value)


def intent(
    run_key: str,
    row: int,
    attempt: int,
    card_id: str,
    amount: Decimal,
    before: CardState | None,
    sent_at: datetime,
    *,
    settle_by: datetime | None = None,
) -> list[Statement]:
    """The statements that record an attempt about to be sent (with the card's balance
    before it, when the provider lets cards be read, and the time until which the
    provider may still apply it, when known)."""
    sent = iso(sent_at)
    balance = None if before is None else money(before.balance)
    return [
        (
            "INSERT INTO attempts (run_key, row, attempt, card_id, amount, before_status, "
            "before_balance, before_deposit, sent_at, settle_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_key,
                row,
                attempt,
                card_id,
                money(amount),
                None if before is None else before.status.value,
                balance,
                None if before is None else money(before.deposit),
                sent,
                iso(settle_by),
            ),
        ),
        (
            "UPDATE rows SET attempts = ?, started_at = COALESCE(started_at, ?) "
            "WHERE run_key = ? AND row = ?",
            (attempt, sent, run_key, row),
        )
        if before is None
        else (
            "UPDATE rows SET attempts = ?, started_at = COALESCE(started_at, ?), "
            "card_balance_before = ? WHERE run_key = ? AND row = ?",
            (attempt, sent, balance, run_key, row),
        ),
    ]


_OUTCOME = (
    "UPDATE attempts SET outcome = ?, detail = ?, finished_at = ? "
    "WHERE run_key = ? AND row = ? AND attempt = ?"
)


def attempt_outcome(
    run_key: str, row: int, attempt: int, outcome: str, detail: str, at: datetime
) -> Statement:
    """How an attempt ended (`outcome`: an `AttemptOutcome`, a StrEnum: both drivers store
    it as its string, as tests/test_ledger_api.py checks)."""
    return (_OUTCOME, (outcome, detail, iso(at), run_key, row, attempt))


# A finished row's update: status, time and error, then, for an applied topup, what the
# provider said of it; card_balance_before and provider_ref only when it said them (the
# intent may have recorded the balance before). Indexed by (applied, before, ref).
_FINISH_ROW = "UPDATE rows SET status = ?, finished_at = ?, error = ?"
_FINISH_APPLIED = (
    ", fee = ?, total_charged = ?, card_balance_after = ?, wallet_balance_after = ?, "
    "transaction_id = ?, invoice_id = ?"
)
_FINISH_WHERE = " WHERE run_key = ? AND row = ?"
_FINISH: dict[tuple[bool, bool, bool], str] = {
    (applied, before, ref): _FINISH_ROW
    + (_FINISH_APPLIED if applied else "")
    + (", card_balance_before = ?" if before else "")
    + (", provider_ref = ?" if ref else "")
    + _FINISH_WHERE
    for applied in (False, True)
    for before in (False, True)
    for ref in (False, True)
    if applied or not (before or ref)
}


def row_finish(
    run_key: str,
    row: int,
    status: RowStatus,
    at: datetime,
    error: str | None,
    applied: Charged | None,
) -> Statement:
    """A row's status, finish time and error (None clears an earlier one), and, for an
    applied topup, the provider's figures."""
    if applied is None:
        return (_FINISH[False, False, False], (status.value, iso(at), error, run_key, row))
    before = applied.card_balance_before
    ref = applied.provider_ref
    params: list[Any] = [
        status.value,
        iso(at),
        error,
        money(applied.fee),
        money(applied.total_charged),
        money(applied.card_balance_after),
        money(applied.wallet_balance_after),
        applied.transaction_id,
        applied.invoice_id,
    ]
    if before is not None:
        params.append(money(before))
    if ref is not None:
        params.append(ref)
    params += (run_key, row)
    return (_FINISH[True, before is not None, ref is not None], params)


def row_update(run_key: str, row: int, **values: Any) -> Statement:
    """Set some of a row's report fields (money as Decimal, times as datetime)."""
    names = tuple(values)
    cached = _ROW_UPDATES.get(names)
    if cached is None:
        unknown = set(values) - set(ROW_FIELDS)
        if unknown:
            raise ValueError(f"not row fields: {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in values)
        cached = _ROW_UPDATES[names] = (
            f"UPDATE rows SET {assignments} WHERE run_key = ? AND row = ?",
            tuple(name in MONEY_FIELDS for name in names),
        )
    sql, is_money = cached
    params: list[Any] = []
    for money_field, value in zip(is_money, values.values(), strict=True):
        if money_field:
            params.append(money(value))
        elif value is None or type(value) is str:
            params.append(value)
        elif isinstance(value, datetime):
            params.append(iso(value))
        elif isinstance(value, RowStatus):
            params.append(value.value)
        else:
            params.append(value)
    params += (run_key, row)
    return sql, params


def close_untouched_row(
    run_key: str, row: int, status: RowStatus, error: str, at: datetime | None
) -> Statement:
    """Give a row a status and an error unless it has left `not_attempted` meanwhile (on
    a shared ledger, another worker may have finished it)."""
    return (
        "UPDATE rows SET status = ?, error = ?, finished_at = COALESCE(?, finished_at) "
        "WHERE run_key = ? AND row = ? AND status = 'not_attempted'",
        (status.value, error, iso(at), run_key, row),
    )


def card_done(run_key: str, card_id: str, owner: str) -> Statement:
    """Mark a card of a shared run finished, committed after its rows' outcomes."""
    return (
        "UPDATE run_cards SET done = true, owner = NULL, lease_until = NULL "
        "WHERE run_key = ? AND card_id = ? AND owner = ?",
        (run_key, card_id, owner),
    )


def learned_rate(target: str, rate: float, at: datetime) -> Statement:
    """Keep the request rate a run learned on `target`, for the next run to start near."""
    return (
        "INSERT INTO learned_rates (target, rate, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (target) DO UPDATE SET rate = excluded.rate, updated_at = excluded.updated_at",
        (target, float(rate), at.astimezone(UTC).isoformat()),
    )
