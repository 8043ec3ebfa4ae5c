"""The Alix Pay card API's HTTP surface over `AlixState`: routes, the `{success, message, data,
errorCode}` envelope, refusals as HTTP 4xx or as HTTP 200 with success:false, and faults. Mounted
at /api/v2 by server.py; the rules and every assumption behind them live in alix_state.py.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from runner.sandbox.alix_records import (
    OK_MESSAGE,
    TOPUP_DESCRIPTION,
    TOPUP_TYPE,
    AlixTopup,
    AlixTopupResult,
    AuthFailure,
    ErrorCode,
    Tokens,
    TopupAccepted,
    TopupStatus,
    parse_amount,
    parse_time,
)
from runner.sandbox.alix_state import AlixState
from runner.sandbox.faults import FaultKind, FaultPlan
from runner.sandbox.state import (
    AmountProblem,
    CardInactive,
    CardNotFound,
    InsufficientFunds,
    InvalidAmount,
    Refusal,
)
from runner.sandbox.wire import (
    JSON,
    Delays,
    drop_connection,
    json_response,
    proxy_error_page,
    seconds_text,
)

API_PREFIX = "/api/v2"
TOKEN_HEADER = "access-token"

_STATE = web.AppKey("alix_state", AlixState)
_FAULTS = web.AppKey("alix_faults", FaultPlan)
_DELAYS = web.AppKey("alix_delays", Delays)
# Failure styles and error pages are drawn from their own stream so they shift nothing else.
_SHAPES = web.AppKey("alix_shapes", random.Random)

_AUTH_ROUTES = ("access_token", "refresh_token")
_PAGE_SIZE = 10
_MAX_PAGE_SIZE = 100

INVALID_CREDENTIALS = "Invalid partner credentials"
INVALID_REFRESH_TOKEN = "Refresh token is invalid or has been used"
EXPIRED_REFRESH_TOKEN = "Refresh token has expired"
INVALID_ACCESS_TOKEN = "Access token is invalid"
EXPIRED_ACCESS_TOKEN = "Access token has expired"
CARD_NOT_FOUND = "Card not found"
CARD_INACTIVE = "Card is not active"
TOO_MANY = "Too many requests, please try again later"


def alix_app(alix: AlixState, faults: FaultPlan, delays: Delays) -> web.Application:
    """The /api/v2 sub-application serving `alix`, with `faults` injected into topups."""
    app = web.Application(middlewares=[_paced, _guarded])
    app[_STATE] = alix
    app[_FAULTS] = faults
    app[_DELAYS] = delays
    seed = alix.shared.config.seed
    app[_SHAPES] = random.Random(None if seed is None else f"alix-shapes:{seed}")
    app.router.add_post("/auth/access-token", _access_token, name="access_token")
    app.router.add_post("/auth/refresh-token", _refresh_token, name="refresh_token")
    app.router.add_post("/cards/topup", _topup, name="topup")
    app.router.add_post("/cards/topup-check", _topup_check, name="topup_check")
    app.router.add_get("/cards/{cardId}/transactions", _transactions, name="transactions")
    return app


# -- middlewares ----------------------------------------------------------------------------


@web.middleware
async def _paced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Half the configured latency before, half after; counting; settling what is due."""
    alix, delays = request.app[_STATE], request.app[_DELAYS]
    half = alix.shared.config.latency / 2
    with delays.track():
        # Read the whole request first, as uncash.py does: a client that gives up during the
        # simulated latency has still sent it, and a real server goes on to process it.
        try:
            await request.read()
        except ConnectionError:
            return drop_connection(request)
        await delays.pause(half)
        alix.settle_due()
        route = request.match_info.route
        if request.match_info.http_exception is None and route.resource is not None:
            alix.note_request(f"{request.method} {route.resource.canonical}")
            if route.name == "topup":
                alix.note_topup_arrival()
        response = await handler(request)
        await delays.pause(half)
    return response


@web.middleware
async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The access token, then the rate limit, for every route but the auth calls."""
    alix = request.app[_STATE]
    if request.match_info.http_exception is not None:
        return _envelope(404, "Route not found", ErrorCode.ROUTE_NOT_FOUND)
    if request.match_info.route.name in _AUTH_ROUTES:
        return await handler(request)
    failure = alix.tokens.check(request.headers.get(TOKEN_HEADER))
    if failure is not None:
        message = (
            EXPIRED_ACCESS_TOKEN if failure is AuthFailure.EXPIRED_TOKEN else INVALID_ACCESS_TOKEN
        )
        return _envelope(401, message, failure.code)
    wait = alix.admit()
    if wait is not None:
        return _too_many(wait)
    return await handler(request)


# -- auth -----------------------------------------------------------------------------------


async def _access_token(request: web.Request) -> web.Response:
    alix = request.app[_STATE]
    body = _json_object(await request.read())
    fields = _strings(body, "partnerCode", "userEmail")
    if fields is None or body is None:
        alix.note_refusal(Refusal.INVALID)
        return _invalid_request(request, "partnerCode, userEmail and signature are required")
    tokens = alix.tokens.issue(*fields, body.get("signature"))
    if tokens is None:
        return _envelope(401, INVALID_CREDENTIALS, ErrorCode.UNAUTHORIZED)
    return _ok(_tokens_data(tokens))


async def _refresh_token(request: web.Request) -> web.Response:
    alix = request.app[_STATE]
    body = _json_object(await request.read())
    fields = _strings(body, "partnerCode", "refreshToken")
    if fields is None or body is None:
        alix.note_refusal(Refusal.INVALID)
        return _invalid_request(request, "partnerCode, refreshToken and signature are required")
    result = alix.tokens.refresh(*fields, body.get("signature"))
    match result:
        case Tokens():
            return _ok(_tokens_data(result))
        case AuthFailure.BAD_CREDENTIALS:
            return _envelope(401, INVALID_CREDENTIALS, result.code)
        case AuthFailure.EXPIRED_TOKEN:
            return _envelope(401, EXPIRED_REFRESH_TOKEN, result.code)
        case AuthFailure.UNKNOWN_TOKEN:
            return _envelope(401, INVALID_REFRESH_TOKEN, result.code)


def _tokens_data(tokens: Tokens) -> JSON:
    ttl = tokens.expires_in
    return {
        "accessToken": tokens.access_token,
        "refreshToken": tokens.refresh_token,
        "expiresIn": int(ttl) if ttl == int(ttl) else ttl,
    }


# -- the topup ------------------------------------------------------------------------------


async def _topup(request: web.Request) -> web.StreamResponse:
    alix, faults = request.app[_STATE], request.app[_FAULTS]
    body = _json_object(await request.read())  # already read by _paced
    card_hint = body.get("cardId") if body is not None else None
    fault = faults.draw(card_hint if isinstance(card_hint, str) else "")
    if fault is not None:
        alix.note_fault(fault)
        if not fault.applies_first:
            return _fault_instead(request, fault)
    config = alix.shared.config
    delay = config.slow_seconds if fault is FaultKind.LATE else config.apply_delay
    response = await request.app[_DELAYS].later(delay, lambda: _decide_topup(request, body, fault))
    if fault is None or fault is FaultKind.LATE:
        return response
    return await _fault_after(request, fault, response)


def _decide_topup(
    request: web.Request, body: dict[str, Any] | None, fault: FaultKind | None
) -> web.Response:
    alix = request.app[_STATE]
    card_id = None if body is None else body.get("cardId")
    if body is None or not isinstance(card_id, str) or not card_id.strip():
        alix.note_refusal(Refusal.INVALID)
        return _invalid_request(request, "cardId is required and must be a string")
    raw = body.get("amount")
    amount = parse_amount(raw)
    if not isinstance(amount, Decimal) or not isinstance(raw, str):
        alix.note_refusal(Refusal.INVALID)
        message = amount if isinstance(amount, str) else "Invalid amount"
        return _refused(request, 400, message, ErrorCode.INVALID_AMOUNT)
    return _render_topup(request, alix.topup(card_id, amount, raw, fault=fault))


def _render_topup(request: web.Request, result: AlixTopupResult) -> web.Response:
    alix = request.app[_STATE]
    match result:
        case TopupAccepted(record):
            return _ok(
                {
                    "type": TOPUP_TYPE,
                    "fee": record.fee,
                    "amount": record.amount,
                    "balanceBefore": record.balance_before,
                    "balanceAfter": record.balance_after,
                    "description": TOPUP_DESCRIPTION,
                    "status": str(record.status),
                    "createdAt": record.created_at,
                }
            )
        case InvalidAmount(problems):
            return _amount_refused(request, alix, problems)
        case CardNotFound():
            return _refused(request, 404, CARD_NOT_FOUND, ErrorCode.CARD_NOT_FOUND)
        case CardInactive():
            return _refused(request, 400, CARD_INACTIVE, ErrorCode.CARD_INACTIVE)
        case InsufficientFunds(amount, fee, required, available):
            message = (
                f"Insufficient balance. Required: {required:.2f} USDT (amount {amount:.2f} "
                f"+ fee {fee:.2f}), available: {available:.2f} USDT"
            )
            return _refused(request, 400, message, ErrorCode.INSUFFICIENT_BALANCE)


def _amount_refused(
    request: web.Request, alix: AlixState, problems: tuple[AmountProblem, ...]
) -> web.Response:
    if AmountProblem.TOO_SMALL in problems:
        message = f"Minimum topup amount is {alix.config.min_amount:.2f} USDT"
    elif AmountProblem.TOO_BIG in problems:
        message = f"Maximum topup amount is {alix.config.max_amount:.2f} USDT"
    else:
        message = "Invalid amount: at most 2 decimal places"
    return _refused(request, 400, message, ErrorCode.INVALID_AMOUNT)


def _fault_instead(request: web.Request, fault: FaultKind) -> web.Response:
    """The answer of a fault that strikes before the request is processed: nothing applied."""
    match fault:
        case FaultKind.DROP_BEFORE:
            return drop_connection(request)
        case FaultKind.ERROR_BEFORE:
            return proxy_error_page(502)
        case FaultKind.RATE_LIMITED:
            return _too_many(1.0)
    raise AssertionError(f"{fault} is applied first or unknown to Alix")  # pragma: no cover


async def _fault_after(
    request: web.Request, fault: FaultKind, response: web.Response
) -> web.StreamResponse:
    """What the client gets instead of (or later than) `response`, already decided and applied."""
    match fault:
        case FaultKind.DROP_AFTER:
            return drop_connection(request)
        case FaultKind.ERROR_AFTER:
            if request.app[_SHAPES].random() < 0.5:
                return _envelope(500, "Internal server error", ErrorCode.INTERNAL_ERROR)
            return proxy_error_page(502)
        case FaultKind.SLOW:
            alix = request.app[_STATE]
            await request.app[_DELAYS].pause(alix.shared.config.slow_seconds)
            return response
    raise AssertionError(f"{fault} strikes before processing")  # pragma: no cover


# -- fees in advance ------------------------------------------------------------------------


async def _topup_check(request: web.Request) -> web.Response:
    alix = request.app[_STATE]
    body = _json_object(await request.read())
    card_type = None if body is None else body.get("cardType")
    if body is None or not isinstance(card_type, str) or not card_type.strip():
        alix.note_refusal(Refusal.INVALID)
        return _invalid_request(request, "cardType is required and must be a string")
    amount = parse_amount(body.get("amount"), numbers=True)
    if isinstance(amount, str):
        alix.note_refusal(Refusal.INVALID)
        return _refused(request, 400, amount, ErrorCode.INVALID_AMOUNT)
    problems = alix.amount_problems(amount)
    if problems:
        alix.note_refusal(Refusal.INVALID)
        return _amount_refused(request, alix, problems)
    fee = alix.fee_for(amount)
    return _ok({"netAmount": amount + fee, "fee": fee})


# -- transactions ---------------------------------------------------------------------------


async def _transactions(request: web.Request) -> web.Response:
    alix = request.app[_STATE]
    query = {key: value for key, value in request.query.items() if value != ""}
    try:
        page = _positive(query, "page", 1, None)
        page_size = _positive(query, "pageSize", _PAGE_SIZE, _MAX_PAGE_SIZE)
        status = _status(query)
        since, until = _time(query, "from"), _time(query, "to")
    except _BadQuery as exc:
        alix.note_refusal(Refusal.INVALID)
        return _invalid_request(request, str(exc))
    card_id = request.match_info["cardId"]
    if alix.shared.card(card_id) is None:
        alix.note_refusal(Refusal.NOT_FOUND)
        return _refused(request, 404, CARD_NOT_FOUND, ErrorCode.CARD_NOT_FOUND)
    records = (
        alix.transactions(card_id, status=status, since=since, until=until)
        if query.get("type", TOPUP_TYPE) == TOPUP_TYPE
        else []
    )
    items: list[JSON] = [
        _transaction_item(record) for record in records[(page - 1) * page_size : page * page_size]
    ]
    return _ok({"totalPage": math.ceil(len(records) / page_size), "items": items})


class _BadQuery(ValueError):
    pass


def _positive(query: Mapping[str, str], name: str, default: int, maximum: int | None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise _BadQuery(f"{name} must be a positive integer")
    if maximum is not None and int(raw) > maximum:
        raise _BadQuery(f"{name} must be at most {maximum}")
    return int(raw)


def _status(query: Mapping[str, str]) -> TopupStatus | None:
    raw = query.get("status")
    if raw is None:
        return None
    try:
        return TopupStatus(raw)
    except ValueError:
        raise _BadQuery("status must be Pending, Success or Failed") from None


def _time(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    seconds = parse_time(raw)
    if seconds is None:
        raise _BadQuery(f"{name} must be a time as YYYY-MM-DD HH:MM:SS (UTC)")
    return seconds


def _transaction_item(record: AlixTopup) -> JSON:
    return {
        "id": record.transaction_id,
        "type": TOPUP_TYPE,
        "cardId": record.card_id,
        "amount": record.amount,
        "fee": record.fee,
        "status": str(record.status),
        "balanceBefore": record.balance_before,
        "balanceAfter": record.balance_after,
        "createdAt": record.created_at,
    }


# -- envelopes ------------------------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object with exact decimals, or None if it is not one."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _strings(body: Mapping[str, Any] | None, first: str, second: str) -> tuple[str, str] | None:
    """The non-empty strings `first` and `second` of an auth body that also has a signature
    string; None if any of the three is missing or not a string."""
    if body is None or not isinstance(body.get("signature"), str):
        return None
    one, two = body.get(first), body.get(second)
    if not (isinstance(one, str) and one and isinstance(two, str) and two):
        return None
    return one, two


def _ok(data: JSON) -> web.Response:
    return json_response(
        {"success": True, "message": OK_MESSAGE, "data": data, "errorCode": int(ErrorCode.OK)},
        js_numbers=True,
    )


def _envelope(
    status: int, message: str, code: ErrorCode, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A failure answered with HTTP `status` whatever the failure style."""
    body: JSON = {"success": False, "message": message, "data": None, "errorCode": int(code)}
    return json_response(body, status=status, headers=headers, js_numbers=True)


def _refused(request: web.Request, status: int, message: str, code: ErrorCode) -> web.Response:
    """A refusal as HTTP `status` or as HTTP 200 with success:false, per the failure style."""
    style = request.app[_STATE].config.failure_style
    in_200 = style == "ok" or (style == "mixed" and request.app[_SHAPES].random() < 0.5)
    return _envelope(200 if in_200 else status, message, code)


def _invalid_request(request: web.Request, message: str) -> web.Response:
    return _refused(request, 400, f"Invalid request: {message}", ErrorCode.INVALID_REQUEST)


def _too_many(wait: float) -> web.Response:
    headers = {"Retry-After": seconds_text(wait, whole=wait >= 1)}
    return _envelope(429, TOO_MANY, ErrorCode.TOO_MANY_REQUESTS, headers=headers)
