"""The sandbox's Alix side against a real aiohttp client on loopback: signed auth and expiring
tokens, string amounts, pending topups and their settlement, signed webhooks, transactions, faults.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDictProxy

from runner.sandbox import (
    AlixConfig,
    FaultKind,
    RunningAlix,
    SandboxCard,
    SandboxConfig,
    TopupStatus,
    serve_sandbox,
)
from runner.sandbox.command import sandbox as sandbox_command
from runner.sandbox.server import make_alix_faults
from tests.alix import pem_pair

PARTNER = "PARTNER-7"
SECRET = "s3cret-key"
EMAIL = "ops@example.com"
CARD = "3f9c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
OTHER = "9b2e7c1a-0d3f-4e5a-8b6c-7d8e9f0a1b2c"
TOPUP_FIELDS = {
    "type",
    "fee",
    "amount",
    "balanceBefore",
    "balanceAfter",
    "description",
    "status",
    "createdAt",
}


@dataclass(frozen=True)
class Keys:
    partner: rsa.RSAPrivateKey
    partner_public_pem: str
    alix: rsa.RSAPrivateKey
    alix_private_pem: str


@pytest.fixture(scope="module")
def keys() -> Keys:
    partner = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alix = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(partner, pem_pair(partner)[1], alix, pem_pair(alix)[0])


def _sign(key: rsa.RSAPrivateKey, message: str) -> str:
    raw = key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(raw).decode()


def _verifies(public_pem: str, message: str, signature: str) -> bool:
    key = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(key, rsa.RSAPublicKey)
    try:
        key.verify(
            base64.b64decode(signature), message.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return False
    return True


class FakeClock:
    """A clock tests move by hand: token lifetimes and settling without sleeping."""

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
    def data(self) -> Any:
        return self.body["data"]


@dataclass
class Api:
    alix: RunningAlix
    root_url: str
    session: aiohttp.ClientSession
    keys: Keys
    token: str | None = None

    @property
    def signature(self) -> str:
        return _sign(self.keys.partner, f"{PARTNER}|{SECRET}")

    async def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        raw: str | None = None,
        headers: Mapping[str, str] | None = None,
        root: bool = False,
    ) -> Answer:
        url = (self.root_url if root else self.alix.base_url) + path
        if headers is None:
            headers = {} if self.token is None else {"access-token": self.token}
        data = raw if raw is not None else None if payload is None else json.dumps(payload)
        request_headers = dict(headers)
        if data is not None:
            request_headers["Content-Type"] = "application/json"
        async with self.session.request(method, url, data=data, headers=request_headers) as reply:
            return Answer(reply.status, await reply.text(), reply.headers)

    async def login(self) -> Answer:
        """Get an access token with valid credentials and use it from now on."""
        payload = {"partnerCode": PARTNER, "userEmail": EMAIL, "signature": self.signature}
        answer = await self.call("POST", "/auth/access-token", payload, headers={})
        assert answer.status == 200, answer.text
        self.token = answer.data["accessToken"]
        return answer

    async def refresh(self, refresh_token: str, signature: str | None = None) -> Answer:
        payload = {
            "partnerCode": PARTNER,
            "refreshToken": refresh_token,
            "signature": signature or self.signature,
        }
        return await self.call("POST", "/auth/refresh-token", payload, headers={})

    async def topup(self, card_id: str, amount: Any) -> Answer:
        return await self.call("POST", "/cards/topup", {"cardId": card_id, "amount": amount})

    async def transactions(self, card_id: str, query: str = "type=TopupCard") -> Answer:
        return await self.call("GET", f"/cards/{card_id}/transactions?{query}")

    async def admin(self, method: str, path: str, payload: Any = None) -> Answer:
        return await self.call(method, "/_sandbox" + path, payload, headers={}, root=True)


@asynccontextmanager
async def running(
    keys: Keys,
    *,
    alix: Mapping[str, Any] | None = None,
    login: bool = True,
    **settings: Any,
) -> AsyncIterator[Api]:
    """A sandbox with Alix on (refusals as HTTP 4xx unless `alix` says otherwise), logged in."""
    alix_settings: dict[str, Any] = {"failure_style": "http", **(alix or {})}
    config = SandboxConfig(
        alix=AlixConfig(
            PARTNER,
            SECRET,
            EMAIL,
            keys.partner_public_pem,
            alix_private_key_pem=keys.alix_private_pem,
            **alix_settings,
        ),
        **settings,
    )
    async with (
        serve_sandbox(config) as sandbox,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        assert sandbox.alix is not None
        api = Api(sandbox.alix, sandbox.root_url, session, keys)
        if login:
            await api.login()
        yield api


@dataclass
class Receiver:
    """A partner's webhook endpoint: records each body, answers `statuses` in turn, then 200."""

    url: str = ""
    bodies: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    _arrival: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.text())
        self._arrival.set()
        self._arrival = anyio.Event()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def wait_for(self, count: int) -> None:
        """Wait (two seconds at most) until `count` webhooks have arrived."""
        with anyio.fail_after(2):
            while len(self.bodies) < count:
                await self._arrival.wait()


async def recorded(api: Api, deliveries: int) -> None:
    """Wait (two seconds at most) until the sandbox has recorded `deliveries` webhook attempts:
    it records one only after the receiver's answer reached it, so a bounded poll is needed."""
    for _ in range(400):
        if len(api.alix.state.deliveries) >= deliveries:
            return
        await anyio.sleep(0.005)
    raise AssertionError(f"fewer than {deliveries} deliveries recorded within 2 s")


@asynccontextmanager
async def receiver(statuses: tuple[int, ...] = ()) -> AsyncIterator[Receiver]:
    hook = Receiver(statuses=list(statuses))
    app = web.Application()
    app.router.add_post("/hooks/alix", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/alix"
        yield hook
    finally:
        await runner.cleanup()


# -- auth -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_access_token_is_issued_for_signed_credentials(keys: Keys) -> None:
    """A signed access-token call gets both tokens and the access lifetime in seconds."""
    async with running(keys, login=False) as api:
        answer = await api.login()
        counters = api.alix.state.counters
    body = answer.body
    assert (body["success"], body["errorCode"]) == (True, 0)
    assert body["message"] == "Your request has been successful"
    assert set(body["data"]) == {"accessToken", "refreshToken", "expiresIn"}
    assert body["data"]["expiresIn"] == 2
    assert counters.access_tokens_issued == 1


@pytest.mark.anyio
@pytest.mark.parametrize("forgery", ["wrong secret", "wrong key", "wrong partner", "wrong email"])
async def test_forged_credentials_are_unauthorized(keys: Keys, forgery: str) -> None:
    """A signature over the wrong secret or by the wrong key, or a wrong partner or email: 401."""
    payload = {
        "partnerCode": "OTHER-1" if forgery == "wrong partner" else PARTNER,
        "userEmail": "eve@example.com" if forgery == "wrong email" else EMAIL,
        "signature": {
            "wrong secret": _sign(keys.partner, f"{PARTNER}|guess"),
            "wrong key": _sign(keys.alix, f"{PARTNER}|{SECRET}"),
        }.get(forgery, _sign(keys.partner, f"{PARTNER}|{SECRET}")),
    }
    async with running(keys, login=False) as api:
        answer = await api.call("POST", "/auth/access-token", payload, headers={})
        counters = api.alix.state.counters
    assert answer.status == 401
    assert (answer.body["success"], answer.body["data"]) == (False, None)
    assert counters.unauthorized == 1
    assert counters.access_tokens_issued == 0


@pytest.mark.anyio
async def test_auth_call_without_a_signature_is_invalid(keys: Keys) -> None:
    """An access-token body without its fields is 400, not 401."""
    async with running(keys, login=False) as api:
        answer = await api.call("POST", "/auth/access-token", {"partnerCode": PARTNER})
    assert answer.status == 400
    assert answer.body["success"] is False


@pytest.mark.anyio
@pytest.mark.parametrize("headers", [{}, {"access-token": "made-up"}])
async def test_missing_or_unknown_access_token_is_unauthorized(
    keys: Keys, headers: dict[str, str]
) -> None:
    """A call without a live access token gets HTTP 401 with success:false."""
    async with running(keys) as api:
        answer = await api.call(
            "POST", "/cards/topup", {"cardId": CARD, "amount": "100.00"}, headers=headers
        )
        assert api.alix.state.topups == []
    assert answer.status == 401
    assert answer.body["success"] is False


@pytest.mark.anyio
async def test_access_token_expires_after_its_lifetime(keys: Keys) -> None:
    """An access token works until access_token_ttl has passed, then gets 401 (counted)."""
    clock = FakeClock()
    async with running(keys, clock=clock, alix={"access_token_ttl": 0.3}) as api:
        clock.advance(0.29)
        fresh = await api.topup(CARD, "100.00")
        clock.advance(0.01)
        stale = await api.topup(CARD, "100.00")
        counters = api.alix.state.counters
    assert fresh.status == 200
    assert stale.status == 401
    assert stale.body["message"] == "Access token has expired"
    assert (counters.expired_tokens, counters.unauthorized) == (1, 1)


@pytest.mark.anyio
async def test_refresh_gives_new_tokens_and_revokes_the_old_access_token(keys: Keys) -> None:
    """A signed refresh answers new tokens; the access token it replaces stops working."""
    async with running(keys, login=False) as api:
        first = (await api.login()).data
        answer = await api.refresh(first["refreshToken"])
        old = await api.topup(CARD, "100.00")
        api.token = answer.data["accessToken"]
        new = await api.topup(CARD, "100.00")
        counters = api.alix.state.counters
    assert answer.status == 200
    assert set(answer.data) == {"accessToken", "refreshToken", "expiresIn"}
    assert answer.data["accessToken"] != first["accessToken"]
    assert answer.data["refreshToken"] != first["refreshToken"]
    assert (old.status, new.status) == (401, 200)
    assert (counters.access_tokens_issued, counters.refreshes) == (1, 1)


@pytest.mark.anyio
async def test_refresh_token_is_single_use(keys: Keys) -> None:
    """A refresh token used once gets 401 the second time."""
    async with running(keys) as api:
        refresh_token = (await api.login()).data["refreshToken"]
        first = await api.refresh(refresh_token)
        second = await api.refresh(refresh_token)
        counters = api.alix.state.counters
    assert (first.status, second.status) == (200, 401)
    assert second.body["success"] is False
    assert counters.refreshes == 1


@pytest.mark.anyio
async def test_refresh_token_outlives_the_access_token_but_not_its_own_lifetime(keys: Keys) -> None:
    """A refresh works after the access token expired, and not after refresh_token_ttl."""
    clock = FakeClock()
    lifetimes = {"access_token_ttl": 0.3, "refresh_token_ttl": 5.0}
    async with running(keys, clock=clock, alix=lifetimes) as api:
        clock.advance(1.0)
        late = await api.refresh((await api.login()).data["refreshToken"])
        clock.advance(5.0)
        too_late = await api.refresh(late.data["refreshToken"])
    assert late.status == 200
    assert too_late.status == 401


@pytest.mark.anyio
async def test_forged_refresh_does_not_spend_the_refresh_token(keys: Keys) -> None:
    """A refresh with a forged signature gets 401 and leaves the refresh token usable."""
    async with running(keys) as api:
        refresh_token = (await api.login()).data["refreshToken"]
        forged = await api.refresh(refresh_token, _sign(keys.partner, f"{PARTNER}|guess"))
        genuine = await api.refresh(refresh_token)
    assert (forged.status, genuine.status) == (401, 200)


# -- topups ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_topup_with_a_string_amount_is_accepted_pending(keys: Keys) -> None:
    """A string amount is accepted Pending: wallet charged amount + fee, card balance unchanged."""
    clock = FakeClock()
    card = SandboxCard(CARD, balance=Decimal("5.00"))
    async with running(keys, clock=clock, cards=(card,), wallet_balance=Decimal("1000.00")) as api:
        answer = await api.topup(CARD, "100.00")
        wallet = api.alix.state.shared.wallet
        balance = api.alix.state.shared.card(CARD).balance  # type: ignore[union-attr]
    body = answer.body
    assert answer.status == 200
    assert (body["success"], body["errorCode"]) == (True, 0)
    assert set(body["data"]) == TOPUP_FIELDS
    assert body["data"]["type"] == "TopupCard"
    assert body["data"]["status"] == "Pending"
    assert isinstance(body["data"]["createdAt"], int)
    assert '"fee":1,"amount":100,"balanceBefore":5,"balanceAfter":5' in answer.text
    assert wallet == Decimal("899.00")
    assert balance == Decimal("5.00")


@pytest.mark.anyio
async def test_number_amount_is_refused(keys: Keys) -> None:
    """An amount sent as a JSON number is 400 invalid amount; nothing is accepted."""
    async with running(keys) as api:
        answer = await api.topup(CARD, 100)
        assert api.alix.state.topups == []
    assert answer.status == 400
    assert answer.body["success"] is False
    assert answer.body["message"].startswith("Invalid amount")


@pytest.mark.anyio
@pytest.mark.parametrize("amount", ["100.001", "100.000", "1e2", "-10.00", " 100", "100.", ""])
async def test_amount_not_spelled_with_two_decimals_at_most_is_refused(
    keys: Keys, amount: str
) -> None:
    """A string amount with more than two decimals, a sign, an exponent or a space is 400."""
    async with running(keys) as api:
        answer = await api.topup(CARD, amount)
        assert api.alix.state.topups == []
    assert answer.status == 400
    assert answer.body["errorCode"] == 2


@pytest.mark.anyio
async def test_amount_bounds_are_inclusive(keys: Keys) -> None:
    """10.00 and 10000.00 are accepted; 9.99 and 10000.01 are refused."""
    async with running(keys) as api:
        statuses = [(await api.topup(CARD, a)).status for a in ("9.99", "10", "10000", "10000.01")]
    assert statuses == [400, 200, 200, 400]


@pytest.mark.anyio
async def test_refusal_in_http_200_mode(keys: Keys) -> None:
    """With failure_style ok a refusal comes as HTTP 200 with success:false and an errorCode."""
    async with running(keys, alix={"failure_style": "ok"}) as api:
        answer = await api.topup(CARD, "5.00")
    assert answer.status == 200
    assert answer.body["success"] is False
    assert answer.body["data"] is None
    assert answer.body["errorCode"] != 0


@pytest.mark.anyio
async def test_mixed_failure_style_answers_both_ways(keys: Keys) -> None:
    """With failure_style mixed, refusals come both as HTTP 400 and as HTTP 200."""
    async with running(keys, seed=5, alix={"failure_style": "mixed"}) as api:
        statuses = {(await api.topup(CARD, "5.00")).status for _ in range(16)}
    assert statuses == {200, 400}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("card", "status", "message"),
    [
        ("card-unknown", 404, "Card not found"),
        ("card-frozen", 400, "Card is not active"),
        ("card-closed", 400, "Card is not active"),
    ],
)
async def test_unknown_or_inactive_card_is_refused(
    keys: Keys, card: str, status: int, message: str
) -> None:
    """An unknown card is 404; a frozen or closed one is refused; nothing is accepted."""
    cards = (
        SandboxCard("card-frozen", status="frozen"),
        SandboxCard("card-closed", status="closed"),
    )
    async with running(keys, cards=cards) as api:
        answer = await api.topup(card, "100.00")
        assert api.alix.state.topups == []
    assert (answer.status, answer.body["message"]) == (status, message)


@pytest.mark.anyio
async def test_wallet_must_cover_amount_and_fee(keys: Keys) -> None:
    """A wallet one cent short of amount + fee refuses; exactly enough accepts."""
    async with running(keys, wallet_balance=Decimal("100.99")) as api:
        short = await api.topup(CARD, "100.00")
        await api.admin("POST", "/wallet", {"balance": "101.00"})
        enough = await api.topup(CARD, "100.00")
        wallet = api.alix.state.shared.wallet
    assert short.status == 400
    assert short.body["message"].startswith("Insufficient balance. Required: 101.00")
    assert enough.status == 200
    assert wallet == Decimal("0.00")


@pytest.mark.anyio
async def test_created_at_is_unique_per_card(keys: Keys) -> None:
    """Topups of one card in the same second get createdAt last + 1; another card is not moved."""
    async with running(keys, clock=FakeClock()) as api:
        created = [(await api.topup(CARD, "10.00")).data["createdAt"] for _ in range(3)]
        other = (await api.topup(OTHER, "10.00")).data["createdAt"]
    assert created == [created[0], created[0] + 1, created[0] + 2]
    assert other == created[0]


@pytest.mark.anyio
async def test_created_at_is_wall_clock_seconds(keys: Keys) -> None:
    """createdAt is the unix second of the topup."""
    async with running(keys) as api:
        before = int(datetime.now(UTC).timestamp())
        created = (await api.topup(CARD, "10.00")).data["createdAt"]
        after = int(datetime.now(UTC).timestamp())
    assert before <= created <= after


# -- settling -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_topup_settles_success_after_the_delay(keys: Keys) -> None:
    """Pending until settle_delay has passed on the clock, then Success: card balance rises."""
    clock = FakeClock()
    card = SandboxCard(CARD, balance=Decimal("5.00"))
    settings: dict[str, Any] = {
        "clock": clock,
        "cards": (card,),
        "wallet_balance": Decimal("1000.00"),
    }
    async with running(keys, alix={"settle_delay": 0.2}, **settings) as api:
        created = (await api.topup(CARD, "100.50")).data["createdAt"]
        clock.advance(0.19)
        early = (await api.transactions(CARD)).data["items"][0]
        clock.advance(0.01)
        late = (await api.transactions(CARD)).data["items"][0]
        state = api.alix.state
        record = state.topups[0]
        balance = state.shared.card(CARD).balance  # type: ignore[union-attr]
    assert early["status"] == "Pending"
    assert (late["status"], late["createdAt"]) == ("Success", created)
    assert (late["balanceBefore"], late["balanceAfter"]) == (Decimal("5"), Decimal("105.5"))
    assert balance == Decimal("105.50")
    assert state.shared.wallet == Decimal("1000.00") - Decimal("100.50") - Decimal("1.01")
    assert (record.status, record.settled_at) == (TopupStatus.SUCCESS, 1000.2)


@pytest.mark.anyio
async def test_settle_admin_route_settles_every_pending_topup_now(keys: Keys) -> None:
    """POST /_sandbox/alix/settle settles pending topups without waiting for the delay."""
    async with running(keys, clock=FakeClock(), alix={"settle_delay": 60}) as api:
        await api.topup(CARD, "10.00")
        await api.topup(OTHER, "20.00")
        answer = await api.admin("POST", "/alix/settle")
        statuses = [record.status for record in api.alix.state.topups]
    assert answer.status == 200
    assert [item["status"] for item in answer.body["settled"]] == ["Success", "Success"]
    assert statuses == [TopupStatus.SUCCESS, TopupStatus.SUCCESS]


@pytest.mark.anyio
async def test_failed_topup_refunds_the_wallet(keys: Keys) -> None:
    """A topup that settles Failed gives amount + fee back and leaves the card as it was."""
    alix = {"settle_failure_rate": 1.0}
    async with running(keys, clock=FakeClock(), wallet_balance=Decimal("500.00"), alix=alix) as api:
        await api.topup(CARD, "100.00")
        charged = api.alix.state.shared.wallet
        await api.admin("POST", "/alix/settle")
        item = (await api.transactions(CARD)).data["items"][0]
        state = api.alix.state
        balance = state.shared.card(CARD).balance  # type: ignore[union-attr]
    assert charged == Decimal("399.00")
    assert state.shared.wallet == Decimal("500.00")
    assert balance == Decimal("0.00")
    assert (item["status"], item["balanceBefore"], item["balanceAfter"]) == ("Failed", 0, 0)
    assert state.topups[0].status is TopupStatus.FAILED


@pytest.mark.anyio
async def test_topup_check_fee_equals_the_applied_fee(keys: Keys) -> None:
    """topup-check quotes the fee the topup is then charged, and netAmount = amount + fee."""
    async with running(
        keys, alix={"fee_rate": Decimal("0.015"), "fee_fixed": Decimal("0.30")}
    ) as api:
        check = await api.call(
            "POST", "/cards/topup-check", {"cardType": "visa", "amount": "250.10"}
        )
        topup = await api.topup(CARD, "250.10")
    assert check.status == 200
    assert check.data == {"netAmount": Decimal("254.15"), "fee": Decimal("4.05")}
    assert topup.data["fee"] == check.data["fee"] == api.alix.state.topups[0].fee


@pytest.mark.anyio
async def test_topup_check_accepts_a_number_and_needs_a_card_type(keys: Keys) -> None:
    """topup-check takes the amount as a number too; without cardType it is 400."""
    async with running(keys) as api:
        number = await api.call("POST", "/cards/topup-check", {"cardType": "visa", "amount": 100})
        untyped = await api.call("POST", "/cards/topup-check", {"amount": "100"})
    assert number.data == {"netAmount": Decimal("101"), "fee": Decimal("1")}
    assert untyped.status == 400


# -- transactions ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_transactions_list_shape_newest_first(keys: Keys) -> None:
    """Items carry the documented fields, newest first, with the amount and createdAt answered."""
    async with running(keys, clock=FakeClock()) as api:
        answers = [await api.topup(CARD, amount) for amount in ("10.00", "20.00", "30.00")]
        await api.topup(OTHER, "40.00")
        listed = await api.transactions(CARD)
    data = listed.data
    assert data["totalPage"] == 1
    assert [item["amount"] for item in data["items"]] == [30, 20, 10]
    assert [item["createdAt"] for item in data["items"]] == [
        answer.data["createdAt"] for answer in reversed(answers)
    ]
    item = data["items"][0]
    assert set(item) == {
        "id",
        "type",
        "cardId",
        "amount",
        "fee",
        "status",
        "balanceBefore",
        "balanceAfter",
        "createdAt",
    }
    assert (item["type"], item["cardId"], item["status"]) == ("TopupCard", CARD, "Pending")


@pytest.mark.anyio
async def test_transactions_filter_by_status_and_time(keys: Keys) -> None:
    """status picks Pending/Success/Failed; from/to (UTC, inclusive) bound createdAt."""
    async with running(keys, clock=FakeClock()) as api:
        created = [(await api.topup(CARD, "10.00")).data["createdAt"] for _ in range(3)]
        await api.admin("POST", "/alix/settle")
        await api.topup(CARD, "10.00")

        def at(second: int) -> str:
            return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d%%20%H:%M:%S")

        pending = await api.transactions(CARD, "type=TopupCard&status=Pending")
        settled = await api.transactions(CARD, "status=Success&from=&to=")
        window = await api.transactions(CARD, f"from={at(created[1])}&to={at(created[2])}")
        bad = await api.transactions(CARD, "status=Done")
    assert [i["status"] for i in pending.data["items"]] == ["Pending"]
    assert [i["createdAt"] for i in settled.data["items"]] == created[::-1]
    assert [i["createdAt"] for i in window.data["items"]] == [created[2], created[1]]
    assert bad.status == 400


@pytest.mark.anyio
async def test_transactions_pages(keys: Keys) -> None:
    """pageSize cuts the list into totalPage pages; page picks one."""
    async with running(keys, clock=FakeClock()) as api:
        for _ in range(5):
            await api.topup(CARD, "10.00")
        second = await api.transactions(CARD, "page=2&pageSize=2")
        last = await api.transactions(CARD, "page=3&pageSize=2")
        everything = [r.created_at for r in api.alix.state.topups]
    assert second.data["totalPage"] == 3
    assert [i["createdAt"] for i in second.data["items"]] == everything[::-1][2:4]
    assert len(last.data["items"]) == 1


@pytest.mark.anyio
async def test_transactions_of_an_unknown_card_is_not_found(keys: Keys) -> None:
    """Listing a card that does not exist is 404 Card not found."""
    async with running(keys) as api:
        answer = await api.transactions("card-unknown")
    assert (answer.status, answer.body["message"]) == (404, "Card not found")


# -- webhooks -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_webhook_is_delivered_signed_over_the_documented_fields(keys: Keys) -> None:
    """A settlement is POSTed to the webhook URL, signed over cardId|amount|status|createdAt."""
    async with receiver() as hook:
        settings = {"webhook_url": hook.url, "settle_delay": 0.05}
        async with running(keys, alix=settings) as api:
            created = (await api.topup(CARD, "100.00")).data["createdAt"]
            await hook.wait_for(1)  # settled by the background tick: no request made
            await recorded(api, 1)
            public_pem = api.alix.public_key_pem
            deliveries = list(api.alix.state.deliveries)
    body = json.loads(hook.bodies[0], parse_float=Decimal)
    assert (body["success"], body["webhookType"]) == (True, "TopupCard")
    assert body["data"] == {
        "cardId": CARD,
        "amount": "100.00",
        "fee": 1,
        "status": "Success",
        "balanceBefore": 0,
        "balanceAfter": 100,
        "createdAt": created,
    }
    message = f"{CARD}|100.00|Success|{created}"
    assert _verifies(public_pem, message, body["signature"])
    assert not _verifies(public_pem, f"{CARD}|100|Success|{created}", body["signature"])
    assert [(d.url, d.status, d.attempt, d.duplicate) for d in deliveries] == [
        (hook.url, 200, 1, False)
    ]
    assert deliveries[0].body == hook.bodies[0]


@pytest.mark.anyio
async def test_webhook_amount_is_the_string_the_partner_sent(keys: Keys) -> None:
    """The webhook's amount (and so the signed message) is "100" when the partner sent "100"."""
    async with receiver() as hook, running(keys, alix={"webhook_url": hook.url}) as api:
        created = (await api.topup(CARD, "100")).data["createdAt"]
        await api.admin("POST", "/alix/settle", {"status": "Failed"})
        await hook.wait_for(1)
        public_pem = api.alix.public_key_pem
    body = json.loads(hook.bodies[0])
    assert (body["data"]["amount"], body["data"]["status"]) == ("100", "Failed")
    assert _verifies(public_pem, f"{CARD}|100|Failed|{created}", body["signature"])


@pytest.mark.anyio
async def test_failed_webhook_delivery_is_retried(keys: Keys) -> None:
    """A delivery answered 500 is retried after the backoff; every attempt is recorded."""
    async with (
        receiver(statuses=(500, 503)) as hook,
        running(keys, alix={"webhook_url": hook.url, "webhook_backoff": 0.01}) as api,
    ):
        await api.topup(CARD, "10.00")
        await api.admin("POST", "/alix/settle")
        await recorded(api, 3)
        deliveries = list(api.alix.state.deliveries)
        counters = api.alix.state.counters
    assert [(d.attempt, d.status) for d in deliveries] == [(1, 500), (2, 503), (3, 200)]
    assert len(set(hook.bodies)) == 1
    assert (counters.webhooks_delivered, counters.webhook_failures) == (1, 2)


@pytest.mark.anyio
async def test_webhook_duplicates_when_configured(keys: Keys) -> None:
    """With webhook_duplicate_rate 1 each event arrives twice, byte for byte the same."""
    async with (
        receiver() as hook,
        running(keys, alix={"webhook_duplicate_rate": 1.0, "webhook_url": hook.url}) as api,
    ):
        await api.topup(CARD, "10.00")
        await api.admin("POST", "/alix/settle")
        await recorded(api, 2)
        deliveries = list(api.alix.state.deliveries)
    assert hook.bodies[0] == hook.bodies[1]
    assert [d.duplicate for d in deliveries] == [False, True]
    assert api.alix.state.counters.webhook_duplicates == 1


@pytest.mark.anyio
async def test_webhook_url_can_be_set_while_running(keys: Keys) -> None:
    """POST /_sandbox/alix/webhook points later deliveries at a loopback URL, refusing others."""
    async with receiver() as hook, running(keys) as api:
        remote = await api.admin("POST", "/alix/webhook", {"url": "http://example.com/hook"})
        local = await api.admin("POST", "/alix/webhook", {"url": hook.url})
        await api.topup(CARD, "10.00")
        await api.admin("POST", "/alix/settle")
        await hook.wait_for(1)
    assert (remote.status, local.status) == (400, 200)


@pytest.mark.parametrize(
    "url", ["http://example.com/hook", "http://10.0.0.1/hook", "ftp://127.0.0.1/hook", "nope"]
)
def test_webhook_url_must_be_loopback(keys: Keys, url: str) -> None:
    """A webhook URL off this machine (or not http) is refused when the config is made."""
    with pytest.raises(ValueError, match="webhook_url"):
        AlixConfig(PARTNER, SECRET, EMAIL, keys.partner_public_pem, webhook_url=url)


# -- faults and rate limit ------------------------------------------------------------------


@pytest.mark.anyio
async def test_drop_before_closes_without_accepting(keys: Keys) -> None:
    """drop_before closes the connection; nothing is charged or recorded."""
    async with running(keys) as api:
        api.alix.faults.script(FaultKind.DROP_BEFORE, CARD)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.topup(CARD, "10.00")
        state = api.alix.state
        assert (state.topups, state.faults_injected[FaultKind.DROP_BEFORE]) == ([], 1)


@pytest.mark.anyio
async def test_drop_after_accepts_then_closes(keys: Keys) -> None:
    """drop_after accepts the topup (recorded with its createdAt and fault), then closes."""
    async with running(keys) as api:
        api.alix.faults.script("drop_after", CARD)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.topup(CARD, "10.00")
        record = api.alix.state.topups[0]
        listed = (await api.transactions(CARD)).data["items"][0]
    assert (record.fault, record.status) == (FaultKind.DROP_AFTER, TopupStatus.PENDING)
    assert listed["createdAt"] == record.created_at


@pytest.mark.anyio
async def test_error_before_is_a_proxy_page_without_accepting(keys: Keys) -> None:
    """error_before answers a 502 HTML page; nothing is accepted."""
    async with running(keys) as api:
        api.alix.faults.script("error_before", CARD)
        answer = await api.topup(CARD, "10.00")
        assert api.alix.state.topups == []
    assert answer.status == 502
    assert answer.headers["Content-Type"].startswith("text/html")


@pytest.mark.anyio
async def test_error_after_accepts_then_answers_5xx(keys: Keys) -> None:
    """error_after accepts the topup, then answers 500 or 502."""
    async with running(keys) as api:
        api.alix.faults.script("error_after", CARD)
        answer = await api.topup(CARD, "10.00")
        record = api.alix.state.topups[0]
    assert answer.status in (500, 502)
    assert record.fault is FaultKind.ERROR_AFTER


@pytest.mark.anyio
async def test_slow_accepts_and_answers_late(keys: Keys) -> None:
    """slow holds the (accepting) answer back for slow_seconds."""
    async with running(keys, slow_seconds=0.2) as api:
        api.alix.faults.script("slow", CARD)
        started = anyio.current_time()
        answer = await api.topup(CARD, "10.00")
        elapsed = anyio.current_time() - started
        record = api.alix.state.topups[0]
    assert answer.status == 200
    assert elapsed >= 0.2
    assert record.fault is FaultKind.SLOW


@pytest.mark.anyio
async def test_rate_limited_fault_is_a_spurious_429(keys: Keys) -> None:
    """rate_limited answers 429 with Retry-After; nothing is accepted."""
    async with running(keys) as api:
        api.alix.faults.script("rate_limited", CARD)
        answer = await api.topup(CARD, "10.00")
        assert api.alix.state.topups == []
    assert (answer.status, answer.headers["Retry-After"]) == (429, "1")


def test_cooldown_fault_does_not_exist_on_alix() -> None:
    """Scripting a cooldown fault for Alix is refused: Alix has no cooldown."""
    with pytest.raises(ValueError, match="unknown fault kind 'cooldown'"):
        make_alix_faults(SandboxConfig()).script("cooldown", CARD)


@pytest.mark.anyio
async def test_random_faults_skip_cooldown_on_alix(keys: Keys) -> None:
    """With every topup faulted and cooldown among the kinds, Alix draws only its own kinds."""
    kinds = ("cooldown", "error_before")
    async with running(keys, fault_rate=1.0, fault_kinds=kinds) as api:
        statuses = {(await api.topup(CARD, "10.00")).status for _ in range(3)}
        injected = dict(api.alix.state.faults_injected)
    assert statuses == {502}
    assert injected == {FaultKind.ERROR_BEFORE: 3}


@pytest.mark.anyio
async def test_admin_scripts_alix_faults(keys: Keys) -> None:
    """POST /_sandbox/faults with api alix scripts the Alix plan, not the Uncash one."""
    async with running(keys) as api:
        scripted = await api.admin(
            "POST", "/faults", {"kind": "error_before", "card_id": CARD, "api": "alix"}
        )
        answer = await api.topup(CARD, "10.00")
    assert scripted.status == 200
    assert answer.status == 502


@pytest.mark.anyio
async def test_rate_limit_answers_429_with_retry_after(keys: Keys) -> None:
    """Beyond the burst, an authenticated call gets 429 with Retry-After and is not processed."""
    async with running(keys, clock=FakeClock(), rate_limit=1.0, rate_burst=2) as api:
        statuses = [(await api.topup(CARD, "10.00")).status for _ in range(3)]
        limited = await api.topup(CARD, "10.00")
        accepted = len(api.alix.state.topups)
    assert statuses == [200, 200, 429]
    assert (limited.status, limited.headers["Retry-After"]) == (429, "1")
    assert limited.body["success"] is False
    assert accepted == 2


# -- admin, config, command -----------------------------------------------------------------


@pytest.mark.anyio
async def test_admin_state_reports_the_alix_record_and_counters(keys: Keys) -> None:
    """GET /_sandbox/state has the Alix topups (createdAt, status) and the token counters."""
    async with running(keys, clock=FakeClock()) as api:
        created = (await api.topup(CARD, "10.00")).data["createdAt"]
        state = json.loads((await api.admin("GET", "/state")).text)
    alix = state["alix"]
    topup = alix["topups"][0]
    assert (topup["amount"], topup["amount_text"], topup["fee"]) == ("10.00", "10.00", "0.10")
    assert (topup["created_at"], topup["status"], topup["fault"]) == (created, "Pending", None)
    assert alix["counters"]["access_tokens_issued"] == 1
    assert alix["counters"]["requests"] == {
        "POST /api/v2/auth/access-token": 1,
        "POST /api/v2/cards/topup": 1,
    }
    assert alix["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")


@pytest.mark.anyio
async def test_alix_routes_are_off_without_partner_credentials() -> None:
    """Without an AlixConfig, /api/v2 is not served and the running sandbox has no alix."""
    async with (
        serve_sandbox(SandboxConfig()) as sandbox,
        aiohttp.ClientSession() as session,
        session.post(sandbox.root_url + "/api/v2/auth/access-token", json={}) as answer,
    ):
        assert sandbox.alix is None
        assert answer.status == 404


@pytest.mark.anyio
async def test_unknown_alix_route_is_an_enveloped_404(keys: Keys) -> None:
    """An unknown /api/v2 path answers the Alix envelope with 404."""
    async with running(keys) as api:
        answer = await api.call("GET", "/cards")
    assert answer.status == 404
    assert set(answer.body) == {"success", "message", "data", "errorCode"}


def test_alix_config_repr_hides_secrets(keys: Keys) -> None:
    """The repr shows settings but neither the secret key nor any key material."""
    config = AlixConfig(
        PARTNER, SECRET, EMAIL, keys.partner_public_pem, alix_private_key_pem=keys.alix_private_pem
    )
    text = repr(SandboxConfig(alix=config))
    assert SECRET not in text
    assert "BEGIN" not in text
    assert "secret_key='***'" in text
    assert f"partner_code='{PARTNER}'" in text


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"access_token_ttl": 0}, "access_token_ttl"),
        ({"access_token_ttl": 10, "refresh_token_ttl": 5}, "refresh_token_ttl"),
        ({"settle_failure_rate": 2}, "settle_failure_rate"),
        ({"webhook_duplicate_rate": -0.1}, "webhook_duplicate_rate"),
        ({"min_amount": Decimal("0")}, "min_amount"),
        ({"max_amount": Decimal("5")}, "max_amount"),
        ({"failure_style": "sometimes"}, "failure_style"),
        ({"alix_private_key_pem": "not a key"}, "alix_private_key_pem"),
        ({"webhook_attempts": 0}, "webhook_attempts"),
    ],
)
def test_alix_config_rejects_bad_settings(
    keys: Keys, settings: dict[str, Any], problem: str
) -> None:
    """Each invalid Alix setting is a ValueError naming it."""
    with pytest.raises(ValueError, match=problem):
        AlixConfig(PARTNER, SECRET, EMAIL, keys.partner_public_pem, **settings)


def test_alix_config_needs_a_public_key(keys: Keys) -> None:
    """A partner public key that is not a PEM public key is refused."""
    with pytest.raises(ValueError, match="partner_public_key_pem"):
        AlixConfig(PARTNER, SECRET, EMAIL, keys.alix_private_pem)


def test_command_refuses_partial_alix_credentials() -> None:
    """Some but not all partner credentials exit 2 naming the missing options."""
    result = CliRunner().invoke(sandbox_command, ["--alix-partner-code", PARTNER])
    assert result.exit_code == 2
    assert "--alix-user-email" in result.stderr
    assert "--alix-partner-public-key" in result.stderr


def test_command_serves_alix_and_writes_the_webhook_public_key(keys: Keys, tmp_path: Path) -> None:
    """The standalone command serves /api/v2 and writes the webhook public key where told."""
    partner_key = tmp_path / "partner.pem"
    partner_key.write_text(keys.partner_public_pem)
    signing_key = tmp_path / "alix.pem"
    signing_key.write_text(keys.alix_private_pem)
    public_out = tmp_path / "alix-public.pem"
    command = [
        sys.executable,
        "-m",
        "runner",
        "sandbox",
        "--port",
        "0",
        "--alix-partner-code",
        PARTNER,
        "--alix-user-email",
        EMAIL,
        "--alix-partner-public-key",
        str(partner_key),
        "--alix-signing-key",
        str(signing_key),
        "--alix-public-key-out",
        str(public_out),
    ]
    env = {**os.environ, "SANDBOX_ALIX_SECRET_KEY": SECRET}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline(), process.stdout.readline()]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    assert "Uncash API on http://127.0.0.1:" in lines[0]
    assert "Alix API on http://127.0.0.1:" in lines[1]
    assert "/api/v2" in lines[1]
    assert _verifies(public_out.read_text(), "m", _sign(keys.alix, "m"))
