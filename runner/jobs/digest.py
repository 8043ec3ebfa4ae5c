"""A job's content digest: sha256 of the rows' canonical form (card ids as the providers tell
cards apart, two-decimal amounts, references), whatever the file's format or line endings.
"""

from __future__ import annotations

import hashlib
import json
import re

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# Bump when the canonical form changes: run keys derived from digests must not collide.
_DIGEST_VERSION = "topup-runner job content v2"
_DIGEST_SLICE = 65_536  # values hashed at a time


def canonical_card_ids(card_ids: list[str]) -> list[str]:
    """The ids as the providers tell cards apart: a UUID in any case is the same card (UUIDs
    are case-insensitive on input, RFC 9562; the providers answer in lower case, and the
    sandbox, preflight and the Alix adapter all compare them so). A copy of a job with its
    UUIDs re-spelled must resume the run, not pay again. Other ids are kept as written: they
    may be case-sensitive. Lower case is the canonical form, so the digest of a file already
    in it is the one earlier versions recorded; the list is only copied if an id changes."""
    folded: list[str] | None = None
    for position, card_id in enumerate(card_ids):
        if card_id.islower() or card_id == (lower := card_id.lower()):
            continue
        if _UUID.fullmatch(card_id):
            if folded is None:
                folded = list(card_ids)
            folded[position] = lower
    return card_ids if folded is None else folded


def content_digest(columns: list[list[str]]) -> str:
    """sha256 of the rows' canonical form, whatever the file's format, encoding or line endings.

    The form is column-wise (card_id, amount with two decimals, reference),
    each column's values joined by the unit separator, length-prefixed; a column in which a
    value holds that separator is JSON-encoded instead, so the form is always unambiguous.
    """
    count = len(columns[0])
    digest = hashlib.sha256()
    header = [_DIGEST_VERSION, count]
    digest.update(json.dumps(header, ensure_ascii=False).encode())
    for values in columns:
        # b"U" + the values joined by the separator, a slice at a time: the same bytes as
        # joining the whole column, without a second copy of a million values in memory.
        # The first pass measures (the length comes first) and looks for the separator.
        slices = range(0, count, _DIGEST_SLICE)
        size = 1 + max(len(slices) - 1, 0)
        plain = True
        for start in slices:
            part = values[start : start + _DIGEST_SLICE]
            joined = "\x1f".join(part)
            plain = plain and joined.count("\x1f") == len(part) - 1
            size += len(joined.encode())
        if not plain:
            section = b"J" + json.dumps(values, ensure_ascii=False).encode()
            digest.update(b"%d:" % len(section) + section)
            continue
        digest.update(b"%d:U" % size)
        for start in slices:
            if start:
                digest.update(b"\x1f")
            digest.update("\x1f".join(values[start : start + _DIGEST_SLICE]).encode())
    return digest.hexdigest()
