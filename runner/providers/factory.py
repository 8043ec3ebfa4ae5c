"""Which provider a run talks to, built from settings and secrets from the environment.

For `sandbox`, the simulator is started in-process on a loopback port, seeded with the
job's cards, and spoken to over real HTTP through the same Uncash adapter as production.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace

from runner.config import Settings
from runner.errors import ConfigError
from runner.logs import register_secret
from runner.providers.alix import RULES as ALIX_RULES
from runner.providers.alix import AlixProvider
from runner.providers.alix_auth import AlixCredentials
from runner.providers.base import Provider, ProviderRules, Throttle
from runner.providers.uncash import PUBLIC_BASE_URL, UncashProvider
from runner.providers.uncash import RULES as UNCASH_RULES
from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.server import serve_sandbox


def rules_for(provider: str) -> ProviderRules:
    """The documented amount rules of a provider (the sandbox simulates Uncash)."""
    if provider in ("sandbox", "uncash"):
        return UNCASH_RULES
    if provider == "alix":
        return ALIX_RULES
    raise ConfigError(f"provider {provider!r} is not known")


def _sandbox_token() -> str:
    alphabet = string.ascii_letters + string.digits
    return "uc_" + "".join(secrets.choice(alphabet) for _ in range(40))


def uncash_token(env: Mapping[str, str]) -> str:
    token = env.get("UNCASH_API_TOKEN", "").strip()
    if not token:
        raise ConfigError("UNCASH_API_TOKEN is not set: export the Uncash API token to run")
    return token


@asynccontextmanager
async def open_provider(
    settings: Settings,
    card_ids: Iterable[str],
    throttle: Throttle,
    *,
    env: Mapping[str, str] | None = None,
    sandbox_config: SandboxConfig | None = None,
) -> AsyncIterator[tuple[Provider, str]]:
    """Yield the provider and the base URL it talks to; close both at the end."""
    env = os.environ if env is None else env
    if settings.provider == "sandbox":
        token = _sandbox_token()
        register_secret(token)
        base = sandbox_config or SandboxConfig(
            cooldown=settings.cooldown, rate_limit=settings.rate_limit
        )
        known = {c.card_id for c in base.cards} | set(base.missing_cards)
        cards = tuple(SandboxCard(card_id=c) for c in sorted(set(card_ids) - known))
        config = replace(base, token=token, cards=base.cards + cards)
        async with serve_sandbox(config) as sandbox:
            provider = UncashProvider(
                token,
                base_url=sandbox.base_url,
                timeout=settings.timeout,
                concurrency=settings.concurrency,
                throttle=throttle,
                name="sandbox",
            )
            try:
                yield provider, sandbox.base_url
            finally:
                await provider.aclose()
        return
    if settings.provider == "uncash":
        token = uncash_token(env)
        register_secret(token)
        base_url = settings.base_url or PUBLIC_BASE_URL
        provider = UncashProvider(
            token,
            base_url=base_url,
            timeout=settings.timeout,
            concurrency=settings.concurrency,
            throttle=throttle,
        )
        try:
            yield provider, base_url
        finally:
            await provider.aclose()
        return
    if settings.provider == "alix":
        if not settings.base_url:
            raise ConfigError("--base-url is required for alix: its API root is not public")
        alix = AlixProvider(
            AlixCredentials.from_env(env),
            base_url=settings.base_url,
            timeout=settings.timeout,
            concurrency=settings.concurrency,
            throttle=throttle,
        )
        try:
            yield alix, settings.base_url
        finally:
            await alix.aclose()
        return
    raise ConfigError(f"provider {settings.provider!r} is not known")
