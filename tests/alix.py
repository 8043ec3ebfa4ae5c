"""Helpers for Alix tests: the partner's and Alix's key pairs, the environment a partner sets,
and the sandbox in Alix mode. The fixtures `keys` and `alix_env` (conftest.py) use them."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runner.sandbox.config import AlixConfig, SandboxConfig
from runner.sandbox.server import RunningSandbox
from tests.e2e import clean_env, unique_amount_job

PARTNER, SECRET, EMAIL = "PARTNER-7", "s3cret-partner-key", "ops@example.com"


@dataclass(frozen=True)
class Keys:
    partner_private: str
    partner_public: str
    alix_private: str
    alix_public: str


def pem_pair(key: rsa.RSAPrivateKey) -> tuple[str, str]:
    """The key's private (PKCS#8) and public (SubjectPublicKeyInfo) PEM texts."""
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def new_keys() -> Keys:
    partner = pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    alix = pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return Keys(partner[0], partner[1], alix[0], alix[1])


def partner_env(folder: Path, keys: Keys) -> dict[str, str]:
    """A partner's environment for `topup-runner`, its key files written into `folder`."""
    (folder / "partner.pem").write_text(keys.partner_private)
    (folder / "alix-public.pem").write_text(keys.alix_public)
    return clean_env(
        ALIX_PARTNER_CODE=PARTNER,
        ALIX_SECRET_KEY=SECRET,
        ALIX_USER_EMAIL=EMAIL,
        ALIX_PRIVATE_KEY_FILE=str(folder / "partner.pem"),
        ALIX_WEBHOOK_PUBLIC_KEY_FILE=str(folder / "alix-public.pem"),
    )


def sandbox_config(keys: Keys, webhook_url: str, **alix: object) -> SandboxConfig:
    settings: dict[str, object] = {
        "access_token_ttl": 0.6,
        "settle_delay": 0.2,
        "webhook_duplicate_rate": 0.3,
        "failure_style": "mixed",
    } | alix
    return SandboxConfig(
        cooldown=0.0,
        seed=3,
        alix=AlixConfig(
            partner_code=PARTNER,
            secret_key=SECRET,
            user_email=EMAIL,
            partner_public_key_pem=keys.partner_public,
            alix_private_key_pem=keys.alix_private,
            webhook_url=webhook_url,
            **settings,  # type: ignore[arg-type]
        ),
    )


def unique_job(tmp: Path, rows: int, cards: int, seed: int) -> tuple[Path, dict[Decimal, str]]:
    """`unique_amount_job` from 10.00 up."""
    return unique_amount_job(tmp, rows, cards, seed, base=Decimal("10.00"))


def settled_events(sb: RunningSandbox) -> int:
    """Distinct topups whose webhook the receiver accepted."""
    assert sb.alix is not None
    delivered = sb.alix.state.deliveries
    return len({(d.card_id, d.created_at) for d in delivered if d.status == 200})
