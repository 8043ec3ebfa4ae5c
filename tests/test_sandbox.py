"""The sandbox against a real aiohttp client on loopback: rules, messages, faults, admin routes."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from multidict import CIMultiDictProxy

from runner.sandbox import (
    FaultKind,
    FaultPlan,
    Refusal,
    RunningSandbox,
    SandboxCard,
    SandboxConfig,
    serve_sandbox,
)
from runner.sandbox.command import sandbox as sandbox_command
from runner.sandbox.server import describe

TOKEN = "uc_" + "Ab3" * 13 + "x"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CARD = "3f9c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
OTHER = "9b2e7c1a-0d3f-4e5a-8b6c-7d8e9f0a1b2c"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class FakeClock:
    """A clock tests move by hand: cooldowns and rate limits without sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Answer:
    status: int
    text: str
    headers: CIMultiDictProxy[str]

    @property
    def body(self) -> Any:
        return json.loads(self.text, parse_float=Decimal)

    @property
    def message(self) -> str:
        return str(self.body["message"])


@dataclass
class Api:
    sandbox: RunningSandbox
    session: aiohttp.ClientSession

    async def call(
        self,
        method: str,
        path: str,
        *,
        data: str | None = None,
        headers: Mapping[str, str] = AUTH,
        root: bool = False,
    ) -> Answer:
        base = self.sandbox.root_url if root else self.sandbox.base_url
        request_headers = dict(headers)
        if data is not None:
            request_headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, base + path, data=data, headers=request_headers
        ) as response:
            return Answer(response.status, await response.text(), response.headers)

    async def topup(self, card_id: str, amount: str) -> Answer:
        """POST a topup with `amount` written literally into the JSON body."""
        return await self.call("POST", f"/cards/{card_id}/topup", data=f'{{"amount": {amount}}}')

    async def get(self, path: str) -> Answer:
        return await self.call("GET", path)

    async def admin(self, method: str, path: str, payload: Any = None) -> Answer:
        data = None if payload is None else json.dumps(payload)
        return await self.call(method, "/_sandbox" + path, data=data, headers={}, root=True)


@asynccontextmanager
async def running(client_timeout: float = 5.0, **settings: Any) -> AsyncIterator[Api]:
    async with (
        serve_sandbox(SandboxConfig(**settings)) as sandbox,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=client_timeout)) as session,
    ):
        yield Api(sandbox, session)


# -- topups that apply ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_topup_answers_the_new_documented_shape() -> None:
    """A topup answers 200 with the newer documented data fields and exact money."""
    async with running() as api:
        answer = await api.topup(CARD, "100")
    assert answer.status == 200
    body = answer.body
    assert body["success"] is True
    assert body["message"] == "Card topped up successfully"
    assert TIMESTAMP.fullmatch(body["timestamp"])
    data = body["data"]
    assert set(data) == {
        "card_id",
        "transaction_id",
        "invoice_id",
        "wallet_balance",
        "total_charged",
        "platform_fee_amount",
        "new_card_balance",
    }
    assert data["card_id"] == CARD
    assert isinstance(data["invoice_id"], int)
    assert data["platform_fee_amount"] == Decimal("3.00")
    assert data["total_charged"] == Decimal("103.00")
    assert data["new_card_balance"] == Decimal("100.00")
    assert data["wallet_balance"] == Decimal("999897.00")


@pytest.mark.anyio
async def test_money_is_written_as_json_numbers_with_two_decimals() -> None:
    """Money leaves as number literals with exactly two decimals, never through a float."""
    async with running() as api:
        answer = await api.topup(CARD, "100")
    assert '"platform_fee_amount":3.00' in answer.text
    assert '"total_charged":103.00' in answer.text
    assert '"new_card_balance":100.00' in answer.text


@pytest.mark.anyio
async def test_topup_answers_the_old_documented_shape() -> None:
    """With response_version old, data has the older field names."""
    async with running(response_version="old") as api:
        data = (await api.topup(CARD, "50.25")).body["data"]
    assert set(data) == {
        "card_id",
        "transaction_id",
        "new_balance",
        "platform_fee",
        "total_charged",
    }
    assert data["new_balance"] == Decimal("50.25")
    assert data["platform_fee"] == Decimal("1.76")  # 1.25625 + 0.50, half up
    assert data["total_charged"] == Decimal("52.01")


@pytest.mark.anyio
async def test_mixed_versions_answer_both_shapes() -> None:
    """With response_version mixed, both documented shapes come back over a few requests."""
    async with running(response_version="mixed", cooldown=0, seed=3) as api:
        shapes = {
            "new_card_balance" in (await api.topup(CARD, "10")).body["data"] for _ in range(20)
        }
    assert shapes == {True, False}


@pytest.mark.anyio
async def test_fee_rounds_half_up() -> None:
    """The fee is amount x rate + fixed rounded half up: 5.00 costs 0.625 -> 0.63."""
    async with running() as api:
        data = (await api.topup(CARD, "5.00")).body["data"]
    assert data["platform_fee_amount"] == Decimal("0.63")
    assert data["total_charged"] == Decimal("5.63")


@pytest.mark.anyio
async def test_balances_after_a_topup() -> None:
    """After a topup the wallet lost amount + fee; the card gained amount in balance and deposit."""
    async with running(wallet_balance=Decimal("1000.00")) as api:
        await api.topup(CARD, "200.10")
        card = (await api.get(f"/cards/{CARD}")).body["data"]
        wallet = (await api.get("/wallet/balance")).body["data"]
    assert card["balance"] == card["deposit"] == Decimal("200.10")
    assert wallet["balance"] == Decimal("1000.00") - Decimal("200.10") - Decimal("5.50")
    assert TIMESTAMP.fullmatch(wallet["updated_at"])


@pytest.mark.anyio
async def test_applied_record_is_exact() -> None:
    """The state's record holds each applied topup once, in order, with its clock time."""
    clock = FakeClock()
    async with running(clock=clock, cooldown=0) as api:
        await api.topup(CARD, "10")
        clock.advance(1.5)
        await api.topup(OTHER, "4")  # refused: below the minimum
        await api.topup(OTHER, "20.05")
        applied = api.sandbox.state.applied
    assert [(r.seq, r.card_id, r.amount, r.fee, r.at) for r in applied] == [
        (1, CARD, Decimal("10.00"), Decimal("0.75"), 1000.0),
        (2, OTHER, Decimal("20.05"), Decimal("1.00"), 1001.5),
    ]
    assert applied[1].invoice_id == applied[0].invoice_id + 1
    assert applied[1].total_charged == Decimal("21.05")
    assert all(r.fault is None for r in applied)


@pytest.mark.anyio
async def test_exact_limits_apply() -> None:
    """A topup filling the card limit exactly, with exactly the wallet it needs, applies."""
    card = SandboxCard("card-a", deposit=Decimal("900"), limit=Decimal("1000"))
    async with running(cards=(card,), wallet_balance=Decimal("103.00")) as api:
        answer = await api.topup("card-a", "100")
    assert answer.status == 200
    assert answer.body["data"]["wallet_balance"] == Decimal("0.00")


# -- validation -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("amount", "issue"),
    [
        (
            "4.99",
            {
                "code": "too_small",
                "minimum": 5,
                "type": "number",
                "inclusive": True,
                "exact": False,
                "message": "Minimum top-up amount is 5",
                "path": ["amount"],
            },
        ),
        (
            "10000.01",
            {
                "code": "too_big",
                "maximum": 10000,
                "type": "number",
                "inclusive": True,
                "exact": False,
                "message": "Maximum top-up amount is 10000",
                "path": ["amount"],
            },
        ),
        (
            "5.001",
            {
                "code": "custom",
                "message": "Amount must have at most 2 decimal places",
                "path": ["amount"],
            },
        ),
        (
            '"100"',
            {
                "code": "invalid_type",
                "expected": "number",
                "received": "string",
                "path": ["amount"],
                "message": "Expected number, received string",
            },
        ),
        (
            "true",
            {
                "code": "invalid_type",
                "expected": "number",
                "received": "boolean",
                "path": ["amount"],
                "message": "Expected number, received boolean",
            },
        ),
    ],
)
async def test_invalid_amount_is_refused_with_its_zod_issue(
    amount: str, issue: dict[str, Any]
) -> None:
    """An amount breaking a documented rule gets 400 Invalid input data with that zod issue."""
    async with running() as api:
        answer = await api.topup(CARD, amount)
        assert api.sandbox.state.applied == []
    assert answer.status == 400
    assert answer.message == "Invalid input data"
    assert answer.body["error"] == [issue]


@pytest.mark.anyio
@pytest.mark.parametrize("body", ["{}", "not json", '{"amount": NaN}', ""])
async def test_body_without_an_amount_is_invalid(body: str) -> None:
    """A body without a numeric amount (absent, not JSON, NaN) is 400 Invalid input data."""
    async with running() as api:
        answer = await api.call("POST", f"/cards/{CARD}/topup", data=body)
    assert answer.status == 400
    assert answer.message == "Invalid input data"
    assert answer.body["error"][0]["code"] == "invalid_type"


@pytest.mark.anyio
async def test_amount_with_trailing_zeros_is_valid() -> None:
    """Precision is judged on the value: 5.100 is 5.10."""
    async with running() as api:
        answer = await api.topup(CARD, "5.100")
    assert answer.status == 200
    assert answer.body["data"]["new_card_balance"] == Decimal("5.10")


@pytest.mark.anyio
async def test_too_small_and_too_precise_are_both_reported() -> None:
    """An amount breaking two rules gets both issues."""
    async with running() as api:
        answer = await api.topup(CARD, "4.999")
    assert [issue["code"] for issue in answer.body["error"]] == ["too_small", "custom"]


# -- cards ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_card_is_not_found() -> None:
    """A card id that is not UUID-shaped and not configured gets 404 Card not found."""
    async with running() as api:
        answer = await api.topup("no-such-card", "10")
        assert api.sandbox.state.refusals[Refusal.NOT_FOUND] == 1
    assert answer.status == 404
    assert answer.message == "Card not found or access denied"


@pytest.mark.anyio
async def test_missing_cards_are_not_found() -> None:
    """A UUID listed in missing_cards does not exist, by GET or by POST."""
    async with running(missing_cards=frozenset({CARD})) as api:
        topup = await api.topup(CARD, "10")
        card = await api.get(f"/cards/{CARD}")
    assert (topup.status, card.status) == (404, 404)
    assert card.message == "Card not found or access denied"


@pytest.mark.anyio
async def test_without_auto_create_only_configured_cards_exist() -> None:
    """With auto_create_cards off a UUID is unknown, and a configured non-UUID id works."""
    async with running(auto_create_cards=False, cards=(SandboxCard("card-a"),)) as api:
        assert (await api.topup(CARD, "10")).status == 404
        assert (await api.topup("card-a", "10")).status == 200


@pytest.mark.anyio
async def test_not_found_comes_before_validation() -> None:
    """An unknown card with an invalid body is refused as not found."""
    async with running() as api:
        answer = await api.topup("no-such-card", '"abc"')
    assert answer.status == 404


@pytest.mark.anyio
async def test_uuid_ids_are_case_insensitive() -> None:
    """An upper-case UUID names the same card, answered in lower case."""
    async with running() as api:
        answer = await api.topup(CARD.upper(), "10")
        card = (await api.get(f"/cards/{CARD}")).body["data"]
    assert answer.body["data"]["card_id"] == CARD
    assert card["balance"] == Decimal("10.00")


@pytest.mark.anyio
@pytest.mark.parametrize("status", ["frozen", "closed"])
async def test_inactive_card_is_refused(status: str) -> None:
    """A frozen or closed card refuses topups with 400 Card is not active."""
    async with running(cards=(SandboxCard(CARD, status=status),)) as api:
        answer = await api.topup(CARD, "10")
        assert api.sandbox.state.applied == []
    assert answer.status == 400
    assert answer.message == "Card is not active"


@pytest.mark.anyio
async def test_validation_comes_before_inactive() -> None:
    """An invalid amount on a frozen card is refused as invalid input."""
    async with running(cards=(SandboxCard(CARD, status="frozen"),)) as api:
        answer = await api.topup(CARD, "1")
    assert answer.message == "Invalid input data"


@pytest.mark.anyio
async def test_card_limit_refusal_message() -> None:
    """A topup past the card limit is refused with the documented message, integral numbers bare."""
    card = SandboxCard(CARD, deposit=Decimal("500"), limit=Decimal("1000"))
    async with running(cards=(card,)) as api:
        answer = await api.topup(CARD, "500.01")
        assert api.sandbox.state.applied == []
    assert answer.status == 400
    assert answer.message == (
        "Topup would exceed card limit. Current deposit: 500, Limit: 1000, Available: 500"
    )


@pytest.mark.anyio
async def test_card_limit_message_shows_cents_when_not_integral() -> None:
    """Numbers with cents keep two decimals in the card limit message."""
    card = SandboxCard(CARD, deposit=Decimal("500.50"), limit=Decimal("1000"))
    async with running(cards=(card,)) as api:
        answer = await api.topup(CARD, "600")
    assert answer.message == (
        "Topup would exceed card limit. Current deposit: 500.50, Limit: 1000, Available: 499.50"
    )


@pytest.mark.anyio
async def test_insufficient_wallet_refusal_message() -> None:
    """A topup the wallet cannot cover is refused with the documented message, two decimals."""
    settings: dict[str, Any] = {"wallet_balance": Decimal("50"), "fee_rate": Decimal("0.049")}
    async with running(**settings) as api:
        answer = await api.topup(CARD, "100")
        state = api.sandbox.state
        assert (state.applied, state.wallet) == ([], Decimal("50.00"))
    assert answer.status == 400
    assert answer.message == (
        "Insufficient wallet balance. Required: 105.40 (topup: 100.00 + platform fee: 5.40), "
        "Available: 50.00"
    )


@pytest.mark.anyio
async def test_card_limit_comes_before_wallet() -> None:
    """A topup breaking both the card limit and the wallet is refused for the card limit."""
    card = SandboxCard(CARD, limit=Decimal("10"))
    async with running(cards=(card,), wallet_balance=Decimal("1")) as api:
        answer = await api.topup(CARD, "20")
    assert answer.message.startswith("Topup would exceed card limit.")


@pytest.mark.anyio
async def test_card_details_follow_the_documented_fields() -> None:
    """GET /cards/{id} answers the documented fields and no limit; old adds spent and withdraw."""
    async with running() as api:
        new = (await api.get(f"/cards/{CARD}")).body["data"]
    async with running(response_version="old") as api:
        old = (await api.get(f"/cards/{CARD}")).body["data"]
    documented = {
        "id",
        "name",
        "status",
        "balance",
        "deposit",
        "currency",
        "category",
        "masked_PAN",
        "bin_id",
        "created_at",
        "updated_at",
    }
    assert set(new) == documented
    assert set(old) == documented | {"spent", "withdraw"}
    assert (new["status"], new["currency"], new["balance"]) == ("active", "USD", Decimal("0.00"))


@pytest.mark.anyio
async def test_card_list_totals_known_cards() -> None:
    """GET /cards lists every card referenced so far with their total balance."""
    async with running(cooldown=0) as api:
        await api.topup(CARD, "10")
        await api.topup(OTHER, "20.50")
        data = (await api.get("/cards")).body["data"]
    assert data["total_cards"] == 2
    assert data["total_balance"] == Decimal("30.50")
    assert [card["id"] for card in data["cards"]] == [CARD, OTHER]


@pytest.mark.anyio
async def test_transactions_list_applied_topups_newest_first() -> None:
    """GET /cards/transactions pages applied topups newest first, filtered by card."""
    async with running(cooldown=0) as api:
        for card_id, amount in [(CARD, "10"), (OTHER, "20"), (CARD, "30")]:
            await api.topup(card_id, amount)
        second_page = (await api.get("/cards/transactions?page=2&limit=2")).body["data"]
        of_card = (await api.get(f"/cards/transactions?card_id={CARD}")).body["data"]
    assert [t["amount"] for t in second_page["transactions"]] == [Decimal("10.00")]
    assert second_page["pagination"] == {
        "page": 2,
        "limit": 2,
        "total": 3,
        "totalPages": 2,
        "hasNext": False,
        "hasPrev": True,
    }
    item = of_card["transactions"][0]
    assert {k: item[k] for k in ("status", "side", "type", "currency", "amount")} == {
        "status": "Approved",
        "side": "Credit",
        "type": "Topup",
        "currency": "USD",
        "amount": Decimal("30.00"),
    }
    assert [t["card_id"] for t in of_card["transactions"]] == [CARD, CARD]


@pytest.mark.anyio
async def test_transactions_limit_above_100_is_invalid() -> None:
    """A page size above 100 is 400 Invalid input data."""
    async with running() as api:
        answer = await api.get("/cards/transactions?limit=101")
    assert answer.status == 400
    assert answer.body["error"][0]["code"] == "too_big"


@pytest.mark.anyio
async def test_card_plans_and_health() -> None:
    """GET /card-plans lists one plan with the default limit; /health needs no token."""
    async with running() as api:
        plans = (await api.get("/card-plans")).body["data"]
        health = await api.call("GET", "/health", headers={})
    assert [plan["limit"] for plan in plans] == [Decimal("10000.00")]
    assert set(plans[0]) == {"id", "name", "limit", "creation_fee"}
    assert (health.status, health.body) == (200, {"status": "ok"})


@pytest.mark.anyio
async def test_unknown_route_is_a_json_404() -> None:
    """A route the API does not have answers 404 in the JSON envelope."""
    async with running() as api:
        answer = await api.get("/nothing/here")
    assert answer.status == 404
    assert answer.body["success"] is False


# -- auth -----------------------------------------------------------------------------------

UNAUTHORIZED = {
    "success": False,
    "message": "Unauthorized",
    "error": "Invalid or missing API token",
}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer uc_short"}, {"Authorization": f"Token {TOKEN}"}],
    ids=["missing", "malformed", "wrong-scheme"],
)
async def test_bad_token_is_unauthorized(headers: dict[str, str]) -> None:
    """A missing or malformed token gets the documented 401 and nothing is applied."""
    async with running() as api:
        answer = await api.call(
            "POST", f"/cards/{CARD}/topup", data='{"amount": 10}', headers=headers
        )
        assert api.sandbox.state.applied == []
        assert api.sandbox.state.refusals[Refusal.UNAUTHORIZED] == 1
    assert (answer.status, answer.body) == (401, UNAUTHORIZED)


@pytest.mark.anyio
async def test_configured_token_is_required_exactly() -> None:
    """With a token configured, another well-formed token is refused and that one accepted."""
    other = "uc_" + "z" * 40
    async with running(token=TOKEN) as api:
        refused = await api.call(
            "GET", "/wallet/balance", headers={"Authorization": f"Bearer {other}"}
        )
        accepted = await api.get("/wallet/balance")
    assert (refused.status, accepted.status) == (401, 200)


# -- cooldown -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 429])
async def test_cooldown_refuses_with_seconds_left(status: int) -> None:
    """A topup within the cooldown is refused in cooldown_status with the wait rounded up."""
    clock = FakeClock()
    async with running(clock=clock, cooldown_status=status) as api:
        await api.topup(CARD, "10")
        clock.advance(33.5)
        answer = await api.topup(CARD, "10")
        assert len(api.sandbox.state.applied) == 1
    assert answer.status == status
    assert answer.message == "Please wait 87 seconds before topping up this card again"
    assert "Retry-After" not in answer.headers


@pytest.mark.anyio
async def test_cooldown_ends_after_its_length() -> None:
    """Once the cooldown has passed, the card takes a topup again."""
    clock = FakeClock()
    async with running(clock=clock) as api:
        await api.topup(CARD, "10")
        clock.advance(120)
        answer = await api.topup(CARD, "10")
    assert answer.status == 200


@pytest.mark.anyio
async def test_refused_attempt_does_not_restart_cooldown() -> None:
    """The cooldown runs from the last applied topup, not from a refused attempt."""
    clock = FakeClock()
    async with running(clock=clock) as api:
        await api.topup(CARD, "10")
        clock.advance(100)
        assert (await api.topup(CARD, "10")).status == 400
        clock.advance(20)
        assert (await api.topup(CARD, "10")).status == 200


@pytest.mark.anyio
async def test_cooldown_is_per_card() -> None:
    """A topup on one card does not hold back another card."""
    async with running(clock=FakeClock()) as api:
        await api.topup(CARD, "10")
        answer = await api.topup(OTHER, "10")
    assert answer.status == 200


@pytest.mark.anyio
async def test_sub_second_cooldown_shows_hundredths() -> None:
    """A cooldown below one second announces its wait with two decimals."""
    clock = FakeClock()
    async with running(clock=clock, cooldown=0.5) as api:
        await api.topup(CARD, "10")
        clock.advance(0.2)
        answer = await api.topup(CARD, "10")
    assert answer.message == "Please wait 0.30 seconds before topping up this card again"


@pytest.mark.anyio
async def test_cooldown_comes_before_card_limit() -> None:
    """A card in cooldown and at its limit is refused for the cooldown."""
    card = SandboxCard(CARD, limit=Decimal("10"))
    async with running(clock=FakeClock(), cards=(card,)) as api:
        await api.topup(CARD, "10")
        answer = await api.topup(CARD, "10")
    assert answer.message.startswith("Please wait 120 seconds")


# -- rate limit -----------------------------------------------------------------------------

TOO_MANY = "Too many requests, please try again later"


@pytest.mark.anyio
async def test_rate_limit_refuses_beyond_the_burst() -> None:
    """Past the burst, a request gets 429 with Retry-After in whole seconds and nothing applies."""
    async with running(clock=FakeClock(), rate_limit=1.0, rate_burst=2) as api:
        await api.get("/wallet/balance")
        await api.get(f"/cards/{CARD}")
        answer = await api.topup(CARD, "10")
        state = api.sandbox.state
        assert (state.applied, state.refusals[Refusal.RATE_LIMITED]) == ([], 1)
    assert answer.status == 429
    assert answer.headers["Retry-After"] == "1"
    assert answer.body["success"] is False
    assert answer.message == TOO_MANY
    assert TIMESTAMP.fullmatch(answer.body["timestamp"])


@pytest.mark.anyio
async def test_rate_limit_retry_after_below_a_second_is_decimal() -> None:
    """A wait under one second is announced as a decimal, and after it the request passes."""
    clock = FakeClock()
    async with running(clock=clock, rate_limit=10.0, rate_burst=1) as api:
        await api.get("/wallet/balance")
        refused = await api.get("/wallet/balance")
        clock.advance(0.1)
        admitted = await api.get("/wallet/balance")
    assert (refused.status, refused.headers["Retry-After"]) == (429, "0.10")
    assert admitted.status == 200


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_drop_before_closes_without_answer_and_applies_nothing() -> None:
    """drop_before: the client sees a disconnect, and the topup was not applied."""
    async with running() as api:
        api.sandbox.faults.script(FaultKind.DROP_BEFORE, CARD)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.topup(CARD, "10")
        state = api.sandbox.state
        assert state.applied == []
        assert state.faults_injected[FaultKind.DROP_BEFORE] == 1
        assert (await api.get(f"/cards/{CARD}")).body["data"]["deposit"] == Decimal("0.00")


@pytest.mark.anyio
async def test_drop_after_applies_then_closes_without_answer() -> None:
    """drop_after: the client sees a disconnect, yet the topup was applied and recorded."""
    async with running() as api:
        api.sandbox.faults.script(FaultKind.DROP_AFTER, CARD)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.topup(CARD, "10")
        [record] = api.sandbox.state.applied
        card = (await api.get(f"/cards/{CARD}")).body["data"]
    assert (record.amount, record.fault) == (Decimal("10.00"), FaultKind.DROP_AFTER)
    assert card["deposit"] == Decimal("10.00")


@pytest.mark.anyio
async def test_error_before_answers_a_proxy_page_and_applies_nothing() -> None:
    """error_before: 502 with an HTML body that is not JSON, nothing applied."""
    async with running() as api:
        api.sandbox.faults.script("error_before", CARD)
        answer = await api.topup(CARD, "10")
        assert api.sandbox.state.applied == []
    assert answer.status == 502
    assert answer.headers["Content-Type"].startswith("text/html")
    assert "502 Bad Gateway" in answer.text
    with pytest.raises(ValueError, match="Expecting value"):
        json.loads(answer.text)


@pytest.mark.anyio
async def test_error_after_applies_then_answers_a_server_error() -> None:
    """error_after: the client gets a 5xx, yet the topup was applied and recorded."""
    async with running(seed=1) as api:
        api.sandbox.faults.script("error_after", CARD)
        answer = await api.topup(CARD, "10")
        [record] = api.sandbox.state.applied
    assert answer.status in (500, 502)
    if answer.status == 500:
        assert answer.body["success"] is False
    assert record.fault is FaultKind.ERROR_AFTER


@pytest.mark.anyio
async def test_slow_applies_and_answers_late() -> None:
    """slow: the topup is applied and the answer comes after slow_seconds."""
    async with running(slow_seconds=0.005) as api:
        api.sandbox.faults.script("slow", CARD)
        started = time.monotonic()
        answer = await api.topup(CARD, "10")
        elapsed = time.monotonic() - started
        [record] = api.sandbox.state.applied
    assert answer.status == 200
    assert elapsed >= 0.005
    assert record.fault is FaultKind.SLOW


@pytest.mark.anyio
async def test_slow_answer_past_the_client_timeout_still_applied() -> None:
    """slow beyond the client's timeout: the client times out, the topup is applied anyway, and
    stopping the sandbox does not wait for the held answer."""
    started = time.monotonic()
    async with running(client_timeout=0.3, slow_seconds=30.0) as api:
        api.sandbox.faults.script("slow", CARD)
        with pytest.raises(TimeoutError):
            await api.topup(CARD, "10")
        assert len(api.sandbox.state.applied) == 1
    assert time.monotonic() - started < 2.0


@pytest.mark.anyio
async def test_client_gone_during_latency_is_still_processed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request whose client times out during the latency is applied all the same, quietly."""
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    async with running(client_timeout=0.3, latency=30.0) as api:
        with pytest.raises(TimeoutError):
            await api.topup(CARD, "10")
    assert len(api.sandbox.state.applied) == 1
    assert time.monotonic() - started < 2.0
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG] == []


@pytest.mark.anyio
async def test_rate_limited_fault_is_a_spurious_429() -> None:
    """rate_limited: 429 with Retry-After though no limit is configured, nothing applied."""
    async with running() as api:
        api.sandbox.faults.script("rate_limited", CARD)
        answer = await api.topup(CARD, "10")
        state = api.sandbox.state
        assert (state.applied, state.refusals[Refusal.RATE_LIMITED]) == ([], 0)
    assert answer.status == 429
    assert answer.headers["Retry-After"] == "1"
    assert answer.message == TOO_MANY


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 429])
async def test_cooldown_fault_is_a_spurious_short_wait(status: int) -> None:
    """cooldown: a refusal "Please wait N seconds" with small N on a fresh card, nothing applied."""
    async with running(cooldown_status=status) as api:
        api.sandbox.faults.script("cooldown", CARD)
        answer = await api.topup(CARD, "10")
        assert api.sandbox.state.applied == []
    assert answer.status == status
    assert re.fullmatch(
        r"Please wait [1-3] seconds before topping up this card again", answer.message
    )


@pytest.mark.anyio
async def test_scripted_faults_hit_only_their_card_and_count() -> None:
    """A fault scripted for one card twice hits its next two topups only."""
    async with running(cooldown=0) as api:
        api.sandbox.faults.script("error_before", CARD, count=2)
        other = await api.topup(OTHER, "10")
        first, second, third = [(await api.topup(CARD, "10")).status for _ in range(3)]
    assert (other.status, first, second, third) == (200, 502, 502, 200)


@pytest.mark.anyio
async def test_random_faults_follow_the_rate() -> None:
    """With fault_rate 1 every topup gets one of the configured kinds; GETs never do."""
    async with running(fault_rate=1.0, fault_kinds=("error_before",), cooldown=0) as api:
        statuses = [(await api.topup(CARD, "10")).status for _ in range(3)]
        card = await api.get(f"/cards/{CARD}")
        assert api.sandbox.state.faults_injected[FaultKind.ERROR_BEFORE] == 3
    assert statuses == [502, 502, 502]
    assert card.status == 200


@pytest.mark.anyio
async def test_same_seed_same_run() -> None:
    """Two sandboxes with one seed answer the same requests identically."""
    runs = []
    for _ in range(2):
        settings: dict[str, Any] = {
            "seed": 11,
            "fault_rate": 0.5,
            "fault_kinds": ("error_before",),
            "cooldown": 0,
        }
        async with running(**settings) as api:
            statuses = [(await api.topup(CARD, "10")).status for _ in range(8)]
            ids = [record.transaction_id for record in api.sandbox.state.applied]
        runs.append((statuses, ids))
    assert runs[0] == runs[1]
    assert set(runs[0][0]) == {200, 502}


def test_fault_plan_prefers_scripts_over_random() -> None:
    """A scripted fault fires before any random draw, then the rate takes over."""
    plan = FaultPlan(1.0, ["slow"], seed=1)
    plan.script("drop_before")
    assert [plan.draw(CARD), plan.draw(CARD)] == [FaultKind.DROP_BEFORE, FaultKind.SLOW]


@pytest.mark.anyio
async def test_faults_log_nothing_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Dropped and failed answers leave no warning or error in the logs."""
    caplog.set_level(logging.DEBUG)
    async with running(cooldown=0) as api:
        for kind in ("drop_before", "drop_after", "error_after", "error_before"):
            api.sandbox.faults.script(kind, CARD)
            with suppress(aiohttp.ClientError):
                await api.topup(CARD, "10")
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG] == []


@pytest.mark.anyio
async def test_latency_delays_every_answer() -> None:
    """latency adds its seconds to an API answer."""
    async with running(latency=0.004) as api:
        started = time.monotonic()
        await api.get("/wallet/balance")
        elapsed = time.monotonic() - started
    assert elapsed >= 0.004


# -- admin routes ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_admin_state_reports_record_and_counters() -> None:
    """GET /_sandbox/state gives wallet, cards, applied record (amounts as strings), counters."""
    async with running(clock=FakeClock()) as api:
        await api.topup(CARD, "10")
        await api.topup(CARD, "10")
        state = json.loads((await api.admin("GET", "/state")).text)
    assert state["wallet"] == {"balance": "999989.25"}
    assert state["applied"][0]["amount"] == "10.00"
    assert state["applied"][0]["fee"] == "0.75"
    assert state["cards"][0]["deposit"] == "10.00"
    assert state["counters"]["refusals"] == {"cooldown": 1}
    assert state["counters"]["requests"] == {"POST /api/v1/cards/{id}/topup": 2}
    assert state["topup_arrivals"] == [1000.0, 1000.0]
    assert state["first_applied_at"] == state["last_applied_at"] == 1000.0


@pytest.mark.anyio
async def test_admin_scripts_faults() -> None:
    """POST /_sandbox/faults scripts a fault for the next topup of a card."""
    async with running() as api:
        scripted = await api.admin("POST", "/faults", {"kind": "drop_before", "card_id": CARD})
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.topup(CARD, "10")
    assert scripted.status == 200


@pytest.mark.anyio
async def test_admin_refuses_an_unknown_fault_kind() -> None:
    """An unknown fault kind is 400 naming the known ones."""
    async with running() as api:
        answer = await api.admin("POST", "/faults", {"kind": "meteor"})
    assert answer.status == 400
    assert "drop_before" in answer.message


@pytest.mark.anyio
async def test_admin_creates_and_modifies_cards() -> None:
    """POST /_sandbox/cards creates a card and changes its status and limit."""
    async with running() as api:
        await api.admin("POST", "/cards", {"cards": [{"card_id": "card-a", "status": "frozen"}]})
        frozen = await api.topup("card-a", "10")
        change = {"card_id": "card-a", "status": "active", "limit": "5.00"}
        await api.admin("POST", "/cards", {"cards": [change]})
        limited = await api.topup("card-a", "10")
    assert frozen.message == "Card is not active"
    assert limited.message.startswith("Topup would exceed card limit. Current deposit: 0, Limit: 5")


@pytest.mark.anyio
async def test_admin_card_update_is_all_or_nothing() -> None:
    """A card update with one invalid card is 400 and changes nothing."""
    async with running() as api:
        cards = [{"card_id": "card-a"}, {"card_id": "card-b", "balance": "-1"}]
        answer = await api.admin("POST", "/cards", {"cards": cards})
        assert api.sandbox.state.known_cards() == []
    assert answer.status == 400


@pytest.mark.anyio
async def test_admin_sets_the_wallet() -> None:
    """POST /_sandbox/wallet sets the balance the next topup is checked against."""
    async with running() as api:
        await api.admin("POST", "/wallet", {"balance": "10.00"})
        answer = await api.topup(CARD, "10")
    assert answer.message.endswith("Available: 10.00")


# -- configuration and command --------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"token": "uc_short"}, "token"),
        ({"wallet_balance": Decimal("1.001")}, "wallet_balance"),
        ({"wallet_balance": 1.5}, "wallet_balance"),
        ({"fee_rate": Decimal("-0.1")}, "fee_rate"),
        ({"cooldown": -1}, "cooldown"),
        ({"cooldown_status": 200}, "cooldown_status"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_burst": 0}, "rate_burst"),
        ({"response_version": "newest"}, "response_version"),
        ({"fault_rate": 1.5}, "fault_rate"),
        ({"fault_kinds": ("meteor",)}, "fault kind"),
        ({"cards": (SandboxCard("a"), SandboxCard("a"))}, "more than once"),
        ({"cards": (SandboxCard("a"),), "missing_cards": frozenset({"a"})}, "both"),
    ],
)
def test_config_rejects_bad_settings(settings: dict[str, Any], problem: str) -> None:
    """Each invalid setting is a ValueError naming it."""
    with pytest.raises(ValueError, match=problem):
        SandboxConfig(**settings)


def test_card_rejects_bad_status() -> None:
    """A card status other than active, frozen, closed is a ValueError."""
    with pytest.raises(ValueError, match="status"):
        SandboxCard("a", status="lost")


def test_config_repr_hides_the_token() -> None:
    """The repr is readable and never shows the token."""
    text = repr(SandboxConfig(token=TOKEN, fault_kinds=("slow",)))
    assert TOKEN not in text
    assert "fault_kinds=('slow',)" in text
    assert text.startswith("SandboxConfig(token='uc_***', wallet_balance=Decimal('1000000.00')")


def test_command_refuses_a_bad_setting_in_one_line() -> None:
    """An invalid setting exits 2 with a single error line."""
    result = CliRunner().invoke(sandbox_command, ["--fault-rate", "0.5", "--fault-kinds", "meteor"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "meteor" in result.stderr


def test_command_help_names_the_token_variable() -> None:
    """--help tells where the token can come from."""
    result = CliRunner().invoke(sandbox_command, ["--help"])
    assert "SANDBOX_UNCASH_TOKEN" in result.output


def test_standalone_banner() -> None:
    """The ready line names the URL, cooldown, rate limit and faults."""
    config = SandboxConfig(rate_limit=5, fault_rate=0.005, fault_kinds=("slow",))
    assert describe(config, "http://127.0.0.1:8089/api/v1") == (
        "sandbox: Uncash API on http://127.0.0.1:8089/api/v1 "
        "(cooldown 120s, rate limit 5/s burst 2, faults 0.5% of topups: slow)"
    )
