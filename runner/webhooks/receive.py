"""The webhook receiver: Alix TopupCard events in, pending rows settled in the ledger.

Every body is verified before anything is written; a forged, malformed or replayed event
changes nothing. Verified events are kept in the ledger even when no pending row matches
yet (the run may not have recorded its answer), and the run settles from them later.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from runner.domain import RowStatus
from runner.errors import WebhookRejected
from runner.ledger import Ledger, ProviderEvent, open_ledger
from runner.providers.alix_answers import TopupStatus, topup_status
from runner.webhooks.verify import MAX_BODY_BYTES, verify_topup_webhook

log = structlog.get_logger("runner.webhook")
PATH = "/webhooks/alix"
_FINAL = {TopupStatus.SUCCESS: RowStatus.SUCCEEDED, TopupStatus.FAILED: RowStatus.FAILED}
_LEDGER = web.AppKey("ledger", Ledger)
_KEY = web.AppKey("public_key", bytes)


@dataclass(frozen=True, slots=True)
class RunningReceiver:
    url: str
    port: int


async def _receive(request: web.Request) -> web.Response:
    ledger, key = request.app[_LEDGER], request.app[_KEY]
    body = await request.read()
    try:
        event = verify_topup_webhook(body, key)
    except WebhookRejected as exc:
        log.warning("webhook.rejected", reason=exc.reason, peer=request.remote)
        return web.json_response({"ok": False, "error": exc.reason}, status=400)
    status = _FINAL.get(topup_status(event.status))
    if status is None:
        # Not a final status we know: keep it visible, settle nothing, guess nothing.
        log.warning("webhook.status_unknown", status=event.status, card_id=event.card_id)
        return web.json_response({"ok": True, "settled": 0, "status": event.status}, status=202)
    settled, seen = await ledger.call(
        ledger.apply_event,
        ProviderEvent(
            "alix",
            event.card_id,
            event.amount,
            str(event.created_at),
            status,
            event.fee,
            event.balance_after,
        ),
    )
    name = "webhook.duplicate" if seen else "webhook.settled" if settled else "webhook.unmatched"
    log.info(
        name, card_id=event.card_id, amount=event.amount_text, status=status.value, rows=settled
    )
    return web.json_response({"ok": True, "settled": settled, "duplicate": seen})


def make_app(ledger: Ledger, public_key_pem: bytes) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_LEDGER] = ledger
    app[_KEY] = public_key_pem
    app.router.add_post(PATH, _receive)
    return app


@asynccontextmanager
async def serve_webhooks(
    ledger_path: Path | str, public_key_pem: bytes, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningReceiver]:
    """Receive webhooks in the running event loop until exit (port 0: any free port)."""
    ledger = open_ledger(ledger_path)
    runner = web.AppRunner(make_app(ledger, public_key_pem), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
        yield RunningReceiver(f"http://{host}:{bound}{PATH}", bound)
    finally:
        await runner.cleanup()
        ledger.close()


def run_receiver(ledger_path: Path | str, public_key_pem: bytes, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with serve_webhooks(ledger_path, public_key_pem, host, port) as receiver:
            name = receiver_ledger_name(ledger_path)
            log.info("webhook.listening", url=receiver.url, ledger=name)
            await stop.wait()

    asyncio.run(serve())


def receiver_ledger_name(where: Path | str) -> str:
    from runner.ledger import redact

    return redact(str(where))
