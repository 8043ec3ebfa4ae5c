"""Settling and reconciling Alix topups from the transactions list (runner.providers.alix,
alix_settle) against a tiny fake Alix: paging, matching, and every status.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import pytest
import structlog

from runner.errors import (
    ProviderError,
)
from runner.providers.alix_answers import LIST_WINDOW_MARGIN
from runner.providers.base import (
    Applied,
    NotApplied,
    RefusalCode,
    Refused,
    StillPending,
    Unknown,
)
from tests.alix_fake import (
    CARD,
    HUNDRED,
    T0,
    Keys,
    alix,
    at,
    events,
    item,
    make_keys,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield cast("list[dict[str, Any]]", captured)  # structlog's event dicts


# -- transactions, settle, reconcile --------------------------------------------------------


@pytest.mark.anyio
async def test_transactions_follow_every_page(keys: Keys) -> None:
    """120 topups over three pages all come back, newest first, money exact."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 200 - i, amount=Decimal("10.10")) for i in range(120)]
        records = await provider.transactions(CARD)
    assert [q["page"] for q in fake.list_queries] == ["1", "2", "3"]
    assert len(records) == 120
    assert records[0].created_at == T0 + 200
    assert all(r.amount == Decimal("10.10") and str(r.amount) == "10.10" for r in records)


@pytest.mark.anyio
async def test_transactions_query_names_type_and_a_widened_utc_from(keys: Keys) -> None:
    """type=TopupCard and `from` as YYYY-MM-DD HH:MM:SS UTC, widened; createdAt filters."""
    since = at(T0)
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1), item(T0), item(T0 - 1)]
        records = await provider.transactions(CARD, since=since, status="Pending")
    query = fake.list_queries[0]
    assert query["type"] == "TopupCard"
    assert query["status"] == "Pending"
    assert query["from"] == (since - LIST_WINDOW_MARGIN).strftime("%Y-%m-%d %H:%M:%S")
    assert [r.created_at for r in records] == [T0 + 1, T0]


@pytest.mark.anyio
async def test_unreadable_topup_in_the_list_is_an_error(keys: Keys) -> None:
    """A topup that cannot be read is never skipped: it might be the one looked for."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, amount="lots")]
        with pytest.raises(ProviderError, match="tx-"):
            await provider.transactions(CARD)


@pytest.mark.anyio
async def test_list_of_another_card_is_an_error(keys: Keys) -> None:
    """Items of another card mean the list is not the one asked for."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, cardId="someone-else")]
        with pytest.raises(ProviderError, match="someone-else"):
            await provider.transactions(CARD)


@pytest.mark.anyio
async def test_card_id_case_does_not_matter(keys: Keys) -> None:
    """Alix may answer a UUID in another case than the job wrote it."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0)]
        records = await provider.transactions(CARD.upper())
    assert len(records) == 1


@pytest.mark.anyio
async def test_settle_success(keys: Keys) -> None:
    """A listed Success settles the pending topup with its id, fee and balances."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, amount=5), item(T0, status="Success")]
        settled = await provider.settle(CARD, HUNDRED, str(T0))
    assert settled == Applied(
        fee=Decimal("1.00"),
        card_balance_before=Decimal("5.00"),
        card_balance_after=Decimal("105.00"),
        transaction_id=f"tx-{T0}",
        provider_ref=str(T0),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("after", ["5.00", "205.00"])
async def test_settle_success_whose_balances_did_not_move_by_the_amount(
    keys: Keys, after: str
) -> None:
    """A listed Success whose balance pair did not move by the amount carries a discrepancy."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, status="Success", balanceAfter=Decimal(after))]
        settled = await provider.settle(CARD, HUNDRED, str(T0))
    assert isinstance(settled, Applied)
    assert settled.discrepancy is not None
    assert f"from 5.00 to {after}" in settled.discrepancy


@pytest.mark.anyio
async def test_reconcile_finds_a_topup_whose_balances_moved_by_another_amount(
    keys: Keys,
) -> None:
    """A lost topup found in the list with a wrong balance pair is Applied with a discrepancy."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, balanceAfter=Decimal("55.00"))]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert settled.discrepancy == (
        "the answer's balance went from 5.00 to 55.00, a move of 50.00, not the 100.00 sent"
    )


@pytest.mark.anyio
async def test_settle_failed(keys: Keys) -> None:
    """A listed Failed is a refusal: nothing was applied."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, status="Failed")]
        settled = await provider.settle(CARD, HUNDRED, str(T0))
    assert settled == Refused(RefusalCode.REJECTED, "the provider reported the topup Failed")


@pytest.mark.anyio
@pytest.mark.parametrize("listed", [[item(T0)], [], [item(T0 + 1)], [item(T0, amount="99.00")]])
async def test_settle_pending_or_not_listed_is_still_pending(keys: Keys, listed: list[Any]) -> None:
    """Still Pending, or no item with that (card, amount, createdAt): not settled yet."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = listed
        assert isinstance(await provider.settle(CARD, HUNDRED, str(T0)), StillPending)


@pytest.mark.anyio
async def test_settle_unknown_status_is_still_pending_and_logged(
    keys: Keys, logs: list[dict[str, Any]]
) -> None:
    """An undocumented status settles nothing and is logged with its value."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, status="Reversed")]
        assert isinstance(await provider.settle(CARD, HUNDRED, str(T0)), StillPending)
    [event] = events(logs, "alix.status.unknown")
    assert event["status"] == "Reversed"


@pytest.mark.anyio
async def test_reconcile_finds_the_lost_pending_topup(keys: Keys) -> None:
    """A topup created just before our clock said we sent is ours: Applied(pending)."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 - 3)]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert settled.pending
    assert settled.provider_ref == str(T0 - 3)
    assert settled.transaction_id == f"tx-{T0 - 3}"


@pytest.mark.anyio
async def test_reconcile_finds_the_lost_settled_topup(keys: Keys) -> None:
    """Found already Success: applied, not pending."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, status="Success")]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert not settled.pending


@pytest.mark.anyio
@pytest.mark.parametrize(
    "listed",
    [
        [],
        [item(T0 - 6)],  # before the skew allowance: an earlier topup
        [item(T0 + 1, amount="50.00")],
    ],
)
async def test_reconcile_not_applied(keys: Keys, listed: list[Any]) -> None:
    """Nothing of that amount since the attempt: NotApplied, safe to resend."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = listed
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, NotApplied)


@pytest.mark.anyio
async def test_reconcile_of_a_topup_settled_failed_is_the_refusal_a_webhook_gives(
    keys: Keys,
) -> None:
    """Only a Failed topup of that amount since the attempt: Refused, as a Failed webhook
    settles it (the row fails), not NotApplied (which would send it again)."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, status="Failed")]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert settled == Refused(RefusalCode.REJECTED, "the provider reported the topup Failed")


@pytest.mark.anyio
async def test_reconcile_two_candidates_is_unknown(keys: Keys) -> None:
    """Two topups of that amount since the attempt: cannot tell which is ours."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 2), item(T0 + 1)]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Unknown)
    assert "cannot tell" in settled.message


@pytest.mark.anyio
async def test_reconcile_ignores_topups_the_ledger_already_knows(keys: Keys) -> None:
    """A topup the engine already recorded is not the lost one."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 2), item(T0 + 1)]
        settled = await provider.reconcile(
            CARD, HUNDRED, None, sent_at=at(T0), known_refs={str(T0 + 1)}
        )
    assert isinstance(settled, Applied)
    assert settled.provider_ref == str(T0 + 2)


@pytest.mark.anyio
async def test_reconcile_failed_earlier_and_pending_now(keys: Keys) -> None:
    """A Failed earlier attempt beside a Pending one: the Pending one is ours."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 2), item(T0 + 1, status="Failed")]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert settled.provider_ref == str(T0 + 2)


@pytest.mark.anyio
async def test_reconcile_unknown_status_is_unknown(keys: Keys, logs: list[dict[str, Any]]) -> None:
    """Found in an undocumented status: Unknown, and the value is logged."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, status="OnHold")]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Unknown)
    assert "'OnHold'" in settled.message
    assert events(logs, "alix.status.unknown")[0]["status"] == "OnHold"


@pytest.mark.anyio
async def test_reconcile_with_an_unreadable_list_is_unknown(keys: Keys) -> None:
    """The list failing every retry leaves the outcome unknown, never NotApplied."""
    async with alix(keys) as (fake, provider, _):
        fake.list_failures = 10
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Unknown)
    assert len(fake.list_queries) == 4


@pytest.mark.anyio
async def test_list_refused_with_4xx_is_not_retried(keys: Keys) -> None:
    """A 4xx to a read (a wrong --base-url, say) is an error at once, not a retry loop."""
    async with alix(keys, list_failures=10, list_failure_status=404) as (fake, provider, _):
        with pytest.raises(ProviderError, match="HTTP 404"):
            await provider.transactions(CARD)
    assert len(fake.list_queries) == 1


@pytest.mark.anyio
async def test_reconcile_retries_a_transient_list_failure(keys: Keys) -> None:
    """A read is safe to repeat: one 503 is retried and the topup still found."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1)]
        fake.list_failures = 1
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)


@pytest.mark.anyio
async def test_reconcile_without_send_time_is_unknown(keys: Keys) -> None:
    """Without `sent_at` the list cannot be searched: Unknown."""
    async with alix(keys) as (_, provider, _):
        settled = await provider.reconcile(CARD, HUNDRED, None)
    assert isinstance(settled, Unknown)


@pytest.mark.anyio
async def test_lost_answer_is_reconciled_end_to_end(keys: Keys) -> None:
    """A topup whose connection dropped is found in the list by its send time."""
    async with alix(keys, topup_mode="drop") as (fake, provider, _):
        sent_at = datetime.now(UTC)
        fake.next_created_at = math.floor(sent_at.timestamp()) - 1  # Alix's clock, a bit behind
        outcome = await provider.topup(CARD, HUNDRED)
        assert isinstance(outcome, Unknown)
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=sent_at)
    assert isinstance(settled, Applied)
    assert settled.pending
