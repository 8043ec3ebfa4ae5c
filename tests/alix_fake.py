"""What the Alix adapter's tests share: a tiny fake Alix on 127.0.0.1 (`FakeAlix`, `alix()`),
keys, a fake clock, a recording throttle, and builders for answers and transaction items.
"""

from __future__ import annotations

import base64
import json
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from runner.providers.alix import AlixProvider
from runner.providers.alix_auth import AlixCredentials
from tests.alix import pem_pair

PARTNER = "PARTNER-7"
SECRET = "s3cr3t-Key-0123456789"
EMAIL = "ops@example.com"
CARD = "3f9c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
HUNDRED = Decimal("100.00")
T0 = 1_731_578_091
LIFETIME = 60.0  # seconds; refreshed 12 s early (a fifth of it, under the 30 s cap)


# -- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    private_pem: bytes
    public_pem: bytes
    other_private_pem: bytes
    other_public_pem: bytes


def make_keys() -> Keys:
    """Two RSA key pairs, as PEM: the partner's (or Alix's) and another one."""
    mine = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(*(pem.encode() for key in (mine, other) for pem in pem_pair(key)))


def signature_of(private_pem: bytes, text: str) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


def verifies(public_pem: bytes, text: str, signature: str) -> bool:
    key = serialization.load_pem_public_key(public_pem)
    assert isinstance(key, rsa.RSAPublicKey)
    try:
        key.verify(base64.b64decode(signature), text.encode(), padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


# -- a tiny Alix on 127.0.0.1 ---------------------------------------------------------------


class FakeClock:
    """The token clock shared by the client and the fake server, moved by hand."""

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


def wire(value: Any) -> str:
    """JSON with Decimals written as the exact numbers they are (as a JavaScript server would)."""
    raw: dict[str, str] = {}

    def convert(v: Any) -> Any:
        if isinstance(v, Decimal):
            key = f"@@{len(raw)}@@"
            raw[key] = str(v)
            return key
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list):
            return [convert(x) for x in v]
        return v

    text = json.dumps(convert(value))
    for key, number in raw.items():
        text = text.replace(f'"{key}"', number)
    return text


def envelope(data: Any = None, *, success: bool = True, message: str = "ok", code: int = 0) -> str:
    return wire({"success": success, "message": message, "data": data, "errorCode": code})


Scripted = tuple[int, str, dict[str, str]]


@dataclass
class FakeAlix:
    """Auth, topup, topup-check and the transactions list, as the assumptions describe them."""

    public_key: rsa.RSAPublicKey
    clock: FakeClock
    lifetime: float | None = LIFETIME
    refresh_delay: float = 0.0
    refuse_refresh: bool = False
    refuse_access: bool = False
    reject_all: bool = False
    topup_mode: str = "normal"  # or "drop", "hang"
    issued: int = 0
    refreshed: int = 0
    unauthorized: int = 0
    access: dict[str, float] = field(default_factory=dict)  # token -> expiry on the clock
    refresh: dict[str, str] = field(default_factory=dict)  # refresh token -> its access token
    every_token: list[str] = field(default_factory=list)
    topup_bodies: list[str] = field(default_factory=list)
    topup_tokens: list[str] = field(default_factory=list)
    scripted: list[Scripted] = field(default_factory=list)
    check_bodies: list[Any] = field(default_factory=list)
    transactions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    list_queries: list[dict[str, str]] = field(default_factory=list)
    list_failures: int = 0
    list_failure_status: int = 503
    next_created_at: int = T0
    release: anyio.Event = field(default_factory=anyio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v2/auth/access-token", self.access_token)
        app.router.add_post("/api/v2/auth/refresh-token", self.refresh_token)
        app.router.add_post("/api/v2/cards/topup", self.topup)
        app.router.add_post("/api/v2/cards/topup-check", self.topup_check)
        app.router.add_get("/api/v2/cards/{card}/transactions", self.list_transactions)
        return app

    def revoke_access(self) -> None:
        """Every access token stops working; refresh tokens still do."""
        self.access.clear()

    def _signed(self, body: dict[str, Any]) -> bool:
        try:
            self.public_key.verify(
                base64.b64decode(body["signature"], validate=True),
                f"{PARTNER}|{SECRET}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception:
            return False
        return body.get("partnerCode") == PARTNER

    def _grant(self) -> web.Response:
        n = len(self.every_token)
        access, refresh = f"acc-{n:04d}-tok", f"ref-{n:04d}-tok"
        self.every_token += [access, refresh]
        self.access[access] = self.clock() + (self.lifetime or 10**9)
        self.refresh[refresh] = access
        data: dict[str, Any] = {"accessToken": access, "refreshToken": refresh}
        if self.lifetime is not None:
            data["expiresIn"] = Decimal(str(self.lifetime))
        return web.Response(text=envelope(data), content_type="application/json")

    @staticmethod
    def _refused(status: int = 401, message: str = "Unauthorized") -> web.Response:
        return web.Response(
            status=status,
            text=envelope(None, success=False, message=message, code=status),
            content_type="application/json",
        )

    async def access_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refuse_access or not self._signed(body) or body.get("userEmail") != EMAIL:
            return self._refused(message="Invalid partner credentials")
        self.issued += 1
        return self._grant()

    async def refresh_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refresh_delay:
            await anyio.sleep(self.refresh_delay)  # lets every other caller pile up meanwhile
        old = body.get("refreshToken")
        if self.refuse_refresh or not self._signed(body) or old not in self.refresh:
            return self._refused(message="Invalid refresh token")
        self.access.pop(self.refresh.pop(old), None)  # single use; revokes its access token
        self.refreshed += 1
        return self._grant()

    def _authorized(self, request: web.Request) -> bool:
        token = request.headers.get("access-token", "")
        ok = not self.reject_all and self.access.get(token, -math.inf) > self.clock()
        if not ok:
            self.unauthorized += 1
        return ok

    async def topup(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._refused()
        text = await request.text()
        self.topup_bodies.append(text)
        self.topup_tokens.append(request.headers["access-token"])
        if self.topup_mode == "hang":
            await self.release.wait()
        if self.scripted:
            status, out, headers = self.scripted.pop(0)
            return web.Response(status=status, text=out, headers=headers)
        body = json.loads(text)
        amount = Decimal(body["amount"])
        self.next_created_at += 1
        fee = (amount / 100).quantize(Decimal("0.01"))
        item = {
            "id": f"tx-{self.next_created_at}",
            "type": "TopupCard",
            "cardId": body["cardId"].lower(),
            "amount": amount,
            "fee": fee,
            "status": "Pending",
            "balanceBefore": Decimal(0),
            "balanceAfter": Decimal(0),
            "createdAt": self.next_created_at,
        }
        self.transactions.setdefault(body["cardId"].lower(), []).insert(0, item)
        if self.topup_mode == "drop":  # applied, and then the answer is lost
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        data = {k: v for k, v in item.items() if k not in ("id", "cardId")}
        return web.Response(text=envelope(data), content_type="application/json")

    async def topup_check(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused()
        body = await request.json()
        self.check_bodies.append(body)
        amount = Decimal(body["amount"])
        if amount == Decimal("999.00"):
            return self._refused(400, "Amount not allowed for this card type")
        fee = (amount / 100).quantize(Decimal("0.01"))
        return web.Response(
            text=envelope({"netAmount": amount + fee, "fee": fee}),
            content_type="application/json",
        )

    async def list_transactions(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused()
        query = dict(request.query)
        self.list_queries.append(query)
        if self.list_failures:
            self.list_failures -= 1
            return web.Response(status=self.list_failure_status, text="busy")
        items = self.transactions.get(request.match_info["card"].lower(), [])
        if "status" in query:
            items = [i for i in items if i["status"] == query["status"]]
        size = int(query.get("pageSize", "10"))
        page = int(query.get("page", "1"))
        total = math.ceil(len(items) / size)
        chunk = items[(page - 1) * size : page * size]
        return web.Response(
            text=envelope({"totalPage": total, "items": chunk}), content_type="application/json"
        )


@asynccontextmanager
async def serving(fake: FakeAlix) -> AsyncIterator[str]:
    """The fake on a loopback port; yields its API root."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/api/v2"
    finally:
        fake.release.set()
        await runner.cleanup()


def credentials(keys: Keys, secret: str = SECRET) -> AlixCredentials:
    return AlixCredentials(PARTNER, secret, keys.private_pem, EMAIL)


@asynccontextmanager
async def alix(
    keys: Keys,
    *,
    secret: str = SECRET,
    client_timeout: float = 2.0,
    throttle: RecordingThrottle | None = None,
    **options: Any,
) -> AsyncIterator[tuple[FakeAlix, AlixProvider, FakeClock]]:
    """A fake Alix and a provider pointed at it, sharing one hand-moved clock."""
    clock = FakeClock()
    public = serialization.load_pem_public_key(keys.public_pem)
    assert isinstance(public, rsa.RSAPublicKey)
    fake = FakeAlix(public, clock, **options)
    async with serving(fake) as base_url:
        provider = AlixProvider(
            credentials(keys, secret),
            base_url=base_url,
            timeout=client_timeout,
            throttle=throttle,
            clock=clock,
            retry_delay=0.0,
        )
        try:
            yield fake, provider, clock
        finally:
            await provider.aclose()


def free_port() -> int:
    """A loopback port nobody listens on (bound, noted, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e["event"] == name]


def item(
    created_at: int, *, amount: Any = "100.00", status: str = "Pending", **more: Any
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": f"tx-{created_at}",
        "type": "TopupCard",
        "cardId": CARD,
        "amount": amount,
        "fee": Decimal("1.00"),
        "status": status,
        "balanceBefore": Decimal("5.00"),
        "balanceAfter": Decimal("105.00"),
        "createdAt": created_at,
    }
    fields.update(more)
    return fields


def at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)
