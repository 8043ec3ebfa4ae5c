"""The audit's one-to-one match of a card's rows against the provider's record (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from runner.audit.books import uncash_entry
from runner.audit.match import CardAudit, match_card
from runner.audit.values import AuditRow, BookEntry, CardBook, EntryState, Kind, Proof
from runner.domain import RowStatus
from runner.errors import ProviderError

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CARD = "card-1"
WINDOW = (T0, T0 + timedelta(minutes=10))


def row(n: int, amount: str, status: RowStatus = RowStatus.SUCCEEDED, at: int = 0,
        txn: str | None = None, fee: str | None = None) -> AuditRow:  # fmt: skip
    sent = T0 + timedelta(seconds=at)
    paid_fee = None if fee is None else Decimal(fee)
    total = None if paid_fee is None else Decimal(amount) + paid_fee
    return AuditRow(
        n, CARD, Decimal(amount), status, txn, paid_fee, total, None,
        ((sent, sent + timedelta(seconds=5)),),
    )  # fmt: skip


def entry(amount: str, at: int = 0, txn: str | None = None,
          state: EntryState = EntryState.PAID, fee: str = "1.00") -> BookEntry:  # fmt: skip
    return BookEntry(CARD, Decimal(amount), T0 + timedelta(seconds=at), txn, state, Decimal(fee))


def audit(rows: list[AuditRow], entries: list[BookEntry], deposit: tuple[str, str] | None = None):  # type: ignore[no-untyped-def]
    book = CardBook(CARD, tuple(entries), None if deposit is None else Decimal(deposit[1]))
    before = None if deposit is None else Decimal(deposit[0])
    return match_card(CardAudit(rows, book, WINDOW, before, T0))


def test_rows_match_by_id_then_amount_and_time_and_learn_the_fee() -> None:
    """One row known by id, one by amount and time: both matched; the fee is filled in."""
    lines, fills = audit(
        [row(1, "10.00", txn="a", fee="1.00"), row(2, "10.00", at=60)],
        [entry("10.00", 61, "b"), entry("10.00", 1, "a")],
    )
    assert [(line.row, line.verdict, line.transaction_id) for line in lines] == [
        (1, "matched", "a"), (2, "matched", "b")
    ]  # fmt: skip
    assert [(f.row, f.transaction_id, f.fee, f.total_charged) for f in fills] == [
        (2, "b", Decimal("1.00"), Decimal("11.00"))
    ]


def test_a_second_topup_of_a_paid_row_is_unaccounted() -> None:
    """Paid twice: the second topup of the same amount has no row to account for it."""
    lines, _ = audit([row(1, "10.00")], [entry("10.00", 1, "a"), entry("10.00", 2, "b")])
    assert [line.verdict for line in lines] == ["matched", Kind.UNACCOUNTED]


def test_an_amount_that_differs_is_named() -> None:
    lines, _ = audit([row(1, "10.00", txn="a")], [entry("12.00", 1, "a")])
    assert [line.verdict for line in lines] == [Kind.AMOUNT_DIFFERS]


def test_a_row_the_list_does_not_show_is_proven_by_the_deposit() -> None:
    """Not listed (a lagging list), but the card's deposit moved by exactly its amount."""
    lines, _ = audit([row(1, "10.00"), row(2, "7.00", at=60)], [entry("10.00", 1)],
                     deposit=("100.00", "117.00"))  # fmt: skip
    assert [(line.verdict, line.proof) for line in lines] == [
        ("matched", Proof.LIST), ("matched", Proof.DEPOSIT)
    ]  # fmt: skip


def test_a_row_neither_the_list_nor_the_deposit_shows_is_paid_without_record() -> None:
    lines, _ = audit([row(1, "10.00")], [], deposit=("100.00", "100.00"))
    assert [line.verdict for line in lines] == [Kind.PAID_NO_RECORD]


def test_a_failed_row_the_provider_paid_is_named_and_a_failed_topup_is_no_money() -> None:
    lines, _ = audit(
        [row(1, "10.00", RowStatus.FAILED), row(2, "8.00", RowStatus.FAILED, at=60)],
        [entry("10.00", 1), entry("8.00", 61, state=EntryState.FAILED)],
    )
    assert [line.verdict for line in lines] == [Kind.UNPAID_BUT_PAID, "matched"]


def test_a_topup_outside_the_runs_window_is_not_the_runs_business() -> None:
    lines, _ = audit([row(1, "10.00")], [entry("10.00", 1), entry("50.00", 3600)])
    assert [line.verdict for line in lines] == ["matched"]


# -- what an Uncash list item is taken to mean -------------------------------------------------


def test_uncash_items_approved_credit_topups_are_money_declined_are_not() -> None:
    """Approved Credit topups are money, Declined ones are not, debits are no topups."""
    base = {
        "card_id": CARD,
        "side": "Credit",
        "type": "Topup",
        "amount": Decimal("10.00"),
        "id": "t1",
        "created_at": "2026-12-01T12:00:01.000Z",
        "platform_fee_amount": Decimal("0.75"),
    }
    paid = uncash_entry(base | {"status": "Approved"}, CARD)
    declined = uncash_entry(base | {"status": "Declined"}, CARD)
    assert paid is not None
    assert declined is not None
    assert (paid.state, paid.fee, paid.at) == (
        EntryState.PAID,
        Decimal("0.75"),
        T0 + timedelta(seconds=1),
    )
    assert declined.state is EntryState.FAILED
    assert uncash_entry(base | {"side": "Debit"}, CARD) is None
    assert uncash_entry(base | {"type": "Purchase"}, CARD) is None


def test_an_uncash_list_of_another_card_is_refused() -> None:
    """A list whose items name another card is not the card's record: nothing in it counts."""
    with pytest.raises(ProviderError, match="holds card other"):
        uncash_entry({"card_id": "other", "amount": Decimal("10.00")}, CARD)
