"""`topup-runner sandbox`: the simulated Uncash API, and the Alix API beside it when partner
credentials are given, set from the command line.

Every default comes from `SandboxConfig` and `AlixConfig`, so the command and the in-process
sandbox agree.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import click

from runner.logs import configure_logging
from runner.sandbox.config import AlixConfig, ResponseVersion, SandboxConfig
from runner.sandbox.server import run_standalone

_DEFAULTS: dict[str, Any] = {item.name: item.default for item in fields(SandboxConfig)}
_ALIX_DEFAULTS: dict[str, Any] = {
    item.name: item.default for item in fields(AlixConfig) if item.default is not MISSING
}
_PEM_FILE = click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)


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
    help="Comma-separated fault kinds to draw from (also: late, a topup applied "
    "--slow-seconds after it arrives).",
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
    "--apply-delay",
    type=float,
    default=_DEFAULTS["apply_delay"],
    show_default=True,
    help="Seconds from a topup's arrival to its application, whether or not the client is "
    "still connected (a busy backend).",
)
@click.option(
    "--list-lag",
    type=float,
    default=_DEFAULTS["list_lag"],
    show_default=True,
    help="Seconds before an applied topup shows in the transactions list (a lagging list).",
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
@click.option("--alix-partner-code", help="Serve the Alix API for this partner code.")
@click.option(
    "--alix-user-email", help="The partner's user email the access-token call must carry."
)
@click.option(
    "--alix-secret-key",
    envvar="SANDBOX_ALIX_SECRET_KEY",
    show_envvar=True,
    help="The partner's secret key, signed as partnerCode|secretKey (better set in "
    "SANDBOX_ALIX_SECRET_KEY than on the command line).",
)
@click.option(
    "--alix-partner-public-key",
    type=_PEM_FILE,
    help="PEM file of the partner's RSA public key, which verifies its auth signatures.",
)
@click.option(
    "--alix-signing-key",
    type=_PEM_FILE,
    help="PEM file of the RSA private key webhooks are signed with (default: a fresh one).",
)
@click.option(
    "--alix-public-key-out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the webhook-verification public key (PEM) here, for the runner.",
)
@click.option("--webhook-url", help="POST TopupCard webhooks here (loopback URLs only).")
@click.option(
    "--token-ttl",
    type=float,
    help=f"Seconds an Alix access token lives  [default: {_ALIX_DEFAULTS['access_token_ttl']:g}]",
)
@click.option(
    "--refresh-token-ttl",
    type=float,
    help=f"Seconds an Alix refresh token lives  [default: {_ALIX_DEFAULTS['refresh_token_ttl']:g}]",
)
@click.option(
    "--settle-delay",
    type=float,
    help=f"Seconds from an accepted Alix topup to its settlement  "
    f"[default: {_ALIX_DEFAULTS['settle_delay']:g}]",
)
@click.option(
    "--settle-failure-rate",
    type=float,
    help="Probability (0-1) that an Alix topup settles Failed (refunded)  [default: 0]",
)
@click.option(
    "--webhook-duplicate-rate",
    type=float,
    help="Probability (0-1) that a delivered webhook is sent once more  [default: 0]",
)
@click.option(
    "--rate-schedule",
    default="",
    help="The rate limit changes during the run: SECONDS:RATE,... from the first topup, "
    "e.g. 30:10 halves a --rate-limit 20 after 30 s.",
)
@click.option(
    "--retry-after-whole",
    is_flag=True,
    help="A 429's Retry-After in whole seconds, as HTTP's are (default: to 0.01 s).",
)
@click.option(
    "--alix-failure-style",
    type=click.Choice(["http", "ok", "mixed"]),
    help="Alix refusals as HTTP 4xx, as HTTP 200 with success:false, or either at random  "
    f"[default: {_ALIX_DEFAULTS['failure_style']}]",
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
    apply_delay: float,
    list_lag: float,
    response_version: str,
    token: str | None,
    alix_partner_code: str | None,
    alix_user_email: str | None,
    alix_secret_key: str | None,
    alix_partner_public_key: Path | None,
    alix_signing_key: Path | None,
    alix_public_key_out: Path | None,
    webhook_url: str | None,
    token_ttl: float | None,
    refresh_token_ttl: float | None,
    settle_delay: float | None,
    settle_failure_rate: float | None,
    webhook_duplicate_rate: float | None,
    alix_failure_style: str | None,
    rate_schedule: str,
    retry_after_whole: bool,
) -> None:
    """Serve the simulated Uncash API (and, given partner credentials, the Alix API) until
    Ctrl-C: no money moves, nothing leaves this machine."""
    credentials = {
        "--alix-partner-code": alix_partner_code,
        "--alix-user-email": alix_user_email,
        "--alix-secret-key": alix_secret_key,
        "--alix-partner-public-key": alix_partner_public_key,
    }
    settings: dict[str, Any] = {
        "alix_private_key_pem": alix_signing_key,
        "webhook_url": webhook_url,
        "access_token_ttl": token_ttl,
        "refresh_token_ttl": refresh_token_ttl,
        "settle_delay": settle_delay,
        "settle_failure_rate": settle_failure_rate,
        "webhook_duplicate_rate": webhook_duplicate_rate,
        "failure_style": alix_failure_style,
    }
    given = {name: value for name, value in settings.items() if value is not None}
    missing = [option for option, value in credentials.items() if not value]
    if missing and (len(missing) < len(credentials) or given or alix_public_key_out):
        click.echo(f"Error: the Alix API also needs {', '.join(missing)}", err=True)
        ctx.exit(2)
    try:
        alix = None
        if not missing:
            if alix_signing_key is not None:
                given["alix_private_key_pem"] = _read_pem(alix_signing_key)
            alix = AlixConfig(
                partner_code=cast(str, alix_partner_code),
                secret_key=cast(str, alix_secret_key),
                user_email=cast(str, alix_user_email),
                partner_public_key_pem=_read_pem(cast(Path, alix_partner_public_key)),
                **given,
            )
        config = SandboxConfig(
            token=token or None,
            wallet_balance=wallet,
            fee_rate=fee_rate,
            fee_fixed=fee_fixed,
            cooldown=cooldown,
            cooldown_status=cooldown_status,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            rate_schedule=_schedule(rate_schedule),
            retry_after_whole=retry_after_whole,
            default_card_limit=card_limit,
            response_version=cast(ResponseVersion, response_version),
            latency=latency,
            apply_delay=apply_delay,
            list_lag=list_lag,
            fault_rate=fault_rate,
            fault_kinds=tuple(kind.strip() for kind in fault_kinds.split(",") if kind.strip()),
            slow_seconds=slow_seconds,
            seed=seed,
            alix=alix,
        )
    except ValueError as exc:
        click.echo(f"Error: invalid sandbox setting: {exc}", err=True)
        ctx.exit(2)
    # The sandbox's own events (a malformed request, say) go to stderr: JSON lines unless a
    # terminal is watching.
    configure_logging(provider="sandbox")
    try:
        run_standalone(config, host, port, alix_public_key_out=alix_public_key_out)
    except OSError as exc:
        click.echo(f"Error: the sandbox cannot serve on {host}:{port}: {exc}", err=True)
        ctx.exit(2)


def _read_pem(path: Path) -> str:
    """The text of a PEM file; ValueError (an invalid setting) if it cannot be read as one."""
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the PEM file {path}: {exc}") from None


def _schedule(text: str) -> tuple[tuple[float, float], ...]:
    """`--rate-schedule 30:10,60:5` as ((30.0, 10.0), (60.0, 5.0))."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        at, colon, rate = item.partition(":")
        if not colon:
            raise ValueError(f"rate_schedule: {item!r} is not SECONDS:RATE")
        pairs.append((float(at), float(rate)))
    return tuple(pairs)
