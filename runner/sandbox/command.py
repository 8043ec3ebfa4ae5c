"""`topup-runner sandbox`: the simulated Uncash API, set from the command line.

Every default comes from `SandboxConfig`, so the command and the in-process sandbox agree.
"""

from __future__ import annotations

from dataclasses import fields
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import click

from runner.sandbox.config import ResponseVersion, SandboxConfig
from runner.sandbox.server import run_standalone

_DEFAULTS: dict[str, Any] = {item.name: item.default for item in fields(SandboxConfig)}


class _DecimalType(click.ParamType[Decimal]):
    name = "decimal"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Decimal:
        if isinstance(value, Decimal):
            return value
        try:
            return Decimal(str(value).strip())
        except InvalidOperation:
            self.fail(f"{value!r} is not a decimal number", param, ctx)


DECIMAL = _DecimalType()


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8089, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--cooldown",
    type=float,
    default=_DEFAULTS["cooldown"],
    show_default=True,
    help="Seconds between two applied topups of one card.",
)
@click.option(
    "--cooldown-status",
    type=int,
    default=_DEFAULTS["cooldown_status"],
    show_default=True,
    help="HTTP status of the cooldown refusal (the real one is undocumented; try 429 too).",
)
@click.option("--rate-limit", type=float, help="API requests per second, GET and POST together.")
@click.option(
    "--rate-burst",
    type=int,
    default=_DEFAULTS["rate_burst"],
    show_default=True,
    help="Requests allowed at once under --rate-limit.",
)
@click.option(
    "--fault-rate",
    type=float,
    default=_DEFAULTS["fault_rate"],
    show_default=True,
    help="Probability (0-1) that a topup request gets a fault.",
)
@click.option(
    "--fault-kinds",
    default=",".join(_DEFAULTS["fault_kinds"]),
    show_default=True,
    help="Comma-separated fault kinds to draw from.",
)
@click.option(
    "--slow-seconds",
    type=float,
    default=_DEFAULTS["slow_seconds"],
    show_default=True,
    help="How long a 'slow' fault holds the answer back.",
)
@click.option(
    "--seed", type=int, help="Seed for faults, ids and response shapes (repeatable runs)."
)
@click.option(
    "--wallet",
    type=DECIMAL,
    default=_DEFAULTS["wallet_balance"],
    show_default=True,
    help="Starting wallet balance (USD).",
)
@click.option(
    "--card-limit",
    type=DECIMAL,
    default=_DEFAULTS["default_card_limit"],
    show_default=True,
    help="Deposit limit of every card.",
)
@click.option(
    "--fee-rate",
    type=DECIMAL,
    default=_DEFAULTS["fee_rate"],
    show_default=True,
    help="Platform fee as a fraction of the amount.",
)
@click.option(
    "--fee-fixed",
    type=DECIMAL,
    default=_DEFAULTS["fee_fixed"],
    show_default=True,
    help="Platform fee added to every topup (USD).",
)
@click.option(
    "--latency",
    type=float,
    default=_DEFAULTS["latency"],
    show_default=True,
    help="Seconds added to every API answer.",
)
@click.option(
    "--response-version",
    type=click.Choice(["new", "old", "mixed"]),
    default=_DEFAULTS["response_version"],
    show_default=True,
    help="Which documented topup response shape to answer; mixed: random per request.",
)
@click.option(
    "--token",
    envvar="SANDBOX_UNCASH_TOKEN",
    show_envvar=True,
    help="Accept only this API token (better set in SANDBOX_UNCASH_TOKEN than on the command "
    "line); default: any well-formed uc_ token.",
)
@click.pass_context
def sandbox(
    ctx: click.Context,
    host: str,
    port: int,
    cooldown: float,
    cooldown_status: int,
    rate_limit: float | None,
    rate_burst: int,
    fault_rate: float,
    fault_kinds: str,
    slow_seconds: float,
    seed: int | None,
    wallet: Decimal,
    card_limit: Decimal,
    fee_rate: Decimal,
    fee_fixed: Decimal,
    latency: float,
    response_version: str,
    token: str | None,
) -> None:
    """Serve the simulated Uncash API until Ctrl-C: no money moves, nothing leaves this machine."""
    try:
        config = SandboxConfig(
            token=token or None,
            wallet_balance=wallet,
            fee_rate=fee_rate,
            fee_fixed=fee_fixed,
            cooldown=cooldown,
            cooldown_status=cooldown_status,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            default_card_limit=card_limit,
            response_version=cast(ResponseVersion, response_version),
            latency=latency,
            fault_rate=fault_rate,
            fault_kinds=tuple(kind.strip() for kind in fault_kinds.split(",") if kind.strip()),
            slow_seconds=slow_seconds,
            seed=seed,
        )
    except ValueError as exc:
        click.echo(f"Error: invalid sandbox setting: {exc}", err=True)
        ctx.exit(2)
    try:
        run_standalone(config, host, port)
    except OSError as exc:
        click.echo(f"Error: the sandbox cannot listen on {host}:{port}: {exc}", err=True)
        ctx.exit(2)
