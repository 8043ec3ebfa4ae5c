"""Amount parsing and rendering: what is accepted, what is refused and why, never a float."""

from __future__ import annotations

import json
import re
import unicodedata
from decimal import Decimal, InvalidOperation

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from runner.money import (
    MAX_INTEGER_DIGITS,
    AmountError,
    format_amount,
    parse_amount,
    parse_provider_decimal,
    quantize_cents,
)

MAX_WHOLE = 10**MAX_INTEGER_DIGITS - 1
cents_values = st.tuples(
    st.integers(min_value=0, max_value=MAX_WHOLE), st.integers(min_value=0, max_value=99)
).filter(lambda wc: wc != (0, 0))
spaces = st.sampled_from(["", " ", "  ", "\t", "\u00a0", "\u202f", " \u00a0"])


def grouped(whole: int) -> str:
    return f"{whole:,}"


@st.composite
def written_amounts(draw: st.DrawFn) -> tuple[str, str]:
    """An accepted way of writing an amount, and its canonical two-decimal form."""
    whole, cents = draw(cents_values)
    integer = draw(st.sampled_from([str(whole), grouped(whole), "0" + str(whole)]))
    fractions = [f".{cents:02d}"]
    if cents % 10 == 0:
        fractions.append(f".{cents // 10}")
    if cents == 0:
        fractions.append("")
    text = integer + draw(st.sampled_from(fractions))
    return draw(spaces) + text + draw(spaces), f"{whole}.{cents:02d}"


class TestParseAmountAccepts:
    @given(written_amounts())
    def test_round_trip_gives_the_canonical_form(self, written: tuple[str, str]) -> None:
        """Any accepted spelling renders back as plain digits with exactly two decimals."""
        text, canonical = written
        assert format_amount(parse_amount(text)) == canonical

    @given(written_amounts())
    def test_result_has_exactly_two_places(self, written: tuple[str, str]) -> None:
        """The parsed Decimal always carries exponent -2, so it prints with two decimals."""
        assert parse_amount(written[0]).as_tuple().exponent == -2

    def test_whole_number_is_quantized(self) -> None:
        """A whole number becomes the same value with two decimal places."""
        assert str(parse_amount("250")) == "250.00"

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("1,250.00", "1250.00"),
            ("1,250", "1250.00"),
            ("12,345,678.50", "12345678.50"),
            ("0.01", "0.01"),
            ("\u00a0 250.5\u00a0", "250.50"),
            ("\u200b250\ufeff", "250.00"),
        ],
    )
    def test_accepted_examples(self, text: str, expected: str) -> None:
        """Unambiguous separators and surrounding (even invisible) spaces are accepted."""
        assert parse_amount(text) == Decimal(expected)


class TestParseAmountRefuses:
    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("", "is empty"),
            ("  \u00a0", "is empty"),
            ("-5", "greater than zero"),
            ("\u22125", "greater than zero"),
            ("0", "greater than zero"),
            ("0.00", "greater than zero"),
            ("-0", "greater than zero"),
            ("+5", "without a sign"),
            ("1e3", "exponent"),
            ("1.5E+2", "exponent"),
            ("NaN", "not a number"),
            ("nan", "not a number"),
            ("inf", "not a number"),
            ("-Infinity", "not a number"),
            ("5.001", "three decimal places"),
            ("5.0001", "more than two decimal places"),
            ("1.250,00", "ambiguous"),
            ("1,25", "ambiguous"),
            ("12,34.00", "malformed"),
            ("1,2345", "malformed"),
            ("1,,250", "malformed"),
            ("$250", "currency"),
            ("250 €", "currency"),
            ("USD 250.00", "currency"),
            ("1 250.00", "inside"),
            (".5", "write 0.50"),
            ("5.", "write 5.00"),
            ("abc", "plain decimal"),
            ("٢٥٠", "plain decimal"),
            ("1" * (MAX_INTEGER_DIGITS + 1), "too large"),
        ],
    )
    def test_refused_with_a_reason(self, text: str, fragment: str) -> None:
        """Each refused shape raises ValueError saying what is wrong with it."""
        with pytest.raises(ValueError, match=fragment):
            parse_amount(text)

    def test_european_amount_gets_the_suggested_spelling(self) -> None:
        """A decimal-comma amount is refused with the exact amount to write instead."""
        with pytest.raises(ValueError, match=r'^"1\.250,00" is ambiguous: use 1250\.00$'):
            parse_amount("1.250,00")

    def test_currency_symbol_gets_the_bare_number(self) -> None:
        """A currency sign is refused, and the message gives the number without it."""
        with pytest.raises(ValueError, match=r"use 250\.00"):
            parse_amount("$250")

    @given(cents_values)
    def test_negative_amounts_are_refused(self, value: tuple[int, int]) -> None:
        """Every negative amount is refused as not greater than zero."""
        with pytest.raises(ValueError, match="greater than zero"):
            parse_amount(f"-{value[0]}.{value[1]:02d}")

    @given(cents_values, st.sampled_from(["e", "E"]), st.integers(-5, 5))
    def test_exponents_are_refused(self, value: tuple[int, int], e: str, power: int) -> None:
        """No exponent notation is accepted, whatever the value it would denote."""
        with pytest.raises(ValueError, match="exponent"):
            parse_amount(f"{value[0]}.{value[1]:02d}{e}{power}")

    @given(cents_values, st.integers(min_value=1, max_value=9))
    def test_three_decimals_are_refused(self, value: tuple[int, int], digit: int) -> None:
        """A third decimal place is never rounded away silently."""
        with pytest.raises(ValueError, match="decimal places"):
            parse_amount(f"{value[0]}.{value[1]:02d}{digit}")

    def test_message_fits_on_one_line(self) -> None:
        """Control characters in the text are escaped, so the message stays one line."""
        with pytest.raises(ValueError, match=r"25\\u000a0") as caught:
            parse_amount("25\n0")
        assert "\n" not in str(caught.value)

    def test_non_text_is_a_type_error(self) -> None:
        """A float handed to parse_amount is a programming error, not a user's typo."""
        with pytest.raises(TypeError):
            parse_amount(250.0)  # type: ignore[arg-type]


class TestFormatAmount:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("250", "250.00"),
            ("1E+3", "1000.00"),
            ("12345678.5", "12345678.50"),
            ("-5.5", "-5.50"),
            ("-0.001", "0.00"),
            ("2.005", "2.01"),
        ],
    )
    def test_two_decimals_no_exponent_no_separator(self, value: str, expected: str) -> None:
        """Output is plain digits with exactly two decimals, rounded half-up."""
        assert format_amount(Decimal(value)) == expected

    def test_float_is_refused(self) -> None:
        """A float cannot be formatted: its cents may already be wrong."""
        with pytest.raises(TypeError):
            format_amount(0.1)  # type: ignore[arg-type]

    def test_infinity_is_refused(self) -> None:
        """A non-finite Decimal has no two-decimal form."""
        with pytest.raises(ValueError, match="finite"):
            format_amount(Decimal("Infinity"))

    @given(st.decimals(min_value=Decimal("0.01"), max_value=MAX_WHOLE, places=2))
    def test_parse_inverts_format(self, value: Decimal) -> None:
        """Formatting an amount and parsing it back gives the same amount."""
        assert parse_amount(format_amount(value)) == value


class TestQuantizeCents:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("2.005", "2.01"), ("2.0049", "2.00"), ("-2.005", "-2.01"), ("7", "7.00")],
    )
    def test_rounds_half_up(self, value: str, expected: str) -> None:
        """Half a cent rounds away from zero; the result has exactly two places."""
        result = quantize_cents(Decimal(value))
        assert str(result) == expected

    def test_large_values_do_not_overflow(self) -> None:
        """A value beyond the default 28-digit precision still quantizes exactly."""
        value = Decimal("1" * 40)
        assert quantize_cents(value) == value


class TestParseProviderDecimal:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (100, "100"),
            ("100", "100"),
            (" 1000.00 ", "1000.00"),
            ("-5.5", "-5.5"),
            (Decimal("1E+3"), "1000"),
        ],
    )
    def test_exact_numbers_are_accepted(self, value: object, expected: str) -> None:
        """Ints, numeric strings and Decimals come back as the exact Decimal."""
        assert parse_provider_decimal(value) == Decimal(expected)

    def test_json_with_decimal_floats(self) -> None:
        """A JSON body parsed with parse_float=Decimal yields exact balances."""
        body = json.loads('{"wallet_balance": 1000.10, "amount": "100"}', parse_float=Decimal)
        assert parse_provider_decimal(body["wallet_balance"]) == Decimal("1000.10")
        assert parse_provider_decimal(body["amount"]) == Decimal("100")

    @pytest.mark.parametrize(
        "value",
        [
            True,
            False,
            1.5,
            None,
            "NaN",
            Decimal("NaN"),
            Decimal("-Infinity"),
            "1,000",
            "1_000",
            "",
            "abc",
            "1e400",
            [],
        ],
    )
    def test_inexact_or_missing_values_are_refused(self, value: object) -> None:
        """bool, float, null, NaN, infinities and non-numbers raise ValueError."""
        with pytest.raises(ValueError, match="expected"):
            parse_provider_decimal(value)


# -- what a refusal may suggest -------------------------------------------------------------

_CODES = re.compile(r"^(?!(?:nan|inf)\b)[a-z]{3}\s*|\s*(?!(?:nan|inf)$)[a-z]{3}$", re.IGNORECASE)
_SPACED = re.compile(r"[0-9]{1,3}([ '_\u00a0][0-9]{3})+(\.[0-9]+)?")


def meaning(text: str) -> Decimal | None:
    """The one value `text` clearly denotes, worked out independently of the parser: "." is
    the decimal point, "," groups thousands, unless a "," comes last after "." groups (then
    it is the decimal point, as in 1.250,00) or alone before one or two digits (12,5). None
    when there is no single clear value."""
    s = text.strip().strip("\u200b\u200c\u200d\u2060\ufeff").strip()
    s = "".join(c for c in s if unicodedata.category(c) != "Sc").strip()
    s = _CODES.sub("", s).strip()
    if s.startswith("+"):
        s = s[1:].strip()
    if _SPACED.fullmatch(s):
        s = re.sub(r"[ '_\u00a0]", "", s)
    if not re.fullmatch(r"[0-9.,eE]+", s):
        return None
    dots, commas = s.count("."), s.count(",")
    if commas and dots and s.rfind(",") > s.rfind("."):
        whole, _, cents = s.rpartition(",")
        if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{3})*", whole):
            return None
        s = whole.replace(".", "") + "." + cents
    elif commas:
        whole, _, rest = s.partition(".")
        if re.fullmatch(r"[0-9]{1,3}(,[0-9]{3})+", whole):
            s = whole.replace(",", "") + ("." + rest if dots else "")
        elif commas == 1 and not dots and re.fullmatch(r"[0-9]+,[0-9]{1,2}", s):
            s = s.replace(",", ".")
        else:
            return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


_PIECES = [
    "0", "1", "5", "12", "250", "345", "000", "1250", ".", ".", ",", ",", " ", "'", "_", "e",
    "E", "-", "+", "$", "\u20ac", "USD", "eur", "nan", "inf", "\u00a0",
]  # fmt: skip
_NUMBER = re.compile(r"[0-9](?:[0-9,.]*[0-9])?")


@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=8).map("".join))
@example("12.345")
@example("1.250")
@example("1e3")
@example("2E3")
@example("1 250.50")
@example("1.250,00")
@example("12,5")
@example("$1,250")
@example("nan")
@example("1,2345")
@example("." + "5")
@example("1" * (MAX_INTEGER_DIGITS + 1))
def test_a_refusal_never_suggests_another_amount(text: str) -> None:
    """Whatever is refused, a number the message suggests is the value written, or none is."""
    try:
        parse_amount(text)
    except AmountError as exc:
        message, shown, suggestion = str(exc), exc.shown, exc.suggestion
    else:
        return
    assert message.startswith(shown)
    said = {Decimal(n.replace(",", "")) for n in _NUMBER.findall(message[len(shown) :])}
    assert said <= ({suggestion} if suggestion is not None else set()), message
    if suggestion is not None:
        assert suggestion == meaning(text), message
        assert parse_amount(format_amount(suggestion)) == suggestion


def test_three_decimals_are_not_read_as_thousands() -> None:
    """12.345 is refused without proposing 12345.00, a thousand times the amount."""
    with pytest.raises(AmountError) as caught:
        parse_amount("12.345")
    assert caught.value.suggestion is None
    assert "12345" not in str(caught.value)
