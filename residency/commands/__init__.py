"""Subcommands of the CLI, one module each, each with `add_parser(subparsers)`."""

from residency.commands import (
    dashboard_cmd,
    demo_cmd,
    inspect_cmd,
    plan_cmd,
    play_cmd,
    profile_cmd,
    profiles_cmd,
    run_cmd,
)

COMMANDS = [inspect_cmd, plan_cmd, profile_cmd, profiles_cmd, run_cmd, play_cmd, dashboard_cmd, demo_cmd]
