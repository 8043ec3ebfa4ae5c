"""Base URLs and targets: one spelling per API root, so that a run key is bound to the
platform and API root a run pays through, however the operator typed it.
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata
from collections.abc import Mapping
from urllib.parse import urlsplit

from runner.errors import ConfigError

PROVIDERS = ("sandbox", "uncash", "alix")
# The providers' published API roots (kept equal to the adapters' by a test: this module
# imports no adapter). Alix publishes none: its base URL must always be given.
PUBLIC_BASE_URLS: Mapping[str, str] = {"uncash": "https://api.uncash.io/api/v1"}
SANDBOX_TARGET = "sandbox:in-process"
# Every spelling of this machine (localhost, 127/8, 0.0.0.0, ::1, ::) becomes this host.
LOOPBACK_HOST = "127.0.0.1"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Characters kept as they are in a path besides the unreserved (RFC 3986 sub-delims, ":", "@").
_PATH_KEPT = frozenset("!$&'()*+,;=:@/")
_HEX = frozenset(string.hexdigits)
_DOMAIN = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def _url_error(message: str) -> ConfigError:
    # The URL itself is never shown: it may hold a password, a token in a query, or worse.
    return ConfigError(f"base-url: {message}")


def normalize_base_url(url: str) -> str:
    """`url` in one spelling per API root, or ConfigError if it is not a plain http(s) URL.

    Scheme and host in lower case, the host in IDNA (ASCII) form without a trailing dot,
    IPv4 hosts written any way inet_aton reads them as dotted quads, every loopback
    spelling (localhost, 127/8, 0.0.0.0, ::1, ::, ::ffff:127.x) as 127.0.0.1, default ports
    dropped, percent-escapes normalised (upper-case hex, unreserved characters decoded),
    duplicate slashes and dot segments resolved, no trailing slash. User info, queries,
    fragments, whitespace and control characters are refused, and never echoed.
    """
    if any(_is_control_or_space(ch) for ch in url):
        return _refuse("contains whitespace or control characters")
    if "?" in url or "#" in url:
        return _refuse("must not have a query (?...) or fragment (#...): give the API root only")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _DEFAULT_PORTS:
        return _refuse("must be an http:// or https:// URL (the API root)")
    authority, _, _ = rest.partition("/")
    if "@" in authority:
        return _refuse(
            "must not contain a user name or password (user:password@): "
            "credentials come from the environment"
        )
    if "\\" in authority:
        return _refuse("has a backslash in its host")
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:
        return _refuse("has a host that is not a valid name or address")
    try:
        port = parts.port
    except ValueError:
        return _refuse("has a port that is not a number from 1 to 65535")
    if port == 0:
        return _refuse("has a port that is not a number from 1 to 65535")
    host = _normalize_host(authority, parts.hostname or "")
    shown_port = "" if port is None or port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{shown_port}{_normalize_path(parts.path)}"


def _refuse(message: str) -> str:
    raise _url_error(message)


def _is_control_or_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Zs")


def _normalize_host(authority: str, hostname: str) -> str:
    if not hostname:
        return _refuse("has no host")
    if authority.startswith("["):
        try:
            address = ipaddress.IPv6Address(hostname)
        except ValueError:
            return _refuse("has a host in brackets that is not an IPv6 address")
        mapped = address.ipv4_mapped
        if mapped is not None:
            return _loopback_or(mapped)
        if address.is_loopback or address.is_unspecified:
            return LOOPBACK_HOST
        return f"[{address.compressed}]"
    if hostname.endswith("."):
        hostname = hostname[:-1]
    labels = hostname.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        number = _ipv4_number(labels)
        if number is None:
            return _refuse("has a numeric host that is not an IPv4 address")
        return _loopback_or(ipaddress.IPv4Address(number))
    try:
        ascii_host = hostname.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return _refuse("has a host that is not a valid domain name")
    if not _DOMAIN.fullmatch(ascii_host):
        return _refuse("has a host that is not a valid domain name")
    return LOOPBACK_HOST if ascii_host == "localhost" else ascii_host


def _loopback_or(address: ipaddress.IPv4Address) -> str:
    if address.is_loopback or address == ipaddress.IPv4Address(0):
        return LOOPBACK_HOST
    return str(address)


def _ipv4_number(labels: list[str]) -> int | None:
    """The address inet_aton reads from dotted `labels` (1 to 4 numbers in decimal, octal
    with a leading 0, or hex with 0x; the last fills the remaining bytes), or None."""
    if not 1 <= len(labels) <= 4:
        return None
    numbers: list[int] = []
    for label in labels:
        if not _NUMERIC_LABEL.fullmatch(label):
            return None
        if label[:2].lower() == "0x":
            numbers.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            if not set(label) <= set("01234567"):
                return None
            numbers.append(int(label, 8))
        else:
            numbers.append(int(label))
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for position, n in enumerate(leading):
        value += n << (8 * (3 - position))
    return value


def _normalize_path(path: str) -> str:
    escaped = _normalize_escapes(path)
    segments: list[str] = []
    for segment in escaped.split("/"):
        if segment in ("", "."):
            continue  # duplicate slashes and "." steps
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "".join("/" + segment for segment in segments)


def _normalize_escapes(path: str) -> str:
    out: list[str] = []
    position = 0
    while position < len(path):
        ch = path[position]
        if ch == "%":
            pair = path[position + 1 : position + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                return _refuse("has a % that is not followed by two hex digits")
            decoded = chr(int(pair, 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
            position += 3
            continue
        if ch in _UNRESERVED or ch in _PATH_KEPT:
            out.append(ch)
        else:
            out.append("".join(f"%{byte:02X}" for byte in ch.encode("utf-8")))
        position += 1
    return "".join(out)


def target_of(provider: str, base_url: str | None) -> str:
    """What a run is bound to besides its job: the platform and its API root, normalised, so
    that every spelling of one root (and no base URL, for the public one) is one target."""
    if provider == "sandbox":
        return SANDBOX_TARGET
    if base_url is None or not base_url.strip():
        if provider not in PUBLIC_BASE_URLS:
            raise ConfigError(f"--base-url is required for {provider}: its API root is not public")
        base_url = PUBLIC_BASE_URLS[provider]
    return f"{provider}:{normalize_base_url(base_url.strip())}"


def normalize_target(stored: str) -> str:
    """A target as earlier versions stored it in ledgers ("sandbox:in-process",
    "<provider>:default" for the public URL, "<provider>:<url as typed>") in target_of's
    form; a value that cannot be read so is returned unchanged."""
    provider, separator, rest = stored.partition(":")
    if not separator or provider not in PROVIDERS or provider == "sandbox":
        return stored
    try:
        return target_of(provider, None if rest == "default" else rest)
    except ConfigError:
        return stored
