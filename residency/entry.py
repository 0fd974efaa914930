"""The `residency` command's entry point: Ctrl-C while the CLI is still importing (torch and the planner, ~2 s)
exits 130 with one line, as it does once a command runs, instead of a traceback from inside torch's import."""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def main() -> int:
    """Import the CLI and run it on sys.argv; Ctrl-C during the import is "error: interrupted", exit 130."""
    try:
        from residency.cli import main as cli_main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    return cli_main()
