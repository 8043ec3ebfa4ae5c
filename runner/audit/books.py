"""The provider's own record of one card, read for an audit through the run's provider client
(so its rate limit and pacing hold): Uncash's transactions list, paged, and the card's deposit;
Alix's TopupCard transactions. What each item is taken to mean is named in docs/providers.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from runner.audit.values import BookEntry, CardBook, EntryState
from runner.errors import AuthenticationFailed, ProviderError
from runner.providers.base import Provider
from runner.providers.uncash_answers import decimal_field, transaction_items

PAGE_SIZE = 100  # the documented maximum
MAX_PAGES = 1000  # a card with more topups than this is not a card this runner funds


async def read_book(provider: Provider, card_id: str, since: datetime | None) -> CardBook:
    """The card's listed topups and its deposit now; a list that cannot be read is noted in
    `error` (the audit then leans on the deposit, or says it cannot tell)."""
    from runner.providers.alix import AlixProvider
    from runner.providers.uncash import UncashProvider

    deposit = None
    entries: list[BookEntry] = []
    error: str | None = None
    try:
        if isinstance(provider, UncashProvider):
            entries = await _uncash_entries(provider, card_id)
        elif isinstance(provider, AlixProvider):
            entries = await _alix_entries(provider, card_id, since)
        else:
            return CardBook(card_id, error=f"{provider.name} has no transactions list to audit")
    except AuthenticationFailed:
        raise
    except ProviderError as exc:
        error = str(exc)
    if provider.rules.reads_cards:
        try:
            card = await provider.get_card(card_id)
        except AuthenticationFailed:
            raise
        except ProviderError:
            card = None
        deposit = None if card is None else card.deposit
    return CardBook(card_id, tuple(entries), deposit, error)


async def _uncash_entries(provider: Any, card_id: str) -> list[BookEntry]:
    """Every topup item of the card, every page (ASSUMPTION "Uncash lists topups")."""
    entries: dict[str, BookEntry] = {}
    unnamed: list[BookEntry] = []
    page = 1
    while True:
        data = await provider.transactions_page(card_id, page, PAGE_SIZE)
        for item in transaction_items(data):
            entry = uncash_entry(item, card_id)
            if entry is None:
                continue
            if entry.transaction_id is None:
                unnamed.append(entry)
            else:
                # A topup made while paging shifts items to the next page: counted once.
                entries.setdefault(entry.transaction_id, entry)
        pagination = data.get("pagination") if isinstance(data, Mapping) else None
        more = isinstance(pagination, Mapping) and pagination.get("hasNext") is True
        if not more:
            break
        page += 1
        if page > MAX_PAGES:
            raise ProviderError(
                f"Uncash GET /cards/transactions: more than {MAX_PAGES} pages for {card_id}",
                provider=provider.name,
                card_id=card_id,
            )
    return [*entries.values(), *unnamed]


def uncash_entry(item: object, card_id: str) -> BookEntry | None:
    """A topup from one item of Uncash's list, or None for anything else: an Approved Credit
    item of a type that says topup is money on the card; a Declined one moved nothing."""
    if not isinstance(item, Mapping):
        return None
    listed = item.get("card_id")
    if listed is not None and str(listed).lower() != card_id.lower():
        # The list is not the one asked for: nothing in it can be trusted.
        raise ProviderError(
            f"Uncash GET /cards/transactions?card_id={card_id}: the list holds card {listed}'s "
            "transactions",
            card_id=card_id,
        )
    if str(item.get("side", "Credit")).lower() != "credit":
        return None
    if "topup" not in str(item.get("type", "topup")).lower().replace("_", "").replace(" ", ""):
        return None
    amount = decimal_field(item, "amount")
    if amount is None:
        return None
    status = str(item.get("status", "Approved")).lower()
    state = {"approved": EntryState.PAID, "declined": EntryState.FAILED}.get(
        status, EntryState.PENDING
    )
    fee = decimal_field(item, "platform_fee_amount")
    if fee is None:
        fee = decimal_field(item, "fee")
    txn, invoice = item.get("id"), item.get("invoice_id")
    return BookEntry(
        card_id=card_id,
        amount=amount,
        at=_when(item.get("created_at")),
        transaction_id=None if txn is None else str(txn),
        state=state,
        fee=fee,
        invoice_id=None if invoice is None else str(invoice),
    )


def _when(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def _alix_entries(provider: Any, card_id: str, since: datetime | None) -> list[BookEntry]:
    from runner.providers.alix_answers import TopupStatus, topup_status

    states = {TopupStatus.SUCCESS: EntryState.PAID, TopupStatus.FAILED: EntryState.FAILED}
    return [
        BookEntry(
            card_id=card_id,
            amount=record.amount,
            at=datetime.fromtimestamp(record.created_at, UTC),
            transaction_id=record.transaction_id,
            state=states.get(topup_status(record.status), EntryState.PENDING),
            fee=record.fee,
        )
        for record in await provider.transactions(card_id, since=since)
    ]
