"""How addresses are written in reports and messages, in one place for every module."""

from __future__ import annotations

__all__ = ["format_endpoint", "unmap_ipv4"]


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unmap_ipv4(host: str) -> str:
    """``::ffff:a.b.c.d`` (an IPv4 peer on a dual-stack socket) as plain ``a.b.c.d``."""
    return host[7:] if host.startswith("::ffff:") else host
