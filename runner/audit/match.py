"""Match one card's ledger rows one to one against the provider's record of that card. Pure.

Order: transaction id first, then amount and time (the provider topup nearest an attempt of the
row, inside one of its windows), then amount differences, then rows the ledger says unpaid.
What the list cannot decide falls back to the card's deposit: the money on the card beyond what
the list shows must be exactly the unlisted rows' (docs/providers.md, "Audit").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from runner.audit.values import (
    AuditRow,
    BookEntry,
    CardBook,
    Fill,
    Kind,
    Line,
    Proof,
    Window,
)
from runner.domain import RowStatus
from runner.money import format_amount

# How far the provider's clock and ours may disagree: a topup this much outside an attempt's
# window still belongs to it. Also widens the run's window.
SKEW = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class CardAudit:
    """One card's rows and the provider's record of it, with the deposit before the run."""

    rows: Sequence[AuditRow]
    book: CardBook
    window: Window  # the run's, skew included
    deposit_before: Decimal | None  # before the run's first attempt on the card
    since: datetime | None  # when that first attempt was sent


def _inside(at: datetime | None, window: Window) -> bool:
    return at is None or window[0] - SKEW <= at <= window[1] + SKEW


def _distance(at: datetime | None, windows: Sequence[Window]) -> float | None:
    """Seconds from `at` to the nearest attempt's start, if inside one of `windows`."""
    if not windows:
        return None
    if at is None:
        return 0.0
    best = None
    for window in windows:
        if _inside(at, window):
            gap = abs((at - window[0]).total_seconds())
            best = gap if best is None else min(best, gap)
    return best


def _pair(
    rows: Sequence[AuditRow],
    entries: Sequence[BookEntry],
    fits: Callable[[AuditRow, BookEntry], bool],
    windows: Callable[[AuditRow], Sequence[Window]],
) -> list[tuple[AuditRow, BookEntry]]:
    """Rows and entries paired one to one, nearest in time first."""
    candidates = []
    for r in rows:
        for n, e in enumerate(entries):
            if fits(r, e):
                gap = _distance(e.at, windows(r))
                if gap is not None:
                    candidates.append((gap, r.row, n, r, e))
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    taken_rows: set[int] = set()
    taken_entries: set[int] = set()
    pairs = []
    for _, row, n, r, e in candidates:
        if row not in taken_rows and n not in taken_entries:
            taken_rows.add(row)
            taken_entries.add(n)
            pairs.append((r, e))
    return pairs


def _fill(row: AuditRow, entry: BookEntry) -> Fill | None:
    """What `entry` tells of `row` that the ledger does not hold yet."""
    txn = entry.transaction_id if row.transaction_id is None else None
    fee = entry.fee if row.fee is None else None
    total = None
    if row.total_charged is None and (fee is not None or row.fee is not None):
        total = row.amount + (fee if fee is not None else row.fee or Decimal(0))
    invoice = entry.invoice_id if row.invoice_id is None else None
    if txn is None and fee is None and total is None and invoice is None:
        return None
    return Fill(row.row, txn, fee, total, invoice)


def _line(
    row: AuditRow, verdict: str, proof: Proof, entry: BookEntry | None, detail: str = ""
) -> Line:
    return Line(
        card_id=row.card_id,
        verdict=verdict,
        proof=proof,
        row=row.row,
        status=row.status.value,
        amount=row.amount,
        provider_amount=None if entry is None else entry.amount,
        transaction_id=(entry.transaction_id if entry is not None else None) or row.transaction_id,
        provider_at=None if entry is None else entry.at,
        detail=detail,
    )


def match_card(audit: CardAudit) -> tuple[list[Line], list[Fill]]:
    """Every row of the card and every provider topup of it in the run's window, matched."""
    book, window = audit.book, audit.window
    lines: list[Line] = []
    fills: list[Fill] = []
    # Topups the list shows, inside the window and moving money: each claimed at most once.
    free = [e for e in book.entries if e.state.is_money and _inside(e.at, window)]
    failed = [e for e in book.entries if not e.state.is_money]
    paid = [r for r in audit.rows if r.claims_paid]
    done: set[int] = set()

    def settle(pairs: list[tuple[AuditRow, BookEntry]], verdict: str, why: str = "") -> None:
        for r, e in pairs:
            done.add(r.row)
            free.remove(e)
            detail = why
            if verdict == Kind.AMOUNT_DIFFERS:
                detail = (
                    f"the row says {format_amount(r.amount)}, the provider "
                    f"{format_amount(e.amount)}"
                )
            lines.append(_line(r, verdict, Proof.LIST, e, detail))
            if verdict == "matched":
                fill = _fill(r, e)
                if fill is not None:
                    fills.append(fill)

    # 1. The transaction id, where the ledger knows it.
    by_id = {e.transaction_id: e for e in free if e.transaction_id}
    for r in paid:
        e = by_id.get(r.transaction_id or "")
        if e is not None:
            verdict = "matched" if e.amount == r.amount else Kind.AMOUNT_DIFFERS
            settle([(r, e)], verdict)
    left = [r for r in paid if r.row not in done]
    # 2. Amount and time; 3. time alone, where the amounts differ.
    settle(_pair(left, free, lambda r, e: e.amount == r.amount, lambda r: r.windows), "matched")
    left = [r for r in left if r.row not in done]
    settle(_pair(left, free, lambda r, e: True, lambda r: r.windows), Kind.AMOUNT_DIFFERS)
    left = [r for r in left if r.row not in done]
    # Rows in doubt: what the provider shows settles nothing in the ledger, but it is said.
    review = [r for r in audit.rows if r.status is RowStatus.NEEDS_REVIEW]
    for r, e in _pair(review, free, lambda r, e: e.amount == r.amount, lambda r: r.windows):
        done.add(r.row)
        free.remove(e)
        lines.append(_line(r, "review: the provider shows it paid", Proof.LIST, e))
    # 4. Rows the ledger says unpaid, which the provider shows paid.
    unpaid = [r for r in audit.rows if r.claims_unpaid]
    for r, e in _pair(
        unpaid, free, lambda r, e: e.amount == r.amount, lambda r: r.windows or (window,)
    ):
        done.add(r.row)
        free.remove(e)
        lines.append(_line(r, Kind.UNPAID_BUT_PAID, Proof.LIST, e, "the provider shows it paid"))
    # 5. The deposit, for paid rows the list does not show (a lagging or silent list).
    unexplained = _unexplained(audit)
    if left and unexplained is not None and unexplained == sum(r.amount for r in left):
        for r in left:
            done.add(r.row)
            lines.append(_line(r, "matched", Proof.DEPOSIT, None, "not listed; on the card"))
        unexplained = Decimal(0)
        left = []
    for r in left:
        done.add(r.row)
        shown = [
            e for e in failed if e.amount == r.amount and _distance(e.at, r.windows) is not None
        ]
        why = "listed as Failed" if shown else "not listed"
        if book.error:
            why = f"the list could not be read: {book.error}"
        if unexplained is not None:
            why += f"; the deposit shows {format_amount(unexplained)} the list does not"
        lines.append(_line(r, Kind.PAID_NO_RECORD, Proof.NONE, None, why))
    for r in audit.rows:
        if r.row in done:
            continue
        proof = Proof.LIST if book.error is None else Proof.NONE
        verdict = "matched" if r.claims_unpaid else "review: no provider record"
        lines.append(_line(r, verdict, proof, None))
    for e in free:
        lines.append(
            Line(
                card_id=book.card_id,
                verdict=Kind.UNACCOUNTED,
                proof=Proof.LIST,
                provider_amount=e.amount,
                transaction_id=e.transaction_id,
                provider_at=e.at,
                detail="no row of the run accounts for it",
            )
        )
    if unexplained is not None and unexplained > 0 and not free:
        lines.append(
            Line(
                card_id=book.card_id,
                verdict=Kind.UNACCOUNTED,
                proof=Proof.DEPOSIT,
                provider_amount=unexplained,
                detail="the card's deposit moved by more than the list and the rows explain",
            )
        )
    return lines, fills


def _unexplained(audit: CardAudit) -> Decimal | None:
    """The money on the card since the run's first attempt that the list does not show;
    None where the deposit cannot tell (not read, or no snapshot before the run)."""
    now, before = audit.book.deposit_now, audit.deposit_before
    if now is None or before is None or audit.since is None:
        return None
    floor = audit.since - SKEW
    listed = sum(
        (
            e.amount
            for e in audit.book.entries
            if e.state.is_money and (e.at is None or e.at >= floor)
        ),
        Decimal(0),
    )
    return now - before - listed
