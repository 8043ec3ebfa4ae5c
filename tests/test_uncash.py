"""The Uncash adapter against the sandbox over real HTTP: every documented answer and every way a
request can fail must land in the right outcome, and reconciliation must settle what was lost.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import runner.providers.uncash as uncash_module
from runner.errors import AuthenticationFailed, ProviderError
from runner.providers.base import (
    Applied,
    CardState,
    CardStatus,
    NotApplied,
    Outcome,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Unknown,
)
from runner.providers.http import HttpAnswer
from runner.providers.uncash import UncashProvider
from runner.providers.uncash_answers import classify_topup
from runner.sandbox import FaultKind, RunningSandbox, SandboxCard, SandboxConfig, serve_sandbox

TOKEN = "uc_" + "Tk7" * 13 + "q"
WRONG_TOKEN = "uc_" + "Zz9" * 13 + "w"
CARD = "3f9c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
OTHER = "9b2e7c1a-0d3f-4e5a-8b6c-7d8e9f0a1b2c"
HUNDRED = Decimal("100.00")
WAIT = re.compile(r"Please wait (\d+(?:\.\d+)?) seconds")


class FakeClock:
    """The sandbox's clock, moved by hand: cooldowns and rate limits without sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingThrottle:
    """A `Throttle` that never waits and remembers every call it got."""

    def __init__(self) -> None:
        self.acquired = 0
        self.slowed: list[float | None] = []

    async def acquire(self) -> None:
        self.acquired += 1

    def slow_down(self, retry_after: float | None) -> None:
        self.slowed.append(retry_after)


@asynccontextmanager
async def provider_at(
    base_url: str,
    *,
    token: str = TOKEN,
    client_timeout: float = 2.0,
    throttle: RecordingThrottle | None = None,
) -> AsyncIterator[UncashProvider]:
    provider = UncashProvider(token, base_url=base_url, timeout=client_timeout, throttle=throttle)
    try:
        yield provider
    finally:
        await provider.aclose()


@asynccontextmanager
async def running(
    *,
    client_token: str = TOKEN,
    client_timeout: float = 2.0,
    throttle: RecordingThrottle | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[RunningSandbox, UncashProvider]]:
    """A fresh sandbox (expecting TOKEN) in this event loop and a provider pointed at it."""
    settings.setdefault("token", TOKEN)
    async with (
        serve_sandbox(SandboxConfig(**settings)) as sb,
        provider_at(
            sb.base_url, token=client_token, client_timeout=client_timeout, throttle=throttle
        ) as provider,
    ):
        yield sb, provider


async def admin_cards(sb: RunningSandbox, *cards: dict[str, Any]) -> None:
    """Change cards through the sandbox's loopback admin route, as another client would."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(sb.root_url + "/_sandbox/cards", data=json.dumps({"cards": cards})) as answer,
    ):
        assert answer.status == 200, await answer.text()


def free_port() -> int:
    """A loopback port nobody listens on (bound, noted, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def body(payload: Any) -> str:
    return json.dumps(payload)


# -- applied topups -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_applied_new_version_matches_the_sandbox_record_exactly() -> None:
    """A newer-version answer yields every field exactly as the sandbox recorded it."""
    async with running() as (sb, provider):
        outcome = await provider.topup(CARD, Decimal("123.45"))
        record = sb.state.applied[-1]
    assert record.amount == Decimal("123.45")
    assert outcome == Applied(
        fee=record.fee,
        total_charged=record.total_charged,
        card_balance_after=record.card_balance_after,
        wallet_balance_after=record.wallet_balance_after,
        transaction_id=record.transaction_id,
        invoice_id=str(record.invoice_id),
    )
    assert isinstance(outcome.fee, Decimal)
    assert isinstance(outcome.wallet_balance_after, Decimal)


@pytest.mark.anyio
async def test_applied_old_version_parses_fee_total_and_card_balance() -> None:
    """An older-version answer yields fee, total and card balance; it has no wallet balance."""
    async with running(response_version="old") as (sb, provider):
        outcome = await provider.topup(CARD, HUNDRED)
        record = sb.state.applied[-1]
    assert isinstance(outcome, Applied)
    assert outcome.fee == record.fee == Decimal("3.00")
    assert outcome.total_charged == record.total_charged == Decimal("103.00")
    assert outcome.card_balance_after == record.card_balance_after == HUNDRED
    assert outcome.transaction_id == record.transaction_id
    assert outcome.wallet_balance_after is None
    assert outcome.invoice_id is None


@pytest.mark.anyio
async def test_whole_amount_is_sent_as_that_exact_amount() -> None:
    """An amount without decimals reaches the provider as exactly that amount."""
    async with running() as (sb, provider):
        await provider.topup(CARD, Decimal("250"))
        assert [r.amount for r in sb.state.applied] == [Decimal("250.00")]


@pytest.mark.anyio
async def test_every_topup_goes_through_the_throttle() -> None:
    """Each topup request first acquires the run's throttle."""
    throttle = RecordingThrottle()
    async with running(throttle=throttle) as (_, provider):
        await provider.topup(CARD, HUNDRED)
    assert throttle.acquired == 1
    assert throttle.slowed == []


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_insufficient_wallet_is_refused_for_good() -> None:
    """A wallet short of amount + fee is Refused(INSUFFICIENT_FUNDS); nothing moves."""
    async with running(wallet_balance=Decimal("50.00")) as (sb, provider):
        outcome = await provider.topup(CARD, HUNDRED)
        assert sb.state.applied == []
        assert sb.state.wallet == Decimal("50.00")
    assert outcome == Refused(
        RefusalCode.INSUFFICIENT_FUNDS,
        "Insufficient wallet balance. Required: 103.00 (topup: 100.00 + platform fee: 3.00), "
        "Available: 50.00",
    )


@pytest.mark.anyio
async def test_card_limit_is_refused_for_good() -> None:
    """A topup past the card's limit is Refused(CARD_LIMIT); nothing moves."""
    card = SandboxCard(CARD, deposit=Decimal("500"), limit=Decimal("1000"))
    async with running(cards=(card,)) as (sb, provider):
        outcome = await provider.topup(CARD, Decimal("600.00"))
        assert sb.state.applied == []
    assert outcome == Refused(
        RefusalCode.CARD_LIMIT,
        "Topup would exceed card limit. Current deposit: 500, Limit: 1000, Available: 500",
    )


@pytest.mark.anyio
async def test_unknown_card_is_refused_as_not_found() -> None:
    """A card the provider does not know is Refused(CARD_NOT_FOUND); nothing moves."""
    async with running(auto_create_cards=False) as (sb, provider):
        outcome = await provider.topup(CARD, HUNDRED)
        assert sb.state.applied == []
    assert outcome == Refused(RefusalCode.CARD_NOT_FOUND, "Card not found or access denied")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("amount", "zod_message"),
    [
        (Decimal("4.00"), "Minimum top-up amount is 5"),
        (Decimal("4.99"), "Minimum top-up amount is 5"),
        (Decimal("10000.01"), "Maximum top-up amount is 10000"),
    ],
)
async def test_amount_out_of_bounds_is_refused_with_the_zod_message(
    amount: Decimal, zod_message: str
) -> None:
    """An amount the provider's validation rejects is Refused(INVALID_AMOUNT) with its issues."""
    async with running() as (sb, provider):
        outcome = await provider.topup(CARD, amount)
        assert sb.state.applied == []
    assert isinstance(outcome, Refused)
    assert outcome.code is RefusalCode.INVALID_AMOUNT
    assert "Invalid input data" in outcome.message
    assert zod_message in outcome.message


@pytest.mark.anyio
@pytest.mark.parametrize("amount", [Decimal("5.001"), Decimal("5.005")])
async def test_amount_with_three_decimals_is_refused_not_rounded(amount: Decimal) -> None:
    """An amount with sub-cent digits is Refused(INVALID_AMOUNT); no rounded amount is applied."""
    async with running() as (sb, provider):
        outcome = await provider.topup(CARD, amount)
        assert sb.state.applied == []
    assert isinstance(outcome, Refused)
    assert outcome.code is RefusalCode.INVALID_AMOUNT


@pytest.mark.anyio
@pytest.mark.parametrize("status", ["frozen", "closed"])
async def test_inactive_card_refusal_is_unknown_and_reconciled(status: str) -> None:
    """Uncash documents no inactive-card refusal: Unknown, then proven not applied by reconcile."""
    async with running(cards=(SandboxCard(CARD, status=status),)) as (sb, provider):
        before = await provider.get_card(CARD)
        outcome = await provider.topup(CARD, HUNDRED)
        settled = await provider.reconcile(CARD, HUNDRED, before)
        assert sb.state.applied == []
    assert outcome == Unknown("HTTP 400, a refusal Uncash does not document: Card is not active")
    assert isinstance(settled, NotApplied)


# -- cooldown and rate limit ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("cooldown_status", [400, 429, 503])
async def test_cooldown_is_retry_later_after_the_seconds_in_the_message(
    cooldown_status: int,
) -> None:
    """ "Please wait N seconds" is RetryLater(COOLDOWN, after=N) whatever status carries it."""
    clock = FakeClock()
    async with running(cooldown=120, cooldown_status=cooldown_status, clock=clock) as (
        sb,
        provider,
    ):
        assert isinstance(await provider.topup(CARD, HUNDRED), Applied)
        clock.advance(33)
        outcome = await provider.topup(CARD, HUNDRED)
        assert len(sb.state.applied) == 1
    assert outcome == RetryLater(
        RetryKind.COOLDOWN, "Please wait 87 seconds before topping up this card again", after=87.0
    )


@pytest.mark.anyio
async def test_cooldown_carried_by_429_does_not_slow_the_whole_run() -> None:
    """A card's cooldown, even sent as 429, is the card's wait and not a rate limit."""
    clock = FakeClock()
    throttle = RecordingThrottle()
    async with running(cooldown=120, cooldown_status=429, clock=clock, throttle=throttle) as (
        _,
        provider,
    ):
        await provider.topup(CARD, HUNDRED)
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.COOLDOWN
    assert throttle.slowed == []


@pytest.mark.anyio
async def test_sub_second_cooldown_is_honoured_to_the_hundredth() -> None:
    """A fractional wait ("0.15 seconds") is read exactly, not truncated to 0."""
    clock = FakeClock()
    async with running(cooldown=0.2, clock=clock) as (_, provider):
        await provider.topup(CARD, HUNDRED)
        clock.advance(0.05)
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.COOLDOWN
    assert outcome.after == pytest.approx(0.15)


@pytest.mark.anyio
async def test_rate_limit_is_retry_later_and_slows_the_throttle() -> None:
    """A 429 is RetryLater(RATE_LIMITED, after=Retry-After) and calls the throttle's slow_down."""
    clock = FakeClock()
    throttle = RecordingThrottle()
    async with running(rate_limit=0.5, rate_burst=1, clock=clock, throttle=throttle) as (
        sb,
        provider,
    ):
        assert isinstance(await provider.topup(CARD, HUNDRED), Applied)
        outcome = await provider.topup(OTHER, HUNDRED)
        assert [r.card_id for r in sb.state.applied] == [CARD]
    assert outcome == RetryLater(
        RetryKind.RATE_LIMITED, "Too many requests, please try again later", after=2.0
    )
    assert throttle.slowed == [2.0]


# -- authentication -------------------------------------------------------------------------


async def _topup(provider: UncashProvider) -> object:
    return await provider.topup(CARD, HUNDRED)


async def _wallet(provider: UncashProvider) -> object:
    return await provider.wallet_balance()


async def _card(provider: UncashProvider) -> object:
    return await provider.get_card(CARD)


async def _cards(provider: UncashProvider) -> object:
    return await provider.list_cards()


@pytest.mark.anyio
@pytest.mark.parametrize("call", [_topup, _wallet, _card, _cards])
async def test_wrong_token_raises_authentication_failed(
    call: Callable[[UncashProvider], Awaitable[object]],
) -> None:
    """A 401 raises AuthenticationFailed (it stops the run) and nothing is applied."""
    async with running(client_token=WRONG_TOKEN) as (sb, provider):
        with pytest.raises(AuthenticationFailed):
            await call(provider)
        assert sb.state.applied == []


@pytest.mark.anyio
@pytest.mark.parametrize("call", [_topup, _wallet, _card])
async def test_token_never_shows_in_the_error_or_the_repr(
    call: Callable[[UncashProvider], Awaitable[object]],
) -> None:
    """Neither the raised error nor repr(provider) carries the API token."""
    async with running(client_token=WRONG_TOKEN) as (_, provider):
        with pytest.raises(AuthenticationFailed) as raised:
            await call(provider)
        shown = [str(raised.value), repr(raised.value), repr(provider), str(provider)]
    assert all(WRONG_TOKEN not in text and WRONG_TOKEN[3:] not in text for text in shown)


@pytest.mark.anyio
async def test_a_refused_token_names_the_provider_and_status_as_attributes() -> None:
    """The error carries its context as attributes (provider, HTTP status), not only in words."""
    async with running(client_token=WRONG_TOKEN) as (_, provider):
        with pytest.raises(AuthenticationFailed) as raised:
            await provider.get_card("c1")
    assert (raised.value.provider, raised.value.status) == ("uncash", 401)


@pytest.mark.anyio
async def test_a_get_that_fails_names_the_card_and_status_as_attributes() -> None:
    """A card read that fails carries the card id and the HTTP status as attributes."""
    script = Scripted((404, '{"success": false, "message": "no route"}', {}))
    async with scripted_server(script) as url, provider_at(url) as provider:
        with pytest.raises(ProviderError) as raised:
            await provider.get_card("c-404")
    assert (raised.value.card_id, raised.value.status) == ("c-404", 404)


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "applied"),
    [
        (FaultKind.DROP_BEFORE, False),
        (FaultKind.DROP_AFTER, True),
        (FaultKind.ERROR_BEFORE, False),
    ],
)
async def test_lost_answer_is_unknown(kind: FaultKind, applied: bool) -> None:
    """A dropped connection or a proxy's 502 page is Unknown, whether or not money moved."""
    async with running() as (sb, provider):
        sb.faults.script(kind, card_id=CARD)
        outcome = await provider.topup(CARD, HUNDRED)
        assert [r.fault for r in sb.state.applied] == ([kind] if applied else [])
    assert isinstance(outcome, Unknown)


@pytest.mark.anyio
@pytest.mark.parametrize(("seed", "status"), [(2, "HTTP 500"), (0, "HTTP 502")])
async def test_error_after_applying_is_unknown(seed: int, status: str) -> None:
    """A 500 envelope or a 502 page after the topup applied is Unknown, never a refusal."""
    async with running(seed=seed) as (sb, provider):
        sb.faults.script(FaultKind.ERROR_AFTER, card_id=CARD)
        outcome = await provider.topup(CARD, HUNDRED)
        assert [r.fault for r in sb.state.applied] == [FaultKind.ERROR_AFTER]
    assert isinstance(outcome, Unknown)
    assert outcome.message.startswith(status)


@pytest.mark.anyio
async def test_answer_slower_than_the_timeout_is_unknown() -> None:
    """A client timeout shorter than the server's delay is Unknown (the topup applied)."""
    async with running(client_timeout=0.2, slow_seconds=2.0) as (sb, provider):
        sb.faults.script(FaultKind.SLOW, card_id=CARD)
        outcome = await provider.topup(CARD, HUNDRED)
        assert [r.fault for r in sb.state.applied] == [FaultKind.SLOW]
    assert outcome == Unknown("no answer before the timeout")


@pytest.mark.anyio
async def test_spurious_rate_limit_is_retry_later_and_slows_the_throttle() -> None:
    """A spurious 429 (Retry-After: 1) is RetryLater(RATE_LIMITED, 1.0) and slows the run."""
    throttle = RecordingThrottle()
    async with running(throttle=throttle) as (sb, provider):
        sb.faults.script(FaultKind.RATE_LIMITED, card_id=CARD)
        outcome = await provider.topup(CARD, HUNDRED)
        assert sb.state.applied == []
    assert isinstance(outcome, RetryLater)
    assert (outcome.kind, outcome.after) == (RetryKind.RATE_LIMITED, 1.0)
    assert throttle.slowed == [1.0]


@pytest.mark.anyio
async def test_spurious_cooldown_is_retry_later_after_its_seconds() -> None:
    """A spurious "Please wait N seconds" is RetryLater(COOLDOWN, after=N)."""
    async with running(seed=7) as (sb, provider):
        sb.faults.script(FaultKind.COOLDOWN, card_id=CARD)
        outcome = await provider.topup(CARD, HUNDRED)
        assert sb.state.applied == []
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.COOLDOWN
    wait = WAIT.search(outcome.message)
    assert wait is not None
    assert outcome.after == float(wait.group(1))


@pytest.mark.anyio
async def test_connection_refused_is_safe_to_retry() -> None:
    """A refused connection sent nothing: RetryLater(TRANSIENT)."""
    async with provider_at(f"http://127.0.0.1:{free_port()}/api/v1") as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT


# -- reconcile ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [FaultKind.DROP_AFTER, FaultKind.ERROR_AFTER])
async def test_reconcile_finds_a_lost_topup_that_applied(kind: FaultKind) -> None:
    """After an answer lost once applied, reconcile says Applied, with the transaction id."""
    async with running() as (sb, provider):
        before = await provider.get_card(CARD)
        assert before is not None
        sb.faults.script(kind, card_id=CARD)
        assert isinstance(await provider.topup(CARD, HUNDRED), Unknown)
        settled = await provider.reconcile(CARD, HUNDRED, before)
        record = sb.state.applied[-1]
    assert settled == Applied(
        card_balance_after=record.card_balance_after,
        transaction_id=record.transaction_id,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [FaultKind.DROP_BEFORE, FaultKind.ERROR_BEFORE])
async def test_reconcile_proves_a_lost_topup_did_not_apply(kind: FaultKind) -> None:
    """After an answer lost before applying, reconcile says NotApplied."""
    async with running() as (sb, provider):
        before = await provider.get_card(CARD)
        assert before is not None
        sb.faults.script(kind, card_id=CARD)
        assert isinstance(await provider.topup(CARD, HUNDRED), Unknown)
        settled = await provider.reconcile(CARD, HUNDRED, before)
    assert isinstance(settled, NotApplied)


@pytest.mark.anyio
async def test_reconcile_cannot_tell_when_another_topup_moved_the_deposit() -> None:
    """A deposit moved by both the lost topup and another one is Unknown, not Applied."""
    clock = FakeClock()
    async with running(cooldown=120, clock=clock) as (sb, provider):
        before = await provider.get_card(CARD)
        assert before is not None
        sb.faults.script(FaultKind.DROP_AFTER, card_id=CARD)
        assert isinstance(await provider.topup(CARD, HUNDRED), Unknown)
        clock.advance(120)
        assert isinstance(await provider.topup(CARD, Decimal("50.00")), Applied)
        settled = await provider.reconcile(CARD, HUNDRED, before)
    assert settled == Unknown("the card's deposit moved by 150.00, neither 0 nor the amount 100.00")


@pytest.mark.anyio
async def test_reconcile_cannot_tell_when_the_card_changed_elsewhere() -> None:
    """A deposit moved by neither 0 nor the amount (changed outside this run) is Unknown."""
    async with running() as (sb, provider):
        before = await provider.get_card(CARD)
        assert before is not None
        sb.faults.script(FaultKind.DROP_BEFORE, card_id=CARD)
        assert isinstance(await provider.topup(CARD, HUNDRED), Unknown)
        await admin_cards(sb, {"card_id": CARD, "deposit": "7.00", "balance": "7.00"})
        settled = await provider.reconcile(CARD, HUNDRED, before)
    assert isinstance(settled, Unknown)


@pytest.mark.anyio
async def test_reconcile_falls_back_to_the_balance_without_a_deposit() -> None:
    """With no deposit in the snapshot, a balance moved by exactly the amount is Applied."""
    async with running() as (sb, provider):
        before = CardState(CARD, CardStatus.ACTIVE, balance=Decimal("0.00"), deposit=None)
        sb.faults.script(FaultKind.DROP_AFTER, card_id=CARD)
        await provider.topup(CARD, HUNDRED)
        settled = await provider.reconcile(CARD, HUNDRED, before)
        record = sb.state.applied[-1]
    assert settled == Applied(card_balance_after=HUNDRED, transaction_id=record.transaction_id)


@pytest.mark.anyio
async def test_reconcile_of_a_card_no_longer_visible_is_unknown() -> None:
    """A card the provider no longer shows cannot be reconciled: Unknown."""
    async with running(auto_create_cards=False) as (_, provider):
        before = CardState(CARD, CardStatus.ACTIVE, balance=Decimal("0.00"), deposit=Decimal("0"))
        settled = await provider.reconcile(CARD, HUNDRED, before)
    assert isinstance(settled, Unknown)


# -- reads ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("version", ["new", "old"])
async def test_get_card_reads_exact_decimals(version: str) -> None:
    """get_card returns the card's status, balance and deposit as exact Decimals."""
    card = SandboxCard(CARD, status="frozen", balance=Decimal("12.34"), deposit=Decimal("56.78"))
    async with running(cards=(card,), response_version=version) as (_, provider):
        state = await provider.get_card(CARD)
    assert state == CardState(
        CARD, CardStatus.FROZEN, balance=Decimal("12.34"), deposit=Decimal("56.78")
    )


@pytest.mark.anyio
async def test_get_card_of_a_missing_card_is_none() -> None:
    """get_card of a card the provider does not know returns None."""
    async with running(auto_create_cards=False) as (_, provider):
        assert await provider.get_card(CARD) is None


@pytest.mark.anyio
async def test_list_cards_reads_every_card_exactly() -> None:
    """list_cards maps every card's id to its exact state."""
    cards = (
        SandboxCard(CARD, balance=Decimal("1.10"), deposit=Decimal("2.20")),
        SandboxCard(OTHER, status="closed", balance=Decimal("0.01"), deposit=Decimal("9999.99")),
    )
    async with running(cards=cards) as (_, provider):
        states = await provider.list_cards()
    assert states == {
        CARD: CardState(CARD, CardStatus.ACTIVE, Decimal("1.10"), Decimal("2.20")),
        OTHER: CardState(OTHER, CardStatus.CLOSED, Decimal("0.01"), Decimal("9999.99")),
    }


@pytest.mark.anyio
async def test_wallet_balance_is_exact() -> None:
    """wallet_balance returns the wallet as an exact Decimal."""
    async with running(wallet_balance=Decimal("1234567.89")) as (_, provider):
        balance = await provider.wallet_balance()
    assert balance == Decimal("1234567.89")
    assert isinstance(balance, Decimal)


@pytest.mark.anyio
async def test_wallet_balance_follows_a_topup_to_the_cent() -> None:
    """After a topup the wallet reads exactly the balance the topup answer gave."""
    async with running(wallet_balance=Decimal("1000.00")) as (_, provider):
        outcome = await provider.topup(CARD, Decimal("10.01"))
        balance = await provider.wallet_balance()
    assert isinstance(outcome, Applied)
    assert balance == outcome.wallet_balance_after == Decimal("989.24")


class Scripted:
    """A tiny loopback server answering requests with scripted (status, body, headers) in turn."""

    def __init__(self, *answers: tuple[int, str, dict[str, str]]) -> None:
        self.answers = list(answers)
        self.seen = 0

    async def handle(self, request: web.Request) -> web.Response:
        status, text, headers = self.answers[min(self.seen, len(self.answers) - 1)]
        self.seen += 1
        return web.Response(
            status=status, text=text, headers=headers, content_type="application/json"
        )


@asynccontextmanager
async def scripted_server(script: Scripted) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    app_runner = web.AppRunner(app, access_log=None)
    await app_runner.setup()
    try:
        site = web.TCPSite(app_runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{app_runner.addresses[0][1]}/api/v1"
    finally:
        await app_runner.cleanup()


WALLET_OK: tuple[int, str, dict[str, str]] = (
    200,
    '{"success": true, "data": {"balance": 42.50}}',
    {},
)


@pytest.mark.anyio
async def test_get_is_retried_after_a_5xx() -> None:
    """A GET answered 503 is sent again, and the next good answer is used."""
    script = Scripted((503, "<html>busy</html>", {}), WALLET_OK)
    async with scripted_server(script) as url, provider_at(url) as provider:
        assert await provider.wallet_balance() == Decimal("42.50")
    assert script.seen == 2


@pytest.mark.anyio
async def test_get_answered_429_slows_the_throttle_and_retries() -> None:
    """A GET answered 429 tells the throttle its Retry-After, then is sent again."""
    throttle = RecordingThrottle()
    script = Scripted((429, body({"message": "slow"}), {"Retry-After": "0"}), WALLET_OK)
    async with scripted_server(script) as url, provider_at(url, throttle=throttle) as provider:
        assert await provider.wallet_balance() == Decimal("42.50")
    assert throttle.slowed == [0.0]
    assert throttle.acquired == 2


@pytest.mark.anyio
async def test_get_that_keeps_failing_raises_provider_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GET that fails every attempt raises ProviderError instead of looping."""
    monkeypatch.setattr(uncash_module, "_GET_ATTEMPTS", 1)
    script = Scripted((503, "<html>busy</html>", {}))
    async with scripted_server(script) as url, provider_at(url) as provider:
        with pytest.raises(ProviderError, match="HTTP 503"):
            await provider.wallet_balance()


# -- classify_topup: shapes the sandbox cannot produce --------------------------------------


def answer(
    status: int,
    payload: Any = None,
    *,
    text: str | None = None,
    card_id: str = CARD,
    amount: Decimal = HUNDRED,
    **kw: Any,
) -> Outcome:
    """The answer's meaning for a topup of `amount` (100.00) on `card_id` (CARD)."""
    sent = HttpAnswer(status, body(payload) if text is None else text, **kw)
    return classify_topup(sent, card_id, amount)


DOCUMENTED_REFUSALS = [
    (
        "Insufficient wallet balance. Required: 105.40 (topup: 100.00 + platform fee: 5.40), "
        "Available: 50.00",
        RefusalCode.INSUFFICIENT_FUNDS,
    ),
    (
        "Topup would exceed card limit. Current deposit: 500, Limit: 1000, Available: 500",
        RefusalCode.CARD_LIMIT,
    ),
    ("Card not found or access denied", RefusalCode.CARD_NOT_FOUND),
    ("Invalid input data", RefusalCode.INVALID_AMOUNT),
]


@pytest.mark.parametrize("status", [200, 400, 403, 404, 409, 422])
@pytest.mark.parametrize(("message", "code"), DOCUMENTED_REFUSALS)
def test_documented_refusal_is_read_from_its_message(
    status: int, message: str, code: RefusalCode
) -> None:
    """A documented refusal message (success:false) gives its code whatever 2xx/4xx carries it."""
    payload = {"success": False, "message": message, "timestamp": "2025-11-22T10:00:00.000Z"}
    assert answer(status, payload) == Refused(code, message)


def test_documented_validation_error_keeps_the_zod_messages() -> None:
    """The documented validation error is INVALID_AMOUNT with each issue's message in the text."""
    payload = {
        "success": False,
        "message": "Invalid input data",
        "error": [
            {"code": "too_small", "minimum": 5, "message": "Minimum top-up amount is 5"},
            {"code": "custom", "message": "Amount must have at most 2 decimal places"},
        ],
    }
    assert answer(400, payload) == Refused(
        RefusalCode.INVALID_AMOUNT,
        "Invalid input data: Minimum top-up amount is 5; Amount must have at most 2 decimal places",
    )


def test_documented_cooldown_in_a_200_is_retry_later() -> None:
    """The cooldown message is RetryLater(COOLDOWN, 87) even inside a 200 success:false."""
    message = "Please wait 87 seconds before topping up this card again"
    outcome = answer(200, {"success": False, "message": message})
    assert outcome == RetryLater(RetryKind.COOLDOWN, message, after=87.0)


def test_documented_success_example_is_applied_exactly() -> None:
    """The documented success example (invoice id made valid JSON) gives exact Decimals."""
    text = (
        '{"success": true, "message": "Card topped up successfully", "data": {'
        '"card_id": "card-id", "transaction_id": "tx-id", "invoice_id": 1, '
        '"wallet_balance": 1000.00, "total_charged": 1.0, "platform_fee_amount": 0.1, '
        '"new_card_balance": 10}, "timestamp": "2025-11-22T11:14:39.907Z"}'
    )
    # The example charged 1.0 with a fee of 0.1: a topup of 0.90 on card-id.
    assert answer(200, text=text, card_id="card-id", amount=Decimal("0.90")) == Applied(
        fee=Decimal("0.1"),
        total_charged=Decimal("1.0"),
        card_balance_after=Decimal("10"),
        wallet_balance_after=Decimal("1000.00"),
        transaction_id="tx-id",
        invoice_id="1",
    )


def test_documented_example_verbatim_is_not_json_so_unknown() -> None:
    """The docs' example (`"invoice_id": 00001`) is not JSON: Unknown, never a guess."""
    text = '{"success": true, "data": {"invoice_id": 00001, "new_card_balance": 10}}'
    assert isinstance(answer(200, text=text), Unknown)


@pytest.mark.parametrize("text", ["<html>OK</html>", "", "null", "[1, 2]", '{"data": {}}'])
def test_2xx_without_a_readable_verdict_is_unknown(text: str) -> None:
    """A 200 whose body is not an envelope with a boolean success is Unknown."""
    assert isinstance(answer(200, text=text), Unknown)


def test_success_with_garbage_fields_is_applied_with_none_fields() -> None:
    """success:true with unreadable money fields is Applied with those fields None, no crash;
    an unreadable amount confirms nothing and is named as a discrepancy."""
    payload = {
        "success": True,
        "data": {
            "amount": "abc",
            "platform_fee_amount": "abc",
            "total_charged": {"value": 1},
            "new_card_balance": True,
            "wallet_balance": "NaN",
            "transaction_id": None,
        },
    }
    assert answer(200, payload) == Applied(
        discrepancy="the answer's amount (abc) is not an amount; 100.00 was sent"
    )


def applied(**data: Any) -> Outcome:
    """The answer to a topup of 100.00 on CARD: the newer version's fields, changed by `data`."""
    fields: dict[str, Any] = {
        "card_id": CARD,
        "transaction_id": "tx-1",
        "invoice_id": 7,
        "wallet_balance": 897,
        "total_charged": 103,
        "platform_fee_amount": 3,
        "new_card_balance": 100,
    } | data
    return answer(200, {"success": True, "data": fields})


def test_answer_as_sent_has_no_discrepancy() -> None:
    """The card and the amount sent, total = amount + fee: a clean Applied."""
    outcome = applied()
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy is None


def test_answer_naming_another_card_is_applied_with_a_discrepancy() -> None:
    """An answer for another card is Applied (money moved) with the discrepancy named."""
    outcome = applied(card_id=OTHER)
    assert isinstance(outcome, Applied)
    assert outcome.transaction_id == "tx-1"
    assert outcome.discrepancy == f"the answer names card {OTHER}, not {CARD}"


@pytest.mark.parametrize("spelling", [CARD.upper(), f"  {CARD}  ", "{" + CARD.upper() + "}"])
def test_answer_naming_the_card_in_another_spelling_is_clean(spelling: str) -> None:
    """Uncash identifies cards by UUID: another case or spelling of it is the same card."""
    outcome = applied(card_id=spelling)
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy is None


@pytest.mark.parametrize("card", [None, 12345, True, {"id": CARD}])
def test_answer_with_a_card_id_that_is_no_id(card: Any) -> None:
    """No card id is no claim (None); one that is not text or a number is a discrepancy."""
    outcome = applied(card_id=card)
    assert isinstance(outcome, Applied)
    assert (outcome.discrepancy is None) == (card is None)


def test_total_charged_that_is_not_amount_plus_fee_is_a_discrepancy() -> None:
    """total_charged is documented as amount + fee: 1003.00 - 3.00 is not the 100.00 sent."""
    outcome = applied(total_charged=1003)
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy == (
        "the answer's total_charged 1003.00 minus its fee 3.00 is 1000.00, not the 100.00 sent"
    )


def test_older_version_total_is_checked_with_its_fee_name() -> None:
    """The older version's `platform_fee` takes part in the same check."""
    outcome = applied(platform_fee_amount=None, platform_fee=13)
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy is not None
    assert "minus its fee 13.00 is 90.00" in outcome.discrepancy


def test_amount_in_the_answer_other_than_sent_is_a_discrepancy() -> None:
    """An `amount` in the answer (undocumented, but if present) must be the amount sent."""
    outcome = applied(amount=10, total_charged=13)
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy == (
        "the answer's amount is 10.00, not the 100.00 sent; "
        "the answer's total_charged 13.00 minus its fee 3.00 is 10.00, not the 100.00 sent"
    )


@pytest.mark.anyio
async def test_topup_sent_with_an_upper_case_card_id_is_clean() -> None:
    """The sandbox answers the card id lower-cased; the same UUID is no discrepancy."""
    async with running() as (_, provider):
        outcome = await provider.topup(CARD.upper(), HUNDRED)
    assert isinstance(outcome, Applied)
    assert outcome.card_balance_after == HUNDRED
    assert outcome.discrepancy is None


@pytest.mark.parametrize("data", [None, [], "ok"])
def test_success_without_a_data_object_is_applied(data: Any) -> None:
    """success:true with no data object is still Applied (the provider said so)."""
    assert answer(200, {"success": True, "data": data}) == Applied()


@pytest.mark.parametrize("status", [301, 302, 304, 307])
def test_redirect_is_unknown(status: int) -> None:
    """A 3xx (redirects are not followed) proves nothing: Unknown."""
    assert isinstance(answer(status, text=""), Unknown)


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 418, 422])
def test_4xx_with_an_html_page_is_unknown(status: int) -> None:
    """A 4xx outside the documented messages (a proxy's page) proves nothing: Unknown."""
    outcome = answer(status, text="<html><body><h1>I'm a teapot</h1></body></html>")
    assert isinstance(outcome, Unknown)
    assert f"HTTP {status}" in outcome.message
    assert "teapot" in outcome.message


@pytest.mark.parametrize("status", [200, 400, 403, 404, 409, 422])
@pytest.mark.parametrize(
    "message",
    [
        "Card is not active",
        "Internal server error",
        "Transaction failed",
        "Topup failed after the wallet was charged",
        "Card frozen by issuer",
        "Upstream connection closed",
        "",
    ],
)
def test_undocumented_refusal_is_unknown(status: int, message: str) -> None:
    """success:false (or a 4xx) in words Uncash does not document may follow money that moved."""
    outcome = answer(status, {"success": False, "message": message})
    assert isinstance(outcome, Unknown)
    assert f"HTTP {status}" in outcome.message
    assert message in outcome.message


@pytest.mark.parametrize(
    "message",
    [
        "Error: Insufficient wallet balance reported after the card was credited",
        "Processing failed (Card not found or access denied on the issuer's side)",
        "Unexpected: Topup would exceed card limit",
    ],
)
def test_documented_words_inside_another_message_are_not_final(message: str) -> None:
    """Documented words are a refusal only where the message opens with them."""
    assert isinstance(answer(400, {"success": False, "message": message}), Unknown)


def test_documented_refusal_from_a_5xx_is_unknown() -> None:
    """A documented message carried by a 5xx does not make it final: Unknown."""
    payload = {"success": False, "message": "Insufficient wallet balance. Required: 1"}
    assert isinstance(answer(502, payload), Unknown)


def test_long_refusal_message_is_kept_to_one_short_line() -> None:
    """A provider's message of any length reaches outcomes (ledger, logs) cut to 300 chars."""
    payload = {"success": False, "message": "Invalid input data " + "x" * 100_000}
    outcome = answer(400, payload)
    assert isinstance(outcome, Refused)
    assert outcome.code is RefusalCode.INVALID_AMOUNT
    assert len(outcome.message) <= 301


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_unknown(status: int) -> None:
    """A 5xx may come after the topup applied: Unknown."""
    assert isinstance(answer(status, text="<html>Service Unavailable</html>"), Unknown)


def test_request_timeout_408_is_transient() -> None:
    """408 means the server gave up before processing: RetryLater(TRANSIENT)."""
    outcome = answer(408, text="")
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT


def test_401_raises_authentication_failed() -> None:
    """The documented 401 body raises AuthenticationFailed."""
    payload = {"success": False, "message": "Unauthorized", "error": "Invalid or missing API token"}
    with pytest.raises(AuthenticationFailed):
        answer(401, payload)


def test_429_with_an_http_date_waits_until_that_date() -> None:
    """A Retry-After given as an HTTP date is the seconds until that date."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    outcome = answer(429, {"success": False, "message": "slow down"}, retry_after=when)
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.RATE_LIMITED
    assert outcome.after is not None
    assert 28.0 <= outcome.after <= 30.0


def test_429_without_retry_after_leaves_the_wait_to_us() -> None:
    """A 429 with no Retry-After is RATE_LIMITED with after None (our own backoff)."""
    assert answer(429, text="") == RetryLater(
        RetryKind.RATE_LIMITED, "HTTP 429 Too Many Requests", after=None
    )


@pytest.mark.parametrize("when", ["Sun Nov  6 08:49:37 1994", "Sun, 06 Nov 1994 08:49:37 -0000"])
def test_429_with_a_date_without_zone_is_rate_limited(when: str) -> None:
    """A Retry-After in the asctime form (which HTTP recipients must accept) does not crash."""
    outcome = answer(429, text="", retry_after=when)
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.RATE_LIMITED
    assert outcome.after in (0.0, None)  # a date in the past: no wait, or our own backoff


@pytest.mark.parametrize("value", ["Infinity", "1e400"])
def test_429_with_a_non_numeric_retry_after_never_waits_for_ever(value: str) -> None:
    """A Retry-After that is not delta-seconds or a date gives a finite wait or none."""
    outcome = answer(429, text="", retry_after=value)
    assert isinstance(outcome, RetryLater)
    assert outcome.after is None or outcome.after < 1e9
