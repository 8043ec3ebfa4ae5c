"""The Uncash API's envelope as the sandbox answers it: `{success, message, data, timestamp}`,
the documented messages, and the keys under which the sub-application holds its state.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from decimal import Decimal
from typing import Literal

from aiohttp import web

from runner.sandbox.faults import FaultPlan
from runner.sandbox.state import (
    SandboxState,
)
from runner.sandbox.wire import (
    JSON,
    Delays,
    json_response,
)

STATE = web.AppKey("uncash_state", SandboxState)
FAULTS = web.AppKey("uncash_faults", FaultPlan)
DELAYS = web.AppKey("uncash_delays", Delays)
# Response shapes are drawn from their own stream so they do not shift transaction ids.
SHAPES = web.AppKey("uncash_shapes", random.Random)

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


def response_version(request: web.Request) -> Version:
    configured = request.app[STATE].config.response_version
    if configured == "mixed":
        return "new" if request.app[SHAPES].random() < 0.5 else "old"
    return configured


def timestamp(state: SandboxState, at: float | None = None) -> str:
    moment = state.wall(state.now() if at is None else at)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ok_response(state: SandboxState, message: str, data: JSON) -> web.Response:
    return json_response(
        {"success": True, "message": message, "data": data, "timestamp": timestamp(state)}
    )


def error_response(
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
    body["timestamp"] = timestamp(state)
    return json_response(body, status=status, headers=headers)


def plain(amount: Decimal) -> str:
    """An amount as the card-limit message shows it: 500, but 500.50."""
    return f"{amount:.0f}" if amount == amount.to_integral_value() else f"{amount:.2f}"


def type_issue(path: list[JSON], expected: str, received: str) -> Issue:
    message = "Required" if received == "undefined" else f"Expected {expected}, received {received}"
    return {
        "code": "invalid_type",
        "expected": expected,
        "received": received,
        "path": path,
        "message": message,
    }


def bound_issue(bound: int, path: list[JSON], message: str, *, big: bool = False) -> Issue:
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
