"""Where a ledger is: a SQLite file's path, or a PostgreSQL URL (a ledger workers share);
and how a URL may be shown (without its password)."""

from __future__ import annotations

import re

URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: str | None) -> bool:
    return bool(value) and str(value).startswith(URL_SCHEMES)


def redact(url: str) -> str:
    """A ledger's URL without its password: what messages and logs may show."""
    return re.sub(r"^(\w+://[^:/@]+):[^@/]*@", r"\1:***@", url)
