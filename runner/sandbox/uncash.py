"""The Uncash API's HTTP surface over `SandboxState`: routes, envelopes, messages and faults as the
real API shows them. Mounted at /api/v1 by server.py; the rules themselves live in state.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiMapping

from runner.sandbox.config import is_well_formed_token
from runner.sandbox.faults import FaultKind, FaultPlan
from runner.sandbox.state import (
    MAX_AMOUNT,
    MIN_AMOUNT,
    AmountProblem,
    CardAccount,
    CardInactive,
    CardNotFound,
    CoolingDown,
    InsufficientFunds,
    InvalidAmount,
    OverCardLimit,
    Refusal,
    SandboxState,
    TopupApplied,
    TopupResult,
)
from runner.sandbox.wire import (
    JSON,
    Delays,
    drop_connection,
    json_response,
    proxy_error_page,
    seconds_text,
)

API_PREFIX = "/api/v1"

_STATE = web.AppKey("uncash_state", SandboxState)
_FAULTS = web.AppKey("uncash_faults", FaultPlan)
_DELAYS = web.AppKey("uncash_delays", Delays)
# Response shapes are drawn from their own stream so they do not shift transaction ids.
_SHAPES = web.AppKey("uncash_shapes", random.Random)

Version = Literal["new", "old"]
Issue = dict[str, JSON]

NOT_FOUND_MESSAGE = "Card not found or access denied"
INVALID_MESSAGE = "Invalid input data"
INACTIVE_MESSAGE = "Card is not active"
TOO_MANY_MESSAGE = "Too many requests, please try again later"
UNAUTHORIZED_BODY: JSON = {
    "success": False,
    "message": "Unauthorized",
    "error": "Invalid or missing API token",
}
# Sandbox values for card fields the docs name but whose contents do not matter here.
_CATEGORY = "virtual"
_BIN_ID = "sandbox-bin-535584"
_PLAN_ID = "00000000-0000-4000-8000-000000000001"
_TRANSACTIONS_PAGE_SIZE = 10
_TRANSACTIONS_MAX_PAGE_SIZE = 100


def uncash_app(state: SandboxState, faults: FaultPlan, delays: Delays) -> web.Application:
    """The /api/v1 sub-application serving `state`, with `faults` injected into topups."""
    app = web.Application(middlewares=[_paced, _guarded])
    app[_STATE] = state
    app[_FAULTS] = faults
    app[_DELAYS] = delays
    seed = state.config.seed
    app[_SHAPES] = random.Random(None if seed is None else f"uncash-shapes:{seed}")
    app.router.add_get("/health", _health, name="health")
    app.router.add_post("/cards/{id}/topup", _topup, name="topup")
    # Before /cards/{id}, which would otherwise take "transactions" for a card id.
    app.router.add_get("/cards/transactions", _transactions, name="transactions")
    app.router.add_get("/cards/{id}", _card, name="card")
    app.router.add_get("/cards", _cards, name="cards")
    app.router.add_get("/wallet/balance", _wallet, name="wallet")
    app.router.add_get("/card-plans", _card_plans, name="card_plans")
    return app


# -- middlewares ----------------------------------------------------------------------------


@web.middleware
async def _paced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Half the configured latency before the request is processed, half after; counting."""
    state, delays = request.app[_STATE], request.app[_DELAYS]
    half = state.config.latency / 2
    with delays.track():
        # Read the whole request first: a client that gives up during the simulated latency
        # has still sent it, and a real server goes on to process it. (Reading it later would
        # raise "Connection lost" out of the handler, which aiohttp logs as an error.)
        try:
            await request.read()
        except ConnectionError:
            return drop_connection(request)
        await delays.pause(half)
        route = request.match_info.route
        if request.match_info.http_exception is None and route.resource is not None:
            state.note_request(f"{request.method} {route.resource.canonical}")
            if route.name == "topup":
                state.note_topup_arrival()
        response = await handler(request)
        await delays.pause(half)
    return response


@web.middleware
async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Token first, then the rate limit, for every route but /health."""
    state = request.app[_STATE]
    if request.match_info.http_exception is not None:
        return _error(state, 404, "Route not found")
    if request.match_info.route.name == "health":
        return await handler(request)
    if not _authorized(request.headers.get("Authorization"), state.config.token):
        state.note_refusal(Refusal.UNAUTHORIZED)
        return json_response(UNAUTHORIZED_BODY, status=401)
    wait = state.admit()
    if wait is not None:
        return _too_many(state, wait)
    return await handler(request)


def _authorized(header: str | None, expected: str | None) -> bool:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    token = token.strip()
    if expected is None:
        return is_well_formed_token(token)
    return hmac.compare_digest(token.encode(), expected.encode())


# -- the topup ------------------------------------------------------------------------------


async def _topup(request: web.Request) -> web.StreamResponse:
    state, faults = request.app[_STATE], request.app[_FAULTS]
    card_id = request.match_info["id"]
    body = await request.read()  # already read by _paced; the last await before the decision
    fault = faults.draw(card_id)
    if fault is not None:
        state.note_fault(fault)
        if not fault.applies_first:
            return _fault_instead(request, state, fault)
    config = state.config
    delay = config.slow_seconds if fault is FaultKind.LATE else config.apply_delay
    response = await request.app[_DELAYS].later(
        delay, lambda: _decide_topup(request, state, card_id, body, fault)
    )
    if fault is None or fault is FaultKind.LATE:
        return response
    return await _fault_after(request, state, fault, response)


def _decide_topup(
    request: web.Request, state: SandboxState, card_id: str, body: bytes, fault: FaultKind | None
) -> web.Response:
    if state.card(card_id) is None:
        state.note_refusal(Refusal.NOT_FOUND)
        return _error(state, 404, NOT_FOUND_MESSAGE)
    amount = _parse_amount(body)
    if not isinstance(amount, Decimal):
        state.note_refusal(Refusal.INVALID)
        return _error(state, 400, INVALID_MESSAGE, issues=amount)
    result = state.topup(card_id, amount, fault=fault)
    return _render_topup(state, result, _version(request))


def _render_topup(state: SandboxState, result: TopupResult, version: Version) -> web.Response:
    match result:
        case TopupApplied(record):
            data: dict[str, JSON]
            if version == "new":
                data = {
                    "card_id": record.card_id,
                    "transaction_id": record.transaction_id,
                    "invoice_id": record.invoice_id,
                    "wallet_balance": record.wallet_balance_after,
                    "total_charged": record.total_charged,
                    "platform_fee_amount": record.fee,
                    "new_card_balance": record.card_balance_after,
                }
            else:
                data = {
                    "card_id": record.card_id,
                    "transaction_id": record.transaction_id,
                    "new_balance": record.card_balance_after,
                    "platform_fee": record.fee,
                    "total_charged": record.total_charged,
                }
            return _ok(state, "Card topped up successfully", data)
        case CardNotFound():
            return _error(state, 404, NOT_FOUND_MESSAGE)
        case InvalidAmount(problems):
            return _error(state, 400, INVALID_MESSAGE, issues=[_amount_issue(p) for p in problems])
        case CardInactive():
            return _error(state, 400, INACTIVE_MESSAGE)
        case CoolingDown(remaining):
            return _cooldown_refusal(state, remaining)
        case OverCardLimit(deposit, limit, available):
            message = (
                f"Topup would exceed card limit. Current deposit: {_plain(deposit)}, "
                f"Limit: {_plain(limit)}, Available: {_plain(available)}"
            )
            return _error(state, 400, message)
        case InsufficientFunds(amount, fee, required, available):
            message = (
                f"Insufficient wallet balance. Required: {required:.2f} (topup: {amount:.2f} "
                f"+ platform fee: {fee:.2f}), Available: {available:.2f}"
            )
            return _error(state, 400, message)


def _cooldown_refusal(state: SandboxState, remaining: float) -> web.Response:
    wait = seconds_text(remaining, whole=state.config.cooldown >= 1)
    message = f"Please wait {wait} seconds before topping up this card again"
    return _error(state, state.config.cooldown_status, message)


def _too_many(state: SandboxState, wait: float) -> web.Response:
    headers = {"Retry-After": seconds_text(wait, whole=wait >= 1)}
    return _error(state, 429, TOO_MANY_MESSAGE, headers=headers)


def _fault_instead(request: web.Request, state: SandboxState, fault: FaultKind) -> web.Response:
    """The answer of a fault that strikes before the request is processed: nothing applied."""
    match fault:
        case FaultKind.DROP_BEFORE:
            return drop_connection(request)
        case FaultKind.ERROR_BEFORE:
            return proxy_error_page(502)
        case FaultKind.RATE_LIMITED:
            return _too_many(state, 1.0)
        case FaultKind.COOLDOWN:
            return _cooldown_refusal(state, state.spurious_cooldown())
    raise AssertionError(f"{fault} is applied first")  # pragma: no cover


async def _fault_after(
    request: web.Request, state: SandboxState, fault: FaultKind, response: web.Response
) -> web.StreamResponse:
    """What the client gets instead of (or later than) `response`, already decided and applied."""
    match fault:
        case FaultKind.DROP_AFTER:
            return drop_connection(request)
        case FaultKind.ERROR_AFTER:
            if request.app[_SHAPES].random() < 0.5:
                return _error(state, 500, "Internal server error")
            return proxy_error_page(502)
        case FaultKind.SLOW:
            await request.app[_DELAYS].pause(state.config.slow_seconds)
            return response
    raise AssertionError(f"{fault} strikes before processing")  # pragma: no cover


def _parse_amount(body: bytes) -> Decimal | list[Issue]:
    """The body's `amount` as an exact decimal, or the zod issues of a body without one."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # An unparseable body reaches validation as no body at all: an empty object.
        data = {}
    if not isinstance(data, dict):
        return [_type_issue([], "object", _js_type(data))]
    if "amount" not in data:
        return [_type_issue(["amount"], "number", "undefined")]
    amount = data["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | Decimal):
        return [_type_issue(["amount"], "number", _js_type(amount))]
    return Decimal(amount)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # JSON.parse refuses NaN and Infinity too


def _type_issue(path: list[JSON], expected: str, received: str) -> Issue:
    message = "Required" if received == "undefined" else f"Expected {expected}, received {received}"
    return {
        "code": "invalid_type",
        "expected": expected,
        "received": received,
        "path": path,
        "message": message,
    }


def _js_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | Decimal):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _amount_issue(problem: AmountProblem) -> Issue:
    match problem:
        case AmountProblem.TOO_SMALL:
            minimum = int(MIN_AMOUNT)
            return _bound_issue(minimum, ["amount"], f"Minimum top-up amount is {minimum}")
        case AmountProblem.TOO_BIG:
            maximum = int(MAX_AMOUNT)
            message = f"Maximum top-up amount is {maximum}"
            return _bound_issue(maximum, ["amount"], message, big=True)
        case AmountProblem.TOO_PRECISE:
            return {
                "code": "custom",
                "message": "Amount must have at most 2 decimal places",
                "path": ["amount"],
            }


def _bound_issue(bound: int, path: list[JSON], message: str, *, big: bool = False) -> Issue:
    """zod's too_small (or, `big`, too_big) issue for an inclusive numeric bound."""
    return {
        "code": "too_big" if big else "too_small",
        "maximum" if big else "minimum": bound,
        "type": "number",
        "inclusive": True,
        "exact": False,
        "message": message,
        "path": path,
    }


# -- reading routes -------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _card(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    card = state.card(request.match_info["id"])
    if card is None:
        state.note_refusal(Refusal.NOT_FOUND)
        return _error(state, 404, NOT_FOUND_MESSAGE)
    return _ok(state, "Card retrieved successfully", _card_data(state, card, _version(request)))


async def _cards(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    version = _version(request)
    cards = state.known_cards()
    data: dict[str, JSON] = {
        "total_balance": sum((card.balance for card in cards), Decimal("0.00")),
        "total_cards": len(cards),
        "cards": [_card_data(state, card, version) for card in cards],
    }
    return _ok(state, "Cards retrieved successfully", data)


async def _wallet(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    data: dict[str, JSON] = {
        "balance": state.wallet,
        "updated_at": _timestamp(state, state.wallet_updated_at),
    }
    return _ok(state, "Wallet balance retrieved successfully", data)


async def _transactions(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    issues: list[Issue] = []
    page = _query_int(request.query, "page", 1, None, issues)
    limit = _query_int(
        request.query, "limit", _TRANSACTIONS_PAGE_SIZE, _TRANSACTIONS_MAX_PAGE_SIZE, issues
    )
    if issues:
        state.note_refusal(Refusal.INVALID)
        return _error(state, 400, INVALID_MESSAGE, issues=issues)
    card_id = request.query.get("card_id")
    if card_id is not None and state.card(card_id) is None:
        state.note_refusal(Refusal.NOT_FOUND)
        return _error(state, 404, NOT_FOUND_MESSAGE)
    records = state.transactions(card_id)
    total_pages = math.ceil(len(records) / limit)
    items: list[JSON] = [
        {
            "id": record.transaction_id,
            "card_id": record.card_id,
            "status": "Approved",
            "side": "Credit",
            "amount": record.amount,
            "currency": "USD",
            "type": "Topup",
            "created_at": _timestamp(state, record.at),
        }
        for record in records[(page - 1) * limit : page * limit]
    ]
    data: dict[str, JSON] = {
        "transactions": items,
        "pagination": {
            "page": page,
            "limit": limit,
            "total": len(records),
            "totalPages": total_pages,
            "hasNext": page < total_pages,
            "hasPrev": page > 1,
        },
    }
    return _ok(state, "Transactions retrieved successfully", data)


def _query_int(
    query: MultiMapping[str], name: str, default: int, maximum: int | None, issues: list[Issue]
) -> int:
    """Query parameter `name` coerced as zod's `coerce.number().int().min(1)` does."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = Decimal(raw.strip() or "0")  # Number("") is 0
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        issues.append(_type_issue([name], "number", "nan"))
    elif value != value.to_integral_value():
        issues.append(_type_issue([name], "integer", "float"))
    elif value < 1:
        issues.append(_bound_issue(1, [name], "Number must be greater than or equal to 1"))
    elif maximum is not None and value > maximum:
        message = f"Number must be less than or equal to {maximum}"
        issues.append(_bound_issue(maximum, [name], message, big=True))
    else:
        return int(value)
    return default


async def _card_plans(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    plan: dict[str, JSON] = {
        "id": _PLAN_ID,
        "name": "Standard",
        "limit": state.config.default_card_limit,
        "creation_fee": Decimal("0.00"),
    }
    return _ok(state, "Card plans retrieved successfully", [plan])


def _card_data(state: SandboxState, card: CardAccount, version: Version) -> dict[str, JSON]:
    # The documented card has no limit field: a client learns the limit only from a refusal.
    data: dict[str, JSON] = {
        "id": card.card_id,
        "name": card.name,
        "status": card.status,
        "balance": card.balance,
        "deposit": card.deposit,
        "currency": "USD",
        "category": _CATEGORY,
        "masked_PAN": _masked_pan(card.card_id),
        "bin_id": _BIN_ID,
        "created_at": _timestamp(state, card.created_at),
        "updated_at": _timestamp(state, card.updated_at),
    }
    if version == "old":
        data["spent"] = Decimal("0.00")
        data["withdraw"] = Decimal("0.00")
    return data


def _masked_pan(card_id: str) -> str:
    last4 = int(hashlib.sha256(card_id.encode()).hexdigest()[:8], 16) % 10_000
    return f"535584******{last4:04d}"


# -- envelopes and rendering ----------------------------------------------------------------


def _version(request: web.Request) -> Version:
    configured = request.app[_STATE].config.response_version
    if configured == "mixed":
        return "new" if request.app[_SHAPES].random() < 0.5 else "old"
    return configured


def _timestamp(state: SandboxState, at: float | None = None) -> str:
    moment = state.wall(state.now() if at is None else at)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ok(state: SandboxState, message: str, data: JSON) -> web.Response:
    return json_response(
        {"success": True, "message": message, "data": data, "timestamp": _timestamp(state)}
    )


def _error(
    state: SandboxState,
    status: int,
    message: str,
    *,
    issues: list[Issue] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body: dict[str, JSON] = {"success": False, "message": message}
    if issues is not None:
        body["error"] = list(issues)
    body["timestamp"] = _timestamp(state)
    return json_response(body, status=status, headers=headers)


def _plain(amount: Decimal) -> str:
    """An amount as the card-limit message shows it: 500, but 500.50."""
    return f"{amount:.0f}" if amount == amount.to_integral_value() else f"{amount:.2f}"
