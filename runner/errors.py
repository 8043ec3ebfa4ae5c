"""The runner's exceptions: one root, each carrying the exit code the contract gives it.

    RunnerError (exit 1)
    ├── JobInvalid (exit 2)          the job file: every problem with file, row and column
    ├── ConfigError (exit 2)         options, environment, settings
    ├── PreflightRefused (exit 3)    the provider cannot take the job as it stands
    │   └── GuardRefused             a guardrail (approval, repeat, cap, confirmation) said no
    ├── LedgerLocked (exit 75)       another process holds this run key
    ├── LedgerError (exit 2)         the ledger file cannot be used
    │   └── LeaseLost                a worker of a shared run can no longer prove its cards
    ├── ProviderError (exit 1)       the provider cannot be used at all (not one row's outcome)
    │   ├── AuthenticationFailed (exit 2)
    │   │   └── AccessTokenRejected  Alix answered 401: refused at the door, nothing applied
    │   └── NotDocumented            the provider documents no endpoint for an operation
    ├── ProviderUnavailable (exit 69) a ProviderError met before this process sent a topup
    ├── WebhookRejected (exit 1)     a webhook that must change nothing (forged, malformed)
    └── RunStopped (exit 1)          any of the above after topups were sent: never exit 2 then

Exit 2, 3, 69 and 75 promise that nothing was sent. Once a run has sent a topup, whatever stops
it is raised as `RunStopped` (exit 1), which carries the error that stopped it as `cause`.

A single row's refusal, retry or unknown outcome is *not* an exception: it is a value of
`runner.providers.base.Outcome`. Exceptions here stop a command; the CLI catches only
`RunnerError`, prints its one-line message and exits with `exit_code`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class RunnerError(Exception):
    """Root of everything the runner raises on purpose."""

    exit_code: int = 1


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a job file, located as precisely as the file allows."""

    file: str
    message: str
    row: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{', '.join(where)}: {self.message}"


class JobInvalid(RunnerError):
    """The job file cannot be run; `problems` lists every problem found (up to a cap)."""

    exit_code = 2

    def __init__(self, problems: Sequence[Problem], truncated: int = 0) -> None:
        self.problems = tuple(problems)
        self.truncated = truncated
        first = str(self.problems[0]) if self.problems else "invalid job"
        more = len(self.problems) - 1 + truncated
        suffix = f" (and {more} more problem{'s' if more != 1 else ''})" if more else ""
        super().__init__(first + suffix)


class ConfigError(RunnerError):
    """An option, environment variable or setting is invalid."""

    exit_code = 2


class OutputRefused(ConfigError):
    """A file the run would write at its end cannot be written, or would write over what
    must be kept; `options` names the options whose files these are."""

    def __init__(self, message: str, *options: str) -> None:
        super().__init__(message)
        self.options = options


class PreflightRefused(RunnerError):
    """The provider's state (wallet, cards, limits) cannot take the job: nothing was sent."""

    exit_code = 3

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = tuple(problems)
        super().__init__(message)


class GuardRefused(PreflightRefused):
    """A guardrail refused the job before anything was sent (runner.guard): `problems`,
    one line a reason, each printed on its own line."""

    def __init__(self, problems: Sequence[str]) -> None:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        super().__init__(f"refused before anything was sent: {shown}", problems)


class LedgerLocked(RunnerError):
    """Another process holds the ledger's lock for this run key."""

    exit_code = 75


class LedgerError(RunnerError):
    """The ledger cannot be opened or does not hold what was asked for."""

    exit_code = 2


class ProviderError(RunnerError):
    """The provider cannot be used at all: unreachable, or answering nonsense to every call.

    `provider`, `card_id` and `status` (the HTTP status) say where, when the raiser knows."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        card_id: str | None = None,
        status: int | None = None,
    ) -> None:
        self.provider = provider
        self.card_id = card_id
        self.status = status
        super().__init__(message)


class AuthenticationFailed(ProviderError):
    """The provider refused our credentials; nothing can be sent with them."""

    exit_code = 2


class LeaseLost(LedgerError):
    """This worker can no longer prove it holds its cards: it must not send."""


class AccessTokenRejected(AuthenticationFailed):
    """Alix answered 401: the request was refused at the door, nothing was applied."""


class NotDocumented(ProviderError):
    """The provider documents no endpoint for this operation; the caller must do without it."""

    def __init__(self, operation: str, provider: str = "Alix") -> None:
        self.operation = operation
        super().__init__(f"{provider} documents no {operation} endpoint", provider=provider)


class ProviderUnavailable(RunnerError):
    """The provider could not be used (unreachable: refused, DNS, TLS, timeouts; or answering
    nonsense) before this process sent a single topup: sysexits' EX_UNAVAILABLE, not the
    "rows failed" of exit 1. Made only by `as_nothing_sent`, for `run` and `check`, which know
    nothing was sent; `cause` is the ProviderError."""

    exit_code = 69

    def __init__(self, cause: ProviderError) -> None:
        self.cause = cause
        super().__init__(f"{cause}: the provider cannot be used, nothing was sent")


def as_nothing_sent(error: RunnerError) -> RunnerError:
    """The error to exit with when this process sent no topup: a provider that cannot be
    used is ProviderUnavailable (69), not the "rows failed" of a ProviderError's 1; any
    other error stands."""
    if isinstance(error, ProviderError) and error.exit_code == ProviderError.exit_code:
        return ProviderUnavailable(error)
    return error


class WebhookRejected(RunnerError):
    """A webhook that must change nothing: forged, malformed or not a TopupCard event."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"webhook rejected: {reason}")


class RunStopped(RunnerError):
    """A run stopped on an error after it had sent topups: the contract's exit 1, not the
    "nothing was sent" of the error's own code. `cause` is the error, `sent` the topups this
    process sent, `run_key` the run to resume."""

    exit_code = 1

    def __init__(self, cause: RunnerError, *, sent: int, run_key: str) -> None:
        self.cause = cause
        self.sent = sent
        self.run_key = run_key
        super().__init__(
            f"{cause} (the run stopped after {sent} topup(s) were sent: rerun the same "
            f"command, or --run-key {run_key}, to resume it; nothing is paid twice)"
        )


# Which of several RunnerErrors raised together (a task group's) is reported: the one whose
# exit code comes first here. A configuration, job or credentials error (2) is the cause
# the operator must fix and proves nothing was sent; then a held lock (75), a preflight
# refusal (3), a provider out of reach before sending (69), and last a provider failing (1),
# often only the echo of the first in the other tasks. Within one code the most derived
# class wins (AuthenticationFailed over ProviderError), then the first found.
EXIT_CODE_RANK = (2, 75, 3, 69, 1)


def most_telling(errors: Sequence[RunnerError]) -> RunnerError:
    """The one of several runner errors raised together that a command reports."""

    def rank(exc: RunnerError) -> tuple[int, int]:
        code = exc.exit_code
        order = EXIT_CODE_RANK.index(code) if code in EXIT_CODE_RANK else len(EXIT_CODE_RANK)
        return order, -len(type(exc).__mro__)

    return min(errors, key=rank)  # min keeps the first of equals


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in `group` and its nested groups, depth first."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def runner_error_of(exc: BaseException) -> RunnerError | None:
    """`exc` as the one RunnerError it stands for: itself, or the most telling of a group
    made of runner errors only; None for anything else (a bug, an interrupt)."""
    if isinstance(exc, RunnerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = leaves(exc)
        if found and all(isinstance(leaf, RunnerError) for leaf in found):
            return most_telling([leaf for leaf in found if isinstance(leaf, RunnerError)])
    return None
