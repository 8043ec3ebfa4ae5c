"""Hostile and broken answers against both adapters over real loopback HTTP: every answer is read
within its bound, and whatever the server sends, a topup ends in an outcome (Unknown when money
may have moved) and a read in a ProviderError, never in a stray exception.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web

import runner.providers.uncash as uncash_module
from runner.errors import ConfigError, ProviderError
from runner.providers.alix import AlixProvider
from runner.providers.alix_auth import AccessToken, AlixCredentials
from runner.providers.base import (
    Applied,
    CardState,
    CardStatus,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Unknown,
)
from runner.providers.http import MAX_ANSWER_BYTES, MAX_CARD_LIST_BYTES
from runner.providers.uncash import UncashProvider
from tests.alix import EMAIL, PARTNER, SECRET, Keys

TOKEN = "uc_" + "Tk7" * 13 + "q"
CARD = "3f9c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
HUNDRED = Decimal("100.00")
MIB = 1 << 20
TOO_LARGE = "larger than 1 MiB"


def test_limits_are_the_stated_ones() -> None:
    """One MiB for every answer but the card listing's 256 MiB."""
    assert MAX_ANSWER_BYTES == 1024 * 1024
    assert MAX_CARD_LIST_BYTES == 256 * 1024 * 1024


# -- a loopback server that answers whatever a test needs, well-formed or not -----------------


def http(status: int, body: bytes, **headers: str) -> bytes:
    """A raw HTTP/1.1 answer; Content-Length only when a test gives one."""
    lines = [f"HTTP/1.1 {status} X", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sized(status: int, body: bytes, **headers: str) -> bytes:
    return http(status, body, Content_Length=str(len(body)), **headers)


def json_answer(payload: Any, status: int = 200) -> bytes:
    return sized(status, json.dumps(payload).encode(), Content_Type="application/json")


GRANT = json_answer(
    {"success": True, "data": {"accessToken": "acc-1", "refreshToken": "ref-1", "expiresIn": 600}}
)


class Raw:
    """Answers each request with the next scripted bytes (the last one repeats), then closes;
    `hang` keeps the connection open after writing, as a server still sending would."""

    def __init__(self, *answers: bytes, hang: bool = False) -> None:
        self.answers = list(answers)
        self.hang = hang
        self.seen = 0
        self.paths: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.paths.append(lines[0].split(" ")[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            answer = self.answers[min(self.seen, len(self.answers) - 1)]
            self.seen += 1
            writer.write(answer)
            await writer.drain()
            if self.hang:
                await reader.read()  # until the client gives up and closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def raw_server(raw: Raw, prefix: str = "/api/v1") -> AsyncIterator[str]:
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}{prefix}"
    finally:
        server.close()
        await server.wait_closed()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def app_server(handler: Handler, prefix: str = "/api/v1") -> AsyncIterator[str]:
    """An aiohttp server answering every path with `handler` (for streamed answers)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}{prefix}"
    finally:
        await runner.cleanup()


class Endless:
    """A chunked answer (no Content-Length) that goes on far past any bound; `sent` counts."""

    def __init__(self, cap: int = 64 * MIB) -> None:
        self.cap = cap
        self.sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b'{"success": true, "data": {"pad": "' + b"x" * (64 * 1024)
        try:
            while self.sent < self.cap:
                await response.write(chunk)
                self.sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: what the bound is for
        return response


@asynccontextmanager
async def uncash_at(base_url: str, client_timeout: float = 5.0) -> AsyncIterator[UncashProvider]:
    provider = UncashProvider(TOKEN, base_url=base_url, timeout=client_timeout)
    try:
        yield provider
    finally:
        await provider.aclose()


@asynccontextmanager
async def alix_at(
    keys: Keys, base_url: str, client_timeout: float = 5.0
) -> AsyncIterator[AlixProvider]:
    credentials = AlixCredentials(PARTNER, SECRET, keys.partner_private.encode(), EMAIL)
    provider = AlixProvider(credentials, base_url=base_url, timeout=client_timeout, retry_delay=0.0)
    try:
        yield provider
    finally:
        await provider.aclose()


def padded(payload: dict[str, Any], size: int) -> bytes:
    """`payload` as JSON padded with blanks to exactly `size` bytes (still valid JSON)."""
    text = json.dumps(payload).encode()
    return text + b" " * (size - len(text))


APPLIED = {
    "success": True,
    "data": {"card_id": CARD, "transaction_id": "t-1", "total_charged": 103, "platform_fee": 3},
}
BEFORE = CardState(CARD, CardStatus.ACTIVE, Decimal("0"), deposit=Decimal("0"))


# -- bounded answers: Uncash ------------------------------------------------------------------


@pytest.mark.anyio
async def test_uncash_topup_with_a_declared_oversize_body_is_unknown_without_reading() -> None:
    """A Content-Length past the bound is Unknown at once; the body is never waited for."""
    raw = Raw(http(200, b"{", Content_Length=str(100 * MIB)), hang=True)
    async with raw_server(raw) as url, uncash_at(url, client_timeout=30.0) as provider:
        outcome = await asyncio.wait_for(provider.topup(CARD, HUNDRED), 5)
    assert outcome == Unknown(
        f"HTTP 200: the answer is {TOO_LARGE} (Content-Length {100 * MIB}): not read"
    )


@pytest.mark.anyio
async def test_uncash_topup_with_an_oversize_body_is_unknown() -> None:
    """An answer one byte past 1 MiB, Content-Length given, is Unknown: money may have moved."""
    raw = Raw(sized(200, padded(APPLIED, MIB + 1)))
    async with raw_server(raw) as url, uncash_at(url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Unknown)
    assert TOO_LARGE in outcome.message


@pytest.mark.anyio
async def test_uncash_topup_with_an_endless_chunked_body_stops_at_the_bound() -> None:
    """A chunked answer with no end is Unknown once 1 MiB + 1 bytes are read, not a timeout."""
    endless = Endless()
    async with app_server(endless.handle) as url, uncash_at(url, client_timeout=30.0) as provider:
        outcome = await asyncio.wait_for(provider.topup(CARD, HUNDRED), 10)
    assert isinstance(outcome, Unknown)
    assert TOO_LARGE in outcome.message
    assert endless.sent < 16 * MIB


@pytest.mark.anyio
async def test_uncash_topup_with_a_compressed_bomb_is_unknown() -> None:
    """A small gzip body that inflates past 1 MiB is measured inflated: Unknown."""
    bomb = gzip.compress(padded(APPLIED, 8 * MIB))
    assert len(bomb) < 64 * 1024
    raw = Raw(sized(200, bomb, Content_Encoding="gzip", Content_Type="application/json"))
    async with raw_server(raw) as url, uncash_at(url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Unknown)
    assert TOO_LARGE in outcome.message


@pytest.mark.anyio
@pytest.mark.parametrize("by_close", [False, True])
async def test_uncash_topup_answer_of_exactly_1_mib_is_read(by_close: bool) -> None:
    """An answer of exactly the bound is read and classified as usual, sized or not."""
    body = padded(APPLIED, MIB)
    answer = http(200, body) if by_close else sized(200, body)  # ended by closing, if not sized
    async with raw_server(Raw(answer)) as url, uncash_at(url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == Applied(
        fee=Decimal(3), total_charged=Decimal(103), transaction_id="t-1", discrepancy=None
    )


@pytest.mark.anyio
async def test_uncash_read_with_an_oversize_body_is_a_provider_error_not_retried() -> None:
    """A wallet answer past 1 MiB is a ProviderError at once: a retry would only repeat it."""
    raw = Raw(sized(200, padded({"success": True, "data": {"balance": 1}}, MIB + 1)))
    async with raw_server(raw) as url, uncash_at(url) as provider:
        with pytest.raises(ProviderError, match=f"GET /wallet/balance: the answer is {TOO_LARGE}"):
            await provider.wallet_balance()
    assert raw.seen == 1


@pytest.mark.anyio
async def test_uncash_card_read_with_an_endless_body_is_a_provider_error() -> None:
    """A card answer that never ends is a ProviderError once past 1 MiB."""
    async with app_server(Endless().handle) as url, uncash_at(url, client_timeout=30.0) as provider:
        with pytest.raises(ProviderError, match=TOO_LARGE):
            await asyncio.wait_for(provider.get_card(CARD), 10)


@pytest.mark.anyio
async def test_uncash_reconcile_with_an_oversize_card_answer_is_unknown() -> None:
    """Reconciling against an oversize card answer cannot tell: Unknown, never NotApplied."""
    raw = Raw(http(200, b"", Content_Length=str(2 * MIB)), hang=True)
    async with raw_server(raw) as url, uncash_at(url) as provider:
        settled = await provider.reconcile(CARD, HUNDRED, BEFORE)
    assert isinstance(settled, Unknown)
    assert TOO_LARGE in settled.message


def card_listing(count: int) -> bytes:
    cards = [
        {
            "id": str(uuid.UUID(int=n)),
            "name": f"Employee {n:06d}",
            "status": "active",
            "balance": 10.5,
            "deposit": 20,
            "currency": "USD",
        }
        for n in range(count)
    ]
    payload = {"success": True, "data": {"total_cards": count, "cards": cards}}
    return json.dumps(payload).encode()


@pytest.mark.anyio
@pytest.mark.parametrize("by_close", [False, True])
async def test_uncash_card_listing_past_1_mib_is_read_whole(by_close: bool) -> None:
    """The card listing has its own, larger bound: a 2 MiB listing is read in full."""
    listing = card_listing(16_000)
    assert 2 * MIB < len(listing) < 4 * MIB
    answer = http(200, listing) if by_close else sized(200, listing)
    async with raw_server(Raw(answer)) as url, uncash_at(url) as provider:
        cards = await provider.list_cards()
    assert len(cards) == 16_000
    assert cards[str(uuid.UUID(int=7))].balance == Decimal("10.5")


@pytest.mark.anyio
@pytest.mark.parametrize("by_close", [False, True])
async def test_uncash_card_listing_past_its_bound_is_a_provider_error(
    by_close: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing past its bound (here lowered to 1 MiB) is a ProviderError naming it."""
    monkeypatch.setattr(uncash_module, "MAX_CARD_LIST_BYTES", MIB)
    listing = card_listing(16_000)
    answer = http(200, listing) if by_close else sized(200, listing)
    async with raw_server(Raw(answer)) as url, uncash_at(url) as provider:
        with pytest.raises(ProviderError, match=f"GET /cards: the answer is {TOO_LARGE}"):
            await provider.list_cards()


# -- bounded answers: Alix --------------------------------------------------------------------


@pytest.mark.anyio
async def test_alix_topup_with_an_oversize_body_is_unknown(keys: Keys) -> None:
    """A topup answer past 1 MiB is Unknown: the topup was sent and may have applied."""
    raw = Raw(GRANT, sized(200, b" " * (MIB + 1)))
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert raw.paths[-1] == "/api/v2/cards/topup"
    assert isinstance(outcome, Unknown)
    assert TOO_LARGE in outcome.message


@pytest.mark.anyio
async def test_alix_topup_with_an_endless_body_is_unknown(keys: Keys) -> None:
    """A topup answer that never ends is Unknown once past 1 MiB, not after the timeout."""
    endless = Endless()
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if request.path.endswith("/auth/access-token"):
            await request.read()
            return web.Response(body=GRANT.split(b"\r\n\r\n", 1)[1])
        return await endless.handle(request)

    async with app_server(handler, "/api/v2") as url, alix_at(keys, url, 30.0) as provider:
        outcome = await asyncio.wait_for(provider.topup(CARD, HUNDRED), 10)
    assert isinstance(outcome, Unknown)
    assert TOO_LARGE in outcome.message
    assert calls == 2


@pytest.mark.anyio
async def test_alix_token_answer_oversize_means_the_topup_was_not_sent(keys: Keys) -> None:
    """An oversize access-token answer leaves no token: the topup is safely retried later."""
    raw = Raw(sized(200, b" " * (MIB + 1)))
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT
    assert TOO_LARGE in outcome.message
    assert raw.paths == ["/api/v2/auth/access-token"]  # not retried, and no topup sent


@pytest.mark.anyio
async def test_alix_transactions_page_oversize_is_a_provider_error(keys: Keys) -> None:
    """A transactions page past 1 MiB is a ProviderError, not retried."""
    raw = Raw(GRANT, http(200, b"", Content_Length=str(MIB + 1)))
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        with pytest.raises(ProviderError, match=TOO_LARGE):
            await provider.transactions(CARD)
    assert raw.seen == 2


@pytest.mark.anyio
async def test_alix_reconcile_with_an_oversize_page_is_unknown(keys: Keys) -> None:
    """Reconciling from an oversize transactions page cannot tell: Unknown."""
    raw = Raw(GRANT, sized(200, b" " * (MIB + 1)))
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=datetime.now(UTC))
    assert isinstance(settled, Unknown)
    assert TOO_LARGE in settled.message


@pytest.mark.anyio
async def test_alix_fee_quote_oversize_is_a_provider_error(keys: Keys) -> None:
    """A topup-check answer past 1 MiB is a ProviderError."""
    raw = Raw(GRANT, sized(200, b" " * (MIB + 1)))
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        with pytest.raises(ProviderError, match=TOO_LARGE):
            await provider.topup_check("GEC", HUNDRED)


# -- whatever the server sends, an outcome or a ProviderError ---------------------------------

DEEP = b"[" * 200_000 + b"]" * 200_000

BROKEN: dict[str, bytes] = {
    "short body": http(200, b'{"success": true}', Content_Length="400"),
    "bad gzip": sized(200, b"not gzip at all", Content_Encoding="gzip"),
    "bad chunk size": http(200, b"zz\r\nabc\r\n0\r\n\r\n", Transfer_Encoding="chunked"),
    "bad status line": b"HTTP/1.1 abc OK\r\n\r\n",
    "not http": b"\x00\x01\x02 garbage\r\n\r\n",
    "bad content-length": http(200, b"{}", Content_Length="abc"),
    "two content-lengths": http(200, b"{}", Content_Length="2\r\nContent-Length: 3"),
    "nested too deep": sized(200, DEEP, Content_Type="application/json"),
    "unknown charset": sized(
        200, b'{"success": tru', Content_Type="application/json; charset=nope"
    ),
    "odd status": sized(999, b"{}"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_uncash_topup_answered_brokenly_is_unknown(name: str) -> None:
    """Every malformed answer to a sent topup is Unknown, never an exception."""
    async with raw_server(Raw(BROKEN[name])) as url, uncash_at(url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Unknown), outcome


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_uncash_read_answered_brokenly_is_a_provider_error(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every malformed answer to a read ends in a ProviderError, never another exception."""
    monkeypatch.setattr(uncash_module, "_GET_ATTEMPTS", 1)
    async with raw_server(Raw(BROKEN[name])) as url, uncash_at(url) as provider:
        with pytest.raises(ProviderError):
            await provider.wallet_balance()


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_alix_topup_answered_brokenly_is_unknown(keys: Keys, name: str) -> None:
    """Every malformed answer to a sent Alix topup is Unknown, never an exception."""
    raw = Raw(GRANT, BROKEN[name])
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Unknown), outcome
    assert raw.paths == ["/api/v2/auth/access-token", "/api/v2/cards/topup"]


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_alix_token_answered_brokenly_leaves_the_topup_unsent(keys: Keys, name: str) -> None:
    """Every malformed answer to the token call: no token, no topup sent, retried later."""
    raw = Raw(BROKEN[name])
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, RetryLater), outcome
    assert "/api/v2/cards/topup" not in raw.paths


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_alix_read_answered_brokenly_is_a_provider_error(keys: Keys, name: str) -> None:
    """Every malformed answer to a transactions read ends in a ProviderError."""
    raw = Raw(GRANT, BROKEN[name])
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        with pytest.raises(ProviderError):
            await provider.transactions(CARD)


@pytest.mark.anyio
async def test_alix_access_token_that_would_inject_a_header_is_refused(keys: Keys) -> None:
    """A token with a line break is no token: the topup is not sent, and nothing escapes."""
    grant = {"accessToken": "acc\r\nX-Evil: 1", "refreshToken": "r", "expiresIn": 600}
    raw = Raw(json_answer({"success": True, "data": grant}))
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:
        outcome = await provider.topup(CARD, HUNDRED)
        with pytest.raises(ProviderError, match="accessToken"):
            await provider.transactions(CARD)
    assert isinstance(outcome, RetryLater)
    assert "X-Evil" not in outcome.message
    assert all(path == "/api/v2/auth/access-token" for path in raw.paths)


@pytest.mark.anyio
async def test_alix_request_aiohttp_will_not_send_is_an_outcome(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ValueError from aiohttp (a header it refuses) is Unknown for a topup, never raised."""
    raw = Raw(GRANT)
    async with raw_server(raw, "/api/v2") as url, alix_at(keys, url) as provider:

        async def bad_token() -> AccessToken:
            return AccessToken("bad\nvalue", 1)

        monkeypatch.setattr(provider.tokens, "current", bad_token)
        outcome = await provider.topup(CARD, HUNDRED)
        with pytest.raises(ProviderError):
            await provider.transactions(CARD)
    assert isinstance(outcome, Unknown)


def test_uncash_token_that_would_inject_a_header_is_a_config_error() -> None:
    """A token with a line break or a space is refused when the provider is made, unquoted."""
    for token in (TOKEN + "\r\nX-Evil: 1", TOKEN + " x", "", TOKEN + "\x00"):
        with pytest.raises(ConfigError, match="UNCASH_API_TOKEN") as caught:
            UncashProvider(token, base_url="http://127.0.0.1:1/api/v1")
        assert TOKEN not in str(caught.value)


@pytest.mark.anyio
async def test_uncash_request_aiohttp_will_not_send_is_an_outcome() -> None:
    """A ValueError from aiohttp is Unknown for a topup and a ProviderError for a read."""
    async with raw_server(Raw(json_answer(APPLIED))) as url, uncash_at(url) as provider:
        provider._headers["X-Bad"] = "a\nb"  # what no validated input can reach any more
        outcome = await provider.topup(CARD, HUNDRED)
        with pytest.raises(ProviderError):
            await provider.wallet_balance()
    assert isinstance(outcome, Unknown)


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:99999/api", "http://[::1/api", "http:///api", "ftp://host/api", "nonsense"],
)
def test_base_url_no_request_could_use_is_a_config_error(keys: Keys, base_url: str) -> None:
    """A base URL aiohttp would refuse at every request is refused when the provider is made."""
    with pytest.raises(ConfigError, match="base URL"):
        UncashProvider(TOKEN, base_url=base_url)
    credentials = AlixCredentials(PARTNER, SECRET, keys.partner_private.encode(), EMAIL)
    with pytest.raises(ConfigError, match="base URL"):
        AlixProvider(credentials, base_url=base_url)


@pytest.mark.anyio
async def test_invalid_url_at_request_time_is_not_sent() -> None:
    """Should an invalid URL reach a request, the topup is safe to retry and a read fails."""
    async with uncash_at("http://127.0.0.1:1/api/v1") as provider:
        provider._base = "http://127.0.0.1:99999/api/v1"  # past check_base_url
        outcome = await provider.topup(CARD, HUNDRED)
        with pytest.raises(ProviderError):
            await provider.wallet_balance()
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT


@pytest.mark.anyio
async def test_card_id_that_is_not_text_is_never_sent() -> None:
    """A card id no URL can carry (a lone surrogate) is refused without a request."""
    raw = Raw(json_answer(APPLIED))
    async with raw_server(raw) as url, uncash_at(url) as provider:
        outcome = await provider.topup("card-\udc80", HUNDRED)
        with pytest.raises(ProviderError):
            await provider.get_card("card-\udc80")
    assert isinstance(outcome, Refused)
    assert outcome.code is RefusalCode.CARD_NOT_FOUND
    assert raw.seen == 0
