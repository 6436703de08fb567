"""The two sides of a session and the path policies, named once for every layer."""

from __future__ import annotations

from typing import Final, Literal

Role = Literal["source", "destination"]
"""Which side of a migration this process is: the source sends, the destination receives."""
Policy = Literal["direct", "auto", "tunnel"]
"""Which path a session may use: a punched link only, the link then the tunnel, the tunnel."""

ROLES: Final[tuple[Role, ...]] = ("source", "destination")
POLICIES: Final[tuple[Policy, ...]] = ("direct", "auto", "tunnel")
