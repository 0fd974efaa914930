"""Sizes as users type them: binary and decimal units, and clear errors."""

import pytest

from residency.errors import UsageError
from residency.units import fmt_bytes, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("6GiB", 6 * 2**30), ("6GB", 6 * 10**9), ("6000MB", 6 * 10**9), ("512MiB", 512 * 2**20),
     ("1.5G", int(1.5 * 2**30)), ("100", 100), (" 2 gib ", 2 * 2**30)],
)
def test_parse_size_accepts_the_documented_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "6 parsecs", "-1GB", "0GB", "1e3GB"])
def test_parse_size_rejects_bad_values_with_a_hint(text):
    with pytest.raises(UsageError) as err:
        parse_size(text, what="--vram")
    assert "--vram" in err.value.message and "6GiB" in err.value.hint


def test_fmt_bytes_uses_binary_units():
    assert fmt_bytes(1536 * 2**20) == "1.50 GiB"
    assert fmt_bytes(512) == "512 B"
