"""RSA keys and signatures as Alix uses them: PKCS#1 v1.5 over SHA-256, base64 on the wire, keys
in PEM. Generic: what is signed (the message formats) is Alix's business, in alix_state.py.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

KEY_BITS = 2048
_PUBLIC_EXPONENT = 65537


def generate_private_key() -> rsa.RSAPrivateKey:
    """A fresh RSA private key (a good fraction of a second: keep it off the event loop)."""
    return rsa.generate_private_key(public_exponent=_PUBLIC_EXPONENT, key_size=KEY_BITS)


def public_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """The SubjectPublicKeyInfo PEM of `key` (or of its public half)."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_private_key(name: str, pem: str, *, checked: bool = False) -> rsa.RSAPrivateKey:
    """The unencrypted RSA private key in `pem`; ValueError naming `name` otherwise.

    The RSA consistency check costs tens of milliseconds; `checked` skips it for a PEM that has
    already passed it once.
    """
    if not isinstance(pem, str):
        raise ValueError(f"{name} must be a PEM string, got {type(pem).__name__}")
    try:
        key = serialization.load_pem_private_key(
            pem.encode("ascii"), password=None, unsafe_skip_rsa_key_validation=checked
        )
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"{name} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{name} must be an RSA key, got {type(key).__name__}")
    return key


def load_public_key(name: str, pem: str) -> rsa.RSAPublicKey:
    """The RSA public key in `pem`; ValueError naming `name` otherwise."""
    if not isinstance(pem, str):
        raise ValueError(f"{name} must be a PEM string, got {type(pem).__name__}")
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"{name} is not a PEM public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{name} must be an RSA key, got {type(key).__name__}")
    return key


def sign(key: rsa.RSAPrivateKey, message: str) -> str:
    """Base64 of the PKCS#1 v1.5 SHA-256 signature over the UTF-8 bytes of `message`."""
    signature = key.sign(message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def verify(key: rsa.RSAPublicKey, message: str, signature: object) -> bool:
    """True when `signature` is base64 of a valid signature of `message` by `key`'s owner."""
    if not isinstance(signature, str):
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True
