"""Lab specs: what a lab is made of (two sides, firewalls, NAT types, STUN, delay),
the named presets, spec files (TOML or JSON) and their validation.

Pure data: building a spec into namespaces is :mod:`holepunch_mig.lab.topology`'s job.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from holepunch_mig.errors import LabError, LabUnsupported

Firewall = Literal["open", "drop", "reject"]
Nat = Literal["none", "masquerade", "random", "fully-random", "rst", "double"]
Side = Literal["left", "right"]
PortMapSpec = bool | Literal["pcp", "upnp-igd"]
"""A router's port mapping: ``True`` every protocol miniupnpd speaks (PCP, NAT-PMP,
UPnP-IGD), ``"pcp"`` PCP and NAT-PMP only, ``"upnp-igd"`` UPnP-IGD only."""
_PORT_MAPPINGS: tuple[object, ...] = (True, False, "pcp", "upnp-igd")

_FIREWALLS: tuple[str, ...] = ("open", "drop", "reject")
_NATS: tuple[str, ...] = ("none", "masquerade", "random", "fully-random", "rst", "double")

#: The control port the presets open (firewall hole / port-forward) on the right side.
CONTROL_PORT = 7070
#: Upper bound for rtt_ms (the delay queue holds at most 16384 packets).
MAX_RTT_MS = 2000


@dataclass(frozen=True)
class SideSpec:
    """One side of the lab (a hypervisor host and what stands between it and the world).

    firewall: policy for inbound NEW connections (established/related always pass).
    nat: "none" puts the host on the public segment; "masquerade" is port-preserving,
        endpoint-independent NAT; "random"/"fully-random" are nft masquerade with those
        flags (symmetric-ish: ports not preserved); "rst" is a port-preserving NAT that
        answers unsolicited inbound TCP SYNs with RST; "double" is a carrier-grade NAT
        (masquerade) in front of a home NAT (masquerade).
    allow_inbound_tcp: ports accepted inbound (no NAT) or port-forwarded to the same port on
        the host (NAT), e.g. the receiver's control port.
    loss_pct, jitter_ms, reorder_pct: impairments of what arrives at this side from the
        public segment (the NFQUEUE stage at its edge): random loss in percent, delay
        jitter (uniform ± ms around rtt_ms / 2), percent of packets that skip the delay
        and overtake the others.
    rate_kbit: a token-bucket (tc tbf) rate limit in kbit/s on this side's link, both
        directions (0 = none).
    port_mapping: the side's router runs miniupnpd so the host can ask it to map a port:
        ``true`` with PCP, NAT-PMP and UPnP-IGD, ``"pcp"`` PCP and NAT-PMP only,
        ``"upnp-igd"`` UPnP-IGD only; needs a single NAT (not "none" or "double") and
        ``stun``.
    """

    firewall: Firewall = "drop"
    nat: Nat = "none"
    allow_inbound_tcp: tuple[int, ...] = ()
    loss_pct: float = 0.0
    jitter_ms: float = 0.0
    reorder_pct: float = 0.0
    rate_kbit: int = 0
    port_mapping: PortMapSpec = False

    @property
    def impaired(self) -> bool:
        """Whether this side needs the NFQUEUE stage for loss, jitter or reordering."""
        return bool(self.loss_pct or self.jitter_ms or self.reorder_pct)


@dataclass(frozen=True)
class LabSpec:
    """A whole lab: two sides, an optional STUN server (coturn on two addresses), a
    round-trip delay between the two sides in milliseconds (0 = none) and, with
    ``ipv6``, a dual stack: besides IPv4 (NATed as each side says) every host gets a
    routed IPv6 address (2001:db8::/32) behind the same firewalls and no NAT66."""

    left: SideSpec
    right: SideSpec
    stun: bool = False
    rtt_ms: int = 0
    name: str = "lab"
    ipv6: bool = False

    @property
    def needs_queue(self) -> bool:
        """Whether the lab runs an NFQUEUE stage (delay, loss, jitter or reordering)."""
        return self.rtt_ms > 0 or self.left.impaired or self.right.impaired


def presets() -> dict[str, LabSpec]:
    """Named lab cells.  The right side is the destination: it has the control port
    (:data:`CONTROL_PORT`) open / forwarded.  NAT presets run a STUN server."""
    ctl = (CONTROL_PORT,)

    def spec(
        name: str,
        left: tuple[Firewall, Nat],
        right: tuple[Firewall, Nat],
        stun: bool | None = None,
        mapping: Side | None = None,
        protocols: PortMapSpec = True,
    ) -> LabSpec:
        natted = left[1] != "none" or right[1] != "none"
        return LabSpec(
            left=SideSpec(
                firewall=left[0],
                nat=left[1],
                port_mapping=protocols if mapping == "left" else False,
            ),
            right=SideSpec(
                firewall=right[0],
                nat=right[1],
                allow_inbound_tcp=ctl,
                port_mapping=protocols if mapping == "right" else False,
            ),
            stun=natted if stun is None else stun,
            name=name,
        )

    cells = [
        spec("open-open", ("open", "none"), ("open", "none")),
        spec("fw-fw", ("drop", "none"), ("drop", "none")),
        spec("reject-reject", ("reject", "none"), ("reject", "none")),
        spec("fw-reject", ("drop", "none"), ("reject", "none")),
        spec("nat-open", ("drop", "masquerade"), ("open", "none")),
        spec("nat-fw", ("drop", "masquerade"), ("drop", "none")),
        spec("nat-nat", ("drop", "masquerade"), ("drop", "masquerade")),
        spec("rst-rst", ("drop", "rst"), ("drop", "rst")),
        spec("random-random", ("drop", "random"), ("drop", "random")),
        spec("symmetric-nat", ("drop", "fully-random"), ("drop", "masquerade")),
        spec("symmetric-fw", ("drop", "fully-random"), ("drop", "none")),
        spec("nat-symmetric", ("drop", "masquerade"), ("drop", "fully-random")),
        spec("symmetric-symmetric", ("drop", "fully-random"), ("drop", "fully-random")),
        spec("symmetric-pcp", ("drop", "fully-random"), ("drop", "masquerade"), mapping="left"),
        spec(
            "symmetric-upnp",
            ("drop", "fully-random"),
            ("drop", "masquerade"),
            mapping="left",
            protocols="upnp-igd",
        ),
        spec(
            "symmetric-symmetric-pcp",
            ("drop", "fully-random"),
            ("drop", "fully-random"),
            mapping="left",
        ),
        replace(spec("dual-stack", ("drop", "masquerade"), ("drop", "masquerade")), ipv6=True),
        replace(
            spec("symmetric-symmetric-v6", ("drop", "fully-random"), ("drop", "fully-random")),
            ipv6=True,
        ),
        spec("double-nat", ("drop", "double"), ("drop", "masquerade")),
        spec("double-double", ("drop", "double"), ("drop", "double")),
    ]
    return {c.name: c for c in cells}


_SPEC_KEYS = ("name", "left", "right", "stun", "rtt_ms", "ipv6")
_SIDE_KEYS = (
    "firewall",
    "nat",
    "allow_inbound_tcp",
    "loss_pct",
    "jitter_ms",
    "reorder_pct",
    "rate_kbit",
    "port_mapping",
)
#: Side keys that are numbers, and their (inclusive) ranges.
_SIDE_NUMBERS: dict[str, tuple[float, float]] = {
    "loss_pct": (0.0, 100.0),
    "jitter_ms": (0.0, float(MAX_RTT_MS)),
    "reorder_pct": (0.0, 100.0),
    "rate_kbit": (0.0, 10_000_000.0),
}


def spec_from_dict(data: Mapping[str, Any], *, default_name: str = "lab") -> LabSpec:
    """A :class:`LabSpec` from a parsed spec file (see docs/traversal.md).  Unknown keys and
    bad values raise one LabError naming every bad key (not one per attempt)."""
    if not isinstance(data, Mapping):
        raise LabError("a lab spec is a table/object with keys " + ", ".join(_SPEC_KEYS))
    errors: list[str] = []
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        errors.append(f"unknown spec key(s) {unknown}; allowed: {', '.join(_SPEC_KEYS)}")

    def side(key: str) -> SideSpec:
        raw = data.get(key, {})
        if not isinstance(raw, Mapping):
            errors.append(f"{key} must be a table/object with keys {', '.join(_SIDE_KEYS)}")
            return SideSpec()
        bad = sorted(set(raw) - set(_SIDE_KEYS))
        if bad:
            errors.append(f"unknown key(s) {bad} in {key}; allowed: {', '.join(_SIDE_KEYS)}")
        ports = raw.get("allow_inbound_tcp", [])
        if not isinstance(ports, list | tuple) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in ports
        ):
            errors.append(f"{key}.allow_inbound_tcp must be a list of port numbers")
            ports = []
        fw, nat = raw.get("firewall", "drop"), raw.get("nat", "none")
        if fw not in _FIREWALLS:
            errors.append(f"{key}.firewall must be one of {', '.join(_FIREWALLS)}, not {fw!r}")
            fw = "drop"
        if nat not in _NATS:
            errors.append(f"{key}.nat must be one of {', '.join(_NATS)}, not {nat!r}")
            nat = "none"
        numbers: dict[str, Any] = {}
        for field_name in _SIDE_NUMBERS:
            value = raw.get(field_name, 0)
            if not isinstance(value, int | float) or isinstance(value, bool):
                errors.append(f"{key}.{field_name} must be a number, not {value!r}")
                value = 0
            elif field_name == "rate_kbit" and not isinstance(value, int):
                errors.append(f"{key}.rate_kbit must be an integer (kbit/s), not {value!r}")
                value = 0
            numbers[field_name] = value
        mapping = raw.get("port_mapping", False)
        if not any(mapping is m or (isinstance(m, str) and mapping == m) for m in _PORT_MAPPINGS):
            errors.append(
                f'{key}.port_mapping must be true, false, "pcp" or "upnp-igd", not {mapping!r}'
            )
            mapping = False
        return SideSpec(
            firewall=fw,
            nat=nat,
            allow_inbound_tcp=tuple(ports),
            port_mapping=mapping,
            **numbers,
        )

    name = data.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", name):
        errors.append(f"name must be 1-40 letters, digits, '_', '.', '-', not {name!r}")
        name = default_name
    stun = data.get("stun", False)
    rtt = data.get("rtt_ms", 0)
    if not isinstance(stun, bool):
        errors.append(f"stun must be true or false, not {stun!r}")
        stun = False
    if not isinstance(rtt, int) or isinstance(rtt, bool):
        errors.append(f"rtt_ms must be an integer number of milliseconds, not {rtt!r}")
        rtt = 0
    ipv6 = data.get("ipv6", False)
    if not isinstance(ipv6, bool):
        errors.append(f"ipv6 must be true or false, not {ipv6!r}")
        ipv6 = False
    left, right = side("left"), side("right")
    if errors:
        raise LabError("; ".join(errors))
    spec = LabSpec(left=left, right=right, stun=stun, rtt_ms=rtt, name=name, ipv6=ipv6)
    validate_spec(spec)
    return spec


def spec_to_dict(spec: LabSpec) -> dict[str, Any]:
    """The inverse of :func:`spec_from_dict` (JSON-friendly)."""

    def side(s: SideSpec) -> dict[str, Any]:
        return {
            "firewall": s.firewall,
            "nat": s.nat,
            "allow_inbound_tcp": list(s.allow_inbound_tcp),
            "loss_pct": s.loss_pct,
            "jitter_ms": s.jitter_ms,
            "reorder_pct": s.reorder_pct,
            "rate_kbit": s.rate_kbit,
            "port_mapping": s.port_mapping,
        }

    return {
        "name": spec.name,
        "stun": spec.stun,
        "rtt_ms": spec.rtt_ms,
        "ipv6": spec.ipv6,
        "left": side(spec.left),
        "right": side(spec.right),
    }


def load_spec(path: str | os.PathLike[str]) -> LabSpec:
    """Read a lab spec file: TOML if it ends in ``.toml``, else JSON.  The name defaults to
    the file's stem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise LabError(f"cannot read spec file {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise LabError(
            f"spec file {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from None
    return spec_from_dict(data, default_name=re.sub(r"[^A-Za-z0-9_.-]", "-", p.stem)[:40] or "lab")


def validate_spec(spec: LabSpec) -> None:
    """Check a spec built in code as strictly as one read from a file."""
    for side_name, side in (("left", spec.left), ("right", spec.right)):
        if side.firewall not in _FIREWALLS:
            raise LabError(
                f"{side_name}.firewall must be one of {_FIREWALLS}, not {side.firewall!r}"
            )
        if side.nat not in _NATS:
            raise LabError(f"{side_name}.nat must be one of {_NATS}, not {side.nat!r}")
        for port in side.allow_inbound_tcp:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise LabError(f"{side_name}.allow_inbound_tcp: bad port {port!r}")
        for field_name, (low, high) in _SIDE_NUMBERS.items():
            value = getattr(side, field_name)
            if not low <= value <= high:
                raise LabError(
                    f"{side_name}.{field_name} must be in {low:g}..{high:g}, not {value!r}"
                )
        if side.port_mapping and side.nat in ("none", "double"):
            raise LabError(
                f"{side_name}.port_mapping needs a single NAT router (nat masquerade, random, "
                f"fully-random or rst), not nat {side.nat!r}"
            )
        if side.port_mapping and not spec.stun:
            raise LabError(
                f"{side_name}.port_mapping needs stun = true: miniupnpd learns from STUN that "
                "the lab's documentation-range address may be forwarded"
            )
        if spec.ipv6 and side.nat == "double":
            raise LabUnsupported(f"ipv6 with {side_name}.nat 'double' is not implemented")
        if 0 < side.rate_kbit < 8:
            raise LabError(f"{side_name}.rate_kbit must be 0 (none) or >= 8, not {side.rate_kbit}")
    if spec.rtt_ms < 0:
        raise LabError(f"rtt_ms must be >= 0, not {spec.rtt_ms}")
    if spec.rtt_ms > MAX_RTT_MS:
        raise LabUnsupported(f"rtt_ms={spec.rtt_ms}: at most {MAX_RTT_MS} ms is supported")
