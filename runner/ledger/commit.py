"""The group commit every ledger writes through, and the thread a SQLite ledger waits on the
disk with.

An intent is committed before its request is sent (`record_intent`, awaited); an outcome or a
row's fields are queued (`post_*`) and go out with the next commit. Writers that arrive
together share one transaction. `GroupCommitLedger` is the base both backends build on: it
owns the queue and the commits, builds the typed writes into statements, and leaves the
transaction itself (`_commit`) to the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from runner.domain import RowStatus
from runner.errors import LedgerError
from runner.ledger.api import Ledger
from runner.ledger.chain import ChainWriter
from runner.ledger.guards import GuardReads
from runner.ledger.reads import LedgerReads
from runner.ledger.statements import (
    Charged,
    Statement,
    attempt_outcome,
    close_untouched_row,
    intent,
    row_finish,
)
from runner.ledger.values import OpenAttempt

R = TypeVar("R")


class _DiskThread:
    """The thread on which the ledger waits for the disk: COMMIT's fsync, a BEGIN that waits
    for another process's write lock.

    One long-lived thread fed through a queue and answering through the event loop's
    call_soon_threadsafe: a commit every dozen topups made anyio.to_thread's capacity
    limiter, worker pool and backend lookups a measurable share of a fast run's CPU.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_DiskJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, func: Callable[..., R], *args: Any) -> R:
        """`func(*args)` on the thread. Cancelling the caller does not abandon the call: it
        still waits for it to end (the connection is not free before), then re-raises."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ledger-disk", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, done, func, args))
        cancelled: BaseException | None = None
        while True:
            try:
                result: R = await asyncio.shield(done)
            except asyncio.CancelledError as exc:
                if done.done():
                    raise
                cancelled = exc
                continue
            if cancelled is not None:
                raise cancelled
            return result

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, done, func, args = job
            try:
                result = func(*args)
            except BaseException as exc:  # handed to the waiting task, raised there
                _call_soon(loop, _settle, done, None, exc)
            else:
                _call_soon(loop, _settle, done, result, None)


_DiskJob = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]
]


def _call_soon(loop: asyncio.AbstractEventLoop, func: Callable[..., None], *args: Any) -> None:
    # A closed loop raises RuntimeError: nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(func, *args)


def _settle(done: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)


class GroupCommitLedger(LedgerReads, GuardReads, Ledger):
    """What both backends share: the group commit, the typed writes, the reads (over the
    backend's `_select`). A backend supplies `_commit`, `_select` and its own opening."""

    # Whether several processes work on one run together (the PostgreSQL ledger).
    shared = False

    def __init__(self, name: str, conn: Any, *, readonly: bool = False) -> None:
        self.name = name  # what messages call the ledger
        # Opened only to read: no run may take it (`lock`), nothing is written (`post`).
        self.readonly = readonly
        self._conn = conn
        self._pending: list[Statement] = []
        self._queued = 0  # statements ever queued
        self._written = 0  # statements ever committed (always a prefix of the queued ones)
        self._committing: asyncio.Event | None = None  # set when the commit under way ends
        self._committing_upto = 0  # the statements it carries: those queued before it began
        self._next: asyncio.Event | None = None  # set when the commit after that one ends
        self._broken: LedgerError | None = None
        # One user of the connection at a time among async callers (asyncio's lock, as the
        # events below: taken at every commit).
        self._conn_lock = asyncio.Lock()
        self._disk = _DiskThread()
        # Extends each run's hash chain in the transaction that writes it (chain.py).
        self._chain = ChainWriter.from_env()

    async def _commit(self, batch: Sequence[Statement]) -> None:
        """`batch` in one transaction, durably; LedgerError if it cannot be."""
        raise NotImplementedError

    def _no_run(self) -> LedgerError:
        """What `lock` raises on a ledger opened read-only."""
        return LedgerError(
            f"ledger {self.name}: opened read-only, so no run may use it: nothing may be "
            "sent on a ledger that cannot record it"
        )

    def _check_postable(self) -> None:
        """Refuse to queue anything on a broken ledger, or on one opened read-only."""
        if self._broken is not None:
            raise self._broken
        if self.readonly:
            raise LedgerError(f"ledger {self.name}: opened read-only: nothing can be written")

    # -- the typed writes ------------------------------------------------------------------

    async def record_intent(self, run_key: str, attempt: OpenAttempt) -> None:
        """Commit that `attempt` is about to be sent, before returning (never only queued)."""
        self.post(
            intent(
                run_key,
                attempt.row,
                attempt.attempt,
                attempt.card_id,
                attempt.amount,
                attempt.before,
                attempt.sent_at,
                settle_by=attempt.settle_by,
            )
        )
        await self.flush()

    def post_outcome(
        self, run_key: str, row: int, attempt: int, outcome: str, detail: str, at: datetime
    ) -> None:
        """Queue how an attempt ended (`outcome`: an AttemptOutcome, stored as its string)."""
        self._check_postable()
        self._pending.append(attempt_outcome(run_key, row, attempt, outcome, detail, at))
        self._queued += 1

    def post_row(
        self,
        run_key: str,
        row: int,
        status: RowStatus,
        at: datetime,
        *,
        error: str | None = None,
        applied: Charged | None = None,
    ) -> None:
        """Queue a row's status, finish time and error (None clears an earlier one), with the
        provider's figures of an `applied` topup."""
        self._check_postable()
        self._pending.append(row_finish(run_key, row, status, at, error, applied))
        self._queued += 1

    def post_close(
        self, run_key: str, row: int, status: RowStatus, error: str, at: datetime | None = None
    ) -> None:
        """Queue giving a row `status` and `error` unless it has left `not_attempted` (on a
        shared ledger, another worker may have finished it meanwhile)."""
        self._check_postable()
        self._pending.append(close_untouched_row(run_key, row, status, error, at))
        self._queued += 1

    # -- the group commit ------------------------------------------------------------------

    async def call(self, func: Callable[..., R], *args: Any) -> R:
        """Run a blocking ledger method off the event loop, one at a time with the writes,
        after everything queued so far is committed (so that it reads what was posted)."""
        await self.flush()
        async with self._conn_lock:
            return await anyio.to_thread.run_sync(func, *args)

    async def write(self, statements: Sequence[Statement]) -> None:
        """Commit `statements` durably before returning; concurrent callers share one
        transaction, which also carries everything posted before."""
        self.post(statements)
        await self.flush()

    def post(self, statements: Sequence[Statement]) -> None:
        """Queue `statements` for the next commit and return at once.

        For records whose loss in a crash the next run recovers from, such as an attempt's
        outcome (the attempt stays open and is reconciled from the provider's state); never
        for an intent. Statements commit in the order they were queued, so a later intent of
        the same row or card is never durable without the outcomes posted before it.
        """
        self._check_postable()
        self._pending.extend(statements)
        self._queued += len(statements)

    async def flush(self) -> None:
        """Return once everything queued so far is committed.

        One commit at a time; whoever finds none under way commits everything pending. A
        caller whose statements are in the commit under way waits for it; one whose
        statements came later needs the next commit: the first such caller waits for the
        current one to end and then makes it, the others wait for that one alone, so that a
        caller wakes once rather than at every commit. A failed commit breaks the ledger for
        good: its statements are lost, so no caller may go on as if they were durable
        (LedgerError from then on).

        asyncio's own events, not anyio's: a writer waits once per topup, and anyio's
        primitives look the running backend and task up on every use.
        """
        target = self._queued
        while self._written < target:
            if self._broken is not None:
                raise self._broken
            if self._committing is None:
                await self._commit_pending()
            elif target <= self._committing_upto:
                await self._committing.wait()
            elif self._next is None:
                self._next = asyncio.Event()
                try:
                    await self._committing.wait()
                except BaseException:
                    self._release_next()  # another waiter makes the next commit
                    raise
            else:
                await self._next.wait()

    def _release_next(self) -> None:
        """Wake the callers waiting for the next commit: one of them will make it."""
        waiting, self._next = self._next, None
        if waiting is not None:
            waiting.set()

    async def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        done = self._committing = self._next or asyncio.Event()
        self._next = None
        self._committing_upto = self._queued
        try:
            # Shielded: a commit cut in half would lose statements others wait on.
            with anyio.CancelScope(shield=True):
                async with self._conn_lock:  # no suspension when it is free
                    await self._commit(batch)
            self._written += len(batch)
        except LedgerError as exc:
            self._broken = exc
            self._release_next()
            raise
        finally:
            self._committing = None
            done.set()
