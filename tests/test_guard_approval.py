"""Approval bound to the job's content (issue 16): `run --require-approval N` sends nothing
unless N other people approved this exact job, judged by the sandbox's own record."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guard import (
    age_sqlite,
    approve,
    cards,
    cli,
    exit_metric,
    job,
    options,
    refusals,
    requests,
    run,
    sandbox,
    topups,
)

pytestmark = pytest.mark.anyio


async def test_without_an_approval_nothing_is_sent(tmp_path: Path) -> None:
    """No approval: exit 3, one line a reason, no request at all, the metrics file says 3."""
    payroll = job(tmp_path, cards(3))
    async with sandbox() as sb:
        done = await run(sb, tmp_path, payroll, "--require-approval", "1", "--by", "bob")
        assert done.code == 3, done.stderr
        assert requests(sb) == 0
    assert any("needs 1 approval" in line for line in refusals(done)), done.stderr
    assert exit_metric(tmp_path) == "3"


async def test_one_approval_by_another_person_runs(tmp_path: Path) -> None:
    """Approved by alice, run by bob: every row is paid."""
    payroll = job(tmp_path, cards(3))
    async with sandbox() as sb:
        given = await approve(sb, tmp_path, payroll, "alice")
        assert given.code == 0, given.stderr
        assert "approved by alice" in given.stdout
        assert topups(sb) == 0
        done = await run(sb, tmp_path, payroll, "--require-approval", "1", "--by", "bob")
        assert done.code == 0, done.stderr
        assert topups(sb) == 3


async def test_the_requirement_comes_from_the_environment_too(tmp_path: Path) -> None:
    """TOPUP_REQUIRE_APPROVAL (a cron entry's) refuses an unapproved job."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        done = await run(sb, tmp_path, payroll, TOPUP_REQUIRE_APPROVAL="1", TOPUP_BY="bob")
        assert done.code == 3, done.stderr
        assert requests(sb) == 0


async def test_the_same_person_approving_twice_is_one_approval(tmp_path: Path) -> None:
    """alice twice (in another spelling too) is one of the two approvals asked for."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await approve(sb, tmp_path, payroll, "alice")).code == 0
        assert (await approve(sb, tmp_path, payroll, " Alice ")).code == 0
        before = requests(sb)
        done = await run(sb, tmp_path, payroll, "--require-approval", "2", "--by", "bob")
        assert done.code == 3, done.stderr
        assert requests(sb) == before
        assert (await approve(sb, tmp_path, payroll, "carol")).code == 0
        done = await run(sb, tmp_path, payroll, "--require-approval", "2", "--by", "bob")
        assert done.code == 0, done.stderr
        assert topups(sb) == 2


async def test_the_runners_own_approval_does_not_count(tmp_path: Path) -> None:
    """bob approves and runs: refused; --by else the OS user names who runs it."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await approve(sb, tmp_path, payroll, "bob")).code == 0
        before = requests(sb)  # approve's preflight read the wallet and cards
        done = await run(sb, tmp_path, payroll, "--require-approval", "1", "--by", "BOB")
        assert done.code == 3, done.stderr
        assert any("bob runs the job" in line for line in refusals(done)), done.stderr
        assert requests(sb) == before


@pytest.mark.parametrize("change", ["amount", "card", "provider"])
async def test_a_change_voids_the_approval(tmp_path: Path, change: str) -> None:
    """One amount, one card, or the provider changed after approval: exit 3, nothing sent."""
    ids = cards(3)
    payroll = job(tmp_path, ids)
    async with sandbox() as sb:
        if change == "provider":
            sandboxed = ["--provider", "sandbox", "--ledger", str(tmp_path / "ledger.sqlite")]
            given = await cli("approve", str(payroll), "--by", "alice", *sandboxed, cwd=tmp_path)
        else:
            given = await approve(sb, tmp_path, payroll, "alice")
        assert given.code == 0, given.stderr
        if change == "amount":
            job(tmp_path, ids, ["10.00", "11.00", "12.01"])
        elif change == "card":
            job(tmp_path, [*ids[:2], cards(1)[0]])
        before = requests(sb)
        done = await run(sb, tmp_path, payroll, "--require-approval", "1", "--by", "bob")
        assert done.code == 3, done.stderr
        assert requests(sb) == before
        assert topups(sb) == 0
    if change != "provider":
        assert any("voids it" in line for line in refusals(done)), done.stderr


async def test_an_expired_approval_does_not_count(tmp_path: Path) -> None:
    """An approval past its expiry (moved 8 days back: the default is 7): exit 3."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await approve(sb, tmp_path, payroll, "alice")).code == 0
        for column in ("approved_at", "expires_at"):
            age_sqlite(tmp_path / "ledger.sqlite", "approvals", column, 8)
        before = requests(sb)
        done = await run(sb, tmp_path, payroll, "--require-approval", "1", "--by", "bob")
        assert done.code == 3, done.stderr
        assert any("expired" in line for line in refusals(done)), done.stderr
        assert requests(sb) == before


async def test_a_revoked_approval_does_not_count(tmp_path: Path) -> None:
    """approve --revoke withdraws it: exit 3, nothing sent; `check` says so."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await approve(sb, tmp_path, payroll, "alice")).code == 0
        checked = await cli("check", str(payroll), *options(sb, tmp_path), cwd=tmp_path)
        assert "approval: approved by alice (until" in checked.stdout, checked.stdout
        revoked = await approve(sb, tmp_path, payroll, "alice", "--revoke")
        assert revoked.code == 0, revoked.stderr
        before = requests(sb)
        done = await run(sb, tmp_path, payroll, "--require-approval", "1", "--by", "bob")
        assert done.code == 3, done.stderr
        assert any("revoked" in line for line in refusals(done)), done.stderr
        assert requests(sb) == before
        checked = await cli("check", str(payroll), *options(sb, tmp_path), cwd=tmp_path)
        assert "approval: not approved" in checked.stdout, checked.stdout


async def test_a_signed_approval_counts_only_with_the_named_key(tmp_path: Path) -> None:
    """With TOPUP_APPROVER_KEYS, only an approval signed with the approver's key counts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "alice.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    trusted = tmp_path / "approvers"
    trusted.write_text(f"alice {public.hex()}\n", encoding="utf-8")
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await approve(sb, tmp_path, payroll, "alice")).code == 0  # unsigned
        more = ("--require-approval", "1", "--by", "bob")
        done = await run(sb, tmp_path, payroll, *more, TOPUP_APPROVER_KEYS=str(trusted))
        assert done.code == 3, done.stderr
        signed = await approve(sb, tmp_path, payroll, "alice", "--key-file", str(pem))
        assert signed.code == 0, signed.stderr
        done = await run(sb, tmp_path, payroll, *more, TOPUP_APPROVER_KEYS=str(trusted))
        assert done.code == 0, done.stderr
        assert topups(sb) == 2


@pytest.mark.postgres
async def test_an_approval_on_the_shared_ledger_is_honoured_by_another_process(
    pg_url: str, tmp_path: Path
) -> None:
    """approve in one process, run in another, both on PostgreSQL: the job runs; unapproved
    before, it was refused."""
    payroll = job(tmp_path, cards(3))
    async with sandbox() as sb:
        more = ("--require-approval", "1", "--by", "bob")
        done = await run(sb, tmp_path, payroll, *more, ledger=pg_url)
        assert done.code == 3, done.stderr
        assert requests(sb) == 0
        given = await approve(sb, tmp_path, payroll, "alice", ledger=pg_url)
        assert given.code == 0, given.stderr
        done = await run(sb, tmp_path, payroll, *more, ledger=pg_url)
        assert done.code == 0, done.stderr
        assert topups(sb) == 3
