"""Alix topups and fee quotes over real HTTP (runner.providers.alix, alix_session) against a
tiny fake Alix: what is sent, and what every failed request means.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, cast

import anyio
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runner.errors import (
    AuthenticationFailed,
    ConfigError,
    NotDocumented,
    ProviderError,
)
from runner.providers.alix import AlixProvider
from runner.providers.alix_answers import RULES
from runner.providers.base import (
    Applied,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Unknown,
)
from tests.alix_fake import (
    CARD,
    HUNDRED,
    T0,
    FakeAlix,
    FakeClock,
    Keys,
    RecordingThrottle,
    alix,
    credentials,
    envelope,
    events,
    free_port,
    make_keys,
    serving,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield cast("list[dict[str, Any]]", captured)  # structlog's event dicts


# -- topups over HTTP -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_topup_sends_the_amount_as_a_two_decimal_string(keys: Keys) -> None:
    """The body is {"cardId", "amount": "100.00"}, the amount a JSON string."""
    async with alix(keys) as (fake, provider, _):
        outcome = await provider.topup(CARD, Decimal("100"))
    assert json.loads(fake.topup_bodies[0]) == {"cardId": CARD, "amount": "100.00"}
    assert isinstance(outcome, Applied)
    assert outcome.pending
    assert outcome.fee == Decimal("1.00")
    assert outcome.provider_ref == str(T0 + 1)


@pytest.mark.anyio
async def test_topup_keeps_cents_exactly(keys: Keys) -> None:
    """An amount with cents is sent with exactly those cents."""
    async with alix(keys) as (fake, provider, _):
        await provider.topup(CARD, Decimal("1234.5"))
    assert json.loads(fake.topup_bodies[0])["amount"] == "1234.50"


@pytest.mark.anyio
async def test_more_than_two_decimals_is_refused_without_sending(keys: Keys) -> None:
    """An amount beyond cents is refused locally; not even a token is asked for."""
    async with alix(keys) as (fake, provider, _):
        outcome = await provider.topup(CARD, Decimal("10.005"))
    assert outcome == Refused(
        RefusalCode.INVALID_AMOUNT, "10.005 has more than two decimals: not sent"
    )
    assert fake.topup_bodies == []
    assert fake.issued == 0


@pytest.mark.anyio
async def test_every_request_goes_through_the_throttle(keys: Keys) -> None:
    """The token call and the topup each acquire the run's throttle."""
    throttle = RecordingThrottle()
    async with alix(keys, throttle=throttle) as (_, provider, _):
        await provider.topup(CARD, HUNDRED)
    assert throttle.acquired == 2


@pytest.mark.anyio
async def test_429_slows_the_run_down(keys: Keys) -> None:
    """A 429 tells the throttle its Retry-After and is RetryLater(RATE_LIMITED)."""
    throttle = RecordingThrottle()
    async with alix(keys, throttle=throttle) as (fake, provider, _):
        fake.scripted.append(
            (429, envelope(None, success=False, message="Slow"), {"Retry-After": "3"})
        )
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == RetryLater(RetryKind.RATE_LIMITED, "Slow", after=3.0)
    assert throttle.slowed == [3.0]


@pytest.mark.anyio
async def test_success_false_over_http_is_refused(keys: Keys) -> None:
    """HTTP 200 with success:false and a final refusal's words reaches the engine as one."""
    async with alix(keys) as (fake, provider, _):
        message = "Insufficient balance"
        fake.scripted.append((200, envelope(None, success=False, message=message, code=9), {}))
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == Refused(RefusalCode.INSUFFICIENT_FUNDS, "Insufficient balance (errorCode 9)")


@pytest.mark.anyio
async def test_undocumented_refusal_over_http_is_unknown(keys: Keys) -> None:
    """HTTP 200 with success:false in other words reaches the engine as Unknown."""
    async with alix(keys) as (fake, provider, _):
        fake.scripted.append((200, envelope(None, success=False, message="Nope", code=9), {}))
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == Unknown("HTTP 200, a refusal not known to be final: Nope (errorCode 9)")


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "body"), [(502, "Bad Gateway"), (200, "<html>ok</html>")])
async def test_unreadable_answers_over_http_are_unknown(keys: Keys, status: int, body: str) -> None:
    """A 5xx or a 200 that is not JSON: money may have moved."""
    async with alix(keys) as (fake, provider, _):
        fake.scripted.append((status, body, {}))
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Unknown)


@pytest.mark.anyio
async def test_dropped_connection_after_sending_is_unknown(keys: Keys) -> None:
    """The server read the topup and closed the connection: Unknown."""
    async with alix(keys, topup_mode="drop") as (fake, provider, _):
        outcome = await provider.topup(CARD, HUNDRED)
    assert len(fake.transactions[CARD]) == 1
    assert isinstance(outcome, Unknown)


@pytest.mark.anyio
async def test_timeout_after_sending_is_unknown(keys: Keys) -> None:
    """No answer before the timeout: Unknown."""
    async with alix(keys, topup_mode="hang", client_timeout=0.2) as (fake, provider, _):
        await provider.tokens.current()  # the token arrives in time; the topup does not
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == Unknown("no answer before the timeout")
    assert len(fake.topup_bodies) == 1


@pytest.mark.anyio
async def test_connection_refused_is_transient(keys: Keys) -> None:
    """Once the server is gone, connecting fails before anything is sent: RetryLater."""
    clock = FakeClock()
    public = serialization.load_pem_public_key(keys.public_pem)
    assert isinstance(public, rsa.RSAPublicKey)
    fake = FakeAlix(public, clock)
    async with serving(fake) as base_url:
        provider = AlixProvider(credentials(keys), base_url=base_url, clock=clock, retry_delay=0)
        try:
            await provider.tokens.current()
        except BaseException:
            await provider.aclose()
            raise
    try:
        await anyio.sleep(0.01)  # the closed keep-alive connection leaves the pool
        outcome = await provider.topup(CARD, HUNDRED)
    finally:
        await provider.aclose()
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT
    assert outcome.message.startswith("cannot connect")


@pytest.mark.anyio
async def test_no_token_to_be_had_is_transient(keys: Keys) -> None:
    """Nobody listens: no token, so the topup was never sent and may be retried."""
    provider = AlixProvider(
        credentials(keys), base_url=f"http://127.0.0.1:{free_port()}/api/v2", retry_delay=0
    )
    try:
        outcome = await provider.topup(CARD, HUNDRED)
    finally:
        await provider.aclose()
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT
    assert outcome.message.startswith("no access token")


def test_base_url_is_required(keys: Keys) -> None:
    """Alix publishes no URL: an empty base URL is a configuration error."""
    with pytest.raises(ConfigError, match="--base-url"):
        AlixProvider(credentials(keys), base_url=" ")


@pytest.mark.anyio
async def test_undocumented_reads_say_so(keys: Keys) -> None:
    """Wallet and card reads are not guessed at: the rules say so and the calls raise."""
    assert RULES.reads_wallet is False
    assert RULES.reads_cards is False
    assert RULES.min_amount == Decimal("10.00")
    assert RULES.max_amount == Decimal("10000.00")
    provider = AlixProvider(credentials(keys), base_url="http://127.0.0.1:9/api/v2")
    with pytest.raises(NotDocumented, match="Alix documents no wallet-balance endpoint"):
        await provider.wallet_balance()
    with pytest.raises(ProviderError):
        await provider.get_card(CARD)
    with pytest.raises(ProviderError):
        await provider.list_cards()
    await provider.aclose()


# -- topup-check ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_topup_check_quotes_net_amount_and_fee(keys: Keys) -> None:
    """topup-check is sent with a string amount and answers exact Decimals."""
    async with alix(keys) as (fake, provider, _):
        net, fee = await provider.topup_check("GEC", Decimal("250"))
    assert fake.check_bodies == [{"cardType": "GEC", "amount": "250.00"}]
    assert (net, fee) == (Decimal("252.50"), Decimal("2.50"))


@pytest.mark.anyio
async def test_fee_estimates_leave_out_refused_quotes(
    keys: Keys, logs: list[dict[str, Any]]
) -> None:
    """Each amount is quoted; a refused quote is logged and left out, not fatal."""
    async with alix(keys) as (_, provider, _):
        fees = await provider.fee_estimates([Decimal("10"), Decimal("100"), Decimal("999")])
    assert fees == {Decimal("10"): Decimal("0.10"), Decimal("100"): Decimal("1.00")}
    assert len(events(logs, "alix.fee_quote.failed")) == 1


@pytest.mark.anyio
async def test_fee_estimates_raise_authentication_failed_as_itself(keys: Keys) -> None:
    """Refused credentials stop preflight with AuthenticationFailed, not an exception group."""
    async with alix(keys, secret="wrong-secret") as (_, provider, _):
        with pytest.raises(AuthenticationFailed):
            await provider.fee_estimates([Decimal("10"), Decimal("20")])
