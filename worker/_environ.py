"""Reading `LHV_*` settings from the environment."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = []


# --------------------------------------------------------------------------------------
# config


def _env(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    return value if value not in (None, "") else default
