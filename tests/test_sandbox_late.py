"""A busy backend: the sandbox applies a topup after its client gave up (`apply_delay`, the `late`
fault), on both APIs, and records when the money really moved."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from runner.sandbox import (
    AlixConfig,
    FaultKind,
    FaultPlan,
    RunningSandbox,
    SandboxConfig,
    SandboxState,
    make_app,
    serve_sandbox,
)
from runner.sandbox.command import sandbox as sandbox_command
from runner.sandbox.server import describe
from tests.alix import EMAIL, PARTNER, SECRET, Keys
from tests.e2e import until

TOKEN = "uc_" + "Ab3" * 13 + "x"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CARD = "3f9c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
# The client gives up at CLIENT_TIMEOUT; the sandbox applies at DELAY; the test looks in between.
# Real time: the look must fit in the window even on a loaded machine (2 cores, the suite's
# workers and PostgreSQL beside it), where 0.3 s was once too short; LATE bounds how late a
# loaded event loop may apply it and still count as "at DELAY".
CLIENT_TIMEOUT = 0.2
DELAY = 1.2
LATE = 1.5


def _timeout(seconds: float = CLIENT_TIMEOUT) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


async def _uncash_topup(base_url: str, patience: float = CLIENT_TIMEOUT) -> int:
    """POST a topup of 10 on CARD with a client that waits `patience` seconds at most."""
    async with (
        aiohttp.ClientSession(timeout=_timeout(patience)) as session,
        session.post(f"{base_url}/cards/{CARD}/topup", json={"amount": 10}, headers=AUTH) as reply,
    ):
        await reply.read()
        return reply.status


async def _uncash_deposit(base_url: str) -> Decimal:
    """The card's deposit as a client reads it back (GET /cards/{id})."""
    async with (
        aiohttp.ClientSession(timeout=_timeout(5)) as session,
        session.get(f"{base_url}/cards/{CARD}", headers=AUTH) as reply,
    ):
        body = json.loads(await reply.text(), parse_float=Decimal)
    return Decimal(body["data"]["deposit"])


async def _gives_up_before_application(sandbox: RunningSandbox) -> None:
    """The client times out, and reading the card back before DELAY shows nothing applied."""
    with pytest.raises(TimeoutError):
        await _uncash_topup(sandbox.base_url)
    state = sandbox.state
    [arrived] = state.topup_arrivals
    assert state.now() - arrived < DELAY, "the machine was too slow to look before DELAY"
    assert await _uncash_deposit(sandbox.base_url) == Decimal("0.00")
    assert state.applied == []


# -- Uncash ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_apply_delay_applies_after_the_client_gave_up() -> None:
    """apply_delay: a client that timed out sees the card unchanged, then the money moves at
    arrival + apply_delay, recorded with that time."""
    config = SandboxConfig(token=TOKEN, apply_delay=DELAY)
    async with serve_sandbox(config) as sandbox:
        await _gives_up_before_application(sandbox)
        await until(lambda: len(sandbox.state.applied) == 1, limit=DELAY + LATE + 2)
        [record] = sandbox.state.applied
        [arrived] = sandbox.state.topup_arrivals
        assert await _uncash_deposit(sandbox.base_url) == Decimal("10.00")
    assert DELAY <= record.at - arrived < DELAY + LATE
    assert record.fault is None


@pytest.mark.anyio
async def test_late_fault_applies_after_the_client_gave_up() -> None:
    """A scripted late fault: the same, after slow_seconds, and the record names the fault."""
    config = SandboxConfig(token=TOKEN, slow_seconds=DELAY)
    async with serve_sandbox(config) as sandbox:
        sandbox.faults.script("late", CARD)
        await _gives_up_before_application(sandbox)
        await until(lambda: len(sandbox.state.applied) == 1, limit=DELAY + LATE + 2)
        [record] = sandbox.state.applied
        [arrived] = sandbox.state.topup_arrivals
    assert DELAY <= record.at - arrived < DELAY + LATE
    assert record.fault is FaultKind.LATE


@pytest.mark.anyio
async def test_apply_delay_answers_a_patient_client_after_applying() -> None:
    """A client that waits gets the answer once the topup is applied, not before."""
    config = SandboxConfig(token=TOKEN, apply_delay=0.05)
    async with serve_sandbox(config) as sandbox:
        started = time.monotonic()
        status = await _uncash_topup(sandbox.base_url, patience=5)
        elapsed = time.monotonic() - started
        [record] = sandbox.state.applied
    assert status == 200
    assert elapsed >= 0.05
    assert record.at - sandbox.state.topup_arrivals[0] >= 0.05


@pytest.mark.anyio
async def test_random_late_faults_are_drawn_when_named() -> None:
    """late is drawn at random when fault_kinds names it; it is not among the default kinds."""
    config = SandboxConfig(
        token=TOKEN, fault_rate=1.0, fault_kinds=("late",), slow_seconds=0.01, cooldown=0
    )
    async with serve_sandbox(config) as sandbox:
        status = await _uncash_topup(sandbox.base_url, patience=5)
        [record] = sandbox.state.applied
    assert (status, record.fault) == (200, FaultKind.LATE)
    assert FaultKind.LATE not in SandboxConfig().fault_kinds


@pytest.mark.anyio
async def test_shutdown_applies_what_is_waiting_at_once() -> None:
    """Stopping the sandbox does not wait out a long delay, and loses no received topup: the
    waiting one is applied at once."""
    started = time.monotonic()
    async with serve_sandbox(SandboxConfig(token=TOKEN, apply_delay=30.0)) as sandbox:
        with pytest.raises(TimeoutError):
            await _uncash_topup(sandbox.base_url)
        assert sandbox.state.applied == []
    assert time.monotonic() - started < 2.0
    assert len(sandbox.state.applied) == 1


@pytest.mark.anyio
async def test_late_application_survives_handler_cancellation() -> None:
    """Even where aiohttp cancels a handler whose client went away, the topup is applied."""
    state = SandboxState(SandboxConfig(token=TOKEN, apply_delay=DELAY))
    runner = web.AppRunner(make_app(state, FaultPlan()), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1"
        with pytest.raises(TimeoutError):
            await _uncash_topup(base_url)
        await anyio.sleep(0.05)  # let the server see the disconnect and cancel the handler
        assert state.applied == []
        await until(lambda: len(state.applied) == 1, limit=DELAY + LATE + 2)
    finally:
        await runner.cleanup()
    assert state.applied[0].at - state.topup_arrivals[0] >= DELAY


def test_command_takes_an_apply_delay() -> None:
    """--apply-delay is validated like every setting, and the banner shows it."""
    result = CliRunner().invoke(sandbox_command, ["--apply-delay", "-1"])
    assert result.exit_code == 2
    assert "apply_delay" in result.stderr
    assert "--apply-delay" in CliRunner().invoke(sandbox_command, ["--help"]).output
    banner = describe(SandboxConfig(apply_delay=0.5), "http://127.0.0.1:8089/api/v1")
    assert banner.endswith("faults off, apply delay 0.5s)")


# -- Alix -----------------------------------------------------------------------------------


def _signature(keys: Keys) -> str:
    key = serialization.load_pem_private_key(keys.partner_private.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    raw = key.sign(f"{PARTNER}|{SECRET}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(raw).decode()


@dataclass
class Alix:
    sandbox: RunningSandbox
    token: str

    @property
    def base_url(self) -> str:
        assert self.sandbox.alix is not None
        return self.sandbox.alix.base_url

    async def call(self, method: str, path: str, payload: Any = None, patience: float = 5) -> Any:
        headers = {"access-token": self.token}
        async with (
            aiohttp.ClientSession(timeout=_timeout(patience)) as session,
            session.request(method, self.base_url + path, json=payload, headers=headers) as reply,
        ):
            return json.loads(await reply.text(), parse_float=Decimal)


@asynccontextmanager
async def alix_sandbox(keys: Keys, **settings: Any) -> AsyncIterator[Alix]:
    alix = AlixConfig(
        PARTNER,
        SECRET,
        EMAIL,
        keys.partner_public,
        alix_private_key_pem=keys.alix_private,
        failure_style="http",
        settle_delay=60.0,
    )
    async with serve_sandbox(SandboxConfig(alix=alix, **settings)) as sandbox:
        assert sandbox.alix is not None
        payload = {"partnerCode": PARTNER, "userEmail": EMAIL, "signature": _signature(keys)}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{sandbox.alix.base_url}/auth/access-token", json=payload) as reply,
        ):
            token = (await reply.json())["data"]["accessToken"]
        yield Alix(sandbox, token)


async def _alix_gives_up_before_acceptance(api: Alix) -> None:
    """The client times out, and the transactions list before DELAY shows no topup."""
    with pytest.raises(TimeoutError):
        await api.call("POST", "/cards/topup", {"cardId": CARD, "amount": "10"}, CLIENT_TIMEOUT)
    assert api.sandbox.alix is not None
    state = api.sandbox.alix.state
    [arrived] = state.topup_arrivals
    assert state.now() - arrived < DELAY, "the machine was too slow to look before DELAY"
    listed = await api.call("GET", f"/cards/{CARD}/transactions?type=TopupCard")
    assert listed["data"]["items"] == []
    assert state.topups == []
    assert api.sandbox.state.wallet == Decimal("1000000.00")


@pytest.mark.anyio
async def test_alix_apply_delay_accepts_after_the_client_gave_up(keys: Keys) -> None:
    """apply_delay on Alix: nothing listed or charged before, the topup accepted (wallet charged,
    listed) at arrival + apply_delay."""
    async with alix_sandbox(keys, apply_delay=DELAY) as api:
        assert api.sandbox.alix is not None
        state = api.sandbox.alix.state
        await _alix_gives_up_before_acceptance(api)
        await until(lambda: len(state.topups) == 1, limit=DELAY + LATE + 2)
        listed = await api.call("GET", f"/cards/{CARD}/transactions?type=TopupCard")
        [record] = state.topups
        [arrived] = state.topup_arrivals
    assert [item["amount"] for item in listed["data"]["items"]] == [Decimal("10")]
    assert DELAY <= record.accepted_at - arrived < DELAY + LATE
    assert record.fault is None


@pytest.mark.anyio
async def test_alix_late_fault_accepts_after_the_client_gave_up(keys: Keys) -> None:
    """A scripted late fault on Alix: the same after slow_seconds, the record naming it."""
    async with alix_sandbox(keys, slow_seconds=DELAY) as api:
        assert api.sandbox.alix is not None
        state = api.sandbox.alix.state
        api.sandbox.alix.faults.script("late", CARD)
        await _alix_gives_up_before_acceptance(api)
        await until(lambda: len(state.topups) == 1, limit=DELAY + LATE + 2)
        [record] = state.topups
        [arrived] = state.topup_arrivals
    assert DELAY <= record.accepted_at - arrived < DELAY + LATE
    assert record.fault is FaultKind.LATE
