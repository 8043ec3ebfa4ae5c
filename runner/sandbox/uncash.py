"""The Uncash API's HTTP surface over `SandboxState`: routes, envelopes, messages and faults as the
real API shows them. Mounted at /api/v1 by server.py; the rules themselves live in state.py.
"""

from __future__ import annotations

import hmac
import json
import random
from decimal import Decimal

from aiohttp import web
from aiohttp.typedefs import Handler

from runner.sandbox.config import is_well_formed_token
from runner.sandbox.faults import FaultKind, FaultPlan
from runner.sandbox.state import (
    MAX_AMOUNT,
    MIN_AMOUNT,
    AmountProblem,
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
from runner.sandbox.uncash_envelope import (
    DELAYS,
    FAULTS,
    INACTIVE_MESSAGE,
    INVALID_MESSAGE,
    NOT_FOUND_MESSAGE,
    SHAPES,
    STATE,
    TOO_MANY_MESSAGE,
    UNAUTHORIZED_BODY,
    Issue,
    Version,
    bound_issue,
    error_response,
    ok_response,
    plain,
    response_version,
    type_issue,
)
from runner.sandbox.uncash_reads import (
    get_card,
    get_card_plans,
    get_cards,
    get_health,
    get_transactions,
    get_wallet,
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


def uncash_app(state: SandboxState, faults: FaultPlan, delays: Delays) -> web.Application:
    """The /api/v1 sub-application serving `state`, with `faults` injected into topups."""
    app = web.Application(middlewares=[_paced, _guarded])
    app[STATE] = state
    app[FAULTS] = faults
    app[DELAYS] = delays
    seed = state.config.seed
    app[SHAPES] = random.Random(None if seed is None else f"uncash-shapes:{seed}")
    app.router.add_get("/health", get_health, name="health")
    app.router.add_post("/cards/{id}/topup", _topup, name="topup")
    # Before /cards/{id}, which would otherwise take "transactions" for a card id.
    app.router.add_get("/cards/transactions", get_transactions, name="transactions")
    app.router.add_get("/cards/{id}", get_card, name="card")
    app.router.add_get("/cards", get_cards, name="cards")
    app.router.add_get("/wallet/balance", get_wallet, name="wallet")
    app.router.add_get("/card-plans", get_card_plans, name="card_plans")
    return app


# -- middlewares ----------------------------------------------------------------------------


@web.middleware
async def _paced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Half the configured latency before the request is processed, half after; counting."""
    state, delays = request.app[STATE], request.app[DELAYS]
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
    state = request.app[STATE]
    if request.match_info.http_exception is not None:
        return error_response(state, 404, "Route not found")
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
    state, faults = request.app[STATE], request.app[FAULTS]
    card_id = request.match_info["id"]
    body = await request.read()  # already read by _paced; the last await before the decision
    fault = faults.draw(card_id)
    if fault is not None:
        state.note_fault(fault)
        if not fault.applies_first:
            return _fault_instead(request, state, fault)
    config = state.config
    delay = config.slow_seconds if fault is FaultKind.LATE else config.apply_delay
    response = await request.app[DELAYS].later(
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
        return error_response(state, 404, NOT_FOUND_MESSAGE)
    amount = _parse_amount(body)
    if not isinstance(amount, Decimal):
        state.note_refusal(Refusal.INVALID)
        return error_response(state, 400, INVALID_MESSAGE, issues=amount)
    result = state.topup(card_id, amount, fault=fault)
    return _render_topup(state, result, response_version(request))


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
            return ok_response(state, "Card topped up successfully", data)
        case CardNotFound():
            return error_response(state, 404, NOT_FOUND_MESSAGE)
        case InvalidAmount(problems):
            return error_response(
                state, 400, INVALID_MESSAGE, issues=[_amount_issue(p) for p in problems]
            )
        case CardInactive():
            return error_response(state, 400, INACTIVE_MESSAGE)
        case CoolingDown(remaining):
            return _cooldown_refusal(state, remaining)
        case OverCardLimit(deposit, limit, available):
            message = (
                f"Topup would exceed card limit. Current deposit: {plain(deposit)}, "
                f"Limit: {plain(limit)}, Available: {plain(available)}"
            )
            return error_response(state, 400, message)
        case InsufficientFunds(amount, fee, required, available):
            message = (
                f"Insufficient wallet balance. Required: {required:.2f} (topup: {amount:.2f} "
                f"+ platform fee: {fee:.2f}), Available: {available:.2f}"
            )
            return error_response(state, 400, message)


def _cooldown_refusal(state: SandboxState, remaining: float) -> web.Response:
    wait = seconds_text(remaining, whole=state.config.cooldown >= 1)
    message = f"Please wait {wait} seconds before topping up this card again"
    return error_response(state, state.config.cooldown_status, message)


def _too_many(state: SandboxState, wait: float) -> web.Response:
    headers = {"Retry-After": seconds_text(wait, whole=wait >= 1 or state.config.retry_after_whole)}
    return error_response(state, 429, TOO_MANY_MESSAGE, headers=headers)


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
            if request.app[SHAPES].random() < 0.5:
                return error_response(state, 500, "Internal server error")
            return proxy_error_page(502)
        case FaultKind.SLOW:
            await request.app[DELAYS].pause(state.config.slow_seconds)
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
        return [type_issue([], "object", _js_type(data))]
    if "amount" not in data:
        return [type_issue(["amount"], "number", "undefined")]
    amount = data["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | Decimal):
        return [type_issue(["amount"], "number", _js_type(amount))]
    return Decimal(amount)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # JSON.parse refuses NaN and Infinity too


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
            return bound_issue(minimum, ["amount"], f"Minimum top-up amount is {minimum}")
        case AmountProblem.TOO_BIG:
            maximum = int(MAX_AMOUNT)
            message = f"Maximum top-up amount is {maximum}"
            return bound_issue(maximum, ["amount"], message, big=True)
        case AmountProblem.TOO_PRECISE:
            return {
                "code": "custom",
                "message": "Amount must have at most 2 decimal places",
                "path": ["amount"],
            }
