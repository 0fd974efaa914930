"""Subcommands of the CLI, one module each, each with `add_parser(subparsers)`."""

from residency.commands import inspect_cmd, plan_cmd, profile_cmd, profiles_cmd

COMMANDS = [inspect_cmd, plan_cmd, profile_cmd, profiles_cmd]
