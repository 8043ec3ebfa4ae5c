"""The sandbox a `--provider sandbox` run talks to: started in-process on a loopback port with
a fresh token, seeded with the job's cards, stopped when the run ends.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from runner.logs import register_secret
from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.server import serve_sandbox


@dataclass(frozen=True, slots=True)
class InProcessSandbox:
    """Where the started sandbox listens and the token it accepts (a secret: never shown)."""

    base_url: str
    token: str

    def __repr__(self) -> str:
        return f"InProcessSandbox(base_url={self.base_url!r})"


def sandbox_token() -> str:
    """A fresh token of the documented Uncash shape, `uc_` and 40 letters or digits."""
    alphabet = string.ascii_letters + string.digits
    return "uc_" + "".join(secrets.choice(alphabet) for _ in range(40))


@asynccontextmanager
async def start_sandbox(
    card_ids: Iterable[str],
    *,
    cooldown: float,
    rate_limit: float | None,
    config: SandboxConfig | None = None,
) -> AsyncIterator[InProcessSandbox]:
    """Serve the simulator until the block ends. `config` (tests) sets its rules; otherwise it
    takes the run's cooldown and rate limit. Every card of the job that `config` does not
    declare (as a card or as missing) exists with the default balance and limit."""
    token = sandbox_token()
    register_secret(token)
    base = config or SandboxConfig(cooldown=cooldown, rate_limit=rate_limit)
    known = {c.card_id for c in base.cards} | set(base.missing_cards)
    cards = tuple(SandboxCard(card_id=c) for c in sorted(set(card_ids) - known))
    async with serve_sandbox(replace(base, token=token, cards=base.cards + cards)) as sandbox:
        yield InProcessSandbox(sandbox.base_url, token)
