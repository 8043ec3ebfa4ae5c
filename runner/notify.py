"""Notifications when a run ends, is refused or fails, sent through Apprise to the URLs the
operator named; best effort, bounded in time, never the run's outcome, secrets never shown."""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from runner.domain import RowStatus
from runner.errors import ConfigError
from runner.metrics import RunEnd, StatusTotals
from runner.money import format_amount

# How long the end of a run waits for its notifications, all targets together (seconds): a
# receiver that hangs is abandoned (its thread is a daemon), the exit is not held up.
DEADLINE = 5.0
# An Apprise URL: a scheme, "://", then anything but whitespace.
_TARGET = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}://\S+")
# TOPUP_NOTIFY holds several URLs apart by whitespace, or by a comma that a new URL follows (a
# comma inside one URL, as in a list of mail recipients, stays).
_BETWEEN = re.compile(r"\s+|,\s*(?=[A-Za-z][A-Za-z0-9+.-]{0,31}://)")
# Apprise schemes whose host part is a server's name or address, not a token: shown in logs.
_HOST_IS_A_SERVER = frozenset(
    ("json", "jsons", "xml", "xmls", "form", "forms", "mailto", "mailtos", "gotify", "gotifys")
)
# What each exit code says about the run, in the contract's words.
_MEANINGS = {
    0: "every row succeeded or is pending",
    1: "rows failed, need review or were not attempted; or the run stopped after sending",
    2: "the job or the configuration is invalid: nothing was sent",
    3: "preflight refused the job: nothing was sent",
    69: "the provider could not be used: nothing was sent",
    75: "another process holds this run key: nothing was sent",
    130: "interrupted",
}


def describe(url: str) -> str:
    """`url` as logs may show it: the scheme, and the host only where the scheme's host is a
    server (json://host...). Never a user, password, path or query; and not the host of
    schemes that keep a token there (tgram://bottoken/..., slack://TokenA/...)."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in _HOST_IS_A_SERVER:
        return f"{scheme}://…"
    try:
        parts = urlsplit(f"x://{rest}")
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None and host else ""
    except ValueError:
        host = port = ""
    return f"{scheme}://{host}{port}" if host else f"{scheme}://…"


def _named(position: int, url: str) -> str:
    return f"target {position} ({describe(url)})"


def notify_targets(value: object) -> tuple[str, ...]:
    """The notification URLs in `value` (one string of several, or a sequence of strings);
    ValueError naming only the scheme and host of one that is not a URL."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        raise ValueError("expected notification URLs")
    found: list[str] = []
    for item in items:
        for url in _BETWEEN.split(str(item).strip()):
            if not url:
                continue
            if not _TARGET.fullmatch(url):
                raise ValueError(
                    f"{describe(url) if '://' in url else 'a value'} is not a notification "
                    "URL (scheme://..., as Apprise writes them)"
                )
            if url not in found:
                found.append(url)
    return tuple(found)


def same_targets(first: object, second: object) -> bool:
    """Whether two values name the same notification URLs, in any order."""
    try:
        return set(notify_targets(first)) == set(notify_targets(second))
    except ValueError:
        return False


def _apprise() -> ModuleType:
    """Apprise, loaded the first time a notification is due: its plugins cost a few tenths of
    a second, paid only by runs that notify. Its own logs are silenced (they print URLs with
    their paths and passwords), and it is given no plugin folders and no persistent storage,
    so it reads and writes nothing in the home directory."""
    for name in ("apprise", "urllib3"):
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.setLevel(logging.CRITICAL + 1)
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
    with warnings.catch_warnings():
        # A dependency's deprecation (Apprise's e-mail plugin imports imghdr) is not ours.
        warnings.simplefilter("ignore")
        import apprise
        import urllib3

        urllib3.disable_warnings()
    return apprise


def _instances(urls: Sequence[str], deadline: float) -> tuple[list[tuple[str, Any]], list[str]]:
    """Apprise's sender for each URL (with the name logs show it by), and a line for each
    URL it does not take."""
    apprise = _apprise()
    asset = apprise.AppriseAsset(plugin_paths=[], storage_mode="memory", async_mode=False)
    senders: list[tuple[str, Any]] = []
    refused: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for position, url in enumerate(urls, 1):
            try:
                sender = apprise.Apprise.instantiate(url, asset=asset)
            except Exception:  # an Apprise bug on a strange URL: that target only
                sender = None
            if sender is None:
                refused.append(f"{_named(position, url)}: not a URL Apprise can send to")
                continue
            # A receiver that hangs is let go at the deadline: its sockets need not outlive it.
            sender.socket_connect_timeout = min(sender.socket_connect_timeout, deadline)
            sender.socket_read_timeout = min(sender.socket_read_timeout, deadline)
            senders.append((_named(position, url), sender))
    return senders, refused


def check_targets(urls: Sequence[str]) -> tuple[str, ...]:
    """`urls` if Apprise takes every one, else ConfigError (exit 2, before anything is sent)."""
    if not urls:
        return ()
    _, refused = _instances(urls, DEADLINE)
    if refused:
        raise ConfigError(f"notify: {'; '.join(refused)}")
    return tuple(urls)


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification: a title, Apprise's type (success, warning, failure) and a body of
    `name: value` lines that a person reads and a JSON receiver can split."""

    title: str
    kind: str
    fields: tuple[tuple[str, str], ...]

    @property
    def body(self) -> str:
        return "\n".join(f"{name}: {value}" for name, value in self.fields)


def _sum(totals: Iterable[StatusTotals], what: str) -> Decimal:
    return sum((getattr(t, what) for t in totals), Decimal(0))


def notice_of(end: RunEnd, exit_code: int) -> Notice:
    """What to tell about `end`, ended with `exit_code`."""
    sandbox = end.provider == "sandbox"
    provider = "sandbox (no real money moved)" if sandbox else end.provider
    meaning = _MEANINGS.get(exit_code, "the run ended")
    fields: list[tuple[str, str]] = [
        ("exit code", f"{exit_code} ({meaning})"),
        ("provider", provider),
        ("run key", end.run_key or "(none yet)"),
        ("job", end.job),
    ]
    if end.totals is not None:
        totals = end.totals
        rows = " ".join(f"{s.value}={totals.get(s, StatusTotals()).rows}" for s in RowStatus)
        paid = [totals[s] for s in (RowStatus.SUCCEEDED, RowStatus.PENDING) if s in totals]
        fields += [
            ("rows", rows),
            ("amount paid", format_amount(_sum(paid, "amount"))),
            ("fees", format_amount(_sum(paid, "fee"))),
            ("total charged", format_amount(_sum(paid, "total_charged"))),
            ("amount not paid", format_amount(_sum(
                (t for s, t in totals.items() if s not in (RowStatus.SUCCEEDED, RowStatus.PENDING)),
                "amount",
            ))),
        ]  # fmt: skip
    if end.sent is not None:
        fields.append(("topups sent by this process", str(end.sent)))
    if end.makespan is not None:
        fields.append(("makespan (s)", f"{end.makespan:.1f}"))
    if end.report is not None:
        fields.append(("report", str(end.report)))
    if end.stopped:
        fields.append(("stopped", end.stopped))
    if end.error:
        fields.append(("error", end.error))
    if exit_code == 0:
        title, kind = "succeeded", "success"
    elif exit_code in (3, 75, 130):
        title, kind = (
            {3: "refused by preflight", 75: "not started", 130: "interrupted"}[exit_code],
            "warning",
        )
    else:
        title, kind = f"failed (exit {exit_code})", "failure"
    name = f"{'SANDBOX ' if sandbox else ''}{end.provider} run {end.run_key or end.job}"
    return Notice(f"topup-runner: {name} {title}", kind, tuple(fields))


def send_notice(urls: Sequence[str], notice: Notice, deadline: float = DEADLINE) -> list[str]:
    """Send `notice` to every URL at once, waiting at most `deadline` seconds in all; one line
    per target that failed (scheme and host only), never an exception."""
    started = time.monotonic()
    try:
        senders, problems = _instances(urls, deadline)
    except Exception as exc:  # Apprise missing or broken: the run's outcome stands
        return [f"notifications unavailable: {type(exc).__name__}"]
    delivered: dict[int, bool | str] = {}

    def deliver(index: int, sender: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ok = sender.notify(body=notice.body, title=notice.title, notify_type=notice.kind)
            delivered[index] = bool(ok)
        except Exception as exc:  # the message may hold the URL's path: only the type
            delivered[index] = type(exc).__name__

    threads = [
        threading.Thread(target=deliver, args=(n, sender), daemon=True, name="topup-notify")
        for n, (_, sender) in enumerate(senders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + deadline - time.monotonic()))
    for n, (name, _) in enumerate(senders):
        result = delivered.get(n)
        if result is True:
            continue
        why = (
            f"no answer within {deadline:g} s"
            if result is None
            else "refused or unreachable"
            if result is False
            else result
        )
        problems.append(f"{name}: {why}")
    return problems
