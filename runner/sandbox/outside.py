"""What happens to the simulated account besides the runner's own requests: a topup a second
client of the same account applies, a topup taken back out of the record (money and all), and
the transactions list as it stands after its lag. The admin routes that drive the first two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from runner.sandbox.config import canonical_card_id, to_money
from runner.sandbox.state import AppliedTopup, SandboxState, TopupApplied
from runner.sandbox.wire import JSON, json_response


def listed(state: SandboxState, card_id: str | None) -> list[AppliedTopup]:
    """The applied topups the transactions list shows now, newest first: each only once
    `list_lag` seconds have passed since it was applied."""
    now, lag = state.now(), state.config.list_lag
    return [t for t in state.transactions(card_id) if t.at + lag <= now + 1e-9]


def revoke(state: SandboxState, transaction_id: str) -> AppliedTopup | None:
    """Take the topup `transaction_id` out of the account's record as if it never happened:
    gone from the list and from `applied`, its amount off the card, its charge back in the
    wallet. None when no such topup was applied."""
    for index, record in enumerate(state.applied):
        if record.transaction_id == transaction_id:
            del state.applied[index]
            card = state.card(record.card_id)
            if card is not None:
                card.balance -= record.amount
                card.deposit -= record.amount
            state.set_wallet(state.wallet + record.total_charged)
            return record
    return None


def outside_routes(app: web.Application, state_of: Callable[[web.Request], SandboxState]) -> None:
    """POST /outside-topup {card_id, amount}: a topup by a second client of the account, under
    the same rules as any (cooldown included). POST /revoke-topup {transaction_id}."""

    async def outside_topup(request: web.Request) -> web.Response:
        state = state_of(request)
        body = await _body(request)
        card_id, amount = body.get("card_id"), body.get("amount")
        if not isinstance(card_id, str):
            return _bad("card_id must be a string")
        try:
            value = to_money("amount", amount)
        except ValueError as exc:
            return _bad(str(exc))
        result = state.topup(canonical_card_id(card_id), value)
        if not isinstance(result, TopupApplied):
            return _bad(f"refused: {result.reason.value}", status=409)
        record = result.record
        data: JSON = {
            "card_id": record.card_id,
            "amount": str(record.amount),
            "fee": str(record.fee),
            "transaction_id": record.transaction_id,
        }
        return json_response({"success": True, "applied": data})

    async def revoke_topup(request: web.Request) -> web.Response:
        state = state_of(request)
        transaction_id = (await _body(request)).get("transaction_id")
        if not isinstance(transaction_id, str):
            return _bad("transaction_id must be a string")
        record = revoke(state, transaction_id)
        if record is None:
            return _bad(f"no applied topup {transaction_id}", status=404)
        return json_response({"success": True, "revoked": transaction_id})

    app.router.add_post("/outside-topup", outside_topup)
    app.router.add_post("/revoke-topup", revoke_topup)


async def _body(request: web.Request) -> Mapping[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _bad(message: str, status: int = 400) -> web.Response:
    return json_response({"success": False, "message": message}, status=status)
