"""Which provider a run talks to, built from settings and secrets from the environment.

For `sandbox`, the simulator `runner.sandbox.inprocess` starts is spoken to over real HTTP
through the same Uncash adapter as production.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

from runner.config import Settings
from runner.errors import ConfigError
from runner.logs import register_secret
from runner.providers.alix import AlixProvider
from runner.providers.alix_answers import RULES as ALIX_RULES
from runner.providers.alix_auth import AlixCredentials
from runner.providers.base import Provider, ProviderRules, Throttle
from runner.providers.uncash import PUBLIC_BASE_URL, UncashProvider
from runner.providers.uncash import RULES as UNCASH_RULES
from runner.sandbox.config import SandboxConfig
from runner.sandbox.inprocess import start_sandbox


def rules_for(provider: str) -> ProviderRules:
    """The documented amount rules of a provider (the sandbox simulates Uncash)."""
    if provider in ("sandbox", "uncash"):
        return UNCASH_RULES
    if provider == "alix":
        return ALIX_RULES
    raise ConfigError(f"provider {provider!r} is not known")


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
        async with start_sandbox(
            card_ids,
            cooldown=settings.cooldown,
            rate_limit=settings.rate_limit,
            config=sandbox_config,
        ) as sandbox:
            provider = UncashProvider(
                sandbox.token,
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
