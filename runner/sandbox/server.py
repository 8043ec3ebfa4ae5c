"""The sandbox server: the simulated Uncash API (/api/v1), the simulated Alix API (/api/v2, when
partner credentials are configured) with its webhook sender, and loopback-only admin routes,
served in the caller's event loop (`serve_sandbox`) or as a standalone process (`run_standalone`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from runner.sandbox.alix import API_PREFIX as ALIX_PREFIX
from runner.sandbox.alix import alix_app
from runner.sandbox.alix_state import AlixState, AlixTopup, TopupStatus, WebhookDelivery
from runner.sandbox.config import SandboxConfig, canonical_card_id, to_money
from runner.sandbox.faults import FaultKind, FaultPlan
from runner.sandbox.serverlog import aiohttp_logs_as_events
from runner.sandbox.signing import generate_private_key
from runner.sandbox.state import AppliedTopup, CardAccount, SandboxState
from runner.sandbox.uncash import API_PREFIX, uncash_app
from runner.sandbox.webhooks import WebhookSender
from runner.sandbox.wire import JSON, Delays, json_response

ADMIN_PREFIX = "/_sandbox"
# Backstop only: Delays.close already ends every simulated wait when shutdown begins.
_SHUTDOWN_TIMEOUT = 2.0

_ADMIN_STATE = web.AppKey("admin_state", SandboxState)
_ADMIN_FAULTS = web.AppKey("admin_faults", FaultPlan)
_ADMIN_ALIX = web.AppKey("admin_alix", AlixState)
_ADMIN_ALIX_FAULTS = web.AppKey("admin_alix_faults", FaultPlan)

# The fault kinds Alix knows: it has no cooldown to refuse spuriously.
ALIX_FAULT_KINDS = tuple(kind for kind in FaultKind if kind is not FaultKind.COOLDOWN)


@dataclass(frozen=True, slots=True)
class RunningAlix:
    """The Alix side of a running sandbox: clients call `base_url`; tests read `state` (its
    `topups`, `counters` and webhook `deliveries`), script `faults`, and verify webhooks with
    `public_key_pem`."""

    base_url: str
    state: AlixState
    faults: FaultPlan

    @property
    def public_key_pem(self) -> str:
        """The PEM public key that verifies the sandbox's webhook signatures."""
        return self.state.public_key_pem


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    """A sandbox serving on `port`: clients call `base_url`; tests read `state`, script `faults`.

    `alix` is the Alix side, None unless the config has partner credentials.
    """

    base_url: str
    root_url: str
    state: SandboxState
    faults: FaultPlan
    port: int
    alix: RunningAlix | None = None


def make_app(
    state: SandboxState,
    faults: FaultPlan,
    *,
    alix: AlixState | None = None,
    alix_faults: FaultPlan | None = None,
) -> web.Application:
    """The whole sandbox: Uncash under /api/v1, Alix under /api/v2 when `alix` is given (its
    webhook sender and settling tick running with the app), admin routes under /_sandbox."""
    delays = Delays()
    app = web.Application(middlewares=[_json_not_found])
    app.add_subapp(API_PREFIX, uncash_app(state, faults, delays))
    if alix is not None:
        alix_faults = alix_faults or make_alix_faults(state.config)
        app.add_subapp(ALIX_PREFIX, alix_app(alix, alix_faults, delays))
        app.cleanup_ctx.append(_alix_background(alix))
    app.add_subapp(ADMIN_PREFIX, _admin_app(state, faults, alix, alix_faults))

    async def end_delays(_: web.Application) -> None:
        await delays.close()

    app.on_shutdown.append(end_delays)
    return app


def _alix_background(
    alix: AlixState,
) -> Callable[[web.Application], AbstractAsyncContextManager[None]]:
    """The webhook sender (and settling tick) as a task that lives exactly as long as the app."""
    sender = WebhookSender(alix)

    @asynccontextmanager
    async def background(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sender.run(), name="sandbox-alix-webhooks")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return background


def make_faults(config: SandboxConfig) -> FaultPlan:
    """The fault plan `config` asks for."""
    return FaultPlan(
        config.fault_rate, config.fault_kinds, seed=config.seed, canonical_id=canonical_card_id
    )


def make_alix_faults(config: SandboxConfig) -> FaultPlan:
    """The Alix fault plan `config` asks for: its kinds but cooldown, on a stream of its own."""
    kinds = tuple(kind for kind in config.fault_kinds if kind in ALIX_FAULT_KINDS)
    return FaultPlan(
        config.fault_rate if kinds else 0.0,
        kinds,
        seed=config.seed,
        canonical_id=canonical_card_id,
        allowed=ALIX_FAULT_KINDS,
        stream="alix-faults",
    )


@asynccontextmanager
async def serve_sandbox(
    config: SandboxConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSandbox]:
    """Serve a fresh sandbox in the running event loop (port 0: any free port) until exit."""
    state = SandboxState(config)
    faults = make_faults(config)
    alix = alix_faults = None
    if config.alix is not None:
        # Making an RSA key takes a good fraction of a second: not on the event loop.
        key = (
            None
            if config.alix.alix_private_key_pem is not None
            else await asyncio.to_thread(generate_private_key)
        )
        alix = AlixState(state, config.alix, signing_key=key)
        alix_faults = make_alix_faults(config)
    app = make_app(state, faults, alix=alix, alix_faults=alix_faults)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    # From setup to cleanup: a malformed request becomes one structlog event, no traceback.
    with aiohttp_logs_as_events():
        try:
            yield await _start(runner, host, port, state, faults, alix, alix_faults)
        finally:
            await runner.cleanup()


async def _start(
    runner: web.AppRunner,
    host: str,
    port: int,
    state: SandboxState,
    faults: FaultPlan,
    alix: AlixState | None,
    alix_faults: FaultPlan | None,
) -> RunningSandbox:
    """Listen on `host`:`port` and describe the running sandbox."""
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = int(runner.addresses[0][1])
    url_host = f"[{host}]" if ":" in host else host
    root_url = f"http://{url_host}:{bound_port}"
    running_alix = (
        None
        if alix is None or alix_faults is None
        else RunningAlix(root_url + ALIX_PREFIX, alix, alix_faults)
    )
    return RunningSandbox(root_url + API_PREFIX, root_url, state, faults, bound_port, running_alix)


def run_standalone(
    config: SandboxConfig,
    host: str = "127.0.0.1",
    port: int = 8089,
    *,
    alix_public_key_out: Path | None = None,
) -> None:
    """Serve the sandbox until SIGINT or SIGTERM; OSError if the address cannot be bound or the
    Alix webhook public key cannot be written to `alix_public_key_out`."""
    asyncio.run(_serve_until_signalled(config, host, port, alix_public_key_out))


async def _serve_until_signalled(
    config: SandboxConfig, host: str, port: int, alix_public_key_out: Path | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve_sandbox(config, host, port) as sandbox:
            if sandbox.alix is not None and alix_public_key_out is not None:
                write_text_atomically(alix_public_key_out, sandbox.alix.public_key_pem)
            print(describe(config, sandbox.base_url), flush=True)
            if sandbox.alix is not None:
                print(describe_alix(config, sandbox.alix.base_url), flush=True)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one."""
    directory = path.parent if str(path.parent) else Path(".")
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)  # a public key: anyone on the machine may read it
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def describe_alix(config: SandboxConfig, base_url: str) -> str:
    """The line a standalone sandbox prints about its Alix side."""
    alix = config.alix
    if alix is None:
        return "sandbox: Alix API off (no partner credentials)"
    webhooks = f"webhooks to {alix.webhook_url}" if alix.webhook_url else "no webhook URL"
    return (
        f"sandbox: Alix API on {base_url} (token ttl {alix.access_token_ttl:g}s, "
        f"settle delay {alix.settle_delay:g}s, {webhooks})"
    )


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
    delay = f", apply delay {config.apply_delay:g}s" if config.apply_delay > 0 else ""
    return (
        f"sandbox: Uncash API on {base_url} (cooldown {config.cooldown:g}s, {rate}, {faults}"
        f"{delay})"
    )


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


def _admin_app(
    state: SandboxState,
    faults: FaultPlan,
    alix: AlixState | None,
    alix_faults: FaultPlan | None,
) -> web.Application:
    app = web.Application(middlewares=[_loopback_only])
    app[_ADMIN_STATE] = state
    app[_ADMIN_FAULTS] = faults
    if alix is not None and alix_faults is not None:
        app[_ADMIN_ALIX] = alix
        app[_ADMIN_ALIX_FAULTS] = alix_faults
    app.router.add_get("/state", _admin_state)
    app.router.add_post("/faults", _admin_faults)
    app.router.add_post("/cards", _admin_cards)
    app.router.add_post("/wallet", _admin_wallet)
    app.router.add_post("/alix/settle", _admin_alix_settle)
    app.router.add_post("/alix/webhook", _admin_alix_webhook)
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
        "scripted_faults": _scripted_json(faults),
    }
    alix = request.app.get(_ADMIN_ALIX)
    if alix is not None:
        alix.settle_due()  # a read settles what is due, as every Alix request does
        payload["alix"] = {
            "topups": [_alix_topup_json(record) for record in alix.topups],
            "counters": {
                **asdict(alix.counters),
                "requests": dict(alix.requests),
                "refusals": {str(reason): n for reason, n in alix.refusals.items()},
                "faults": {str(kind): n for kind, n in alix.faults_injected.items()},
            },
            "topup_arrivals": list(alix.topup_arrivals),
            "deliveries": [_delivery_json(delivery) for delivery in alix.deliveries],
            "scripted_faults": _scripted_json(request.app[_ADMIN_ALIX_FAULTS]),
            "webhook_url": alix.webhook_url,
            "public_key_pem": alix.public_key_pem,
        }
    return json_response(payload)


def _scripted_json(faults: FaultPlan) -> list[JSON]:
    return [
        {"kind": str(s.kind), "card_id": s.card_id, "remaining": s.remaining}
        for s in faults.scripted
    ]


async def _admin_faults(request: web.Request) -> web.Response:
    body = await _json_object(request)
    api = body.get("api", "uncash")
    if api == "uncash":
        faults = request.app[_ADMIN_FAULTS]
    elif api == "alix":
        faults = _alix_of(request)[1]
    else:
        raise _BadAdminRequest("api must be uncash or alix")
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
    return json_response({"success": True, "scripted_faults": _scripted_json(faults)})


def _alix_of(request: web.Request) -> tuple[AlixState, FaultPlan]:
    alix, faults = request.app.get(_ADMIN_ALIX), request.app.get(_ADMIN_ALIX_FAULTS)
    if alix is None or faults is None:
        raise _BadAdminRequest("the Alix API is off: the sandbox has no partner credentials")
    return alix, faults


async def _admin_alix_settle(request: web.Request) -> web.Response:
    """Settle every pending Alix topup now: as `status` if the body gives one, else as drawn."""
    alix, _ = _alix_of(request)
    raw = await request.read()
    body = await _json_object(request) if raw.strip() else {}
    status = body.get("status")
    if status is not None and status not in (TopupStatus.SUCCESS, TopupStatus.FAILED):
        raise _BadAdminRequest("status must be Success, Failed or absent")
    settled = alix.settle_all(None if status is None else TopupStatus(status))
    return json_response(
        {"success": True, "settled": [_alix_topup_json(record) for record in settled]}
    )


async def _admin_alix_webhook(request: web.Request) -> web.Response:
    """Send later Alix webhooks to `url` (loopback only), or to nobody when it is null."""
    alix, _ = _alix_of(request)
    url = (await _json_object(request)).get("url")
    try:
        alix.set_webhook_url(url)
    except ValueError as exc:
        raise _BadAdminRequest(str(exc)) from None
    return json_response({"success": True, "webhook_url": alix.webhook_url})


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


def _alix_topup_json(record: AlixTopup) -> JSON:
    return {
        "seq": record.seq,
        "card_id": record.card_id,
        "amount": str(record.amount),
        "amount_text": record.amount_text,
        "fee": str(record.fee),
        "total_charged": str(record.total_charged),
        "created_at": record.created_at,
        "accepted_at": record.accepted_at,
        "transaction_id": record.transaction_id,
        "status": str(record.status),
        "balance_before": str(record.balance_before),
        "balance_after": str(record.balance_after),
        "wallet_balance_after": str(record.wallet_balance_after),
        "settled_at": record.settled_at,
        "fault": None if record.fault is None else str(record.fault),
    }


def _delivery_json(delivery: WebhookDelivery) -> JSON:
    return {
        "seq": delivery.seq,
        "url": delivery.url,
        "body": delivery.body,
        "status": delivery.status,
        "error": delivery.error,
        "attempt": delivery.attempt,
        "duplicate": delivery.duplicate,
        "card_id": delivery.card_id,
        "created_at": delivery.created_at,
        "topup_status": str(delivery.topup_status),
        "at": delivery.at,
    }
