"""Settings from flags, the job's `settings:`, and `TOPUP_*` variables, validated once.

Precedence: command line, then environment, then the job file, then the provider's
defaults. The environment beats the job file so that an operator (or a cron entry) can
override a setting without editing a payroll file that may be under review.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from runner.errors import ConfigError
from runner.guard.options import (
    DEFAULT_REPEAT_WINDOW,
    GUARD_CONVERT,
    GUARD_OPERATOR_ONLY,
    check_guard_settings,
    flag,
)
from runner.targets import (
    LOOPBACK_HOST,
    PROVIDERS,
    PUBLIC_BASE_URLS,
    SANDBOX_TARGET,
    normalize_base_url,
    normalize_target,
    target_of,
)

__all__ = [
    "LOOPBACK_HOST",
    "PROVIDERS",
    "PUBLIC_BASE_URLS",
    "SANDBOX_FOLDER",
    "SANDBOX_TARGET",
    "Settings",
    "built_in_default",
    "expand_run_key",
    "keep_ledgers_apart",
    "normalize_base_url",
    "normalize_target",
    "resolve_settings",
    "sandbox_ledger_path",
    "target_of",
]
from runner.notify import notify_targets, same_targets

# Settings a job file may not choose: where the secrets go (base_url), which files are
# written (output, metrics_file), the ledger that makes a run exactly-once, and how long
# a lost answer is given before it is judged not applied (apply_grace), who is told how the
# run went (notify). A job file may give them only as the operator did (flag or environment).
OPERATOR_ONLY = (
    "base_url",
    "metrics_file",
    "ledger",
    "output",
    "apply_grace",
    "notify",
    *GUARD_OPERATOR_ONLY,
)
LOG_FORMATS = ("console", "json")
_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}$")

# What each provider gets when nothing says otherwise. Uncash documents the 120 s cooldown;
# its rate limit is undocumented, so the default is a cautious 5 requests per second. The
# sandbox scales its cooldown down to 2 s so that a first run takes seconds, not minutes.
PROVIDER_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "sandbox": {"cooldown": 2.0, "rate_limit": 20.0, "concurrency": 8},
    "uncash": {"cooldown": 120.0, "rate_limit": 5.0, "concurrency": 4},
    "alix": {"cooldown": 0.0, "rate_limit": 5.0, "concurrency": 4},
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run needs to know besides the job rows and the secrets."""

    provider: str = "sandbox"
    base_url: str | None = None
    output: Path | None = None
    ledger: str | None = None
    run_key: str | None = None
    rate_limit: float | None = 20.0
    cooldown: float = 2.0
    concurrency: int = 8
    max_attempts: int = 5
    timeout: float = 30.0
    log_format: str | None = None
    progress: bool | None = None
    wait_settle: float = 0.0
    allow_partial: bool = False
    metrics_file: Path | None = None
    # Fee as a fraction of the amount, for preflight when the provider gives none in advance.
    fee_rate: Decimal | None = None
    # Seconds a worker of a shared (PostgreSQL) ledger holds its cards without renewing.
    lease: float = 15.0
    # Seconds after a request's timeout during which the provider may still apply it: a lost
    # answer is judged "not applied" only after timeout + apply_grace.
    apply_grace: float = 30.0
    # An extra job column the report's Summary subtotals by (checked against the job).
    group_by: str | None = None
    notify: tuple[str, ...] = ()  # Apprise URLs told when the run ends (runner.notify)
    # Pay a row above the provider's per-topup maximum in chunks (runner.jobs.split).
    split_over_max: bool = False
    # The guardrails before money moves (runner.guard, issue 16).
    require_approval: int = 0  # approvals by others of this exact job
    by: str | None = None  # who runs it (else the OS user)
    repeat_window: float = DEFAULT_REPEAT_WINDOW  # seconds; 0: the repeat guard is off
    allow_repeat_of: tuple[str, ...] = ()  # earlier runs whose rows may be paid again
    recurring: float | None = None  # a recurring job's period in seconds
    max_total: Decimal | None = None
    max_row: Decimal | None = None
    yes: bool = False  # no confirmation on a terminal
    audit: bool = False  # match the run against the provider's books at its end (runner.audit)
    # `--rate-limit auto[:MAX]`: learn the provider's rate from its 429s (runner.rate),
    # starting at `rate_limit` (the provider's cautious default), never above `rate_ceiling`.
    rate_auto: bool = False
    rate_ceiling: float | None = None

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"provider: {self.provider!r} is not one of {', '.join(PROVIDERS)}")
        if self.base_url is not None:
            normalize_base_url(self.base_url)  # refuses what is not a plain http(s) API root
        if self.output is not None and self.output.suffix.lower() not in (".xlsx", ".csv"):
            raise ConfigError(f"output: {self.output} must end in .xlsx or .csv")
        if self.run_key is not None and not _RUN_KEY.match(self.run_key):
            raise ConfigError(
                f"run-key: {self.run_key!r} must be 1-200 letters, digits or ._:@+- "
                "and start with a letter or digit"
            )
        if self.rate_limit is not None and not (
            self.rate_limit > 0 and math.isfinite(self.rate_limit)
        ):
            raise ConfigError("rate-limit: must be a positive number of requests per second")
        if self.rate_ceiling is not None and not (
            self.rate_ceiling > 0 and math.isfinite(self.rate_ceiling)
        ):
            raise ConfigError("rate-limit: auto:MAX needs a positive number of requests per second")
        if self.rate_auto and self.rate_limit is None:
            raise ConfigError("rate-limit: auto needs a starting rate, not unlimited")
        if not (self.cooldown >= 0 and math.isfinite(self.cooldown)):
            raise ConfigError("cooldown: must be zero or a positive number of seconds")
        if self.concurrency < 1:
            raise ConfigError("concurrency: must be at least 1")
        if self.max_attempts < 1:
            raise ConfigError("max-attempts: must be at least 1")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigError("timeout: must be a positive number of seconds")
        if self.log_format is not None and self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log-format: {self.log_format!r} is not console or json")
        if self.fee_rate is not None and not (Decimal(0) <= self.fee_rate < 1):
            raise ConfigError("fee-rate: must be a fraction of the amount, from 0 to below 1")
        if not (self.wait_settle >= 0 and math.isfinite(self.wait_settle)):
            raise ConfigError("wait-settle: must be zero or a positive number of seconds")
        if not (self.lease >= 0.2 and math.isfinite(self.lease)):
            raise ConfigError("lease: must be at least 0.2 seconds")
        if not (self.apply_grace >= 0 and math.isfinite(self.apply_grace)):
            raise ConfigError("apply-grace: must be zero or a positive number of seconds")
        check_guard_settings(self)

    @property
    def is_sandbox(self) -> bool:
        return self.provider == "sandbox"


# Where a sandbox run keeps its ledger unless --ledger or TOPUP_LEDGER names one: in this
# folder of the directory it ran in, beside its report, so that `status` and `report` run there
# find it, and so that it never shares the ledger real runs keep in the per-user state folder.
SANDBOX_FOLDER = ".topup-sandbox"


def sandbox_ledger_path(cwd: Path) -> Path:
    return cwd / SANDBOX_FOLDER / "ledger.sqlite"


def keep_ledgers_apart(provider: str, ledger: str, real_default: Path) -> None:
    """Refuse a sandbox run on the ledger real runs keep by default, and a real provider's run
    on a sandbox ledger: runs that moved money never share a ledger with runs that did not."""
    if ledger.startswith(_DATABASE_URLS):
        return  # a shared ledger refuses the sandbox on its own (it lives in one process)
    path = Path(ledger).expanduser().absolute()
    if provider == "sandbox" and _same_file(path, real_default):
        raise ConfigError(
            f"ledger: {path} is where real runs are recorded: a sandbox run keeps its own "
            f"(leave --ledger out: {SANDBOX_FOLDER}/ledger.sqlite here, or name another file)"
        )
    if provider != "sandbox" and path.parent.name == SANDBOX_FOLDER:
        raise ConfigError(
            f"ledger: {path} is a sandbox ledger ({SANDBOX_FOLDER}/): a {provider} run moves real "
            "money and never shares a ledger with sandbox runs"
        )


def _same_file(first: Path, second: Path) -> bool:
    try:
        return first.resolve() == second.expanduser().resolve()
    except (OSError, RuntimeError):
        return first == second


def built_in_default(name: str) -> str | None:
    """A setting's built-in default as `--help` shows it ("2 sandbox, 120 uncash, 0 alix"
    where the providers differ), or None where there is none to show."""
    per_provider = {p: d[name] for p, d in PROVIDER_DEFAULTS.items() if name in d}
    if per_provider:
        return ", ".join(f"{_plain(value)} {p}" for p, value in per_provider.items())
    value = _FIELD_DEFAULTS.get(name)
    return None if value is None or isinstance(value, bool) else _plain(value)


def _plain(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _number(kind: Callable[[str], Any]) -> Callable[[object], Any]:
    def convert(value: object) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        return kind(str(value).strip())

    return convert


def _fraction(value: object) -> Decimal:
    if isinstance(value, bool | float):
        raise ValueError("write the fee rate as a quoted decimal, e.g. '0.025'")
    result = Decimal(str(value).strip())
    if not result.is_finite():
        raise ValueError("expected a finite decimal")
    return result


@dataclass(frozen=True, slots=True)
class AutoRate:
    """`auto` or `auto:MAX` as given for rate_limit: resolve_settings makes it rate_auto."""

    ceiling: float | None = None


def _optional_rate(value: object) -> float | AutoRate | None:
    text = str(value).strip().lower()
    if text in ("none", "unlimited"):
        return None
    if text == "auto" or text.startswith("auto:"):
        ceiling = text.partition(":")[2].strip()
        if text != "auto" and not ceiling:
            raise ValueError("write auto:MAX with MAX in requests per second, e.g. auto:50")
        return AutoRate(float(_number(float)(ceiling)) if ceiling else None)
    return float(_number(float)(value))


_CONVERT: Mapping[str, Callable[[object], Any]] = {
    "provider": lambda v: str(v).strip().lower(),
    "base_url": lambda v: str(v).strip(),
    "output": lambda v: Path(str(v)).expanduser(),
    "ledger": lambda v: str(v).strip(),
    "run_key": lambda v: str(v).strip(),
    "rate_limit": _optional_rate,
    "cooldown": _number(float),
    "concurrency": _number(int),
    "max_attempts": _number(int),
    "timeout": _number(float),
    "log_format": lambda v: str(v).strip().lower(),
    "progress": flag,
    "wait_settle": _number(float),
    "allow_partial": flag,
    "metrics_file": lambda v: Path(str(v)).expanduser(),
    "fee_rate": _fraction,
    "lease": _number(float),
    "apply_grace": _number(float),
    "group_by": lambda v: str(v).strip() or None,
    "notify": notify_targets,
    "split_over_max": flag,
    **GUARD_CONVERT,
    "audit": flag,
}
# Set through another setting's value (rate_limit: auto), not named by a source themselves.
_DERIVED = ("rate_auto", "rate_ceiling")
SETTING_NAMES = tuple(f.name for f in fields(Settings) if f.name not in _DERIVED)
_FIELD_DEFAULTS: Mapping[str, object] = {f.name: f.default for f in fields(Settings)}


def env_name(setting: str) -> str:
    return "TOPUP_" + setting.upper()


def _convert(name: str, value: object, source: str) -> Any:
    try:
        return _CONVERT[name](value)
    except (ValueError, ArithmeticError) as exc:
        shown = "the value" if name == "notify" else repr(value)  # URLs hold tokens
        raise ConfigError(f"{source}: {shown} is not valid for {name}: {exc}") from None


def resolve_settings(
    cli: Mapping[str, object | None],
    job_settings: Mapping[str, object] | None = None,
    job_provider: str | None = None,
    job_run_key: str | None = None,
    env: Mapping[str, str] | None = None,
    job_file: str = "job",
) -> Settings:
    """Merge the sources by precedence and validate the result once."""
    env = os.environ if env is None else env
    job_values: dict[str, object] = dict(job_settings or {})
    if job_provider is not None:
        job_values.setdefault("provider", job_provider)
    if job_run_key is not None:
        job_values.setdefault("run_key", job_run_key)
    unknown = sorted(set(job_values) - set(SETTING_NAMES))
    if unknown:
        raise ConfigError(f"{job_file}: unknown setting(s) {', '.join(unknown)}")

    for name in OPERATOR_ONLY:
        if job_values.get(name) is not None:
            _check_operator_only(name, job_values[name], cli, env, job_file)

    chosen: dict[str, Any] = {}
    for name in SETTING_NAMES:
        if cli.get(name) is not None:
            chosen[name] = _convert(name, cli[name], f"--{name.replace('_', '-')}")
        elif env.get(env_name(name), "").strip():
            chosen[name] = _convert(name, env[env_name(name)], env_name(name))
        elif name in job_values and job_values[name] is not None:
            chosen[name] = _convert(name, job_values[name], f"{job_file}: settings.{name}")

    if "run_key" in chosen and "{" in chosen["run_key"]:
        chosen["run_key"] = expand_run_key(chosen["run_key"], job_file)
    auto = chosen.get("rate_limit")
    if isinstance(auto, AutoRate):  # it starts at the provider's default and learns from there
        del chosen["rate_limit"]
        chosen.update(rate_auto=True, rate_ceiling=auto.ceiling)
    provider = chosen.get("provider", "sandbox")
    for name, value in PROVIDER_DEFAULTS.get(provider, {}).items():
        chosen.setdefault(name, value)
    return Settings(**chosen)


_WHY_OPERATOR_ONLY = {
    "base_url": "it decides where the API secrets are sent",
    "metrics_file": "it names a file the run writes",
    "output": "it names a file the run writes",
    "ledger": "the ledger is what makes a run exactly-once",
    "apply_grace": "it decides when a lost answer is judged not applied",
    "notify": "it sends the run's figures to the hosts it names",
    **GUARD_OPERATOR_ONLY,
}


def _check_operator_only(
    name: str,
    job_value: object,
    cli: Mapping[str, object | None],
    env: Mapping[str, str],
    job_file: str,
) -> None:
    """Refuse a job file's `name` unless it is what the operator gave (flag or environment)."""
    flag, variable = f"--{name.replace('_', '-')}", env_name(name)
    if cli.get(name) is not None:
        operator: object = cli[name]
    elif env.get(variable, "").strip():
        operator = env[variable]
    else:
        operator = None
    if operator is not None and _same_setting(name, job_value, operator):
        return
    raise ConfigError(
        f"{job_file}: settings.{name} may not be set in a job file "
        f"({_WHY_OPERATOR_ONLY[name]}): pass {flag} on the command line or set {variable}"
    )


def _same_setting(name: str, first: object, second: object) -> bool:
    """Whether two values of an operator-only setting choose the same thing."""
    try:
        if name == "base_url":
            return normalize_base_url(str(first).strip()) == normalize_base_url(str(second).strip())
        if name == "apply_grace":
            return bool(_number(float)(first) == _number(float)(second))
        if name == "notify":
            return same_targets(first, second)
        a, b = str(first).strip(), str(second).strip()
        if name == "ledger" and (a.startswith(_DATABASE_URLS) or b.startswith(_DATABASE_URLS)):
            return a == b
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (ConfigError, ValueError, ArithmeticError, OSError, RuntimeError):
        return False


_DATABASE_URLS = ("postgresql://", "postgres://")


def expand_run_key(template: str, job_file: str, now: datetime | None = None) -> str:
    """Fill a recurring job's run key: `daily-{date}` gives `daily-2026-11-21`.

    Fields use the machine's local time, as a crontab does: {date} 2026-11-21, {month}
    2026-11, {year} 2026, {week} 2026-W47, {datetime} 20261121T030000, {job} the file's stem.
    """
    now = now or datetime.now().astimezone()
    iso = now.isocalendar()
    values = {
        "date": now.strftime("%Y-%m-%d"),
        "month": now.strftime("%Y-%m"),
        "year": now.strftime("%Y"),
        "week": f"{iso.year}-W{iso.week:02d}",
        "datetime": now.strftime("%Y%m%dT%H%M%S"),
        "job": Path(job_file).stem,
    }
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise ConfigError(
            f"run-key: unknown field {{{exc.args[0]}}} in {template!r}; "
            f"use {', '.join('{' + name + '}' for name in values)}"
        ) from None
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"run-key: {template!r} is not a valid template: {exc}") from None
