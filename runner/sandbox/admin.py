"""The sandbox's admin routes under /_sandbox, for loopback clients only: read the state and
every topup applied, script faults, set cards and the wallet, settle Alix topups, aim webhooks.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import asdict
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from runner.sandbox.alix_records import AlixTopup, TopupStatus, WebhookDelivery
from runner.sandbox.alix_state import AlixState
from runner.sandbox.config import to_money
from runner.sandbox.faults import FaultKind, FaultPlan
from runner.sandbox.outside import outside_routes
from runner.sandbox.state import AppliedTopup, CardAccount, SandboxState
from runner.sandbox.wire import JSON, json_response

ADMIN_PREFIX = "/_sandbox"

_ADMIN_STATE = web.AppKey("admin_state", SandboxState)
_ADMIN_FAULTS = web.AppKey("admin_faults", FaultPlan)
_ADMIN_ALIX = web.AppKey("admin_alix", AlixState)
_ADMIN_ALIX_FAULTS = web.AppKey("admin_alix_faults", FaultPlan)

# The fault kinds Alix knows: it has no cooldown to refuse spuriously.
ALIX_FAULT_KINDS = tuple(kind for kind in FaultKind if kind is not FaultKind.COOLDOWN)


_CARD_FIELDS = frozenset({"card_id", "status", "limit", "balance", "deposit", "name", "currency"})


class _BadAdminRequest(ValueError):
    pass


def admin_app(
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
    outside_routes(app, lambda request: request.app[_ADMIN_STATE])
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
        unknown = sorted(set(item) - _CARD_FIELDS)
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
                    currency=item.get("currency"),
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
        "currency": card.currency,
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
