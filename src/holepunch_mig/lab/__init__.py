"""Firewall and NAT topologies in network namespaces, the traversal matrix, the doctor.

The lab's public API, re-exported from the modules that define it: specs and presets
(:mod:`~holepunch_mig.lab.spec`) and the :class:`Lab` that builds them
(:mod:`~holepunch_mig.lab.topology`).  Modules inside ``lab/`` import those modules,
never this package.
"""

from __future__ import annotations

from holepunch_mig.errors import LabError, LabUnsupported
from holepunch_mig.lab.spec import (
    CONTROL_PORT,
    Firewall,
    LabSpec,
    Nat,
    SideSpec,
    load_spec,
    presets,
    spec_from_dict,
    spec_to_dict,
)
from holepunch_mig.lab.topology import NS_PREFIX, STATE_DIR, STUN_PORT, Lab, LabHost

__all__ = [
    "CONTROL_PORT",
    "NS_PREFIX",
    "STATE_DIR",
    "STUN_PORT",
    "Firewall",
    "Lab",
    "LabError",
    "LabHost",
    "LabSpec",
    "LabUnsupported",
    "Nat",
    "SideSpec",
    "load_spec",
    "presets",
    "spec_from_dict",
    "spec_to_dict",
]
