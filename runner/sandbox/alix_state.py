"""The simulated Alix Pay account: partner auth with short-lived tokens, topups accepted as Pending
and settled later, and the exact record of every topup it accepted (`AlixState.topups`). Pure
logic on the injected clock, over the cards and wallet of `SandboxState`; alix.py serves it under
/api/v2 and webhooks.py delivers its settlements.

Every assumption the sandbox makes about Alix lives in this docstring (and, where it is a value
or a format, in this module), so that one edit changes it when the real specification is known.

The project's assumptions (docs/providers.md, "Alix: the assumptions this project makes"):

- Access token: `POST /api/v2/auth/access-token` with `{"partnerCode", "userEmail", "signature"}`,
  the signature being base64 of RSA PKCS#1 v1.5 SHA-256 over `partnerCode|secretKey` made with
  the partner's private key (`partner_message`). Both it and the documented refresh call answer
  `data: {"accessToken", "refreshToken", "expiresIn"}`. An expired or unknown access token gets
  HTTP 401 with `success: false`.
- TopupCard webhook: `POST` to the partner's URL of `{"success": true, "webhookType": "TopupCard",
  "data": {"cardId", "amount", "fee", "status", "balanceBefore", "balanceAfter", "createdAt"},
  "signature"}`, status `Success` or `Failed`, signed like the above with Alix's key over
  `cardId|amount|status|createdAt` (`webhook_message`), amount being exactly the string the
  partner sent and createdAt a decimal integer. The same event may arrive more than once.
- Matching: the topup answer's `createdAt` (unix seconds) is the one the webhook and the
  transactions list carry; `(cardId, amount, createdAt)` identifies a topup.
- Transactions list items: `{id, type: "TopupCard", cardId, amount, fee, status, balanceBefore,
  balanceAfter, createdAt}`, newest first.

The sandbox's own choices where even those are silent:

- Tokens are opaque random strings. An access token lives `access_token_ttl` seconds from its
  issue; `expiresIn` is that number (fractional only when configured below a second). A refresh
  token lives `refresh_token_ttl`, is single use, and using it revokes the access token issued
  with it. A new access-token call does not revoke tokens issued earlier.
- Auth calls check `partnerCode` and (access-token only) `userEmail` for exact equality, then the
  signature; any mismatch is 401 "Invalid partner credentials". A refresh token unknown, used or
  expired is 401 too. Auth calls are neither rate limited nor given faults.
- HTTP statuses: 401 and 429 (with Retry-After, whole seconds rounded up) are always HTTP
  statuses, as are the 5xx of faults. Other refusals (400 invalid request or amount, 404 card not
  found, 400 card not active or insufficient balance) follow `failure_style`: "http" answers the
  4xx, "ok" answers HTTP 200 with `success: false`, "mixed" picks one per answer (seeded).
- No errorCode table is published; the sandbox's is `ErrorCode` below.
- Topup amount: a JSON string spelled as digits with an optional point and one or two decimals
  ("100", "100.5", "100.50"); a number, a sign, an exponent, spaces, leading zeros or a third
  decimal (even "100.000") is an invalid amount. Bounds `min_amount`..`max_amount` inclusive
  (default 10.00..10,000.00 USDT). `cardId` must be a non-empty string (the docs' example shows
  0, their table says string).
- Topup checks run in this order: access token, rate limit, fault draw, body shape, amount
  spelling, amount bounds, card exists, card active, wallet covers amount + fee. Alix has no
  card limit and no cooldown.
- Fee: round_half_up(amount x fee_rate + fee_fixed, 2 places); default 1% and 0 fixed, the docs'
  example (fee 1 on 100). The wallet is charged amount + fee when the topup is accepted.
- Settlement: each accepted topup settles `settle_delay` seconds (injected clock) after its
  acceptance, in acceptance order: `Failed` with probability `settle_failure_rate` (seeded),
  refunding amount + fee to the wallet; otherwise `Success`, raising the card's balance (and
  deposit) by the amount. A card frozen or closed meanwhile does not change that. Due topups
  settle on every Alix request and admin read, and on a background tick; the admin route
  `POST /_sandbox/alix/settle` settles every pending one at once.
- balanceBefore/balanceAfter are the card's balance: while Pending both are the balance at
  acceptance (the docs' example answers 0 and 0); once settled, the balance just before and just
  after settlement (equal when Failed).
- createdAt is wall-clock time moved along by the injected clock, in whole seconds, and strictly
  increasing per card: when the second has not moved on since the card's last topup, it is the
  last one + 1.
- Numbers on the wire are written as JavaScript writes them (100, 3.5), as the docs' example;
  only the webhook's `amount` is a string.
- `POST /cards/topup-check`: `cardType` must be a non-empty string, any value (the fee does not
  depend on it); `amount` a string spelled as for a topup or a JSON number with at most two
  decimals, within the same bounds. `netAmount` = amount + fee: what the wallet would be charged.
- Transactions list: `page` from 1, `pageSize` 10 by default and at most 100; `totalPage` =
  ceil(matching items / pageSize), 0 when none match. Empty query values count as absent. `type`
  other than TopupCard lists nothing (the sandbox has topups only); `status` must be Pending,
  Success or Failed; `from`/`to` are `YYYY-MM-DD HH:MM:SS` UTC, inclusive, on createdAt. An
  unknown card is "Card not found". Item ids are UUIDs.
- Cards and the wallet are the sandbox's, shared with its Uncash side (USDT counted as USD).
  UUID-shaped card ids are case-insensitive and answered in lower case.
- Rate limit: its own GCRA budget with the sandbox's settings, over every request carrying a
  valid access token.
- Faults: the Uncash kinds but `cooldown`, drawn for topup POSTs after the token and rate-limit
  checks; a scripted fault matches the body's `cardId` (a body without one matches only
  scripts for any card).
- A busy backend (`apply_delay`, or a `late` fault's `slow_seconds`): the topup is decided and
  accepted that long after it arrives, whether or not its client is still connected; its
  acceptance time and createdAt are that moment.
- Webhooks go to loopback URLs only. A delivery answered other than 2xx, or failing, is retried up
  to `webhook_attempts` times in all, waiting `webhook_backoff` seconds, then twice that, and so
  on; with probability `webhook_duplicate_rate` a delivered event is sent once more, unchanged.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal

from cryptography.hazmat.primitives.asymmetric import rsa

from runner.sandbox.alix_records import (
    TOPUP_TYPE,
    AlixCounters,
    AlixTopup,
    AlixTopupResult,
    AuthFailure,
    TopupAccepted,
    TopupStatus,
    WebhookDelivery,
    webhook_message,
)
from runner.sandbox.alix_tokens import AlixTokens
from runner.sandbox.config import CENT, AlixConfig, canonical_card_id, check_loopback_url
from runner.sandbox.faults import FaultKind
from runner.sandbox.signing import (
    generate_private_key,
    load_private_key,
    public_pem,
    sign,
)
from runner.sandbox.state import (
    AmountProblem,
    CardInactive,
    CardNotFound,
    Gcra,
    InsufficientFunds,
    InvalidAmount,
    Refusal,
    SandboxState,
)
from runner.sandbox.wire import JSON

# Float arithmetic on clock values must not keep a topup pending that is due to the microsecond.
_EPSILON = 1e-9


class AlixState:
    """The Alix account the sandbox serves, with counters of everything it saw.

    Every decision is synchronous: nothing awaits between checking a topup and accepting it.
    Settlements are announced to listeners (the webhook sender) as they happen.
    """

    def __init__(
        self,
        shared: SandboxState,
        config: AlixConfig,
        *,
        signing_key: rsa.RSAPrivateKey | None = None,
    ) -> None:
        """`signing_key` signs webhooks when the config has no key (default: a fresh one)."""
        self.shared = shared
        self.config = config
        seed = shared.config.seed
        self.counters = AlixCounters()
        self.tokens = AlixTokens(
            config, self.counters, now=shared.now, on_refused=self.note_unauthorized
        )
        if config.alix_private_key_pem is not None:
            # AlixConfig.__post_init__ has checked this key already.
            pem = config.alix_private_key_pem
            self._signing_key = load_private_key("alix_private_key_pem", pem, checked=True)
        else:
            self._signing_key = signing_key or generate_private_key()
        self.public_key_pem = public_pem(self._signing_key)
        self.webhook_url = config.webhook_url
        self._limiter = (
            None
            if shared.config.rate_limit is None
            else Gcra(shared.config.rate_limit, shared.config.rate_burst)
        )
        # Separate streams, so that settling outcomes do not shift transaction ids.
        self._settle_rng = random.Random(None if seed is None else f"alix-settle:{seed}")
        self._id_rng = random.Random(None if seed is None else f"alix-ids:{seed}")
        self.topups: list[AlixTopup] = []
        self._pending: deque[int] = deque()  # indices into topups, in acceptance order
        self._last_created_at: dict[str, int] = {}
        self._listeners: list[Callable[[AlixTopup], None]] = []
        self.requests: Counter[str] = Counter()
        self.refusals: Counter[Refusal] = Counter()
        self.faults_injected: Counter[FaultKind] = Counter()
        self.topup_arrivals: list[float] = []
        self.deliveries: list[WebhookDelivery] = []

    # -- time -------------------------------------------------------------------------------

    def now(self) -> float:
        return self.shared.now()

    def unix_seconds(self, at: float) -> int:
        """Wall-clock unix seconds of the clock value `at`."""
        return math.floor(self.shared.wall(at).timestamp())

    # -- counting ---------------------------------------------------------------------------

    def note_request(self, route: str) -> None:
        self.requests[route] += 1

    def note_topup_arrival(self) -> None:
        self.topup_arrivals.append(self.now())

    def note_refusal(self, reason: Refusal) -> None:
        self.refusals[reason] += 1

    def note_unauthorized(self, failure: AuthFailure) -> None:
        self.counters.unauthorized += 1
        if failure is AuthFailure.EXPIRED_TOKEN:
            self.counters.expired_tokens += 1
        self.note_refusal(Refusal.UNAUTHORIZED)

    def note_fault(self, kind: FaultKind) -> None:
        self.faults_injected[kind] += 1

    def note_delivery(self, delivery: WebhookDelivery) -> None:
        self.deliveries.append(delivery)
        if delivery.delivered:
            self.counters.webhooks_delivered += 1
        else:
            self.counters.webhook_failures += 1

    # -- rules ------------------------------------------------------------------------------

    def admit(self) -> float | None:
        """Spend one request of the rate limit: None if admitted, else seconds to wait."""
        if self._limiter is None:
            return None
        wait = self._limiter.admit(self.now())
        if wait is not None:
            self.note_refusal(Refusal.RATE_LIMITED)
        return wait

    def fee_for(self, amount: Decimal) -> Decimal:
        raw = amount * self.config.fee_rate + self.config.fee_fixed
        return raw.quantize(CENT, rounding=ROUND_HALF_UP)

    def amount_problems(self, amount: Decimal) -> tuple[AmountProblem, ...]:
        """The bounds `amount` breaks (its spelling was checked by `parse_amount`)."""
        if amount < self.config.min_amount:
            return (AmountProblem.TOO_SMALL,)
        if amount > self.config.max_amount:
            return (AmountProblem.TOO_BIG,)
        return ()

    def topup(
        self, card_id: str, amount: Decimal, amount_text: str, *, fault: FaultKind | None = None
    ) -> AlixTopupResult:
        """Decide a topup of `amount` (sent as `amount_text`) on `card_id`; accept it if due.

        `fault` labels the record when an "after" fault will hide the answer.
        """
        result = self._decide(card_id, amount, amount_text, fault)
        if not isinstance(result, TopupAccepted):
            self.note_refusal(result.reason)
        return result

    def _decide(
        self, card_id: str, amount: Decimal, amount_text: str, fault: FaultKind | None
    ) -> AlixTopupResult:
        problems = self.amount_problems(amount)
        if problems:
            return InvalidAmount(problems)
        card = self.shared.card(card_id)
        if card is None:
            return CardNotFound()
        if card.status != "active":
            return CardInactive(card.status)
        amount = amount.quantize(CENT)
        fee = self.fee_for(amount)
        total = amount + fee
        if total > self.shared.wallet:
            return InsufficientFunds(amount, fee, total, self.shared.wallet)
        now = self.now()
        self.shared.wallet -= total
        self.shared.wallet_updated_at = now
        record = AlixTopup(
            seq=len(self.topups) + 1,
            card_id=card.card_id,
            amount=amount,
            amount_text=amount_text,
            fee=fee,
            total_charged=total,
            created_at=self._created_at(card.card_id, now),
            accepted_at=now,
            transaction_id=str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4)),
            status=TopupStatus.PENDING,
            balance_before=card.balance,
            balance_after=card.balance,
            wallet_balance_after=self.shared.wallet,
            fault=fault,
        )
        self._pending.append(len(self.topups))
        self.topups.append(record)
        return TopupAccepted(record)

    def _created_at(self, card_id: str, now: float) -> int:
        second = self.unix_seconds(now)
        last = self._last_created_at.get(card_id)
        if last is not None and second <= last:
            second = last + 1
        self._last_created_at[card_id] = second
        return second

    # -- settlement -------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[AlixTopup], None]) -> None:
        """Call `listener` with each topup as it settles."""
        self._listeners.append(listener)

    @property
    def pending(self) -> list[AlixTopup]:
        return [self.topups[index] for index in self._pending]

    def settle_due(self) -> list[AlixTopup]:
        """Settle every pending topup whose delay has passed; the settled records, in order."""
        now = self.now()
        delay = self.config.settle_delay
        settled = []
        while self._pending and self.topups[self._pending[0]].accepted_at + delay <= now + _EPSILON:
            settled.append(self._settle(self._pending.popleft(), now, None))
        return settled

    def settle_all(self, status: TopupStatus | None = None) -> list[AlixTopup]:
        """Settle every pending topup now, as `status` or as the failure rate draws."""
        if status is TopupStatus.PENDING:
            raise ValueError("a topup settles as Success or Failed")
        now = self.now()
        settled = []
        while self._pending:
            settled.append(self._settle(self._pending.popleft(), now, status))
        return settled

    def _settle(self, index: int, now: float, status: TopupStatus | None) -> AlixTopup:
        record = self.topups[index]
        if status is None:
            rate = self.config.settle_failure_rate
            failed = rate > 0 and self._settle_rng.random() < rate
            status = TopupStatus.FAILED if failed else TopupStatus.SUCCESS
        card = self.shared.card(record.card_id)
        if card is None:  # pragma: no cover - cards are never deleted
            raise AssertionError(f"card {record.card_id} vanished with a topup pending")
        before = card.balance
        if status is TopupStatus.SUCCESS:
            card.balance += record.amount
            card.deposit += record.amount
            card.updated_at = now
        else:
            self.shared.wallet += record.total_charged
            self.shared.wallet_updated_at = now
        settled = replace(
            record,
            status=status,
            balance_before=before,
            balance_after=card.balance,
            settled_at=now,
        )
        self.topups[index] = settled
        for listener in self._listeners:
            listener(settled)
        return settled

    # -- reading ----------------------------------------------------------------------------

    def transactions(
        self,
        card_id: str,
        *,
        status: TopupStatus | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[AlixTopup]:
        """The card's topups, newest first, filtered by status and createdAt (inclusive)."""
        key = canonical_card_id(card_id)
        return [
            record
            for record in reversed(self.topups)
            if record.card_id == key
            and (status is None or record.status is status)
            and (since is None or record.created_at >= since)
            and (until is None or record.created_at <= until)
        ]

    # -- webhooks ---------------------------------------------------------------------------

    def set_webhook_url(self, url: str | None) -> None:
        """Deliver later settlements to `url` (loopback only), or to nobody when None."""
        self.webhook_url = None if url is None else check_loopback_url("webhook_url", url)

    def webhook_payload(self, record: AlixTopup) -> dict[str, JSON]:
        """The signed TopupCard webhook body announcing `record`'s settlement."""
        data: dict[str, JSON] = {
            "cardId": record.card_id,
            "amount": record.amount_text,
            "fee": record.fee,
            "status": str(record.status),
            "balanceBefore": record.balance_before,
            "balanceAfter": record.balance_after,
            "createdAt": record.created_at,
        }
        message = webhook_message(
            record.card_id, record.amount_text, str(record.status), record.created_at
        )
        return {
            "success": True,
            "webhookType": TOPUP_TYPE,
            "data": data,
            "signature": sign(self._signing_key, message),
        }
