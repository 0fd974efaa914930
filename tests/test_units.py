"""Sizes as users type them: binary and decimal units, and clear errors."""

import pytest

from residency.errors import UsageError
from residency.units import fmt_bytes, fmt_ms, parse_size, size_at_least


@pytest.mark.parametrize(
    "text,expected",
    [("6GiB", 6 * 2**30), ("6GB", 6 * 10**9), ("6000MB", 6 * 10**9), ("512MiB", 512 * 2**20),
     ("1.5G", int(1.5 * 2**30)), ("100", 100), (" 2 gib ", 2 * 2**30), ("1e3MiB", 1000 * 2**20),
     ("1.5e2K", 150 * 2**10), ("2PiB", 2 * 2**50)],
)
def test_parse_size_accepts_the_documented_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "6 parsecs", "-1GB", "0GB", "1e3XB", "1e99999GB"])
def test_parse_size_rejects_bad_values_with_a_hint(text):
    with pytest.raises(UsageError) as err:
        parse_size(text, what="--vram")
    assert "--vram" in err.value.message and "6GiB" in err.value.hint


def test_fmt_bytes_uses_binary_units():
    assert fmt_bytes(1536 * 2**20) == "1.50 GiB"
    assert fmt_bytes(512) == "512 B"


@pytest.mark.parametrize("text", ["0.5", "1KiB", "9" * 400, "2048PiB", "1048577TiB", "2EiB", "1e999MiB", "1e-9G"])
def test_parse_size_refuses_sizes_outside_its_range_naming_the_value(text):
    with pytest.raises(UsageError) as err:
        parse_size(text, what="--vram", min_bytes=2**20)
    assert "--vram" in err.value.message and repr(text[:40] + ("…" if len(text) > 40 else "")) in err.value.message
    assert "at most 2**60 bytes" in err.value.message  # too large or too small, not "cannot read"


@pytest.mark.parametrize("text", ["٦GiB", "6²GiB", "1_000MiB", "nan", "inf", "6\u2009GiB"])
def test_parse_size_reads_only_ascii_numbers(text):
    with pytest.raises(UsageError, match="cannot read"):
        parse_size(text, what="--vram")


def test_parse_size_is_exact_to_the_byte():
    assert parse_size("1152921504606846975") == 2**60 - 1  # a float would read 2**60
    assert parse_size("0.3MB") == 300_000


@pytest.mark.parametrize("n", [1, 1023, 1024, 671_948, 1_197_824, 10 * 2**20 + 1, 3 * 2**30 - 1, 123_456_789_012])
def test_a_size_to_give_back_is_never_below_the_bytes_and_one_shown_step_at_most_above(n):
    text = size_at_least(n)
    assert " " not in text and parse_size(text) >= n
    unit = next((s for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if text.endswith(u)), 1)
    step = unit * (0.01 if parse_size(text) < 10 * unit else 0.1) if unit > 1 else 1
    assert parse_size(text) - n <= step + 1


@pytest.mark.parametrize(("ms", "shown"), [(41.27, "41.3"), (2.468, "2.47"), (0.01, "0.010"), (0.0004, "4.0e-04"),
                                           (0.0, "0.000"), (1234.5, "1234.5")])
def test_milliseconds_keep_about_three_figures_and_a_nonzero_time_never_reads_zero(ms, shown):
    assert fmt_ms(ms) == shown


@pytest.mark.parametrize("text,bits", [("6Gb", "gigabits"), ("512Mb", "megabits"), ("1Eb", "exabits")])
def test_a_bit_unit_is_refused_rather_than_read_as_bytes(text, bits):
    # "6Gb" read as 6 GB: a lowercase b after a capital prefix is how bits are written
    with pytest.raises(UsageError) as err:
        parse_size(text, what="--vram")
    assert bits in err.value.message and text[:-1] + "B" in err.value.hint
    assert parse_size(text.lower()) == parse_size(text[:-1] + "B")  # all lowercase, "6gb", stays bytes
