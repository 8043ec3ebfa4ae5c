"""What the commands tell the operator about runs: the lines that end a run (what it did, where
its report and its ledger are), and the runs a ledger holds, sandbox runs labelled as such."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.config import Settings, sandbox_ledger_path
from runner.domain import RowStatus
from runner.ledger import is_postgres_url, open_ledger, redact
from runner.ledger.chain import HMAC_SHA256, parse_head

if TYPE_CHECKING:
    from runner.run import RunResult


def summary(
    settings: Settings, result: RunResult, env: Mapping[str, str], cwd: Path
) -> tuple[list[str], dict[str, Any]]:
    """The end-of-run lines for a console, and the fields of the `run.summary` JSON object."""
    from runner.run import default_ledger_path

    ledger = settings.ledger or str(default_ledger_path(env))
    if is_postgres_url(ledger):
        ledger = redact(ledger)
    else:
        ledger = str(Path(ledger).expanduser().absolute())
    report = result.report.absolute()
    counts = ", ".join(f"{n} {s.value}" for s, n in result.counts.items() if n)
    label = "SANDBOX run (no real money moved)" if settings.is_sandbox else f"{result.provider} run"
    lines = [
        f"{label} {result.run_key}",
        f"{sum(result.counts.values())} rows: {counts}",
        f"{result.sent} topups sent by this process"
        + (f"; stopped: {result.stopped}" if result.stopped else ""),
    ]
    if result.sent == 0 and result.exit_code == 0 and not result.stopped:
        lines += [
            "every row was done by an earlier run of this job: nothing was sent again",
            "(a new payroll needs a new file, or a new --run-key)",
        ]
    if result.audit is not None:
        lines.append(f"audit: {result.audit}")
    lines += [f"report: {report}", f"ledger: {ledger}"]
    lines += chain_lines(result.chain_head)
    if settings.is_sandbox and ledger == str(sandbox_ledger_path(cwd)):
        lines.append("(sandbox runs are kept there: `topup-runner status` here lists them)")
    fields: dict[str, Any] = {
        "provider": result.provider,
        "sandbox": settings.is_sandbox,
        "run_key": result.run_key,
        "rows": {s.value: n for s, n in result.counts.items()},
        "sent": result.sent,
        "report": str(report),
        "ledger": ledger,
        "exit_code": result.exit_code,
        "chain_head": result.chain_head,
    }
    if result.audit_ok is not None:
        fields["audit_ok"] = result.audit_ok
    return lines, fields


def chain_lines(head: str | None) -> list[str]:
    """The run's hash-chain head, the anchor `verify` holds a ledger to, in 80 columns."""
    parsed = None if head is None else parse_head(head)
    if parsed is None:
        return ["ledger chain: unchained (a run begun before ledger schema 3)"]
    algo, seq, hash_ = parsed
    keyed = "keyed" if algo == HMAC_SHA256 else "unkeyed"
    return [f"ledger chain: {seq} records, {algo} ({keyed}), head:", f"  {hash_}"]


def runs_lines(where: Path | str, *, heading: bool) -> list[str]:
    """The runs the ledger at `where` holds, one line each; read-only, so an auditor's copy or
    a read-only mount will do. No ledger there yet: no runs, not an error."""
    if isinstance(where, Path) and not where.exists():
        return [f"no ledger at {where}"]
    book = open_ledger(where, readonly=True)
    try:
        runs = book.overview()
        heads = {run.run_key: book.chain_head(run.run_key) for run in runs}
    finally:
        book.close()
    lines = [f"ledger {redact(str(where))}:"] if heading else []
    if not runs:
        lines.append(f"no runs in {redact(str(where))}")
    for run in runs:
        counts = " ".join(f"{s.value}={run.by_status.get(s.value, 0)}" for s in RowStatus)
        state = "finished" if run.finished_at else "open"
        provider = "SANDBOX" if run.provider == "sandbox" else run.provider
        lines.append(
            f"{run.run_key}  {provider}  {run.row_count} rows  {state}  {counts}  {run.job_file}"
            f"  chain {heads.get(run.run_key) or 'unchained'}"
        )
    return lines


def ledger_with_run(run_key: str, default: Path | str, sandbox: Path) -> Path | str:
    """The default ledger, unless it does not hold `run_key`: then this folder's sandbox one."""
    if isinstance(default, Path) and default.exists():
        book = open_ledger(default, readonly=True)
        try:
            if any(run.run_key == run_key for run in book.overview()):
                return default
        finally:
            book.close()
    elif not isinstance(default, Path):
        return default
    return sandbox
