"""The Uncash API's reading routes in the sandbox: health, one card, the card list, the wallet,
the transactions list and card plans, answered in the documented shapes (both versions).
"""

from __future__ import annotations

import hashlib
import math
from decimal import Decimal, InvalidOperation

from aiohttp import web
from multidict import MultiMapping

from runner.sandbox.outside import listed
from runner.sandbox.state import (
    CardAccount,
    Refusal,
    SandboxState,
)
from runner.sandbox.uncash_envelope import (
    INVALID_MESSAGE,
    NOT_FOUND_MESSAGE,
    STATE,
    Issue,
    Version,
    bound_issue,
    error_response,
    ok_response,
    response_version,
    timestamp,
    type_issue,
)
from runner.sandbox.wire import (
    JSON,
    json_response,
)

# Sandbox values for card fields the docs name but whose contents do not matter here.
_CATEGORY = "virtual"
_BIN_ID = "sandbox-bin-535584"
_PLAN_ID = "00000000-0000-4000-8000-000000000001"
_TRANSACTIONS_PAGE_SIZE = 10
_TRANSACTIONS_MAX_PAGE_SIZE = 100


async def get_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def get_card(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card = state.card(request.match_info["id"])
    if card is None:
        state.note_refusal(Refusal.NOT_FOUND)
        return error_response(state, 404, NOT_FOUND_MESSAGE)
    return ok_response(
        state, "Card retrieved successfully", card_data(state, card, response_version(request))
    )


async def get_cards(request: web.Request) -> web.Response:
    state = request.app[STATE]
    version = response_version(request)
    cards = state.known_cards()
    data: dict[str, JSON] = {
        "total_balance": sum((card.balance for card in cards), Decimal("0.00")),
        "total_cards": len(cards),
        "cards": [card_data(state, card, version) for card in cards],
    }
    return ok_response(state, "Cards retrieved successfully", data)


async def get_wallet(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data: dict[str, JSON] = {
        "balance": state.wallet,
        "updated_at": timestamp(state, state.wallet_updated_at),
    }
    return ok_response(state, "Wallet balance retrieved successfully", data)


async def get_transactions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    issues: list[Issue] = []
    page = _query_int(request.query, "page", 1, None, issues)
    limit = _query_int(
        request.query, "limit", _TRANSACTIONS_PAGE_SIZE, _TRANSACTIONS_MAX_PAGE_SIZE, issues
    )
    if issues:
        state.note_refusal(Refusal.INVALID)
        return error_response(state, 400, INVALID_MESSAGE, issues=issues)
    card_id = request.query.get("card_id")
    if card_id is not None and state.card(card_id) is None:
        state.note_refusal(Refusal.NOT_FOUND)
        return error_response(state, 404, NOT_FOUND_MESSAGE)
    records = listed(state, card_id)
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
            "platform_fee_amount": record.fee,
            "invoice_id": record.invoice_id,
            "created_at": timestamp(state, record.at),
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
    return ok_response(state, "Transactions retrieved successfully", data)


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
        issues.append(type_issue([name], "number", "nan"))
    elif value != value.to_integral_value():
        issues.append(type_issue([name], "integer", "float"))
    elif value < 1:
        issues.append(bound_issue(1, [name], "Number must be greater than or equal to 1"))
    elif maximum is not None and value > maximum:
        message = f"Number must be less than or equal to {maximum}"
        issues.append(bound_issue(maximum, [name], message, big=True))
    else:
        return int(value)
    return default


async def get_card_plans(request: web.Request) -> web.Response:
    state = request.app[STATE]
    plan: dict[str, JSON] = {
        "id": _PLAN_ID,
        "name": "Standard",
        "limit": state.config.default_card_limit,
        "creation_fee": Decimal("0.00"),
    }
    return ok_response(state, "Card plans retrieved successfully", [plan])


def card_data(state: SandboxState, card: CardAccount, version: Version) -> dict[str, JSON]:
    # The documented card has no limit field: a client learns the limit only from a refusal.
    data: dict[str, JSON] = {
        "id": card.card_id,
        "name": card.name,
        "status": card.status,
        "balance": card.balance,
        "deposit": card.deposit,
        "currency": card.currency,
        "category": _CATEGORY,
        "masked_PAN": _masked_pan(card.card_id),
        "bin_id": _BIN_ID,
        "created_at": timestamp(state, card.created_at),
        "updated_at": timestamp(state, card.updated_at),
    }
    if version == "old":
        data["spent"] = Decimal("0.00")
        data["withdraw"] = Decimal("0.00")
    return data


def _masked_pan(card_id: str) -> str:
    last4 = int(hashlib.sha256(card_id.encode()).hexdigest()[:8], 16) % 10_000
    return f"535584******{last4:04d}"
