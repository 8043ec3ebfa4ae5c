"""Alix's TopupCard webhooks leaving the sandbox: each settlement POSTed, signed, to the partner's
URL from the server's event loop, retried with backoff, sometimes sent twice on purpose, and every
attempt recorded on the `AlixState`. Also the tick that settles due topups when nobody asks.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp

from runner.sandbox.alix_records import AlixTopup, WebhookDelivery
from runner.sandbox.alix_state import AlixState
from runner.sandbox.wire import dumps

# How often due topups are settled when no request comes; real seconds, whatever the clock.
SETTLE_TICK = 0.02
_DELIVERY_TIMEOUT = 5.0


class WebhookSender:
    """Delivers each settlement `alix` announces while `run` runs (started by the server).

    Deliveries run side by side, so a partner that answers slowly or not at all delays only its
    own events' retries.
    """

    def __init__(self, alix: AlixState) -> None:
        self._alix = alix
        self._queue: asyncio.Queue[AlixTopup] = asyncio.Queue()
        seed = alix.shared.config.seed
        self._rng = random.Random(None if seed is None else f"alix-webhooks:{seed}")
        alix.add_listener(self._queue.put_nowait)

    async def run(self) -> None:
        """Settle due topups on a tick and deliver every settlement, until cancelled."""
        timeout = aiohttp.ClientTimeout(total=_DELIVERY_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as tasks:
            tasks.create_task(self._settle_ticks())
            while True:
                record = await self._queue.get()
                url = self._alix.webhook_url
                if url is not None:
                    tasks.create_task(self._deliver(session, url, record))

    async def _settle_ticks(self) -> None:
        while True:
            await asyncio.sleep(SETTLE_TICK)
            self._alix.settle_due()

    async def _deliver(self, session: aiohttp.ClientSession, url: str, record: AlixTopup) -> None:
        # The body is signed and rendered once: a duplicate is the very same bytes, as a replay.
        body = dumps(self._alix.webhook_payload(record), js_numbers=True)
        delivered = await self._attempts(session, url, record, body, duplicate=False)
        rate = self._alix.config.webhook_duplicate_rate
        if delivered and rate > 0 and self._rng.random() < rate:
            self._alix.counters.webhook_duplicates += 1
            await self._attempts(session, url, record, body, duplicate=True)

    async def _attempts(
        self,
        session: aiohttp.ClientSession,
        url: str,
        record: AlixTopup,
        body: str,
        *,
        duplicate: bool,
    ) -> bool:
        """POST `body` until a 2xx answer or `webhook_attempts` tries; True if delivered."""
        config = self._alix.config
        for attempt in range(1, config.webhook_attempts + 1):
            status, error = await _post(session, url, body)
            delivery = WebhookDelivery(
                seq=len(self._alix.deliveries) + 1,
                url=url,
                body=body,
                status=status,
                error=error,
                attempt=attempt,
                duplicate=duplicate,
                card_id=record.card_id,
                created_at=record.created_at,
                topup_status=record.status,
                at=self._alix.now(),
            )
            self._alix.note_delivery(delivery)
            if delivery.delivered:
                return True
            if attempt < config.webhook_attempts:
                await asyncio.sleep(config.webhook_backoff * 2 ** (attempt - 1))
        return False


async def _post(
    session: aiohttp.ClientSession, url: str, body: str
) -> tuple[int | None, str | None]:
    """The status of POSTing `body` to `url`, or None and why no answer came."""
    headers = {"Content-Type": "application/json"}
    try:
        # No redirects: a 3xx must not lead a delivery off loopback.
        async with session.post(
            url, data=body.encode(), headers=headers, allow_redirects=False
        ) as response:
            await response.read()
            return response.status, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
