"""argparse `type=` callables for every numeric option: ASCII digits only, finite, inside a stated range.

A bad value ends in argparse's usage error (exit 2) naming the option and the value; nothing downstream
sees NaN, inf, a superscript digit or a 400-digit number.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from decimal import Decimal

from residency.errors import ResidencyError
from residency.units import MAX_FRAME_MS, MIN_FRAME_MS

# Python's int() and float() accept '١٢', '1_000', ' nan ', 'infinity': only plain ASCII numbers pass here.
_INT_RE = re.compile(r"\+?[0-9]{1,30}")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MIN_VRAM_BYTES = 2**20  # below 1 MiB no block of any model fits; 0.5 would otherwise round to 0 bytes
MAX_VRAM_PERCENT = 1000  # a share of the weights above 10× them is a typo, not a what-if


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    """A whole number from `low` to `high` inclusive; `what` says what it counts ("latent frames")."""

    def parse(text: str) -> int:
        # int() of the stripped text: str.strip() also drops separators such as '\x1f' that int() refuses
        number = text.strip()
        if not _INT_RE.fullmatch(number) or not low <= int(number) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number of {what} from {low} to {high}, "
                                             f"got {_show(text)}")
        return int(number)

    parse.__name__ = f"whole number of {what}"
    return parse


def bounded_float(low: float, high: float, what: str) -> Callable[[str], float]:
    """A finite number greater than `low` and at most `high`; `what` names its unit ("frames per second")."""

    def parse(text: str) -> float:
        number = text.strip()
        value = float(number) if _FLOAT_RE.fullmatch(number) else math.nan
        if not (math.isfinite(value) and low < value <= high):
            raise argparse.ArgumentTypeError(f"must be a number of {what} above {low:g} and at most {high:g}, "
                                             f"got {_show(text)}")
        return value

    parse.__name__ = f"number of {what}"
    return parse


def seed(text: str) -> int:
    """A session noise seed: 0 to 2**64 - 1, what torch's generator accepts."""
    number = text.strip()
    if not _INT_RE.fullmatch(number) or int(number) > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {SEED_MAX} (2**64 - 1), "
                                         f"got {_show(text)}")
    return int(number)


def vram_size(text: str) -> int | str:
    """A device memory size such as 6GiB or 512MiB, of at least 1 MiB (see residency.units.parse_size), or a
    share of the model's weights such as 50% (kept as text: its bytes depend on the model; see resolve_vram)."""
    from residency.units import parse_size

    stripped = text.strip()
    if stripped.endswith("%"):
        number = stripped[:-1].strip()
        share = float(number) if _FLOAT_RE.fullmatch(number) else math.nan
        if math.isnan(share):  # not a number at all ("50%%", "half%"): say that, not the range
            raise argparse.ArgumentTypeError(f"cannot read the share {_show(text)}: a number, then one % "
                                             "(hint: e.g. 50%, or a size such as 6GiB)")
        if not (math.isfinite(share) and 0 < share <= MAX_VRAM_PERCENT):
            raise argparse.ArgumentTypeError(f"a share of the weights must be above 0% and at most "
                                             f"{MAX_VRAM_PERCENT}%, got {_show(text)} (hint: e.g. 50%, or a size "
                                             "such as 6GiB)")
        return f"{number}%"
    try:
        return parse_size(text, "the size", min_bytes=MIN_VRAM_BYTES)
    except ResidencyError as e:  # argparse reports only its own error type as a usage error
        hint = e.hint
        if stripped.startswith("-"):
            hint = "a size is positive: e.g. 6GiB, 512MiB, or a share such as 50%"
        elif _FLOAT_RE.fullmatch(stripped) and 0 < float(stripped) < MIN_VRAM_BYTES:  # `--vram 12`: bytes, as given
            # as the size parser reads it: no exponent (1e3GiB is not a size; 1000GiB is)
            hint = f"a bare number is bytes: did you mean {Decimal(stripped).normalize():f}GiB?"
        raise argparse.ArgumentTypeError(f"{e.message} (hint: {hint})" if hint else e.message) from None


def resolve_vram(spec: int | str, workload, compute_dtype: str, fixed_bytes: int = 0) -> int:
    """Bytes of a --vram value from vram_size: a size as it is, a share of the workload's weights at
    `compute_dtype` (what the plan computes in). Raises UsageError when a share comes to under 1 MiB; its hint names a
    size that holds the weights beside `fixed_bytes` (a GPU's workspace: 64 MiB was suggested where 128 MiB of
    workspace alone never fits)."""
    if isinstance(spec, int):
        return spec
    from residency.errors import UsageError
    from residency.formats.dtypes import DTYPE_FORMAT
    from residency.front_door.vram import vram_bytes
    from residency.units import fmt_bytes, size_at_least

    weight_bytes = workload.nbytes(DTYPE_FORMAT[compute_dtype])
    try:
        nbytes = vram_bytes(spec, weight_bytes, weight_bytes)
    except ResidencyError:  # under one byte of a (tiny) model
        nbytes = 0
    if nbytes < MIN_VRAM_BYTES:
        raise UsageError(f"--vram {spec} of the model's {fmt_bytes(weight_bytes)} of {compute_dtype} weights is "
                         f"{fmt_bytes(nbytes)}, under 1 MiB",
                         hint=f"give a larger share, or a size such as "
                              f"{size_at_least(max(MIN_VRAM_BYTES, weight_bytes + fixed_bytes))} (all of its weights"
                              f"{f', beside the device workspace of {fmt_bytes(fixed_bytes)}' if fixed_bytes else ''})")
    return nbytes


vram_size.__name__ = "size"
_DEVICE_RE = re.compile(r"\s*(cpu|cuda(:[0-9]{1,4})?)\s*", re.IGNORECASE)


def device(text: str) -> str:
    """cpu, cuda or cuda:N (ASCII digits: 'cuda:²' passes str.isdigit and then breaks int())."""
    if not _DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {_show(text)}: use cpu, cuda or cuda:N "
                                         "(ROCm GPUs are cuda:N too)")
    return text.strip().lower()


device.__name__ = "device"
FPS = bounded_float(0.01, 1000.0, "frames per second")
FRAME_MS = bounded_float(MIN_FRAME_MS, MAX_FRAME_MS, "milliseconds")
SPEED = bounded_float(0.01, 1000.0, "times the recorded speed")  # 0.01: a hundredth, still moving


def add_size_arguments(parser: argparse.ArgumentParser, description: str) -> None:
    """--height, --width, --frames and --tokens: the generation a model or pipeline directory is counted at."""
    from residency.units import MAX_SIDE_PX

    size = parser.add_argument_group("size", description)
    size.add_argument("--height", type=bounded_int(8, MAX_SIDE_PX, "pixels"), metavar="PX",
                      help="image or video height in pixels")
    size.add_argument("--width", type=bounded_int(8, MAX_SIDE_PX, "pixels"), metavar="PX",
                      help="image or video width in pixels")
    size.add_argument("--frames", type=bounded_int(1, 1024, "video frames"), metavar="N",
                      help="video frames (Wan: 4k+1, e.g. 81)")
    size.add_argument("--tokens", type=bounded_int(1, 131072, "tokens"), metavar="N",
                      help="a text model's tokens per call, or the prompt tokens a denoiser attends to (default: "
                      "16 for a text model, the pipeline's for a denoiser, e.g. 77 for a UNet's CLIP prompt)")


def example_size(args: argparse.Namespace):
    """The residency.front_door.examples.ExampleSize of add_size_arguments' options (None each: the default)."""
    from residency.front_door.examples import ExampleSize

    return ExampleSize(getattr(args, "height", None), getattr(args, "width", None), getattr(args, "frames", None),
                       prompt_tokens=getattr(args, "tokens", None))
