"""The sandbox server: the simulated Uncash API (/api/v1), the simulated Alix API (/api/v2, when
partner credentials are configured) with its webhook sender, and loopback-only admin routes,
served in the caller's event loop (`serve_sandbox`) or as a standalone process (`run_standalone`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from runner.sandbox.admin import ADMIN_PREFIX, ALIX_FAULT_KINDS, admin_app
from runner.sandbox.alix import API_PREFIX as ALIX_PREFIX
from runner.sandbox.alix import alix_app
from runner.sandbox.alix_state import AlixState
from runner.sandbox.config import SandboxConfig, canonical_card_id
from runner.sandbox.faults import FaultPlan
from runner.sandbox.serverlog import aiohttp_logs_as_events
from runner.sandbox.signing import generate_private_key
from runner.sandbox.state import SandboxState
from runner.sandbox.uncash import API_PREFIX, uncash_app
from runner.sandbox.webhooks import WebhookSender
from runner.sandbox.wire import Delays, json_response

# Backstop only: Delays.close already ends every simulated wait when shutdown begins.
_SHUTDOWN_TIMEOUT = 2.0


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
    app.add_subapp(ADMIN_PREFIX, admin_app(state, faults, alix, alix_faults))

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
