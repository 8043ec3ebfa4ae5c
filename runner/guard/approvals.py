"""Approval bound to the job's content: the digest an approval is given for (rows, target,
totals, the run key the run will take), who may count towards `--require-approval`, and
optional Ed25519 signatures that bind an approval to a key its approver holds.

Names are what approvers say they are (`--by`); with TOPUP_APPROVER_KEYS naming each
approver's public key, only approvals signed with that key count.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from runner.errors import ConfigError
from runner.jobs import Job
from runner.ledger.guards import Approval
from runner.money import format_amount

APPROVAL_VERSION = "topup-runner approval v1"
_LISTED = 5  # approvers named in a line


def job_total(job: Job) -> Decimal:
    return sum((r.amount for r in job.rows), Decimal(0))


def approval_digest(job: Job, target: str, run_key: str) -> str:
    """sha256 of what an approval is of: the rows' canonical digest (cards, amounts,
    references), the provider and API root, the run key, the row count, the total and the
    currency. Change any and the approval no longer matches."""
    payload = [
        APPROVAL_VERSION,
        job.content_digest,
        target,
        run_key,
        len(job.rows),
        format_amount(job_total(job)),
        job.currency or "",
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid-{os.getuid()}"


def person(name: str) -> str:
    """A name as people are told apart: trimmed, case and inner spaces folded."""
    return " ".join(name.split()).casefold()


def signed_text(a: Approval) -> bytes:
    """What an approver's key signs: the digest, the name, when and until when."""
    from runner.ledger.statements import iso

    fields = [APPROVAL_VERSION, a.digest, a.approver, iso(a.approved_at), iso(a.expires_at)]
    return "\n".join(str(f) for f in fields).encode()


def sign(approval: Approval, key_file: Path) -> Approval:
    """`approval` signed with the Ed25519 private key (PEM) in `key_file`."""
    from dataclasses import replace

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = key_file.expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"--key-file {key_file}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"--key-file {key_file}: not an unencrypted PEM private key ({exc})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"--key-file {key_file}: the key is not an Ed25519 key")
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    signed = replace(approval, public_key=public.hex())
    return replace(signed, signature=key.sign(signed_text(signed)).hex())


def signature_holds(a: Approval) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if a.public_key is None or a.signature is None:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(a.public_key))
        key.verify(bytes.fromhex(a.signature), signed_text(a))
    except (ValueError, InvalidSignature):
        return False
    return True


def trusted_keys(env: Mapping[str, str]) -> dict[str, str] | None:
    """TOPUP_APPROVER_KEYS: a file of `NAME PUBLIC_KEY_HEX` lines (# comments), or None."""
    where = env.get("TOPUP_APPROVER_KEYS", "").strip()
    if not where:
        return None
    try:
        text = Path(where).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"TOPUP_APPROVER_KEYS: {where}: {exc}") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, key = line.rpartition(" ")
        if not name.strip() or len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ConfigError(f"TOPUP_APPROVER_KEYS: {where}: line {number}: want NAME HEXKEY")
        keys[person(name)] = key
    return keys


@dataclass(slots=True)
class Standing:
    """Where this exact job stands: the approvals that count, and why others do not."""

    digest: str
    counted: list[Approval] = field(default_factory=list)
    not_counted: list[str] = field(default_factory=list)  # one reason a line

    def approvers(self) -> str:
        shown = [
            f"{a.approver} (until {a.expires_at:%Y-%m-%d %H:%M} UTC)"
            for a in self.counted[:_LISTED]
        ]
        more = len(self.counted) - _LISTED
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def judge(
    approvals: Sequence[Approval],
    digest: str,
    runner: str | None,
    now: datetime,
    keys: Mapping[str, str] | None = None,
) -> Standing:
    """The approvals of `digest` that count: unexpired, unrevoked, one per person, not the
    runner's (`runner`: None for `check`, which runs nothing), signed where keys are named."""
    standing = Standing(digest)
    seen: set[str] = set()
    voided: set[str] = set()
    for a in reversed(approvals):  # newest first: a person's latest approval speaks
        who = person(a.approver)
        if a.digest != digest:
            if a.revoked_at is None and who not in voided and who not in seen:
                voided.add(who)
                standing.not_counted.append(
                    f"the approval by {a.approver} of {a.approved_at:%Y-%m-%d %H:%M} UTC was "
                    f"for other content ({a.row_count} rows, total {format_amount(a.total)}, "
                    f"{a.target}, run key {a.run_key}): a card, an amount, the provider or "
                    "the target changed since, which voids it"
                )
            continue
        if who in seen:
            continue
        if a.revoked_at is not None:
            seen.add(who)
            standing.not_counted.append(f"the approval by {a.approver} was revoked")
        elif a.expires_at <= now:
            seen.add(who)
            standing.not_counted.append(
                f"the approval by {a.approver} expired {a.expires_at:%Y-%m-%d %H:%M} UTC"
            )
        elif a.signature is not None and not signature_holds(a):
            standing.not_counted.append(
                f"the approval by {a.approver} has a signature that does not verify"
            )
        elif keys is not None and (keys.get(who) != a.public_key or not signature_holds(a)):
            standing.not_counted.append(
                f"the approval by {a.approver} is not signed with the key "
                "TOPUP_APPROVER_KEYS names for them"
            )
        elif runner is not None and who == person(runner):
            seen.add(who)
            standing.not_counted.append(
                f"{a.approver} runs the job: their own approval does not count"
            )
        else:
            seen.add(who)
            standing.counted.append(a)
    standing.counted.reverse()
    return standing


def approval_problems(standing: Standing, required: int, runner: str) -> list[str]:
    """Why the job may not run (one line a reason), or [] if enough people approved it."""
    if len(standing.counted) >= required:
        return []
    have = f"{len(standing.counted)}: {standing.approvers()}" if standing.counted else "none"
    problems = [
        f"this job needs {required} approval(s) by people other than {runner} (who runs it) "
        f"of its exact content (digest {standing.digest[:16]}); it has {have}: "
        "`topup-runner approve JOB --by NAME` with the same provider, target and run key"
    ]
    return problems + standing.not_counted[:20]


def new_approval(
    job: Job,
    target: str,
    run_key: str,
    approver: str,
    now: datetime,
    lifetime: float,
    snapshot: dict[str, str | None],
) -> Approval:
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as the ledger keeps it
    return Approval(
        digest=approval_digest(job, target, run_key),
        approver=approver,
        os_user=os_user(),
        approved_at=now,
        expires_at=now + timedelta(seconds=lifetime),
        revoked_at=None,
        run_key=run_key,
        target=target,
        job_file=str(job.path.resolve()),
        row_count=len(job.rows),
        total=job_total(job),
        snapshot=dict(snapshot),
    )
