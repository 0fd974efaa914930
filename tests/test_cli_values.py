"""Every numeric option of every subcommand refuses NaN, inf, out-of-range and non-ASCII numbers with exit 2.

Argument errors happen while parsing, before any model is loaded, so each case costs milliseconds.
"""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from residency.cli import main
from residency.commands import arg_types
from residency.commands.actions import MAX_SCRIPT_ACTIONS, parse_actions
from residency.errors import UsageError
from residency.units import MAX_SIZE_BYTES, parse_size

# (argv before the option, option): each subcommand's numeric options.
OPTIONS = [
    (["run", "tiny", "-o", "x.gif"], "--fps"),
    (["run", "tiny", "-o", "x.gif"], "--frames"),
    (["run", "tiny", "-o", "x.gif"], "--vram"),
    (["run", "tiny", "-o", "x.gif"], "--seed"),
    (["play", "tiny"], "--fps"),
    (["play", "tiny"], "--vram"),
    (["play", "tiny"], "--seed"),
    (["demo"], "--frames"),
    (["dashboard", "t.json", "--once"], "--speed"),
    (["plan", "tiny", "--profile", "rtx-5090"], "--fps"),
    (["plan", "tiny", "--profile", "rtx-5090"], "--frame-ms"),
    (["plan", "tiny", "--profile", "rtx-5090"], "--vram"),
    (["plan", "tiny", "--profile", "rtx-5090"], "--steps"),
]
BAD_VALUES = ["nan", "NaN", "inf", "-inf", "infinity", "-1", "0", "1e400", "9" * 400, "²", "٣", "1_0", "",
              "  ", "0x10", "1e3XB"]


@pytest.mark.parametrize("before, option", OPTIONS, ids=[f"{b[0]} {o}" for b, o in OPTIONS])
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_a_bad_number_is_a_usage_error_naming_the_option_and_value(tmp_path, monkeypatch, capsys, before, option,
                                                                   value):
    if option == "--seed" and value == "0":
        return  # seed 0 is a seed
    monkeypatch.chdir(tmp_path)
    assert main([*before, f"{option}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: " in err and "hint: " in err and "Traceback" not in err
    assert repr(value[:40] + ("…" if len(value) > 40 else "")) in err
    assert list(tmp_path.iterdir()) == []


def test_vram_below_a_mebibyte_is_refused_rather_than_rounded_to_zero_bytes(capsys):
    assert main(["plan", "tiny", "--profile", "rtx-5090", "--vram", "0.5"]) == 2
    assert "at least 1.00 MiB" in capsys.readouterr().err


def test_a_seed_beyond_64_bits_is_refused(capsys):
    assert main(["run", "tiny", "-o", "x.gif", "--seed", str(2**64)]) == 2
    assert "2**64 - 1" in capsys.readouterr().err


def test_the_largest_64_bit_seed_is_accepted():
    assert arg_types.seed(str(2**64 - 1)) == 2**64 - 1


@pytest.mark.parametrize("script", ["right*²", "right*٣", "right*1_0", "right*+3", "right*-1", "right*",
                                    "right*99999999", "right*0"])
def test_a_repeat_count_must_be_plain_ascii_digits_in_range(script):
    with pytest.raises(UsageError, match="bad repeat count"):
        parse_actions(script, ("idle", "right"))


@pytest.mark.parametrize(("script", "position"), [("right,,left", 2), (",right", 1), ("right, ", 2)])
def test_an_empty_action_is_said_to_be_empty_with_its_place(script, position):
    with pytest.raises(UsageError, match=f"action {position} of the script .* is empty"):
        parse_actions(script, ("idle", "right", "left"))


def test_repeats_that_add_up_beyond_the_script_limit_are_refused():
    with pytest.raises(UsageError, match="expands to more than"):
        parse_actions(",".join(["right*100000"] * 3), ("idle", "right"))
    assert len(parse_actions("right*99999,idle", ("idle", "right"))) == MAX_SCRIPT_ACTIONS


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=30))
def test_bounded_types_return_an_in_range_value_or_refuse(text):
    kinds = [(arg_types.bounded_int(1, 64, "steps"), 1, 64), (arg_types.FPS, 0.01, 1000.0),
             (arg_types.seed, 0, 2**64 - 1)]
    for parse, low, high in kinds:
        try:
            value = parse(text)
        except argparse.ArgumentTypeError:
            continue
        assert math.isfinite(value) and low <= value <= high


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=30), st.from_regex(r"\A[0-9]{0,25}(\.[0-9]{1,5})? ?[KMGTkmgt]?i?B?\Z")))
def test_parse_size_returns_whole_bytes_in_range_or_a_usage_error(text):
    try:
        value = parse_size(text, "--vram", min_bytes=2**20)
    except UsageError as e:
        assert "--vram" in e.message and e.hint
        return
    assert isinstance(value, int) and 2**20 <= value <= MAX_SIZE_BYTES


@pytest.mark.parametrize("text", ["-1GiB", " -5 MB", "-0.5G"])
def test_a_negative_size_is_said_to_be_negative(text):
    with pytest.raises(UsageError, match="--vram must be positive"):
        parse_size(text, "--vram")


@pytest.mark.parametrize("device", ["cuda:²", "cuda:-1", "gpu", "cuda:1_0", ""])
def test_profile_refuses_a_malformed_device_before_measuring(capsys, device):
    assert main(["profile", f"--device={device}"]) == 2
    assert "argument --device: unknown device" in capsys.readouterr().err


def test_profile_refuses_an_unusable_output_name_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--device", "cpu", "-o", "p" * 300 + ".json"]) == 1
    err = capsys.readouterr().err
    assert "name is too long" in err and "Traceback" not in err


class _ClosedPipe:
    """A stdout whose reader went away (`residency plan --json | head -c 100`): every write fails."""

    def write(self, _text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_with_exit_1_and_no_traceback(monkeypatch, capsys):
    from residency.cli import main

    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["plan", "tiny", "--profile", "rx-7800-xt", "--json"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_control_characters_a_user_gave_are_escaped_in_errors(capsys):
    # a path echoed raw broke the error line and recoloured the terminal
    assert main(["inspect", "bad\nname\x1b[31m.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "bad\\nname\\x1b[31m.safetensors" in err and "\x1b" not in err and err.count("\n") == 2
    assert main(["plan", "tiny", "--policy", "no\x07pe"]) == 2
    err = capsys.readouterr().err
    assert "\x07" not in err and "no\\x07pe" in err


def test_demo_refuses_an_empty_output_directory(tmp_path, monkeypatch, capsys):
    # Path("") is ".": the demo wrote demo.gif and its trace into the working directory unasked
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--once", "-o", ""]) == 2
    assert "-o needs a directory" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("script", "sep", "fixed"), [("right*8,left*4;idle", ";", "right*8,left*4,idle"),
                                                      ("right left", " ", "right,left"),
                                                      ("right|idle", "|", "right,idle")])
def test_actions_separated_otherwise_than_by_commas_get_the_script_with_commas(script, sep, fixed):
    # "bad repeat count in 'left*4;idle'" named neither the ';' nor the fix
    with pytest.raises(UsageError, match=f"holds {sep!r}: actions are separated by commas") as e:
        parse_actions(script, ("idle", "right", "left"))
    assert e.value.hint == f"e.g. {fixed}"


def test_a_misspelt_action_with_spaces_is_named_as_unknown_not_as_a_separator():
    with pytest.raises(UsageError, match=r"unknown action 'rigth'") as e:
        parse_actions("rigth * 4", ("idle", "right", "left"))
    assert "actions: idle, right, left" in e.value.hint
