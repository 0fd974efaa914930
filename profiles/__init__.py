"""Shipped device profiles (JSON), found the same way from a checkout and an installed wheel.

`profiles_dir()` is the folder holding them; `residency.device` loads and validates them.
"""

from __future__ import annotations

from pathlib import Path


def profiles_dir() -> Path:
    return Path(__file__).resolve().parent


def shipped_profile_paths() -> list[Path]:
    return sorted(profiles_dir().glob("*.json"))
