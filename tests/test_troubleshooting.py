"""docs/troubleshooting.md quotes the command's real messages: each phrase below is on
the page and in the code that prints it, so neither can drift alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE = " ".join((REPO / "docs" / "troubleshooting.md").read_text().split())


def _strings() -> list[str]:
    """Every string literal of the package, adjacent literals joined as Python joins
    them; an f-string's fixed parts, each on its own."""
    out: list[str] = []
    for path in (REPO / "src" / "holepunch_mig").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


STRINGS = _strings()

PHRASES = [
    "does not exist",
    "refusing to write the payload (binary data) to a terminal",
    "uses stdout for the control channel; give --output PATH",
    "connecting to the control port",
    "cannot reach the control port",
    "SYNs dropped by a firewall, or the host is down",
    "is holepunch-mig running there",
    "cannot resolve the name",
    "cannot listen on",
    "another holepunch-mig recv or another program is using",
    "control command exited with status",
    "the command was not found",
    "(its messages are above)",
    "both sides claim the source role",
    "a TCP control channel must be authenticated; give",
    "which is not pinned here",
    "control listener: refused",
    "no direct link after",
    "behind a NAT with endpoint-dependent (symmetric) mapping",
    "SYNs timed out both ways",
    "were answered with RST",
    "but the Noise handshake failed",
    "no route from this side",
    "the destination's policy 'direct' forbids it",
    "start the destination (recv) with --policy auto too",
    "on both sides",
    "before round 1",
    "no direct path; the data goes through the slower tunnel over the control channel",
    "(FALLBACK: the direct path failed)",
    "was interrupted (Ctrl-C)",
    "peer aborted",
    "verified by the receiver",
    "every stream intact",
    "already exists (remove it first)",
    "several labs are up",
    "command not found",
    "cannot resolve STUN server name",
    "given more than once",
    "needs root (it creates network namespaces and nftables rules)",
    "post-copy: not switched (precopy completed before the switch",
    "to accept the switch request",
    "cannot open a second libvirt connection for the job",
]


@pytest.mark.parametrize("phrase", PHRASES)
def test_phrase_is_on_the_page_and_in_the_code(phrase: str) -> None:
    assert phrase in PAGE, f"not in docs/troubleshooting.md: {phrase!r}"
    assert any(phrase in text for text in STRINGS), f"no code prints {phrase!r}"
