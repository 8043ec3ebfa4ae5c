"""One audit of one run: the ledger's rows and attempts, the provider's record of every card of
the run, matched card by card; what the match learns written back to the ledger."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import anyio
import structlog

from runner.audit.books import read_book
from runner.audit.match import SKEW, CardAudit, match_card
from runner.audit.values import AuditResult, AuditRow, CardBook, Fill, Line, Window
from runner.domain import RowRecord
from runner.errors import LedgerError
from runner.ledger import AttemptEntry, Ledger, utcnow
from runner.money import format_amount
from runner.providers.base import Provider

log = structlog.get_logger("runner.audit")


async def audit_run(
    ledger: Ledger,
    run_key: str,
    provider: Provider,
    *,
    concurrency: int = 4,
    fill: bool = True,
) -> AuditResult:
    """Match the run's rows one to one against the provider's books; with `fill`, write the
    transaction ids and fees the match learned into the rows that lack them."""
    await ledger.flush()
    if await ledger.call(ledger.find_run, run_key) is None:
        raise LedgerError(f"ledger {ledger.name}: no run with key {run_key!r}")
    records: list[RowRecord] = await ledger.call(lambda: list(ledger.records(run_key)))
    attempts: list[AttemptEntry] = await ledger.call(ledger.attempt_log, run_key)
    now = utcnow()
    rows = _audit_rows(records, attempts, now)
    window = _run_window(rows)
    result = AuditResult(run_key, window)
    by_card: dict[str, list[AuditRow]] = defaultdict(list)
    for row in rows:
        by_card[row.card_id].append(row)
    first = _first_attempts(attempts)
    books: dict[str, CardBook] = {}
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    since = None if window is None else window[0] - SKEW

    async def read(card: str) -> None:
        async with limiter:
            books[card] = await read_book(provider, card, since)

    async with anyio.create_task_group() as group:
        for card in by_card:
            group.start_soon(read, card)
    lines: list[Line] = []
    for card, card_rows in by_card.items():
        before, sent = first.get(card, (None, None))
        card_window = window or (now, now)
        found, fills = match_card(CardAudit(card_rows, books[card], card_window, before, sent))
        lines += found
        result.fills += fills
    lines.sort(key=lambda line: (line.row is None, line.row or 0, line.card_id))
    result.lines = lines
    for line in result.discrepancies:
        log.warning(
            "audit.discrepancy",
            kind=line.verdict,
            card_id=line.card_id,
            row=line.row,
            amount=None if line.amount is None else format_amount(line.amount),
            provider_amount=None
            if line.provider_amount is None
            else format_amount(line.provider_amount),
            transaction_id=line.transaction_id,
            detail=line.detail,
        )
    if fill and result.fills and not ledger.readonly:
        await ledger.write([_update(run_key, f) for f in result.fills])
    log.info(
        "audit.finished",
        rows=len(rows),
        matched=result.count("matched"),
        discrepancies=len(result.discrepancies),
        filled=len(result.fills),
    )
    return result


def _update(run_key: str, fill: Fill) -> Any:
    values: dict[str, Any] = {}
    for name in ("transaction_id", "fee", "total_charged", "invoice_id"):
        value = getattr(fill, name)
        if value is not None:
            values[name] = value
    return Ledger.row_update(run_key, fill.row, **values)


def _audit_rows(
    records: Sequence[RowRecord], attempts: Sequence[AttemptEntry], now: datetime
) -> list[AuditRow]:
    windows: dict[int, list[Window]] = defaultdict(list)
    for a in attempts:
        ends = [t for t in (a.finished_at, a.settle_by) if t is not None]
        windows[a.row].append((a.sent_at, max(ends) if ends else now))
    return [
        AuditRow(
            row=r.row,
            card_id=r.card_id,
            amount=r.amount,
            status=r.status,
            transaction_id=r.transaction_id,
            fee=r.fee,
            total_charged=r.total_charged,
            invoice_id=r.invoice_id,
            windows=tuple(windows.get(r.row, ())),
        )
        for r in records
    ]


def _run_window(rows: Sequence[AuditRow]) -> Window | None:
    spans = [w for r in rows for w in r.windows]
    if not spans:
        return None
    return min(w[0] for w in spans), max(w[1] for w in spans)


def _first_attempts(
    attempts: Sequence[AttemptEntry],
) -> dict[str, tuple[Decimal | None, datetime | None]]:
    """Each card's deposit before the run's first attempt on it, and when that was sent."""
    first: dict[str, AttemptEntry] = {}
    for a in attempts:
        known = first.get(a.card_id)
        if known is None or a.sent_at < known.sent_at:
            first[a.card_id] = a
    return {card: (a.before_deposit, a.sent_at) for card, a in first.items()}
