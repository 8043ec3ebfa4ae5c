"""Money as `Decimal`, never float: parsing amounts people write, numbers providers send back,
and rendering with exactly two decimals. Every amount the runner sends passes through here.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import ROUND_HALF_UP, Decimal, localcontext

CENTS = Decimal("0.01")

# Far above any card platform's limit; it keeps every amount well inside Decimal's default
# 28-digit precision, so quantizing can never raise.
MAX_INTEGER_DIGITS = 12
# Said in words: a figure in a refusal could be taken for an amount to write.
_TOO_MANY_DIGITS = "more than twelve digits before the point"

# Spaces a spreadsheet or a copy-paste leaves around a value: str.strip() covers the Unicode
# spaces (including non-breaking ones); zero-width characters are not spaces to Python.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"

# re.ASCII everywhere: `\d` would otherwise accept Arabic-Indic or full-width digits.
_PLAIN = re.compile(r"([0-9]+)(?:\.([0-9]{1,2}))?", re.ASCII)
_GROUPED = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]{1,2})?", re.ASCII)
_DECIMAL_COMMA = re.compile(r"([0-9]{1,3}(?:\.[0-9]{3})*|[0-9]+),([0-9]{1,2})", re.ASCII)
_BARE_POINT = re.compile(r"\.[0-9]{1,2}|[0-9]+\.", re.ASCII)
_TOO_PRECISE = re.compile(r"[0-9]+\.[0-9]{3,}", re.ASCII)
_EXPONENT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][+-]?[0-9]+", re.ASCII)
_NOT_A_NUMBER = {"nan", "snan", "qnan", "inf", "infinity", "∞"}
_CURRENCY_CODE = re.compile(r"([A-Za-z]{3})\s*(.*)|(.*?)\s*([A-Za-z]{3})", re.ASCII | re.DOTALL)
_INNER_SEPARATORS = re.compile(r"[0-9][\s'_][0-9]")
# Thousands set apart by one kind of space, apostrophe or underscore ("1 250.00", "1'250"):
# one clear value.
_SPACED_GROUPS = re.compile(
    r"[0-9]{1,3}(?:( |\u00a0|\u202f|'|_)[0-9]{3})(?:\1[0-9]{3})*(?:\.[0-9]{1,2})?"
)
_MINUS_SIGNS = "-\u2212\u2012\u2013\ufe63\uff0d"
_PROVIDER_NUMBER = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII
)


def quantize_cents(d: Decimal) -> Decimal:
    """`d` rounded half-up to exactly two decimal places (2.005 -> 2.01)."""
    if not d.is_finite():
        raise ValueError(f"{d} is not a finite amount")
    with localcontext() as ctx:
        # Enough digits for any finite value we are handed, so quantize cannot overflow.
        ctx.prec = max(28, d.adjusted() + 4)
        return d.quantize(CENTS, rounding=ROUND_HALF_UP)


def format_amount(d: Decimal) -> str:
    """`d` as text with exactly two decimals, no exponent and no separator: "1250.00"."""
    if not isinstance(d, Decimal):
        # A float here would already have lost cents; refuse rather than print a rounded lie.
        raise TypeError(f"format_amount needs a Decimal, not {type(d).__name__}")
    q = quantize_cents(d)
    if q.is_zero():
        return "0.00"  # never "-0.00"
    return f"{q:f}"


class AmountError(ValueError):
    """An amount a person wrote that is refused: `shown` is the text as the message quotes it,
    `suggestion` the amount the message proposes instead, if any. A suggestion is always the
    value of what was written, never another amount (no example figures, no reinterpretation
    of a "." as a thousands separator)."""

    def __init__(self, message: str, shown: str = "", suggestion: Decimal | None = None) -> None:
        self.shown = shown
        self.suggestion = suggestion
        super().__init__(message)


def parse_amount(text: str) -> Decimal:
    """An amount a person wrote, as a Decimal with exactly two places.

    Accepted: a plain decimal greater than zero with at most two places, optionally with `,`
    thousands separators in groups of three ("1,250.00"). Anything else raises `AmountError`
    (a ValueError) whose message quotes the text and says what is wrong; where the text has
    one clear value the message gives it, written as it must be.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_amount needs a str, not {type(text).__name__}")
    s = text.strip().strip(_INVISIBLE).strip()
    if not s:
        raise AmountError("is empty")
    shown = _show(s)

    value = _parse_unsigned(s, shown)
    if value is not None:
        return value

    sign, rest = s[0], s[1:].lstrip()
    if sign == "+" or sign in _MINUS_SIGNS:
        try:
            magnitude = _parse_unsigned(rest, shown)
        except ValueError:  # zero or too large: a number all the same
            if sign != "+":
                raise AmountError(f"{shown} must be greater than zero", shown) from None
            raise
        if magnitude is not None and sign != "+":
            raise AmountError(f"{shown} must be greater than zero", shown)
        if magnitude is not None:
            raise AmountError(
                f"{shown} must be written without a sign: use {magnitude}", shown, magnitude
            )
    message, suggestion = _explain(s, shown)
    raise AmountError(message, shown, suggestion)


def parse_provider_decimal(value: object) -> Decimal:
    """A number from a provider's JSON (parsed with `parse_float=Decimal`) as an exact Decimal.

    Accepts int, Decimal and numeric strings ("100", "1000.00", "-5.5"); refuses bool, float,
    None, NaN and infinities, because none of them can be trusted to be an exact money value.
    """
    number: Decimal
    if type(value) is Decimal:  # what exact JSON parsing gives for every amount: first
        number = value
    elif isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value}")
    elif isinstance(value, int):
        return Decimal(value)
    elif isinstance(value, float):
        raise ValueError(
            f"expected an exact number, got the float {value!r} "
            "(parse the JSON with parse_float=Decimal)"
        )
    elif isinstance(value, Decimal):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not _PROVIDER_NUMBER.fullmatch(text):
            raise ValueError(f"expected a number, got {_show(value)}")
        number = Decimal(text)
    elif value is None:
        raise ValueError("expected a number, got null")
    else:
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if not number.is_finite():
        raise ValueError(f"expected a finite number, got {number}")
    # An exponent this far out is not money; refusing it keeps quantize_cents exact.
    if not number.is_zero() and not -30 <= number.adjusted() <= 30:
        raise ValueError(f"expected an amount of money, got {number}")
    return number


def _parse_unsigned(s: str, shown: str) -> Decimal | None:
    """The value of `s` if it is an accepted unsigned shape, None if it is not such a shape."""
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    m = _PLAIN.fullmatch(s)
    if m is None:
        return None
    whole, cents = m.group(1).lstrip("0"), m.group(2) or ""
    if len(whole) > MAX_INTEGER_DIGITS:
        raise AmountError(f"{shown} is too large: {_TOO_MANY_DIGITS}", shown)
    value = Decimal(f"{whole or '0'}.{cents.ljust(2, '0')}")
    if value.is_zero():
        raise AmountError(f"{shown} must be greater than zero", shown)
    return value


def _as_written(s: str, shown: str) -> tuple[Decimal | None, str | None]:
    """`s`, a spelling of one clear value, as an accepted amount: (the amount, None), or
    (None, why that value is no amount: zero, too large); (None, None) if `s` is no amount."""
    try:
        return _parse_unsigned(s, shown), None
    except AmountError as exc:
        return None, str(exc)


def _explain(s: str, shown: str) -> tuple[str, Decimal | None]:
    """Why `s`, which is not an accepted shape, was refused, and the amount to write instead
    when `s` has one clear value (never an example figure: it could be taken for the amount)."""
    value: Decimal | None
    if s.lstrip("+" + _MINUS_SIGNS).lower() in _NOT_A_NUMBER:
        return f"{shown} is not a number: write the amount in digits", None
    if _EXPONENT.fullmatch(s):
        meant = Decimal(s)
        # Only an exact positive amount of cents is proposed; adjusted() first, so that a
        # huge exponent is never written out in full.
        if meant > 0 and meant.adjusted() < MAX_INTEGER_DIGITS and meant == meant.quantize(CENTS):
            value = meant.quantize(CENTS)
            return f"{shown} uses exponent notation: write {value}", value
        return f"{shown} uses exponent notation: write the amount in full digits", None
    bare = _without_currency(s)
    if bare is not None:
        value, _ = _as_written(bare, shown)
        if value is not None:
            return f"{shown} has a currency sign or code: use {value}", value
        return f"{shown} has a currency sign or code: give the number only", None
    m = _DECIMAL_COMMA.fullmatch(s)
    if m is not None:
        value, why = _as_written(f"{m.group(1).replace('.', '')}.{m.group(2)}", shown)
        if value is None:
            return why or f"{shown} is not an amount", None
        if "." in m.group(1):
            return f"{shown} is ambiguous: use {value}", value
        return f'{shown} is ambiguous: use {value} if "," is meant as the decimal point', value
    if "," in s:
        return (
            f'{shown} has a malformed "," separator: "," may only separate thousands, in '
            "groups of three digits",
            None,
        )
    if _INNER_SEPARATORS.search(s):
        if _SPACED_GROUPS.fullmatch(s):
            value, _ = _as_written(re.sub(r"[\s'_]", "", s), shown)
            if value is not None:
                return f"{shown} has spaces or separators inside: write {value}", value
        return f"{shown} has spaces or separators inside: write the digits without them", None
    if _TOO_PRECISE.fullmatch(s):
        places = "three" if len(s.partition(".")[2]) == 3 else "more than two"
        # A "." is the decimal point here: reading it as a thousands separator would propose a
        # thousand times the amount.
        return (
            f'{shown} has {places} decimal places ("." is the decimal point): give at most two',
            None,
        )
    if _BARE_POINT.fullmatch(s):
        value, why = _as_written(f"0{s}" if s.startswith(".") else s.rstrip("."), shown)
        if value is not None:
            return f"{shown} is not written in full: write {value}", value
        if why is not None:
            return why, None
    return f"{shown} is not an amount: expected a plain decimal with at most two places", None


def _without_currency(s: str) -> str | None:
    """`s` without its currency sign or ISO code, or None if it carries neither."""
    stripped = "".join(c for c in s if unicodedata.category(c) != "Sc")
    if stripped != s:
        return stripped.strip()
    m = _CURRENCY_CODE.fullmatch(s)
    if m is None:
        return None
    code, rest = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(4), m.group(3))
    if code.lower() in _NOT_A_NUMBER:
        return None  # "1nan" is no amount in some currency
    # Only call it a currency code when what remains looks numeric; "abc" is just not a number.
    if rest and rest[0].isdigit() and rest[-1].isdigit():
        return rest
    return None


def _show(text: str) -> str:
    """`text` quoted for a one-line message: control characters escaped, long text cut."""
    if len(text) > 40:
        text = text[:37] + "…"
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text) + '"'
