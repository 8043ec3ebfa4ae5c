"""The sandbox server: the simulated Uncash API beside loopback-only admin routes, served in the
caller's event loop (`serve_sandbox`) or as a standalone process (`run_standalone`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from runner.sandbox.config import SandboxConfig, canonical_card_id, to_money
from runner.sandbox.faults import FaultPlan
from runner.sandbox.state import AppliedTopup, CardAccount, SandboxState
from runner.sandbox.uncash import API_PREFIX, uncash_app
from runner.sandbox.wire import JSON, Delays, json_response

ADMIN_PREFIX = "/_sandbox"
# Backstop only: Delays.close already ends every simulated wait when shutdown begins.
_SHUTDOWN_TIMEOUT = 2.0

_ADMIN_STATE = web.AppKey("admin_state", SandboxState)
_ADMIN_FAULTS = web.AppKey("admin_faults", FaultPlan)


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    """A sandbox serving on `port`: clients call `base_url`; tests read `state`, script `faults`."""

    base_url: str
    root_url: str
    state: SandboxState
    faults: FaultPlan
    port: int


def make_app(state: SandboxState, faults: FaultPlan) -> web.Application:
    """The whole sandbox: Uncash under /api/v1, admin routes under /_sandbox."""
    delays = Delays()
    app = web.Application(middlewares=[_json_not_found])
    app.add_subapp(API_PREFIX, uncash_app(state, faults, delays))
    app.add_subapp(ADMIN_PREFIX, _admin_app(state, faults))

    async def end_delays(_: web.Application) -> None:
        await delays.close()

    app.on_shutdown.append(end_delays)
    return app


def make_faults(config: SandboxConfig) -> FaultPlan:
    """The fault plan `config` asks for."""
    return FaultPlan(
        config.fault_rate, config.fault_kinds, seed=config.seed, canonical_id=canonical_card_id
    )


@asynccontextmanager
async def serve_sandbox(
    config: SandboxConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSandbox]:
    """Serve a fresh sandbox in the running event loop (port 0: any free port) until exit."""
    state = SandboxState(config)
    faults = make_faults(config)
    runner = web.AppRunner(
        make_app(state, faults), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        root_url = f"http://{url_host}:{bound_port}"
        yield RunningSandbox(root_url + API_PREFIX, root_url, state, faults, bound_port)
    finally:
        await runner.cleanup()


def run_standalone(config: SandboxConfig, host: str = "127.0.0.1", port: int = 8089) -> None:
    """Serve the sandbox until SIGINT or SIGTERM; OSError if the address cannot be bound."""
    asyncio.run(_serve_until_signalled(config, host, port))


async def _serve_until_signalled(config: SandboxConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve_sandbox(config, host, port) as sandbox:
            print(describe(config, sandbox.base_url), flush=True)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def describe(config: SandboxConfig, base_url: str) -> str:
    """The one line a standalone sandbox prints when it is ready."""
    rate = (
        "rate limit off"
        if config.rate_limit is None
        else f"rate limit {config.rate_limit:g}/s burst {config.rate_burst}"
    )
    faults = (
        f"faults {config.fault_rate * 100:g}% of topups: {', '.join(config.fault_kinds)}"
        if config.fault_rate > 0
        else "faults off"
    )
    return f"sandbox: Uncash API on {base_url} (cooldown {config.cooldown:g}s, {rate}, {faults})"


@web.middleware
async def _json_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes outside the API answer JSON too (the API answers its own envelope)."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return json_response({"success": False, "message": "Route not found"}, status=404)


# -- admin routes ---------------------------------------------------------------------------


class _BadAdminRequest(ValueError):
    pass


def _admin_app(state: SandboxState, faults: FaultPlan) -> web.Application:
    app = web.Application(middlewares=[_loopback_only])
    app[_ADMIN_STATE] = state
    app[_ADMIN_FAULTS] = faults
    app.router.add_get("/state", _admin_state)
    app.router.add_post("/faults", _admin_faults)
    app.router.add_post("/cards", _admin_cards)
    app.router.add_post("/wallet", _admin_wallet)
    return app


@web.middleware
async def _loopback_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin routes move money without a token, so only this machine may call them."""
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        message = "admin routes answer loopback clients only"
        return json_response({"success": False, "message": message}, status=403)
    try:
        return await handler(request)
    except _BadAdminRequest as exc:
        return json_response({"success": False, "message": str(exc)}, status=400)


async def _admin_state(request: web.Request) -> web.Response:
    state = request.app[_ADMIN_STATE]
    faults = request.app[_ADMIN_FAULTS]
    payload: dict[str, JSON] = {
        "wallet": {"balance": str(state.wallet)},
        "cards": [_card_json(card) for card in state.known_cards()],
        "applied": [_applied_json(record) for record in state.applied],
        "counters": {
            "requests": dict(state.requests),
            "refusals": {str(reason): n for reason, n in state.refusals.items()},
            "faults": {str(kind): n for kind, n in state.faults_injected.items()},
        },
        "topup_arrivals": list(state.topup_arrivals),
        "first_applied_at": state.first_applied_at,
        "last_applied_at": state.last_applied_at,
        "scripted_faults": [
            {"kind": str(s.kind), "card_id": s.card_id, "remaining": s.remaining}
            for s in faults.scripted
        ],
    }
    return json_response(payload)


async def _admin_faults(request: web.Request) -> web.Response:
    faults = request.app[_ADMIN_FAULTS]
    body = await _json_object(request)
    kind, card_id, count = body.get("kind"), body.get("card_id"), body.get("count", 1)
    if not isinstance(kind, str):
        raise _BadAdminRequest("kind must be a fault kind name")
    if card_id is not None and not isinstance(card_id, str):
        raise _BadAdminRequest("card_id must be a string or null")
    if isinstance(count, bool) or not isinstance(count, int):
        raise _BadAdminRequest("count must be a positive integer")
    try:
        faults.script(kind, card_id, count)
    except ValueError as exc:
        raise _BadAdminRequest(str(exc)) from None
    scripted: list[JSON] = [
        {"kind": str(s.kind), "card_id": s.card_id, "remaining": s.remaining}
        for s in faults.scripted
    ]
    return json_response({"success": True, "scripted_faults": scripted})


async def _admin_cards(request: web.Request) -> web.Response:
    state = request.app[_ADMIN_STATE]
    items = (await _json_object(request)).get("cards")
    if not isinstance(items, list) or not items:
        raise _BadAdminRequest("cards must be a non-empty list of card objects")
    specs = []
    # Every card is validated before any changes, so a bad one leaves the state untouched.
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("card_id"), str):
            raise _BadAdminRequest("each card needs a card_id string")
        unknown = sorted(set(item) - {"card_id", "status", "limit", "balance", "deposit", "name"})
        if unknown:
            raise _BadAdminRequest(f"unknown card fields: {', '.join(unknown)}")
        try:
            specs.append(
                state.merged_card(
                    item["card_id"],
                    status=item.get("status"),
                    balance=_money_or_none(item, "balance"),
                    deposit=_money_or_none(item, "deposit"),
                    limit=_money_or_none(item, "limit"),
                    name=item.get("name"),
                )
            )
        except ValueError as exc:
            raise _BadAdminRequest(str(exc)) from None
    cards: list[JSON] = [_card_json(state.put_card(spec)) for spec in specs]
    return json_response({"success": True, "cards": cards})


async def _admin_wallet(request: web.Request) -> web.Response:
    state = request.app[_ADMIN_STATE]
    body = await _json_object(request)
    try:
        state.set_wallet(to_money("balance", body.get("balance")))
    except ValueError as exc:
        raise _BadAdminRequest(str(exc)) from None
    return json_response({"success": True, "wallet": {"balance": str(state.wallet)}})


async def _json_object(request: web.Request) -> Mapping[str, Any]:
    try:
        body = json.loads(await request.read(), parse_float=Decimal)
    except ValueError:
        raise _BadAdminRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _BadAdminRequest("the body must be a JSON object")
    return body


def _money_or_none(item: Mapping[str, Any], key: str) -> Decimal | None:
    value = item.get(key)
    return None if value is None else to_money(key, value)


def _card_json(card: CardAccount) -> JSON:
    return {
        "card_id": card.card_id,
        "name": card.name,
        "status": card.status,
        "balance": str(card.balance),
        "deposit": str(card.deposit),
        "limit": str(card.limit),
        "last_applied_at": card.last_applied_at,
    }


def _applied_json(record: AppliedTopup) -> JSON:
    return {
        "seq": record.seq,
        "card_id": record.card_id,
        "amount": str(record.amount),
        "fee": str(record.fee),
        "total_charged": str(record.total_charged),
        "at": record.at,
        "transaction_id": record.transaction_id,
        "invoice_id": record.invoice_id,
        "card_balance_after": str(record.card_balance_after),
        "wallet_balance_after": str(record.wallet_balance_after),
        "fault": None if record.fault is None else str(record.fault),
    }
