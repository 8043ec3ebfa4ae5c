"""The durable record of every run, row and attempt: what makes a run resumable.

`open_ledger(where)` gives a `Ledger` (the typed API, `api.py`): on SQLite for a path
(`sqlite.py`; its file in `files.py`, its schema in `schema.py`), on PostgreSQL for a URL
(`postgres.py`, imported only then; card leases and shared rate slots in `leases.py`). Both
write through one group commit (`commit.py`) the statements of `statements.py`, and share
their reads (`reads.py`). The values they take and give are in `values.py`.

`open_ledger(where, readonly=True)` is for commands that only read (status, report, check):
it refuses what a writable open refuses, but never creates, stamps, migrates or locks, and
works where nothing may be written, a read-only mount included (`files.connect_readonly`
says how; PostgreSQL: a read-only session).

Importing this package loads no database driver, no pandas, no aiohttp, no provider code.
"""

from __future__ import annotations

from pathlib import Path

from runner.ledger.api import Ledger, SharedLedger
from runner.ledger.files import RunLock
from runner.ledger.location import URL_SCHEMES, is_postgres_url, redact
from runner.ledger.reads import RECORD_COLUMNS, row_record
from runner.ledger.schema import APPLICATION_ID, SCHEMA_VERSION
from runner.ledger.sqlite import SqliteLedger
from runner.ledger.statements import Charged, Statement
from runner.ledger.values import (
    AttemptEntry,
    CardsLeft,
    CardWork,
    OpenAttempt,
    PendingRow,
    ProviderEvent,
    RowProgress,
    RunFacts,
    RunOverview,
    RunSpec,
    utcnow,
)

__all__ = [
    "APPLICATION_ID",
    "RECORD_COLUMNS",
    "SCHEMA_VERSION",
    "URL_SCHEMES",
    "AttemptEntry",
    "CardWork",
    "CardsLeft",
    "Charged",
    "Ledger",
    "OpenAttempt",
    "PendingRow",
    "ProviderEvent",
    "RowProgress",
    "RunFacts",
    "RunLock",
    "RunOverview",
    "RunSpec",
    "SharedLedger",
    "SqliteLedger",
    "Statement",
    "is_postgres_url",
    "open_ledger",
    "redact",
    "row_record",
    "utcnow",
]


def open_ledger(where: str | Path, *, readonly: bool = False) -> Ledger:
    """The ledger at `where`: a `postgresql://` URL (shared by workers) or a SQLite path;
    `readonly` for commands that only read it (see `SqliteLedger.open`). The PostgreSQL
    ledger (and its driver) is imported only when asked for."""
    if is_postgres_url(str(where)):
        from runner.ledger.postgres import PostgresLedger

        return PostgresLedger.open(str(where), readonly=readonly)
    return SqliteLedger.open(where, readonly=readonly)
