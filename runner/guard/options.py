"""The guardrails' settings as flags, `TOPUP_*` variables and job `settings:` give them: how
each is read (durations, amounts, names) and what makes one invalid. `runner.config` merges
them with the others and validates them once."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import click

from runner.errors import ConfigError

DAY = 86_400.0
DEFAULT_REPEAT_WINDOW = 7 * DAY
DEFAULT_APPROVAL_LIFETIME = 7 * DAY
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
# The periods a recurring job may name by a word.
_PERIODS = {"hourly": 3600.0, "daily": DAY, "weekly": 7 * DAY, "monthly": 28 * DAY}
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,100}")


def parse_duration(value: object) -> float:
    """Seconds from `7d`, `12h`, `30m`, `90s`, `2w`, or `0`; a bare number other than 0 is
    refused, as its unit would be a guess."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 7d, 12h or 0")
    text = str(value).strip().lower()
    if text in ("0", "0.0", "off"):
        return 0.0
    found = _DURATION.fullmatch(text)
    if found is None:
        raise ValueError("expected a duration with a unit: 7d, 12h, 30m, 90s, 2w (or 0)")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_period(value: object) -> float | None:
    """A recurring job's period: hourly, daily, weekly, monthly, or a duration; none/off."""
    text = str(value).strip().lower()
    if text in ("", "none", "off", "false", "no"):
        return None
    seconds = _PERIODS.get(text)
    if seconds is None:
        seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("a recurring job's period must be longer than 0")
    return seconds


def show_duration(seconds: float) -> str:
    """`7d`, `12h`, `90s`: the largest unit that divides the duration."""
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _cap(value: object) -> Decimal:
    if isinstance(value, bool | float):
        raise ValueError("write the amount as a plain decimal, e.g. '10000.00'")
    try:
        amount = Decimal(str(value).strip().replace(",", ""))
    except InvalidOperation:
        raise ValueError("expected an amount such as 10000.00") from None
    if not amount.is_finite() or amount <= 0 or amount.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ValueError("expected an amount above 0 with at most two decimals")
    return amount


def _count(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a number of approvals")
    return int(str(value).strip())


def _name(value: object) -> str | None:
    text = str(value).strip()
    return text or None


def _keys(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(k for k in (str(item).strip() for item in items) if k)


def flag(value: object) -> bool:
    """A yes/no setting as flags, TOPUP_* and job settings give it (config's too)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


GUARD_CONVERT: Mapping[str, Callable[[object], Any]] = {
    "require_approval": _count,
    "by": _name,
    "repeat_window": parse_duration,
    "allow_repeat_of": _keys,
    "recurring": parse_period,
    "max_total": _cap,
    "max_row": _cap,
    "yes": flag,
}
# Settings a job file may not choose: who runs it (the runner's own approval must not count),
# which earlier run it may repeat, and whether the terminal is asked.
GUARD_OPERATOR_ONLY = {
    "by": "it names who runs the job, whose own approval does not count",
    "allow_repeat_of": "it lets the job pay again what another run paid",
    "repeat_window": "it sets how far back the job may not pay again what another run paid",
    "yes": "it skips the confirmation the operator is asked for",
}


class GuardSettings(Protocol):
    @property
    def require_approval(self) -> int: ...
    @property
    def by(self) -> str | None: ...
    @property
    def repeat_window(self) -> float: ...


def check_guard_settings(settings: GuardSettings) -> None:
    """ConfigError (exit 2) for a guard setting no run can use."""
    if not 0 <= settings.require_approval <= 20:
        raise ConfigError("require-approval: must be a number of approvals from 0 to 20")
    if settings.by is not None and not _NAME.fullmatch(settings.by):
        raise ConfigError("by: must be a name of 1-100 characters without control characters")
    if not 0 <= settings.repeat_window <= 366 * DAY:
        raise ConfigError("repeat-window: must be from 0 (off) to 366d")


def guard_options(func: Any) -> Any:
    """The guardrails' options of `run`; each also from TOPUP_* and the job's settings."""
    options = [
        click.option("--require-approval", metavar="N",
                     help="Refuse unless N other people approved this exact job. [default: 0]"),
        click.option("--by", metavar="NAME",
                     help="Who runs it (default: the OS user): their approval does not count."),
        click.option("--repeat-window", metavar="DURATION",
                     help="Refuse rows another run key paid this recently; 0: off. [default: 7d]"),
        click.option("--allow-repeat-of", metavar="RUN_KEY", multiple=True,
                     help="An earlier run whose rows this one may pay again (repeatable)."),
        click.option("--max-total", metavar="AMOUNT", help="Refuse a job whose total is above."),
        click.option("--max-row", metavar="AMOUNT", help="Refuse a job with a row above."),
        click.option("--yes", is_flag=True, default=None,
                     help="Do not ask for confirmation on a terminal."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func
