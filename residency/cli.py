"""The `residency` command line: argparse subcommands, `main() -> int`.

Exit codes: 0 ok, 1 runtime/bad-file error, 2 usage; subcommands may define more.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import io
import json
import os
import re
import sys
import warnings

from residency.commands import COMMANDS
from residency.commands.output_clash import check_outputs_apart
from residency.errors import ResidencyError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """Exit 2 as argparse does, in two lines instead of its usage block: the error, then a hint — the
        message's own where it ends "(hint: …)" (an argument type's), else where the options are listed."""
        message, _, hint = message.partition(" (hint: ")
        hint = hint.removesuffix(")") if hint else _close_choice(message) or f"run '{self.prog} --help' for the options"
        print(f"error: {printable(message)}", file=sys.stderr)
        print(f"hint: {printable(hint)}", file=sys.stderr)
        raise _UsageExit(message, hint)


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)$")


def _close_choice(message: str) -> str | None:
    """'did you mean …?' for argparse's invalid choice (`residency plna`), when one is close."""
    m = _INVALID_CHOICE.search(message)
    if m is None:
        return None
    given = m["given"]
    close = difflib.get_close_matches(given, re.findall(r"'([^']*)'", m["choices"]), n=3, cutoff=0.6)
    if not close:
        return None
    swapped = [c for c in close if sorted(c) == sorted(given)]  # two letters swapped: 'plna' is plan, not play
    return f"did you mean '{(swapped or close)[0]}'?"


class _UsageExit(SystemExit):
    """argparse's exit 2, with what it said (main prints it as a document too under --json)."""

    def __init__(self, message: str, hint: str):
        super().__init__(2)
        self.message, self.hint = message, hint


_NEGATIVE_VALUE = re.compile(r"-\d")  # `-1GiB`, which argparse takes for an option, not a value


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--vram -1GiB` as `--vram=-1GiB`: argparse reads a token that starts with '-' and is not a plain number
    as an option, and says only "expected one argument"; joined, the value reaches its type check, whose error
    names it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if (tok.startswith("--") and "=" not in tok and i + 1 < len(argv)
                and _NEGATIVE_VALUE.match(argv[i + 1])):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    """The `residency` argument parser with every subcommand registered."""
    parser = _Parser(prog="residency", description="Plan and run diffusion world models on consumer GPUs.")
    parser.add_argument("--version", action="version", version=f"residency {__import__('residency').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    for action in sub._choices_actions:  # `residency CMD --help` opens with what the command list says of it
        p = sub.choices[action.dest]
        if p.description is None and action.help:
            p.description = action.help[0].upper() + action.help[1:] + "."
    return parser


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters escaped ("\\n", "\\x1b"): a path or value a user gave is echoed in an error, and a
    newline or an ANSI escape in it must not break the line or recolour the terminal."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


def report(err: ResidencyError) -> int:
    """Print `err`'s message and hint to stderr; returns its exit code."""
    print(f"error: {printable(err.message)}", file=sys.stderr)
    if err.hint:
        print(f"hint: {printable(err.hint)}", file=sys.stderr)
    return err.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]); returns the exit status.

    ResidencyError becomes its message and exit code (with --json, also {"error", "hint", "exit_code"} on stdout),
    Ctrl-C exit status 130; other errors propagate.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(_join_negative_values(argv))
    except _UsageExit as usage:
        if "--json" in argv:
            _json_error(usage.message, usage.hint, 2)
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if extra:  # argparse would say so from the top parser, pointing at `residency --help`
        where = f"residency {args.command}" if args.command else "residency"
        message, hint = f"unrecognized arguments: {' '.join(extra)}", f"run '{where} --help' for the options"
        print(f"error: {printable(message)}", file=sys.stderr)
        print(f"hint: {hint}", file=sys.stderr)
        if getattr(args, "json", False):
            _json_error(message, hint, 2)
        return 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        check_outputs_apart(args)
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            return int(args.run(args))
    except ResidencyError as err:
        if getattr(args, "json", False):  # a script reading stdout gets a document, not nothing
            _json_error(err.message, err.hint, err.exit_code)
        return report(err)
    except KeyboardInterrupt:
        if getattr(args, "json", False):  # an error is one document on stdout with --json, this one too
            try:
                _json_error("interrupted", None, 130)
            except BrokenPipeError:  # the reader went with the same Ctrl-C (`| head`)
                _stdout_closed()
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


def _show_warning(others, message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (a plan that misses its budget, parameters a model's forward never runs) as one
    `warning:` line on stderr, as the CLI says its notes; Python's form added a file path and a line of our
    source. Other libraries' warnings go to `others`, the showwarning in place before (Python's, or a test's)."""
    from residency.errors import InferenceOnlyWarning, PlanWarning
    from residency.workload import ModuleWorkloadWarning

    if issubclass(category, (InferenceOnlyWarning, PlanWarning, ModuleWorkloadWarning)):
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        others(message, category, filename, lineno, file, line)


def _json_error(message: str, hint: str | None, exit_code: int) -> None:
    print(json.dumps({"error": message, "hint": hint or None, "exit_code": exit_code}))


def _stdout_closed() -> int:
    """The reader of our stdout went away (`residency plan --json | head`): no traceback, exit 1. Python would
    report the failed flush of the closed pipe again at exit, so stdout is pointed at /dev/null first (the recipe
    of Python's signal docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # a replaced stdout: no descriptor
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
